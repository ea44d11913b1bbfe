"""What only the real ZeroMQ bus has: endpoints, high-water marks, binding,
encryption, teardown (real sockets on loopback, in this process)."""

from __future__ import annotations

import re
import time
from typing import Any

import zmq
from twisted.internet import defer, reactor, task
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from epio.bus import Bus, bus_settings
from epio.bus.envelope import Envelope, seal
from epio.bus.testing import TEST_REGISTRY

SECRET = b"socket-tests-secret-0123456789"


class RealSocketTests(TestCase):
    timeout = 20

    def start(self, svc: Any) -> Any:
        svc.startService()
        self.addCleanup(lambda: svc.stopService() if svc.running else None)
        return svc

    async def wait(self, cond: Any, limit: float = 5.0) -> None:
        deadline = time.monotonic() + limit
        while not cond() and time.monotonic() < deadline:
            await task.deferLater(reactor, 0.005)

    def test_bound_endpoint_reported(self) -> None:
        """Binding port 0 reports the real port, as the address that was asked for."""
        bus = Bus(reactor, SECRET, "n", bus_settings(), registry=TEST_REGISTRY)
        for host in ("127.0.0.1", "[::1]"):
            pull = self.start(bus.pull(f"tcp://{host}:0", lambda env: None))
            self.assertRegex(pull.endpoint, rf"^tcp://{re.escape(host)}:\d+$")
            self.assertNotEqual(pull.endpoint.rsplit(":", 1)[1], "0")

    async def test_hwm_overflow_counted_not_raised(self) -> None:
        """Sends past the high-water mark to a peer that never comes are dropped,
        counted and logged; send returns False and never raises."""
        bus = Bus(reactor, SECRET, "n", bus_settings(high_water_mark=5), registry=TEST_REGISTRY)
        push = self.start(bus.push(["tcp://127.0.0.1:9"]))
        results = [push.send("test.job", {"n": n}) for n in range(50)]
        self.assertIn(False, results)
        self.assertEqual(push.counters["dropped.hwm"] + push.counters["sent"], 50)
        self.assertGreater(push.counters["dropped.hwm"], 0)
        self.assertEqual(bus.counters["dropped.hwm"], push.counters["dropped.hwm"])

    async def test_stop_is_quick_and_terminates_context(self) -> None:
        """Stopping services with undeliverable messages queued does not hang, and the
        ZeroMQ context is terminated once the last socket is closed."""
        bus = Bus(reactor, SECRET, "n", bus_settings(), registry=TEST_REGISTRY)
        push = self.start(bus.push(["tcp://127.0.0.1:9"]))
        pull = self.start(bus.pull("tcp://127.0.0.1:0", lambda env: None))
        for n in range(100):
            push.send("test.job", {"n": n})
        t0 = time.monotonic()
        push.stopService()
        self.assertIsNotNone(bus._factory)
        pull.stopService()
        self.assertLess(time.monotonic() - t0, 1.0)
        self.assertIsNone(bus._factory)
        self.assertEqual(bus._connections, set())
        # and the bus can make services again after that
        again = self.start(bus.pull("tcp://127.0.0.1:0", lambda env: None))
        self.assertIsNotNone(again.endpoint)

    async def test_bind_conflict_fails_fast(self) -> None:
        """A bind that fails (address in use) raises BindFailed -- a SystemExit that
        names the endpoint, so the node exits instead of half serving -- from
        startService; the failed service is not running and holds no socket, and
        the socket already bound keeps working."""
        from epio.bus.sockets import BindFailed

        bus = Bus(reactor, SECRET, "n", bus_settings(), registry=TEST_REGISTRY)
        got: list[int] = []
        first = self.start(bus.pull("tcp://127.0.0.1:0", lambda env: got.append(env.body["n"])))
        second = bus.pull(first.endpoint, lambda env: None)
        with self.assertRaises(BindFailed) as caught:
            second.startService()
        self.assertIsInstance(caught.exception, SystemExit)
        self.assertEqual(str(caught.exception),
                         f"epio: bus pull cannot bind {first.endpoint}: Address already in "
                         "use (another node on this host uses that port? give this node "
                         "its own ports in the config)")
        self.assertFalse(second.running)
        self.assertIsNone(second.endpoint)
        push = self.start(bus.push([first.endpoint]))
        push.send("test.job", {"n": 7})
        await self.wait(lambda: got)
        self.assertEqual(got, [7])

    async def test_rejections_logged_without_secret(self) -> None:
        """A rejected message is logged with its reason (rate-limited: one line for a
        burst) and no log line ever contains the secret."""
        from twisted.logger import formatEvent

        bus = Bus(reactor, SECRET, "n", bus_settings(), registry=TEST_REGISTRY)
        pull = self.start(bus.pull("tcp://127.0.0.1:0", lambda env: None))
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        raw = zmq.Context.instance().socket(zmq.PUSH)
        self.addCleanup(raw.close, 0)
        for opt, value in bus.socket_options(bind=False):
            raw.setsockopt(opt, value)
        raw.connect(pull.endpoint)
        for _ in range(5):
            raw.send(seal(Envelope("test.job", 1, "x", time.time(), {"n": 1}), b"z" * 32))
        await self.wait(lambda: pull.counters["rejected.bad_signature"] == 5)
        lines = [formatEvent(e) for e in events if e.get("reason") == "bad_signature"]
        self.assertEqual(len(lines), 1)
        self.assertIn("bad_signature", lines[0])
        everything = " ".join(formatEvent(e) for e in events)
        self.assertNotIn(SECRET.decode(), everything)
        self.assertNotIn(SECRET.hex(), everything)

    async def test_curve_keeps_outsiders_out(self) -> None:
        """With encryption on (the default) a plain ZeroMQ peer cannot deliver anything,
        even a correctly signed envelope: the CURVE handshake fails first."""
        bus = Bus(reactor, SECRET, "n", bus_settings(), registry=TEST_REGISTRY)
        got: list[Envelope] = []
        pull = self.start(bus.pull("tcp://127.0.0.1:0", got.append))
        ctx = zmq.Context.instance()
        plain = ctx.socket(zmq.PUSH)
        self.addCleanup(plain.close, 0)
        plain.connect(pull.endpoint)
        plain.send(seal(Envelope("test.job", 1, "x", time.time(), {"n": 1}), SECRET))
        # an insider (the cluster's keys) gets through at the same time
        insider = ctx.socket(zmq.PUSH)
        self.addCleanup(insider.close, 0)
        for opt, value in bus.socket_options(bind=False):
            insider.setsockopt(opt, value)
        insider.connect(pull.endpoint)
        insider.send(seal(Envelope("test.job", 1, "x", time.time(), {"n": 2}), SECRET))
        await self.wait(lambda: got)
        await task.deferLater(reactor, 0.2)
        self.assertEqual([e.body["n"] for e in got], [2])

    async def test_unencrypted_bus(self) -> None:
        """With bus.encrypt = false every peer must be plain; the HMAC still applies."""
        bus = Bus(reactor, SECRET, "n", bus_settings(encrypt=False), registry=TEST_REGISTRY)
        got: list[int] = []
        pull = self.start(bus.pull("tcp://127.0.0.1:0", lambda env: got.append(env.body["n"])))
        push = self.start(bus.push([pull.endpoint]))
        push.send("test.job", {"n": 1})
        await self.wait(lambda: got)
        self.assertEqual(got, [1])
        self.assertNotIn(zmq.CURVE_SERVER, [opt for opt, _ in bus.socket_options(bind=True)])

    async def test_different_secrets_cannot_talk(self) -> None:
        """Nodes with different cluster secrets exchange nothing."""
        a = Bus(reactor, SECRET, "a", bus_settings(), registry=TEST_REGISTRY)
        b = Bus(reactor, b"another-secret-0123456789", "b", bus_settings(), registry=TEST_REGISTRY)
        got: list[Envelope] = []
        pull = self.start(a.pull("tcp://127.0.0.1:0", got.append))
        push = self.start(b.push([pull.endpoint]))
        push.send("test.job", {"n": 1})
        await task.deferLater(reactor, 0.3)
        self.assertEqual(got, [])

    async def test_router_survives_vanished_peer(self) -> None:
        """A reply to a dealer that went away is dropped and counted; the router keeps
        serving others."""
        bus = Bus(reactor, SECRET, "n", bus_settings(), registry=TEST_REGISTRY)

        async def slow(env: Any) -> tuple[str, dict]:
            await task.deferLater(reactor, env.body.get("sleep", 0))
            return "test.echoed", {"n": env.body["n"]}

        router = self.start(bus.router("tcp://127.0.0.1:0", slow))
        gone = self.start(bus.dealer([router.endpoint]))
        d = defer.ensureDeferred(gone.request("test.echo", {"n": 1, "sleep": 0.2}))
        d.addErrback(lambda f: None)
        await task.deferLater(reactor, 0.05)
        gone.stopService()
        await task.deferLater(reactor, 0.3)
        self.assertEqual(router.counters["dropped.error"], 1)
        other = self.start(bus.dealer([router.endpoint]))
        reply = await other.request("test.echo", {"n": 2})
        self.assertEqual(reply.body, {"n": 2})


