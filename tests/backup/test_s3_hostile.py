"""The S3 client (epio/backup/s3.py) against a hostile endpoint: a real HTTP server on
127.0.0.1 that streams answers for ever, pages a listing for ever or sends sizes that
are not numbers.  The client must fail with :class:`S3Error` (never hold the stream in
memory, never raise anything else) and close the connection it was streamed on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall, deferLater
from twisted.trial.unittest import TestCase
from twisted.web import resource, server

from epio.backup import s3
from epio.backup.s3 import S3Client, S3Error

LISTING_PAGE = (b'<?xml version="1.0"?><ListBucketResult><IsTruncated>true</IsTruncated>'
                b"<NextContinuationToken>more</NextContinuationToken>"
                b"<Contents><Key>p/a</Key><Size>1</Size></Contents></ListBucketResult>")


class Hostile(resource.Resource):
    """``mode`` says how it answers: ``endless`` (every GET body streams for ever, HEAD
    says 1000 bytes), ``slow`` (a byte now and then, for ever), ``pages`` (a listing
    that is always truncated), ``garbage`` (sizes that are not numbers)."""

    isLeaf = True

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.lost: list[Deferred[None]] = []  # one per streamed answer: its connection gone
        self.requests = 0

    def render_HEAD(self, request: server.Request) -> Any:
        request.setHeader(b"content-length", b"abc" if self.mode == "garbage" else b"1000")
        request.finish()
        return server.NOT_DONE_YET

    def render_GET(self, request: server.Request) -> Any:
        self.requests += 1
        if self.mode == "error":
            request.setResponseCode(403)
            return (b"<Error><Code>Access\nDenied</Code><Message>no\n2026-12-07 epio FAKE: "
                    b"line\xe2\x80\xae" + b"x" * 500 + b"</Message></Error>")
        if self.mode == "pages":
            return LISTING_PAGE
        if self.mode == "garbage":
            return LISTING_PAGE.replace(b"<Size>1</Size>", b"<Size>-1e9</Size>").replace(
                b"true", b"false")
        chunk, every = (b"x" * 65536, 0.005) if self.mode == "endless" else (b"x", 0.05)
        loop = LoopingCall(request.write, chunk)
        loop.clock = reactor
        lost: Deferred[None] = Deferred()
        self.lost.append(lost)

        def gone(_: object) -> None:
            loop.stop()
            lost.callback(None)

        request.notifyFinish().addBoth(gone)
        loop.start(every)
        return server.NOT_DONE_YET


class HostileEndpointTests(TestCase):
    timeout = 30

    def serve(self, mode: str, timeout: float = 20.0) -> tuple[Hostile, S3Client]:
        site = Hostile(mode)
        port = reactor.listenTCP(0, server.Site(site), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = S3Client(reactor, f"http://127.0.0.1:{port.getHost().port}", "bkt", "AKID",
                          "s3cr3t-never-shown", prefix="p/", part_size=4096, timeout=timeout)
        self.addCleanup(client.close)
        return site, client

    async def test_endless_answers_are_cut_at_their_limit(self) -> None:
        """A listing streamed for ever is cut at MAX_ANSWER bytes, an object's GET at the
        size its HEAD gave; each fails with S3Error, the download is removed, and the
        connection is closed (the server sees it go) -- nothing keeps streaming in."""
        self.patch(s3, "MAX_ANSWER", 256 << 10)
        site, client = self.serve("endless")
        with self.assertRaises(S3Error) as cm:
            await client.list()
        self.assertIn(f"larger than {256 << 10} bytes", str(cm.exception))
        await site.lost[0]
        dest = Path(self.mktemp())
        with self.assertRaises(S3Error) as cm:
            await client.get_file("obj", dest)
        self.assertIn("larger than 1000 bytes", str(cm.exception))
        self.assertNotIn("s3cr3t", str(cm.exception))
        self.assertFalse(dest.exists())
        await site.lost[1]

    async def test_a_stream_past_the_timeout_is_closed(self) -> None:
        """An answer trickling in for ever (under every size limit) fails at the request
        timeout, and its connection is closed then."""
        site, client = self.serve("slow", timeout=0.5)
        with self.assertRaises(S3Error) as cm:
            await client.list()
        self.assertIn("no answer within 0.5s", str(cm.exception))
        await site.lost[0]
        got = site.requests
        await deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(site.requests, got)

    async def test_a_listing_that_never_ends_is_refused(self) -> None:
        """A listing whose every page says IsTruncated stops at MAX_PAGES pages."""
        self.patch(s3, "MAX_PAGES", 5)
        site, client = self.serve("pages")
        with self.assertRaises(S3Error) as cm:
            await client.list()
        self.assertIn("more than 5 listing pages", str(cm.exception))
        self.assertEqual(site.requests, 5)

    async def test_the_stores_error_text_stays_on_one_short_line(self) -> None:
        """An error answer's code and message are kept on one line (a newline there
        cannot forge a log line), printable only, and cut short."""
        _, client = self.serve("error")
        with self.assertRaises(S3Error) as cm:
            await client.list()
        text = str(cm.exception)
        self.assertTrue(text.startswith("S3 GET bkt: HTTP 403 Access Denied: no 2026-12-07"),
                        text)
        self.assertNotIn("\n", text)
        self.assertTrue(text.isprintable())
        self.assertLess(len(text), 300)

    async def test_sizes_that_are_not_numbers_are_s3_errors(self) -> None:
        """A Content-Length or a listed Size that is not a size is an S3Error (what the
        archiver handles), not a ValueError that would escape it."""
        _, client = self.serve("garbage")
        with self.assertRaises(S3Error) as cm:
            await client.get_file("obj", Path(self.mktemp()))
        self.assertIn("Content-Length", str(cm.exception))
        with self.assertRaises(S3Error) as cm:
            await client.list()
        self.assertIn("not a size", str(cm.exception))
