"""Real-socket helpers for the router's integration tests.

- :class:`Backend`: a scripted HTTP/1.1 backend on a real port that records the
  exact bytes it received (so tests can assert nothing was smuggled);
- :func:`start_router`: an in-process :class:`epio.lb.service.LBService` on a
  real port with static routes;
- :class:`RawClient`: a raw TCP client with a small, independent response reader.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

from epio.config import load_config
from epio.lb.service import LBService
from epio.routing import Backend as RBackend
from epio.routing import Route, StaticRouteSource

BODY100 = b"x" * 100
RAW_CAP = 4 << 20


def sleep(seconds: float) -> defer.Deferred[None]:
    d: defer.Deferred[None] = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


async def wait_until(pred: Any, timeout: float = 5.0, what: str = "condition") -> None:
    deadline = reactor.seconds() + timeout
    while not pred():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await sleep(0.01)


class Received:
    """One request as the backend saw it."""

    def __init__(self, head: bytes, body: bytes) -> None:
        self.head = head
        self.body = body
        lines = head.split(b"\r\n")
        self.request_line = lines[0]
        self.method, self.target, _ = lines[0].split(b" ", 2)
        self.headers: list[tuple[bytes, bytes]] = []
        for ln in lines[1:]:
            k, _, v = ln.partition(b":")
            self.headers.append((k.strip().lower(), v.strip()))

    def get(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def all(self, name: bytes) -> list[bytes]:
        return [v for k, v in self.headers if k == name]


@implementer(IPushProducer)
class _Streamer:
    """Writes ``total`` bytes as fast as the consumer takes them."""

    def __init__(self, transport: Any, total: int, done: Any) -> None:
        self.t = transport
        self.left = total
        self.paused = False
        self.done = done
        self.block = b"z" * 65536

    def start(self) -> None:
        self.t.registerProducer(self, True)
        self._pump()

    def _pump(self) -> None:
        while self.left > 0 and not self.paused:
            n = min(self.left, len(self.block))
            self.left -= n
            self.t.write(self.block if n == len(self.block) else self.block[:n])
        if self.left == 0:
            self.t.unregisterProducer()
            self.done()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        reactor.callLater(0, self._pump)

    def stopProducing(self) -> None:
        self.left = 0
        self.paused = True


class BackendProtocol(Protocol):
    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.buf = b""
        self.cur: tuple[bytes, int, bool] | None = None
        self.body = b""
        self.body_n = 0
        self.tunnel = False
        self.busy = False

    def connectionMade(self) -> None:
        self.backend.connections.append(self)
        self.backend.open += 1

    def connectionLost(self, reason: Any = None) -> None:
        self.backend.open -= 1

    def dataReceived(self, data: bytes) -> None:
        if self.backend.raw_bytes < RAW_CAP:  # record what arrived (big bodies: the start)
            self.backend.raw.append(data)
            self.backend.raw_bytes += len(data)
        if self.tunnel:
            self.transport.write(b"echo:" + data)
            return
        self.buf += data
        self._parse()

    def _parse(self) -> None:
        while not self.busy:
            if self.cur is None:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = self.buf[:end]
                self.buf = self.buf[end + 4:]
                m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                chunked = re.search(rb"(?im)^transfer-encoding:\s*chunked", head) is not None
                self.cur = (head, int(m.group(1)) if m else 0, chunked)
                self.body = b""
                self.body_n = 0
                if b"\r\nexpect:" in head.lower():
                    self.backend.saw_expect = True
            head, cl, chunked = self.cur
            sink = self.cur[0].split(b" ", 2)[1].startswith(b"/sink")
            if chunked:
                done = self._chunked(sink)
                if not done:
                    return
            else:
                take = min(cl - self.body_n, len(self.buf))
                if not sink:
                    self.body += self.buf[:take]
                self.body_n += take
                self.buf = self.buf[take:]
                if self.body_n < cl:
                    return
            self.cur = None
            rec = Received(head, self.body)
            self.backend.requests.append(rec)
            self.busy = True
            self.backend.respond(self, rec, self.body_n)

    def _chunked(self, sink: bool) -> bool:
        while True:
            nl = self.buf.find(b"\r\n")
            if nl < 0:
                return False
            size = int(self.buf[:nl].split(b";")[0], 16)
            if size == 0:
                end = self.buf.find(b"\r\n\r\n", nl)
                if self.buf[nl:nl + 4] == b"\r\n\r\n":
                    self.buf = self.buf[nl + 4:]
                    return True
                if end < 0:
                    return False
                self.buf = self.buf[end + 4:]
                return True
            if len(self.buf) < nl + 2 + size + 2:
                return False
            if not sink:
                self.body += self.buf[nl + 2:nl + 2 + size]
            self.body_n += size
            self.buf = self.buf[nl + 2 + size + 2:]

    def done(self) -> None:
        self.busy = False
        if self.buf:
            self._parse()


class Backend:
    """A scripted backend; behaviour is picked by the request path."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.raw: list[bytes] = []
        self.connections: list[BackendProtocol] = []
        self.open = 0
        self.raw_bytes = 0
        self.port: Any = None
        self.saw_expect = False
        self.hold: list[tuple[BackendProtocol, Received]] = []

    async def start(self, interface: str = "127.0.0.1") -> Backend:
        f = Factory.forProtocol(lambda: BackendProtocol(self))
        f.noisy = False
        self.port = reactor.listenTCP(0, f, interface=interface)
        return self

    @property
    def address(self) -> tuple[str, int]:
        h = self.port.getHost()
        return (h.host, h.port)

    def backend(self, **kw: Any) -> RBackend:
        host, port = self.address
        return RBackend(host, port, **kw)

    def all_raw(self) -> bytes:
        return b"".join(self.raw)

    async def stop(self) -> None:
        for c in self.connections:
            if c.transport is not None:
                c.transport.abortConnection()
        await defer.maybeDeferred(self.port.stopListening)

    def respond(self, p: BackendProtocol, rec: Received, nbody: int) -> None:
        t = p.transport
        path = rec.target.split(b"?")[0]
        q = rec.target.partition(b"?")[2]
        if path == b"/hang":
            self.hold.append((p, rec))
            return
        if path == b"/drop":
            t.loseConnection()
            return
        if path == b"/slow":
            reactor.callLater(float(q or b"0.2"), self._ok, p, rec)
            return
        if path == b"/ws":
            p.tunnel = True
            t.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                    b"Upgrade: websocket\r\n\r\n")
            if p.buf:
                data, p.buf = p.buf, b""
                t.write(b"echo:" + data)
            return
        if path == b"/chunked":
            t.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
            p.done()
            return
        if path == b"/close":
            t.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil-close body")
            t.loseConnection()
            return
        if path == b"/204":
            t.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            p.done()
            return
        if path == b"/304":
            t.write(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 50\r\n\r\n")
            p.done()
            return
        if path == b"/extra":
            # a response followed by bytes nobody asked for (response splitting)
            t.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n"
                    b"Content-Length: 8\r\n\r\nPOISONED")
            p.done()
            return
        if path == b"/hop":
            t.write(b"HTTP/1.1 200 OK\r\nConnection: X-Secret\r\nX-Secret: 1\r\n"
                    b"Keep-Alive: timeout=1\r\nContent-Length: 2\r\n\r\nok")
            p.done()
            return
        if path == b"/big":
            n = int(q)
            t.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % n)
            _Streamer(t, n, p.done).start()
            return
        if path.startswith(b"/sink"):
            body = b"%d" % nbody
            t.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            p.done()
            return
        if path == b"/early":
            t.write(b"HTTP/1.1 413 Too Big\r\nContent-Length: 4\r\nConnection: close\r\n\r\nnope")
            t.loseConnection()
            return
        self._ok(p, rec)

    def _ok(self, p: BackendProtocol, rec: Received) -> None:
        if p.transport is None or not p.transport.connected:
            return
        body = b"ok " + rec.method + b" " + rec.target + b" " + (b"%d" % len(rec.body))
        head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Backend-Port: %d\r\n\r\n" % (
            len(body), self.address[1])
        if rec.method == b"HEAD":
            p.transport.write(head)
        else:
            p.transport.write(head + body)
        p.done()


