"""The router's own responses: platform error pages (HTML or JSON)."""

from __future__ import annotations

import json
from html import escape

REASONS = {
    100: b"Continue", 200: b"OK", 308: b"Permanent Redirect", 400: b"Bad Request",
    401: b"Unauthorized", 404: b"Not Found",
    405: b"Method Not Allowed", 408: b"Request Timeout", 413: b"Content Too Large",
    414: b"URI Too Long", 417: b"Expectation Failed", 431: b"Request Header Fields Too Large",
    500: b"Internal Server Error", 501: b"Not Implemented", 502: b"Bad Gateway",
    503: b"Service Unavailable", 504: b"Gateway Timeout", 505: b"HTTP Version Not Supported",
}

TITLES = {
    "no_route": "No such app",
    "unauthorized": "Authentication required",
    "maintenance": "Down for maintenance",
    "no_backend": "App not running",
    "queue_full": "App overloaded",
    "backend_refused": "App not reachable",
    "backend_closed": "App closed the connection",
    "bad_response": "App sent an invalid response",
    "timeout": "App did not answer in time",
    "client_timeout": "Request not received in time",
    "too_large": "Request body too large",
}

#: error pages kept by one ErrorPages (a router answers with a few dozen kinds)
MAX_CACHED_PAGES = 512


def render(status: int, code: str, message: str, as_json: bool) -> tuple[bytes, bytes]:
    """(content type, body) for an error answered by the router itself."""
    if as_json:
        body = json.dumps({"error": {"code": code, "message": message}}).encode() + b"\n"
        return b"application/json", body
    title = TITLES.get(code, REASONS.get(status, b"Error").decode())
    body = (
        f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{status} {escape(title)}</title></head>\n"
        f"<body style=\"font-family:sans-serif;margin:4em\"><h1>{escape(title)}</h1><p>{escape(message)}</p>"
        f"<p><small>{status} &middot; {escape(code)} &middot; epio router</small></p></body></html>\n"
    ).encode()
    return b"text/html; charset=utf-8", body


class ErrorPages:
    """The router's error pages, each rendered once (up to ``MAX_CACHED_PAGES``): one
    per router process, owned by its :class:`~epio.lb.proxy.LB`."""

    __slots__ = ("_cache",)

    def __init__(self) -> None:
        self._cache: dict[tuple[int, str, str, bool], tuple[bytes, bytes]] = {}

    def render(self, status: int, code: str, message: str, as_json: bool) -> tuple[bytes, bytes]:
        """(content type, body): :func:`render`'s, from the cache when seen before."""
        key = (status, code, message, as_json)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        out = render(status, code, message, as_json)
        if len(self._cache) < MAX_CACHED_PAGES:
            self._cache[key] = out
        return out
