"""The api role's service tree: HTTP listener, deployer, scheduler (leader only).

``make_service(node)`` returns a :class:`ApiService`.  It listens at once on
``api.listen`` (answering 503 ``starting`` until the store is ready), then:
creates the admin user and ``DATA_DIR/admin-token`` (0600) on a store without
users (logging WHERE, never the token), starts one bus DEALER for runner
control, the scheduler's leader election and the log sink.
"""

from __future__ import annotations

import json
from functools import partial
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.defer import ensureDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.server import Request, Site

from epio.api.channel import DeadlineChannel, Deadlines
from epio.api.control import BusRunnerControl
from epio.api.deploys import Deployer
from epio.api.domain import Platform, ensure_admin
from epio.api.errors import too_large_message
from epio.api.scheduler import Scheduler, SchedulerService
from epio.api.settings import ApiSettings, derive_app_secret
from epio.api.web import TARBALL_TYPES, Api
from epio.listen import ConnectionLimit, LimitedEndpoint, log_backlog, with_backlog


def limited_request(max_body: int) -> type[Request]:
    """A Request class that stops storing a body past ``max_body`` bytes.

    twisted.web spools bodies to a temporary file as they arrive (streaming
    friendly); past the limit the rest is discarded and the handler answers
    413 ``payload_too_large``.
    """

    class LimitedRequest(Request):
        epio_oversize = False
        _epio_received = 0

        def gotLength(self, length: int | None) -> None:
            if length is not None and length > max_body:
                # answer now and hang up: no point receiving what will be refused
                self.epio_oversize = True
                body = json.dumps({"error": {
                    "code": "payload_too_large",
                    "message": too_large_message(length, max_body, self._epio_upload()),
                }}).encode() + b"\n"
                transport: Any = self.channel.transport if self.channel is not None else None
                if transport is not None:
                    transport.write(
                        b"HTTP/1.1 413 Payload Too Large\r\nContent-Type: application/json\r\n"
                        b"Connection: close\r\nContent-Length: " + str(len(body)).encode()
                        + b"\r\n\r\n" + body)
                    transport.loseConnection()
                length = 0
            super().gotLength(length)

        def _epio_upload(self) -> bool:
            kind = (self.requestHeaders.getRawHeaders(b"content-type") or [b""])[0]
            return kind.split(b";")[0].strip().lower().decode("latin-1") in TARBALL_TYPES

        def handleContentChunk(self, data: bytes) -> None:
            if self.epio_oversize:
                return
            self._epio_received += len(data)
            if self._epio_received > max_body:
                self.epio_oversize = True
                if self.content is not None:
                    self.content.seek(0)
                    self.content.truncate()
                return
            super().handleContentChunk(data)

    return LimitedRequest


class CountingSite(Site):
    """The api's Site, counting answered requests by status class for /metrics; its
    connections have request deadlines (:class:`epio.api.channel.DeadlineChannel`)."""

    protocol = DeadlineChannel  # type: ignore[assignment]  # HTTPFactory types it as a callable

    def __init__(self, resource: Any, deadlines: Deadlines | None = None,
                 reactor: Any = None, limit: ConnectionLimit | None = None) -> None:
        super().__init__(resource, reactor=reactor)
        self.deadlines = deadlines if deadlines is not None else Deadlines()
        self.limit = limit
        self.status_counts: dict[str, int] = {}

    def buildProtocol(self, addr: Any) -> Any:
        if self.limit is not None and not self.limit.opened():
            return None  # accepted in the batch that reached max_connections
        return super().buildProtocol(addr)

    def log(self, request: Any) -> None:
        cls = f"{int(getattr(request, 'code', 0) or 0) // 100}xx"
        self.status_counts[cls] = self.status_counts.get(cls, 0) + 1
        super().log(request)

    def metric_families(self) -> list[Any]:
        from epio.metrics import Family

        fam = Family("epio_api_requests_total", "counter",
                     "HTTP requests the api answered, by status class")
        fam.samples.extend(("", {"class": c}, float(n))
                           for c, n in sorted(self.status_counts.items()))
        return [fam]


def make_site(api: Api, max_body: int, deadlines: Deadlines | None = None,
              reactor: Any = None, limit: ConnectionLimit | None = None) -> CountingSite:
    site = CountingSite(api.resource(), deadlines, reactor, limit)
    site.displayTracebacks = False
    site.requestFactory = limited_request(max_body)
    return site