async def start_router(routes: list[Route], domain: str = "localhost",
                       interface: str = "127.0.0.1", **settings: Any) -> tuple[LBService, int]:
    section: dict[str, Any] = {
        "listen": f"tcp:0:interface={interface.replace(':', chr(92) + ':')}",
        "access_log": "off",
    }
    section.update(settings)
    svc = LBService(reactor, load_config(None, {"lb": section}).settings.lb, domain,
                    StaticRouteSource(routes))
    svc.startService()
    ports = await svc.whenReady()
    return svc, ports[0].getHost().port


class RawClient(Protocol):
    """Sends raw bytes; reads responses with a small independent parser."""

    def __init__(self) -> None:
        self.data = b""
        self.closed = False
        self.lost: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:
        self.closed = True
        self.lost.callback(None)

    def send(self, data: bytes) -> None:
        self.transport.write(data)

    async def response(self, timeout: float = 5.0, head_only: bool = False) -> tuple[int, dict[bytes, bytes], bytes]:
        """Pop one complete response (status, headers, body) off the received bytes."""
        deadline = reactor.seconds() + timeout
        while True:
            r = self._try(head_only)
            if r is not None:
                return r
            if reactor.seconds() > deadline:
                raise AssertionError(f"no complete response; got {self.data[:300]!r}")
            await sleep(0.005)

    def _try(self, head_only: bool) -> tuple[int, dict[bytes, bytes], bytes] | None:
        end = self.data.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = self.data[:end]
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        headers = {}
        for ln in lines[1:]:
            k, _, v = ln.partition(b":")
            headers[k.strip().lower()] = v.strip()
        rest = self.data[end + 4:]
        if head_only or status in (204, 304) or 100 <= status < 200:
            self.data = rest
            return status, headers, b""
        if b"content-length" in headers:
            n = int(headers[b"content-length"])
            if len(rest) < n:
                return None
            self.data = rest[n:]
            return status, headers, rest[:n]
        if headers.get(b"transfer-encoding") == b"chunked":
            body = b""
            pos = 0
            while True:
                nl = rest.find(b"\r\n", pos)
                if nl < 0:
                    return None
                size = int(rest[pos:nl], 16)
                if size == 0:
                    if rest[nl:nl + 4] != b"\r\n\r\n":
                        return None
                    self.data = rest[nl + 4:]
                    return status, headers, body
                if len(rest) < nl + 2 + size + 2:
                    return None
                body += rest[nl + 2:nl + 2 + size]
                pos = nl + 2 + size + 2
        if not self.closed:
            return None
        self.data = b""
        return status, headers, rest


async def raw_client(port: int, host: str = "127.0.0.1") -> RawClient:
    ep = (TCP6ClientEndpoint if ":" in host else TCP4ClientEndpoint)(reactor, host, port)
    return await connectProtocol(ep, RawClient())


async def request(port: int, raw: bytes, host: str = "127.0.0.1", head_only: bool = False,
                  timeout: float = 5.0) -> tuple[int, dict[bytes, bytes], bytes, RawClient]:
    c = await raw_client(port, host)
    c.send(raw)
    status, headers, body = await c.response(timeout=timeout, head_only=head_only)
    return status, headers, body, c


def get(host: str, path: str = "/", extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


def simple_route(app: str, *backends: Backend, hostnames: tuple[str, ...] = (), **kw: Any) -> Route:
    return Route(app=app, hostnames=hostnames or (f"{app}.example.com",),
                 backends=[b.backend() for b in backends], **kw)
