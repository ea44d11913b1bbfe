"""Endpoint validation and rate-limited logging (no sockets)."""

from __future__ import annotations

from twisted.internet import reactor, task
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from epio.bus import Bus, bus_settings
from epio.bus.counters import RateLimitedLog
from epio.bus.sockets import check_endpoint
from epio.bus.testing import TEST_REGISTRY

SECRET = b"socket-tests-secret-0123456789"


class EndpointTests(SynchronousTestCase):
    def test_valid_endpoints(self) -> None:
        """IPv4, IPv6, names, ipc and inproc are accepted; port 0 binds any port."""
        for ep in ("tcp://127.0.0.1:7711", "tcp://[::1]:7711", "tcp://node-1.example:1",
                   "ipc:///run/epio/x.sock", "inproc://x"):
            self.assertEqual(check_endpoint(ep, bind=False), ep)
        self.assertEqual(check_endpoint("tcp://127.0.0.1:0", bind=True), "tcp://127.0.0.1:*")
        self.assertEqual(check_endpoint("tcp://*:7711", bind=True), "tcp://*:7711")

    def test_invalid_endpoints(self) -> None:
        """Malformed endpoints fail at once with a message naming the endpoint."""
        for ep, bind in (("127.0.0.1:7711", False), ("tcp://::1:7711", False),
                         ("tcp://127.0.0.1:0", False), ("tcp://*:1", False),
                         ("tcp://h:70000", True), ("http://x:1", False), ("ipc://", True)):
            e = self.assertRaises(ValueError, check_endpoint, ep, bind)
            self.assertIn(repr(ep), str(e))

    def test_service_needs_an_endpoint(self) -> None:
        """A service with nothing to bind or connect is refused when made."""
        bus = Bus(reactor, SECRET, "n", bus_settings(), registry=TEST_REGISTRY)
        self.assertRaises(ValueError, bus.push, [])
        self.assertRaises(ValueError, bus.publisher)


class RateLimitTests(SynchronousTestCase):
    def test_one_line_per_interval(self) -> None:
        """Repeated warnings of one key log once per interval and report the hidden count."""
        clock = task.Clock()
        rl = RateLimitedLog(clock, interval=10)
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for _ in range(5):
            rl.warn("k", "dropped {what}", what="x")
        rl.warn("other", "dropped {what}", what="y")
        clock.advance(10)
        rl.warn("k", "dropped {what}", what="x")
        mine = [e for e in events if e.get("what") in ("x", "y")]
        self.assertEqual([(e["what"], e["hidden"]) for e in mine], [("x", 0), ("y", 0), ("x", 4)])
