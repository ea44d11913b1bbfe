"""The api role's service tree: HTTP listener, deployer, scheduler (leader only).

``make_service(node)`` is the role's composition root and returns an
:class:`ApiService`.  The graph is built in two phases, each once, every object
receiving its collaborators through its constructor:

1. at construction (no I/O): the settings, the connection limit, the request
   deadlines, the HTTP listener and its :class:`ApiGate`, whose starting api
   answers 503 ``starting`` to every authenticated endpoint;
2. when the store is ready (:meth:`ApiService._start`): the admin user and
   ``DATA_DIR/admin-token`` (0600) on a store without users (logging WHERE, never
   the token), then :func:`build_ready` makes the bus DEALER for runner control,
   the log sink, scheduler, add-ons, run sessions, deployer, platform, certs, log
   tail and the full :class:`~epio.api.web.Api`, and the gate opens on it
   (``starting -> open``, its only transition).

docs/architecture.md draws the graph.
"""

from __future__ import annotations

import json
from functools import partial
from typing import TYPE_CHECKING, Any, cast

from attrs import frozen
from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web import http
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from epio.api.beacon import ApiBeacon, RecordingEndpoint, advertised, parse_advertise
from epio.api.channel import DeadlineChannel, Deadlines
from epio.api.control import BusRunnerControl
from epio.api.deploys import Deployer
from epio.api.domain import Platform, ensure_admin
from epio.api.errors import too_large_message
from epio.api.scheduler import Scheduler, SchedulerService
from epio.api.settings import ApiSettings, derive_app_secret
from epio.api.web import TARBALL_TYPES, Api, authorize_app
from epio.domain import platform_hostname
from epio.listen import (
    ConnectionLimit,
    LimitedEndpoint,
    log_backlog,
    required_listener,
    with_backlog,
)
from epio.metrics import Family
from epio.services import named

if TYPE_CHECKING:
    from epio.api.addons import Addons
    from epio.api.logtail import LogTail
    from epio.api.run import RunSessions
    from epio.node import Node
    from epio.pipeline import BusLogSink
    from epio.store import Store


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
            Request.gotLength(self, length)

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
            Request.handleContentChunk(self, data)

    return LimitedRequest


class CountingSite(Site):
    """The api's Site, counting answered requests by status class for /metrics; its
    connections have request deadlines (:class:`epio.api.channel.DeadlineChannel`)."""

    protocol = DeadlineChannel  # type: ignore[assignment]  # HTTPFactory types it as a callable

    def __init__(self, resource: IResource, deadlines: Deadlines | None = None,
                 reactor: IReactorTime | None = None,
                 limit: ConnectionLimit | None = None) -> None:
        Site.__init__(self, resource, reactor=reactor)
        self.deadlines = deadlines if deadlines is not None else Deadlines()
        self.limit = limit
        self.status_counts: dict[str, int] = {}

    def buildProtocol(self, addr: IAddress | None) -> Any:  # Twisted: a private channel type
        if self.limit is not None and not self.limit.opened():
            return None  # accepted in the batch that reached max_connections
        return Site.buildProtocol(self, addr)

    def log(self, request: http.Request) -> None:
        cls = f"{int(getattr(request, 'code', 0) or 0) // 100}xx"
        self.status_counts[cls] = self.status_counts.get(cls, 0) + 1
        super().log(request)

    def metric_families(self) -> list[Family]:
        fam = Family("epio_api_requests_total", "counter",
                     "HTTP requests the api answered, by status class")
        fam.samples.extend(("", {"class": c}, float(n))
                           for c, n in sorted(self.status_counts.items()))
        return [fam]


def make_site(api: Api | IResource, max_body: int, deadlines: Deadlines | None = None,
              reactor: IReactorTime | None = None,
              limit: ConnectionLimit | None = None) -> CountingSite:
    """The api's Site over ``api`` (an :class:`Api`, or a resource such as the gate)."""
    resource = api.resource() if isinstance(api, Api) else api
    site = CountingSite(resource, deadlines, reactor, limit)
    site.displayTracebacks = False
    site.requestFactory = limited_request(max_body)
    return site


