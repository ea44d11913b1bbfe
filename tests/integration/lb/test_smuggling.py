"""Raw-socket suite of malformed and smuggling requests: the router refuses each
with the right status and closes, and the backend receives nothing it should not."""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from .helpers import Backend, get, raw_client, simple_route, start_router, wait_until

H = "Host: a.example.com\r\n"

# (name, raw request, expected status)
BAD: list[tuple[str, bytes, int]] = [
    ("CL.TE", f"POST / HTTP/1.1\r\n{H}Content-Length: 13\r\nTransfer-Encoding: chunked\r\n\r\n"
              "0\r\n\r\nSMUGGLED", 400),
    ("TE.CL", f"POST / HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n"
              "5c\r\nSMUGGLED\r\n0\r\n\r\n", 400),
    ("TE space before colon", f"POST / HTTP/1.1\r\n{H}Transfer-Encoding : chunked\r\n\r\n"
                              "0\r\n\r\nSMUGGLED", 400),
    ("TE xchunked", f"POST / HTTP/1.1\r\n{H}Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\nSMUGGLED", 400),
    ("TE not last", f"POST / HTTP/1.1\r\n{H}Transfer-Encoding: chunked, identity\r\n\r\nSMUGGLED", 400),
    ("TE twice", f"POST / HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n\r\n"
                 "0\r\n\r\nSMUGGLED", 400),
    ("TE in 1.0", f"POST / HTTP/1.0\r\n{H}Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nSMUGGLED", 400),
    ("duplicate CL", f"POST / HTTP/1.1\r\n{H}Content-Length: 8\r\nContent-Length: 0\r\n\r\nSMUGGLED", 400),
    ("CL list", f"POST / HTTP/1.1\r\n{H}Content-Length: 8, 0\r\n\r\nSMUGGLED", 400),
    ("CL sign", f"POST / HTTP/1.1\r\n{H}Content-Length: +8\r\n\r\nSMUGGLED", 400),
    ("obs-fold", f"GET / HTTP/1.1\r\n{H}X-A: 1\r\n Transfer-Encoding: chunked\r\n\r\nSMUGGLED", 400),
    ("bare LF head", "GET / HTTP/1.1\nHost: a.example.com\n\nSMUGGLED", 400),
    ("bare CR in field", f"GET / HTTP/1.1\r\n{H}X-A: 1\rTransfer-Encoding: chunked\r\n\r\nSMUGGLED", 400),
    ("NUL in field", f"GET / HTTP/1.1\r\n{H}X-A: a\x00b\r\n\r\nSMUGGLED", 400),
    ("no Host", "GET / HTTP/1.1\r\nX-A: 1\r\n\r\nSMUGGLED", 400),
    ("two Hosts", f"GET / HTTP/1.1\r\n{H}Host: b.example.com\r\n\r\nSMUGGLED", 400),
    ("space in name", f"GET / HTTP/1.1\r\n{H}X A: 1\r\n\r\nSMUGGLED", 400),
    ("chunk size overflow", f"POST / HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\n\r\n"
                            "ffffffffffffffffff\r\nSMUGGLED\r\n0\r\n\r\n", 400),
    ("chunk data without CRLF", f"POST / HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\n\r\n"
                                "3\r\nabcSMUGGLED\r\n0\r\n\r\n", 400),
    ("chunk ext bare LF", f"POST / HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\n\r\n"
                          "3;a\nb\r\nabc\r\n0\r\n\r\n", 400),
    ("long request line", "GET /" + "a" * 9000 + f" HTTP/1.1\r\n{H}\r\n", 414),
    ("too many headers", f"GET / HTTP/1.1\r\n{H}" + "".join(f"X-{i}: v\r\n" for i in range(101))
                         + "\r\n", 431),
    ("headers too large", f"GET / HTTP/1.1\r\n{H}" + "".join(f"X-{i}: {'v' * 1000}\r\n" for i in range(17))
                          + "\r\n", 431),
    ("HTTP/2 preface", "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
    ("garbage", "\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n", 400),
]


class SmugglingTests(TestCase):
    timeout = 30

    async def test_malformed_requests_refused_and_nothing_smuggled(self) -> None:
        """Each malformed request: expected status, connection closed, backend saw nothing."""
        b = await Backend().start()
        self.addCleanup(b.stop)
        svc, port = await start_router([simple_route("a", b, max_body_size=1 << 20)])
        self.addCleanup(svc.stopService)
        for name, raw, status in BAD:
            c = await raw_client(port)
            c.send(raw.encode("latin-1"))
            got, _, _ = await c.response()
            self.assertEqual(got, status, name)
            await c.lost
            if "chunk" in name:
                # a body error shows only after the head went on: the backend got the
                # head and then a cut connection, never a complete request or the payload
                await wait_until(lambda: b.open == 0, what=f"{name}: backend connection cut")
                self.assertNotIn(b"SMUGGLED", b.all_raw(), name)
            else:
                self.assertEqual(b.raw, [], f"{name}: the backend received {b.all_raw()[:200]!r}")
            self.assertEqual(b.requests, [], name)
            b.raw.clear()
            b.raw_bytes = 0

    async def test_pipelined_second_request_is_reparsed_not_smuggled(self) -> None:
        """A request hidden after a zero-length body is parsed as its own request, with our headers."""
        b = await Backend().start()
        self.addCleanup(b.stop)
        svc, port = await start_router([simple_route("a", b)])
        self.addCleanup(svc.stopService)
        c = await raw_client(port)
        self.addCleanup(c.transport.abortConnection)
        c.send(f"POST / HTTP/1.1\r\n{H}Content-Length: 0\r\n\r\n"
               f"GET /admin HTTP/1.1\r\n{H}X-Forwarded-For: 1.2.3.4\r\n\r\n".encode())
        await c.response()
        await c.response()
        self.assertEqual([r.target for r in b.requests], [b"/", b"/admin"])
        self.assertEqual(b.requests[1].get(b"x-forwarded-for"), b"127.0.0.1")

    async def test_bad_chunk_never_reaches_the_backend(self) -> None:
        """A bad chunk in a buffered body: 400 to the client; the backend saw nothing."""
        b = await Backend().start()
        self.addCleanup(b.stop)
        svc, port = await start_router([simple_route("a", b)])
        self.addCleanup(svc.stopService)
        c = await raw_client(port)
        c.send(f"POST /x HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n".encode())
        c.send(b"zz\r\nGET /smuggled HTTP/1.1\r\n\r\n")
        status, _, _ = await c.response()
        self.assertEqual(status, 400)
        await c.lost
        self.assertEqual((b.all_raw(), b.connections), (b"", []))

    async def test_chunked_body_errors_abort_the_backend_request(self) -> None:
        """A bad chunk after the head of a streamed body (request_buffering off): 400 to
        the client, the backend request is cut off."""
        b = await Backend().start()
        self.addCleanup(b.stop)
        svc, port = await start_router([simple_route("a", b, request_buffering=False)])
        self.addCleanup(svc.stopService)
        c = await raw_client(port)
        c.send(f"POST /x HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n".encode())
        await wait_until(lambda: b"3\r\nabc\r\n" in b.all_raw())
        c.send(b"zz\r\nGET /smuggled HTTP/1.1\r\n\r\n")
        status, _, _ = await c.response()
        self.assertEqual(status, 400)
        await c.lost
        await wait_until(lambda: b.open == 0)
        self.assertNotIn(b"smuggled", b.all_raw())
        self.assertEqual(b.requests, [])

    async def test_backend_response_splitting_does_not_poison(self) -> None:
        """Extra bytes after a backend response are dropped with the connection."""
        b = await Backend().start()
        self.addCleanup(b.stop)
        svc, port = await start_router([simple_route("a", b)])
        self.addCleanup(svc.stopService)
        c = await raw_client(port)
        self.addCleanup(c.transport.abortConnection)
        c.send(get("a.example.com", "/extra"))
        self.assertEqual((await c.response())[2], b"ok")
        c.send(get("a.example.com", "/next"))
        self.assertEqual((await c.response())[2], b"ok GET /next 0")
        self.assertEqual(len(b.connections), 2)
