"""Unit tests of the proxy's state machines on fakes (MemoryReactorClock, StringTransport):
pool reuse and idle expiry, connect failover, ejection, queueing, retries, timeouts."""

from __future__ import annotations

from typing import Any

from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from epio.lb.observe import Observer
from epio.lb.proxy import C_HEAD, C_TUNNEL, LB, LBFactory, Settings
from epio.routing import Backend, InvalidTransition, Route, RouteTable

GET = b"GET / HTTP/1.1\r\nHost: a.example.com\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class Harness:
    def __init__(self, backends: list[Backend], route: dict[str, Any] | None = None,
                 spool_dir: str | None = None, open_file: Any = None,
                 static_secret: bytes = b"", **settings: Any) -> None:
        self.clock = MemoryReactorClock()
        self.table = RouteTable("localhost", [Route("a", ["a.example.com"], backends,
                                                    **(route or {}))])
        self.observer = Observer(None, None, enabled=True)
        self.lb = LB(self.clock, self.table, Settings(**settings), self.observer,
                     spool_dir=spool_dir, static_secret=static_secret,
                     **({"open_file": open_file} if open_file is not None else {}))
        self.factory = LBFactory(self.lb)
        self.next_connect = 0

    def client(self) -> tuple[Any, StringTransport]:
        p = self.factory.buildProtocol(None)
        t = StringTransport(hostAddress=IPv4Address("TCP", "127.0.0.1", 80),
                            peerAddress=IPv4Address("TCP", "10.1.2.3", 5555))
        p.makeConnection(t)
        return p, t

    def pending_connects(self) -> list[Any]:
        out = self.clock.tcpClients[self.next_connect:]
        return out

    def accept(self) -> tuple[Any, StringTransport, tuple[str, int]]:
        """Complete the oldest unanswered connection attempt."""
        host, port, factory, timeout, _ = self.clock.tcpClients[self.next_connect]
        self.next_connect += 1
        p = factory.buildProtocol(None)
        t = StringTransport()
        p.makeConnection(t)
        return p, t, (host, port)

    def refuse(self, exc: Exception | None = None) -> None:
        host, port, factory, timeout, _ = self.clock.tcpClients[self.next_connect]
        self.next_connect += 1
        factory.clientConnectionFailed(None, Failure(exc or error.ConnectionRefusedError()))

    def sweep(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.lb.sweep()


def lose(p: Any, t: StringTransport) -> None:
    t.disconnecting = True
    t.connected = False
    p.connectionLost(Failure(error.ConnectionDone()))


class PoolTests(SynchronousTestCase):
    def test_connection_reused_then_expires(self) -> None:
        """A finished exchange parks its backend connection; the next request reuses it;
        after pool_idle_timeout the sweep closes it."""
        h = Harness([Backend("10.0.0.1", 8000)], pool_idle_timeout=4.0)
        c, ct = h.client()
        c.dataReceived(GET)
        self.assertEqual(len(h.pending_connects()), 1)
        bp, bt, addr = h.accept()
        self.assertEqual(addr, ("10.0.0.1", 8000))
        self.assertTrue(bt.value().startswith(b"GET / HTTP/1.1\r\nHost: a.example.com\r\n"))
        self.assertIn(b"X-Forwarded-For: 10.1.2.3\r\n", bt.value())
        bp.dataReceived(OK)
        self.assertTrue(ct.value().endswith(b"\r\n\r\nok"))
        self.assertEqual(h.lb.states[addr].idle, [bp])
        self.assertEqual(h.lb.states[addr].outstanding, 0)
        bt.clear()
        c.dataReceived(GET)
        self.assertEqual(h.pending_connects(), [], "no new connection for the second request")
        self.assertTrue(bt.value().startswith(b"GET /"))
        bp.dataReceived(OK)
        h.sweep(3.0)
        self.assertFalse(bt.disconnecting)
        h.sweep(1.5)
        self.assertTrue(bt.disconnecting)

    def test_idle_connection_closed_by_backend_leaves_pool(self) -> None:
        """A pooled connection the backend closes is dropped from the pool."""
        h = Harness([Backend("10.0.0.1", 8000)])
        c, ct = h.client()
        c.dataReceived(GET)
        bp, bt, addr = h.accept()
        bp.dataReceived(OK)
        lose(bp, bt)
        self.assertEqual(h.lb.states[addr].idle, [])

    def test_stale_pooled_connection_retried_once(self) -> None:
        """A GET on a reused connection closed before any byte is retried on a new one."""
        h = Harness([Backend("10.0.0.1", 8000)])
        c, ct = h.client()
        c.dataReceived(GET)
        bp, bt, _ = h.accept()
        bp.dataReceived(OK)
        ct.clear()
        c.dataReceived(GET)
        lose(bp, bt)
        bp2, bt2, _ = h.accept()
        self.assertTrue(bt2.value().startswith(b"GET /"))
        bp2.dataReceived(OK)
        self.assertTrue(ct.value().startswith(b"HTTP/1.1 200 OK"))

    def test_backend_keepalive_refused_closes_connection(self) -> None:
        """A response with Connection: close is not pooled."""
        h = Harness([Backend("10.0.0.1", 8000)])
        c, ct = h.client()
        c.dataReceived(GET)
        bp, bt, addr = h.accept()
        bp.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        self.assertTrue(bt.disconnecting)
        self.assertEqual(h.lb.states[addr].idle, [])


class FailoverTests(SynchronousTestCase):
    def test_refused_goes_to_next_backend(self) -> None:
        """A refused connect moves the request to the other backend."""
        h = Harness([Backend("10.0.0.1", 1), Backend("10.0.0.2", 2)])
        c, ct = h.client()
        c.dataReceived(GET)
        first = h.clock.tcpClients[0][:2]
        h.refuse()
        second = h.clock.tcpClients[1][:2]
        self.assertNotEqual(first, second)
        bp, bt, _ = h.accept()
        bp.dataReceived(OK)
        self.assertTrue(ct.value().startswith(b"HTTP/1.1 200"))

    def test_attempts_bounded_then_502_or_504(self) -> None:
        """After connect_attempts failures the client gets 502 (refused) or 504 (timeout)."""
        h = Harness([Backend("10.0.0.1", 1)], connect_attempts=2, eject_after=100)
        c, ct = h.client()
        c.dataReceived(GET)
        h.refuse()
        h.refuse()
        self.assertEqual(len(h.clock.tcpClients), 2)
        self.assertTrue(ct.value().startswith(b"HTTP/1.1 502"))
        c2, ct2 = h.client()
        c2.dataReceived(GET)
        h.refuse(error.TimeoutError())
        h.refuse(error.TimeoutError())
        self.assertTrue(ct2.value().startswith(b"HTTP/1.1 504"))
        self.assertEqual(h.observer.totals, {"backend_refused": 1, "connect_timeout": 1})

    def test_ejection_then_half_open_trial(self) -> None:
        """eject_after failures eject a backend for eject_seconds while another serves;
        then one trial request decides: a failure ejects it again at once, a success
        puts it back for good."""
        h = Harness([Backend("10.0.0.1", 1), Backend("10.0.0.2", 2)], connect_attempts=1,
                    eject_after=2, eject_seconds=10, pool_max_idle=0)
        bad = ("10.0.0.1", 1)
        st = h.lb.state_for(bad)

        def one(fail: bool) -> tuple[str, int]:
            c, ct = h.client()
            c.dataReceived(GET)
            addr = h.clock.tcpClients[h.next_connect][:2]
            if addr == bad and fail:
                h.refuse()
            else:
                bp, bt, _ = h.accept()
                bp.dataReceived(OK)
            return addr

        for _ in range(10):
            one(fail=True)
            if st.ejected_until:
                break
        self.assertGreater(st.ejected_until, h.clock.seconds())
        self.assertEqual({one(fail=True) for _ in range(4)}, {("10.0.0.2", 2)})
        h.clock.advance(10.5)
        self.assertTrue(st.probation)
        while one(fail=True) != bad:
            pass
        self.assertGreater(st.ejected_until, h.clock.seconds(), "one failed trial re-ejects")
        h.clock.advance(10.5)
        while one(fail=False) != bad:
            pass
        self.assertEqual((st.probation, st.fails), (False, 0), "a good trial ends probation")
        one(fail=True)
        one(fail=True)
        self.assertEqual(st.fails, 1, "back to eject_after failures in a row")

    def test_last_usable_backend_never_ejected(self) -> None:
        """A one-instance app whose backend fails eject_after times and more keeps
        getting its requests: the next good answer is served, never 503 no_backend."""
        h = Harness([Backend("10.0.0.1", 1)], connect_attempts=1, eject_after=5,
                    pool_max_idle=0)
        for _ in range(6):
            c, ct = h.client()
            c.dataReceived(GET)
            bp, bt, _ = h.accept()
            bp.connectionLost(Failure(error.ConnectionDone()))  # closed without answering
            self.assertTrue(ct.value().startswith(b"HTTP/1.1 502"))
        self.assertEqual(h.lb.states[("10.0.0.1", 1)].ejected_until, 0.0)
        c, ct = h.client()
        c.dataReceived(GET)
        bp, bt, _ = h.accept()
        bp.dataReceived(OK)
        self.assertTrue(ct.value().startswith(b"HTTP/1.1 200"))
        self.assertEqual(h.observer.totals, {"backend_closed": 6})
        self.flushLoggedErrors()

    def test_hanging_requests_do_not_eject_the_last_backend(self) -> None:
        """Six requests that get no first byte in first_byte_timeout (504) do not take
        a one-instance app offline: the next request reaches it and is served."""
        h = Harness([Backend("10.0.0.1", 1)], eject_after=5, first_byte_timeout=2,
                    pool_max_idle=0)
        for _ in range(6):
            c, ct = h.client()
            c.dataReceived(GET)
            h.accept()
            h.sweep(2.5)
            self.assertTrue(ct.value().startswith(b"HTTP/1.1 504"))
        c, ct = h.client()
        c.dataReceived(GET)
        bp, bt, _ = h.accept()
        bp.dataReceived(OK)
        self.assertTrue(ct.value().startswith(b"HTTP/1.1 200"))
        self.assertEqual(h.observer.totals, {"timeout": 6})

    def test_every_backend_ejected_still_serves(self) -> None:
        """When every backend of an app is ejected (the table changed under the
        ejections), requests go to the ejected ones rather than 503."""
        h = Harness([Backend("10.0.0.1", 1), Backend("10.0.0.2", 2)])
        for key in (("10.0.0.1", 1), ("10.0.0.2", 2)):
            h.lb.state_for(key).ejected_until = h.clock.seconds() + 10
        c, ct = h.client()
        c.dataReceived(GET)
        bp, bt, _ = h.accept()
        bp.dataReceived(OK)
        self.assertTrue(ct.value().startswith(b"HTTP/1.1 200"))


class QueueTests(SynchronousTestCase):
    def test_cap_queue_and_timeout(self) -> None:
        """Over the cap requests queue (bounded); a slot freed serves the next; waiting too long is 503."""
        h = Harness([Backend("10.0.0.1", 1)], backend_max_conns=1, backend_queue_size=1,
                    queue_timeout=5.0)
        c1, t1 = h.client()
        c1.dataReceived(GET)
        c2, t2 = h.client()
        c2.dataReceived(GET)
        c3, t3 = h.client()
        c3.dataReceived(GET)
        self.assertTrue(t3.value().startswith(b"HTTP/1.1 503"))
        self.assertEqual(t2.value(), b"")
        bp, bt, _ = h.accept()
        bp.dataReceived(OK)
        self.assertTrue(t1.value().startswith(b"HTTP/1.1 200"))
        # c2 got the freed slot and the pooled connection
        self.assertEqual(bt.value().count(b"GET / HTTP/1.1"), 2)
        bp.dataReceived(OK)
        self.assertTrue(t2.value().startswith(b"HTTP/1.1 200"))
        # now hold the slot and let a queued request time out
        c4, t4 = h.client()
        c4.dataReceived(GET)
        c5, t5 = h.client()
        c5.dataReceived(GET)
        h.sweep(5.5)
        self.assertTrue(t5.value().startswith(b"HTTP/1.1 503"))
        self.assertEqual(h.lb.states[("10.0.0.1", 1)].queue, __import__("collections").deque())


class TimeoutUnitTests(SynchronousTestCase):
    def test_header_and_keepalive_timeouts(self) -> None:
        """A partial head gets 408 after header_timeout; an idle connection closes after keepalive_timeout."""
        h = Harness([Backend("10.0.0.1", 1)], header_timeout=10, keepalive_timeout=75)
        c, t = h.client()
        c.dataReceived(b"GET / HT")
        h.sweep(9.0)
        self.assertEqual(t.value(), b"")
        h.sweep(1.5)
        self.assertTrue(t.value().startswith(b"HTTP/1.1 408"))
        c, t = h.client()
        c.dataReceived(GET)
        bp, bt, _ = h.accept()
        bp.dataReceived(OK)
        self.assertEqual(c.state, C_HEAD)
        h.sweep(74.0)
        self.assertFalse(t.disconnecting)
        h.sweep(1.5)
        self.assertTrue(t.disconnecting)

    def test_first_byte_then_idle_timeout(self) -> None:
        """No first byte within first_byte_timeout is 504; a stalled body after it aborts."""
        h = Harness([Backend("10.0.0.1", 1)], first_byte_timeout=30, idle_timeout=55)
        c, t = h.client()
        c.dataReceived(GET)
        bp, bt, _ = h.accept()
        h.sweep(29.0)
        self.assertEqual(t.value(), b"")
        h.sweep(1.5)
        self.assertTrue(t.value().startswith(b"HTTP/1.1 504"))
        c, t = h.client()
        c.dataReceived(GET)
        bp, bt, _ = h.accept()
        bp.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        h.sweep(50.0)
        bp.dataReceived(b"d")  # activity pushes the idle deadline
        h.sweep(0.5)
        h.sweep(50.0)
        self.assertFalse(t.disconnecting)
        h.sweep(6.0)
        self.assertTrue(t.disconnecting or not t.connected)
        self.assertEqual(h.observer.totals.get("timeout"), 2)


class BalancerTests(SynchronousTestCase):
    def test_least_outstanding(self) -> None:
        """New requests go to the backend with the fewest outstanding requests."""
        bs = [Backend("10.0.0.1", 1), Backend("10.0.0.2", 2)]
        h = Harness(bs)
        for _ in range(4):
            c, t = h.client()
            c.dataReceived(GET)
        hosts = sorted(x[0] for x in h.clock.tcpClients)
        self.assertEqual(hosts, ["10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.2"])


class SettingsTests(SynchronousTestCase):
    def test_every_lb_key_is_used(self) -> None:
        """Every [lb] config key is a proxy setting or one the service reads itself,
        and the schema defaults equal the proxy's own defaults."""
        from epio.config.schema import SCHEMA

        service_keys = {"listen", "routes_file", "workers", "tls_listen", "tls_cert_dir",
                        "access_log", "stats_interval", "route_feed",
                        "feed_interval", "routes_wait", "backlog", "max_connections",
                        "tls_affinity", "ocsp_stapling"}
        fields = {a.name for a in Settings.__attrs_attrs__}  # type: ignore[attr-defined]
        for key, spec in SCHEMA["lb"].items():
            self.assertTrue(key in fields or key in service_keys, key)
            if key in fields:
                default = spec.default_value()
                got = getattr(Settings(), key)
                self.assertEqual(tuple(default) if isinstance(default, list) else default, got, key)
        from epio.config import load_config

        lb = load_config(None, {"lb": {"connect_timeout": 1.5,
                                       "trusted_proxies": ["10.0.0.1"]}}).settings.lb
        s = Settings.from_settings(lb)
        self.assertEqual((s.connect_timeout, s.trusted_proxies), (1.5, ("10.0.0.1",)))


class ClientStateTests(SynchronousTestCase):
    """A client connection's state moves only along the drawn transitions."""

    def test_a_closed_connection_never_reads_another_request(self) -> None:
        """Once lost, a connection cannot go back to reading heads (or anything else)."""
        h = Harness([Backend("10.0.0.1", 1)])
        c, t = h.client()
        c.dataReceived(GET)
        bp, bt, _ = h.accept()
        bp.dataReceived(OK)
        self.assertEqual(c.state, C_HEAD)
        c.connectionLost(None)
        with self.assertRaises(InvalidTransition) as caught:
            c._next()
        self.assertEqual(str(caught.exception), "client connection: CLOSED -> HEAD")

    def test_a_tunnel_never_reads_a_request_body(self) -> None:
        """Only a connection reading a request head (HEAD) goes on to read its body."""
        h = Harness([Backend("10.0.0.1", 1)])
        c, t = h.client()
        c.dataReceived(b"GET /ws HTTP/1.1\r\nHost: a.example.com\r\nConnection: Upgrade\r\n"
                       b"Upgrade: websocket\r\n\r\n")
        bp, bt, _ = h.accept()
        bp.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                        b"Upgrade: websocket\r\n\r\n")
        self.assertEqual(c.state, C_TUNNEL)
        with self.assertRaises(InvalidTransition):
            c._begin_body(c.req, b"", 0.0)
