"""Reading what routing needs from the store, in three bulk queries.

- apps (:meth:`Store.list_apps`): every app gets ``<app>.<domain>`` and its
  maintenance flag;
- custom hostnames and wildcards (:meth:`Store.all_hostnames`);
- live releases (:meth:`Store.list_instances`): the releases of the app's
  instances the store holds in an active state (``pending``, ``starting``,
  ``healthy``, ``crashed`` -- still wanted, coming back) are the releases that
  may serve.  During a rollover both the old
  and the new release are there; once the old instances are marked draining or
  stopped only the new one is.  An app with no active instance record has
  ``live_releases = None``: its newest release serves (the only one whose
  options are read, below).

Route options (the router's per-app overrides) come from each release's
``meta`` (:meth:`Store.get_release`): ``timeout`` (first response byte),
``idle_timeout``, ``connect_timeout``, ``websocket_idle_timeout``,
``max_body_size``, ``request_buffering``, ``hsts_max_age``, ``https_redirect``
and ``gzip``, as the manifest's ``[http]`` gives them, and ``basic_auth``.  They
are read per release, for every live release, and kept per release in the app's
facts (:attr:`AppFacts.releases`).  Releases are immutable, so each is read once
and kept in a cache; one refresh spends at most a quarter of ``store_refresh``
reading releases it has not seen, the rest wait for the next refresh.  An app
with no active instance record gets the options of its newest release
(:meth:`Store.latest_release`, read again each refresh, within the same budget).

Options fail closed: they carry ``basic_auth``, so an instance must never be
routed without them.  Only the releases whose options are read are in the facts,
and the table routes no instance of any other release (epio.nexus.table): a
release not read yet (budget spent, the store failed for it, or a heartbeat that
names it before the store lists it) is routed from the read that gets its
options on.  What an earlier view read of a release that may still serve is
kept (releases do not change).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from twisted.internet.interfaces import IReactorTime

from epio.basicauth import BasicAuth
from epio.domain import LIVE_STATES
from epio.nexus.table import AppFacts, StoreView

ACTIVE_STATES = frozenset(LIVE_STATES)


class RoutingStore(Protocol):
    """The part of :class:`epio.store.Store` the nexus reads."""

    async def list_apps(self, for_user: str | None = None) -> list[Any]: ...

    async def all_hostnames(self) -> dict[str, str]: ...

    async def list_instances(self, app: str | None = None,
                             node: str | None = None) -> list[Any]: ...

    async def get_release(self, app: str, version: int) -> Any: ...

    async def latest_release(self, app: str) -> Any: ...


# release meta key -> route option (see epio.routing.Route)
OPTION_META: dict[str, tuple[str, type | tuple[type, ...]]] = {
    "timeout": ("first_byte_timeout", (int, float)),
    "first_byte_timeout": ("first_byte_timeout", (int, float)),
    "idle_timeout": ("idle_timeout", (int, float)),
    "connect_timeout": ("connect_timeout", (int, float)),
    "websocket_idle_timeout": ("websocket_idle_timeout", (int, float)),
    "max_body_size": ("max_body_size", int),
    "hsts_max_age": ("hsts_max_age", int),
}


# release meta keys that are route options as they are, true or false
BOOL_OPTION_META = ("request_buffering", "https_redirect", "gzip")


def options_of(meta: Any) -> dict[str, Any]:
    """Route options from a release's meta (unknown or bad values are left out)."""
    out: dict[str, Any] = {}
    if not isinstance(meta, dict):
        return out
    http = meta.get("http")
    sources: list[dict[str, Any]] = [meta, http if isinstance(http, dict) else {}]
    for src in sources:
        for key, (option, kinds) in OPTION_META.items():
            value: Any = src.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool) and value > 0 \
                    and isinstance(value, kinds):
                out[option] = value
        for key in BOOL_OPTION_META:
            if isinstance(src.get(key), bool):
                out[key] = src[key]
    # [basic_auth] (hashed passwords, epio.basicauth): the router enforces it
    auth = meta.get("basic_auth")
    if isinstance(auth, dict) and BasicAuth.from_wire(auth) is not None:
        out["basic_auth"] = {"realm": auth["realm"], "users": dict(auth["users"])}
    return out


