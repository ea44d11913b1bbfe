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
"""

from __future__ import annotations

import resource
from pathlib import Path
from typing import Protocol, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger
from zope.interface import implementer

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
