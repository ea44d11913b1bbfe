"""What every public listener of a node shares: its listen backlog, a cap on its open
connections, and the process's open-files limit (docs/router.md "Resources").

- :func:`raise_nofile_limit`: the node raises its ``RLIMIT_NOFILE`` soft limit to the
  hard limit at start (a systemd default of 1024 stopped the router and the api at
  1,000 held connections and made app processes fail to spawn).
- :func:`with_backlog`: a listen endpoint string with ``backlog=N`` (Twisted's
  default is 50: 1,000 clients connecting at once waited 1 s and more for a SYN
  retransmission), capped by ``net.core.somaxconn`` as the kernel would.
- :class:`ConnectionLimit`: at ``limit`` open connections the listening ports stop
  accepting (new connections wait in the kernel's backlog, like HAProxy's
  ``maxconn``) and start again as connections close.
- :func:`port_conflicts`: before any role starts, the node binds each TCP port its
  roles listen on once (:func:`node_listeners`) and refuses to start, naming the key
  to change, when one is taken (another node on this host): fail fast instead of
  half the roles serving while the others cannot bind.
- :class:`ListenFailed` and :func:`stop_message`: a port that passed that check but
  cannot be bound when its role starts (taken in between by a racing node, or by a
  program the check cannot see: an IPv6-only listener on a port a bus socket binds
  dual-stack) stops the whole node with one line naming the port, the role and the
  key (:class:`epio.tap.NodeService`, :class:`epio.node.NodeExit`).
- :func:`required_listener`: a listening service whose failure to listen raises at
  once (Twisted's would only log it and serve without the port).
"""

from __future__ import annotations

import errno
import os
import resource
import socket
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

from attrs import frozen
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

if TYPE_CHECKING:
    from epio.config.settings import Settings

SOMAXCONN = Path("/proc/sys/net/core/somaxconn")
NR_OPEN = Path("/proc/sys/fs/nr_open")
_BACKLOG_KINDS = ("tcp:", "tcp6:", "unix:", "ssl:")

