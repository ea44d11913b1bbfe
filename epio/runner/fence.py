"""The network fence: app processes reach nothing on this host but what they need.

App processes share the host's network namespace (they bind ``$PORT`` where the
routers reach them), so without a fence an app could connect to the bus, the api,
the metrics listener, the store and every other service of the host on
``127.0.0.1``, and straight to other apps' instances.  The fence is one nftables
table per runner (``inet``, ``epio_fence_<hash of the data dir>`` unless
``runner.fence_table``) with an ``output`` hook: a TCP connection attempt (a SYN
without ACK) from a socket owned by a UID this runner runs apps as (the nft set
``app_uids``: its live instances' and sessions' UIDs, and those that still own a
process; plus the build user -- never the whole ``runner.uid_min``-``uid_max``
range, where another runner of this host may run its apps) is answered with a TCP reset, so the app's ``connect()``
fails at once with ``ECONNREFUSED``, when it goes to

* any port of a local address of the host (``fib daddr type local``:
  127.0.0.0/8, ::1 and every address of the host) -- deny by default -- except
  the router's ports, the ports the operator allows (``runner.fence_allow_ports``),
  the app's own instances on this runner (its web instances and its dedicated
  database servers) and the port of its shared add-on database (the api names it
  in ``runner.start``/``run.start``: ``addon_ports``) -- (UID, port) pairs kept in
  step with the supervisor and the ``epio run`` sessions -- and the unused rest of
  the instance port range (instances of other runners of this host, whose own
  tables decide);
* a control-plane port (:func:`plan_from_config`) of one of the cluster hosts
  named in the config or in ``runner.fence_hosts``.

An ``input`` hook guards the instance ports from other hosts: a TCP connection
attempt to the instance port range (``runner.port_min``-``port_max``) or to the
runner's static file server is accepted from this host itself (``fib saddr type
local``: loopback and every address of the host, so a single box and the runner's
own health checks pass), from the addresses of the cluster's router (lb) nodes --
the ``lb`` rows of the store's endpoint lists (:class:`epio.cluster.ClusterDirectory`
follows them: a router that joins or leaves is in or out after
``cluster.follow_interval``) -- and, to a dedicated add-on server's port (other
runners' apps, the api, backups and a standby connect to it, with its password),
from anywhere; every other one is answered with a TCP reset.  So no host but a
router reaches an app's web instance around the router's rules.

The whole table is replaced in one ``nft -f`` transaction whenever what it
should hold changes, so there is never a moment without rules.  A runner whose
fence cannot be installed refuses to start unless ``runner.fence = "off"``.
docs/security.md says what this does and does not protect.

The fence's state (:data:`FENCE_TRANSITIONS`; the runner's isolation facts show
it)::

    runner.fence = off --> OFF            (for good: never installed)

    ON --apply failed--> FAILED --apply failed--> FAILED
     ^                     |
     +----applied again----+              (ON --applied--> ON keeps it in step)

A FAILED fence whose older table is still in place keeps fencing every app UID;
with no table at all (``applied`` is None) its spawn gate refuses to start
anything (:meth:`NetworkFence.ready`).
"""

from __future__ import annotations

import enum
import hashlib
import ipaddress
import os
import pwd
import re
import shutil
import subprocess
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from attrs import define, field, frozen
from twisted.application.service import Service
from twisted.internet import defer, task, threads
from twisted.logger import Logger
from zope.interface import Interface, implementer

from epio.config.settings import Settings
from epio.listen import Target, twisted_endpoint, zmq_endpoint
from epio.runner.sandbox import Isolation
from epio.runner.supervisor import InvalidTransition, State
from epio.runner.users import uids_with_processes

if TYPE_CHECKING:
    from twisted.python.failure import Failure

    from epio.node import INodeReactor
    from epio.runner.sessions import SessionManager
    from epio.runner.supervisor import Supervisor

NFT_TIMEOUT = 10.0  # seconds one nft invocation may take
ZMQ_SECTIONS: dict[str, tuple[str, ...]] = {
    "nexus": ("heartbeat_bind", "router_bind", "publish_bind"),
    "runner": ("control_bind",),
    "logger": ("pull_bind", "router_bind", "publish_bind"),
    "backup": ("control_bind",),
}
TWISTED_ENDPOINTS: dict[str, tuple[str, ...]] = {"api": ("listen",)}
ROUTER_ENDPOINTS = ("listen", "tls_listen")  # lb: stays open
POSTGRES_PORT = 5432
TABLE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")


class FenceState(enum.StrEnum):
    """Whether the fence is in place (the value is what the runner reports)."""

    OFF = "off"
    ON = "on"
    FAILED = "failed"


FENCE_TRANSITIONS: dict[FenceState, frozenset[FenceState]] = {
    FenceState.OFF: frozenset(),
    FenceState.ON: frozenset({FenceState.ON, FenceState.FAILED}),
    FenceState.FAILED: frozenset({FenceState.ON, FenceState.FAILED}),
}


class FenceError(Exception):
    """nft refused the ruleset, or cannot be run."""


class FenceNotApplied(FenceError):
    """The fence is on but no table is in place: nothing may be spawned."""


# -- endpoints in the config ---------------------------------------------------


def postgres_endpoints(url: str) -> list[Target]:
    """Every TCP host and port of a postgresql:// URL: one, or each host of a URL that
    lists a primary and its standbys (``postgresql://u@a:5432,b:5432/db``); empty for
    a unix socket."""
    if not url.startswith(("postgresql://", "postgres://")):
        return []
    from psycopg2 import ProgrammingError

    from epio.store.backend import pg_hosts

    try:
        hosts = pg_hosts(url)
    except ProgrammingError:  # a URL libpq cannot read: the one-host reading decides
        hosts = None
    if hosts is None:
        one = postgres_endpoint(url)
        return [one] if one is not None else []
    return [Target(h, int(p) if p else POSTGRES_PORT) for h, p in hosts
            if h and not h.startswith("/")]


