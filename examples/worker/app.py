"""Web process: shows how many jobs the worker has done (shared through the data dir)."""

import os
from pathlib import Path

COUNTER = Path(os.environ.get("EPIO_DATA_DIR", "/data")) / "ticks"


def application(environ, start_response):
    try:
        ticks = COUNTER.read_text().strip()
    except OSError:
        ticks = "0"
    body = f"the worker has ticked {ticks} times\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [body]