class ApiService(MultiService):
    """The api role of one node."""

    log = Logger()

    def __init__(self, node: Any) -> None:
        super().__init__()
        self.node = node
        self.settings = ApiSettings.from_config(node.config)
        self.api = Api(None, max_json_bytes=self.settings.max_json_bytes,
                       max_upload_bytes=self.settings.max_upload_bytes)
        self.platform: Platform | None = None
        self.scheduler: Scheduler | None = None
        self.deployer: Deployer | None = None
        api_cfg = node.config["api"]
        listen = api_cfg["listen"]
        self._backlog = int(api_cfg["backlog"])
        deadlines = Deadlines(float(api_cfg["header_timeout"]), float(api_cfg["body_timeout"]),
                              int(api_cfg["body_min_rate"]))
        self.limit = ConnectionLimit("api", int(api_cfg["max_connections"]))
        endpoint = LimitedEndpoint(
            serverFromString(node.reactor, with_backlog(listen, self._backlog)), self.limit)
        site = make_site(self.api, self.settings.max_upload_bytes + (1 << 20), deadlines,
                         node.reactor, self.limit)
        from epio.metrics import registry_for

        registry_for(node).add_collector(site.metric_families)
        http = StreamServerEndpointService(endpoint, site)
        http.setName("api-http")
        http.setServiceParent(self)
        self._listen = listen
        self._starting: Any = None
        self._register: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        self.log.info("api listening on {endpoint}", endpoint=self._listen)
        log_backlog("api", self._backlog)
        self._starting = ensureDeferred(self._start())
        self._starting.addErrback(lambda f: self.log.failure("the api role could not start", f))

    async def _start(self) -> None:
        node = self.node
        store = await node.store_service.whenReady()
        path = await ensure_admin(store, node.data_dir)
        if path is not None:
            self.log.info("created the admin user; its API token is in {path} (mode 0600): "
                          "epio login --api URL < {path}", path=str(path))
        if not self.running:
            return
        dealer = node.bus.dealer([])
        dealer.setName("api-runner-control")
        dealer.setServiceParent(self)
        sink = None
        loggers = node.config["cluster"]["loggers"]
        if loggers:
            from epio.pipeline import BusLogSink

            sink = BusLogSink(node.bus, loggers, clock=node.reactor)
            sink.setServiceParent(self)
        control = BusRunnerControl(dealer)
        self.scheduler = Scheduler(store, control, node.reactor, self.settings, log_sink=sink,
                                   app_secret=partial(derive_app_secret, node.secret))
        sched = SchedulerService(self.scheduler, store, node.reactor,
                                 self.settings.leader_retry)
        sched.setName("scheduler")
        sched.setServiceParent(self)
        self.deployer = Deployer(store, control, node.reactor, self.settings,
                                 scheduler=self.scheduler, log_sink=sink,
                                 owner={"node": node.node_id, "boot": node.boot_id})
        self.platform = Platform(store, self.settings, node.reactor, deployer=self.deployer,
                                 scheduler=self.scheduler)
        from epio.api.addons import make_addons

        self.api.addons = self.platform.addons = self.deployer.addons = make_addons(
            node, store, control, self.scheduler, sink, parent=self)
        if "runner" not in node.roles:
            # the runner role registers the node itself (with its control endpoint);
            # a node without one is registered here so GET /nodes lists it too
            self._register = LoopingCall(self._register_node, store)
            self._register.clock = node.reactor
            self._register.start(self.settings.runner_dead_after / 3, now=True).addErrback(
                lambda f: self.log.failure("node registration loop died", f))
        from epio.api.purge import AppPurger, PurgeService

        purge = PurgeService(AppPurger(self.platform, store, node.reactor), store, node.reactor,
                             self.settings.purge_interval, self.settings.leader_retry)
        purge.setName("purge")
        purge.setServiceParent(self)
        from epio.certs.api import Certs
        from epio.certs.issuer import make_issuer_service

        self.api.certs = Certs(store, node.secret, bool(node.config["acme"]["directory"]),
                               node.reactor)

        issuer = make_issuer_service(node, store, self.settings.leader_retry)
        if issuer is not None:  # acme.directory set (docs/https.md)
            issuer.setName("acme-issuer")
            issuer.setServiceParent(self)
        self.api.log_tail = self._log_tail()
        self.api.platform = self.platform
        from epio.api.run import install as install_run

        sessions = install_run(self.api, node, store, control, sink, self.deployer)  # epio run
        from epio.api.cron import CronRunner, CronService, CronSettings

        cron = CronService(CronRunner(store, sessions, node.reactor,
                                      CronSettings.from_config(node.config), log_sink=sink),
                           store, node.reactor, self.settings.leader_retry)
        cron.setName("cron")
        cron.setServiceParent(self)
        self.log.info("api ready")

    async def _register_node(self, store: Any) -> None:
        try:
            await store.upsert_node(self.node.node_id, self.node.roles, None, self.node.boot_id,
                                    status={"api": self._listen})
        except Exception as e:
            self.log.warn("registering node {node} failed: {error}", node=self.node.node_id,
                          error=str(e) or type(e).__name__)

    def stopService(self) -> Any:
        if self._register is not None and self._register.running:
            self._register.stop()
        deployer = self.deployer

        async def stop() -> None:
            if deployer is not None:
                try:
                    await deployer.stop()  # running deploys are marked failed
                except Exception:
                    self.log.failure("stopping the running deploys failed")
            await super(ApiService, self).stopService()

        return ensureDeferred(stop())

    def _log_tail(self) -> Any:
        """The logs endpoint (epio.api.logtail) when a logger is configured."""
        try:
            from epio.api.logtail import LogTail
            from epio.logclient import make_log_client

            client = make_log_client(self.node)
        except (ImportError, KeyError, ValueError) as e:
            self.log.info("logs endpoint disabled: {why}", why=str(e))
            return None
        client.setName("log-client")
        client.setServiceParent(self)
        return LogTail.from_node(self.node, client, self.api.authorize_app)


def make_service(node: Any) -> ApiService:
    return ApiService(node)