def postgres_endpoint(url: str) -> Target | None:
    """The TCP host and port of a postgresql:// URL (None for a unix socket)."""
    if not url.startswith(("postgresql://", "postgres://")):
        return None
    try:
        parts = urlsplit(url)
        port = parts.port or POSTGRES_PORT
    except ValueError:
        return None
    host = parts.hostname or ""
    if not host or host.startswith("/") or "%2f" in host.lower():
        return None
    return Target(host, port)


def _is_loopback(host: str) -> bool:
    ip = _literal_ip(host)
    return ip is not None and ip.is_loopback


def _literal_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


# -- the plan --------------------------------------------------------------------


@frozen
class FencePlan:
    """What the fence holds apart from the live instance ports."""

    table: str
    uid_min: int
    uid_max: int
    control_ports: tuple[int, ...]  # refused on the hosts below (and, like all, locally)
    hosts4: tuple[str, ...]  # other cluster hosts (addresses or networks)
    hosts6: tuple[str, ...]
    open_ports: tuple[int, ...]  # router ports and runner.fence_allow_ports
    notes: tuple[str, ...] = ()  # what the operator should know (logged as warnings)
    instance_range: tuple[int, int] | None = None  # runner.port_min, port_max

    def describe(self) -> dict[str, Any]:
        return {
            "table": f"inet {self.table}",
            "uids": f"{self.uid_min}-{self.uid_max}",
            "control_ports": list(self.control_ports),
            "hosts": [*self.hosts4, *self.hosts6],
            "open_ports": list(self.open_ports),
            "instance_ports": (f"{self.instance_range[0]}-{self.instance_range[1]}"
                               if self.instance_range else None),
        }


def table_for(data_dir: str | Path) -> str:
    """The default table name of the runner using ``data_dir``: ``epio_fence_<hash>``,
    so runners sharing a host (multi-node tests) never replace or remove each other's."""
    key = hashlib.sha256(str(Path(data_dir).absolute()).encode()).hexdigest()[:8]
    return f"epio_fence_{key}"


def plan_from_config(config: Settings, roles: Iterable[str],
                     table: str | None = None) -> FencePlan:
    """Derive the fence from the node's typed settings and the roles it runs.

    On this host every port is refused to app UIDs except the open ports: the
    router's (lb.listen, lb.tls_listen) and runner.fence_allow_ports (plus, at run
    time, each app's own instances and shared add-on ports, and the instance port
    range).  The add-ons' shared PostgreSQL port is never a control port.  Control-plane
    ports -- the listeners of the roles this node runs (api.listen, the nexus, runner,
    logger and backup ZeroMQ binds), metrics.listen, every endpoint the node connects
    to (cluster.nexus, cluster.loggers, logger.peers, backup.endpoints), the store's
    PostgreSQL and runner.fence_extra_ports -- are refused on the other cluster hosts
    too, and on this host even inside the instance port range.
    ``table`` defaults to ``runner.fence_table`` (or ``epio_fence``).  Raises
    ValueError for a bad table name or runner.fence_hosts entry.

    The steps, in order: :func:`_listener_ports`, :func:`_connected_ports`,
    :func:`_store_and_addon_ports`, :func:`_open_ports`, :func:`_index_note`,
    :func:`_cluster_hosts`.
    """
    rc = config.runner
    table = table or rc.fence_table or "epio_fence"
    if not TABLE_NAME.match(table):
        raise ValueError(f"runner.fence_table: {table!r} is not a valid nftables table name "
                         "(letters, digits and _, starting with a letter)")
    draft = _Draft()
    _listener_ports(draft, config, set(roles))
    _connected_ports(draft, config)
    _store_and_addon_ports(draft, config)
    open_ports = _open_ports(draft, config)
    _index_note(draft, config.build.index_url, open_ports)
    hosts4, hosts6 = _cluster_hosts(draft, rc.fence_hosts)
    return FencePlan(
        table=table, uid_min=rc.uid_min, uid_max=rc.uid_max,
        control_ports=tuple(sorted(draft.ports)),
        hosts4=tuple(sorted(hosts4, key=_net_key)),
        hosts6=tuple(sorted(hosts6, key=_net_key)),
        open_ports=tuple(open_ports), notes=tuple(draft.notes),
        instance_range=(rc.port_min, rc.port_max),
    )


@define
class _Draft:
    """The plan while :func:`plan_from_config` works it out."""

    ports: dict[int, str] = field(factory=dict)  # port -> where from (first reason wins)
    remote: list[Target] = field(factory=list)  # endpoints this node connects to
    notes: list[str] = field(factory=list)

    def add(self, target: Target | None, why: str, connect: bool = False) -> None:
        if target is None:
            return
        self.ports.setdefault(target.port, why)
        if connect:
            self.remote.append(target)


def _listener_ports(draft: _Draft, config: Settings, roles: set[str]) -> None:
    """The listeners of the roles this node runs, and metrics.listen."""
    if "all" in roles:
        roles = {"api", "nexus", "lb", "runner", "logger", "backup"}
    for section, keys in TWISTED_ENDPOINTS.items():
        if section in roles:
            for key in keys:
                value = str(getattr(getattr(config, section), key))
                t = twisted_endpoint(value)
                if t is None and value:
                    draft.notes.append(
                        f"{section}.{key} = {value!r} is not a TCP port: not fenced "
                        "(a unix socket is protected by its file mode and the sandbox)")
                draft.add(t, f"{section}.{key}")
    for section, keys in ZMQ_SECTIONS.items():
        if section in roles:
            for key in keys:
                value = str(getattr(getattr(config, section), key))
                t = zmq_endpoint(value)
                if t is None and value:
                    draft.notes.append(f"{section}.{key} = {value!r} is not a TCP port: "
                                       "not fenced")
                draft.add(t, f"{section}.{key}")
    draft.add(twisted_endpoint(config.metrics.listen), "metrics.listen")


