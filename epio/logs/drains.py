"""Log drains: forward an app's lines to syslog (RFC 5424 over TCP or TLS) or HTTPS.

URLs:

- ``syslog://HOST:PORT`` -- RFC 5424 messages over TCP, octet-counting framing
  (RFC 6587 3.4.1: ``LEN SP MSG``);
- ``syslog+tls://HOST:PORT`` -- the same over TLS (RFC 5425; the server
  certificate is verified for HOST against the system's CAs, or the CA in
  ``logger.drain_tls_ca``);
- ``https://...`` (and ``http://`` for tests and local relays) -- batches
  POSTed as ``application/logplex-1``: the same octet-counted RFC 5424 frames,
  as Heroku's HTTPS drains do.

Each drain has a bounded queue (``logger.drain_buffer_lines``).  Syslog drains
keep one connection (a ``ClientService`` with backoff) and are a push
producer's consumer: a slow receiver fills the queue, never the logger's
memory.  HTTPS batches are retried with exponential backoff up to
``logger.drain_max_attempts`` times.  Every line that is not delivered --
queue overflow, retries exhausted, drain removed with lines queued -- is
counted in ``epio_log_drain_undelivered_total{drain, reason}``; delivered
lines in ``epio_log_drain_delivered_total``.  "Delivered" for syslog over TCP
means written to the connection (TCP has no application acknowledgement).

``DrainManager.add(id, app, url)`` / ``remove(id)``: where drains come from
(config today, the store later) is not this module's business.
"""

from __future__ import annotations

import datetime
from collections import deque
from collections.abc import Callable
from typing import Any, cast
from urllib.parse import urlsplit

from attrs import frozen
from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from epio.logs.records import LogRecord
from epio.metrics import MetricsRegistry


def rfc5424(rec: LogRecord, app: str, hostname: str = "epio") -> bytes:
    """One RFC 5424 message (without framing)."""
    severity = 4 if rec.lost else 6  # warning for lost markers, informational otherwise
    pri = 1 * 8 + severity  # facility 1: user-level
    ts = datetime.datetime.fromtimestamp(rec.timestamp, datetime.UTC).strftime(
        "%Y-%m-%dT%H:%M:%S.%fZ")
    host = (hostname or "-")[:255].replace(" ", "_")
    appname = app[:48] or "-"
    procid = (rec.source or "-")[:128]
    text = rec.text.replace("\n", " ")
    return f"<{pri}>1 {ts} {host} {appname} {procid} - - {text}".encode("utf-8", "replace")


def frame(msg: bytes) -> bytes:
    """Octet-counting framing (RFC 6587 3.4.1 / RFC 5425 4.3)."""
    return str(len(msg)).encode() + b" " + msg


@frozen
class DrainConfig:
    buffer_lines: int = 10_000
    max_attempts: int = 5
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    batch_lines: int = 500
    hostname: str = "epio"
    tls_ca: str = ""  # PEM CA file for syslog+tls servers; empty: the system's CAs


class Drain:
    """Common part: a bounded queue and delivered/undelivered accounting."""

    log = Logger()
    kind = "drain"

    def __init__(self, manager: DrainManager, drain_id: str, app: str, url: str) -> None:
        self.manager = manager
        self.id = drain_id
        self.app = app
        self.url = url
        self.config = manager.config
        self.queue: deque[bytes] = deque()
        self.delivered = 0
        self.undelivered = 0

    def add(self, rec: LogRecord) -> None:
        if len(self.queue) >= self.config.buffer_lines:
            self._undelivered(1, "overflow")
            return
        self.queue.append(frame(rfc5424(rec, self.app, self.config.hostname)))
        self.kick()

    def kick(self) -> None:
        """Try to send what is queued."""

    def _delivered(self, n: int) -> None:
        self.delivered += n
        self.manager._count_delivered(self, n)

    def _undelivered(self, n: int, reason: str) -> None:
        self.undelivered += n
        self.manager._count_undelivered(self, n, reason)

    def service(self) -> Any:
        return None

    def release(self) -> None:
        """Before the connection is closed (a TLS close waits for producers)."""

    def discard(self) -> None:
        if self.queue:
            self._undelivered(len(self.queue), "removed")
            self.queue.clear()


