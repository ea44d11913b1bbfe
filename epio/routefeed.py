"""The router side of the nexus: keeps a :class:`~epio.routing.RouteTable` current.

A router subscribes to **every** configured nexus (``cluster.nexus[*].publish``)
and asks each one for a full snapshot (``cluster.nexus[*].router``):

- at start, whenever a version gap shows (a delta whose ``prev_version`` is not
  the version held, or a keepalive announcing a newer version than held), and
  when a nexus restarted (a new ``nexus_id``);
- deltas that arrive while a snapshot is on its way are buffered and applied
  after it when they follow on from its version.

The tables of the live nexuses are **merged** app by app (union of hostnames
and backends, maintenance if any says so), so losing any one nexus changes
nothing.  A nexus silent for ``nexus.feed_timeout`` leaves the merge.  When
*every* nexus is silent the feed keeps the last merged table, logs that it is
stale and says so in :meth:`RouteFeed.status` (``stale: true``, ``since``);
the first nexus that answers again replaces it with a fresh table.

:class:`RouteFeed` is the logic on a clock (no sockets; the snapshot request
is injected); it hands merged routes, as wire dicts, to a sink: a
:class:`TableSink` over the router's :class:`~epio.routing.RouteTable`, or the
feed process's publisher (:mod:`epio.lb.feed`).  :class:`NexusRouteSource`
wires it to the bus and implements :class:`epio.routing.IRouteSource` for the
``lb`` role.  This module is on the
shared floor because the router uses it and roles must not import roles.

Each nexus's :class:`NexusLink` holds two small state machines (``TABLE`` and
``SNAPSHOT``: every other move raises :class:`InvalidTransition`)::

    table:     NONE --snapshot--> LIVE --silent for feed_timeout--> NONE

    snapshot:  IDLE --ask--> ASKING --ask--> ASKING_AGAIN
               ASKING, ASKING_AGAIN --answer--> IDLE   (ASKING_AGAIN then asks again)
               ASKING, ASKING_AGAIN --failure--> RETRY --snapshot_retry / ask--> ASKING
               ASKING, ASKING_AGAIN, RETRY --failure or stop, once stopped--> IDLE

A link has a usable table (a ``version``) exactly while its table is LIVE.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol

from attrs import define, field
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from epio.basicauth import BasicAuth
from epio.bus.errors import RemoteError
from epio.routing import (
    Backend,
    InvalidTransition,
    IRouteSource,
    LazyRoute,
    Route,
    RouteDelta,
    RouteTable,
)

if TYPE_CHECKING:
    from epio.node import Node

# Route options a nexus may send and their types (see epio.routing.Route).
OPTION_KEYS: dict[str, tuple[type, ...]] = {
    "max_body_size": (int,),
    "connect_timeout": (int, float),
    "first_byte_timeout": (int, float),
    "idle_timeout": (int, float),
    "websocket_idle_timeout": (int, float),
    "hsts_max_age": (int,),
}

# Route options that are true or false.
BOOL_OPTION_KEYS = ("request_buffering", "https_redirect", "gzip")  # docs/router.md, https.md

# While stale, the log says so again every this many seconds.
STALE_REMINDER = 30.0

SnapshotRequest = Callable[["NexusLink"], "Deferred[Any]"]


class BadRoute(ValueError):
    """A route from a nexus that cannot be used."""


def route_from_wire(
    data: Mapping[str, Any], known: Mapping[tuple[Any, ...], Backend] | None = None,
    made: dict[tuple[Any, ...], Backend] | None = None,
) -> Route:
    """A wire route (PROTOCOL.md) as a :class:`epio.routing.Route`, or raise BadRoute.

    ``known`` maps :func:`backend_key` to Backends made before: those are
    reused, so a route where one backend of many changed costs one new object.
    ``made``, when given, receives the same mapping for this route's backends
    (the ``known`` of its next version).
    """
    app = data.get("app")
    if not (isinstance(app, str) and app):
        raise BadRoute("route without an app name")
    hostnames = data.get("hostnames", [])
    if not isinstance(hostnames, list) or not all(isinstance(h, str) and h for h in hostnames):
        raise BadRoute(f"route {app}: hostnames must be a list of names")
    raw_backends = data.get("backends", [])
    if not isinstance(raw_backends, list):
        raise BadRoute(f"route {app}: backends must be a list")
    backends = []
    for b in raw_backends:
        if not isinstance(b, dict):
            raise BadRoute(f"route {app}: a backend is not a map")
        key = backend_key(b)
        try:
            hash(key)
        except TypeError:  # an unhashable value (a list, a map): no nexus sends that
            raise BadRoute(f"route {app}: a backend has a value that is not a scalar") from None
        backend = known.get(key) if known is not None else None
        if backend is not None:
            backends.append(backend)
            if made is not None:
                made[key] = backend
            continue
        host, port = b.get("host"), b.get("port")
        if not (isinstance(host, str) and host) or not isinstance(port, int) \
                or isinstance(port, bool) or not 0 < port < 65536:
            raise BadRoute(f"route {app}: backend needs host and port 1..65535")
        release = b.get("release")
        backend = Backend(
            host=host, port=port, instance_id=str(b.get("instance_id") or f"{host}:{port}"),
            app=app, release="" if release is None else str(release),
            state=str(b.get("state") or "healthy"),
        )
        backends.append(backend)
        if made is not None:
            made[key] = backend
    options = data.get("options")
    kw: dict[str, Any] = {}
    if options and isinstance(options, Mapping):
        for key_name, kinds in OPTION_KEYS.items():
            value = options.get(key_name)
            if isinstance(value, int | float) and not isinstance(value, bool) and value > 0 \
                    and isinstance(value, kinds):
                kw[key_name] = value
        for key_name in BOOL_OPTION_KEYS:
            value = options.get(key_name)
            if isinstance(value, bool):
                kw[key_name] = value
        if "basic_auth" in options:
            # fail closed: a protected app whose credentials cannot be read is not routed
            auth = BasicAuth.from_wire(options["basic_auth"])
            if auth is None:
                raise BadRoute(f"route {app}: basic_auth is not a realm and hashed users")
            kw["basic_auth"] = auth
    prefixes = data.get("static_prefixes")
    static = data.get("static_backends")
    if prefixes and static and isinstance(prefixes, list) and isinstance(static, list):
        kw["static_prefixes"] = tuple(
            p for p in prefixes if isinstance(p, str) and p.startswith("/"))
        kw["static_backends"] = tuple(
            Backend(host=b["host"], port=b["port"], instance_id=f"static {b['host']}:{b['port']}",
                    app=app)
            for b in static if isinstance(b, dict) and isinstance(b.get("host"), str)
            and b["host"] and isinstance(b.get("port"), int) and not isinstance(b["port"], bool)
            and 0 < b["port"] < 65536)
    asleep = data.get("asleep")
    if isinstance(asleep, Mapping) and not backends:
        wake = asleep.get("wake")
        if isinstance(wake, list):
            kw["wake"] = tuple(w for w in wake if isinstance(w, str) and w)
        since = asleep.get("since")
        if isinstance(since, int | float) and not isinstance(since, bool):
            kw["asleep_since"] = float(since)
    return Route(app=app, hostnames=hostnames, backends=backends,
                 maintenance=bool(data.get("maintenance", False)), **kw)


def backend_key(b: Mapping[str, Any]) -> tuple[Any, ...]:
    """What identifies a wire backend for reuse of its :class:`Backend`."""
    try:  # every key is there in what a nexus sends: one fast path
        return (b["instance_id"], b["host"], b["port"], b["release"], b["state"])
    except KeyError:
        return (b.get("instance_id"), b.get("host"), b.get("port"), b.get("release"),
                b.get("state"))


def merge_routes(routes: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One app's route from several nexuses: union of hostnames and backends.

    Maintenance holds if any nexus says so (a nexus whose store view is a
    refresh behind must not take an app out of maintenance early); options come
    from the first nexus that has any.
    """
    first = routes[0]
    if all(r == first for r in routes[1:]):  # the usual case: the nexuses agree
        return dict(first)
    hostnames: dict[str, None] = {}
    backends: dict[tuple[Any, Any, Any], Mapping[str, Any]] = {}
    options: Mapping[str, Any] = {}
    maintenance = False
    prefixes: dict[str, None] = {}
    static: dict[tuple[Any, Any], Mapping[str, Any]] = {}
    for r in routes:
        for h in r.get("hostnames", ()):
            hostnames[h] = None
        for b in r.get("backends", ()):
            backends.setdefault((b.get("instance_id"), b.get("host"), b.get("port")), b)
        maintenance = maintenance or bool(r.get("maintenance"))
        if not options and r.get("options"):
            options = r["options"]
        for p in r.get("static_prefixes") or ():
            prefixes[p] = None
        for b in r.get("static_backends") or ():
            if isinstance(b, Mapping):
                static.setdefault((b.get("host"), b.get("port")), b)
    merged = {
        "app": routes[0]["app"],
        "hostnames": sorted(hostnames),
        "backends": [backends[k] for k in sorted(backends, key=lambda k: tuple(map(str, k)))],
        "maintenance": maintenance,
        "options": dict(options),
    }
    if prefixes and static:
        merged["static_prefixes"] = sorted(prefixes)
        merged["static_backends"] = [static[k] for k in sorted(static, key=lambda k: str(k))]
    asleep = [r["asleep"] for r in routes if isinstance(r.get("asleep"), Mapping)]
    if asleep and not backends:  # asleep while no nexus knows a backend
        merged["asleep"] = {
            "since": min(float(a.get("since") or 0) for a in asleep),
            "wake": sorted({w for a in asleep for w in a.get("wake") or () if isinstance(w, str)}),
        }
    return merged