class ConnectionStateTests(TestCase):
    timeout = 20

    def start(self, svc: Any) -> Any:
        svc.startService()
        self.addCleanup(lambda: svc.stopService() if svc.running else None)
        return svc

    async def wait(self, cond: Any, limit: float = 5.0) -> None:
        deadline = time.monotonic() + limit
        while not cond() and time.monotonic() < deadline:
            await task.deferLater(reactor, 0.005)

    async def test_connected_and_lost(self) -> None:
        """A connecting socket knows its peers: whenConnected fires after the handshake,
        the peer shows in connected and status(), and leaves it when the peer stops."""
        server = Bus(reactor, SECRET, "server", bus_settings(), registry=TEST_REGISTRY)
        client = Bus(reactor, SECRET, "client", bus_settings(), registry=TEST_REGISTRY)
        pull = self.start(server.pull("tcp://127.0.0.1:0", lambda env: None))
        push = self.start(client.push([pull.endpoint]))
        await push.whenConnected()
        self.assertEqual(push.connected, {pull.endpoint})
        st = client.status()
        self.assertEqual([s["connected"] for s in st["sockets"]], [[pull.endpoint]])
        self.assertEqual(st["sockets"][0]["kind"], "push")
        pull.stopService()
        await self.wait(lambda: not push.connected)
        self.assertEqual(push.connected, set())
        self.assertEqual(push.counters["disconnects"], 1)

    async def test_dealer_per_peer_state(self) -> None:
        """A dealer reports each of its peers by the endpoint it was given."""
        server = Bus(reactor, SECRET, "server", bus_settings(), registry=TEST_REGISTRY)
        client = Bus(reactor, SECRET, "client", bus_settings(), registry=TEST_REGISTRY)
        router = self.start(server.router("tcp://127.0.0.1:0", lambda env: ("test.echoed",
                                                                             {"n": 1})))
        dealer = self.start(client.dealer([router.endpoint, "tcp://127.0.0.1:9"]))
        await dealer.whenConnected()
        self.assertEqual(dealer.connected, {router.endpoint})

    async def test_wrong_secret_handshake_counted(self) -> None:
        """A peer with another cluster secret fails the CURVE handshake: nothing is
        delivered, and both sides count (and log) handshake failures."""
        a = Bus(reactor, SECRET, "a", bus_settings(), registry=TEST_REGISTRY)
        b = Bus(reactor, b"another-secret-0123456789", "b", bus_settings(), registry=TEST_REGISTRY)
        pull = self.start(a.pull("tcp://127.0.0.1:0", lambda env: None))
        push = self.start(b.push([pull.endpoint]))
        await self.wait(lambda: pull.counters["handshake_failures"] > 0
                        and push.counters["handshake_failures"] > 0)
        self.assertGreater(pull.counters["handshake_failures"], 0)
        self.assertGreater(push.counters["handshake_failures"], 0)
        self.assertEqual(push.connected, set())