def _connected_ports(draft: _Draft, config: Settings) -> None:
    """Every endpoint the node connects to, and runner.fence_extra_ports."""
    for i, nexus in enumerate(config.cluster.nexus):
        for key, value in sorted(nexus.items()):
            if isinstance(value, str):
                draft.add(zmq_endpoint(value), f"cluster.nexus[{i}].{key}", connect=True)
    for value in config.cluster.loggers:
        draft.add(zmq_endpoint(value), "cluster.loggers", connect=True)
    for i, peer in enumerate(config.logger.peers):
        for key, value in sorted(peer.items()):
            if isinstance(value, str):
                draft.add(zmq_endpoint(value), f"logger.peers[{i}].{key}", connect=True)
    for value in config.backup.endpoints:
        draft.add(zmq_endpoint(value), "backup.endpoints", connect=True)
    for port in config.runner.fence_extra_ports:
        draft.add(Target("", port), "runner.fence_extra_ports")


def _store_and_addon_ports(draft: _Draft, config: Settings) -> None:
    """The store's PostgreSQL is a control port, unless it is also the add-ons' shared
    PostgreSQL port, which apps must reach (and which is never a control port)."""
    addons = config.addons
    addon_port = None
    admin = postgres_endpoint(addons.postgres_admin_url)
    if admin is not None:
        addon_port = addons.postgres_port or admin.port
    store_url = config.store.url
    stores = postgres_endpoints(store_url)
    for store in stores:
        if store.port == addon_port:
            draft.notes.append(
                f"the store's PostgreSQL port {store.port} is also the add-ons' PostgreSQL "
                "port that apps must reach: it stays open; keep the store in a database and "
                "role apps cannot log into (docs/security.md)")
        else:
            draft.add(store, "store.url", connect=True)
    if not stores and store_url.startswith(("postgresql://", "postgres://")):
        draft.notes.append("store.url uses a unix socket: not fenced (its file mode and "
                           "pg_hba.conf protect it)")
    if addon_port is not None and addon_port in draft.ports:
        draft.notes.append(f"port {addon_port} ({draft.ports[addon_port]}) is the add-ons' "
                           "PostgreSQL port: apps with a shared database reach it")
        del draft.ports[addon_port]


def _open_ports(draft: _Draft, config: Settings) -> list[int]:
    """The router's ports and runner.fence_allow_ports: open to apps, never control."""
    allow = config.runner.fence_allow_ports
    routers = sorted({t.port for t in (twisted_endpoint(str(getattr(config.lb, k)))
                                       for k in ROUTER_ENDPOINTS) if t is not None})
    for port in routers:
        if port in draft.ports:
            draft.notes.append(f"port {port} ({draft.ports[port]}) is also a router port: "
                               "it stays open")
            del draft.ports[port]
    for port in allow:
        if port in draft.ports:
            draft.notes.append(f"port {port} ({draft.ports[port]}) is in "
                               "runner.fence_allow_ports: it stays open")
            del draft.ports[port]
    return sorted({*routers, *allow})


def _index_note(draft: _Draft, index_url: str, open_ports: list[int]) -> None:
    """A package index on this host that builds cannot reach through the fence."""
    index = urlsplit(index_url) if index_url else None
    try:
        index_port = (index.port or (443 if index.scheme == "https" else 80)) if index else None
    except ValueError:
        index_port = None
    if index is not None and index_port is not None and index_port not in open_ports \
            and (index.hostname in ("localhost", "") or _is_loopback(index.hostname or "")):
        draft.notes.append(f"build.index_url is on this host (port {index_port}): builds "
                           "cannot reach it unless the port is in runner.fence_allow_ports")


def _cluster_hosts(draft: _Draft, fence_hosts: Sequence[str]) -> tuple[set[str], set[str]]:
    """The other cluster hosts' addresses (IPv4, IPv6): those of the endpoints the node
    connects to, and runner.fence_hosts."""
    hosts4: set[str] = set()
    hosts6: set[str] = set()
    for t in draft.remote:
        ip = _literal_ip(t.host)
        if ip is None:
            if t.host not in ("", "*", "localhost"):
                draft.notes.append(
                    f"cluster host {t.host!r} is a name, not an address: its ports are "
                    "fenced only on this host's own addresses (list its addresses in "
                    "runner.fence_hosts)")
            continue
        if ip.is_loopback or ip.is_unspecified:
            continue  # local: covered by fib daddr type local
        (hosts4 if ip.version == 4 else hosts6).add(str(ip))
    for entry in fence_hosts:
        try:
            net = ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise ValueError(f"runner.fence_hosts: {entry!r} is not an IP address or "
                             "network") from None
        text = str(net.network_address) if net.num_addresses == 1 else str(net)
        (hosts4 if net.version == 4 else hosts6).add(text)
    return hosts4, hosts6


def _net_key(text: str) -> tuple[int, int]:
    net = ipaddress.ip_network(text, strict=False)
    return int(net.network_address), net.prefixlen


# -- the ruleset -----------------------------------------------------------------


def _ranges(values: Iterable[int]) -> str:
    """``{ 1, 3-5 }`` style element list of sorted, merged ints."""
    out: list[str] = []
    items = sorted(set(values))
    i = 0
    while i < len(items):
        j = i
        while j + 1 < len(items) and items[j + 1] == items[j] + 1:
            j += 1
        out.append(str(items[i]) if i == j else f"{items[i]}-{items[j]}")
        i = j + 1
    return ", ".join(out)


def _set(name: str, kind: str, elements: Sequence[str], interval: bool = False) -> list[str]:
    lines = [f"\tset {name} {{", f"\t\ttype {kind}"]
    if interval:
        lines.append("\t\tflags interval")
        # a network and an address inside it (fence_hosts = ["10.0.0.0/24"] beside the
        # host's own 10.0.0.5) are one interval, not a conflict
        lines.append("\t\tauto-merge")
    if elements:
        lines.append(f"\t\telements = {{ {', '.join(elements)} }}")
    lines.append("\t}")
    return lines


