"""The routing table: hostname -> app -> backends (shared floor).

The nexus builds it from heartbeats and the store; every router reads it on each
request.  Lookups are dictionary probes (exact host, then one probe per label for
the longest ``*.suffix`` wildcard, then ``<app>.<platform domain>``), so they stay
O(labels) with 100k hostnames.

Updates never stall the reactor for long: :meth:`RouteTable.replace` builds a new
index off to the side and swaps it in with one assignment; :meth:`RouteTable.apply`
changes only the hostnames of the routes in a delta (in place: the reactor is
single-threaded, so a request sees the table before or after a delta, never half).

Route sources (the routes file, later the nexus feed) implement
:class:`IRouteSource` and push into a table.
"""

from __future__ import annotations

import hashlib
import hmac
import tomllib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from attrs import field, frozen
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from epio.basicauth import BasicAuth

HEALTHY = "healthy"


class InvalidTransition(RuntimeError):
    """A move a state machine of the router does not have (a bug): a client
    connection's (:mod:`epio.lb.proxy`), a nexus link's (:mod:`epio.routefeed`)."""


@frozen
class Backend:
    """One instance of an app that can take requests at ``host:port``."""

    host: str
    port: int
    instance_id: str = ""
    app: str = ""
    release: str = ""
    state: str = HEALTHY
    # (host, port): the key the router keeps per-backend state under
    address: tuple[str, int] = field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "address", (self.host, self.port))

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def _hostnames(hs: Iterable[str]) -> tuple[str, ...]:
    return tuple(normalise_host(h) for h in hs)


def _backends(bs: Iterable[Backend]) -> tuple[Backend, ...]:
    return tuple(bs)


@frozen
class Route:
    """An app's hostnames and backends, with its own limits where set.

    ``None`` in an override means "use the router's configured value".  ``live``
    is derived: the backends in state ``healthy`` (draining ones keep their
    in-flight requests but get no new ones).
    """

    app: str
    hostnames: tuple[str, ...] = field(converter=_hostnames)
    backends: tuple[Backend, ...] = field(converter=_backends)
    maintenance: bool = False
    max_body_size: int | None = None
    connect_timeout: float | None = None
    first_byte_timeout: float | None = None
    idle_timeout: float | None = None
    websocket_idle_timeout: float | None = None
    # False: stream request bodies to the app as they arrive instead of reading them
    # whole first (manifest [http] request_buffering; docs/router.md "Request bodies")
    request_buffering: bool | None = None
    # HTTPS policy (docs/https.md): 308 from http:// to https://; HSTS max-age on HTTPS
    https_redirect: bool = False
    hsts_max_age: int | None = None
    # gzip text responses of the app for clients that accept it (manifest [http] gzip;
    # epio.lb.compress, docs/router.md "Compression")
    gzip: bool = False
    # URL path prefixes served by the runners' static file servers (docs/static.md)
    # and those servers' endpoints; without both, every path goes to the app
    static_prefixes: tuple[str, ...] = field(default=(), converter=tuple)
    static_backends: tuple[Backend, ...] = field(default=(), converter=_backends)
    # [basic_auth]: every request of the app (static files too) must pass it
    basic_auth: BasicAuth | None = None
    # an asleep app ([http] idle_sleep, docs/apps.md): the control endpoints of the
    # runners that wake it (runner.wake) and since when it sleeps; () when awake
    wake: tuple[str, ...] = field(default=(), converter=tuple)
    asleep_since: float | None = None
    live: tuple[Backend, ...] = field(init=False, eq=False, repr=False)
    # the route a static request takes (its backends are the static servers), or None
    static: Route | None = field(init=False, eq=False, repr=False)
    _static_b: tuple[bytes, ...] = field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "live", tuple(b for b in self.backends if b.state == HEALTHY))
        static = None
        if self.static_prefixes and self.static_backends:
            static = Route(
                app=self.app, hostnames=(), backends=self.static_backends,
                maintenance=self.maintenance, max_body_size=self.max_body_size,
                connect_timeout=self.connect_timeout,
                first_byte_timeout=self.first_byte_timeout, idle_timeout=self.idle_timeout,
                websocket_idle_timeout=self.websocket_idle_timeout,
                request_buffering=self.request_buffering,
                https_redirect=self.https_redirect, hsts_max_age=self.hsts_max_age)
        object.__setattr__(self, "static", static)
        object.__setattr__(self, "_static_b", tuple(
            p.encode("utf-8") for p in self.static_prefixes))

    def is_static(self, target: bytes) -> bool:
        """Whether a request target's path is under one of the static prefixes
        (at a segment boundary: ``/static`` takes ``/static/x``, not ``/staticx``)."""
        q = target.find(b"?")
        path = target if q < 0 else target[:q]
        for p in self._static_b:
            if p == b"/":
                return True
            if path.startswith(p) and (len(path) == len(p) or path[len(p)] == 47):
                return True
        return False


