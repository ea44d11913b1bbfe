"""The bus service contract (tests/bus/contract.py) on the in-memory bus with a
fake clock: what other components' unit tests rely on."""

from __future__ import annotations

from typing import Any

from twisted.internet import task
from twisted.trial.unittest import TestCase

from epio.bus import Bus, bus_settings
from epio.bus.testing import TEST_REGISTRY, MemoryBus, MemoryNetwork
from tests.bus.contract import SECRET, ContractMixin


class MemoryBusTests(ContractMixin, TestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.clock.advance(1_800_000_000)
        self.network = MemoryNetwork()

    def make_bus(self, sender: str, **settings: Any) -> Bus:
        return MemoryBus(self.clock, sender, bus_settings(**settings), network=self.network,
                         secret=SECRET, registry=TEST_REGISTRY)

    async def settle(self, cond: Any = lambda: False, limit: float = 5.0) -> None:
        for _ in range(100):
            self.clock.advance(0)
            if cond():
                return

    async def elapse(self, seconds: float) -> None:
        steps = max(1, int(seconds / 0.01))
        for _ in range(steps):
            self.clock.advance(seconds / steps)