class ReleaseOptions:
    """Route options per (app, release version), read once each (releases are immutable).

    :meth:`get` returns ``None`` for options not read (yet): the caller must not
    take that for "no options".
    """

    def __init__(self, clock: IReactorTime, budget: float) -> None:
        self._clock = clock
        self.budget = budget
        self.cache: dict[tuple[str, int], dict[str, Any]] = {}
        # the newest release of apps with no active instance record, as read by the
        # last fill (re-read each time: a new release may come); None: no release
        self.latest: dict[str, int | None] = {}

    async def fill(self, store: RoutingStore, wanted: set[tuple[str, int]],
                   unplaced: Iterable[str] = ()) -> None:
        """Read the releases in ``wanted`` not cached yet, then the newest release of
        each app in ``unplaced``, within the time budget."""
        deadline = self._clock.seconds() + self.budget
        self.latest = {}
        for key in sorted(wanted - set(self.cache)):
            if self._clock.seconds() > deadline:
                break
            try:
                release = await store.get_release(*key)
            except Exception as e:  # NotFound: the release is gone; others: try next time
                if type(e).__name__ == "NotFound":
                    self.cache[key] = {}
                continue
            self.cache[key] = options_of(getattr(release, "meta", None))
        for app in sorted(unplaced):
            if self._clock.seconds() > deadline:
                break
            try:
                release = await store.latest_release(app)
            except Exception as e:  # NotFound: the app is gone; others: try next time
                if type(e).__name__ == "NotFound":
                    self.latest[app] = None
                continue
            if release is None:
                self.latest[app] = None
                continue
            version = int(release.version)
            self.latest[app] = version
            self.cache.setdefault((app, version), options_of(getattr(release, "meta", None)))
        keep = wanted | {(a, v) for a, v in self.latest.items() if v is not None}
        if len(self.cache) > 4 * max(1, len(keep)):  # forget releases no longer live
            self.cache = {k: v for k, v in self.cache.items() if k in keep}

    def get(self, app: str, version: int) -> dict[str, Any] | None:
        """The options of release ``version`` of ``app``, None if not read yet."""
        return self.cache.get((app, version))

    def newest(self, app: str) -> int | None:
        """The version of ``app``'s newest release as the last fill read it (None: not
        read, or no release)."""
        return self.latest.get(app)


async def load_view(store: RoutingStore, domain: str, now: float,
                    options: ReleaseOptions,
                    previous: StoreView | None = None) -> StoreView:
    """One :class:`StoreView` from the store.

    Each app's facts hold the options of its releases that may serve and are read:
    the live ones (or, with no active instance record, the newest), from
    ``options`` or, when not read this time, from the app's facts in ``previous``
    (the view installed before).
    """
    apps = await store.list_apps()
    hostnames = await store.all_hostnames()
    instances = await store.list_instances()
    by_app: dict[str, list[str]] = {}
    for host, app in sorted(hostnames.items()):
        by_app.setdefault(app, []).append(host)
    live: dict[str, set[int]] = {}
    for inst in instances:
        if inst.state in ACTIVE_STATES:
            live.setdefault(inst.app, set()).add(int(inst.release))
    await options.fill(store, {(app, v) for app, rels in live.items() for v in rels},
                       {a.name for a in apps if a.name not in live})
    domain = domain.strip().lower().rstrip(".")
    before = previous.apps if previous is not None else {}
    facts = {}
    for app in apps:
        own = f"{app.name}.{domain}" if domain else app.name
        names = [own, *(h for h in by_app.get(app.name, ()) if h != own)]
        releases = live.get(app.name)
        old = before.get(app.name)
        known: dict[int, Mapping[str, Any]] = {}
        if releases:
            for version in releases:
                read: Mapping[str, Any] | None = options.get(app.name, version)
                if read is None and old is not None:  # not read this time: as read before
                    read = old.releases.get(version)
                if read is not None:
                    known[version] = read
        else:
            newest = options.newest(app.name)
            latest = None if newest is None else options.get(app.name, newest)
            if newest is not None and latest is not None:
                known[newest] = latest
            elif app.name not in options.latest and old is not None \
                    and old.live_releases is None:  # not read this time: as read before
                known = dict(old.releases)
        facts[app.name] = AppFacts(
            name=app.name,
            hostnames=tuple(names),
            maintenance=bool(app.maintenance),
            live_releases=frozenset(releases) if releases else None,
            releases=known,
        )
    return StoreView(apps=facts, loaded_at=now)
