"""What a logger does with each ``log.line`` it pulls: check, number, store, count.

Every line belongs to a *stream* -- (sender node, app, source) -- whose sender
numbers its lines 1, 2, 3... (``seq``, see :class:`epio.pipeline.BusLogSink`).
The receiver knows the last seq it stored for every stream (recovered from
disk after a restart), so:

- ``seq == last + 1``: the next line, stored;
- ``seq > last + 1``: lines are missing (this logger was down, a queue was
  full): a ``lost`` marker for ``seq - last - 1`` lines is stored first and
  counted, then the line;
- ``seq <= last``: a duplicate (dropped, counted) -- unless ``seq == 1``: the
  sender restarted and numbers from 1 again (a ``boot`` field in the body, when
  the sender gives one, makes that unambiguous);
- a stream seen for the first time with ``seq > 1``: the lines before it went
  to a logger this one is not (a fresh logger joining), recorded as lost.

Lines over ``max_line_bytes`` are split here too (senders should already do
it).  Nothing is dropped without a counter saying why.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from epio.bus.counters import RateLimitedLog
from epio.logs.records import APP_RE, SOURCE_RE, LogRecord, split_text
from epio.logs.store import LogStore
from epio.metrics import MetricsRegistry

# reasons a line is dropped (label values of epio_log_lines_dropped_total)
INVALID_APP = "invalid_app"
INVALID_SOURCE = "invalid_source"
INVALID_TIMESTAMP = "invalid_timestamp"
DUPLICATE = "duplicate"
WRITE_ERROR = "write_error"
INVALID_BODY = "invalid_body"


class LogCounters:
    """The logger's counters, in the node's metrics registry: exported per app and
    source with ``per_app`` (``logger.metrics_per_app``), else summed over them."""

    def __init__(self, registry: MetricsRegistry, per_app: bool = True) -> None:
        self.received = registry.counter(
            "epio_log_lines_received_total", "Log lines received by this logger.", ["app", "source"])
        self.written = registry.counter(
            "epio_log_lines_written_total", "Log lines written to this logger's store.",
            ["app", "source"])
        self.dropped = registry.counter(
            "epio_log_lines_dropped_total",
            "Log lines received but not stored, by reason.", ["app", "source", "reason"])
        self.lost = registry.counter(
            "epio_log_lines_lost_total",
            "Log lines a sequence gap shows this logger never received (recorded as lost markers).",
            ["app", "source"])
        self.split = registry.counter(
            "epio_log_lines_split_total",
            "Log lines over the size limit that this logger split into parts.", ["app", "source"])
        self.stats_received = registry.counter(
            "epio_stats_samples_received_total", "Stats samples received.", ["app", "kind"])
        self.stats_dropped = registry.counter(
            "epio_stats_samples_dropped_total", "Stats samples not aggregated, by reason.",
            ["reason"])
        self.store_bytes = registry.gauge(
            "epio_log_store_bytes", "Disk bytes of stored log.", ["app"])
        if not per_app:
            # logger.metrics_per_app off: a few series per node, however many apps
            for metric, kept in [(self.received, []), (self.written, []),
                                 (self.dropped, ["reason"]), (self.lost, []), (self.split, []),
                                 (self.stats_received, ["kind"]), (self.store_bytes, [])]:
                metric.export_by(kept)


class LogReceiver:
    """Turns ``log.line`` bodies into stored records; calls ``on_record(app, rec)``
    for each stored record (live tail, drains)."""

    log = Logger()

    def __init__(self, store: LogStore, clock: IReactorTime, counters: LogCounters,
                 max_line_bytes: int = 10_000,
                 on_record: Callable[[str, LogRecord], None] | None = None) -> None:
        self.store = store
        self.clock = clock
        self.counters = counters
        self.max_line_bytes = max_line_bytes
        self.on_record = on_record
        self._ratelog = RateLimitedLog(clock)
        # per (app, source): (received, written) counter children and the AppLog
        self._children: dict[tuple[str, str], tuple[Any, Any, Any]] = {}

    def _drop(self, app: str, source: str, reason: str, n: int = 1) -> None:
        self.counters.dropped.labels(app, source, reason).inc(n)
        self._ratelog.warn("drop:" + reason, "log line of {app}/{source} dropped: {reason}",
                           app=app, source=source, reason=reason)

    def line(self, sender: str, body: dict[str, Any]) -> int:
        """Handle one ``log.line`` body from ``sender``; return lines stored."""
        node = body.get("node") or sender
        boot = body.get("boot")
        stream = f"{node}/{boot}" if isinstance(boot, str) and boot else str(node)
        return self._line(stream, body["app"], body["source"], body["text"], body["timestamp"],
                          body["seq"])

    def batch(self, sender: str, body: dict[str, Any]) -> int:
        """Handle one ``log.batch`` body: items [app, source, text, timestamp, seq]."""
        node = body.get("node") or sender
        boot = body.get("boot")
        stream = f"{node}/{boot}" if isinstance(boot, str) and boot else str(node)
        stored = 0
        for item in body["lines"]:
            try:
                app, source, text, ts, seq = item
                if not (type(app) is str and type(source) is str and type(text) is str
                        and type(seq) is int and (type(ts) is float or type(ts) is int)):
                    raise ValueError
            except (TypeError, ValueError):
                self._drop("-", "-", INVALID_BODY)
                continue
            stored += self._line(stream, app, source, text, float(ts), seq)
        return stored

    def _line(self, stream: str, app: str, source: str, text: str, ts: float, seq: int) -> int:
        # per (app, source): validated once, then (received, written, AppLog) cached
        ctx = self._children.get((app, source))
        if ctx is None or ctx[2].store is not self.store:
            if not APP_RE.match(app):
                self._drop("-", "-", INVALID_APP)
                return 0
            if not SOURCE_RE.match(source):
                self._drop(app, "-", INVALID_SOURCE)
                return 0
            try:
                applog = self.store.app(app)
            except OSError as e:
                self._drop(app, source, WRITE_ERROR)
                self.log.error("cannot open the log of {app}: {err}", app=app, err=str(e))
                return 0
            ctx = self._children[(app, source)] = (
                self.counters.received.labels(app, source),
                self.counters.written.labels(app, source),
                applog,
            )
        received, written, applog = ctx
        received.value += 1
        if not math.isfinite(ts):
            self._drop(app, source, INVALID_TIMESTAMP)
            return 0
        st = applog.streams.get((stream, source))
        stored = 0
        if st is None:
            if seq > 1:
                stored += self._lost(app, source, stream, seq, ts, seq - 1)
        else:
            last = int(st[0])
            if seq <= last:
                if seq != 1:
                    self._drop(app, source, DUPLICATE)
                    return 0
                self.log.info("stream {stream} {app}/{source} restarted at seq 1",
                              stream=stream, app=app, source=source)
            elif seq > last + 1:
                stored += self._lost(app, source, stream, seq, ts, seq - last - 1)
        if len(text) * 4 > self.max_line_bytes and \
                len(text.encode("utf-8", "surrogatepass")) > self.max_line_bytes:
            parts = split_text(text, self.max_line_bytes)
            self.counters.split.labels(app, source).inc()
        else:
            parts = [text]
        on_record = self.on_record
        for part in parts:
            try:
                rec = applog.append(ts, source, part, stream, seq)
            except OSError as e:
                self._drop(app, source, WRITE_ERROR)
                self.log.error("cannot write log of {app}: {err}", app=app, err=str(e))
                return stored
            written.value += 1
            stored += 1
            if on_record is not None:
                on_record(app, rec)
        return stored

    def _lost(self, app: str, source: str, stream: str, seq: int, ts: float, n: int) -> int:
        """Record ``n`` lost lines of a stream as one marker line."""
        self.counters.lost.labels(app, source).inc(n)
        text = f"[epio] {n} line{'s' if n != 1 else ''} of {source} from {stream} lost before this point"
        self._ratelog.warn("lost", "log of {app}/{source} from {stream}: {n} lines lost",
                           app=app, source=source, stream=stream, n=n)
        try:
            # the marker takes seq - 1: the stream position it accounts up to
            rec = self.store.append(app, ts, source, text, stream, seq - 1, lost=n)
        except OSError as e:
            self.log.error("cannot write log of {app}: {err}", app=app, err=str(e))
            return 0
        if self.on_record is not None:
            self.on_record(app, rec)
        return 1