class RouteSink(Protocol):
    """Where a :class:`RouteFeed` puts the merged routes: a :class:`TableSink` (the
    proxy's table), or the route feed process's publisher to its routers."""

    def replace(self, routes: list[dict[str, Any]]) -> None:
        """The whole table."""

    def apply(self, upsert: list[dict[str, Any]], remove: list[str]) -> None:
        """Routes set (whole routes, by app) and apps removed."""


class TableSink:
    """Merged wire routes into a :class:`~epio.routing.RouteTable` (the proxy's).

    Backends that did not change keep their :class:`Backend` objects (and with
    them the proxy's pools and ejection state).  A route that cannot be used is
    counted in ``counters["bad_routes"]``, logged and left out.
    """

    log = Logger()

    def __init__(self, table: RouteTable, counters: Counter[str] | None = None,
                 lazy: bool = False) -> None:
        self.table = table
        self.counters: Counter[str] = Counter() if counters is None else counters
        # app -> backend_key -> Backend of the route last built for the table
        self._known: dict[str, dict[tuple[Any, ...], Backend]] = {}
        # lazy: hand the table LazyRoutes, each built by the first lookup that finds it
        # (the route feed process's routers: most changed apps get no request before
        # they change again).  A lazy route whose backends turn out unusable drops
        # the app (an eager one keeps the app's last usable route).
        self.lazy = lazy

    def replace(self, routes: Iterable[Mapping[str, Any]]) -> None:
        """The whole table."""
        build = self.building()
        for r in routes:
            build.add(r)
        build.commit()

    def building(self) -> TableBuild:
        """A whole table built route by route (in slices), swapped in by ``commit()``."""
        return TableBuild(self)

    def swap(self, routes: list[Any], known: dict[str, dict[tuple[Any, ...], Backend]]) -> None:
        """Replace the table with ``routes`` (a :class:`TableBuild`'s), whose Backends
        are ``known``."""
        self._known = known
        self.table.replace(routes)

    def apply(self, upsert: Iterable[Mapping[str, Any]], remove: Iterable[str]) -> None:
        """Routes set (whole routes, by app) and apps removed."""
        remove = tuple(remove)
        known = self._known
        for app in remove:
            known.pop(app, None)
        routes: list[Any] = []
        for r in upsert:
            route = self._lazy(r) if self.lazy else self._route(r, known, known)
            if route is not None:
                routes.append(route)
        self.table.apply(RouteDelta(upsert=tuple(routes), remove=remove))

    def _lazy(self, r: Mapping[str, Any]) -> LazyRoute | None:
        app, hostnames = r.get("app"), r.get("hostnames", [])
        if not (isinstance(app, str) and app) or not isinstance(hostnames, list) \
                or not all(isinstance(h, str) and h for h in hostnames):
            self.counters["bad_routes"] += 1
            self.log.warn("route from a nexus ignored: {error}",
                          error=f"route {app!r}: needs an app name and a list of hostnames")
            return None
        return LazyRoute(app, hostnames, lambda: self._route(r, self._known, self._known))

    def _route(self, r: Mapping[str, Any], known: dict[str, dict[tuple[Any, ...], Backend]],
               into: dict[str, dict[tuple[Any, ...], Backend]]) -> Route | None:
        app = r.get("app")
        made: dict[tuple[Any, ...], Backend] = {}
        try:
            route = route_from_wire(r, known.get(app) if isinstance(app, str) else None, made)
        except BadRoute as e:
            self.counters["bad_routes"] += 1
            self.log.warn("route from a nexus ignored: {error}", error=str(e))
            return None
        into[route.app] = made
        return route


