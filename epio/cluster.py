"""Cluster membership: join tokens, the sealed secret, the endpoint lists a node follows.

**Joining** (docs/cluster.md, "Joining a host").  An admin makes a join token
(``POST /api/v1/cluster/join-tokens``): :func:`make_join_token` stores its hash, the
node id it grants, the cluster-wide settings a node must share
(:data:`SHARED_KEYS`) and the cluster secret **sealed** with AES-256-GCM under a key
derived from the token by HKDF-SHA256 (the token id is the associated data).  The
store never holds the secret in the clear, and the token is never stored: whoever
reads the store learns neither.  ``epio-admin join --store URL --token T`` redeems it
(:func:`redeem`: once, before it expires) and unseals the secret with the token.

**Endpoint lists.**  :class:`ClusterDirectory` is a service of every node with a
PostgreSQL store: it registers the node's own nexus/logger endpoints (when it runs
those roles and binds a concrete address), refreshes them every
``cluster.follow_interval``, removes them when the node stops, reads every live entry
on the same period and hands the **merged** lists (the TOML lists first, then the
store's that are not in them: :func:`merge`) to its observers whenever they change.
The roles' bus links follow them (epio.pipeline.BusLogSink.set_endpoints,
epio.bus.sockets.BusService.set_connects).  The last lists read are cached in
``DATA_DIR/cluster-endpoints.json``, so a node starts with them before the store
answers (a joined node's TOML lists are empty: it follows the store only).

**Routers.**  A node running the lb role also lists its host's addresses
(:func:`host_addresses`, re-read at every refresh) as an ``lb`` row; the merged lists
carry them (``routers``) and each runner's network fence lets only them -- and the
runner's own host -- open connections to its instance ports (epio.runner.fence).
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import re
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from attrs import field, frozen
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from epio.config import Settings
from epio.secretfile import write_secret_file
from epio.store.cluster import (
    JoinRefused,
    JoinTokenInfo,
    create_join_token,
    new_token_id,
    read_endpoints,
    redeem_join_token,
    register_endpoints,
    unregister_endpoints,
)

#: what every join token starts with (tells it apart from an API token, ``epio_``)
TOKEN_PREFIX = "epiojoin_"
#: seconds a join token is valid unless the request says otherwise, and at most
DEFAULT_TTL = 3600.0
MAX_TTL = 86400.0
#: the settings every node of a cluster must agree on, handed to a joining node from
#: the api's own configuration: the platform domain, the app UID range the api
#: allocates from (a runner refuses UIDs outside its own), bus encryption
SHARED_KEYS: tuple[tuple[str, str], ...] = (
    ("node", "domain"), ("runner", "uid_min"), ("runner", "uid_max"), ("bus", "encrypt"))
#: a node id: what a host name may be (it names the node in logs, the API, heartbeats)
NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,62}")
CACHE_NAME = "cluster-endpoints.json"
_HKDF_INFO = b"epio join token: cluster secret seal v1"


class JoinError(Exception):
    """A join that cannot go on: one sentence for the operator (no secret in it)."""


# cryptography is imported where a secret is sealed or opened (an api, `epio-admin
# join`), never at import: the route feed process follows the endpoint lists through this
# module and loads no TLS library (docs/router.md "Memory")


def _key(token: str) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=_HKDF_INFO).derive(token.encode("utf-8"))


def seal_secret(token: str, token_id: str, secret: bytes) -> str:
    """The cluster secret encrypted under a key derived from the join token."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = os.urandom(12)
    box = AESGCM(_key(token)).encrypt(nonce, secret, token_id.encode("ascii"))
    return base64.b64encode(nonce + box).decode("ascii")


