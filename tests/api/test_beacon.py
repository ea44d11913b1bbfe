"""The api's heartbeat to every nexus (epio.api.beacon), on a fake clock."""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from epio.api.beacon import ApiBeacon, advertised, parse_advertise


class RecordingPublisher(Service):
    """A PUB stand-in: a service whose publish() records what it was given."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any], bytes]] = []

    def publish(self, type: str, body: dict[str, Any], topic: bytes = b"") -> bool:
        self.sent.append((type, body, topic))
        return True


class FakePort:
    def __init__(self, addr: Any) -> None:
        self.addr = addr

    def getHost(self) -> Any:
        return self.addr


class BeaconTests(SynchronousTestCase):
    def test_beats_while_running_with_growing_seq(self) -> None:
        """One api.heartbeat at start and one per interval (topic hb, seq 1, 2, ...);
        a last one saying draining on stop, none after."""
        clock, pub = Clock(), RecordingPublisher()
        beacon = ApiBeacon(clock, pub, "n1", "boot", 0.5, lambda: ("10.0.0.1", 8000))
        beacon.startService()
        self.assertTrue(pub.running)
        clock.advance(0.5)
        clock.advance(0.5)
        self.assertEqual([(t, b["seq"], topic) for t, b, topic in pub.sent],
                         [("api.heartbeat", 1, b"hb"), ("api.heartbeat", 2, b"hb"),
                          ("api.heartbeat", 3, b"hb")])
        self.assertEqual(pub.sent[0][1], {"node_id": "n1", "boot_id": "boot", "seq": 1,
                                          "interval": 0.5, "host": "10.0.0.1", "port": 8000})
        beacon.stopService()
        clock.advance(5)
        self.assertEqual(len(pub.sent), 4)
        self.assertEqual((pub.sent[3][1]["seq"], pub.sent[3][1]["draining"]), (4, True))
        self.assertNotIn("draining", pub.sent[2][1])
        self.assertFalse(pub.running)

    def test_nothing_to_advertise_sends_nothing(self) -> None:
        """Without an address (a Unix listener, no api.advertise) nothing is published."""
        clock, pub = Clock(), RecordingPublisher()
        beacon = ApiBeacon(clock, pub, "n1", "boot", 1.0, lambda: None)
        beacon.startService()
        clock.advance(3)
        self.assertEqual(pub.sent, [])
        beacon.stopService()

    def test_address(self) -> None:
        """api.advertise wins; else the real port on its interface, a wildcard replaced by
        runner.advertise_host; a Unix socket has none."""
        port = FakePort(IPv4Address("TCP", "0.0.0.0", 41234))
        self.assertEqual(advertised(None, port, "10.1.1.1"), ("10.1.1.1", 41234))
        port = FakePort(IPv4Address("TCP", "127.0.0.1", 41234))
        self.assertEqual(advertised(None, port, "10.1.1.1"), ("127.0.0.1", 41234))
        self.assertEqual(advertised(parse_advertise("[::1]:9"), port, "x"), ("::1", 9))
        self.assertIsNone(advertised(None, FakePort(UNIXAddress("/s")), "x"))
        self.assertIsNone(advertised(None, None, "x"))
        self.assertIsNone(parse_advertise(""))