@implementer(IPushProducer)
class _SyslogProtocol(Protocol):
    drain: SyslogDrain
    transport: Any

    released = False

    def connectionMade(self) -> None:
        self.paused = False
        self.transport.registerProducer(self, True)
        self.drain.connected(self)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.drain.disconnected(self)

    def dataReceived(self, data: bytes) -> None:
        pass  # syslog receivers do not answer

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self.drain.kick()

    def stopProducing(self) -> None:
        self.paused = True


class SyslogDrain(Drain):
    kind = "syslog"

    def __init__(self, manager: DrainManager, drain_id: str, app: str, url: str) -> None:
        super().__init__(manager, drain_id, app, url)
        u = urlsplit(url)
        if not u.hostname or not u.port:
            raise ValueError(f"drain URL {url!r} needs a host and a port")
        self.tls = u.scheme == "syslog+tls"
        self.host = u.hostname
        self.port = u.port
        self.proto: _SyslogProtocol | None = None
        reactor = manager.reactor
        from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS

        endpoint: Any = HostnameEndpoint(reactor, self.host, self.port, timeout=10)
        if self.tls:
            from twisted.internet.ssl import Certificate, optionsForClientTLS

            trust = None
            if self.config.tls_ca:
                with open(self.config.tls_ca, "rb") as f:
                    trust = Certificate.loadPEM(f.read())
            endpoint = wrapClientTLS(optionsForClientTLS(self.host, trustRoot=trust), endpoint)
        drain = self

        class _Factory(Factory):
            def buildProtocol(self, addr: Any) -> _SyslogProtocol:
                p = _SyslogProtocol()
                p.drain = drain
                return p

        self._service = ClientService(
            endpoint, cast(Any, _Factory()),
            retryPolicy=backoffPolicy(initialDelay=self.config.backoff_initial,
                                      maxDelay=self.config.backoff_max),
            clock=reactor,
        )
        self._service.setName(f"drain {drain_id}")

    def service(self) -> Any:
        return self._service

    def connected(self, proto: _SyslogProtocol) -> None:
        self.proto = proto
        self.log.info("drain {id} connected to {host}:{port}", id=self.id, host=self.host,
                      port=self.port)
        self.kick()

    def release(self) -> None:
        p = self.proto
        if p is not None and p.transport is not None and not p.released:
            p.released = True
            p.transport.unregisterProducer()

    def disconnected(self, proto: _SyslogProtocol) -> None:
        if self.proto is proto:
            self.proto = None

    def kick(self) -> None:
        p = self.proto
        if p is None:
            return
        n = 0
        out = []
        while self.queue and not p.paused and n < self.config.batch_lines:
            out.append(self.queue.popleft())
            n += 1
            if n == self.config.batch_lines:
                p.transport.write(b"".join(out))
                self._delivered(n)
                out = []
                n = 0
        if out:
            p.transport.write(b"".join(out))
            self._delivered(len(out))


class HTTPDrain(Drain):
    kind = "https"

    def __init__(self, manager: DrainManager, drain_id: str, app: str, url: str) -> None:
        super().__init__(manager, drain_id, app, url)
        self._inflight = False
        self._attempt = 0
        self._timer: IDelayedCall | None = None
        self._batch: list[bytes] = []
        self.stopped = False

    def kick(self) -> None:
        if self._inflight or self._timer is not None or self.stopped:
            return
        if not self._batch:
            while self.queue and len(self._batch) < self.config.batch_lines:
                self._batch.append(self.queue.popleft())
            self._attempt = 0
        if not self._batch:
            return
        self._inflight = True
        d = self.manager.http_post(self.url, b"".join(self._batch), {
            b"content-type": [b"application/logplex-1"],
            b"logplex-msg-count": [str(len(self._batch)).encode()],
            b"logplex-drain-token": [self.id.encode()],
        })
        d.addCallbacks(self._posted, self._failed)

    def _posted(self, status: int) -> None:
        self._inflight = False
        if 200 <= status < 300:
            self._delivered(len(self._batch))
            self._batch = []
            self.kick()
        else:
            self._retry(f"HTTP {status}")

    def _failed(self, f: Any) -> None:
        self._inflight = False
        self._retry(f.getErrorMessage())

    def _retry(self, why: str) -> None:
        self._attempt += 1
        if self._attempt >= self.config.max_attempts:
            self.log.warn("drain {id}: giving up on {n} lines after {a} attempts ({why})",
                          id=self.id, n=len(self._batch), a=self._attempt, why=why)
            self._undelivered(len(self._batch), "retries_exhausted")
            self._batch = []
            self._attempt = 0
            self.kick()
            return
        delay = min(self.config.backoff_initial * 2 ** (self._attempt - 1), self.config.backoff_max)
        self._timer = self.manager.reactor.callLater(delay, self._again)

    def _again(self) -> None:
        self._timer = None
        self.kick()

    def discard(self) -> None:
        self.stopped = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._batch:
            self._undelivered(len(self._batch), "removed")
            self._batch = []
        super().discard()