class ApiGate(Resource):
    """The api's root resource: the starting api until the store is ready, then the
    full one.

    Its lifecycle has one transition, made once::

        starting --open(resource)--> open

    Both apis are whole :class:`~epio.api.web.Api` objects built with every
    collaborator; the starting one has no platform, so it answers 503 ``starting``
    to authenticated endpoints and serves the others (dashboard, OpenAPI) as usual.
    """

    isLeaf = True

    def __init__(self, starting: IResource) -> None:
        Resource.__init__(self)
        self._current = starting
        self._open = False

    @property
    def is_open(self) -> bool:
        return self._open

    def open(self, resource: IResource) -> None:
        if self._open:
            raise RuntimeError("the api gate is already open")
        self._current, self._open = resource, True

    def render(self, request: IRequest) -> bytes | int:  # int: NOT_DONE_YET
        result: bytes | int = self._current.render(request)
        return result


@frozen
class ReadyApi:
    """The store-dependent half of the api's graph, built once by :func:`build_ready`.

    ``services`` go under the :class:`ApiService` in this order (start order)."""

    api: Api
    deployer: Deployer
    services: tuple[IService, ...]


def build_ready(node: Node, settings: ApiSettings, store: Store) -> ReadyApi:
    """Build the api's objects that need the ready store, each once, in dependency
    order: control, sink, scheduler, add-ons, run sessions, deployer, platform, certs,
    log tail, api; and their services (scheduler, keeper, purge, acme issuer, cron)."""
    from epio.api.addons import make_addons
    from epio.api.cron import CronRunner, CronService, CronSettings
    from epio.api.purge import AppPurger, PurgeService
    from epio.api.run import RunApiSettings, RunSessions
    from epio.certs.api import Certs, DomainCheck
    from epio.certs.dns01 import make_dns01
    from epio.certs.resolve import make_name_check

    services: list[IService] = []
    dealer = node.bus.dealer([])
    services.append(named("api-runner-control", dealer))
    sink: BusLogSink | None = None
    loggers = node.settings.cluster.loggers
    if loggers or node.cluster is not None:
        from epio.pipeline import BusLogSink

        sink = BusLogSink(node.bus, list(loggers), clock=node.reactor)
        services.append(sink)
        if node.cluster is not None:  # a logger joins or leaves (epio.cluster)
            from epio.cluster import follow_endpoints

            follow_endpoints(node.cluster, sink=sink)
    control = BusRunnerControl(dealer)
    scheduler = Scheduler(store, control, node.reactor, settings, log_sink=sink,
                          app_secret=partial(derive_app_secret, node.secret))
    services.append(named("scheduler", SchedulerService(scheduler, store, node.reactor,
                                                         settings.leader_retry)))
    addons: Addons = make_addons(node.reactor, node.config, store, control, scheduler, sink)
    services.append(addons.keeper(addons.settings.keeper_interval))
    from epio.metrics import registry_for

    registry_for(node).add_collector(addons.metric_families)
    sessions: RunSessions = RunSessions(store, control, node.reactor,
                                        RunApiSettings.from_config(node.config),
                                        log_sink=sink, platform_env=scheduler.platform_env)
    deployer = Deployer(store, control, node.reactor, settings, scheduler=scheduler,
                        log_sink=sink, owner={"node": node.node_id, "boot": node.boot_id},
                        addons=addons, run_sessions=sessions)
    joins = None
    if node.cluster is not None:  # a PostgreSQL store: hosts may join (epio.cluster)
        from epio.cluster import JoinIssuer, shared_settings

        joins = JoinIssuer(node.secret, shared_settings(node.settings))
    platform = Platform(store, settings, node.reactor, deployer=deployer, scheduler=scheduler,
                        joins=joins,
                        addons=addons)
    purger = AppPurger(platform, store, node.reactor)
    services.append(named("purge", PurgeService(purger, store, node.reactor,
                                                settings.purge_interval, settings.leader_retry)))
    acme = node.settings.acme
    dns01 = make_dns01(node, store)  # DNS-01's zone server (docs/https.md), or None
    if dns01 is not None:
        services.append(named("acme-dns01", dns01[1]))
    domain_check = DomainCheck(
        node.reactor, make_name_check(node.reactor, list(acme.router_addresses),
                                      acme.dns_server, node.settings.node.domain),
        dns01[0] if dns01 else None, bool(acme.directory)) if acme.name_check else None
    certs = Certs(store, node.secret, bool(acme.directory), node.reactor, domain_check)
    if acme.directory:  # (docs/https.md); acme, josepy, requests: 6 MiB,
        from epio.certs.issuer import make_issuer_service  # imported only when used

        issuer = make_issuer_service(node, store, settings.leader_retry,
                                     dns01[0] if dns01 else None)
        if issuer is not None:
            services.append(named("acme-issuer", issuer))
    log_tail = _log_tail(node, platform, services)
    api = Api(platform, max_json_bytes=settings.max_json_bytes,
              max_upload_bytes=settings.max_upload_bytes, log_tail=log_tail, addons=addons,
              certs=certs, run=sessions, api_url=settings.platform_url())
    cron = CronRunner(store, sessions, node.reactor, CronSettings.from_config(node.config),
                      log_sink=sink)
    services.append(named("cron", CronService(cron, store, node.reactor,
                                              settings.leader_retry)))
    return ReadyApi(api, deployer, tuple(services))