def fenced_uids(owned: Iterable[tuple[int, int]] = (), extra_uids: Iterable[int] = (),
                app_uids: Iterable[int] = ()) -> frozenset[int]:
    """The UIDs a table fences: those of ``owned``, ``extra_uids`` and ``app_uids``."""
    return frozenset({u for u, _ in owned} | set(extra_uids) | set(app_uids))


def router_addresses(addresses: Iterable[str]) -> tuple[list[str], list[str]]:
    """The valid IPv4 and IPv6 addresses of ``addresses`` (store rows: anything else is
    left out, never handed to nft), sorted, without duplicates."""
    v4: set[ipaddress.IPv4Address] = set()
    v6: set[ipaddress.IPv6Address] = set()
    for text in addresses:
        ip = _literal_ip(str(text))
        if ip is None or ip.is_unspecified:
            continue
        if isinstance(ip, ipaddress.IPv4Address):
            v4.add(ip)
        else:
            v6.add(ip)
    return [str(a) for a in sorted(v4)], [str(a) for a in sorted(v6)]


def render(plan: FencePlan, owned: Iterable[tuple[int, int]] = (),
           extra_uids: Iterable[int] = (), owner: str = "",
           app_uids: Iterable[int] = (), routers: Iterable[str] = (),
           addon_servers: Iterable[int] = (), inbound: Iterable[int] = ()) -> str:
    """The ``nft -f`` text that atomically replaces the fence table.

    ``owned`` are (uid, port) of this runner's live instances; ``app_uids`` the
    UIDs of its live instances and sessions (also those without ports) and of the
    processes left in its UID range (:func:`epio.runner.users.uids_with_processes`);
    ``extra_uids`` are more UIDs to fence (the build user).  Only these UIDs are
    fenced (the set ``app_uids`` of the table: :func:`fenced_uids`), never the
    whole ``runner.uid_min``-``uid_max`` range, so the apps of another runner of
    this host are left to that runner's own table.  ``owner``
    (:func:`owner_comment`) becomes the table's comment.

    The ``input`` chain guards the instance port range and the ports of ``inbound``
    (the static file server's): from another host only the addresses of ``routers``
    may connect, and anyone to the ports of ``addon_servers`` (dedicated add-on
    servers); the rest is reset.
    """
    owned = sorted(set(owned))
    uids = sorted(fenced_uids(owned, extra_uids, app_uids))
    t = plan.table
    lines = [
        "# epio network fence (generated by epio.runner.fence; see docs/security.md)",
        f"table inet {t}",
        f"delete table inet {t}",
        f"table inet {t} {{",
    ]
    if owner:
        lines.append(f'\tcomment "{owner}"')
    ports = _ranges(plan.control_ports)
    lines += _set("control_ports", "inet_service", [ports] if ports else [], interval=True)
    opened = _ranges(plan.open_ports)
    lines += _set("open_ports", "inet_service", [opened] if opened else [], interval=True)
    lines += _set("instance_ports", "inet_service", [str(p) for p in sorted({p for _, p in owned})])
    lines += _set("owned", "uid . inet_service", [f"{u} . {p}" for u, p in owned])
    lines += _set("app_uids", "uid", [str(u) for u in uids])
    lines += _set("hosts4", "ipv4_addr", list(plan.hosts4), interval=True)
    lines += _set("hosts6", "ipv6_addr", list(plan.hosts6), interval=True)
    guarded = sorted(set(inbound))
    guarded_text = [str(p) for p in guarded]
    if plan.instance_range is not None:
        lo, hi = plan.instance_range
        guarded_text.append(f"{lo}-{hi}" if lo < hi else str(lo))
    routers4, routers6 = router_addresses(routers)
    lines += _set("inbound_ports", "inet_service", guarded_text, interval=True)
    lines += _set("addon_servers", "inet_service", [str(p) for p in sorted(set(addon_servers))])
    lines += _set("routers4", "ipv4_addr", routers4)
    lines += _set("routers6", "ipv6_addr", routers6)
    lines += [
        "\tchain input {",
        "\t\ttype filter hook input priority filter; policy accept;",
        "\t\ttcp dport @inbound_ports tcp flags & (syn | ack) == syn jump inbound",
        "\t}",
        "\tchain inbound {",
        "\t\tfib saddr type local accept",
        "\t\tip saddr @routers4 accept",
        "\t\tip6 saddr @routers6 accept",
        "\t\ttcp dport @addon_servers accept",
        "\t\treject with tcp reset",
        "\t}",
    ]
    lines += [
        "\tchain output {",
        "\t\ttype filter hook output priority filter; policy accept;",
        "\t\tmeta skuid @app_uids tcp flags & (syn | ack) == syn jump app",
        "\t}",
        "\tchain app {",
        "\t\tip daddr @hosts4 tcp dport @control_ports reject with tcp reset",
        "\t\tip6 daddr @hosts6 tcp dport @control_ports reject with tcp reset",
        "\t\tfib daddr type != local accept",
        # from here on: a port of this host; deny unless allowed
        "\t\ttcp dport @control_ports reject with tcp reset",
        "\t\ttcp dport @open_ports accept",
        "\t\tmeta skuid . tcp dport @owned accept",
        "\t\ttcp dport @instance_ports reject with tcp reset",
    ]
    if plan.instance_range is not None:
        lo, hi = plan.instance_range
        lines.append(f"\t\ttcp dport {lo}-{hi} accept" if lo < hi
                     else f"\t\ttcp dport {lo} accept")
    lines += [
        "\t\tmeta l4proto tcp reject with tcp reset",
        "\t}",
        "}",
    ]
    return "\n".join(lines) + "\n"


# -- owners: a dead runner's table is removed by the next runner that starts ------------

