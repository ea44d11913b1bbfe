"""[http] gzip at the router (epio.lb.compress): the decision, the framing, and the
proxy sending a dynamic response gzipped, on fakes (MemoryReactorClock, StringTransport)."""

from __future__ import annotations

import gzip

from twisted.trial.unittest import SynchronousTestCase

from epio.api.state import release_facts
from epio.lb.compress import GZIP_MIN_BYTES, accepts_gzip, compressible, plan
from epio.lb.http import parse_request, parse_response
from epio.manifest import parse_manifest
from epio.nexus.storeview import options_of
from epio.routefeed import route_from_wire
from epio.routing import Backend
from tests.lb.test_proxy import Harness

HTML = b"<html><body>" + b"<p>hello, compressed world</p>" * 100 + b"</body></html>"


def unchunk(body: bytes) -> bytes:
    out = b""
    while True:
        size, _, body = body.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            return out
        out += body[:n]
        body = body[n + 2:]


def req(*lines: bytes) -> object:
    return parse_request(b"\r\n".join([b"GET / HTTP/1.1", b"Host: a", *lines]))


class DecisionTests(SynchronousTestCase):
    def test_accept_encoding(self) -> None:
        """gzip, x-gzip or * with q > 0 accept; q=0, identity only, or a Range do not."""
        yes = [b"Accept-Encoding: gzip", b"Accept-Encoding: br, gzip;q=0.5",
               b"Accept-Encoding: *", b"accept-encoding: deflate, X-GZIP"]
        no = [b"Accept-Encoding: identity", b"Accept-Encoding: gzip;q=0",
              b"Accept-Encoding: br"]
        for ln in yes:
            self.assertTrue(accepts_gzip(req(ln)), ln)  # type: ignore[arg-type]
        for ln in no:
            self.assertFalse(accepts_gzip(req(ln)), ln)  # type: ignore[arg-type]
        self.assertFalse(accepts_gzip(req(b"Accept-Encoding: gzip",  # type: ignore[arg-type]
                                          b"Range: bytes=0-10")))
        self.assertFalse(accepts_gzip(req()))  # type: ignore[arg-type]

    def test_plan(self) -> None:
        """Only text-like 2xx (not 204/206) bodies of GZIP_MIN_BYTES or more (or unknown
        length), not already encoded, without Content-Range or no-transform; the new head
        has Content-Encoding, Vary (merged) and a weak ETag; refusals of a text response
        still get Vary."""
        r = req(b"Accept-Encoding: gzip")

        def resp(status: int = 200, *lines: bytes, length: int | None = 5000) -> object:
            cl = [b"Content-Length: %d" % length] if length is not None else []
            head = b"HTTP/1.1 %d X\r\n" % status + b"\r\n".join(
                [b"Content-Type: text/html; charset=utf-8", *cl, *lines])
            return parse_response(head)

        gz, lines = plan(r, resp(200, b'ETag: "abc"', b"Vary: Cookie"))  # type: ignore[arg-type]
        self.assertTrue(gz)
        self.assertIn(b"Content-Encoding: gzip", lines)
        self.assertIn(b"Vary: Cookie, Accept-Encoding", lines)
        self.assertIn(b'ETag: W/"abc"', lines)
        self.assertTrue(plan(r, resp(200, length=None))[0])  # type: ignore[arg-type]
        for refused in (resp(200, length=GZIP_MIN_BYTES - 1), resp(206), resp(204),
                        resp(404), resp(200, b"Content-Encoding: br"),
                        resp(200, b"Content-Range: bytes 0-9/10"),
                        resp(200, b"Cache-Control: public, no-transform")):
            self.assertFalse(plan(r, refused)[0])  # type: ignore[arg-type]
        self.assertIn(b"Vary: Accept-Encoding",
                      plan(req(), resp())[1])  # type: ignore[arg-type]
        self.assertFalse(compressible(b"image/png"))
        self.assertTrue(compressible(b"application/vnd.api+json"))

    def test_manifest_to_route(self) -> None:
        """[http] gzip = true travels: release facts -> nexus options -> route."""
        m = parse_manifest("[wsgi]\nentrypoint = a:b\n[http]\ngzip = true\n", None,
                           ["requirements.txt"])
        options = options_of(release_facts(m.to_dict()))
        self.assertEqual(options, {"gzip": True})
        route = route_from_wire({"app": "a", "hostnames": ["a.x"], "backends": [],
                                 "options": options})
        self.assertTrue(route.gzip)