def _log_tail(node: Node, platform: Platform, services: list[IService]) -> LogTail | None:
    """The logs endpoint (epio.api.logtail) when a logger is configured; its log
    client joins ``services``."""
    from epio.api.logtail import LogTail

    try:
        from epio.logclient import make_log_client

        client = make_log_client(node)
    except (ImportError, KeyError, ValueError) as e:
        ApiService.log.info("logs endpoint disabled: {why}", why=str(e))
        return None
    services.append(named("log-client", client))
    return LogTail.from_node(node, client, partial(authorize_app, platform))


class ApiService(MultiService):
    """The api role of one node (built by :func:`make_service`)."""

    log = Logger()

    def __init__(self, node: Node, settings: ApiSettings, gate: ApiGate,
                 http: IService, beacon: IService | None = None) -> None:
        MultiService.__init__(self)
        self.node = node
        # api.heartbeat to every nexus (the platform's own route), started once open
        self.beacon = beacon
        self.settings = settings
        self.gate = gate
        http.setServiceParent(self)
        self._listen = node.settings.api.listen
        self._backlog = node.settings.api.backlog
        self._starting: Deferred[None] | None = None  # _start, once started
        self._register: LoopingCall | None = None
        # phase 2, fired once with the store-dependent graph (never errbacks)
        self._ready: Deferred[ReadyApi] = Deferred()

    def startService(self) -> None:
        MultiService.startService(self)
        self.log.info("api listening on {endpoint}", endpoint=self._listen)
        log_backlog("api", self._backlog)
        self._starting = ensureDeferred(self._start())
        self._starting.addErrback(lambda f: self.log.failure("the api role could not start", f))

    async def _start(self) -> None:
        node = self.node
        assert node.store_service is not None  # tap gives every role node the store
        store = await node.store_service.whenReady()
        path = await ensure_admin(store, node.data_dir)
        if path is not None:
            routed = self.settings.platform_url()
            if routed is None:
                self.log.info("created the admin user; its API token is in {path} (mode "
                              "0600): epio login --api URL < {path}", path=str(path))
            else:
                self.log.info("created the admin user; its API token is in {path} (mode "
                              "0600): epio login --api {url} < {path} (through the routers; "
                              "this api's own listener, {listen}, works too)", path=str(path),
                              url=routed, listen=self._listen)
        if not self.running:
            return
        ready = build_ready(node, self.settings, store)
        for svc in ready.services:
            svc.setServiceParent(self)
        if "runner" not in node.roles:
            # the runner role registers the node itself (with its control endpoint);
            # a node without one is registered here so GET /nodes lists it too
            self._register = LoopingCall(self._register_node, store)
            self._register.clock = node.reactor
            self._register.start(self.settings.runner_dead_after / 3, now=True).addErrback(
                lambda f: self.log.failure("node registration loop died", f))
        self.gate.open(ready.api.resource())
        if self.beacon is not None:
            self.beacon.setServiceParent(self)  # routers may send requests from now on
        self._ready.callback(ready)
        self.log.info("api ready")

    def whenReady(self) -> Deferred[Api]:
        """Fires with the full api once the store is ready and the gate open (never,
        when the role could not start: that is logged)."""
        d: Deferred[Api] = Deferred()

        def fire(ready: ReadyApi) -> ReadyApi:
            d.callback(ready.api)
            return ready

        self._ready.addCallback(fire)
        return d

    async def _register_node(self, store: Store) -> None:
        try:
            await store.upsert_node(self.node.node_id, self.node.roles, None,
                                    self.node.boot_id, status={"api": self._listen})
        except Exception as e:
            self.log.warn("registering node {node} failed: {error}", node=self.node.node_id,
                          error=str(e) or type(e).__name__)

    def stopService(self) -> Deferred[None]:
        if self._register is not None and self._register.running:
            self._register.stop()
        beacon: Any = None
        if self.beacon is not None and self.beacon.parent is not None:
            # first: the nexuses stop routing here while the in-flight requests finish
            beacon = self.beacon.disownServiceParent()
        # Deferred.result is the ReadyApi once fired (it never errbacks)
        ready = cast(ReadyApi, self._ready.result) if self._ready.called else None
        deployer = ready.deployer if ready is not None else None

        async def stop() -> None:
            if isinstance(beacon, Deferred):
                await beacon
            if deployer is not None:
                try:
                    await deployer.stop()  # running deploys are marked failed
                except Exception:
                    self.log.failure("stopping the running deploys failed")
            await MultiService.stopService(self)

        return ensureDeferred(stop())