COMMENT_MAX = 127  # nftables keeps at most 128 bytes of a table comment
OWNER = re.compile(r"^epio runner pid=(\d+) start=(\d+) ns=(\d+) data=(/.*)$")
AUTO_TABLE = re.compile(r"^epio_fence_[0-9a-f]{8}$")


def proc_start(pid: int, proc: Path = Path("/proc")) -> int | None:
    """The start time (clock ticks after boot) of ``pid``, None if it does not exist."""
    try:
        return int((proc / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def pid_namespace(proc: Path = Path("/proc")) -> int | None:
    """The inode of this process's pid namespace."""
    try:
        m = re.match(r"^pid:\[(\d+)\]$", os.readlink(proc / "self" / "ns" / "pid"))
    except OSError:
        return None
    return int(m.group(1)) if m else None


def owner_comment(pid: int, start: int | None, ns: int | None, data_dir: str | Path) -> str:
    """``epio runner pid=P start=S ns=PIDNS data=DIR``, or "" when it cannot be written
    whole (a table without a readable owner is never removed by another runner)."""
    text = f"epio runner pid={pid} start={start} ns={ns} data={Path(data_dir).absolute()}"
    if start is None or ns is None or len(text.encode()) > COMMENT_MAX \
            or not text.isprintable() or '"' in text or "\\" in text:
        return ""
    return text


def owner_gone(comment: str, my_ns: int | None, proc: Path = Path("/proc")) -> bool:
    """Is the runner named in a table's comment dead: in our own pid namespace (another
    one we cannot see into: never), its pid is gone or reused (another start time)?
    Its apps died with it (bubblewrap --die-with-parent, setpriv --pdeathsig), so its
    table protects nothing any more; if it comes back it installs its table again."""
    m = OWNER.match(comment)
    if m is None or my_ns is None or int(m.group(3)) != my_ns:
        return False
    return proc_start(int(m.group(1)), proc) != int(m.group(2))


# -- nft ----------------------------------------------------------------------------


class INft(Interface):
    """What the fence needs of nftables (blocking calls; the fence runs them in threads)."""

    def check(text: str) -> None:
        """Validate ``text`` with the kernel without applying it; raise FenceError."""

    def apply(text: str) -> None:
        """Apply ``text`` in one transaction; raise FenceError."""

    def exists(table: str) -> bool:
        """Is ``inet table`` installed?"""

    def delete(table: str, handle: int | None = None) -> None:
        """Remove ``inet table`` if it is there (only the incarnation ``handle`` if given:
        a table replaced meanwhile has another handle); raise FenceError on other
        failures."""

    def tables() -> dict[str, tuple[int, str]]:
        """The ``inet`` tables named ``epio_fence_<hex>``: name -> (handle, comment)."""


@implementer(INft)
class Nft:
    """The ``nft`` command."""

    def __init__(self, binary: str = "nft", timeout: float = NFT_TIMEOUT) -> None:
        self.binary = binary
        self.timeout = timeout

    def _run(self, args: list[str], text: str | None = None) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run([self.binary, *args], input=text, capture_output=True,
                                  text=True, timeout=self.timeout)
        except (OSError, subprocess.SubprocessError) as e:
            raise FenceError(f"cannot run {self.binary}: {e}") from None

    def _must(self, args: list[str], text: str | None = None) -> None:
        r = self._run(args, text)
        if r.returncode != 0:
            raise FenceError(" ".join((r.stderr or r.stdout).split())[:500]
                             or f"nft exited with {r.returncode}")

    def check(self, text: str) -> None:
        self._must(["-c", "-f", "-"], text)

    def apply(self, text: str) -> None:
        self._must(["-f", "-"], text)

    def exists(self, table: str) -> bool:
        return self._run(["list", "table", "inet", table]).returncode == 0

    def delete(self, table: str, handle: int | None = None) -> None:
        if handle is not None:
            r = self._run(["delete", "table", "inet", "handle", str(handle)])
            if r.returncode != 0 and self.exists(table):
                # gone already, or replaced (another handle): leave the new one alone
                if self._handle(table) == handle:
                    raise FenceError(" ".join(r.stderr.split())[:500])
            return
        if self.exists(table):
            self._must(["delete", "table", "inet", table])

    def _handle(self, table: str) -> int | None:
        r = self._run(["-a", "list", "table", "inet", table])
        m = re.match(r"^table inet \S+ \{ # handle (\d+)", r.stdout)
        return int(m.group(1)) if r.returncode == 0 and m else None

    def tables(self) -> dict[str, tuple[int, str]]:
        out: dict[str, tuple[int, str]] = {}
        listing = self._run(["list", "tables", "inet"])
        for line in listing.stdout.splitlines() if listing.returncode == 0 else ():
            name = line.split()[-1] if line.startswith("table inet ") else ""
            if not AUTO_TABLE.match(name):
                continue
            text = self._run(["-a", "list", "table", "inet", name]).stdout
            h = re.match(r"^table inet \S+ \{ # handle (\d+)", text)
            c = re.search(r'^\s*comment "(.*)"\s*$', text, re.MULTILINE)
            if h:
                out[name] = (int(h.group(1)), c.group(1) if c else "")
        return out


# -- the service -------------------------------------------------------------------


def build_uid(user: str) -> int | None:
    """The UID of the build user (``build.user``), if it exists on this host."""
    try:
        return pwd.getpwnam(user).pw_uid if user else None
    except KeyError:
        return None


class NetworkFence(Service):
    """Keeps the fence table in step with the plan and this runner's instance ports.

    ``owned()`` gives the (uid, port) of live instances and ``app_uids()`` the UIDs
    to fence (:func:`render`); call :meth:`changed` when they may have changed.  The table is installed synchronously in
    ``startService`` (before any app starts), then replaced in a thread whenever
    the rendered text changes, and checked every ``check_interval`` seconds (an
    operator's ``nft flush ruleset`` or a firewall reload removes it: it is put
    back and a warning logged).  On a clean stop it is removed unless
    ``keep_on_stop``.
    """

    log = Logger()

    def __init__(
        self,
        reactor: INodeReactor,
        plan: FencePlan,
        nft: INft,
        owned: Callable[[], Iterable[tuple[int, int]]] = lambda: (),
        extra_uids: Callable[[], Iterable[int]] = lambda: (),
        *,
        enabled: bool = True,
        why_off: str = "",
        keep_on_stop: bool = False,
        check_interval: float = 30.0,
        owner: str = "",
        proc: Path = Path("/proc"),
        in_thread: Callable[..., defer.Deferred[Any]] | None = None,
        app_uids: Callable[[], Iterable[int]] = lambda: (),
        routers: Callable[[], Iterable[str]] = lambda: (),
        addon_servers: Callable[[], Iterable[int]] = lambda: (),
        inbound: Callable[[], Iterable[int]] = lambda: (),
    ) -> None:
        self.reactor = reactor
        self.plan = plan
        self.nft = nft
        self.owned = owned
        self.extra_uids = extra_uids
        self.app_uids = app_uids
        self.routers = routers
        self.addon_servers = addon_servers
        self.inbound = inbound
        self.enabled = enabled
        self.why_off = why_off
        self.keep_on_stop = keep_on_stop
        self.check_interval = check_interval
        self._in_thread = in_thread
        self.owner = owner
        self.proc = proc
        self.state = FenceState.ON if enabled else FenceState.OFF
        self.error = ""
        self.applied: str | None = None  # the text nft last accepted
        self.applied_uids: frozenset[int] = frozenset()  # the UIDs that text fences
        self.applies = 0
        self.reinstalls = 0
        self._busy: defer.Deferred[None] | None = None
        self._dirty = False
        self._check: task.LoopingCall | None = None
        self._synced: list[defer.Deferred[None]] = []  # sync() callers

    def _thread(self, f: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        if self._in_thread is not None:
            return self._in_thread(f, *args)
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), f, *args)

    def desired(self) -> str:
        return self._desired()[0]

    def _desired(self) -> tuple[str, frozenset[int]]:
        """The table's text and the UIDs it fences."""
        owned, extra, uids = list(self.owned()), list(self.extra_uids()), list(self.app_uids())
        return (render(self.plan, owned, extra, self.owner, uids, list(self.routers()),
                       list(self.addon_servers()), list(self.inbound())),
                fenced_uids(owned, extra, uids))

    def wanted_uids(self) -> frozenset[int]:
        """The UIDs that must be fenced now."""
        return fenced_uids(self.owned(), self.extra_uids(), self.app_uids())

    def report(self) -> dict[str, Any]:
        """The fence's part of the runner's ``isolation`` facts."""
        if not self.enabled:
            return {"state": "off", "why": self.why_off}
        out: dict[str, Any] = {"state": self.state, **self.plan.describe()}
        out["fenced_uids"] = len(self.applied_uids)
        v4, v6 = router_addresses(self.routers())
        out["routers"] = v4 + v6  # the other hosts that may reach the instance ports
        if self.error:
            out["error"] = self.error
        return out

    # -- lifecycle --------------------------------------------------------------

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Twisted leaves it untyped
        if not self.enabled:
            self.log.warn("runner isolation OFF: network fence: {why}; app processes can "
                          "connect to the control plane's ports and to other apps' "
                          "instances on this host", why=self.why_off)
            return
        p = self.plan
        self.log.info(
            "network fence ON (nft table inet {table}): TCP connections from the UIDs of "
            "this runner's apps (of {uid_min}-{uid_max}, each added before its first process "
            "starts){build} are reset on every port of this host except "
            "{open} (router, runner.fence_allow_ports), each app's own instances and shared "
            "add-on ports, and the unused instance ports {range}; control ports {ports} are "
            "reset everywhere{hosts}",
            table=p.table, uid_min=p.uid_min, uid_max=p.uid_max,
            build="".join(f" and {u} (build user)" for u in self.extra_uids()),
            open=_ranges(p.open_ports) or "(none)",
            range=(f"{p.instance_range[0]}-{p.instance_range[1]}" if p.instance_range
                   else "(none)"),
            ports=_ranges(p.control_ports) or "(none)",
            hosts=(f", also on {', '.join(p.hosts4 + p.hosts6)}" if p.hosts4 or p.hosts6
                   else ""),
        )
        self.log.info("network fence ON: connections from other hosts to the instance ports "
                      "{range} and the static file server are reset unless they come from a "
                      "router ({routers}; followed in the store) or go to a dedicated add-on "
                      "server", range=(f"{p.instance_range[0]}-{p.instance_range[1]}"
                                       if p.instance_range else "(none)"),
                      routers=" ".join(sum(router_addresses(self.routers()), [])) or "none yet")
        for note in p.notes:
            self.log.warn("network fence: {note}", note=note)
        self._collect()
        text, uids = self._desired()
        try:
            self.nft.apply(text)  # synchronously: before any app process starts
        except FenceError as e:
            # the dry run passed but the real install did not: starting now would run
            # every app unfenced although the operator never turned the fence off
            self._failed(str(e))
            raise SystemExit(refusal(f"nft refused to install the fence table: {e}")) \
                from None
        else:
            self.applied = text
            self.applied_uids = uids
            self.applies += 1
        if self.check_interval > 0:
            self._check = task.LoopingCall(self._verify)
            self._check.clock = self.reactor
            self._check.start(self.check_interval, now=False).addErrback(
                lambda f: self.log.failure("network fence check loop died", f))

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]  # Twisted leaves it untyped
        if self._check is not None and self._check.running:
            self._check.stop()
        self._dirty = False
        self._release_synced()
        done: defer.Deferred[None] = defer.succeed(None)
        if self._busy is not None:
            done = defer.Deferred()
            self._busy.addBoth(lambda _: done.callback(None))
        if self.enabled and not self.keep_on_stop:
            done.addCallback(lambda _: self._remove())
        return done

    def _collect(self) -> None:
        """Remove the tables of dead runners of this host (:func:`owner_gone`), e.g.
        of test nodes that were killed."""
        try:
            tables = self.nft.tables()
            my_ns = pid_namespace(self.proc)
            for name, (handle, comment) in sorted(tables.items()):
                if name != self.plan.table and owner_gone(comment, my_ns, self.proc):
                    self.nft.delete(name, handle)
                    self.log.info("removed the network fence table inet {table} of a runner "
                                  "that is gone ({owner})", table=name, owner=comment)
        except FenceError as e:
            self.log.warn("cannot clean up other runners' fence tables: {error}", error=str(e))

    def _remove(self) -> None:
        try:
            self.nft.delete(self.plan.table)
            self.log.info("network fence removed (nft table inet {table})",
                          table=self.plan.table)
        except FenceError as e:
            self.log.error("cannot remove the network fence table inet {table}: {error}",
                           table=self.plan.table, error=str(e))

    def _move(self, new: FenceState) -> None:
        if new not in FENCE_TRANSITIONS[self.state]:
            raise InvalidTransition(f"network fence: {self.state.value} -> {new.value}")
        self.state = new

    def _failed(self, why: str) -> None:
        self._move(FenceState.FAILED)
        self.error = why
        self.log.error("network fence not applied (nft table inet {table}): {error}",
                       table=self.plan.table, error=why)

    # -- keeping it in step ---------------------------------------------------------

    def sync(self) -> defer.Deferred[None]:
        """Re-render now and fire once the table holds it (at once when it already
        does, or the fence is off or stopped).  Never fails: a failed apply is
        reported by the fence itself (``state`` failed), not by its callers."""
        if not self.enabled or not self.running:
            return defer.succeed(None)
        if self._busy is None and self.desired() == self.applied:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._synced.append(d)
        self.changed()
        return d

    def ready(self) -> defer.Deferred[None]:
        """:meth:`sync`, then fail with :class:`FenceNotApplied` when the fence is on
        but no table of this runner is in place (its apply failed, e.g. after the
        table was flushed) or the table in place does not fence every UID that must
        be fenced now (:meth:`wanted_uids`: the UID of the process about to start
        among them): the gate an app process or ``epio run`` session passes before
        it is spawned, so nothing starts unfenced.  A fence whose latest apply
        failed while an older table that fences those UIDs is still in place lets
        spawns through (a port it lacks is refused: fail-closed)."""

        def check(_: object) -> None:
            if not (self.enabled and self.running):
                return
            if self.applied is None:
                raise FenceNotApplied(
                    f"network fence not applied (nft table inet {self.plan.table}): "
                    f"{self.error or 'not installed'}")
            missing = self.wanted_uids() - self.applied_uids
            if missing:
                raise FenceNotApplied(
                    f"network fence (nft table inet {self.plan.table}) does not fence UID "
                    f"{_ranges(missing)} yet: {self.error or 'its update is not applied'}")

        return self.sync().addCallback(check)

    def _release_synced(self) -> None:
        waiting, self._synced = self._synced, []
        for d in waiting:
            d.callback(None)

    def changed(self) -> None:
        """The instances changed: re-render and, if different, apply (coalesced)."""
        if not self.enabled or not self.running:
            return
        self._dirty = True
        if self._busy is None:
            self._sync()

    def _sync(self) -> None:
        self._dirty = False
        try:
            text, uids = self._desired()
        except Exception:
            self.log.failure("rendering the network fence failed")
            self._release_synced()
            return
        if text == self.applied:
            self._release_synced()
            return
        d = self._thread(self.nft.apply, text)
        self._busy = d

        def ok(_: object) -> None:
            self.applied = text
            self.applied_uids = uids
            self.applies += 1
            if self.state is FenceState.FAILED:
                self.log.info("network fence applied again")
            self._move(FenceState.ON)
            self.error = ""

        def failed(f: Failure) -> None:
            if f.check(FenceError):
                self._failed(f.getErrorMessage())
            else:
                self.log.failure("applying the network fence failed", f)

        def done(_: object) -> None:
            self._busy = None
            if self._dirty and self.running:
                self._sync()
            else:
                self._release_synced()

        d.addCallbacks(ok, failed)
        d.addBoth(done)

    def _verify(self) -> defer.Deferred[None] | None:
        if self._busy is not None or not self.running:
            return None
        d = self._thread(self.nft.exists, self.plan.table)

        def seen(present: bool) -> None:
            if not present and self.running:
                self.reinstalls += 1
                self.log.warn("network fence table inet {table} is gone (nft flush ruleset? "
                              "a firewall reload?): installing it again", table=self.plan.table)
                self.applied = None
                self.applied_uids = frozenset()
            self.changed()  # also picks up a build user created since, and lets the
            # UIDs whose last process is gone out of the table

        d.addCallback(seen)
        d.addErrback(lambda f: self.log.failure("checking the network fence failed", f))
        return d