class TableBuild:
    """A new table for a :class:`TableSink`, built route by route; see ``building()``."""

    def __init__(self, sink: TableSink) -> None:
        self.sink = sink
        self.routes: list[Any] = []  # Route, or LazyRoute with a lazy sink
        self.known: dict[str, dict[tuple[Any, ...], Backend]] = {}

    def add(self, route: Mapping[str, Any]) -> None:
        sink = self.sink
        made = sink._lazy(route) if sink.lazy else sink._route(route, sink._known, self.known)
        if made is not None:
            self.routes.append(made)

    def commit(self) -> None:
        """Swap the built table in, in one step."""
        sink = self.sink
        if sink.lazy:  # built later: keep the Backends of the apps still there
            apps = {r.app for r in self.routes}
            self.known = {app: m for app, m in sink._known.items() if app in apps}
        sink.swap(self.routes, self.known)


class Table(Enum):
    """Whether a link has a table of its nexus to merge."""

    NONE = "none"  # no usable table: a snapshot comes first
    LIVE = "live"  # a table, and its nexus heard within nexus.feed_timeout


class Snapshot(Enum):
    """A link's snapshot request (at most one on its way)."""

    IDLE = "idle"
    ASKING = "asking"  # a request on its way
    ASKING_AGAIN = "asking again"  # on its way, and another wanted once it ends
    RETRY = "retry"  # the last one failed: asking again after nexus.snapshot_retry