log = Logger(namespace="epio.listen")


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def raise_nofile_limit() -> tuple[int, int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit (or ``fs.nr_open`` when the
    hard limit is unlimited); returns (soft before, soft after, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        target = _read_int(NR_OPEN) or 1048576
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft, soft, hard
        return soft, target, hard
    return soft, soft, hard


def effective_backlog(wanted: int) -> tuple[int, int | None]:
    """(the backlog the kernel will use, net.core.somaxconn or None if unknown)."""
    cap = _read_int(SOMAXCONN)
    return (min(wanted, cap) if cap else wanted), cap


def with_backlog(endpoint: str, backlog: int) -> str:
    """``endpoint`` with ``:backlog=N`` when it is a kind that takes one and does not
    name one already (an operator's explicit ``backlog=`` wins)."""
    if not endpoint.startswith(_BACKLOG_KINDS) or "backlog=" in endpoint:
        return endpoint
    return f"{endpoint}:backlog={backlog}"


def log_backlog(name: str, wanted: int) -> int:
    """Log the backlog a listener gets (and whether somaxconn capped it); returns it."""
    got, cap = effective_backlog(wanted)
    if got < wanted:
        log.warn("{name}: listen backlog {wanted} capped to {got} by net.core.somaxconn; "
                 "raise it (sysctl net.core.somaxconn) for bursts of connections",
                 name=name, wanted=wanted, got=got)
    else:
        log.info("{name}: listen backlog {got} (net.core.somaxconn {cap})", name=name, got=got,
                 cap=cap if cap is not None else "unknown")
    return got


class ConnectionLimit:
    """At most ``limit`` open connections over the ports it watches (0: no limit).

    :meth:`opened` is called as a connection is built (``False``: refuse it, the rare
    case of connections accepted in the same batch as the one that reached the
    limit); :meth:`closed` when it is lost.  At the limit every watched port stops
    accepting; below it again they resume.
    """

    log = Logger()

    def __init__(self, name: str, limit: int) -> None:
        self.name = name
        self.limit = limit
        self.open = 0
        self.paused = False
        self.pauses = 0  # times the limit was reached (for /metrics and tests)
        self.refused = 0
        self.ports: list[ReadingPort] = []

    def watch(self, port: ReadingPort) -> None:
        """A listening port (``IListeningPort`` with ``stopReading``/``startReading``)."""
        self.ports.append(port)
        if self.paused:
            port.stopReading()

    def opened(self) -> bool:
        if self.limit and self.open >= self.limit:
            self.refused += 1
            return False
        self.open += 1
        if self.limit and self.open >= self.limit and not self.paused:
            self.paused = True
            self.pauses += 1
            self.log.warn("{name}: {n} connections open (max_connections): not accepting "
                          "more until some close", name=self.name, n=self.open)
            for p in self.ports:
                p.stopReading()
        return True

    def closed(self) -> None:
        self.open -= 1
        if self.paused and self.open < self.limit:
            self.paused = False
            self.log.info("{name}: below max_connections again; accepting",
                          name=self.name)
            for p in self.ports:
                if getattr(p, "connected", False):  # still listening
                    p.startReading()


class ReadingPort(Protocol):
    """A listening port that can stop and resume accepting (Twisted's ``tcp.Port``
    and ``unix.Port``: ``IListeningPort`` and ``IReadDescriptor`` at once)."""

    def stopReading(self) -> None: ...

    def startReading(self) -> None: ...


@implementer(IStreamServerEndpoint)
class LimitedEndpoint:
    """An endpoint whose listening port a :class:`ConnectionLimit` watches."""

    def __init__(self, inner: IStreamServerEndpoint, limit: ConnectionLimit) -> None:
        self.inner = inner
        self.limit = limit

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        d: Deferred[IListeningPort] = self.inner.listen(factory)

        def watch(port: IListeningPort) -> IListeningPort:
            self.limit.watch(cast(ReadingPort, port))  # a tcp/unix Port reads too
            return port

        return d.addCallback(watch)


# -- the ports a node listens on ----------------------------------------------------

@frozen
class Target:
    """A TCP host and port taken from one config value (``host`` may be "")."""

    host: str
    port: int


def _split_escaped(text: str) -> list[str]:
    out, cur, i = [], [], 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            cur.append(text[i + 1])
            i += 2
            continue
        if c == ":":
            out.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    out.append("".join(cur))
    return out


def twisted_endpoint(desc: str) -> Target | None:
    """``tcp:8000:interface=127.0.0.1`` (also tcp6, ssl, ``port=``); None for unix etc."""
    if not desc:
        return None
    parts = _split_escaped(desc)
    if len(parts) == 1 and parts[0].isdigit():
        return Target("", int(parts[0]))
    kind, args = parts[0].lower(), parts[1:]
    if kind not in ("tcp", "tcp6", "ssl"):
        return None
    port: str | None = None
    host = ""
    for a in args:
        key, eq, value = a.partition("=")
        if not eq:
            if port is None:
                port = a
        elif key == "port":
            port = value
        elif key == "interface":
            host = value
    if port is None or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return Target(host, int(port))


def zmq_endpoint(url: str) -> Target | None:
    """``tcp://host:port`` (``*``, ``[::1]``); None for ipc://, inproc:// or ``*`` ports."""
    if not url.startswith("tcp://"):
        return None
    rest = url[len("tcp://"):]
    if ";" in rest:  # tcp://source;dest
        rest = rest.split(";", 1)[1]
    host, _, port = rest.rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return Target(host.strip("[]"), int(port))


#: The listeners of each role: (section, key, "twisted" endpoint string or "zmq" URL).
LISTENERS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "api": (("api", "listen", "twisted"),),
    "lb": (("lb", "listen", "twisted"), ("lb", "tls_listen", "twisted")),
    "nexus": (("nexus", "heartbeat_bind", "zmq"), ("nexus", "router_bind", "zmq"),
              ("nexus", "publish_bind", "zmq")),
    "runner": (("runner", "control_bind", "zmq"), ("runner", "static_listen", "twisted")),
    "logger": (("logger", "pull_bind", "zmq"), ("logger", "router_bind", "zmq"),
               ("logger", "publish_bind", "zmq")),
    "backup": (("backup", "control_bind", "zmq"),),
}
ALL_ROLES = ("api", "nexus", "lb", "runner", "logger", "backup")


@frozen
class Listener:
    """One TCP port a node listens on: the config key that names it and its value."""

    key: str  # e.g. "nexus.heartbeat_bind"
    value: str
    target: Target


def node_listeners(settings: Settings, roles: Iterable[str]) -> list[Listener]:
    """The fixed TCP ports the node's ``roles`` listen on, and ``metrics.listen``
    (port 0 -- any free port --, unix sockets and ipc:// are left out)."""
    wanted = set(roles)
    if "all" in wanted:
        wanted = set(ALL_ROLES)
    out: list[Listener] = []
    for role in ALL_ROLES:
        if role not in wanted:
            continue
        for section, key, kind in LISTENERS[role]:
            value = str(getattr(getattr(settings, section), key))
            target = twisted_endpoint(value) if kind == "twisted" else zmq_endpoint(value)
            if target is not None:
                out.append(Listener(f"{section}.{key}", value, target))
    metrics = twisted_endpoint(settings.metrics.listen)
    if metrics is not None:
        out.append(Listener("metrics.listen", settings.metrics.listen, metrics))
    return out


def try_bind(host: str, port: int) -> None:
    """Bind (and at once close) a TCP socket at ``host:port`` as a listener would
    (SO_REUSEADDR: a port in TIME_WAIT is free); raise OSError when it is taken."""
    host = "" if host in ("", "*") else host
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    if not host:  # every address: the IPv4 wildcard, as Twisted's tcp:PORT binds
        infos = [i for i in infos if i[0] == socket.AF_INET] or infos
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(address)
        s.listen(1)


def port_conflicts(listeners: Iterable[Listener],
                   bind: Callable[[str, int], None] = try_bind) -> list[str]:
    """One sentence per listener whose port cannot be bound (empty: all are free)."""
    problems: list[str] = []
    for ln in listeners:
        host, port = ln.target.host, ln.target.port
        try:
            bind(host, port)
        except OSError as e:
            why = os.strerror(e.errno) if e.errno else str(e)
            if e.errno == errno.EADDRINUSE:
                why += " (another node or program on this host listens there)"
            problems.append(f"cannot listen on port {port} ({ln.key} = {ln.value!r}): {why}; "
                            f"stop that program or set {ln.key} to a free port")
    return problems


class ListenFailed(SystemExit):
    """A port a role needs cannot be bound (the pre-start check passed): the node must
    not run without it.  ``endpoint`` is the value as configured, ``port`` its port
    (None when it has none), ``reason`` why (strerror)."""

    def __init__(self, message: str, endpoint: str, port: int | None, reason: str) -> None:
        super().__init__(message)
        self.endpoint = endpoint
        self.port = port
        self.reason = reason


def stop_message(settings: Settings, role: str, endpoint: str, port: int | None,
                 reason: str, in_use: bool) -> str:
    """The one line a node stops with when ``role`` cannot bind ``endpoint``: the port,
    the role and the config key naming it (found among the role's listeners and
    ``metrics.listen``), and what to change."""
    why = reason + (" (another node or program on this host listens there)" if in_use else "")
    where = f"port {port}" if port is not None else endpoint
    key = None
    for ln in node_listeners(settings, [role] if role in LISTENERS else []):
        if ln.value == endpoint or (port is not None and ln.target.port == port):
            key = ln
            break
    if key is None:
        return (f"epio: the node stops: the {role} role cannot listen on {where} "
                f"({endpoint!r}): {why}")
    return (f"epio: the node stops: the {role} role cannot listen on {where} "
            f"({key.key} = {key.value!r}): {why}; stop that program or set {key.key} to "
            f"a free port")


def listen_error(e: BaseException) -> tuple[str, int | None, str, bool] | None:
    """(endpoint, port, reason, address in use) of a failure to listen -- a
    :class:`ListenFailed` or Twisted's ``CannotListenError`` --; None for anything else."""
    from twisted.internet.error import CannotListenError

    if isinstance(e, ListenFailed):
        return e.endpoint, e.port, e.reason, "in use" in e.reason
    if isinstance(e, CannotListenError):
        err = e.socketError
        errno_ = err.errno if isinstance(err, OSError) else None
        reason = os.strerror(errno_) if errno_ else str(err)
        return f"{e.interface or '*'}:{e.port}", e.port, reason, errno_ == errno.EADDRINUSE
    return None


def stop_on_listen_failure(settings: Settings, role: str,
                           stop: Callable[[str], None]) -> Callable[[Failure], None]:
    """An errback for a listen that happens after the node started (the router listens
    once it has routes): the node stops (``stop``, :class:`epio.node.NodeExit`) with
    :func:`stop_message`'s line."""

    def failed(f: Failure) -> None:
        what = listen_error(f.value) if f.value is not None else None
        if what is None:
            stop(f"epio: the node stops: the {role} role cannot listen: {f.getErrorMessage()}")
        else:
            stop(stop_message(settings, role, *what))

    return failed


def required_listener(endpoint: IStreamServerEndpoint | Any,
                      factory: IProtocolFactory) -> StreamServerEndpointService:
    """A service listening on ``endpoint`` that raises (``CannotListenError``) from
    ``privilegedStartService``/``startService`` when it cannot listen, so the node
    stops (:class:`epio.tap.NodeService`); Twisted's default only logs the failure and
    carries on without the port.  ``_raiseSynchronously`` is Twisted's own switch for
    this (``twisted.application.strports.service`` sets it)."""
    svc = StreamServerEndpointService(endpoint, factory)
    svc._raiseSynchronously = True
    return svc


def refuse_port_conflicts(settings: Settings, roles: Iterable[str],
                          bind: Callable[[str, int], None] = try_bind) -> None:
    """Exit (SystemExit naming every taken port and the key to change) when a port
    the node needs is taken: nothing of the node has started yet."""
    problems = port_conflicts(node_listeners(settings, roles), bind)
    if problems:
        raise SystemExit("epio: the node cannot start: " + "; ".join(problems))