# -- wiring into the runner ----------------------------------------------------------


@frozen
class FencedIsolation(Isolation):
    """The runner's isolation facts with the network fence's live report."""

    fence: NetworkFence | None = field(default=None, eq=False)

    def as_dict(self) -> dict[str, Any]:
        out = super().as_dict()
        if self.fence is not None:
            report = self.fence.report()
            out["fence"] = report
            if report["state"] != "on":
                out["off"] = {**out["off"], "network": "network fence " + report["state"]
                              + (": " + report.get("why", report.get("error", "")))}
        return out


def detect(mode: str, euid: int, nft_binary: str | None, trial: Callable[[], None]) \
        -> tuple[bool, str]:
    """(enabled, why not).  ``mode`` is ``runner.fence``: on or off."""
    if mode == "off":
        return False, "disabled by runner.fence = off"
    if euid != 0:
        return False, "the runner is not root: it cannot install nftables rules"
    if nft_binary is None:
        return False, "nft (nftables) is not installed"
    try:
        trial()
    except FenceError as e:
        return False, f"nft refused the fence: {e}"
    return True, ""


def refusal(why: str) -> str:
    """What a runner that cannot install its fence says before it exits."""
    return (f"epio: the runner cannot install its network fence: {why}. Run the runner "
            "as root with nftables installed (apt-get install nftables), or set "
            'runner.fence = "off" in the config to run apps without it: they can then '
            "connect to the control plane and every service of this host "
            "(docs/security.md)")


