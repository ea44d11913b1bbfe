"""Static routes end to end on fakes: runner heartbeat -> nexus route -> router feed ->
the proxy sending static paths to a static server with the token, everything else to
the app, and a client's own X-Epio-Static never passed on (docs/static.md)."""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from epio.lb.observe import Observer
from epio.lb.proxy import LB, LBFactory, Settings
from epio.nexus.core import Nexus
from epio.routefeed import merge_routes, route_from_wire
from epio.routing import Backend, Route, RouteTable, parse_routes, static_token
from tests.nexus.helpers import heartbeat, instance, view

SECRET = b"k" * 32
OK = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"  # never pooled
STATIC = Backend("10.0.0.9", 7735, instance_id="static 10.0.0.9:7735", app="a")


def static_route(**kw: Any) -> Route:
    kw.setdefault("static_prefixes", ("/static", "/media"))
    kw.setdefault("static_backends", (STATIC,))
    return Route("a", ["a.example.com"], [Backend("10.0.0.1", 8000)], **kw)


class RouteTests(SynchronousTestCase):
    def test_prefix_match_on_segment_boundary(self) -> None:
        """/static takes /static, /static/x and /static?x, not /staticx or /x/static."""
        r = static_route()
        for target in (b"/static", b"/static/", b"/static/app.css", b"/static?v=1",
                       b"/media/a/b.png?x=/y"):
            self.assertTrue(r.is_static(target), target)
        for target in (b"/", b"/staticx", b"/x/static/a", b"/stat", b"/?/static/a"):
            self.assertFalse(r.is_static(target), target)
        self.assertTrue(static_route(static_prefixes=("/",)).is_static(b"/anything"))

    def test_static_route_needs_prefixes_and_servers(self) -> None:
        """Route.static exists only with both prefixes and static backends; it carries the
        app's limits; routes without them compare as before."""
        self.assertIsNone(Route("a", [], []).static)
        self.assertIsNone(static_route(static_backends=()).static)
        self.assertIsNone(static_route(static_prefixes=()).static)
        r = static_route(first_byte_timeout=7.0)
        assert r.static is not None
        self.assertEqual(r.static.live, (STATIC,))
        self.assertEqual(r.static.first_byte_timeout, 7.0)
        self.assertEqual(Route("a", [], []), Route("a", [], []))

    def test_routes_file_static_keys(self) -> None:
        """The routes file accepts static_prefixes and static_backends, and checks them."""
        (route,) = parse_routes({"apps": {"a": {
            "hostnames": ["a.example.com"], "backends": ["10.0.0.1:8000"],
            "static_prefixes": ["/static"], "static_backends": ["[::1]:7735"]}}})
        self.assertEqual(route.static_prefixes, ("/static",))
        self.assertEqual(route.static_backends[0].address, ("::1", 7735))
        from epio.routing import RoutesFileError
        with self.assertRaises(RoutesFileError):
            parse_routes({"apps": {"a": {"static_prefixes": ["static"]}}})

    def test_token_depends_on_secret_and_app(self) -> None:
        """Tokens differ per app and per cluster secret."""
        t = static_token(SECRET, "a")
        self.assertEqual(t, static_token(SECRET, "a"))
        self.assertNotEqual(t, static_token(SECRET, "b"))
        self.assertNotEqual(t, static_token(b"j" * 32, "a"))


class NexusTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.published: list[tuple[str, dict[str, Any]]] = []
        self.nexus = Nexus(self.clock, "nx1", lambda t, b: self.published.append((t, b)),
                           warmup=0)
        self.nexus.start()
        self.nexus.set_view(view("hello", live={"hello": {1}}))

    def beat(self, node: str, seq: int, insts: list[dict[str, Any]], **static: Any) -> None:
        body = heartbeat(node=node, seq=seq, instances=insts)
        body.update(static)
        self.nexus.heartbeat(body)
        self.clock.advance(0)

    def test_route_gets_static_servers_of_nodes_with_a_routable_instance(self) -> None:
        """Static servers enter the route only from nodes running a healthy web instance of
        a live release of the app; prefixes are the union of what they serve; a route
        without any carries no static keys."""
        self.beat("n1", 1, [instance("i1", port=8001)], static="0.0.0.0:7735",
                  static_prefixes={"hello": ["/static"]})
        self.beat("n2", 1, [instance("i2", port=8002, release=2)], static="10.0.0.2:7735",
                  static_prefixes={"hello": ["/old"]})  # not a live release
        self.beat("n3", 1, [instance("i3", port=8003, state="starting")],
                  static="10.0.0.3:7735", static_prefixes={"hello": ["/x"]})
        route = self.nexus.book.routes["hello"]
        self.assertEqual(route["static_prefixes"], ["/static"])
        self.assertEqual(route["static_backends"], [{"host": "127.0.0.1", "port": 7735}])
        parsed = route_from_wire(route)
        assert parsed.static is not None
        self.assertEqual(parsed.static.live[0].address, ("127.0.0.1", 7735))
        self.beat("n1", 2, [instance("i1", port=8001)], static="127.0.0.1:7735",
                  static_prefixes={})
        self.assertNotIn("static_prefixes", self.nexus.book.routes["hello"])

    def test_static_change_alone_publishes_a_delta(self) -> None:
        """A heartbeat that changes only the static fields (same instances) moves the
        route in a delta."""
        self.beat("n1", 1, [instance("i1")])
        before = len([1 for t, _ in self.published if t == "nexus.delta"])
        self.beat("n1", 2, [instance("i1")], static="127.0.0.1:7735",
                  static_prefixes={"hello": ["/static"]})
        deltas = [b for t, b in self.published if t == "nexus.delta"]
        self.assertEqual(len(deltas), before + 1)
        self.assertEqual(deltas[-1]["changes"][0]["route"]["static_prefixes"], ["/static"])

    def test_malformed_static_fields_ignored(self) -> None:
        """A bad ``static`` endpoint or prefix list means no static server (no crash)."""
        for seq, bad in enumerate(("nope", "h:0", "h:99999", 5, "h:x"), start=1):
            self.beat("n1", seq, [instance("i1")], static=bad,
                      static_prefixes={"hello": ["/static"]})
            self.assertNotIn("static_prefixes", self.nexus.book.routes["hello"], bad)
        self.beat("n1", 7, [instance("i1")], static="127.0.0.1:7735",
                  static_prefixes={"hello": "/static"})
        self.assertNotIn("static_prefixes", self.nexus.book.routes["hello"])
        self.assertEqual(self.nexus.tracker.counters["invalid"], 0)

    def test_merge_unions_static(self) -> None:
        """Two nexuses' routes that differ merge static prefixes and servers as unions."""
        a = {"app": "a", "hostnames": ["a.x"], "backends": [], "maintenance": False,
             "options": {}, "static_prefixes": ["/static"],
             "static_backends": [{"host": "10.0.0.1", "port": 7735}]}
        b = dict(a, static_prefixes=["/media"],
                 static_backends=[{"host": "10.0.0.2", "port": 7735}])
        m = merge_routes([a, b])
        self.assertEqual(m["static_prefixes"], ["/media", "/static"])
        self.assertEqual(len(m["static_backends"]), 2)
        self.assertNotIn("static_prefixes", merge_routes([dict(a, static_prefixes=[]),
                                                          dict(b, static_prefixes=[])]))


class ProxyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.table = RouteTable("localhost", [static_route()])
        self.lb = LB(self.clock, self.table, Settings(), Observer(None, None, enabled=True))
        self.lb.static_secret = SECRET
        self.factory = LBFactory(self.lb)
        self.n = 0

    def send(self, raw: bytes) -> tuple[bytes, tuple[str, int], StringTransport]:
        p = self.factory.buildProtocol(None)
        t = StringTransport(hostAddress=IPv4Address("TCP", "127.0.0.1", 80),
                            peerAddress=IPv4Address("TCP", "10.1.2.3", 5555))
        p.makeConnection(t)
        p.dataReceived(raw)
        host, port, factory, _, _ = self.clock.tcpClients[self.n]
        self.n += 1
        bp = factory.buildProtocol(None)
        bt = StringTransport()
        bp.makeConnection(bt)
        head = bt.value()
        bp.dataReceived(OK)
        self.assertTrue(t.value().endswith(b"\r\n\r\nok"))
        return head, (host, port), t

    def test_static_path_goes_to_static_server_with_token(self) -> None:
        """GET /static/app.css goes to the static server with exactly one X-Epio-Static
        (the router's token), even when the client sent a forged one."""
        forged = b"X-Epio-Static: a " + b"0" * 32 + b"\r\nx-epio-static: b forged\r\n"
        head, addr, _ = self.send(b"GET /static/app.css?v=2 HTTP/1.1\r\nHost: a.example.com\r\n"
                                  + forged + b"\r\n")
        self.assertEqual(addr, ("10.0.0.9", 7735))
        self.assertTrue(head.startswith(b"GET /static/app.css?v=2 HTTP/1.1\r\n"))
        token = static_token(SECRET, "a").encode()
        self.assertEqual(head.lower().count(b"x-epio-static"), 1, head)
        self.assertIn(b"X-Epio-Static: a " + token + b"\r\n", head)
        self.assertNotIn(b"forged", head)
        self.assertNotIn(b"0" * 32, head)

    def test_other_paths_go_to_app_without_any_static_header(self) -> None:
        """/ and /staticx go to the app; a client's X-Epio-Static is dropped there too."""
        for target in (b"/", b"/staticx/a.css"):
            head, addr, _ = self.send(b"GET " + target + b" HTTP/1.1\r\nHost: a.example.com\r\n"
                                      b"X-Epio-Static: a " + static_token(SECRET, "a").encode()
                                      + b"\r\n\r\n")
            self.assertEqual(addr, ("10.0.0.1", 8000), target)
            self.assertNotIn(b"x-epio-static", head.lower())

    def test_without_static_servers_or_secret_app_serves(self) -> None:
        """No static server in the route, or no secret in the router: /static goes to the
        app (which may serve its own files)."""
        self.table.replace([static_route(static_backends=())])
        _, addr, _ = self.send(b"GET /static/a.css HTTP/1.1\r\nHost: a.example.com\r\n\r\n")
        self.assertEqual(addr, ("10.0.0.1", 8000))
        self.table.replace([static_route()])
        self.lb.static_secret = b""
        _, addr, _ = self.send(b"GET /static/a.css HTTP/1.1\r\nHost: a.example.com\r\n\r\n")
        self.assertEqual(addr, ("10.0.0.1", 8000))

    def test_maintenance_applies_to_static_paths(self) -> None:
        """An app in maintenance answers 503 for its static paths too."""
        self.table.replace([static_route(maintenance=True)])
        p = self.factory.buildProtocol(None)
        t = StringTransport(hostAddress=IPv4Address("TCP", "127.0.0.1", 80),
                            peerAddress=IPv4Address("TCP", "10.1.2.3", 5555))
        p.makeConnection(t)
        p.dataReceived(b"GET /static/a.css HTTP/1.1\r\nHost: a.example.com\r\n\r\n")
        self.assertTrue(t.value().startswith(b"HTTP/1.1 503"))
        self.assertEqual(self.clock.tcpClients, [])
