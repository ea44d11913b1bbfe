"""The ``nexus`` role: heartbeats in (SUB), snapshots and queries (ROUTER), deltas out (PUB).

Sockets (endpoints from the ``nexus`` config section):

- ``heartbeat_bind``: SUB, bound; runners connect their PUB to every nexus and
  publish ``runner.heartbeat`` on topic ``hb``; api nodes publish ``api.heartbeat``
  there too (the platform's own route);
- ``router_bind``: ROUTER answering ``nexus.snapshot_request``,
  ``nexus.where`` and ``nexus.status``;
- ``publish_bind``: PUB sending ``nexus.delta`` and ``nexus.keepalive`` on
  topic ``routes``.

The logic lives in :class:`epio.nexus.core.Nexus`; this module wires it to the
bus, the store (re-read every ``store_refresh`` seconds, and early when a
heartbeat names something the nexus has not read yet) and the clock.  See
docs/nexus.md.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from epio.bus import Bus, Envelope
from epio.bus.errors import RemoteError
from epio.config.settings import ApiSettings, NexusSettings
from epio.domain import PLATFORM_APP, PLATFORM_RELEASE, platform_hostname
from epio.nexus.core import Nexus, NotFound, NotReady
from epio.nexus.storeview import ReleaseOptions, RoutingStore, load_view
from epio.nexus.table import AppFacts

if TYPE_CHECKING:
    from epio.node import Node

HEARTBEAT_TOPIC = b"hb"
ROUTES_TOPIC = b"routes"


class NexusService(MultiService):
    """One nexus: the :class:`Nexus` logic plus its three sockets and two timers.

    ``settings`` is the node's ``[nexus]`` section.  ``get_store`` returns a
    Deferred firing with the store (the node's ``store_service.whenReady``).  ``startService`` never fails asynchronously:
    a store that cannot be read is logged and tried again at the next refresh;
    until it has been read once the nexus stays warming up.
    """

    log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        bus: Bus,
        settings: NexusSettings,
        get_store: Callable[[], Deferred[RoutingStore]],
        domain: str,
        nexus_id: str | None = None,
        platform: AppFacts | None = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        self.reactor = reactor
        self.bus = bus
        self.domain = domain
        self._get_store = get_store
        self.store_refresh = settings.store_refresh
        self.store_refresh_min = settings.store_refresh_min
        self.nexus_id = nexus_id or uuid.uuid4().hex
        self.release_options = ReleaseOptions(reactor, self.store_refresh / 4)
        self.nexus = Nexus(
            reactor, self.nexus_id, self._publish,
            node_timeout=settings.node_timeout,
            warmup=settings.warmup,
            delta_interval=settings.delta_interval,
            web_types=settings.web_process_types,
            on_store_hint=self.refresh_soon,
            platform=platform,
        )
        self.publisher = bus.publisher(bind=settings.publish_bind)
        self.publisher.setServiceParent(self)  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        self.heartbeats = bus.subscriber([], [HEARTBEAT_TOPIC], self._heartbeat,
                                         bind=settings.heartbeat_bind)
        self.heartbeats.setServiceParent(self)  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        self.router = bus.router(settings.router_bind, self._request)
        self.router.setServiceParent(self)  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        for interval, call in ((settings.keepalive_interval, self.nexus.keepalive),
                               (self.store_refresh, self._timed_refresh)):
            timer = TimerService(interval, call)
            timer.clock = reactor
            timer.setServiceParent(self)
        self._refreshing = False
        self._refresh_again = False
        self._last_refresh: float | None = None
        self._soon: IDelayedCall | None = None

    # -- life -----------------------------------------------------------------

    def startService(self) -> None:
        self.log.info(
            "nexus {nexus_id}: heartbeats at {hb}, snapshots and queries at {router}, "
            "deltas at {pub}", nexus_id=self.nexus_id, hb=self.heartbeats.binds[0],
            router=self.router.binds[0], pub=self.publisher.binds[0],
        )
        self.nexus.start()
        super().startService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated

    def stopService(self) -> Any:
        self.nexus.stop()
        if self._soon is not None and self._soon.active():
            self._soon.cancel()
        self._soon = None
        return super().stopService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated

    # -- bus ------------------------------------------------------------------

    def _publish(self, type: str, body: dict[str, Any]) -> None:
        self.publisher.publish(type, body, topic=ROUTES_TOPIC)

    def _heartbeat(self, topic: bytes, env: Envelope) -> None:
        if env.type == "api.heartbeat":
            self.nexus.api_heartbeat(env.body)
            return
        if env.type != "runner.heartbeat":
            self.nexus.counters["unexpected_" + env.type] += 1
            return
        self.nexus.heartbeat(env.body)

    def _request(self, env: Envelope) -> tuple[str, dict[str, Any]]:
        if env.type == "nexus.snapshot_request":
            try:
                return "nexus.snapshot", self.nexus.snapshot()
            except NotReady as e:
                raise RemoteError("warming_up", str(e)) from None
        if env.type == "nexus.where":
            app, node = env.body.get("app"), env.body.get("node")
            if (app is None) == (node is None):
                raise RemoteError("invalid", "nexus.where needs exactly one of app or node")
            try:
                if app is not None:
                    return "nexus.location", self.nexus.where_app(app)
                assert node is not None  # exactly one of the two, checked above
                return "nexus.location", self.nexus.where_node(node)
            except NotFound as e:
                raise RemoteError("not_found", str(e)) from None
        if env.type == "nexus.status":
            return "nexus.status_reply", self.nexus.status()
        raise RemoteError("unsupported", f"a nexus does not answer {env.type}")

    # -- store ----------------------------------------------------------------

    def _timed_refresh(self) -> Deferred[None]:
        return self.refresh()

    def refresh_soon(self) -> None:
        """Read the store early (a heartbeat named an app or release not read yet)."""
        if self._soon is not None or not self.running:
            return
        now = self.reactor.seconds()
        last = self._last_refresh if self._last_refresh is not None else now - self.store_refresh
        delay = max(0.0, last + self.store_refresh_min - now)
        self._soon = self.reactor.callLater(delay, self._refresh_now)

    def _refresh_now(self) -> None:
        self._soon = None
        self.refresh()

    def refresh(self) -> Deferred[None]:
        """Read the store once (coalesced: one read at a time, then one more if asked)."""
        if self._refreshing:
            self._refresh_again = True
            return Deferred.fromCoroutine(_noop())
        return ensureDeferred(self._refresh())

    async def _refresh(self) -> None:
        self._refreshing = True
        try:
            while True:
                self._refresh_again = False
                self._last_refresh = self.reactor.seconds()
                try:
                    store: RoutingStore = await self._get_store()
                    view = await load_view(store, self.domain, self.reactor.seconds(),
                                           self.release_options, self.nexus.view)
                except Exception as e:
                    self.nexus.counters["store_errors"] += 1
                    self.log.error("nexus: cannot read the store ({error}); keeping what was "
                                   "read before", error=str(e) or type(e).__name__)
                    return
                if not self.running:
                    return
                self.nexus.set_view(view)
                if not self._refresh_again:
                    return
        finally:
            self._refreshing = False


async def _noop() -> None:
    return None


#: Seconds the router waits for an api node's first response byte: above the api's
#: longest wait on a runner (120 s), below which the api answers or times out itself.
PLATFORM_FIRST_BYTE_TIMEOUT = 300.0


def platform_facts(api: ApiSettings, domain: str) -> AppFacts | None:
    """The platform's own route, as the routers serve it (None: ``api.hostname = off``):
    its hostname, and route options that let the api's own limits decide -- a deploy
    tarball (``api.max_upload_mb``) passes the router's body limit, and a request the
    api waits on a runner for (an add-on's snapshot or restore: up to 120 s) is not cut
    off by the router's ``first_byte_timeout`` (:data:`PLATFORM_FIRST_BYTE_TIMEOUT`).
    Websockets (log tails, ``epio run``) keep the router's ``websocket_idle_timeout``."""
    hostname = platform_hostname(api.hostname, domain)
    if not hostname:
        return None
    options = {"max_body_size": api.max_upload_mb * 1024 * 1024 + (1 << 20),
               "first_byte_timeout": PLATFORM_FIRST_BYTE_TIMEOUT}
    return AppFacts(name=PLATFORM_APP, hostnames=(hostname,),
                    releases={PLATFORM_RELEASE: options})


def make_service(node: Node) -> NexusService:
    """The nexus role of ``node``: its composition root (everything is built here,
    once, and handed on through constructors)."""
    store_service = node.store_service

    async def read_store() -> RoutingStore:
        if store_service is None:
            raise RuntimeError("this node has no store service")
        return await store_service.whenReady()

    def get_store() -> Deferred[RoutingStore]:
        return Deferred.fromCoroutine(read_store())

    from epio.metrics import registry_for

    svc = NexusService(node.reactor, node.bus, node.settings.nexus, get_store,
                       domain=node.settings.node.domain,
                       platform=platform_facts(node.settings.api, node.settings.node.domain))
    registry = registry_for(node)
    registry.add_status("nexus", svc.nexus.status)
    registry.add_collector(lambda: app_state_families(svc.nexus.app_states()))
    return svc


def app_state_families(states: dict[str, int]) -> list[Any]:
    """``epio_apps{state="awake"|"asleep"}``: the routed apps by whether they sleep."""
    from epio.metrics import Family

    return [Family("epio_apps", "gauge",
                   "Routed apps by state: awake (a backend), asleep ([http] idle_sleep; "
                   "a request wakes it)",
                   [("", {"state": s}, float(n)) for s, n in sorted(states.items())])]
