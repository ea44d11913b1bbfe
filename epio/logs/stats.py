"""Stats: aggregate ``stats.sample`` into 10 s and 1 min buckets, keep them in SQL.

Samples (``epio.pipeline.IStatsSink.emit_stats(app, kind, values)``):

- kind ``router`` (the lb, every ``lb.stats_interval``): counts since the last
  sample -- ``requests``, ``status_1xx`` .. ``status_5xx``, ``client_closed``,
  ``bytes_out``, ``error_<code>`` -- a latency histogram of per-bucket counts
  ``latency_le_<N>ms`` and ``latency_gt_<N>ms``, and ``latency_ms_mean``;
- kind ``process`` (runners): gauges of one instance -- ``process`` (e.g.
  ``web.1``) and numbers such as ``cpu_percent`` (of one core, since the
  runner's previous sample), ``memory_bytes``, ``restarts`` (count since the
  instance was placed);
- any other kind: every number is a count, summed (metric ``KIND.KEY``).

Each sample lands in the 10 s and the 1 min bucket of its timestamp.  A bucket
is written when it is ``stats_flush_delay`` seconds past its end: counters as
sums, the latency histogram as ``latency_p50_ms``/``p95``/``p99`` (upper bound
of the bucket holding that quantile) and ``latency_mean_ms``, gauges as their
last value (with the instance in the ``instance`` column).  A sample for a
bucket already written is counted as dropped (``late``).

Where: the store's ``epio_stats`` table (:mod:`epio.store.stats`, created by a
store migration, written through the store's connections).  Every logger of a
cluster writes the same rows and the upsert keeps the larger value, so two
loggers that saw the same stream agree and one that missed samples does not
lower a count.  Retention: 10 s rows for ``stats_retention_10s``, 1 min rows
(the downsampled series) for ``stats_retention_1m``.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from attrs import define, field
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from epio.store import stats as stats_table
from epio.store.backend import SQLITE
from epio.store.stats import Point
from epio.store.store import Store

if TYPE_CHECKING:
    from epio.logs.receiver import LogCounters

__all__ = ["Aggregator", "Point", "StatsDB", "StatsService", "StoreStats", "quantile"]

RESOLUTIONS = (10, 60)
_LE = re.compile(r"^latency_le_(\d+(?:\.\d+)?)ms$")
_GT = re.compile(r"^latency_gt_(\d+(?:\.\d+)?)ms$")
_METRIC_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")


@define
class Bucket:
    sums: dict[str, float] = field(factory=dict)
    hist: dict[float, float] = field(factory=dict)  # upper bound ms -> count (inf for gt)
    mean_weighted: float = 0.0  # sum of latency_ms_mean * requests
    gauges: dict[tuple[str, str], float] = field(factory=dict)  # (metric, instance) -> last


def quantile(hist: dict[float, float], q: float) -> float | None:
    total = sum(hist.values())
    if total <= 0:
        return None
    rank = q * total
    acc = 0.0
    bounds = sorted(hist)
    for b in bounds:
        acc += hist[b]
        if acc >= rank:
            if b == float("inf"):
                # above the last bound: report the last finite bound
                finite = [x for x in bounds if x != float("inf")]
                return finite[-1] if finite else None
            return b
    return bounds[-1]


class Aggregator:
    """In-memory 10 s / 1 min buckets; ``due(now)`` hands back finished points."""

    log = Logger()

    def __init__(self, flush_delay: float = 5.0, on_late: Callable[[], None] | None = None) -> None:
        self.flush_delay = flush_delay
        self.on_late = on_late
        self.buckets: dict[tuple[str, int, int], Bucket] = {}  # (app, resolution, start)
        # per resolution: the start of the newest bucket already written
        self.written_until: dict[int, int] = {}

    def add(self, app: str, kind: str, values: dict[str, Any], timestamp: float) -> bool:
        """Account one sample; False if it is too late for its buckets."""
        accepted = False
        for res in RESOLUTIONS:
            start = int(timestamp // res * res)
            if start < self.written_until.get(res, -1):
                continue
            accepted = True
            b = self.buckets.get((app, res, start))
            if b is None:
                b = self.buckets[(app, res, start)] = Bucket()
            self._merge(b, kind, values)
        if not accepted and self.on_late is not None:
            self.on_late()
        return accepted

    @staticmethod
    def _merge(b: Bucket, kind: str, values: dict[str, Any]) -> None:
        if kind == "process":
            # runners name the instance "process" (web.1); "instance" is the older key
            inst = str(values.get("instance") or values.get("process") or "")[:64]
            for k, v in values.items():
                if k != "instance" and isinstance(v, int | float) and not isinstance(v, bool):
                    b.gauges[(k, inst)] = float(v)
            return
        for k, v in values.items():
            if not isinstance(v, int | float) or isinstance(v, bool):
                continue
            if kind == "router":
                m = _LE.match(k)
                if m:
                    bound = float(m.group(1))
                    b.hist[bound] = b.hist.get(bound, 0.0) + v
                    continue
                if _GT.match(k):
                    b.hist[float("inf")] = b.hist.get(float("inf"), 0.0) + v
                    continue
                if k == "latency_ms_mean":
                    b.mean_weighted += float(v) * float(values.get("requests", 0) or 0)
                    continue
                name = k
            else:
                name = f"{kind}.{k}"
            b.sums[name] = b.sums.get(name, 0.0) + v

    def due(self, now: float, everything: bool = False) -> list[Point]:
        """Points of every bucket that ended ``flush_delay`` ago (or all)."""
        out: list[Point] = []
        for key in sorted(self.buckets, key=lambda k: (k[2], k[1], k[0])):
            app, res, start = key
            if not everything and start + res + self.flush_delay > now:
                continue
            b = self.buckets.pop(key)
            self.written_until[res] = max(self.written_until.get(res, -1), start + res)
            out.extend(self._points(app, res, start, b))
        return out

    @staticmethod
    def _points(app: str, res: int, start: int, b: Bucket) -> Iterable[Point]:
        for name, v in b.sums.items():
            if _METRIC_RE.match(name):
                yield Point(app, name, "", res, start, v)
        if b.hist:
            for q, label in ((0.5, "latency_p50_ms"), (0.95, "latency_p95_ms"),
                             (0.99, "latency_p99_ms")):
                qv = quantile(b.hist, q)
                if qv is not None:
                    yield Point(app, label, "", res, start, qv)
        requests = b.sums.get("requests", 0.0)
        if requests and b.mean_weighted:
            yield Point(app, "latency_mean_ms", "", res, start, b.mean_weighted / requests)
        for (name, inst), v in b.gauges.items():
            if _METRIC_RE.match(name):
                yield Point(app, name, inst, res, start, v)


class StatsDB(Protocol):
    """Where points go: :class:`StoreStats`."""

    async def open(self) -> None: ...
    async def write(self, points: list[Point]) -> None: ...
    async def query(self, app: str, metric: str | None, since: float, until: float,
                    resolution: int) -> list[tuple[str, str, int, float]]: ...
    async def expire(self, resolution: int, before: float) -> int: ...


class StoreStats:
    """The points in the node's store (its migrations, its connections).

    ``get_store`` gives the store once it is open and migrated (the node's
    ``StoreService.whenReady``).  ``legacy_sqlite``: the stats file an SQLite node
    kept before the stats moved into the store, imported by :meth:`open`;
    ``run_blocking`` runs the reading of that file in a thread.
    """

    log = Logger()

    def __init__(self, get_store: Callable[[], Awaitable[Store]], legacy_sqlite: Path | None,
                 run_blocking: Callable[[Callable[[], Any]], Deferred[Any]]) -> None:
        self._get_store = get_store
        self.legacy_sqlite = legacy_sqlite
        self.run_blocking = run_blocking

    async def open(self) -> None:
        store = await self._get_store()
        if self.legacy_sqlite is not None and store.dialect == SQLITE:
            n = await stats_table.import_legacy_sqlite(store, self.legacy_sqlite,
                                                       self.run_blocking)
            if n:
                self.log.info("imported {n} stats points from {path} into the store",
                              n=n, path=str(self.legacy_sqlite))

    async def write(self, points: list[Point]) -> None:
        await stats_table.write_points(await self._get_store(), points)

    async def query(self, app: str, metric: str | None, since: float, until: float,
                    resolution: int) -> list[tuple[str, str, int, float]]:
        return await stats_table.query_points(await self._get_store(), app, metric, since,
                                              until, resolution)

    async def expire(self, resolution: int, before: float) -> int:
        return await stats_table.expire_points(await self._get_store(), resolution, before)


class StatsService:
    """Aggregates samples and flushes points to a StatsDB; answers queries.

    Not an IService itself: the logger service drives ``tick()`` from its
    maintenance loop and ``flush()`` on stop.  Points that fail to write are
    kept (up to ``max_pending``) and retried on the next tick; beyond that they
    are dropped and counted.
    """

    log = Logger()

    def __init__(self, db: StatsDB, clock: IReactorTime, *, flush_delay: float = 5.0,
                 retention: dict[int, float] | None = None, max_pending: int = 100_000,
                 counters: LogCounters | None = None) -> None:
        self.db = db
        self.clock = clock
        self.counters = counters
        self.aggregator = Aggregator(flush_delay, on_late=lambda: self._dropped("late"))
        self.retention = retention or {10: 86400.0, 60: 30 * 86400.0}
        self.max_pending = max_pending
        self.pending: list[Point] = []
        self.opened = False
        self._writing = False
        self.written = 0

    def _dropped(self, reason: str, n: int = 1) -> None:
        if self.counters is not None:
            self.counters.stats_dropped.labels(reason).inc(n)

    def sample(self, app: str, kind: str, values: dict[str, Any], timestamp: float) -> None:
        if self.counters is not None:
            self.counters.stats_received.labels(app, kind).inc()
        self.aggregator.add(app, kind, values, timestamp)

    async def open(self) -> None:
        await self.db.open()
        self.opened = True

    async def tick(self, everything: bool = False) -> None:
        """Write finished buckets (and retry earlier failures)."""
        self.pending.extend(self.aggregator.due(self.clock.seconds(), everything))
        if len(self.pending) > self.max_pending:
            over = len(self.pending) - self.max_pending
            del self.pending[:over]
            self._dropped("backlog", over)
        if not self.pending or self._writing or not self.opened:
            return
        batch, self.pending = self.pending, []
        self._writing = True
        try:
            await self.db.write(batch)
            self.written += len(batch)
        except Exception as e:
            self.pending[:0] = batch
            self.log.warn("writing {n} stats points failed ({err}); will retry",
                          n=len(batch), err=str(e))
        finally:
            self._writing = False

    async def expire(self) -> None:
        now = self.clock.seconds()
        for res, keep in self.retention.items():
            await self.db.expire(res, now - keep)

    async def query(self, app: str, metric: str | None, since: float | None, until: float | None,
                    resolution: int | None) -> tuple[int, dict[str, list[list[float]]]]:
        now = self.clock.seconds()
        until = now if until is None else until
        since = until - 3600 if since is None else since
        if resolution is None:
            resolution = 10 if until - since <= 6 * 3600 else 60
        if resolution not in RESOLUTIONS:
            from epio.bus.errors import RemoteError

            raise RemoteError("invalid_parameter", "resolution must be 10 or 60")
        rows = await self.db.query(app, metric, since, until, resolution)
        series: dict[str, list[list[float]]] = {}
        for name, inst, ts, value in rows:
            key = f"{name}:{inst}" if inst else name
            series.setdefault(key, []).append([ts, value])
        return resolution, series
