"""The bus between two real OS processes over real TCP sockets, IPv4 and IPv6.

The peer (``peer.py``) runs in its own interpreter with its own reactor and
ZeroMQ context; this test process talks to it with the bus services and, for
the attack cases, with raw pyzmq sockets.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import sys
import time
from pathlib import Path
from typing import Any

import zmq
from twisted.internet import defer, error, protocol, reactor, task
from twisted.trial.unittest import SkipTest, TestCase

from epio.bus import Bus, RemoteError, RequestTimeout, bus_settings
from epio.bus.envelope import Envelope, pack_payload, seal
from epio.bus.testing import TEST_REGISTRY
from tests.util import epio_env

PEER = Path(__file__).with_name("peer.py")


def ipv6_available() -> bool:
    import socket

    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


class PeerProcess(protocol.ProcessProtocol):
    """The peer's stdout JSON lines, as a queue of dicts."""

    def __init__(self) -> None:
        self.events: defer.DeferredQueue[dict] = defer.DeferredQueue()
        self.ended: defer.Deferred[None] = defer.Deferred()
        self.stderr = b""
        self._buf = b""

    def outReceived(self, data: bytes) -> None:
        self._buf += data
        while b"\n" in self._buf:
            line, self._buf = self._buf.split(b"\n", 1)
            self.events.put(json.loads(line))

    def errReceived(self, data: bytes) -> None:
        self.stderr += data

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)

    def command(self, **cmd: Any) -> None:
        self.transport.write(json.dumps(cmd).encode() + b"\n")

    async def next(self, event: str, timeout: float = 10.0) -> dict:
        deadline = reactor.seconds() + timeout
        while True:
            d = self.events.get()
            d.addTimeout(max(0.01, deadline - reactor.seconds()), reactor)
            try:
                ev = await d
            except defer.TimeoutError:
                raise AssertionError(
                    f"peer sent no {event!r} in {timeout}s; stderr: {self.stderr[-2000:]!r}"
                ) from None
            if ev.get("event") == event:
                return ev