TABLE: dict[Table, frozenset[Table]] = {
    Table.NONE: frozenset({Table.LIVE}),
    Table.LIVE: frozenset({Table.NONE}),
}
SNAPSHOT: dict[Snapshot, frozenset[Snapshot]] = {
    Snapshot.IDLE: frozenset({Snapshot.ASKING}),
    Snapshot.ASKING: frozenset({Snapshot.ASKING_AGAIN, Snapshot.IDLE, Snapshot.RETRY}),
    Snapshot.ASKING_AGAIN: frozenset({Snapshot.IDLE, Snapshot.RETRY}),
    Snapshot.RETRY: frozenset({Snapshot.ASKING, Snapshot.IDLE}),
}


@define(eq=False)
class NexusLink:
    """What the feed knows about one nexus (one entry of ``cluster.nexus``); its two
    state machines are drawn in the module docstring."""

    name: str
    router: str
    publish: str
    nexus_id: str | None = None
    version: int | None = None  # the table's version while LIVE, else None
    routes: dict[str, dict[str, Any]] = field(factory=dict)
    table: Table = Table.NONE
    snapshot: Snapshot = Snapshot.IDLE
    last_heard: float | None = None
    buffered: list[dict[str, Any]] = field(factory=list)
    silence: IDelayedCall | None = None
    retry: IDelayedCall | None = None
    counters: Counter[str] = field(factory=Counter)
    failures_in_row: int = 0

    @property
    def alive(self) -> bool:
        """It has a table and was heard within the timeout."""
        return self.table is Table.LIVE

    @property
    def pending(self) -> bool:
        """A snapshot request is on its way."""
        return self.snapshot is Snapshot.ASKING or self.snapshot is Snapshot.ASKING_AGAIN

    def to_table(self, new: Table) -> None:
        if new is not self.table:
            if new not in TABLE[self.table]:
                raise InvalidTransition(f"{self.name}: table {self.table.value} -> {new.value}")
            self.table = new

    def to_snapshot(self, new: Snapshot) -> None:
        if new is not self.snapshot:
            if new not in SNAPSHOT[self.snapshot]:
                raise InvalidTransition(
                    f"{self.name}: snapshot {self.snapshot.value} -> {new.value}")
            self.snapshot = new

    def status(self, now: float) -> dict[str, Any]:
        return {
            "name": self.name,
            "router": self.router,
            "publish": self.publish,
            "nexus_id": self.nexus_id,
            "version": self.version,
            "alive": self.alive,
            "age": None if self.last_heard is None else max(0.0, now - self.last_heard),
            "routes": len(self.routes),
            "counters": dict(self.counters),
        }


