"""The ``logger`` role: PULL lines and stats, store, answer queries, publish live lines.

Sockets (all on the bus, signed): PULL at ``logger.pull_bind`` (``log.line``,
``stats.sample`` from every node's BusLogSink), ROUTER at ``logger.router_bind``
(``logs.query``, ``stats.query``), PUB at ``logger.publish_bind`` (``log.live``).
See docs/logs.md.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from epio.bus import Bus, Envelope
from epio.bus.errors import RemoteError
from epio.config.settings import LoggerSettings
from epio.logclient import BadFilter, compile_grep, live_topic
from epio.logs.drains import DrainConfig, DrainManager
from epio.logs.receiver import LogCounters, LogReceiver
from epio.logs.records import APP_RE, LogRecord
from epio.logs.stats import StatsDB, StatsService, StoreStats
from epio.logs.store import LogStore, Query, StoreConfig
from epio.metrics import MetricsRegistry, ensure_metrics_service, registry_for
from epio.store.store import Store

if TYPE_CHECKING:
    from epio.node import INodeReactor, Node

LIVE_BATCH = 500  # lines per log.live message (published at once when full)
STATS_EXPIRE_EVERY = 300.0  # seconds between stats retention passes
LEGACY_STATS_FILE = "stats.sqlite3"  # an SQLite node's stats before they moved into the store


class LiveFeed:
    """Publishes stored lines as ``log.live`` batches, once per reactor turn."""

    def __init__(self, clock: IReactorTime, publish: Callable[[str, dict[str, Any], bytes], Any], logger_id: str) -> None:
        self.clock = clock
        self.publish = publish
        self.logger_id = logger_id
        self.pending: dict[str, list[LogRecord]] = {}
        self._call: IDelayedCall | None = None

    def add(self, app: str, rec: LogRecord) -> None:
        batch = self.pending.get(app)
        if batch is None:
            batch = self.pending[app] = []
        batch.append(rec)
        if len(batch) >= LIVE_BATCH:
            # a backlog being worked off in one reactor turn must not hold live
            # lines back until its end: publish full batches at once
            del self.pending[app]
            self._publish(app, batch)
        elif self._call is None:
            self._call = self.clock.callLater(0, self.flush)

    def flush(self) -> None:
        self._call = None
        pending, self.pending = self.pending, {}
        for app, recs in pending.items():
            self._publish(app, recs)

    def _publish(self, app: str, recs: list[LogRecord]) -> None:
        topic = live_topic(app)
        for i in range(0, len(recs), LIVE_BATCH):
            part = recs[i : i + LIVE_BATCH]
            self.publish("log.live", {
                "app": app, "first": part[0].lineno, "lines": [r.to_wire() for r in part],
                "logger": self.logger_id,
            }, topic)

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


class LoggerService(MultiService):
    """One logger: the log store, the stats, the drains and the three sockets.

    Built by :func:`make_service` (the role's composition root) from the node's
    ``[logger]`` settings; every collaborator comes in through the constructor.
    """

    log = Logger()

    def __init__(self, reactor: INodeReactor, settings: LoggerSettings, node_id: str,
                 data_dir: Path, bus: Bus, registry: MetricsRegistry,
                 make_stats_db: Callable[[Callable[[Callable[[], Any]], Deferred[Any]]],
                                         StatsDB]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        self.reactor = reactor
        self.settings = settings
        self.node_id = node_id
        self.registry = registry
        self.counters = LogCounters(registry, per_app=settings.metrics_per_app)
        self.store = LogStore(data_dir / "logs", reactor, StoreConfig.from_settings(settings),
                              run_blocking=self._in_thread)
        self.drains = DrainManager(reactor, DrainConfig(
            buffer_lines=settings.drain_buffer_lines, max_attempts=settings.drain_max_attempts,
            backoff_max=settings.drain_backoff_max, hostname=node_id,
            tls_ca=settings.drain_tls_ca), registry=registry)
        self.drains.setServiceParent(self)  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        for d in settings.drains:
            try:
                self.drains.add(str(d["id"]), str(d["app"]), str(d["url"]))
            except (KeyError, ValueError) as e:
                raise ValueError(f"logger.drains: {e}") from None
        self.publisher = bus.publisher(bind=settings.publish_bind)
        self.publisher.setServiceParent(self)  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        self.live = LiveFeed(reactor, lambda t, b, topic: self.publisher.publish(t, b, topic=topic),
                             node_id)
        self.receiver = LogReceiver(self.store, reactor, self.counters, settings.max_line_bytes,
                                    on_record=self._on_record)
        self.stats = StatsService(make_stats_db(self._in_thread), reactor,
                                  flush_delay=settings.stats_flush_delay,
                                  retention={10: settings.stats_retention_10s,
                                             60: settings.stats_retention_1m},
                                  counters=self.counters)
        self.router = bus.router(settings.router_bind, self._request)
        self.router.setServiceParent(self)  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        self.pull = bus.pull(settings.pull_bind, self._pulled)
        self.pull.setServiceParent(self)  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        self._flusher = TimerService(settings.flush_interval, self._flush)
        self._flusher.clock = reactor
        self._flusher.setServiceParent(self)
        self._maint = TimerService(settings.maintenance_interval, self._maintain)
        self._maint.clock = reactor
        self._maint.setServiceParent(self)
        self._last_expire = 0.0
        self._bytes_gauge = self.counters.store_bytes
        self.setName("logger")  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated

    def _in_thread(self, f: Callable[[], Any]) -> Deferred[Any]:
        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), f)

    # -- lifecycle ----------------------------------------------------------------

    def startService(self) -> None:
        self.store.open()  # recovery: reads the indexes and the open chunks
        for app in self.store.iter_apps():
            self._bytes_gauge.labels(app).set_function(
                lambda a=app: float(self.store.apps[a].disk_bytes) if a in self.store.apps else 0.0)
        super().startService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        d = Deferred.fromCoroutine(self.stats.open())
        d.addErrback(lambda f: self.log.failure("stats database could not be opened; samples "
                                                "are kept in memory and retried", f))

    def stopService(self) -> Any:
        self.live.stop()

        async def finish(_: Any) -> None:
            # the sockets are closed: nothing more arrives; make everything durable
            self.store.flush()
            self.store.close()
            # the node's store closes after every role has stopped (epio.tap)
            try:
                if self.stats.opened:
                    await self.stats.tick(everything=True)
            except Exception:
                self.log.failure("writing the last stats failed")

        d = maybeDeferred(super().stopService)
        d.addCallback(lambda r: Deferred.fromCoroutine(finish(r)))
        return d

    # -- receiving ------------------------------------------------------------------

    def _on_record(self, app: str, rec: LogRecord) -> None:
        self.live.add(app, rec)
        self.drains.on_record(app, rec)

    def _pulled(self, env: Envelope) -> None:
        if env.type == "log.line":
            self.receiver.line(env.sender, env.body)
        elif env.type == "log.batch":
            self.receiver.batch(env.sender, env.body)
        elif env.type == "stats.sample":
            body = env.body
            if not APP_RE.match(body["app"]):
                self.counters.stats_dropped.labels("invalid_app").inc()
                return
            self.stats.sample(body["app"], body["kind"], body["values"], body["timestamp"])
        else:
            self.log.warn("logger got an unexpected {type} on its PULL socket", type=env.type)

    def _flush(self) -> None:
        try:
            self.store.flush()
        except OSError as e:
            self.log.error("flushing logs failed: {err}", err=str(e))

    async def _maintain_async(self) -> None:
        self.store.maintain()
        for app in self.store.iter_apps():
            if (app,) not in self._bytes_gauge._children:
                self._bytes_gauge.labels(app).set_function(
                    lambda a=app: float(self.store.apps[a].disk_bytes) if a in self.store.apps else 0.0)
        await self.stats.tick()
        now = self.reactor.seconds()
        if self.stats.opened and now - self._last_expire >= STATS_EXPIRE_EVERY:
            self._last_expire = now
            await self.stats.expire()

    def _maintain(self) -> Deferred[None]:
        d = Deferred.fromCoroutine(self._maintain_async())
        d.addErrback(lambda f: self.log.failure("logger maintenance failed", f))
        return d

    # -- queries ----------------------------------------------------------------------

    async def _request(self, env: Envelope) -> tuple[str, dict[str, Any]]:
        body = env.body
        app = body["app"]
        if not APP_RE.match(app):
            raise RemoteError("invalid_parameter", "invalid app name")
        if env.type == "logs.query":
            return "logs.result", await self._logs_query(app, body)
        if env.type == "stats.query":
            res, series = await self.stats.query(app, body.get("metric"), body.get("since"),
                                                 body.get("until"), body.get("resolution"))
            return "stats.result", {"app": app, "resolution": res, "series": series}
        raise RemoteError("unsupported", f"a logger does not answer {env.type}")

    async def _logs_query(self, app: str, body: dict[str, Any]) -> dict[str, Any]:
        n = body["n"]
        if not 0 <= n <= self.settings.query_max_lines:
            raise RemoteError("invalid_parameter",
                              f"n must be between 0 and {self.settings.query_max_lines}")
        grep = body.get("grep")
        rx = None
        if grep is not None:
            if not isinstance(grep, str) or len(grep) > 200:
                raise RemoteError("invalid_parameter", "grep must be a regex of at most 200 characters")
            try:
                rx = compile_grep(grep)
            except BadFilter as e:
                raise RemoteError("invalid_parameter", str(e)) from None
        sources = body.get("sources") or []
        if not all(isinstance(s, str) for s in sources):
            raise RemoteError("invalid_parameter", "sources must be strings")
        q = Query(n=n, since=body.get("since"), until=body.get("until"),
                  sources=frozenset(sources), grep=rx, after=body.get("after"))
        result = await self.store.query(app, q)
        return {"app": app, "lines": [r.to_wire() for r in result.lines],
                "next": result.next_lineno, "logger": self.node_id}


def make_service(node: Node) -> LoggerService:
    """The logger role of ``node``: its composition root.

    The stats go to the node's store (its migrations, its connections); an SQLite
    node's stats file from before that is imported on the first start.
    """
    store_service = node.store_service

    async def get_store() -> Store:
        if store_service is None:
            raise RuntimeError("this node has no store service")
        return await store_service.whenReady()

    def make_stats_db(run_blocking: Callable[[Callable[[], Any]], Deferred[Any]]) -> StatsDB:
        return StoreStats(get_store, node.data_dir / LEGACY_STATS_FILE, run_blocking)

    svc = LoggerService(node.reactor, node.settings.logger, node.node_id, node.data_dir,
                        node.bus, registry_for(node), make_stats_db)
    ensure_metrics_service(node, svc)
    return svc
