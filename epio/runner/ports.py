"""Ports for web instances, from the configured range ``runner.port_min``-``port_max``."""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Callable, Iterable
from pathlib import Path

#: ``/proc/net/tcp`` state of a listening socket
_LISTEN = "0A"


class NoFreePort(Exception):
    """Every port of the range is allocated or busy."""


def bindable(host: str) -> Callable[[int], bool]:
    """A check that ``port`` can be bound on ``host`` right now (someone else may hold it)."""

    def check(port: int) -> bool:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            # as servers bind: a port whose old connections linger in TIME_WAIT is free
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                return False
            return True

    return check


class PortAllocator:
    """Hands out ports round-robin (a freed port is not reused at once) and skips busy ones."""

    def __init__(self, low: int, high: int, is_free: Callable[[int], bool]) -> None:
        if not 0 < low <= high < 65536:
            raise ValueError(f"bad port range {low}-{high}")
        self.low, self.high = low, high
        self.is_free = is_free
        self.used: set[int] = set()
        self._next = low

    def allocate(self) -> int:
        size = self.high - self.low + 1
        for _ in range(size):
            port = self._next
            self._next = self.low + (port - self.low + 1) % size
            if port not in self.used and self.is_free(port):
                self.used.add(port)
                return port
        raise NoFreePort(f"no free port in {self.low}-{self.high}")

    def claim_if_free(self, port: int) -> bool:
        """Take ``port`` if it is in the range, unallocated and bindable."""
        if isinstance(port, int) and self.low <= port <= self.high and port not in self.used \
                and self.is_free(port):
            self.used.add(port)
            return True
        return False

    def release(self, port: int | None) -> None:
        if port is not None:
            self.used.discard(port)


def process_tree(pids: Iterable[int], proc: Path = Path("/proc")) -> set[int]:
    """``pids`` and every descendant of them (from ``/proc/*/stat`` parent pids)."""
    parent: dict[int, int] = {}
    for entry in os.listdir(proc):
        if not entry.isdigit():
            continue
        try:
            stat = (proc / entry / "stat").read_text()
            parent[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    tree = set(pids)
    grew = True
    while grew:
        more = {pid for pid, ppid in parent.items() if ppid in tree and pid not in tree}
        tree |= more
        grew = bool(more)
    return tree


def _address(hexaddr: str) -> str:
    """The address of a ``/proc/net/tcp{,6}`` field: IPv4 as one little-endian 32-bit
    word, IPv6 as four of them."""
    raw = bytes.fromhex(hexaddr)
    if len(raw) == 4:
        return str(ipaddress.IPv4Address(raw[::-1]))
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.IPv6Address(words))


def covers(address: str, host: str) -> bool:
    """Whether a socket listening on ``address`` takes connections to ``host``: the
    wildcard of its family (``::`` takes IPv4 too unless it is v6-only, which /proc does
    not tell: taken as covering), the host itself, or its IPv4-mapped form."""
    if address in ("0.0.0.0", "::"):
        return True
    try:
        a, h = ipaddress.ip_address(address), ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        a = a.ipv4_mapped
    return a == h


def listening_ports(pids: Iterable[int], proc: Path = Path("/proc"),
                    host: str | None = None) -> list[int]:
    """TCP ports (IPv4 and IPv6) on which these processes hold a listening socket:
    their socket inodes (``/proc/PID/fd``) matched against ``/proc/PID/net/tcp{,6}``
    (the processes' own network namespace).  With ``host``, only sockets that take
    connections to that address (:func:`covers`)."""
    inodes: set[str] = set()
    net: Path | None = None
    for pid in pids:
        fd_dir = proc / str(pid) / "fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd_dir / fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
                net = net or proc / str(pid) / "net"
    if not inodes or net is None:
        return []
    ports: set[int] = set()
    for name in ("tcp", "tcp6"):
        try:
            lines = (net / name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) > 9 and f[3] == _LISTEN and f[9] in inodes:
                addr, port = f[1].rsplit(":", 1)
                if host is None or covers(_address(addr), host):
                    ports.add(int(port, 16))
    return sorted(ports)