class ProxyGzipTests(SynchronousTestCase):
    def exchange(self, request: bytes, response: bytes, pieces: int = 1,
                 close: bool = False, gzip_on: bool = True) -> bytes:
        """One request through a fresh router to a fresh backend connection."""
        self.h = Harness([Backend("10.0.0.1", 1)], route={"gzip": gzip_on})
        c, t = self.h.client()
        c.dataReceived(request)
        bp, bt, _ = self.h.accept()
        step = max(1, len(response) // pieces)
        for i in range(0, len(response), step):
            bp.dataReceived(response[i:i + step])
        if close:
            bt.disconnecting = True
            from twisted.internet import error
            from twisted.python.failure import Failure
            bp.connectionLost(Failure(error.ConnectionDone()))
        return t.value()

    def test_dynamic_response_gzipped_in_each_framing(self) -> None:
        """A text response with Content-Length, chunked, or until the backend closes, in
        one piece or many, reaches an HTTP/1.1 client gzipped and chunked, decompressing
        to exactly the app's bytes; an HTTP/1.0 client gets it close-delimited."""
        get = b"GET / HTTP/1.1\r\nHost: a.example.com\r\nAccept-Encoding: gzip\r\n\r\n"
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n"
        cl = head + b"Content-Length: %d\r\n\r\n" % len(HTML) + HTML
        chunked = head + b"Transfer-Encoding: chunked\r\n\r\n" + b"".join(
            b"%x\r\n%b\r\n" % (len(HTML[i:i + 700]), HTML[i:i + 700])
            for i in range(0, len(HTML), 700)) + b"0\r\n\r\n"
        for response, pieces, close in ((cl, 1, False), (cl, 7, False), (chunked, 5, False),
                                        (head + b"Connection: close\r\n\r\n" + HTML, 3, True)):
            out = self.exchange(get, response, pieces, close)
            head_out, _, body = out.partition(b"\r\n\r\n")
            self.assertIn(b"\r\nContent-Encoding: gzip", head_out)
            self.assertIn(b"\r\nTransfer-Encoding: chunked", head_out)
            self.assertIn(b"\r\nVary: Accept-Encoding", head_out)
            self.assertNotIn(b"Content-Length", head_out)
            self.assertEqual(gzip.decompress(unchunk(body)), HTML)
        out = self.exchange(get.replace(b"HTTP/1.1", b"HTTP/1.0"), cl, 2)
        head_out, _, body = out.partition(b"\r\n\r\n")
        self.assertIn(b"\r\nConnection: close", head_out)
        self.assertEqual(gzip.decompress(body), HTML)

    def test_not_gzipped(self) -> None:
        """No Accept-Encoding, a Range request, HEAD, an already encoded or binary body,
        and a route without gzip pass through byte for byte."""
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: %d\r\n\r\n"
        cl = head % len(HTML) + HTML
        for request in (b"GET / HTTP/1.1\r\nHost: a.example.com\r\n\r\n",
                        b"GET / HTTP/1.1\r\nHost: a.example.com\r\nAccept-Encoding: gzip\r\n"
                        b"Range: bytes=0-99\r\n\r\n"):
            out = self.exchange(request, cl)
            self.assertNotIn(b"Content-Encoding", out)
            self.assertTrue(out.endswith(HTML))
        get = b"GET / HTTP/1.1\r\nHost: a.example.com\r\nAccept-Encoding: gzip\r\n\r\n"
        out = self.exchange(get.replace(b"GET", b"HEAD"), head % len(HTML))
        self.assertNotIn(b"Content-Encoding", out)
        self.assertIn(b"Content-Length: %d" % len(HTML), out)
        pre = gzip.compress(HTML)
        out = self.exchange(get, b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n"
                            b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(pre)
                            + pre)
        self.assertTrue(out.endswith(pre))  # never re-encoded
        png = b"\x89PNG" + b"\0" * 4000
        out = self.exchange(get, b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n"
                            b"Content-Length: %d\r\n\r\n" % len(png) + png)
        self.assertTrue(out.endswith(png))
        out = self.exchange(get, cl, gzip_on=False)
        self.assertNotIn(b"Content-Encoding", out)
        self.assertNotIn(b"Vary", out)
