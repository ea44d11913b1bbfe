"""The nexus's routing table: hostname -> app -> backends, built from two inputs.

- the **store view** (:class:`StoreView`, refreshed periodically): which apps
  exist, their hostnames (``<app>.<platform domain>``, custom domains,
  wildcards), maintenance mode, route options and the releases that may serve;
- the **live instances** (from heartbeats, :mod:`epio.nexus.heartbeats`).

A route (the wire shape of PROTOCOL.md, epio/routing.py turns it into its
value types)::

    {"app": str, "hostnames": [str, ...],
     "backends": [{"instance_id": str, "host": str, "port": int, "state": "healthy",
                   "release": int}, ...],
     "maintenance": bool, "options": {...}}

A backend is an instance that is ``healthy``, of a web process type, with a
host and a port, of one of the app's live releases, and of a release whose
route options the nexus has read from the store (:attr:`AppFacts.releases`).
The route carries one set of options: those of the newest release with a
backend, and only instances of releases with those very options are backends
-- so a backend is never published before its release's options
(``basic_auth`` among them) are known, nor under another release's.
``draining`` instances are left out: the router sends them no new requests
(its in-flight requests hold their own connection and finish).  Every app
known to the store has a route, with no backends when none is healthy (the
router answers 503, not 404).  Apps that run but are unknown to the store get
no route.

A route without backends whose app has ``asleep`` web instances (of a release that
may serve; ``[http] idle_sleep``, docs/apps.md), or that wake (started again by
``runner.wake``, not yet healthy: the heartbeat's ``waking``) is **asleep**: it carries
``"asleep": {"since": float, "wake": [control endpoint, ...], "instances": [id, ...]}``
-- the runners that hold them and the instances, sorted; a router holds the app's
requests and sends ``runner.wake`` there; the api's rollout waits until every nexus
names a new release's asleep instances before it retires the old ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from attrs import field, frozen

from epio.nexus.heartbeats import InstanceInfo

HEALTHY = "healthy"
ASLEEP = "asleep"


@frozen
class AppFacts:
    """What the store says about one app, as far as routing cares.

    ``live_releases`` is the set of release versions whose instances may take
    traffic; ``None``: the store holds no active instance record of the app, and
    only ``releases`` restricts them.  ``releases`` maps each release version
    whose route options (``basic_auth``, ``https_redirect``, ``hsts_max_age``,
    ``gzip``, limits...) have been read from the store to those options: an
    instance of any other release is never a backend, whatever ``live_releases``
    says.
    """

    name: str
    hostnames: tuple[str, ...]
    maintenance: bool = False
    live_releases: frozenset[int] | None = None
    releases: Mapping[int, Mapping[str, Any]] = field(factory=dict, hash=False)

    def may_serve(self, release: int) -> bool:
        """Whether instances of ``release`` may take traffic (live, options read)."""
        return release in self.releases and (
            self.live_releases is None or release in self.live_releases)


@frozen
class StoreView:
    """One consistent read of the store: apps by name, and when it was read."""

    apps: Mapping[str, AppFacts] = field(factory=dict, hash=False)
    loaded_at: float = 0.0


def backend_of(info: InstanceInfo) -> dict[str, Any]:
    return {"instance_id": info.instance_id, "host": info.host, "port": info.port,
            "state": HEALTHY, "release": info.release}


def is_backend(info: InstanceInfo, facts: AppFacts, web_types: frozenset[str]) -> bool:
    """Whether ``info`` may receive new requests for its app on its own: healthy, of
    a web type, with an address, of a release that may serve (see
    :func:`serving` for the route as a whole)."""
    return (
        info.state == HEALTHY
        and info.process_type in web_types
        and info.port is not None
        and bool(info.host)
        and facts.may_serve(info.release)
    )


def serving(facts: AppFacts, instances: Iterable[InstanceInfo], web_types: frozenset[str],
            ) -> tuple[Mapping[str, Any], list[InstanceInfo]]:
    """The route's options and the instances that are its backends.

    The options are those of the newest release with a backend (or, with none,
    of the newest release that may serve; none read: no options); the backends
    are the instances of releases with exactly those options.  A rollover whose
    new release changes the options thus moves the whole route at once, when the
    first new instance is healthy, rather than serving one release under the
    other's options; releases with equal options share it.
    """
    candidates = [i for i in instances if is_backend(i, facts, web_types)]
    if candidates:
        options = facts.releases[max(i.release for i in candidates)]
        return options, [i for i in candidates if facts.releases[i.release] == options]
    known = [r for r in facts.releases if facts.may_serve(r)]
    return (facts.releases[max(known)] if known else {}), []


def build_route(
    facts: AppFacts, instances: Iterable[InstanceInfo], web_types: frozenset[str],
    static_of: Callable[[str, str], Any] | None = None,
    control_of: Callable[[str], str | None] | None = None,
) -> dict[str, Any]:
    """The route of one app: its hostnames, options and backends (sorted).

    With ``static_of(node, app)`` (-> ((host, port), prefixes) or None), the route also
    gets ``static_prefixes`` and ``static_backends``: the static file servers of the
    nodes that run a routable instance of the app (docs/static.md); both keys are
    left out when there are none.
    """
    options, routable = serving(facts, instances, web_types)
    backends = sorted(
        (backend_of(i) for i in routable),
        key=lambda b: (b["instance_id"], b["host"], b["port"]),
    )
    route = {
        "app": facts.name,
        "hostnames": list(facts.hostnames),
        "backends": backends,
        "maintenance": facts.maintenance,
        "options": dict(options),
    }
    if not routable and control_of is not None:
        asleep = asleep_route(facts, instances, web_types, control_of)
        if asleep is not None:
            route["asleep"] = asleep
    if static_of is not None and routable:
        servers: set[tuple[str, int]] = set()
        prefixes: set[str] = set()
        for node in {i.node for i in routable}:
            found = static_of(node, facts.name)
            if found is not None:
                servers.add(found[0])
                prefixes.update(found[1])
        if servers:
            route["static_prefixes"] = sorted(prefixes)
            route["static_backends"] = [{"host": h, "port": p} for h, p in sorted(servers)]
    return route


def asleep_route(facts: AppFacts, instances: Iterable[InstanceInfo], web_types: frozenset[str],
                 control_of: Callable[[str], str | None]) -> dict[str, Any] | None:
    """``{"since", "wake"}`` of an app whose serving web instances are all asleep (the
    runners to wake, by control endpoint), or None."""
    sleeping = [i for i in instances
                if (i.state == ASLEEP or i.waking) and i.process_type in web_types
                and i.port is not None and facts.may_serve(i.release)]
    wake = sorted({c for c in (control_of(i.node) for i in sleeping) if c})
    if not wake:
        return None
    return {"since": min(i.since for i in sleeping), "wake": wake,
            "instances": sorted(i.instance_id for i in sleeping)}


def set_change(route: dict[str, Any]) -> dict[str, Any]:
    """A delta change that (re)places one app's route."""
    return {"op": "set", "app": route["app"], "route": route}


def remove_change(app: str) -> dict[str, Any]:
    """A delta change that removes an app's route."""
    return {"op": "remove", "app": app}


class RouteBook:
    """The versioned table of routes by app, as last published.

    :meth:`update` returns the change (or None when the route is the same);
    the caller bundles the changes of one reactor turn into one delta with
    :meth:`commit`, which bumps the version.
    """

    def __init__(self) -> None:
        self.routes: dict[str, dict[str, Any]] = {}
        self.version = 0

    def update(self, app: str, route: dict[str, Any] | None) -> dict[str, Any] | None:
        old = self.routes.get(app)
        if route is None:
            if old is None:
                return None
            del self.routes[app]
            return remove_change(app)
        if route == old:
            return None
        self.routes[app] = route
        return set_change(route)

    def commit(self) -> tuple[int, int]:
        """Bump the version; return ``(prev_version, version)``."""
        prev = self.version
        self.version += 1
        return prev, self.version

    def snapshot(self) -> list[dict[str, Any]]:
        return [self.routes[app] for app in sorted(self.routes)]