def static_token(secret: bytes, app: str) -> str:
    """The token a router sends with a static request for ``app`` (``X-Epio-Static:
    <app> <token>``): an HMAC of the app name under a key derived from the cluster
    secret, so only nodes holding the secret can make one (docs/static.md)."""
    key = hmac.new(secret, b"epio static files v1", hashlib.sha256).digest()
    return hmac.new(key, app.encode("utf-8"), hashlib.sha256).hexdigest()[:32]


@frozen
class RouteDelta:
    """A change to a table: routes to add or replace (by app) and apps to remove."""

    upsert: tuple[Route, ...] = ()
    remove: tuple[str, ...] = ()


def normalise_host(host: str) -> str:
    """Lower-case, drop the port and a trailing dot: ``Foo.COM.:80`` -> ``foo.com``.

    IPv6 literals keep their brackets: ``[::1]:8080`` -> ``[::1]``.
    """
    h = host.strip().lower()
    if h.startswith("["):
        end = h.find("]")
        return h[: end + 1] if end > 0 else h
    colon = h.find(":")
    if colon >= 0:
        h = h[:colon]
    return h.rstrip(".")


class LazyRoute:
    """A route in a :class:`RouteTable` whose :class:`Route` is built on first use.

    The router's route feed hands it many changed routes a second, most of them
    for apps no request asks for before they change again; building each
    ``Route`` only when a lookup finds it keeps that work off the proxy.
    ``build()`` returns the Route, or ``None`` for a route that cannot be used
    (the table then drops the app).  ``hostnames`` must be normalised as
    ``Route`` normalises them.
    """

    __slots__ = ("app", "hostnames", "build")

    def __init__(self, app: str, hostnames: Iterable[str],
                 build: Callable[[], Route | None]) -> None:
        self.app = app
        self.hostnames = _hostnames(hostnames)
        self.build = build


class _Index:
    """The three dictionaries one lookup probes."""

    __slots__ = ("apps", "exact", "wild")

    def __init__(self) -> None:
        # values: Route, or LazyRoute until a lookup builds it; typed Any because the
        # lookups tell them apart by ``__class__ is`` (the fastest test; mypy does not
        # narrow on it)
        self.apps: dict[str, Any] = {}
        self.exact: dict[str, Any] = {}
        self.wild: dict[str, Any] = {}  # ".example.com" for "*.example.com"

    def _slot(self, hostname: str) -> tuple[dict[str, Any], str]:
        """Where a hostname lives: ``*.x`` in ``wild`` under ``.x``, others in ``exact``."""
        return (self.wild, hostname[1:]) if hostname.startswith("*.") else (self.exact, hostname)

    def add(self, route: Route | LazyRoute) -> None:
        self.apps[route.app] = route
        for h in route.hostnames:
            d, k = self._slot(h)
            d[k] = route

    def upsert(self, route: Route | LazyRoute) -> None:
        """Put ``route`` in place of its app's current route, if any."""
        old = self.apps.get(route.app)
        if old is not None:
            self.discard(old)
        self.add(route)

    def remove(self, app: str) -> None:
        old = self.apps.get(app)
        if old is not None:
            self.discard(old)

    def discard(self, route: Route | LazyRoute) -> None:
        """Remove ``route``'s hostnames, leaving those another app has taken since."""
        if self.apps.get(route.app) is route:
            del self.apps[route.app]
        for h in route.hostnames:
            d, k = self._slot(h)
            cur = d.get(k)
            if cur is not None and cur.app == route.app:
                del d[k]

    def built(self, lazy: LazyRoute, route: Route | None) -> None:
        """Put ``lazy``'s built ``route`` (None: unusable, removed) only where ``lazy``
        still stands: a hostname another app has taken since stays that app's."""
        for d, k in [(self.apps, lazy.app), *map(self._slot, lazy.hostnames)]:
            if d.get(k) is lazy:
                if route is None:
                    del d[k]
                else:
                    d[k] = route