def app_reach(supervisor: Supervisor,
              sessions: SessionManager | None) -> Callable[[], list[tuple[int, int]]]:
    """The (uid, port) pairs this runner's app UIDs may reach: the ports of their live
    instances and the shared add-on ports of their live instances and ``epio run``
    sessions (``sessions`` may be None)."""

    def owned() -> list[tuple[int, int]]:
        live = [i for i in supervisor.instances.values()
                if i.state not in (State.STOPPED, State.FAILED)]
        out = [(i.spec.uid, i.port) for i in live if i.port is not None]
        out += [(i.spec.uid, p) for i in live for p in i.spec.addon_ports]
        if sessions is not None:
            out += sessions.reach()
        return out

    return owned


def app_uids(supervisor: Supervisor,
             sessions: SessionManager | None) -> Callable[[], set[int]]:
    """The UIDs this runner runs apps as: those of its instances that are not stopped
    or failed (also those without ports, e.g. workers, and one whose process is about
    to be spawned: it is STARTING when it passes the spawn gate) and of its live
    ``epio run`` sessions (``sessions`` may be None)."""

    def uids() -> set[int]:
        out = {i.spec.uid for i in supervisor.instances.values()
               if i.state not in (State.STOPPED, State.FAILED)}
        if sessions is not None:
            out |= sessions.uids()
        return out

    return uids


