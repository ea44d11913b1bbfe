"""gzip of dynamic responses at the router (``[http] gzip = true``; docs/router.md).

Two parts, kept out of the proxy's hot path (the proxy calls :func:`plan` only for a
route with ``gzip`` on, and hands the body to :class:`GzipBody` only when it said yes):

* :func:`plan` decides from the request and the response head whether to compress,
  and gives the response's new header lines.  It says yes only when every one holds:
  the client accepts gzip (``Accept-Encoding``, ``q`` > 0) and sent no ``Range``; the
  status is 200-299 but not 204/206; the response has no ``Content-Encoding`` (never
  re-encodes) and no ``Content-Range``, no ``Cache-Control: no-transform``; its
  ``Content-Type`` is text-like (:func:`compressible`); its ``Content-Length``, when
  given, is at least :data:`GZIP_MIN_BYTES`.  HEAD, 204 and 304 never get here (no
  body).  The new head drops ``Content-Length``, adds ``Content-Encoding: gzip``, adds
  ``Accept-Encoding`` to ``Vary`` and makes a strong ``ETag`` weak (the bytes differ).
  A response the router does not compress for a route with gzip on still gets
  ``Vary: Accept-Encoding`` (caches must not serve it to a gzip client instead of the
  compressed one).
* :class:`GzipBody` reads the backend's body in its own framing (Content-Length,
  chunked, or until close), compresses it (zlib, level :data:`GZIP_LEVEL`) and writes
  it chunked (HTTP/1.1 clients) or as it comes (HTTP/1.0: the connection closes).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

from epio.lb.http import ChunkedDecoder, HTTPError, Request, Response

GZIP_MIN_BYTES = 1024  # smaller bodies are sent as they are (the gzip frame costs more)
GZIP_LEVEL = 6
_TEXT_TYPES = (b"text/", b"application/json", b"application/javascript",
               b"application/x-javascript", b"application/xml", b"application/xhtml+xml",
               b"application/rss+xml", b"application/atom+xml", b"application/ld+json",
               b"application/manifest+json", b"image/svg+xml")


def compressible(content_type: bytes) -> bool:
    """Text-like media types (and ``+json``/``+xml`` suffixes)."""
    t = content_type.split(b";", 1)[0].strip().lower()
    return t.startswith(_TEXT_TYPES) or t.endswith((b"+json", b"+xml"))


def accepts_gzip(req: Request) -> bool:
    """``Accept-Encoding`` lists gzip (or ``*``) with q > 0, and no ``Range`` was sent."""
    ok = False
    for ln in req.lines:
        colon = ln.find(b":")
        name = ln[:colon].strip().lower()
        if name == b"range":
            return False
        if name != b"accept-encoding":
            continue
        for item in ln[colon + 1:].split(b","):
            coding, _, params = item.partition(b";")
            coding = coding.strip().lower()
            if coding not in (b"gzip", b"x-gzip", b"*"):
                continue
            q = params.strip().lower()
            if q.startswith(b"q="):
                try:
                    if float(q[2:]) <= 0:
                        if coding != b"*":
                            ok = False
                            break
                        continue
                except ValueError:
                    continue
            ok = True
    return ok


def _vary(lines: list[bytes]) -> list[bytes]:
    """``lines`` with Accept-Encoding in (one) Vary."""
    out = []
    found = False
    for ln in lines:
        colon = ln.find(b":")
        if ln[:colon].strip().lower() == b"vary":
            value = ln[colon + 1:].strip()
            tokens = [t.strip().lower() for t in value.split(b",")]
            if b"accept-encoding" not in tokens and b"*" not in tokens:
                ln = b"Vary: " + value + b", Accept-Encoding"
            found = True
        out.append(ln)
    if not found:
        out.append(b"Vary: Accept-Encoding")
    return out


def plan(req: Request, resp: Response) -> tuple[bool, list[bytes]]:
    """(compress?, the response's header lines) for a route with gzip on."""
    status = resp.status
    ctype = b""
    for ln in resp.lines:
        colon = ln.find(b":")
        name = ln[:colon].strip().lower()
        if name in (b"content-encoding", b"content-range"):
            return False, resp.lines  # never re-encode; never a part
        if name == b"content-type":
            ctype = ln[colon + 1:]
        elif name == b"cache-control" and b"no-transform" in ln[colon + 1:].lower():
            return False, resp.lines
    if not compressible(ctype):
        return False, resp.lines
    if not (200 <= status < 300) or status in (204, 206):
        return False, _vary(resp.lines)
    if 0 <= resp.content_length < GZIP_MIN_BYTES or not accepts_gzip(req):
        return False, _vary(resp.lines)
    lines = []
    for ln in _vary(resp.lines):
        colon = ln.find(b":")
        if ln[:colon].strip().lower() == b"etag":
            value = ln[colon + 1:].strip()
            if not value.startswith(b"W/"):
                ln = b"ETag: W/" + value
        lines.append(ln)
    lines.append(b"Content-Encoding: gzip")
    return True, lines


class GzipBody:
    """The backend's body (``length`` bytes, chunked, or until close) gzipped out.

    ``write`` sends bytes to the client; ``done(reusable)`` is called once, when the
    body ended (``reusable`` False when the backend sent bytes past its end).  ``feed``
    raises :class:`HTTPError` on broken chunked framing from the backend.
    """

    def __init__(self, write: Callable[[bytes], None], done: Callable[[bool], None],
                 length: int, chunked: bool, chunk_out: bool) -> None:
        self._write = write
        self._done = done
        self.left = length  # -1: chunked or until close
        self.until_close = length < 0 and not chunked
        self.chunk_out = chunk_out
        self.sent = 0  # compressed bytes written (the access log's size)
        self.raw = 0
        self._z = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)
        self._decoder = ChunkedDecoder(self._piece) if chunked else None
        self.finished = False

    def _out(self, data: bytes) -> None:
        if not data:
            return
        self.sent += len(data)
        if self.chunk_out:
            self._write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            self._write(data)

    def _piece(self, data: bytes) -> None:
        self.raw += len(data)
        self._out(self._z.compress(data))

    def feed(self, data: bytes) -> None:
        if self.finished:
            return
        if self._decoder is not None:
            rest = self._decoder.feed(data)
            if rest is not None:
                self.finish(reusable=not rest)
            return
        if self.left < 0:
            self._piece(data)
            return
        extra = len(data) > self.left
        if extra:
            data = data[:self.left]
        self.left -= len(data)
        self._piece(data)
        if self.left == 0:
            self.finish(reusable=not extra)

    def finish(self, reusable: bool = True) -> None:
        """The body ended: flush the gzip trailer, end the chunked stream."""
        if self.finished:
            return
        self.finished = True
        self._out(self._z.flush())
        if self.chunk_out:
            self._write(b"0\r\n\r\n")
        self._done(reusable)


__all__ = ["GZIP_LEVEL", "GZIP_MIN_BYTES", "GzipBody", "HTTPError", "accepts_gzip",
           "compressible", "plan"]
