"""Unit tests for the router's strict HTTP/1.1 parser (epio.lb.http)."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from epio.lb.http import (
    BadMessage,
    BadResponse,
    ChunkedDecoder,
    HTTPError,
    parse_request,
    parse_response,
    valid_request_id,
)


def head(*lines: str) -> bytes:
    return "\r\n".join(lines).encode("latin-1")


class RequestParsingTests(SynchronousTestCase):
    def test_simple_get(self) -> None:
        """A plain GET yields method, target, host, keep-alive and its other headers."""
        r = parse_request(head("GET /a?b=1 HTTP/1.1", "Host: Example.com", "X-A: 1"))
        self.assertEqual((r.method, r.target, r.host), (b"GET", b"/a?b=1", "Example.com"))
        self.assertTrue(r.keep_alive)
        self.assertEqual(r.lines, [b"X-A: 1"])
        self.assertEqual(r.content_length, -1)
        self.assertFalse(r.has_body)

    def test_hop_by_hop_and_connection_named_headers_are_dropped(self) -> None:
        """Connection, Keep-Alive, TE, Trailer, Proxy-Connection and Connection-named go."""
        r = parse_request(head(
            "GET / HTTP/1.1", "Host: a", "Connection: keep-alive, X-Secret", "Keep-Alive: 5",
            "TE: trailers", "Trailer: X", "Proxy-Connection: x", "X-Secret: 1", "X-Kept: 2",
        ))
        self.assertEqual(r.lines, [b"X-Kept: 2"])

    def test_http10_keepalive_rules(self) -> None:
        """HTTP/1.0 persists only with Connection: keep-alive; 1.1 closes on close."""
        self.assertFalse(parse_request(head("GET / HTTP/1.0")).keep_alive)
        self.assertTrue(parse_request(head("GET / HTTP/1.0", "Connection: Keep-Alive")).keep_alive)
        self.assertFalse(parse_request(head("GET / HTTP/1.1", "Host: a", "Connection: close")).keep_alive)

    def test_content_length_and_chunked(self) -> None:
        """Content-Length and chunked framing are recognised."""
        self.assertEqual(parse_request(head("POST / HTTP/1.1", "Host: a", "Content-Length: 12")).content_length, 12)
        r = parse_request(head("POST / HTTP/1.1", "Host: a", "Transfer-Encoding: Chunked"))
        self.assertTrue(r.chunked)

    def test_absolute_form(self) -> None:
        """An absolute-form target routes by its authority and is sent on in origin form."""
        r = parse_request(head("GET http://app.example.com/x?y HTTP/1.1", "Host: other"))
        self.assertEqual((r.host, r.target, r.host_line), ("app.example.com", b"/x?y", b"Host: app.example.com"))

    def test_expect_and_upgrade(self) -> None:
        """Expect: 100-continue and Connection: upgrade are flagged, other Expect is 417."""
        r = parse_request(head("PUT / HTTP/1.1", "Host: a", "Content-Length: 1", "Expect: 100-Continue"))
        self.assertTrue(r.expect_continue)
        r = parse_request(head("GET / HTTP/1.1", "Host: a", "Connection: Upgrade", "Upgrade: websocket"))
        self.assertEqual(r.upgrade, b"websocket")
        e = self.assertRaises(HTTPError, parse_request, head("GET / HTTP/1.1", "Host: a", "Expect: x"))
        self.assertEqual(e.status, 417)

    def test_accept_json(self) -> None:
        """A client accepting JSON is flagged (error pages in JSON)."""
        self.assertTrue(parse_request(head("GET / HTTP/1.1", "Host: a", "Accept: application/json")).accept_json)

    def assertRejected(self, raw: bytes, status: int = 400) -> None:
        e = self.assertRaises(BadMessage, parse_request, raw)
        self.assertEqual(e.status, status, e.message)

    def test_smuggling_and_malformed_heads_rejected(self) -> None:
        """Every ambiguous framing or malformed head is refused with the right status."""
        cases = [
            head("POST / HTTP/1.1", "Host: a", "Content-Length: 5", "Transfer-Encoding: chunked"),
            head("POST / HTTP/1.1", "Host: a", "Content-Length: 5", "Content-Length: 5"),
            head("POST / HTTP/1.1", "Host: a", "Content-Length: 5", "Content-Length: 6"),
            head("POST / HTTP/1.1", "Host: a", "Content-Length: +5"),
            head("POST / HTTP/1.1", "Host: a", "Content-Length: 5 5"),
            head("POST / HTTP/1.1", "Host: a", "Content-Length: 0x5"),
            head("POST / HTTP/1.1", "Host: a", "Content-Length: -1"),
            head("POST / HTTP/1.1", "Host: a", "Content-Length:"),
            head("POST / HTTP/1.1", "Host: a", "Transfer-Encoding: chunked, identity"),
            head("POST / HTTP/1.1", "Host: a", "Transfer-Encoding: xchunked"),
            head("POST / HTTP/1.1", "Host: a", "Transfer-Encoding: chunked", "Transfer-Encoding: identity"),
            head("POST / HTTP/1.0", "Host: a", "Transfer-Encoding: chunked"),
            head("GET / HTTP/1.1", "Host: a", "X-Folded: a", " continued"),
            head("GET / HTTP/1.1", "Host: a", "\tX-Folded: a"),
            head("GET / HTTP/1.1", "Host : a"),
            head("GET / HTTP/1.1", "Host: a", "Transfer-Encoding : chunked"),
            head("GET / HTTP/1.1", "Host: a", "X-Nul: a\x00b"),
            head("GET / HTTP/1.1", "Host: a", "X-Cr: a\rb"),
            head("GET / HTTP/1.1", "Host: a", "X-Lf: a\nTransfer-Encoding: chunked"),
            head("GET / HTTP/1.1", "Host: a", "X-Del: a\x7fb"),
            head("GET / HTTP/1.1", "Host: a", ": empty-name"),
            head("GET / HTTP/1.1", "Host: a", "No-Colon"),
            head("GET / HTTP/1.1"),
            head("GET / HTTP/1.1", "Host: a", "Host: b"),
            head("GET / HTTP/1.1", "Host: a b"),
            head("GET / HTTP/1.1", "Host: a/b"),
            head("GET / HTTP/1.1", "Host: "),
            head("GET  / HTTP/1.1", "Host: a"),
            head("GET / HTTP/1.1 ", "Host: a"),
            head("GET /a b HTTP/1.1", "Host: a"),
            head("G(T / HTTP/1.1", "Host: a"),
            head("GET / HTTP/1.1\x00", "Host: a"),
            head("GET / FOO/1.1", "Host: a"),
            head("GET /\x01 HTTP/1.1", "Host: a"),
            head("GET nohost HTTP/1.1", "Host: a"),
            head("GET http://u@evil/ HTTP/1.1", "Host: a"),
            head("GET / HTTP/1.1", "Host: a", "Connection: upgrade", "Upgrade: websocket",
                 "Content-Length: 3"),
        ]
        for raw in cases:
            self.assertRejected(raw)

    def test_versions_and_limits(self) -> None:
        """HTTP/2.0 is 505, a long request line 414, too many or too large headers 431."""
        self.assertRejected(head("GET / HTTP/2.0", "Host: a"), 505)
        self.assertRejected(("GET /" + "a" * 8200 + " HTTP/1.1\r\nHost: a").encode(), 414)
        many = ["GET / HTTP/1.1", "Host: a"] + [f"X-{i}: v" for i in range(100)]
        self.assertRejected(head(*many), 431)
        big = ["GET / HTTP/1.1", "Host: a"] + [f"X-{i}: " + "v" * 1000 for i in range(17)]
        self.assertRejected(head(*big), 431)
        self.assertRejected(head("GET / HTTP/1.1", "Host: a", "Transfer-Encoding: gzip, chunked"), 501)
        self.assertRejected(head("CONNECT a:443 HTTP/1.1", "Host: a"), 405)

    def test_obs_text_and_tab_in_values_allowed(self) -> None:
        """Tabs and obs-text bytes in field values are legal and kept."""
        r = parse_request(b"GET / HTTP/1.1\r\nHost: a\r\nX-T: a\tb \xe9")
        self.assertEqual(r.lines, [b"X-T: a\tb \xe9"])

    def test_request_id_validation(self) -> None:
        """Request ids are kept only when 20-200 safe characters."""
        self.assertTrue(valid_request_id(b"a" * 20))
        self.assertTrue(valid_request_id(b"0123456789abcdef-0123/+="))
        self.assertFalse(valid_request_id(b"a" * 19))
        self.assertFalse(valid_request_id(b"a" * 201))
        self.assertFalse(valid_request_id(b"a" * 19 + b" "))
        self.assertFalse(valid_request_id(b"a" * 19 + b"<"))


class ResponseParsingTests(SynchronousTestCase):
    def test_framing(self) -> None:
        """Content-Length, chunked and close-delimited responses are told apart."""
        r = parse_response(head("HTTP/1.1 200 OK", "Content-Length: 3", "Connection: keep-alive"))
        self.assertEqual((r.status, r.content_length, r.keep_alive), (200, 3, True))
        r = parse_response(head("HTTP/1.1 200 OK", "Transfer-Encoding: chunked"))
        self.assertTrue(r.chunked)
        r = parse_response(head("HTTP/1.0 200 OK"))
        self.assertFalse(r.keep_alive)
        r = parse_response(head("HTTP/1.1 200 OK", "Transfer-Encoding: gzip"))
        self.assertEqual((r.chunked, r.content_length, r.keep_alive), (False, -1, False))
        r = parse_response(head("HTTP/1.1 204"))
        self.assertEqual(r.status, 204)

    def test_bad_responses(self) -> None:
        """Conflicting lengths, bad status lines and bad fields are refused (502)."""
        for raw in [
            head("HTTP/1.1 200 OK", "Content-Length: 3", "Content-Length: 4"),
            head("HTTP/1.1 200 OK", "Content-Length: x"),
            head("HTTP/1.1 20 OK"),
            head("HTTP/2 200 OK"),
            head("HTTP/1.1 200 OK", "X: a\rb"),
            head("HTTP/1.1 200 OK", "X : a"),
        ]:
            self.assertRaises(BadResponse, parse_response, raw)

    def test_hop_by_hop_stripped(self) -> None:
        """Hop-by-hop and Connection-named response headers are not passed on."""
        r = parse_response(head("HTTP/1.1 200 OK", "Connection: X-Hop", "X-Hop: 1",
                                "Keep-Alive: timeout=5", "Content-Length: 0", "X-Ok: 1"))
        self.assertEqual(r.lines, [b"X-Ok: 1"])


class ChunkedTests(SynchronousTestCase):
    def decode(self, pieces: list[bytes]) -> tuple[bytes, bytes | None]:
        out: list[bytes] = []
        d = ChunkedDecoder(out.append)
        rest = None
        for i, p in enumerate(pieces):
            rest = d.feed(p)
            if rest is not None:
                rest += b"".join(pieces[i + 1:])
                break
        return b"".join(out), rest

    def test_whole_and_bytewise(self) -> None:
        """The same body decodes whole or fed one byte at a time; the rest is returned."""
        raw = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\nNEXT"
        self.assertEqual(self.decode([raw]), (b"hello world", b"NEXT"))
        data, rest = self.decode([raw[i:i + 1] for i in range(len(raw))])
        self.assertEqual(data, b"hello world")
        self.assertEqual(rest, b"NEXT")

    def test_incomplete(self) -> None:
        """An unfinished body returns None."""
        self.assertEqual(self.decode([b"5\r\nhel"]), (b"hel", None))

    def test_bad_chunks(self) -> None:
        """Bad sizes, missing CRLFs, bare LF and oversized sizes are refused."""
        for raw in [b"x\r\n", b"5\r\nhelloXX", b"5\nhello\r\n", b"-1\r\n", b" 5\r\nhello\r\n",
                    b"1234567890abcdef0\r\n", b"5\r\nhello\r\n0\r\nBad Trailer\r\n\r\n",
                    b"5\r\nhello\n\r\n", b"0x5\r\nhello\r\n"]:
            self.assertRaises(BadMessage, self.decode, [raw])