def addon_servers(supervisor: Supervisor) -> Callable[[], list[int]]:
    """The ports of this runner's live dedicated add-on servers (open to other hosts:
    the app's instances elsewhere, the api, backups and standbys connect to them)."""
    from epio.addons.services import KIND_OF_TYPE

    def ports() -> list[int]:
        return [i.port for i in supervisor.instances.values()
                if i.port is not None and i.spec.process_type in KIND_OF_TYPE
                and i.state not in (State.STOPPED, State.FAILED)]

    return ports


def make_fence(reactor: INodeReactor, settings: Settings, roles: Iterable[str], data_dir: Path,
               owned: Callable[[], Iterable[tuple[int, int]]], *,
               uids: Callable[[], Iterable[int]],
               routers: Callable[[], Iterable[str]] = lambda: (),
               servers: Callable[[], Iterable[int]] = lambda: (),
               inbound: Callable[[], Iterable[int]] = lambda: (),
               nft_binary: str | None | bool = True, euid: int | None = None,
               nft: INft | None = None, proc: Path = Path("/proc"),
               in_thread: Callable[..., defer.Deferred[Any]] | None = None) -> NetworkFence:
    """The runner's network fence (detection I/O: before the reactor), following
    ``owned`` (:func:`app_reach`) and fencing the UIDs of ``uids`` (:func:`app_uids`)
    and those of them that left it but still own a process on this host
    (:func:`~epio.runner.users.uids_with_processes`, read from ``proc``), and letting
    the addresses of ``routers`` (and, to the ports of ``servers``, dedicated add-on
    servers: :func:`addon_servers`, anyone) reach the instance ports and those of
    ``inbound`` (the static file server's) from other hosts: a UID enters
    the table before its first process starts and leaves it once its last process is
    gone.  Never a UID this runner did not run: on a host shared with another
    cluster's runner (whose store this one cannot see) with the same UID range, the
    other's apps are left to its own table.  The runner's composition root makes it its first
    child, so it is installed before anything else starts and removed after
    everything else stopped.  ``nft_binary`` (True: look ``nft`` up on PATH), ``euid``,
    ``nft`` (an INft), ``proc`` and ``in_thread`` are for tests.  Exits (SystemExit with
    :func:`refusal`) when the fence is on but cannot be installed."""
    rc = settings.runner
    try:
        plan = plan_from_config(settings, roles, rc.fence_table or table_for(data_dir))
    except ValueError as e:
        raise SystemExit(f"epio: {e}") from None
    binary = shutil.which("nft") if nft_binary is True else (nft_binary or None)
    if nft is None:
        nft = Nft(binary or "nft")
    user = settings.build.user

    def extra() -> list[int]:
        uid = build_uid(user)
        return [] if uid is None or uid == 0 else [uid]

    enabled, why = detect(rc.fence, os.geteuid() if euid is None else euid, binary,
                          lambda: nft.check(render(plan, (), extra())))
    if rc.fence != "off" and not enabled:
        raise SystemExit(refusal(why))
    ran: set[int] = set()  # the UIDs this runner fenced: kept while they own a process

    def fenced() -> set[int]:
        live = set(uids())
        gone = ran - live
        ran.intersection_update(live)
        ran.update(live)
        if gone:
            ran.update(uids_with_processes(gone, proc))
        return set(ran)

    fence = NetworkFence(reactor, plan, nft, owned, extra, enabled=enabled, why_off=why,
                         app_uids=fenced, routers=routers, addon_servers=servers,
                         inbound=inbound, proc=proc, keep_on_stop=rc.fence_keep_on_stop,
                         check_interval=rc.fence_check_interval, in_thread=in_thread,
                         owner=owner_comment(os.getpid(), proc_start(os.getpid()),
                                             pid_namespace(), data_dir))
    fence.setName("network-fence")  # type: ignore[no-untyped-call]  # Twisted leaves it untyped
    return fence