class RouteFeed:
    """Merges the route tables of several nexuses into one :class:`RouteTable`."""

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        links: Iterable[NexusLink],
        request_snapshot: SnapshotRequest,
        *,
        feed_timeout: float = 2.0,
        snapshot_retry: float = 0.5,
    ) -> None:
        self._clock = clock
        self.links = list(links)
        self._request = request_snapshot
        self.feed_timeout = feed_timeout
        self.snapshot_retry = snapshot_retry
        self.sink: RouteSink | None = None
        self.merged: dict[str, dict[str, Any]] = {}
        self.stale = False
        self.stale_since: float | None = None
        self.started_at: float | None = None
        self.ever_live = False
        self._stale_logged = 0.0
        self.counters: Counter[str] = Counter()
        self._running = False
        # called after a nexus joined or left the merge (the feed process tells its
        # routers at once rather than at its next status): see observe_state()
        self._state_observers: list[Callable[[], None]] = []
        self._live_waiters: list[Deferred[None]] = []

    # -- life -----------------------------------------------------------------

    def start(self, sink: RouteSink) -> None:
        """Follow the nexuses; merged changes go to ``sink`` (see :class:`TableSink`)."""
        self.sink = sink
        self._running = True
        self.started_at = self._clock.seconds()
        if self.merged:
            sink.replace(list(self.merged.values()))
        for link in self.links:
            self._arm_silence(link)
            self.request_snapshot(link)

    def when_live(self) -> Deferred[None]:
        """Fires once the feed has had a table from a nexus (at once if it has)."""
        d: Deferred[None] = Deferred()
        if self.ever_live:
            d.callback(None)
        else:
            self._live_waiters.append(d)
        return d

    def stop(self) -> None:
        self._running = False
        for link in self.links:
            for call in (link.silence, link.retry):
                if call is not None and call.active():
                    call.cancel()
            link.silence = link.retry = None
            if link.snapshot is Snapshot.RETRY:
                link.to_snapshot(Snapshot.IDLE)

    def add_link(self, link: NexusLink) -> None:
        """Follow one more nexus (it joined the cluster: epio.cluster); it enters the
        merge with its first snapshot."""
        self.links.append(link)
        if self._running:
            self._arm_silence(link)
            self.request_snapshot(link)

    def remove_link(self, link: NexusLink) -> None:
        """Stop following a nexus (it left the cluster); its routes leave the merge
        (unless it was the only live one: then the last table is kept, as when every
        nexus is silent)."""
        if not self._has(link):
            return
        self.links = [x for x in self.links if x is not link]
        for call in (link.silence, link.retry):
            if call is not None and call.active():
                call.cancel()
        link.silence = link.retry = None
        was_alive = link.alive
        link.to_table(Table.NONE)
        link.routes = {}
        if was_alive:
            self._remerge(None)
            self._state_changed()

    def _has(self, link: NexusLink) -> bool:
        return any(x is link for x in self.links)

    def refresh(self) -> None:
        """Ask every nexus for a fresh snapshot (SIGHUP)."""
        for link in self.links:
            self.request_snapshot(link)

    # -- messages from a nexus ---------------------------------------------------

    def on_message(self, link: NexusLink, type: str, body: Mapping[str, Any]) -> None:
        """A ``nexus.delta`` or ``nexus.keepalive`` from ``link``'s publisher."""
        if not self._running or not self._has(link):
            return
        nexus_id = body.get("nexus_id")
        version = body.get("version")
        if not isinstance(nexus_id, str) or not isinstance(version, int):
            self.counters["malformed"] += 1
            return
        link.last_heard = self._clock.seconds()
        self._arm_silence(link)
        if nexus_id != link.nexus_id:
            if type == "nexus.delta":
                link.buffered.append(dict(body))
            if not link.pending:
                if link.nexus_id is not None:
                    self.log.info(
                        "{name}: nexus restarted ({old} -> {new}); taking a snapshot",
                        name=link.name, old=link.nexus_id, new=nexus_id,
                    )
                    link.counters["restarts"] += 1
                self.request_snapshot(link)
            return
        if type == "nexus.keepalive":
            if link.pending:
                return
            if link.version is not None and version > link.version:
                self._gap(link, f"keepalive at version {version}, holding {link.version}")
                self.request_snapshot(link)
            elif not link.alive:
                self.request_snapshot(link)
            return
        if type != "nexus.delta":
            return
        if link.pending or link.version is None:  # not LIVE, or a snapshot due
            link.buffered.append(dict(body))
            if not link.pending:
                self.request_snapshot(link)
            return
        prev = body.get("prev_version")
        if version <= link.version:
            link.counters["duplicates"] += 1
            return
        if prev != link.version:
            self._gap(link, f"delta {prev}->{version}, holding {link.version}")
            link.buffered.append(dict(body))
            self.request_snapshot(link)
            return
        changed = self._apply_delta(link, body)
        self._remerge(changed)

    def _gap(self, link: NexusLink, what: str) -> None:
        link.counters["gaps"] += 1
        self.counters["gaps"] += 1
        self.log.warn("{name}: version gap ({what}); taking a snapshot", name=link.name, what=what)

    def _apply_delta(self, link: NexusLink, body: Mapping[str, Any]) -> set[str]:
        changed: set[str] = set()
        changes = body.get("changes")
        for change in changes if isinstance(changes, list) else ():
            if not isinstance(change, dict) or not isinstance(change.get("app"), str):
                link.counters["bad_changes"] += 1
                continue
            app = change["app"]
            if change.get("op") == "set" and isinstance(change.get("route"), dict):
                link.routes[app] = dict(change["route"])
            elif change.get("op") == "remove":
                link.routes.pop(app, None)
            else:
                link.counters["bad_changes"] += 1
                continue
            changed.add(app)
        link.version = body["version"]
        link.counters["deltas"] += 1
        return changed

    # -- snapshots ------------------------------------------------------------------

    def request_snapshot(self, link: NexusLink) -> None:
        """Ask ``link`` for its whole table (once at a time)."""
        if not self._running:
            return
        if link.pending:
            link.to_snapshot(Snapshot.ASKING_AGAIN)
            return
        if link.retry is not None and link.retry.active():
            link.retry.cancel()
        link.retry = None
        link.to_snapshot(Snapshot.ASKING)
        link.counters["snapshot_requests"] += 1
        try:
            d = self._request(link)
        except Exception:
            d = Deferred()
            d.errback(Failure())
        d.addCallbacks(
            lambda body: self._snapshot(link, body),
            lambda f: self._snapshot_failed(link, f),
        )
        d.addErrback(lambda f: self.log.failure("{name}: snapshot handling failed", f,
                                                name=link.name))

    def _snapshot_failed(self, link: NexusLink, f: Failure) -> None:
        link.buffered = []  # bounded: only deltas of one snapshot wait are kept
        if not self._running or not self._has(link):
            link.to_snapshot(Snapshot.IDLE)
            return
        link.to_snapshot(Snapshot.RETRY)
        link.counters["snapshot_failures"] += 1
        link.failures_in_row += 1
        warming = f.check(RemoteError) is not None and getattr(f.value, "code", "") == "warming_up"
        if warming and link.failures_in_row < 10:
            pass  # a nexus that just started: normal, it answers in a moment
        elif link.failures_in_row in (1, 10) or link.failures_in_row % 100 == 0:
            self.log.info(
                "{name}: no snapshot from {router}: {error}; retrying every {delay:g}s "
                "({count} failed in a row)", name=link.name, router=link.router,
                error=f.getErrorMessage(), delay=self.snapshot_retry, count=link.failures_in_row,
            )
        link.retry = self._clock.callLater(self.snapshot_retry, self._retry, link)

    def _retry(self, link: NexusLink) -> None:
        link.retry = None
        self.request_snapshot(link)

    def _snapshot(self, link: NexusLink, body: Mapping[str, Any]) -> None:
        again = link.snapshot is Snapshot.ASKING_AGAIN
        if not self._running or not self._has(link):  # stopped, or the nexus left
            link.to_snapshot(Snapshot.IDLE)
            return
        nexus_id, version, routes = body.get("nexus_id"), body.get("version"), body.get("routes")
        if not isinstance(nexus_id, str) or not isinstance(version, int) \
                or not isinstance(routes, list):
            self._snapshot_failed(link, Failure(ValueError("malformed nexus.snapshot")))
            return
        link.to_snapshot(Snapshot.IDLE)
        link.counters["snapshots"] += 1
        link.failures_in_row = 0
        link.nexus_id = nexus_id
        link.version = version
        link.routes = {r["app"]: dict(r) for r in routes
                       if isinstance(r, Mapping) and isinstance(r.get("app"), str)}
        link.last_heard = self._clock.seconds()
        self._arm_silence(link)
        buffered, link.buffered = link.buffered, []
        for delta in sorted(buffered, key=lambda b: b.get("version", 0)):
            if delta.get("nexus_id") != nexus_id or delta["version"] <= link.version:
                continue
            if delta.get("prev_version") != link.version:
                self._gap(link, f"buffered delta {delta.get('prev_version')}->"
                                f"{delta['version']}, holding {link.version}")
                again = True
                break
            self._apply_delta(link, delta)
        was_alive = link.alive
        link.to_table(Table.LIVE)
        self.ever_live = True
        waiters, self._live_waiters = self._live_waiters, []
        for d in waiters:
            if not d.called:  # a waiter that gave up (cancelled) is gone
                d.callback(None)
        if self.stale:
            self.log.info(
                "{name} answers again: the route table is fresh ({routes} routes; it was "
                "stale for {secs:.1f}s)", name=link.name, routes=len(link.routes),
                secs=self._clock.seconds() - (self.stale_since or self._clock.seconds()),
            )
            self.stale = False
            self.stale_since = None
        elif not was_alive:
            self.log.info("{name}: following nexus {nexus_id} at version {version} "
                          "({routes} routes)", name=link.name, nexus_id=nexus_id,
                          version=version, routes=len(link.routes))
        self._remerge(None)
        self._state_changed()
        if again and link.snapshot is Snapshot.IDLE:  # none asked meanwhile
            self.request_snapshot(link)

    def observe_state(self, observer: Callable[[], None]) -> None:
        """Call ``observer()`` whenever a nexus joins or leaves the merge."""
        self._state_observers.append(observer)

    def _state_changed(self) -> None:
        for observer in self._state_observers:
            try:
                observer()
            except Exception:
                self.log.failure("route feed state observer failed")

    # -- liveness ---------------------------------------------------------------------

    def _arm_silence(self, link: NexusLink) -> None:
        if link.silence is not None and link.silence.active():
            link.silence.reset(self.feed_timeout)
        else:
            link.silence = self._clock.callLater(self.feed_timeout, self._silent, link)

    def _silent(self, link: NexusLink) -> None:
        link.silence = None
        if not self._running:
            return
        was_alive = link.alive
        link.to_table(Table.NONE)
        link.version = None  # whatever it says next, take a snapshot first
        link.buffered = []
        if was_alive:
            link.counters["silences"] += 1
            self.log.warn("{name} ({publish}) silent for {secs:g}s: left the route merge",
                          name=link.name, publish=link.publish, secs=self.feed_timeout)
        if any(other.alive for other in self.links):
            link.routes = {}
            self._remerge(None)
        elif self.stale:
            now = self._clock.seconds()
            if now - self._stale_logged >= STALE_REMINDER:
                self._stale_logged = now
                self.log.warn(
                    "every nexus is still silent: serving the route table of {since:.3f} "
                    "({secs:.0f}s old, {routes} routes)", since=self.stale_since or 0.0,
                    secs=now - (self.stale_since or now), routes=len(self.merged),
                )
        elif self.ever_live:
            self.stale = True
            self._stale_logged = self._clock.seconds()
            heard = [x.last_heard for x in self.links if x.last_heard is not None]
            self.stale_since = max(heard) if heard else self.started_at
            self.counters["stale"] += 1
            self.log.warn(
                "every nexus is silent: serving the last route table ({routes} routes) "
                "as it was; stale since {since:.3f}",
                routes=len(self.merged), since=self.stale_since or 0.0,
            )
        self._arm_silence(link)  # keep asking: a nexus that comes back is noticed
        if was_alive:
            self._state_changed()
        if not link.pending:
            self.request_snapshot(link)

    # -- merging ---------------------------------------------------------------------

    def _remerge(self, apps: set[str] | None) -> None:
        """Recompute the merged routes of ``apps`` (None: all) and push changes."""
        alive = [link for link in self.links if link.alive]
        if not alive:
            return  # keep the last table
        if apps is None:
            apps = set(self.merged)
            for link in alive:
                apps.update(link.routes)
        upsert: list[dict[str, Any]] = []
        remove: list[str] = []
        for app in sorted(apps):
            parts = [link.routes[app] for link in alive if app in link.routes]
            new = merge_routes(parts) if parts else None
            old = self.merged.get(app)
            if new == old:
                continue
            if new is None:
                del self.merged[app]
                remove.append(app)
            else:
                self.merged[app] = new
                upsert.append(new)
        if not upsert and not remove:
            return
        self.counters["updates"] += 1
        if self.sink is not None:
            self.sink.apply(upsert, remove)

    # -- status -----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """For the router's status and logs: ``stale``, ``since``, one entry per nexus."""
        now = self._clock.seconds()
        alive = sum(1 for link in self.links if link.alive)
        return {
            "state": "live" if alive else ("stale" if self.stale else "starting"),
            "stale": self.stale,
            "since": self.stale_since,
            "routes": len(self.merged),
            "alive": alive,
            "nexuses": [link.status(now) for link in self.links],
            "counters": dict(self.counters),
        }


