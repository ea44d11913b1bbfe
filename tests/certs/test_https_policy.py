"""Per-app HTTPS policy (epio.ini ``[http] https_redirect``, ``hsts_max_age``): from the
manifest through the release, the nexus's route options and the wire to the router's
Route, and the proxy's answers on fakes (308 with path and query, HSTS on HTTPS only)."""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from epio.api.state import release_facts
from epio.lb.observe import Observer
from epio.lb.proxy import LB, LBFactory, Settings
from epio.manifest import ManifestError, parse_manifest
from epio.nexus.storeview import options_of
from epio.routefeed import route_from_wire
from epio.routing import Backend, Route, RouteTable

INI = "[wsgi]\nentrypoint = app:application\n[http]\n"


class ManifestToRouteTests(SynchronousTestCase):
    def test_keys_reach_the_route(self) -> None:
        """https_redirect and hsts_max_age in epio.ini become the router's Route fields."""
        m = parse_manifest(INI + "https_redirect = true\nhsts_max_age = 31536000\n", None,
                           {"requirements.txt"})
        options = options_of(release_facts(m.to_dict()))
        self.assertEqual(options, {"https_redirect": True, "hsts_max_age": 31536000})
        route = route_from_wire({"app": "a", "hostnames": ["a.test"], "backends": [],
                                 "options": options})
        self.assertEqual((route.https_redirect, route.hsts_max_age), (True, 31536000))
        off = parse_manifest(INI + "https_redirect = false\n", None, {"requirements.txt"})
        self.assertEqual(options_of(release_facts(off.to_dict())), {})

    def test_bad_values_refused_with_line(self) -> None:
        """A non-boolean https_redirect or a non-positive hsts_max_age is refused with
        file:line and why."""
        with self.assertRaises(ManifestError) as cm:
            parse_manifest(INI + "https_redirect = sometimes\nhsts_max_age = -5\n", None,
                           {"requirements.txt"})
        text = "\n".join(cm.exception.errors)
        self.assertIn("epio.ini:4: [http] https_redirect: must be true or false", text)
        self.assertIn("epio.ini:5: [http] hsts_max_age: must be a positive integer", text)


class ProxyPolicyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        routes = [
            Route("secure", ["secure.test"], [Backend("127.0.0.1", 9000)], https_redirect=True,
                  hsts_max_age=600),
            Route("plain", ["plain.test"], [Backend("127.0.0.1", 9001)]),
        ]
        self.lb = LB(self.clock, RouteTable("localhost", routes),
                     Settings(https_port=8443, trusted_proxies=("10.9.9.9",)),
                     Observer(None, None, enabled=False))
        self.backends: list[StringTransport] = []

    def client(self, scheme: bytes, peer: str = "10.1.2.3") -> tuple[Any, StringTransport]:
        p = LBFactory(self.lb, scheme).buildProtocol(None)
        t = StringTransport(hostAddress=IPv4Address("TCP", "127.0.0.1", 80),
                            peerAddress=IPv4Address("TCP", peer, 5555))
        p.makeConnection(t)
        return p, t

    def backend_answer(self, n: int) -> bytes:
        """Accept connect attempt ``n``, answer 200, return what the client got."""
        _, _, factory, _, _ = self.clock.tcpClients[n]
        b = factory.buildProtocol(None)
        bt = StringTransport()
        self.backends.append(bt)
        b.makeConnection(bt)
        b.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        return bt.value()

    def test_redirect_keeps_path_and_query(self) -> None:
        """Plain HTTP to an app with https_redirect: 308 to https://HOST:https_port with
        the same path and query, nothing sent to the app; the connection stays usable."""
        p, t = self.client(b"http")
        p.dataReceived(b"GET /a/b?x=1&y=%20 HTTP/1.1\r\nHost: secure.test:8080\r\n\r\n")
        head = t.value().split(b"\r\n\r\n")[0]
        self.assertTrue(head.startswith(b"HTTP/1.1 308 Permanent Redirect\r\n"), head)
        self.assertIn(b"\r\nLocation: https://secure.test:8443/a/b?x=1&y=%20", head)
        self.assertEqual(self.clock.tcpClients, [])
        self.assertFalse(t.disconnecting)
        # a request with a body: answered, then the connection closes (body unread)
        p.dataReceived(b"POST /f HTTP/1.1\r\nHost: secure.test\r\nContent-Length: 3\r\n\r\n")
        self.assertIn(b"Connection: close", t.value().split(b"\r\n\r\n")[-2])
        self.assertEqual(self.clock.tcpClients, [])

    def test_https_gets_hsts_plain_app_neither(self) -> None:
        """Over HTTPS the app is proxied and its response carries Strict-Transport-Security;
        an app without the policy is proxied over HTTP with no such header; a trusted
        proxy's X-Forwarded-Proto: https is not redirected."""
        p, t = self.client(b"https")
        p.dataReceived(b"GET /x HTTP/1.1\r\nHost: secure.test\r\n\r\n")
        self.assertIn(b"GET /x HTTP/1.1", self.backend_answer(0))
        self.assertIn(b"\r\nStrict-Transport-Security: max-age=600\r\n", t.value())
        p, t = self.client(b"http")
        p.dataReceived(b"GET /x HTTP/1.1\r\nHost: plain.test\r\n\r\n")
        self.backend_answer(1)
        self.assertTrue(t.value().startswith(b"HTTP/1.1 200 OK"))
        self.assertNotIn(b"Strict-Transport-Security", t.value())
        p, t = self.client(b"http", peer="10.9.9.9")
        p.dataReceived(b"GET /y HTTP/1.1\r\nHost: secure.test\r\n"
                       b"X-Forwarded-Proto: https\r\n\r\n")
        # sent to the app on the pooled connection of the first request, not redirected
        self.assertEqual(len(self.clock.tcpClients), 2)
        self.assertIn(b"GET /y HTTP/1.1", self.backends[0].value())
        self.assertNotIn(b"308", t.value())
