"""A syslog drain against a real local TCP syslog receiver (octet-counted RFC 5424)."""

from __future__ import annotations

import re

from twisted.internet import reactor, task
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from epio.logs.drains import DrainConfig, DrainManager
from epio.logs.records import LogRecord
from epio.metrics import MetricsRegistry

from .helpers import until


class SyslogReceiver(Protocol):
    """Parses RFC 6587 octet-counting frames."""

    def connectionMade(self) -> None:
        self.buf = b""

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        while True:
            sp = self.buf.find(b" ")
            if sp < 0:
                return
            n = int(self.buf[:sp])
            if len(self.buf) < sp + 1 + n:
                return
            self.factory.messages.append(self.buf[sp + 1 : sp + 1 + n].decode())
            self.buf = self.buf[sp + 1 + n :]


class ReceiverFactory(Factory):
    protocol = SyslogReceiver

    def __init__(self) -> None:
        self.messages: list[str] = []


MSG = re.compile(r"^<14>1 \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z node-x hello web\.1 - - line (\d+)$")


class SyslogDrainTests(TestCase):
    timeout = 60

    async def test_lines_reach_receiver_across_a_restart(self) -> None:
        """Lines are delivered framed and formatted; when the receiver goes away
        lines queue and are delivered after it comes back on the same port."""
        recv = ReceiverFactory()
        port = reactor.listenTCP(0, recv, interface="127.0.0.1")
        number = port.getHost().port
        registry = MetricsRegistry()
        mgr = DrainManager(reactor, DrainConfig(backoff_initial=0.1, backoff_max=0.5,
                                                hostname="node-x"), registry=registry)
        mgr.startService()
        self.addCleanup(mgr.stopService)
        mgr.add("d1", "hello", f"syslog://127.0.0.1:{number}")
        for i in range(1, 101):
            mgr.on_record("hello", LogRecord(i, 1.7e9, "web.1", f"line {i}"))

        async def got(n: int) -> bool:
            return len(recv.messages) >= n

        await until(lambda: got(100), 10)
        nums = [int(MSG.match(m).group(1)) for m in recv.messages]
        self.assertEqual(nums, list(range(1, 101)))

        # the receiver stops; lines queue; it comes back on the same port
        await port.stopListening()
        proto = mgr.drains["d1"].proto
        if proto is not None:  # the server side closed: make the client notice now
            proto.transport.loseConnection()
        await task.deferLater(reactor, 0.2, lambda: None)
        for i in range(101, 151):
            mgr.on_record("hello", LogRecord(i, 1.7e9, "web.1", f"line {i}"))
        port = reactor.listenTCP(number, recv, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        await until(lambda: got(150), 10)
        nums = [int(MSG.match(m).group(1)) for m in recv.messages]
        self.assertEqual(nums, list(range(1, 151)))
        delivered = registry.counter("epio_log_drain_delivered_total", "", ["drain", "app"])
        self.assertEqual(delivered.value("d1", "hello"), 150)
        mgr.remove("d1")
