"""The nexus's logic on a clock, with no sockets: heartbeats in, deltas out.

:class:`Nexus` ties the :class:`~epio.nexus.heartbeats.NodeTracker` (live
instances), the :class:`~epio.nexus.table.StoreView` (apps, hostnames, live
releases) and the :class:`~epio.nexus.table.RouteBook` (the published table)
together:

- every change marks the apps it touches *dirty*; a flush recomputes only those
  routes and publishes a single ``nexus.delta`` with every change since the last
  one.  The first change after a quiet ``delta_interval`` is flushed in the same
  reactor turn (``callLater(0)``); while changes keep coming, deltas leave at
  most once per ``delta_interval``, so route churn costs every router a bounded
  number of messages a second whatever the heartbeat rate;
- ``nexus.keepalive`` is published every ``keepalive_interval`` so routers can
  tell a live nexus from a dead one and detect a lost last delta;
- a freshly started nexus is *warming up* until it has read the store once and
  ``warmup`` seconds have passed (one heartbeat period and a half by
  default): until then it publishes nothing and refuses snapshots, so a
  restarted nexus never tells the routers that the cluster is empty.

Publishing is a callable ``publish(type, body)`` injected by the service.

The platform's own route ("App ID 0 is special", docs/router.md): with ``platform``
(the :class:`~epio.nexus.table.AppFacts` of :data:`epio.domain.PLATFORM_APP`: its
hostname and route options) the table also holds the route of the platform's API and
dashboard, whose backends are the api nodes heard from in ``api.heartbeat`` -- kept by
a second :class:`~epio.nexus.heartbeats.NodeTracker` (``api_nodes``, node ids
``api@NODE``) with the same sequence, boot and expiry rules as the runners'.  The
store's apps never name it (no user may create it); should the store hold an app of
that name anyway, the platform's route wins.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from epio.domain import PLATFORM_APP, PLATFORM_RELEASE
from epio.nexus.heartbeats import INVALID, InstanceInfo, NodeTracker
from epio.nexus.table import AppFacts, RouteBook, StoreView, build_route, serving

Publish = Callable[[str, dict[str, Any]], None]


class NotReady(Exception):
    """The nexus is warming up and cannot answer with a full table yet."""


class NotFound(Exception):
    """A query named an app or node the nexus knows nothing about."""


class Nexus:
    """Heartbeats + store view -> versioned route table and deltas."""

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        nexus_id: str,
        publish: Publish,
        *,
        node_timeout: float = 3.0,
        warmup: float = 1.5,
        delta_interval: float = 0.0,
        web_types: Iterable[str] = ("web",),
        on_store_hint: Callable[[], None] | None = None,
        platform: AppFacts | None = None,
    ) -> None:
        self._clock = clock
        self.nexus_id = nexus_id
        self._publish = publish
        self.warmup = warmup
        self.delta_interval = delta_interval
        self.web_types = frozenset(web_types)
        self._on_store_hint = on_store_hint
        self.tracker = NodeTracker(clock, node_timeout, self._apps_changed)
        self.platform = platform
        self.api_nodes = NodeTracker(clock, node_timeout, self._platform_changed)
        self._warned_platform_app = False
        self.book = RouteBook()
        self.view: StoreView | None = None
        self.ready = False
        self.started_at = clock.seconds()
        self.ready_at: float | None = None
        self.counters: Counter[str] = Counter()
        self._warm = warmup <= 0
        self._warm_call: Any = None
        # the platform's route is in the first table published
        self._dirty: set[str] = {PLATFORM_APP} if platform is not None else set()
        self._flush_call: Any = None
        self._last_change: float | None = None
        self._last_delta: float | None = None  # when the last delta was published

    # -- life -----------------------------------------------------------------

    def start(self) -> None:
        self.started_at = self._clock.seconds()
        if not self._warm:
            self._warm_call = self._clock.callLater(self.warmup, self._warmed)

    def stop(self) -> None:
        for call in (self._warm_call, self._flush_call):
            if call is not None and call.active():
                call.cancel()
        self._warm_call = self._flush_call = None
        self.tracker.stop()
        self.api_nodes.stop()

    def _warmed(self) -> None:
        self._warm_call = None
        self._warm = True
        self._maybe_ready()

    def _maybe_ready(self) -> None:
        if self.ready or not self._warm or self.view is None:
            return
        self._flush()  # bring the book up to date before anyone sees it
        self.ready = True
        self.ready_at = self._clock.seconds()
        self.log.info(
            "nexus {nexus_id} ready: {routes} routes, {nodes} nodes, version {version}",
            nexus_id=self.nexus_id, routes=len(self.book.routes), nodes=len(self.tracker.nodes),
            version=self.book.version,
        )
        self.keepalive()

    # -- inputs ---------------------------------------------------------------

    def heartbeat(self, body: Mapping[str, Any]) -> str:
        """Take one ``runner.heartbeat`` body; return the tracker's outcome."""
        return self.tracker.receive(body)

    def api_heartbeat(self, body: Mapping[str, Any]) -> str:
        """Take one ``api.heartbeat`` body (an api node and where routers reach it);
        return the tracker's outcome (``ignored`` without a platform route)."""
        if self.platform is None:
            self.counters["api_heartbeat_ignored"] += 1
            return "ignored"
        node, host, port = body.get("node_id"), body.get("host"), body.get("port")
        if not (isinstance(node, str) and node and isinstance(host, str) and host
                and isinstance(port, int) and not isinstance(port, bool)
                and 0 < port < 65536):
            self.api_nodes.counters[INVALID] += 1
            return INVALID
        return self.api_nodes.receive({
            "node_id": f"api@{node}", "boot_id": body.get("boot_id"), "seq": body.get("seq"),
            "interval": body.get("interval"),
            "instances": [{"instance_id": f"api@{node}", "app": PLATFORM_APP,
                           "process_type": "web",
                           "state": "draining" if body.get("draining") is True else "healthy",
                           "release": PLATFORM_RELEASE, "host": host, "port": port}],
        })

    def _platform_changed(self, apps: set[str]) -> None:
        self._apps_changed({PLATFORM_APP})

    def set_view(self, view: StoreView) -> None:
        """Install a fresh store view; the apps whose facts changed get recomputed."""
        old = self.view.apps if self.view is not None else {}
        changed = {name for name, facts in view.apps.items() if old.get(name) != facts}
        changed |= {name for name in old if name not in view.apps}
        self.view = view
        if self.platform is not None and PLATFORM_APP in view.apps \
                and not self._warned_platform_app:
            self._warned_platform_app = True
            self.log.warn("the store holds an app named {app}, the platform's own name: the "
                          "platform's route takes its place (rename the app's data to serve "
                          "it)", app=PLATFORM_APP)
        if changed:
            self._apps_changed(changed)
        self._maybe_ready()

    def _apps_changed(self, apps: set[str]) -> None:
        self._dirty |= apps
        if self._flush_call is None:
            delay = 0.0
            if self._last_delta is not None and self.delta_interval > 0:
                # min(): a wall clock set back must not hold changes for longer
                delay = min(self.delta_interval, max(
                    0.0, self._last_delta + self.delta_interval - self._clock.seconds()))
            self._flush_call = self._clock.callLater(delay, self._flush)

    # -- output ---------------------------------------------------------------

    def route_for(self, app: str) -> dict[str, Any] | None:
        """The route ``app`` should have now (None: the store does not know it)."""
        if self.view is None:
            return None
        if app == PLATFORM_APP and self.platform is not None:
            return build_route(self.platform, self.api_nodes.instances_of(app),
                               frozenset({"web"}))
        facts = self.view.apps.get(app)
        if facts is None:
            return None
        route = build_route(facts, self.tracker.instances_of(app), self.web_types,
                            self.tracker.static_of, self.tracker.control_of)
        if self.platform is not None:
            # the platform's hostname is never an app's (a custom domain added before
            # it was reserved would otherwise take the API's requests)
            taken = set(self.platform.hostnames)
            route["hostnames"] = [h for h in route["hostnames"] if h not in taken]
        return route

    def _flush(self) -> None:
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        if self.view is None or not self._dirty:
            return
        dirty, self._dirty = self._dirty, set()
        changes = []
        hint = False
        for app in sorted(dirty):
            route = self.route_for(app)
            if route is None and self.tracker.by_app.get(app):
                self.counters["unknown_app"] += 1
                hint = True
            elif route is not None and app != PLATFORM_APP:
                hint = hint or self._unknown_release(self.view.apps[app], app)
            change = self.book.update(app, route)
            if change is not None:
                changes.append(change)
        if hint and self._on_store_hint is not None:
            self._on_store_hint()
        if not changes:
            return
        prev, version = self.book.commit()
        self._last_change = self._clock.seconds()
        if self.ready:
            self._last_delta = self._last_change
        self.counters["deltas"] += 1
        self.counters["changes"] += len(changes)
        if self.ready:
            self._publish(
                "nexus.delta",
                {"nexus_id": self.nexus_id, "version": version, "prev_version": prev,
                 "changes": changes},
            )

    def _unknown_release(self, facts: AppFacts, app: str) -> bool:
        """A healthy web instance of a release whose options the store view has not
        read (yet): a new release heard before the store lists it, or one the last
        read could not get.  Not for an old release that left the live ones (its
        instances drain)."""
        live = facts.live_releases
        return any(
            i.state == "healthy" and i.process_type in self.web_types
            and i.release not in facts.releases
            and (live is None or i.release in live or i.release > max(live, default=0))
            for i in self.tracker.instances_of(app)
        )

    def keepalive(self) -> None:
        """Publish ``nexus.keepalive`` (only once ready)."""
        if not self.ready:
            return
        self._publish("nexus.keepalive", self.keepalive_body())

    def keepalive_body(self) -> dict[str, Any]:
        return {
            "nexus_id": self.nexus_id,
            "version": self.book.version,
            "routes": len(self.book.routes),
            "nodes": len(self.tracker.nodes),
        }

    def snapshot(self) -> dict[str, Any]:
        """The ``nexus.snapshot`` body: the whole table at the current version."""
        if not self.ready:
            raise NotReady(f"nexus {self.nexus_id} is warming up")
        if self._dirty:
            self._flush()  # a snapshot never lags behind a pending delta
        return {"nexus_id": self.nexus_id, "version": self.book.version,
                "routes": self.book.snapshot()}

    # -- queries --------------------------------------------------------------

    def where_app(self, app: str) -> dict[str, Any]:
        """Where ``app`` runs: its instances, its route, and how fresh that is."""
        now = self._clock.seconds()
        tracker, web_types = self.tracker, self.web_types
        facts = self.view.apps.get(app) if self.view is not None else None
        if app == PLATFORM_APP and self.platform is not None:  # the api nodes
            tracker, web_types, facts = self.api_nodes, frozenset({"web"}), self.platform
        instances: list[InstanceInfo] = sorted(
            tracker.instances_of(app), key=lambda i: (i.node, i.instance_id)
        )
        if facts is None and not instances:
            raise NotFound(f"no app {app!r} is known to this nexus")
        ages = [now - tracker.nodes[n].last_seen for n in {i.node for i in instances}
                if n in tracker.nodes]
        routes = serving(facts, instances, web_types)[1] if facts is not None else []
        routable = {(i.node, i.instance_id) for i in routes}
        out = []
        for info in instances:
            entry = info.as_dict()
            entry["routable"] = (info.node, info.instance_id) in routable
            out.append(entry)
        return {
            "nexus_id": self.nexus_id,
            "app": app,
            "known": facts is not None,
            "instances": out,
            "route": self.book.routes.get(app),
            "age": max(ages, default=0.0),
            "store_age": self.store_age(now),
            "ready": self.ready,
        }

    def where_node(self, node: str) -> dict[str, Any]:
        """What ``node`` runs and when it was last heard of."""
        state = self.tracker.nodes.get(node)
        if state is None:
            raise NotFound(f"no live node {node!r} is known to this nexus")
        now = self._clock.seconds()
        body = state.as_dict(now)
        body.update(nexus_id=self.nexus_id, ready=self.ready, store_age=self.store_age(now))
        return body

    def store_age(self, now: float) -> float | None:
        return None if self.view is None else max(0.0, now - self.view.loaded_at)

    def app_states(self) -> dict[str, int]:
        """Routed apps by state: ``awake`` (a backend), ``asleep`` (every web instance
        asleep or waking: docs/apps.md "Sleeping apps"); the others have neither.  The
        platform's own route (app 0, the api nodes) is not an app here."""
        awake = asleep = 0
        for app, r in self.book.routes.items():
            if app == PLATFORM_APP:
                continue
            if r["backends"]:
                awake += 1
            elif "asleep" in r:
                asleep += 1
        return {"awake": awake, "asleep": asleep}

    def status(self) -> dict[str, Any]:
        """Numbers for logs and a status page."""
        now = self._clock.seconds()
        return {
            "nexus_id": self.nexus_id,
            "ready": self.ready,
            "version": self.book.version,
            "routes": len(self.book.routes),
            "backends": sum(len(r["backends"]) for r in self.book.routes.values()),
            "apps": self.app_states(),
            "nodes": len(self.tracker.nodes),
            "store_age": self.store_age(now),
            "heartbeats": dict(self.tracker.counters),
            "api_nodes": len(self.api_nodes.nodes),
            "api_heartbeats": dict(self.api_nodes.counters),
            "table": dict(self.counters),
        }
