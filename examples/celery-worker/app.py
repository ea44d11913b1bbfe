import json
from urllib.parse import parse_qs

from tasks import add


def application(environ, start_response):
    path = environ.get("PATH_INFO", "/")
    if path == "/health":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]
    if path == "/add":
        q = parse_qs(environ.get("QUERY_STRING", ""))
        x, y = int(q.get("x", ["0"])[0]), int(q.get("y", ["0"])[0])
        result = add.delay(x, y).get(timeout=30)
        body = json.dumps(result).encode()
        start_response("200 OK", [("Content-Type", "application/json")])
        return [body]
    start_response("404 Not Found", [("Content-Type", "text/plain")])
    return [b"try /add?x=2&y=3"]