def make_service(node: Node) -> ApiService:
    """The api role's composition root (phase 1; phase 2 is :func:`build_ready`)."""
    from epio.metrics import registry_for

    section = node.settings.api
    settings = ApiSettings.from_config(node.config)
    limit = ConnectionLimit("api", section.max_connections)
    deadlines = Deadlines(section.header_timeout, section.body_timeout, section.body_min_rate)
    starting = Api(None, max_json_bytes=settings.max_json_bytes,
                   max_upload_bytes=settings.max_upload_bytes, api_url=settings.platform_url())
    gate = ApiGate(starting.resource())
    site = make_site(gate, settings.max_upload_bytes + (1 << 20), deadlines, node.reactor, limit)
    registry_for(node).add_collector(site.metric_families)
    endpoint = RecordingEndpoint(LimitedEndpoint(
        serverFromString(node.reactor, with_backlog(section.listen, section.backlog)), limit))
    http = required_listener(endpoint, site)  # cannot listen: the node stops
    http.setName("api-http")
    return ApiService(node, settings, gate, http, make_beacon(node, endpoint))


def make_beacon(node: Node, endpoint: RecordingEndpoint) -> ApiBeacon | None:
    """The api's heartbeat to every nexus (None: no nexus configured, or the platform
    route is off: ``api.hostname = off``)."""
    s = node.settings
    nexus = [str(n["heartbeat"]) for n in s.cluster.nexus if n.get("heartbeat")]
    if (not nexus and node.cluster is None) or not platform_hostname(s.api.hostname,
                                                                    s.node.domain):
        return None
    publisher = node.bus.publisher(connect=nexus, may_start_empty=node.cluster is not None)
    if node.cluster is not None:  # a nexus joins or leaves (epio.cluster)
        from epio.cluster import follow_endpoints

        follow_endpoints(node.cluster, heartbeats=publisher)
    publisher.setName("api-heartbeat")  # type: ignore[no-untyped-call]  # Twisted leaves it untyped
    explicit = parse_advertise(s.api.advertise)
    beacon = ApiBeacon(node.reactor, publisher, node.node_id, node.boot_id,
                       s.api.heartbeat_interval,
                       lambda: advertised(explicit, endpoint.port, s.runner.advertise_host))
    beacon.setName("api-beacon")  # type: ignore[no-untyped-call]  # Twisted leaves it untyped
    return beacon
