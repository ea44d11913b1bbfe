"""Requests for an asleep app (docs/apps.md "Sleeping apps"): held, one wake asked, sent
once the route has a backend; bounded in number and time (503 with Retry-After)."""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from epio.lb.observe import Observer
from epio.lb.proxy import LB, WAKE_REPEAT, LBFactory, Settings
from epio.routefeed import merge_routes, route_from_wire
from epio.routing import Backend, Route, RouteDelta, RouteTable

GET = b"GET / HTTP/1.1\r\nHost: a.example.com\r\n\r\n"
POST = b"POST /x HTTP/1.1\r\nHost: a.example.com\r\nContent-Length: 4\r\n\r\nbody"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
ASLEEP = Route("a", ["a.example.com"], [], wake=("tcp://10.0.0.9:7000",), asleep_since=5.0)
AWAKE = Route("a", ["a.example.com"], [Backend("10.0.0.1", 8000)])


class Harness:
    def __init__(self, **settings: Any) -> None:
        self.clock = MemoryReactorClock()
        self.table = RouteTable("localhost", [ASLEEP])
        self.wakes: list[tuple[str, tuple[str, ...]]] = []
        self.lb = LB(self.clock, self.table, Settings(**settings),
                     Observer(None, None, enabled=True), waker=self._wake)
        self.factory = LBFactory(self.lb)

    def _wake(self, app: str, endpoints: tuple[str, ...]) -> None:
        self.wakes.append((app, endpoints))

    def client(self) -> tuple[Any, StringTransport]:
        p = self.factory.buildProtocol(None)
        t = StringTransport(hostAddress=IPv4Address("TCP", "127.0.0.1", 80),
                            peerAddress=IPv4Address("TCP", "10.1.2.3", 5555))
        p.makeConnection(t)
        return p, t

    def wake_up(self) -> None:
        self.table.apply(RouteDelta(upsert=[AWAKE]))
        self.clock.advance(0.01)


class HoldTests(SynchronousTestCase):
    def test_concurrent_requests_one_wake_all_answered(self) -> None:
        """20 requests of an asleep app wait (no answer, no connect) and ask for one wake
        of its runners; once the route has a backend every one is sent, bodies intact."""
        h = Harness()
        clients = [h.client() for _ in range(20)]
        for i, (c, _) in enumerate(clients):
            c.dataReceived(POST if i == 0 else GET)
        self.assertEqual(h.wakes, [("a", ("tcp://10.0.0.9:7000",))])
        self.assertEqual(h.clock.tcpClients, [])
        self.assertTrue(all(t.value() == b"" for _, t in clients))
        h.clock.advance(1.0)
        self.assertEqual(h.clock.tcpClients, [])
        h.wake_up()
        self.assertEqual(len(h.clock.tcpClients), 20)
        bp = h.clock.tcpClients[0][2].buildProtocol(None)
        bt = StringTransport()
        bp.makeConnection(bt)
        self.assertTrue(bt.value().startswith(b"POST /x HTTP/1.1\r\n"))
        self.assertTrue(bt.value().endswith(b"\r\n\r\nbody"))
        bp.dataReceived(OK)
        self.assertTrue(clients[0][1].value().startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertEqual(h.lb.held, {})

    def test_wake_asked_again_after_a_while(self) -> None:
        """A router asks again for a wake of an app still asleep WAKE_REPEAT s later."""
        h = Harness(wake_timeout=30.0)
        h.client()[0].dataReceived(GET)
        h.clock.advance(WAKE_REPEAT / 2)
        h.client()[0].dataReceived(GET)
        self.assertEqual(len(h.wakes), 1)
        h.clock.advance(WAKE_REPEAT / 2)
        h.client()[0].dataReceived(GET)
        self.assertEqual(len(h.wakes), 2)

    def test_wake_timeout_is_503_with_retry_after(self) -> None:
        """A request held past lb.wake_timeout gets 503 wake_timeout with Retry-After."""
        h = Harness(wake_timeout=3.0)
        c, t = h.client()
        c.dataReceived(GET)
        h.clock.advance(2.6)
        h.lb.sweep()
        self.assertEqual(t.value(), b"")
        h.clock.advance(0.5)
        h.lb.sweep()
        self.assertTrue(t.value().startswith(b"HTTP/1.1 503 "))
        self.assertIn(b"\r\nRetry-After: 5\r\n", t.value())
        self.assertEqual(h.lb.held, {})

    def test_queue_bound_is_503_with_retry_after(self) -> None:
        """Past lb.wake_queue_size held requests of one app, more get 503 at once."""
        h = Harness(wake_queue_size=2)
        held = [h.client() for _ in range(2)]
        for c, _ in held:
            c.dataReceived(GET)
        c, t = h.client()
        c.dataReceived(GET)
        self.assertTrue(t.value().startswith(b"HTTP/1.1 503 "))
        self.assertIn(b"\r\nRetry-After: 5\r\n", t.value())
        self.assertTrue(all(t.value() == b"" for _, t in held))

    def test_client_gone_leaves_the_queue(self) -> None:
        """A held client that disconnects is no longer held."""
        from twisted.internet import error
        from twisted.python.failure import Failure

        h = Harness()
        c, _ = h.client()
        c.dataReceived(GET)
        c.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(h.lb.held, {})

    def test_route_no_longer_asleep_releases_to_503(self) -> None:
        """When the app's route stops being asleep without a backend (its wake gave up,
        it was scaled to 0) the held requests get the usual 503 at once."""
        h = Harness()
        c, t = h.client()
        c.dataReceived(GET)
        h.table.apply(RouteDelta(upsert=[Route("a", ["a.example.com"], [])]))
        h.clock.advance(0.01)
        self.assertTrue(t.value().startswith(b"HTTP/1.1 503 "))
        self.assertNotIn(b"Retry-After", t.value())


class WireTests(SynchronousTestCase):
    def test_asleep_route_over_the_wire_and_merged(self) -> None:
        """A route's ``asleep`` reaches the router's Route (wake endpoints, since); two
        nexuses' asleep routes merge (union, earliest); one with a backend is awake."""
        a = {"app": "a", "hostnames": ["a.example.com"], "backends": [],
             "asleep": {"since": 7.0, "wake": ["tcp://10.0.0.9:7000"]}}
        b = {"app": "a", "hostnames": ["a.example.com"], "backends": [],
             "asleep": {"since": 5.0, "wake": ["tcp://10.0.0.8:7000"]}}
        r = route_from_wire(a)
        self.assertEqual((r.wake, r.asleep_since), (("tcp://10.0.0.9:7000",), 7.0))
        merged = merge_routes([a, b])
        self.assertEqual(merged["asleep"], {"since": 5.0, "wake": ["tcp://10.0.0.8:7000",
                                                                   "tcp://10.0.0.9:7000"]})
        up = {"app": "a", "hostnames": ["a.example.com"],
              "backends": [{"instance_id": "i", "host": "10.0.0.1", "port": 8000,
                            "state": "healthy", "release": 1}]}
        self.assertNotIn("asleep", merge_routes([a, up]))
        self.assertEqual(route_from_wire({**a, **{"backends": up["backends"]}}).wake, ())