class RouteTable:
    """Hostname -> :class:`Route`, read on every request, fed by a route source.

    With a ``clock`` (the router passes its reactor) :meth:`apply` works through a
    big delta ``slice_size`` routes per reactor turn, so 10k changed routes never
    stall request handling for more than a slice (about half a millisecond); each route
    still changes atomically and deltas apply in order.  Without a clock (tests,
    the nexus) :meth:`apply` is synchronous.
    """

    def __init__(self, domain: str = "localhost", routes: Iterable[Route] = (),
                 clock: Any = None, slice_size: int = 250) -> None:
        self.domain = normalise_host(domain)
        self._suffix = "." + self.domain
        self.version = 0
        self._index = _Index()
        self.clock = clock
        self.slice_size = slice_size
        self._pending: list[tuple[str, Any]] = []  # ("remove", app) / ("upsert", route)
        self._pos = 0
        self._call: Any = None
        self.replace(routes)

    def __len__(self) -> int:
        return len(self._index.apps)

    def routes(self) -> list[Route]:
        out = []
        for r in list(self._index.apps.values()):
            route = self._built(r) if r.__class__ is LazyRoute else r
            if route is not None:
                out.append(route)
        return out

    def get(self, app: str) -> Route | None:
        r = self._index.apps.get(app)
        if r is not None and r.__class__ is LazyRoute:
            return self._built(r)
        route: Route | None = r
        return route

    def _built(self, lazy: LazyRoute) -> Route | None:
        """Build a :class:`LazyRoute` found in the index and put the Route in its place."""
        route = lazy.build()
        self._index.built(lazy, route)
        return route

    @property
    def pending(self) -> int:
        """Route changes accepted by :meth:`apply` but not yet visible."""
        return len(self._pending) - self._pos

    def lookup(self, host: str) -> Route | None:
        """The route for a Host header value, or ``None``."""
        r = self._index.exact.get(host)
        if r is None:
            r = self._lookup(host)
        if r is not None and r.__class__ is LazyRoute:
            return self._built(r)
        route: Route | None = r  # the index's values are Any: see _Index
        return route

    def _lookup(self, host: str) -> Any:
        """The index's Route or LazyRoute for ``host`` (Any: see _Index), or None."""
        idx = self._index
        h = normalise_host(host)
        r = idx.exact.get(h)
        if r is not None:
            return r
        if idx.wild:
            wild = idx.wild
            dot = h.find(".")
            while dot >= 0:
                r = wild.get(h[dot:])
                if r is not None:
                    return r
                dot = h.find(".", dot + 1)
        if h.endswith(self._suffix):
            name = h[: -len(self._suffix)]
            if name and "." not in name:
                return idx.apps.get(name)
        return None

    def replace(self, routes: Iterable[Route]) -> None:
        """Swap in a whole new table, built before the swap (pending deltas are dropped)."""
        new = _Index()
        for r in routes:
            new.upsert(r)
        self._pending = []
        self._pos = 0
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._index = new
        self.version += 1

    def apply(self, delta: RouteDelta) -> None:
        """Add, replace and remove routes by app; touches only their hostnames.

        Without a clock the delta is applied at once, else a slice per reactor turn."""
        self._pending.extend(("remove", app) for app in delta.remove)
        self._pending.extend(("upsert", r) for r in delta.upsert)
        self._pending.append(("version", None))
        if self._call is None:
            self._work()

    def _work(self) -> None:
        self._call = None
        idx = self._index
        pending = self._pending
        if self.clock is None:
            end = len(pending)
        else:
            end = min(len(pending), self._pos + self.slice_size)
        for i in range(self._pos, end):
            op, item = pending[i]
            if op == "upsert":
                idx.upsert(item)
            elif op == "remove":
                idx.remove(item)
            else:
                self.version += 1
        self._pos = end
        if end >= len(pending):
            self._pending = []
            self._pos = 0
        else:
            self._call = self.clock.callLater(0, self._work)


class IRouteSource(Interface):
    """Something that keeps a :class:`RouteTable` current (a file, the nexus feed)."""

    description = Attribute("Human-readable name for logs, e.g. 'file routes.toml'.")

    def start(table: RouteTable) -> None:
        """Fill ``table`` now (or as soon as possible) and keep it current."""

    def stop() -> None:
        """Stop updating the table; it keeps its last contents."""

    def reload() -> None:
        """Re-read the source now (SIGHUP); a bad source leaves the table as it was."""


class RoutesFileError(Exception):
    """The routes file cannot be used; the message says why and where."""


_ROUTE_KEYS = {
    "hostnames", "backends", "maintenance", "max_body_size", "connect_timeout",
    "first_byte_timeout", "idle_timeout", "websocket_idle_timeout",
    "static_prefixes", "static_backends", "request_buffering", "gzip",
}
_FLOAT_KEYS = ("connect_timeout", "first_byte_timeout", "idle_timeout", "websocket_idle_timeout")