def unseal_secret(token: str, token_id: str, sealed: str) -> bytes:
    """The cluster secret sealed by :func:`seal_secret` with the same token."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    try:
        raw = base64.b64decode(sealed.encode("ascii"), validate=True)
        return AESGCM(_key(token)).decrypt(raw[:12], raw[12:], token_id.encode("ascii"))
    except (InvalidTag, ValueError):
        raise JoinError("the join token does not open the sealed cluster secret (the "
                        "token row was altered)") from None


def valid_token_form(token: str) -> bool:
    return (isinstance(token, str) and token.startswith(TOKEN_PREFIX)
            and 20 < len(token) <= 200 and token.isascii())


def shared_settings(settings: Settings) -> dict[str, dict[str, Any]]:
    """:data:`SHARED_KEYS` of ``settings``, as TOML sections."""
    out: dict[str, dict[str, Any]] = {}
    for section, key in SHARED_KEYS:
        out.setdefault(section, {})[key] = getattr(getattr(settings, section), key)
    return out


@frozen
class NewJoinToken:
    token: str
    info: JoinTokenInfo


async def make_join_token(store: Any, secret: bytes, shared: Mapping[str, Mapping[str, Any]],
                          node_id: str | None, ttl: float | None,
                          created_by: str) -> NewJoinToken:
    """A new single-use join token granting ``node_id`` (default ``node-<8 hex>``),
    valid ``ttl`` seconds (default :data:`DEFAULT_TTL`, at most :data:`MAX_TTL`)."""
    from epio.store import InvalidValue

    ttl = DEFAULT_TTL if ttl is None else float(ttl)
    if not 0 < ttl <= MAX_TTL:
        raise InvalidValue(f"ttl must be above 0 and at most {MAX_TTL:g} seconds, not {ttl:g}")
    if node_id is None:
        node_id = "node-" + secrets.token_hex(4)
    if not NODE_ID.fullmatch(node_id):
        raise InvalidValue(f"node_id must be 1-63 letters, digits, dots or dashes, starting "
                           f"with a letter or digit, not {node_id!r}")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token_id = new_token_id()
    info = await create_join_token(store, token, token_id, node_id,
                                   seal_secret(token, token_id, secret),
                                   shared, created_by, ttl)
    return NewJoinToken(token, info)


@frozen
class JoinIssuer:
    """What the api needs to make join tokens: the cluster secret and the shared
    settings of its own configuration (:func:`shared_settings`)."""

    secret: bytes = field(repr=False)
    shared: Mapping[str, Mapping[str, Any]]

    async def issue(self, store: Any, node_id: str | None, ttl: float | None,
                    created_by: str) -> NewJoinToken:
        return await make_join_token(store, self.secret, self.shared, node_id, ttl, created_by)


@frozen
class JoinGrant:
    """What a redeemed token gives a joining node: its id, the secret, shared settings."""

    token_id: str
    node_id: str
    secret: bytes
    shared: dict[str, dict[str, Any]]


async def redeem(store: Any, token: str, used_by: str) -> JoinGrant:
    """Use ``token`` up; :class:`JoinError` (``JoinRefused``'s reason) if it does not admit."""
    if not valid_token_form(token):
        raise JoinError(f"not a join token (they start with {TOKEN_PREFIX})")
    try:
        got = await redeem_join_token(store, token, used_by)
    except JoinRefused as e:
        raise JoinError(str(e)) from None
    return JoinGrant(got.id, got.node_id, unseal_secret(token, got.id, got.sealed), got.shared)


# -- the endpoint lists ---------------------------------------------------------------


@frozen
class EndpointLists:
    """The nexus entries (heartbeat/router/publish tables) and logger PULL endpoints."""

    nexus: tuple[Mapping[str, str], ...] = ()
    loggers: tuple[str, ...] = ()
    routers: tuple[str, ...] = ()  # the router (lb) nodes' host addresses

    def nexus_endpoints(self, kind: str) -> list[str]:
        """Every nexus's ``kind`` endpoint (heartbeat, router or publish)."""
        return [str(n[kind]) for n in self.nexus if n.get(kind)]

    def to_json(self) -> dict[str, Any]:
        return {"nexus": [dict(n) for n in self.nexus], "loggers": list(self.loggers),
                "routers": list(self.routers)}

    @classmethod
    def from_rows(cls, rows: Any) -> EndpointLists:
        """The lists of the store's rows (a :class:`~epio.store.cluster.StoredEndpoints`)."""
        return cls(tuple(n for _, n in rows.nexus), tuple(p for _, p in rows.loggers),
                   tuple(dict.fromkeys(a for _, addrs in rows.routers for a in addrs)))

    @classmethod
    def from_json(cls, doc: Any) -> EndpointLists:
        if not isinstance(doc, dict):
            return cls()
        nexus = tuple({str(k): str(v) for k, v in n.items()} for n in doc.get("nexus") or []
                      if isinstance(n, dict))
        loggers = tuple(str(x) for x in doc.get("loggers") or [] if isinstance(x, str))
        routers = tuple(str(x) for x in doc.get("routers") or [] if isinstance(x, str))
        return cls(nexus, loggers, routers)


def _nexus_key(entry: Mapping[str, Any]) -> tuple[str, str, str]:
    return (str(entry.get("heartbeat", "")), str(entry.get("router", "")),
            str(entry.get("publish", "")))


def merge(configured: EndpointLists, stored: EndpointLists) -> EndpointLists:
    """The TOML lists first, then each store entry not already in them.  TOML entries
    are never removed by the store: they are the operator's word."""
    keys = {_nexus_key(n) for n in configured.nexus}
    nexus = list(configured.nexus)
    for n in stored.nexus:
        if _nexus_key(n) not in keys:
            keys.add(_nexus_key(n))
            nexus.append(n)
    loggers = list(dict.fromkeys([*configured.loggers, *stored.loggers]))
    routers = list(dict.fromkeys([*configured.routers, *stored.routers]))
    return EndpointLists(tuple(nexus), tuple(loggers), tuple(routers))


def read_cache(data_dir: Path) -> EndpointLists:
    """The lists last read from the store (empty when there is no readable cache)."""
    try:
        return EndpointLists.from_json(json.loads((data_dir / CACHE_NAME).read_text("utf-8")))
    except (OSError, ValueError):
        return EndpointLists()


def write_cache(data_dir: Path, lists: EndpointLists) -> None:
    write_secret_file(data_dir / CACHE_NAME, json.dumps(lists.to_json(), indent=1) + "\n",
                      mode=0o644)


def concrete(endpoint: str) -> bool:
    """Whether a bind endpoint names an address other hosts can connect to (not a
    wildcard, not port 0)."""
    if not endpoint.startswith("tcp://"):
        return False
    host, _, port = endpoint[len("tcp://"):].rpartition(":")
    host = host.strip("[]")
    return bool(host) and host not in ("*", "0.0.0.0", "::") and port.isdigit() and port != "0"


def own_entries(settings: Settings, roles: Iterable[str]) -> dict[str, dict[str, str]]:
    """What this node lists in the store: role -> its endpoints (concrete binds only)."""
    out: dict[str, dict[str, str]] = {}
    roles = set(roles)
    if "nexus" in roles:
        n = settings.nexus
        entry = {"heartbeat": n.heartbeat_bind, "router": n.router_bind,
                 "publish": n.publish_bind}
        if all(concrete(v) for v in entry.values()):
            out["nexus"] = entry
    if "logger" in roles:
        lg = settings.logger
        entry = {"pull": lg.pull_bind, "router": lg.router_bind, "publish": lg.publish_bind}
        if all(concrete(v) for v in entry.values()):
            out["logger"] = entry
    return out


def host_addresses(proc: Path = Path("/proc")) -> list[str]:
    """This host's (network namespace's) own addresses other hosts may see as a source:
    IPv4 from ``/proc/net/fib_trie`` (its ``host LOCAL`` entries), IPv6 of global or
    site scope from ``/proc/net/if_inet6``; never loopback or link-local ones."""
    found: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    try:
        last = ""
        for line in (proc / "net" / "fib_trie").read_text().splitlines():
            text = line.strip()
            if text.startswith("|--"):
                last = text.split()[1]
            elif text == "/32 host LOCAL" and last:
                found.add(ipaddress.IPv4Address(last))
    except (OSError, ValueError, IndexError):
        pass
    try:
        for line in (proc / "net" / "if_inet6").read_text().splitlines():
            fields = line.split()
            if len(fields) >= 4 and len(fields[0]) == 32 and int(fields[3], 16) in (0, 0x40):
                found.add(ipaddress.IPv6Address(int(fields[0], 16)))
    except (OSError, ValueError):
        pass
    return [str(a) for a in sorted(found, key=lambda a: (a.version, int(a)))
            if not (a.is_loopback or a.is_link_local or a.is_unspecified)]


def configured_lists(settings: Settings) -> EndpointLists:
    c = settings.cluster
    return EndpointLists(tuple({str(k): str(v) for k, v in n.items()} for n in c.nexus),
                         tuple(c.loggers))


def follows_store(store_url: str) -> bool:
    """The store lists endpoints only on PostgreSQL (an SQLite store is one box's)."""
    return urlsplit(store_url).scheme in ("postgresql", "postgres")


Observer = Callable[[EndpointLists], None]


class ClusterDirectory(Service):
    """Registers this node's nexus/logger endpoints and follows the store's lists.

    ``current`` is the merged lists (TOML + store); each observer is called with the
    new merged lists whenever they change.  Start: the first read happens at once;
    stop: the loop stops, then this node's rows are deleted (the stop waits for it).
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, get_store: Callable[[], Deferred[Any]],
                 node_id: str, settings: Settings, roles: Iterable[str], data_dir: Path,
                 cached: EndpointLists | None = None,
                 addresses: Callable[[], list[str]] = host_addresses) -> None:
        self.clock = clock
        self.get_store = get_store
        self.node_id = node_id
        self.interval = settings.cluster.follow_interval
        self.ttl = settings.cluster.endpoint_ttl
        self.data_dir = data_dir
        self.configured = configured_lists(settings)
        self.stored = cached if cached is not None else EndpointLists()
        self.current = merge(self.configured, self.stored)
        self.own = own_entries(settings, roles)
        roles = set(roles)
        self.router = "lb" in roles or "all" in roles  # lists its host's addresses
        self.addresses = addresses
        self.observers: list[Observer] = []
        self.reads = 0
        self.errors = 0
        self._loop: LoopingCall | None = None
        self._looping: Deferred[Any] | None = None  # fires once the loop has stopped
        self._registered: set[str] = set()
        self._failing = 0  # passes failed in a row

    def observe(self, observer: Observer) -> None:
        """Call ``observer(lists)`` on every change of the merged lists."""
        self.observers.append(observer)

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        loop = LoopingCall(lambda: Deferred.fromCoroutine(self.tick()).addErrback(
            lambda f: self.log.failure("cluster: reading the endpoint lists failed", f)))
        loop.clock = self.clock
        self._loop = loop
        self._looping = loop.start(self.interval, now=True).addErrback(
            lambda f: self.log.failure("cluster endpoint loop failed", f))

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        loop, self._loop = self._loop, None
        looping, self._looping = self._looping, None
        if loop is not None and loop.running:
            loop.stop()
        return Deferred.fromCoroutine(self._stop(looping))

    async def _stop(self, looping: Deferred[Any] | None) -> None:
        # a pass still in flight (its refresh of this node's rows) ends first: removing
        # the rows before it would let it list the stopping node again, for endpoint_ttl
        if looping is not None:
            await looping
        await self._unregister()

    async def _unregister(self) -> None:
        if not self._registered:
            return
        try:
            store = await self.get_store()
            for role in sorted(self._registered):
                await unregister_endpoints(store, self.node_id, role)
                self.log.info("cluster: removed this node's {role} endpoints from the store",
                              role=role)
        except Exception as e:  # the store is gone: the rows age out (cluster.endpoint_ttl)
            self.log.warn("cluster: could not remove this node's endpoints from the store "
                          "({error}); they age out after {ttl:g}s", error=str(e), ttl=self.ttl)
        self._registered.clear()

    async def tick(self) -> None:
        """Refresh this node's rows, read the lists, tell the observers of a change."""
        from epio.store import StoreError

        try:
            store = await self.get_store()
            own = dict(self.own)
            if self.router:
                addresses = self.addresses()
                if addresses:
                    own["lb"] = {"addresses": " ".join(addresses)}
            for role, entry in own.items():
                await register_endpoints(store, self.node_id, role, entry)
                if role not in self._registered:
                    self._registered.add(role)
                    self.log.info("cluster: listed this node's {role} endpoints {endpoints} "
                                  "in the store", role=role,
                                  endpoints=" ".join(sorted(entry.values())))
            rows = await read_endpoints(store, self.ttl)
        except StoreError as e:
            self.errors += 1
            self._failing += 1
            if self._failing == 1:  # once per outage, not every pass
                self.log.warn("cluster: cannot read the endpoint lists ({error}); keeping "
                              "the last ones", error=str(e))
            return
        if self._failing:
            self.log.info("cluster: endpoint lists read again after {count} failed passes",
                          count=self._failing)
            self._failing = 0
        self.reads += 1
        self.update(EndpointLists.from_rows(rows))

    def update(self, stored: EndpointLists) -> None:
        """Take ``stored`` as the store's lists; tell the observers if the merge changed."""
        self.stored = stored
        merged = merge(self.configured, stored)
        if merged == self.current:
            return
        before, self.current = self.current, merged
        self.log.info(
            "cluster: endpoint lists changed: nexus {nexus_before} -> {nexus_after}; "
            "loggers {loggers_before} -> {loggers_after}; routers {routers_before} -> "
            "{routers_after}",
            nexus_before=" ".join(before.nexus_endpoints("router")) or "none",
            nexus_after=" ".join(merged.nexus_endpoints("router")) or "none",
            loggers_before=" ".join(before.loggers) or "none",
            loggers_after=" ".join(merged.loggers) or "none",
            routers_before=" ".join(before.routers) or "none",
            routers_after=" ".join(merged.routers) or "none")
        try:
            write_cache(self.data_dir, stored)
        except OSError as e:
            self.log.warn("cluster: cannot write {path}: {error}",
                          path=str(self.data_dir / CACHE_NAME), error=e.strerror)
        for observer in list(self.observers):
            try:
                observer(merged)
            except Exception:
                self.log.failure("cluster: an endpoint list observer failed")


def toml_value(value: Any) -> str:
    """One TOML value (str, bool, int, float, list, inline table)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(doc: Mapping[str, Mapping[str, Any]], header: Sequence[str] = ()) -> str:
    lines = [f"# {h}" for h in header]
    for section, table in doc.items():
        if not table:
            continue
        lines.append(f"\n[{section}]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in table.items())
    return "\n".join(lines).lstrip("\n") + "\n"


def follow_endpoints(directory: ClusterDirectory, sink: Any = None,
                     heartbeats: Any = None) -> None:
    """Keep a role's bus links on the merged lists: ``sink`` (a BusLogSink) pushes to
    every logger, ``heartbeats`` (a Publisher) reaches every nexus's heartbeat SUB."""

    def changed(lists: EndpointLists) -> None:
        if sink is not None:
            sink.set_endpoints(list(lists.loggers))
        if heartbeats is not None:
            heartbeats.set_connects(lists.nexus_endpoints("heartbeat"))

    directory.observe(changed)