class TwoProcessMixin:
    """Every pattern between this process and a peer process on ``HOST``."""

    HOST = "127.0.0.1"
    timeout = 45

    def setUp(self) -> None:
        self.secret = secrets.token_bytes(32)
        self.bus = Bus(reactor, self.secret, "tester", bus_settings(request_timeout=5.0), registry=TEST_REGISTRY)

    async def start_peer(self, ports: list[int] | None = None) -> tuple[PeerProcess, dict]:
        proto = PeerProcess()
        args = [sys.executable, str(PEER), self.secret.hex(), "peer-node", self.HOST]
        args += [str(p) for p in ports or []]
        env = epio_env()
        reactor.spawnProcess(proto, sys.executable, args, env=env, path=os.getcwd())
        self.addCleanup(self.stop_peer, proto)
        ready = await proto.next("ready", timeout=20)
        return proto, ready

    async def stop_peer(self, proto: PeerProcess) -> None:
        if proto.ended.called:
            return
        try:
            proto.command(cmd="exit")
        except Exception:
            pass
        timer = reactor.callLater(5, self._kill, proto)
        await proto.ended
        if timer.active():
            timer.cancel()

    @staticmethod
    def _kill(proto: PeerProcess) -> None:
        try:
            proto.transport.signalProcess("KILL")
        except error.ProcessExitedAlready:
            pass

    def service(self, svc: Any) -> Any:
        svc.startService()
        self.addCleanup(lambda: svc.stopService() if svc.running else None)
        return svc

    async def state(self, proto: PeerProcess) -> dict:
        proto.command(cmd="state")
        return await proto.next("state")

    async def wait_state(self, proto: PeerProcess, check: Any, timeout: float = 10.0) -> dict:
        deadline = reactor.seconds() + timeout
        while True:
            st = await self.state(proto)
            if check(st) or reactor.seconds() > deadline:
                return st
            await task.deferLater(reactor, 0.05)

    def raw_socket(self, kind: int, endpoint: str) -> zmq.Socket:
        """A plain pyzmq socket (with the cluster's CURVE keys, but no bus envelope logic)."""
        ctx = zmq.Context.instance()
        sock = ctx.socket(kind)
        for opt, value in self.bus.socket_options(bind=False):
            sock.setsockopt(opt, value)
        sock.connect(endpoint)
        self.addCleanup(sock.close, 0)
        return sock

    # -- the tests ---------------------------------------------------------------

    async def test_request_reply(self) -> None:
        """A request is answered by the other process; ping works without a handler;
        handler errors come back as RemoteError without internals."""
        proto, ready = await self.start_peer()
        dealer = self.service(self.bus.dealer([ready["router"]]))
        reply = await dealer.request("test.echo", {"n": 41})
        self.assertEqual((reply.type, reply.body, reply.sender), ("test.echoed", {"n": 42},
                                                                   "peer-node"))
        pong = await dealer.request("bus.ping", {"payload": "x"})
        self.assertEqual(pong.body, {"node": "peer-node", "payload": "x"})
        e = await self.assertFailure(
            defer.ensureDeferred(dealer.request("test.echo", {"n": 1, "fail": "remote"})),
            RemoteError)
        self.assertEqual((e.code, e.message), ("boom", "asked to fail"))
        e = await self.assertFailure(
            defer.ensureDeferred(dealer.request("test.echo", {"n": 2, "fail": "crash"})),
            RemoteError)
        self.assertEqual(e.code, "internal")
        self.assertNotIn("secret internal detail", e.message)
        self.assertNotIn("Traceback", e.message)
        st = await self.state(proto)
        self.assertEqual(st["counters"]["router"].get("handler_errors"), 1)

    async def test_request_timeout_and_late_reply(self) -> None:
        """No reply in time raises RequestTimeout naming type and endpoint; the reply
        that comes later is dropped and counted, and the dealer still works."""
        proto, ready = await self.start_peer()
        dealer = self.service(self.bus.dealer([ready["router"]]))
        await dealer.request("bus.ping", {})  # connected
        t0 = reactor.seconds()
        e = await self.assertFailure(
            defer.ensureDeferred(dealer.request("test.echo", {"n": 1, "sleep": 0.6}, timeout=0.2)),
            RequestTimeout)
        self.assertLess(reactor.seconds() - t0, 0.5)
        self.assertIn("test.echo", str(e))
        self.assertIn(ready["router"], str(e))
        for _ in range(100):
            if dealer.counters["late_replies"]:
                break
            await task.deferLater(reactor, 0.02)
        self.assertEqual(dealer.counters["late_replies"], 1)
        self.assertEqual(dealer.counters["timeouts"], 1)
        reply = await dealer.request("test.echo", {"n": 5})
        self.assertEqual(reply.body, {"n": 6})

    async def test_request_to_nobody_times_out(self) -> None:
        """A request while no peer listens fails with RequestTimeout after its timeout."""
        import socket

        fam = socket.AF_INET6 if ":" in self.HOST else socket.AF_INET
        with socket.socket(fam) as s:
            s.bind((self.HOST, 0))
            port = s.getsockname()[1]
        h = f"[{self.HOST}]" if ":" in self.HOST else self.HOST
        dealer = self.service(self.bus.dealer([f"tcp://{h}:{port}"]))
        e = await self.assertFailure(
            defer.ensureDeferred(dealer.request("bus.ping", {}, timeout=0.3)), RequestTimeout)
        self.assertIn("no connection", str(e))

    async def test_push_pull(self) -> None:
        """Every pushed job arrives at the other process's PULL handler, in order."""
        proto, ready = await self.start_peer()
        push = self.service(self.bus.push([ready["pull"]]))
        for n in range(200):
            self.assertTrue(push.send("test.job", {"n": n}))
        st = await self.wait_state(proto, lambda s: len(s["pulled"]) >= 200)
        self.assertEqual(st["pulled"], list(range(200)))

    async def test_pub_sub_topics(self) -> None:
        """Published messages reach a subscriber in this process, filtered by topic
        prefix, with the topic delivered as bytes."""
        proto, ready = await self.start_peer()
        got: list[tuple[bytes, int]] = []
        self.service(self.bus.subscriber([ready["pub"]], [b"app."],
                                         lambda t, env: got.append((t, env.body["n"]))))
        # PUB/SUB has a slow joiner: publish until the subscription is live.
        for _ in range(200):
            proto.command(cmd="publish", topic="app.x", n=-1)
            await task.deferLater(reactor, 0.02)
            if got:
                break
        self.assertTrue(got, "subscription never received anything")
        got.clear()
        for n in range(20):
            proto.command(cmd="publish", topic="app.a" if n % 2 else "other.b", n=n)
        proto.command(cmd="publish", topic="app.end", n=999)
        for _ in range(200):
            if got and got[-1][1] == 999:
                break
            await task.deferLater(reactor, 0.02)
        self.assertEqual([n for t, n in got if n != -1],
                         [n for n in range(20) if n % 2] + [999])
        self.assertTrue(all(isinstance(t, bytes) and t.startswith(b"app.") for t, _ in got))

    async def test_attacks_dropped_and_counted(self) -> None:
        """Tampered, unsigned, stale and replayed messages sent raw are dropped and
        counted per reason; the handler never sees them; valid ones still pass."""
        proto, ready = await self.start_peer()
        raw = self.raw_socket(zmq.PUSH, ready["pull"])

        def signed(n: int, ts: float | None = None) -> bytes:
            env = Envelope("test.job", 1, "tester", time.time() if ts is None else ts, {"n": n})
            return seal(env, self.secret)

        tampered = bytearray(signed(901))
        tampered[-1] ^= 0x01
        replayed = signed(905)
        frames = [
            bytes(tampered),                                             # bad_signature
            pack_payload(Envelope("test.job", 1, "x", time.time(), {"n": 902})),  # unsigned
            signed(903, ts=time.time() - 120),                           # stale
            seal(Envelope("test.job", 1, "x", time.time(), {"n": 904}), b"w" * 32),  # bad sig
            replayed, replayed,                                          # second is replayed
            signed(906),                                                 # valid marker
        ]
        for f in frames:
            raw.send(f)
        st = await self.wait_state(proto, lambda s: 906 in s["pulled"])
        self.assertEqual(st["pulled"], [905, 906])
        c = st["counters"]["pull"]
        self.assertEqual(c.get("rejected.bad_signature"), 2)
        self.assertEqual(c.get("rejected.unsigned"), 1)
        self.assertEqual(c.get("rejected.stale"), 1)
        self.assertEqual(c.get("rejected.replayed"), 1)
        self.assertEqual(c.get("received"), 2)

    async def test_router_drops_forged_requests(self) -> None:
        """A ROUTER never calls its handler for a tampered or stale request and never
        answers it; a signed request of an unknown type gets a bus.error reply."""
        proto, ready = await self.start_peer()
        raw = self.raw_socket(zmq.DEALER, ready["router"])
        req = bytearray(seal(Envelope("test.echo", 1, "x", time.time(), {"n": 777}), self.secret))
        req[-2] ^= 0x40
        raw.send(bytes(req))
        raw.send(seal(Envelope("test.echo", 1, "x", time.time() - 90, {"n": 778}), self.secret))
        unknown = Envelope("no.such.type", 1, "x", time.time(), {})
        raw.send(seal(unknown, self.secret))
        # the only reply is the error for the unknown type
        answer = None
        for _ in range(200):
            try:
                answer = raw.recv(zmq.NOBLOCK)
                break
            except zmq.Again:
                await task.deferLater(reactor, 0.02)
        self.assertIsNotNone(answer)
        env = self.bus.open(answer, pattern="reply")
        self.assertEqual((env.type, env.reply_to, env.body["code"]),
                         ("bus.error", unknown.id, "unknown_type"))
        st = await self.state(proto)
        self.assertEqual(st["handled"], [])
        c = st["counters"]["router"]
        self.assertEqual((c.get("rejected.bad_signature"), c.get("rejected.stale"),
                          c.get("rejected.unknown_type")), (1, 1, 1))
        await task.deferLater(reactor, 0.1)
        self.assertRaises(zmq.Again, raw.recv, zmq.NOBLOCK)


