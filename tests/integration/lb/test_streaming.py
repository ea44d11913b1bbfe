"""Large bodies stream through the router both ways with flat memory.

256 MiB each way by default (bounded for CI); ``EPIO_LB_BIG=1`` streams the full
1 GiB.  Client, router and backend share this process, so the RSS bound covers
all three: any component buffering a body would blow through it.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from .helpers import Backend, simple_route, start_router

SIZE = (1 << 30) if os.environ.get("EPIO_LB_BIG") == "1" else (256 << 20)
RSS_BOUND = 64 << 20


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class CountingClient(Protocol):
    """Sends a head (and optionally a big body under backpressure); counts what comes back."""

    def __init__(self, head: bytes, upload: int = 0) -> None:
        self.head = head
        self.upload = upload
        self.received = 0
        self.tail = b""
        self.peak = 0
        self.done: defer.Deferred[None] = defer.Deferred()
        self.expect_total: int | None = None
        self.header = b""

    def connectionMade(self) -> None:
        self.transport.write(self.head)
        if self.upload:
            _Uploader(self.transport, self.upload, self).start()

    def dataReceived(self, data: bytes) -> None:
        if self.expect_total is None:
            self.header += data
            end = self.header.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.header[:end].lower()
            cl = int(head.split(b"content-length:")[1].split(b"\r\n")[0])
            self.expect_total = cl
            data = self.header[end + 4:]
            self.header = head
        self.received += len(data)
        self.tail = (self.tail + data)[-64:]
        if self.received % (16 << 20) < len(data):
            self.peak = max(self.peak, rss())
        if self.received >= self.expect_total and not self.done.called:
            self.done.callback(None)

    def connectionLost(self, reason: Any = None) -> None:
        if not self.done.called:
            self.done.errback(AssertionError(f"connection lost after {self.received} bytes"))


@implementer(IPushProducer)
class _Uploader:
    def __init__(self, t: Any, total: int, owner: CountingClient) -> None:
        self.t = t
        self.left = total
        self.paused = False
        self.owner = owner
        self.block = b"u" * 65536
        self.sent = 0

    def start(self) -> None:
        self.t.registerProducer(self, True)
        self._pump()

    def _pump(self) -> None:
        while self.left > 0 and not self.paused:
            n = min(self.left, 65536)
            self.left -= n
            self.sent += n
            self.t.write(self.block[:n])
            if self.sent % (16 << 20) == 0:
                self.owner.peak = max(self.owner.peak, rss())
        if self.left == 0:
            self.t.unregisterProducer()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        reactor.callLater(0, self._pump)

    def stopProducing(self) -> None:
        self.left = 0


class StreamingTests(TestCase):
    timeout = 240

    async def _setup(self, **route: Any) -> int:
        b = await Backend().start()
        self.addCleanup(b.stop)
        svc, port = await start_router([simple_route("a", b, max_body_size=SIZE, **route)])
        self.addCleanup(svc.stopService)
        self.svc = svc
        return port

    async def test_big_download_flat_memory(self) -> None:
        """A SIZE download arrives whole while RSS grows by less than 64 MiB."""
        port = await self._setup()
        before = rss()
        c = CountingClient(b"GET /big?%d HTTP/1.1\r\nHost: a.example.com\r\n\r\n" % SIZE)
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), c)
        await c.done
        c.transport.loseConnection()
        self.assertEqual(c.received, SIZE)
        self.assertLess(max(c.peak, rss()) - before, RSS_BOUND,
                        f"RSS grew {(max(c.peak, rss()) - before) >> 20} MiB")

    async def test_big_upload_flat_memory(self) -> None:
        """A SIZE upload (buffered: spooled to a file, then sent) reaches the backend
        whole while RSS grows by less than 64 MiB."""
        await self._upload()
        self.assertEqual(self.svc.lb.spooled, 1)

    async def test_big_streamed_upload_flat_memory(self) -> None:
        """The same with request_buffering off: streamed through, nothing spooled."""
        await self._upload(request_buffering=False)
        self.assertEqual(self.svc.lb.spooled, 0)

    async def _upload(self, **route: Any) -> None:
        port = await self._setup(**route)
        before = rss()
        c = CountingClient(b"POST /sink HTTP/1.1\r\nHost: a.example.com\r\nContent-Length: %d\r\n\r\n"
                           % SIZE, upload=SIZE)
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), c)
        await c.done
        c.transport.loseConnection()
        self.assertEqual(c.tail.rsplit(b"\n", 1)[-1][-len(str(SIZE)):], str(SIZE).encode())
        self.assertLess(max(c.peak, rss()) - before, RSS_BOUND,
                        f"RSS grew {(max(c.peak, rss()) - before) >> 20} MiB")