def _treq_post(reactor: Any, pool: Any) -> Callable[[str, bytes, dict[bytes, list[bytes]]], Deferred[int]]:
    import treq

    def post(url: str, body: bytes, headers: dict[bytes, list[bytes]]) -> Deferred[int]:
        d: Deferred[Any] = treq.post(url, data=body, headers=cast(Any, headers), pool=pool,
                                     reactor=reactor, timeout=30)

        def done(resp: Any) -> Any:
            d2: Deferred[Any] = treq.content(resp)  # read the body so the connection is reused
            d2.addCallback(lambda _: resp.code)
            return d2

        return d.addCallback(done)

    return post


class DrainManager(MultiService):
    """Every drain of this logger; ``on_record(app, rec)`` feeds them."""

    log = Logger()

    def __init__(self, reactor: Any, config: DrainConfig = DrainConfig(), registry: MetricsRegistry | None = None,
                 http_post: Callable[[str, bytes, dict[bytes, list[bytes]]], Deferred[int]] | None = None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        self.reactor = reactor
        self.config = config
        self._http_post = http_post
        self._pool: Any = None
        self.drains: dict[str, Drain] = {}
        self.by_app: dict[str, list[Drain]] = {}
        self._delivered_c = self._undelivered_c = None
        if registry is not None:
            self._delivered_c = registry.counter(
                "epio_log_drain_delivered_total", "Log lines delivered to a drain.", ["drain", "app"])
            self._undelivered_c = registry.counter(
                "epio_log_drain_undelivered_total",
                "Log lines that could not be delivered to a drain, by reason.",
                ["drain", "app", "reason"])
        self.setName("drains")  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated

    def http_post(self, url: str, body: bytes, headers: dict[bytes, list[bytes]]) -> Deferred[int]:
        if self._http_post is None:
            from twisted.web.client import HTTPConnectionPool

            self._pool = HTTPConnectionPool(self.reactor, persistent=True)
            self._http_post = _treq_post(self.reactor, self._pool)
        return self._http_post(url, body, headers)

    def stopService(self) -> Any:
        for drain in self.drains.values():
            drain.release()
        d = super().stopService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        pool, self._pool = self._pool, None
        if pool is None:
            return d
        self._http_post = None
        from twisted.internet.defer import gatherResults

        return gatherResults([x for x in (d, pool.closeCachedConnections()) if x is not None])

    def add(self, drain_id: str, app: str, url: str) -> Drain:
        """Start forwarding ``app``'s lines to ``url``; ValueError if the URL is bad."""
        if drain_id in self.drains:
            raise ValueError(f"drain {drain_id!r} exists")
        scheme = urlsplit(url).scheme
        drain: Drain
        if scheme in ("syslog", "syslog+tls"):
            drain = SyslogDrain(self, drain_id, app, url)
        elif scheme in ("https", "http"):
            drain = HTTPDrain(self, drain_id, app, url)
        else:
            raise ValueError(f"drain URL {url!r}: scheme must be syslog, syslog+tls or https")
        self.drains[drain_id] = drain
        self.by_app.setdefault(app, []).append(drain)
        svc = drain.service()
        if svc is not None:
            svc.setServiceParent(self)
        return drain

    def remove(self, drain_id: str) -> None:
        drain = self.drains.pop(drain_id, None)
        if drain is None:
            return
        self.by_app[drain.app].remove(drain)
        if not self.by_app[drain.app]:
            del self.by_app[drain.app]
        drain.discard()
        drain.release()
        svc = drain.service()
        if svc is not None:
            svc.disownServiceParent()

    def on_record(self, app: str, rec: LogRecord) -> None:
        drains = self.by_app.get(app)
        if drains:
            for d in drains:
                d.add(rec)

    def _count_delivered(self, drain: Drain, n: int) -> None:
        if self._delivered_c is not None:
            self._delivered_c.labels(drain.id, drain.app).inc(n)

    def _count_undelivered(self, drain: Drain, n: int, reason: str) -> None:
        if self._undelivered_c is not None:
            self._undelivered_c.labels(drain.id, drain.app, reason).inc(n)
