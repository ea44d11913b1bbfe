"""The log and stats pipeline interface: how runners, routers and the api emit.

Producers take an :class:`ILogSink` (and/or :class:`IStatsSink`) in their
constructor and call ``emit``/``emit_stats``; they never know where it goes:

- :class:`LocalLogSink` writes to the node's own log (usable before the logger
  role exists, and the default on a single box without one);
- :class:`BusLogSink` pushes ``log.line`` / ``stats.sample`` bus messages to
  every configured logger (``cluster.loggers``);
- :class:`MemoryLogSink` keeps everything in lists: a test double for other
  components' unit tests.

``emit`` never blocks and never raises for a full queue: what cannot be sent
is counted (see each sink's ``counters``) and logged, rate-limited.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from attrs import frozen
from twisted.application.service import MultiService
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import Interface, implementer

from epio.bus.counters import BusCounters

if TYPE_CHECKING:
    from epio.bus import Bus
    from epio.bus.sockets import Push

#: Lines longer than this many bytes (UTF-8) are sent in parts.
MAX_LINE_BYTES = 10_000


class ILogSink(Interface):
    """Where app log lines go."""

    def emit(app: str, source: str, text: str, timestamp: float | None = None) -> None:
        """Record one line of ``app``'s log from ``source`` (``web.1``, ``router``,
        ``build``, ``api``...).  ``timestamp`` defaults to now.  Never blocks,
        never raises for a full queue."""


class IStatsSink(Interface):
    """Where app stats samples go."""

    def emit_stats(app: str, kind: str, values: dict[str, Any]) -> None:
        """Record one sample of ``kind`` (``http``, ``process``...) for ``app``;
        ``values`` is a flat dict of numbers (and short strings)."""


def split_text(text: str, limit: int = MAX_LINE_BYTES) -> list[str]:
    """Split ``text`` into parts of at most ``limit`` UTF-8 bytes, on character
    boundaries (a multi-byte character is never cut)."""
    data = text.encode("utf-8", "surrogatepass")
    if len(data) <= limit:
        return [text]
    parts: list[str] = []
    start = 0
    while start < len(data):
        end = min(start + limit, len(data))
        # step back off UTF-8 continuation bytes (10xxxxxx)
        while end < len(data) and end > start and (data[end] & 0xC0) == 0x80:
            end -= 1
        if end == start:  # limit smaller than one character: take the character
            end = start + 1
            while end < len(data) and (data[end] & 0xC0) == 0x80:
                end += 1
        parts.append(data[start:end].decode("utf-8", "surrogatepass"))
        start = end
    return parts


@implementer(ILogSink, IStatsSink)
class LocalLogSink:
    """Writes lines and samples to the node's own Twisted log."""

    log = Logger(namespace="epio.app")

    def __init__(self, clock: IReactorTime | None = None) -> None:
        self._clock = clock

    def emit(self, app: str, source: str, text: str, timestamp: float | None = None) -> None:
        self.log.info("[{app}] {source}: {text}", app=app, source=source, text=text,
                      app_timestamp=timestamp)

    def emit_stats(self, app: str, kind: str, values: dict[str, Any]) -> None:
        self.log.debug("[{app}] stats {kind}: {values}", app=app, kind=kind, values=values)


@frozen
class LogRecord:
    """What :class:`MemoryLogSink` keeps of one emitted line."""

    app: str
    source: str
    text: str
    timestamp: float | None


@frozen
class StatsRecord:
    app: str
    kind: str
    values: dict[str, Any]


@implementer(ILogSink, IStatsSink)
class MemoryLogSink:
    """Test double: keeps every line and sample (``lines``, ``stats``)."""

    def __init__(self) -> None:
        self.lines: list[LogRecord] = []
        self.stats: list[StatsRecord] = []

    def emit(self, app: str, source: str, text: str, timestamp: float | None = None) -> None:
        self.lines.append(LogRecord(app, source, text, timestamp))

    def emit_stats(self, app: str, kind: str, values: dict[str, Any]) -> None:
        self.stats.append(StatsRecord(app, kind, dict(values)))

    def texts(self, app: str | None = None, source: str | None = None) -> list[str]:
        """The texts emitted, optionally only for one app / source."""
        return [r.text for r in self.lines
                if (app is None or r.app == app) and (source is None or r.source == source)]


