"""The api listener's request deadlines (epio.api.channel) on fakes: a head must be
complete within header_timeout of its first byte, a body may not stall for
body_timeout nor fall under body_min_rate; a miss is a JSON 408 and a closed
connection.  A connection waiting for its handler, or idle between requests, is not
timed out by these deadlines."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from epio.api.channel import DeadlineChannel, Deadlines
from epio.api.service import CountingSite


class Echo(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[Any] = []

    def render_GET(self, request: Any) -> Any:
        if request.path == b"/wait":
            self.pending.append(request)
            return NOT_DONE_YET
        return b"ok"

    def render_POST(self, request: Any) -> bytes:
        return b"got %d" % len(request.content.read())


class Harness:
    def __init__(self, **deadlines: Any) -> None:
        self.clock = MemoryReactorClock()
        self.resource = Echo()
        self.site = CountingSite(self.resource, Deadlines(**deadlines), self.clock)

    def connect(self) -> tuple[Any, StringTransport]:
        p = self.site.buildProtocol(IPv4Address("TCP", "10.0.0.1", 5000))
        self.assertIsInstance(p)
        t = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 5000))
        p.makeConnection(t)
        return p, t

    @staticmethod
    def assertIsInstance(p: Any) -> None:
        assert isinstance(p, DeadlineChannel), type(p)


def status_and_error(t: StringTransport) -> tuple[bytes, str]:
    raw = t.value()
    head, _, body = raw.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0], json.loads(body)["error"]["code"]


class DeadlineTests(SynchronousTestCase):
    def test_slow_head_is_408(self) -> None:
        """Header lines trickling in do not extend the head's deadline."""
        h = Harness(header_timeout=10)
        p, t = h.connect()
        p.dataReceived(b"GET / HTTP/1.1\r\n")
        for _ in range(9):
            h.clock.advance(1)
            p.dataReceived(b"X-A: 1\r\n")
        self.assertEqual(t.value(), b"")
        h.clock.advance(1.01)
        self.assertEqual(status_and_error(t), (b"HTTP/1.1 408 Request Timeout", "request_timeout"))
        self.assertTrue(t.disconnecting)

    def test_stalled_and_crawling_bodies_are_408(self) -> None:
        """A body that stops for body_timeout, or averages under body_min_rate after the
        grace, is cut off; one that keeps the rate completes."""
        h = Harness(body_timeout=5, body_min_rate=100)
        p, t = h.connect()
        p.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nabc")
        h.clock.advance(4.9)
        self.assertEqual(t.value(), b"")
        h.clock.advance(0.2)
        self.assertEqual(status_and_error(t)[0], b"HTTP/1.1 408 Request Timeout")
        # a byte a second: never a 5 s stall, but 5 s + 8 bytes/100 is the limit
        p, t = h.connect()
        p.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
        for _ in range(8):
            h.clock.advance(1)
            if not t.value():
                p.dataReceived(b"x")
        self.assertEqual(status_and_error(t)[0], b"HTTP/1.1 408 Request Timeout")
        # 200 bytes a second: done after 5 s, well past body_timeout
        p, t = h.connect()
        p.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n\r\n")
        for _ in range(10):
            h.clock.advance(1)
            p.dataReceived(b"y" * 200)
        self.assertIn(b"got 2000", t.value())

    def test_chunked_body_has_the_deadline_too(self) -> None:
        """A chunked body with no length stalls into the same 408."""
        h = Harness(body_timeout=3)
        p, t = h.connect()
        p.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nab")
        h.clock.advance(3.1)
        self.assertEqual(status_and_error(t)[0], b"HTTP/1.1 408 Request Timeout")

    def test_no_deadline_while_handled_or_idle(self) -> None:
        """A request waiting for its handler and a kept-alive idle connection are left
        alone; the next request's head gets its own deadline."""
        h = Harness(header_timeout=2)
        p, t = h.connect()
        p.dataReceived(b"GET /wait HTTP/1.1\r\nHost: x\r\n\r\n")
        h.clock.advance(30)
        self.assertFalse(t.disconnecting)
        req = h.resource.pending.pop()
        req.write(b"late")
        req.finish()
        self.assertIn(b"late", t.value())
        h.clock.advance(30)
        self.assertFalse(t.disconnecting)
        t.clear()
        p.dataReceived(b"GET / HT")
        h.clock.advance(2.1)
        self.assertEqual(status_and_error(t)[0], b"HTTP/1.1 408 Request Timeout")

    def test_pipelined_partial_head_gets_a_deadline(self) -> None:
        """A partial head sent while an earlier request was being handled is timed from
        when the channel gets back to it."""
        h = Harness(header_timeout=2)
        p, t = h.connect()
        p.dataReceived(b"GET /wait HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHos")
        h.clock.advance(10)
        req = h.resource.pending.pop()
        req.finish()
        t.clear()
        h.clock.advance(2.1)
        self.assertEqual(status_and_error(t)[0], b"HTTP/1.1 408 Request Timeout")




class ListenerWiringTests(SynchronousTestCase):
    def test_api_listener_takes_its_config(self) -> None:
        """api.backlog reaches listen(), api.max_connections the site's limit, the api
        deadlines its channel, as make_service wires them from the config."""
        from epio.api.service import make_service
        from epio.config import validate
        from epio.node import Node

        reactor = MemoryReactorClock()
        cfg = validate({"node": {"data_dir": self.mktemp()},
                        "api": {"listen": "tcp:8123:interface=127.0.0.1", "backlog": 77,
                                "max_connections": 5, "header_timeout": 3.0,
                                "body_timeout": 4.0, "body_min_rate": 10}})
        svc = make_service(Node.prepare(reactor, cfg, frozenset({"api"})))
        svc.getServiceNamed("api-http").privilegedStartService()
        ((port, site, backlog, iface),) = reactor.tcpServers
        self.assertEqual((port, backlog, iface), (8123, 77, "127.0.0.1"))
        self.assertEqual(site.limit.limit, 5)
        self.assertEqual(site.deadlines, Deadlines(3.0, 4.0, 10))
        p = site.buildProtocol(IPv4Address("TCP", "10.0.0.1", 5000))
        self.assertIsInstance(p, DeadlineChannel)
        self.assertEqual(site.limit.open, 1)
