"""The BusLogSink contract (tests/bus/contract.py) over real ZeroMQ PULL sockets
(inproc://, in this process)."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor, task
from twisted.trial.unittest import TestCase

from epio.bus import Bus, bus_settings
from epio.bus.testing import TEST_REGISTRY
from tests.bus.contract import BusLogSinkContract

SECRET = b"k" * 32


class RealBusLogSinkTests(BusLogSinkContract, TestCase):
    def make_bus(self, **settings: Any) -> Bus:
        return Bus(reactor, SECRET, "node-x", bus_settings(**settings), registry=TEST_REGISTRY)

    async def wait_for(self, cond: Any) -> None:
        for _ in range(300):
            if cond():
                return
            await task.deferLater(reactor, 0.01)
