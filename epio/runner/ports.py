"""Ports for web instances, from the configured range ``runner.port_min``-``port_max``."""

from __future__ import annotations

import socket
from collections.abc import Callable


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
