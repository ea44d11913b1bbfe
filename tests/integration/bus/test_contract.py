"""The bus service contract (tests/bus/contract.py) over real ZeroMQ sockets on
127.0.0.1, in this process."""

from __future__ import annotations

import time
from typing import Any

from twisted.internet import reactor, task
from twisted.trial.unittest import TestCase

from epio.bus import Bus, bus_settings
from epio.bus.testing import TEST_REGISTRY
from tests.bus.contract import SECRET, ContractMixin


class RealBusTests(ContractMixin, TestCase):
    """The same contract over real sockets on 127.0.0.1 (in this process)."""

    def setUp(self) -> None:
        self.clock = reactor

    def make_bus(self, sender: str, **settings: Any) -> Bus:
        return Bus(reactor, SECRET, sender, bus_settings(**settings), registry=TEST_REGISTRY)

    async def settle(self, cond: Any = lambda: False, limit: float = 5.0) -> None:
        deadline = time.monotonic() + limit
        while not cond() and time.monotonic() < deadline:
            await task.deferLater(reactor, 0.005)

    async def elapse(self, seconds: float) -> None:
        await task.deferLater(reactor, seconds)
