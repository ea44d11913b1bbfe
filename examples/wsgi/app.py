"""The smallest epio app: a WSGI callable, no dependencies (epio adds gunicorn)."""

import os


def application(environ, start_response):
    body = f"Hello from epio! ({os.environ.get('EPIO_APP', 'app')})\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