class IPv4Tests(TwoProcessMixin, TestCase):
    HOST = "127.0.0.1"

    async def test_reconnects_after_peer_restart(self) -> None:
        """When the peer process dies and comes back on the same ports, the same
        dealer, push and subscriber reach it again with no action from the caller."""
        proto, ready = await self.start_peer()
        dealer = self.service(self.bus.dealer([ready["router"]]))
        push = self.service(self.bus.push([ready["pull"]]))
        events: list[int] = []
        sub = self.service(self.bus.subscriber([ready["pub"]], [b"t"],
                                               lambda t, env: events.append(env.body["n"])))
        self.assertEqual((await dealer.request("test.echo", {"n": 1})).body, {"n": 2})
        await sub.whenConnected()
        ports = [int(ready[k].rsplit(":", 1)[1]) for k in ("router", "pull", "pub")]
        await self.stop_peer(proto)
        proto2, ready2 = await self.start_peer(ports)
        self.assertEqual(ready2["router"], ready["router"])
        reply = await dealer.request("test.echo", {"n": 10}, timeout=10)
        self.assertEqual(reply.body, {"n": 11})
        push.send("test.job", {"n": 1})
        st = await self.wait_state(proto2, lambda s: s["pulled"])
        self.assertEqual(st["pulled"], [1])
        for _ in range(250):  # the subscription is renewed on the new connection
            proto2.command(cmd="publish", topic="t", n=2)
            await task.deferLater(reactor, 0.02)
            if events:
                break
        self.assertEqual(events[:1], [2])


    async def test_frozen_peer_is_skipped(self) -> None:
        """A peer that freezes (SIGSTOP: its TCP connection stays up, nothing answers)
        is disconnected after 3 missed heartbeats; requests then go to the live peer
        instead of timing out half the time."""
        bus = Bus(reactor, self.secret, "tester", bus_settings(peer_heartbeat=0.2), registry=TEST_REGISTRY)
        pa, ra = await self.start_peer()
        pb, rb = await self.start_peer()
        dealer = self.service(bus.dealer([ra["router"], rb["router"]]))
        await self.until(lambda: len(dealer.connected) == 2)
        self.assertEqual(dealer.connected, {ra["router"], rb["router"]})
        os.kill(pa.transport.pid, signal.SIGSTOP)
        self.addCleanup(os.kill, pa.transport.pid, signal.SIGCONT)
        await self.until(lambda: dealer.connected == {rb["router"]})
        self.assertEqual(dealer.connected, {rb["router"]})
        for n in range(10):
            reply = await dealer.request("test.echo", {"n": n}, timeout=2)
            self.assertEqual(reply.body, {"n": n + 1})
        st = await self.state(pb)
        self.assertEqual(st["handled"][-10:], list(range(10)))

    async def until(self, cond: Any, limit: float = 5.0) -> None:
        deadline = time.monotonic() + limit
        while not cond() and time.monotonic() < deadline:
            await task.deferLater(reactor, 0.02)


class IPv6Tests(TwoProcessMixin, TestCase):
    HOST = "::1"

    def setUp(self) -> None:
        if not ipv6_available():
            raise SkipTest("no IPv6 loopback on this host")
        super().setUp()