def parse_backend(text: str, app: str) -> Backend:
    """``host:port`` or ``[v6]:port`` -> :class:`Backend`."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RoutesFileError(f"app {app!r}: backend {text!r} is not HOST:PORT or [V6]:PORT")
    return Backend(host=host, port=int(port), instance_id=text, app=app)


def parse_routes(data: dict[str, Any]) -> list[Route]:
    """Routes from the parsed TOML document (see docs/router.md)."""
    apps = data.get("apps", {})
    unknown = set(data) - {"apps"}
    if unknown:
        raise RoutesFileError(f"unknown top-level keys: {', '.join(sorted(unknown))}")
    if not isinstance(apps, dict):
        raise RoutesFileError("[apps] must be a table of apps")
    routes = []
    errors = []
    for name, spec in apps.items():
        if not isinstance(spec, dict):
            errors.append(f"app {name!r}: must be a table")
            continue
        bad = set(spec) - _ROUTE_KEYS
        if bad:
            errors.append(f"app {name!r}: unknown keys {', '.join(sorted(bad))}")
            continue
        try:
            hostnames = spec.get("hostnames", [])
            backends = spec.get("backends", [])
            if not all(isinstance(h, str) and h for h in hostnames):
                raise RoutesFileError(f"app {name!r}: hostnames must be non-empty strings")
            if not all(isinstance(b, str) for b in backends):
                raise RoutesFileError(f"app {name!r}: backends must be 'HOST:PORT' strings")
            kw: dict[str, Any] = {}
            for k in _FLOAT_KEYS:
                if k in spec:
                    v = spec[k]
                    if isinstance(v, bool) or not isinstance(v, int | float) or v <= 0:
                        raise RoutesFileError(f"app {name!r}: {k} must be a number > 0")
                    kw[k] = float(v)
            if "max_body_size" in spec:
                v = spec["max_body_size"]
                if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                    raise RoutesFileError(f"app {name!r}: max_body_size must be an integer >= 0")
                kw["max_body_size"] = v
            for k in ("request_buffering", "gzip"):
                if k in spec:
                    v = spec[k]
                    if not isinstance(v, bool):
                        raise RoutesFileError(f"app {name!r}: {k} must be true or false")
                    kw[k] = v
            maint = spec.get("maintenance", False)
            if not isinstance(maint, bool):
                raise RoutesFileError(f"app {name!r}: maintenance must be true or false")
            prefixes = spec.get("static_prefixes", [])
            static = spec.get("static_backends", [])
            if not all(isinstance(p, str) and p.startswith("/") for p in prefixes):
                raise RoutesFileError(f"app {name!r}: static_prefixes must be URL paths")
            if not all(isinstance(b, str) for b in static):
                raise RoutesFileError(f"app {name!r}: static_backends must be 'HOST:PORT'")
            if prefixes or static:
                kw["static_prefixes"] = prefixes
                kw["static_backends"] = [parse_backend(b, name) for b in static]
            routes.append(Route(
                app=name,
                hostnames=hostnames,
                backends=[parse_backend(b, name) for b in backends],
                maintenance=maint,
                **kw,
            ))
        except RoutesFileError as e:
            errors.append(str(e))
    if errors:
        raise RoutesFileError("; ".join(errors))
    return routes


def load_routes_file(path: Path) -> list[Route]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise RoutesFileError(f"cannot read {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise RoutesFileError(f"{path} is not valid TOML: {e}") from None
    try:
        return parse_routes(data)
    except RoutesFileError as e:
        raise RoutesFileError(f"{path}: {e}") from None


@implementer(IRouteSource)
class FileRouteSource:
    """Routes from a TOML file, loaded at start and on :meth:`reload` (SIGHUP)."""

    log = Logger()

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.description = f"file {self.path}"
        self.table: RouteTable | None = None

    def start(self, table: RouteTable) -> None:
        self.table = table
        self.reload()

    def stop(self) -> None:
        self.table = None

    def reload(self) -> None:
        if self.table is None:
            return
        try:
            routes = load_routes_file(self.path)
        except RoutesFileError as e:
            self.log.error("routes not reloaded, keeping the current table: {error}", error=str(e))
            return
        self.table.replace(routes)
        self.log.info("loaded {count} routes from {path}", count=len(routes), path=str(self.path))


@implementer(IRouteSource)
class StaticRouteSource:
    """A fixed list of routes (tests, embedding); :meth:`set` swaps in new ones."""

    def __init__(self, routes: Iterable[Route] = ()) -> None:
        self.routes = list(routes)
        self.description = "static routes"
        self.table: RouteTable | None = None

    def start(self, table: RouteTable) -> None:
        self.table = table
        table.replace(self.routes)

    def stop(self) -> None:
        self.table = None

    def reload(self) -> None:
        if self.table is not None:
            self.table.replace(self.routes)

    def set(self, routes: Iterable[Route]) -> None:
        self.routes = list(routes)
        self.reload()