@implementer(ILogSink, IStatsSink)
class BusLogSink(MultiService):
    """Pushes ``log.line``/``log.batch`` and ``stats.sample`` to EVERY logger endpoint.

    One PUSH socket per endpoint (PUSH alone would round-robin), each a child
    service: add this sink to the service tree.  Each line carries a sequence
    number per (app, source) -- per (app, ``stats:KIND``) for stats -- and the
    sink's ``boot`` id (new for every sink, so a logger can tell a restarted
    sender from lost lines) so a logger can tell a gap from silence.

    Lines emitted in one reactor turn travel as one ``log.batch`` message (up to
    500 lines / 256 KiB; a single line as ``log.line``): far fewer messages for a
    chatty process.  Lines over ``bus.log_line_max_bytes`` (10,000) are sent as
    ``log.line`` parts (``part``/``parts``), each with its own sequence number.

    ``counters`` has ``lines``, ``samples`` and ``dropped`` (lines and samples
    that at least one logger did not get).  With no endpoint at all
    (``cluster.loggers = []``) lines go to the node's log, like
    :class:`LocalLogSink`.
    """

    log = Logger()
    max_batch_lines = 500
    max_batch_bytes = 256 * 1024

    def __init__(self, bus: Bus, endpoints: Sequence[str], clock: IReactorTime | None = None,
                 max_line_bytes: int | None = None, boot: str | None = None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        if isinstance(endpoints, str):
            endpoints = [endpoints]
        self.bus = bus
        self.clock = clock if clock is not None else bus.reactor
        self.max_line_bytes = bus.log_line_max_bytes if max_line_bytes is None else max_line_bytes
        self.boot = boot or os.urandom(8).hex()
        self.counters = BusCounters()
        self._seq: dict[tuple[str, str], int] = {}
        self._batch: list[list[Any]] = []
        self._batch_bytes = 0
        self._flush_call: IDelayedCall | None = None
        self.pushes: list[Push] = []
        self._by_endpoint: dict[str, Push] = {}
        # With no logger configured, app logs still go somewhere: the node's log.
        self._local = LocalLogSink() if not endpoints else None
        for ep in dict.fromkeys(endpoints):
            self._add_push(ep)
        self.setName("bus-log-sink")  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated

    def _add_push(self, ep: str) -> None:
        push = self.bus.push([ep])
        push.setName(f"log-push {ep}")  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        push.setServiceParent(self)  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        self.pushes.append(push)
        self._by_endpoint[ep] = push

    def set_endpoints(self, endpoints: Sequence[str]) -> None:
        """Push to exactly ``endpoints`` from now on (a logger joined or left the
        cluster: epio.cluster); with none, lines go to the node's log."""
        wanted = list(dict.fromkeys(endpoints))
        self.flush()  # what was batched goes to the loggers it was emitted for
        for ep in [e for e in self._by_endpoint if e not in wanted]:
            push = self._by_endpoint.pop(ep)
            self.pushes.remove(push)
            push.disownServiceParent()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        for ep in wanted:
            if ep not in self._by_endpoint:
                self._add_push(ep)
        self._local = LocalLogSink() if not wanted else None

    def _next_seq(self, app: str, stream: str) -> int:
        key = (app, stream)
        seq = self._seq.get(key, 0) + 1
        self._seq[key] = seq
        return seq

    def _send(self, type: str, body: dict[str, Any], count: int = 1) -> None:
        ok = True
        for push in self.pushes:
            ok = push.send(type, body) and ok
        if not ok:
            self.counters.incr("dropped", count)

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        if self._local is not None:
            self.log.warn("no logger in cluster.loggers: app logs go to this node's log only")

    def stopService(self) -> Any:
        self.flush()  # what was emitted before the stop still goes out
        return super().stopService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated

    def emit(self, app: str, source: str, text: str, timestamp: float | None = None) -> None:
        if self._local is not None:
            self._local.emit(app, source, text, timestamp)
            self.counters.incr("lines")
            return
        ts = self.clock.seconds() if timestamp is None else float(timestamp)
        parts = split_text(text, self.max_line_bytes)
        self.counters.incr("lines", len(parts))
        if len(parts) == 1:
            self._batch.append([app, source, text, ts, self._next_seq(app, source)])
            self._batch_bytes += len(text) + len(app) + len(source) + 24
            if (len(self._batch) >= self.max_batch_lines
                    or self._batch_bytes >= self.max_batch_bytes or not self.running):
                self.flush()
            elif self._flush_call is None:
                self._flush_call = self.clock.callLater(0, self.flush)
            return
        self.flush()  # keep the stream in order
        for i, part in enumerate(parts):
            self._send("log.line", {
                "app": app, "source": source, "text": part, "timestamp": ts,
                "seq": self._next_seq(app, source), "node": self.bus.sender, "boot": self.boot,
                "part": i, "parts": len(parts),
            })

    def flush(self) -> None:
        """Send the lines batched so far now (normally done at the end of the turn)."""
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        batch, self._batch, self._batch_bytes = self._batch, [], 0
        if len(batch) == 1:
            app, source, text, ts, seq = batch[0]
            self._send("log.line", {"app": app, "source": source, "text": text, "timestamp": ts,
                                    "seq": seq, "node": self.bus.sender, "boot": self.boot})
        elif batch:
            self._send("log.batch", {"lines": batch, "node": self.bus.sender, "boot": self.boot},
                       count=len(batch))

    def emit_stats(self, app: str, kind: str, values: dict[str, Any]) -> None:
        if self._local is not None:
            self._local.emit_stats(app, kind, values)
            self.counters.incr("samples")
            return
        body = {
            "app": app, "kind": kind, "values": dict(values),
            "timestamp": self.clock.seconds(), "seq": self._next_seq(app, "stats:" + kind),
            "node": self.bus.sender, "boot": self.boot,
        }
        self._send("stats.sample", body)
        self.counters.incr("samples")