def links_from_config(nexuses: Sequence[Mapping[str, Any]]) -> list[NexusLink]:
    """One :class:`NexusLink` per ``cluster.nexus`` entry (router and publish needed)."""
    links = []
    for i, entry in enumerate(nexuses):
        router, publish = entry.get("router"), entry.get("publish")
        if not (isinstance(router, str) and router and isinstance(publish, str) and publish):
            raise ValueError(f"cluster.nexus[{i}] needs 'router' and 'publish' endpoints")
        links.append(NexusLink(name=f"nexus[{i}]", router=router, publish=publish))
    return links


@implementer(IRouteSource)
class NexusRouteSource:
    """:class:`IRouteSource` fed by every nexus of ``cluster.nexus`` over the bus.

    ``start(table)`` opens one SUB per nexus publisher and one DEALER to the
    nexus routers; ``stop()`` closes them (the table keeps its contents).
    """

    log = Logger()

    def __init__(self, bus: Any, nexuses: Sequence[Mapping[str, Any]], *,
                 feed_timeout: float = 2.0, snapshot_timeout: float = 2.0,
                 snapshot_retry: float = 0.5) -> None:
        self.bus = bus
        links = links_from_config(nexuses)
        self.description = f"nexus feed ({len(links)} nexus{'es' if len(links) != 1 else ''})"
        self.snapshot_timeout = snapshot_timeout
        self.feed = RouteFeed(bus.reactor, links, self._request_snapshot,
                              feed_timeout=feed_timeout, snapshot_retry=snapshot_retry)
        self._services: MultiService | None = None
        self._dealer: Any = None
        self._subs: dict[int, Any] = {}  # id(link) -> its subscriber service

    def start(self, table: RouteTable) -> None:
        self.follow(TableSink(table, self.feed.counters))

    def follow(self, sink: RouteSink) -> None:
        """Follow the nexuses, handing merged routes to ``sink`` (the feed process)."""
        services = MultiService()
        self._dealer = self.bus.dealer([link.router for link in self.feed.links])
        self._dealer.setName("nexus-snapshots")
        self._dealer.setServiceParent(services)
        for link in self.feed.links:
            self._subscribe(link).setServiceParent(services)
        self._services = services
        services.startService()
        self.feed.start(sink)

    def _subscribe(self, link: NexusLink) -> Any:
        def handler(topic: bytes, env: Any) -> None:
            self.feed.on_message(link, env.type, env.body)

        sub = self.bus.subscriber([link.publish], [b"routes"], handler)
        sub.setName(f"nexus-feed-{link.name}")
        self._subs[id(link)] = sub
        return sub

    def set_nexuses(self, nexuses: Sequence[Mapping[str, Any]]) -> None:
        """Follow exactly these nexuses from now on (one joined or left the cluster:
        epio.cluster); entries without a router and a publish endpoint are skipped."""
        wanted = [(str(n["router"]), str(n["publish"])) for n in nexuses
                  if n.get("router") and n.get("publish")]
        for link in list(self.feed.links):
            if (link.router, link.publish) not in wanted:
                self.log.info("{name} ({router}) left the cluster's nexus list: no longer "
                              "followed", name=link.name, router=link.router)
                self.feed.remove_link(link)
                sub = self._subs.pop(id(link), None)
                if sub is not None and sub.parent is not None:
                    sub.disownServiceParent()
                if self._dealer is not None and not any(
                        x.router == link.router for x in self.feed.links):
                    self._dealer.remove_endpoint(link.router)
        have = {(x.router, x.publish) for x in self.feed.links}
        for router, publish in wanted:
            if (router, publish) in have:
                continue
            link = NexusLink(name=f"nexus[{router}]", router=router, publish=publish)
            self.log.info("{name} joined the cluster's nexus list: following it",
                          name=link.name)
            if self._services is not None:
                self._dealer.add_endpoint(router)
                self._subscribe(link).setServiceParent(self._services)
            self.feed.add_link(link)
        self.description = (f"nexus feed ({len(self.feed.links)} nexus"
                            f"{'es' if len(self.feed.links) != 1 else ''})")

    def stop(self) -> None:
        self.feed.stop()
        services, self._services = self._services, None
        if services is not None:
            services.stopService()

    def reload(self) -> None:
        self.feed.refresh()

    def when_ready(self) -> Deferred[None]:
        """Fires with the first table from a nexus (the router listens after it)."""
        return self.feed.when_live()

    def status(self) -> dict[str, Any]:
        return self.feed.status()

    def _request_snapshot(self, link: NexusLink) -> Deferred[Any]:
        d = ensureDeferred(self._dealer.request_to(
            link.router, "nexus.snapshot_request", {}, timeout=self.snapshot_timeout))
        d.addCallback(lambda env: env.body)
        return d


def make_route_source(node: Node) -> NexusRouteSource:
    """The nexus feed of a router node, from ``cluster.nexus`` and the ``nexus`` keys;
    it follows the cluster's nexus list when the node follows the store's
    (``node.cluster``: epio.cluster)."""
    nexus = node.settings.nexus
    source = NexusRouteSource(
        node.bus, node.settings.cluster.nexus,
        feed_timeout=nexus.feed_timeout, snapshot_timeout=nexus.snapshot_timeout,
        snapshot_retry=nexus.snapshot_retry,
    )
    if node.cluster is not None:
        node.cluster.observe(lambda lists: source.set_nexuses(lists.nexus))
    return source
