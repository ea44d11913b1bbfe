"""The api's bridge between a websocket and a runner's session, on fakes: the control is
an in-memory runner (the real SessionManager over a Clock) that can lose requests."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from epio.api.control import IRunnerControl
from epio.api.run import Bridge, RunApiSettings
from epio.bus import RequestTimeout
from epio.pipeline import MemoryLogSink
from epio.runner.sessions import RunSettings, SessionManager
from epio.runner.supervisor import Settings
from tests.run.test_sessions import DIGEST, Env, FakeLauncher, ProcessClock


@implementer(IRunnerControl)
class MemoryControl:
    """Requests go straight to a SessionManager; ``lose`` drops the next N requests of
    a type after the runner handled them (the reply is lost: a timeout)."""

    def __init__(self, manager: SessionManager) -> None:
        self.manager = manager
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.lose: dict[str, int] = {}
        self.down = False

    async def request(self, endpoint: str, type: str, body: dict[str, Any],
                      timeout: float | None = None) -> dict[str, Any]:
        self.requests.append((type, dict(body)))
        if self.down:
            raise RequestTimeout(type, endpoint, timeout or 0)
        _, reply = await self.manager.handle(Env(type, dict(body)))
        if self.lose.get(type):
            self.lose[type] -= 1
            raise RequestTimeout(type, endpoint, timeout or 0)
        return dict(reply)


class Sink:
    def __init__(self) -> None:
        self.out: list[tuple[int, bytes]] = []
        self.exit: tuple[Any, ...] | None = None
        self.errors: list[tuple[str, str]] = []
        self.input_paused = 0
        self.input_resumed = 0

    def on_output(self, fd: int, data: bytes) -> None:
        self.out.append((fd, data))

    def on_exit(self, status: Any, signal: Any, reason: Any) -> None:
        self.exit = (status, signal, reason)

    def on_error(self, code: str, message: str) -> None:
        self.errors.append((code, message))

    def pause_input(self) -> None:
        self.input_paused += 1

    def resume_input(self) -> None:
        self.input_resumed += 1

    def data(self) -> bytes:
        return b"".join(d for _, d in self.out)


class BridgeTests(TestCase):
    def setUp(self) -> None:
        self.clock = ProcessClock()
        self.launcher = FakeLauncher()
        self.m = SessionManager(self.clock, self.launcher, MemoryLogSink(),
                                RunSettings(window=1000, chunk=300, lease=9.0, poll_wait=5.0),
                                Settings(uid_min=1000, uid_max=65000))
        self.control = MemoryControl(self.m)
        self.sink = Sink()
        self.settings = RunApiSettings(lease=9.0, poll_wait=5.0, chunk=300, input_buffer=100,
                                       runner_timeout=2.0)

    async def start(self) -> Any:
        await self.m.handle(Env("run.start", {
            "session_id": "s1", "app": "hello", "uid": 20001, "number": 1, "command": ["cat"],
            "image_digest": DIGEST, "tty": False, "detach": False, "client": "c1"}))
        self.m.sessions["s1"].tty = True  # reattachable, like a PTY session (pipes here)
        self.bridge = Bridge(self.control, "tcp://runner", "s1", "c1", self.clock,
                             self.settings, self.sink)
        self.bridge.start(0, 0)
        return self.clock.spawned[-1]

    def tearDown(self) -> None:
        bridge = getattr(self, "bridge", None)
        if bridge is not None:
            bridge.close()
        for call in self.clock.getDelayedCalls():
            call.cancel()

    async def test_output_in_order_and_acknowledged(self) -> None:
        """Output arrives in order, each poll acknowledges what was delivered, and the
        exit comes after the last byte."""
        p = await self.start()
        p.out(b"a" * 700)
        p.out(b"err", fd=2)
        p.out(b"b" * 10)
        p.end(0)
        self.assertEqual(self.sink.data(), b"a" * 700 + b"err" + b"b" * 10)
        self.assertEqual([fd for fd, _ in self.sink.out if fd == 2], [2])
        self.assertEqual(self.sink.exit, (0, None, None))
        acks = [b["ack"] for t, b in self.control.requests if t == "run.poll"]
        self.assertEqual(acks[:4], [0, 300, 600, 700])

    async def test_slow_client_pauses_polling_and_the_runner(self) -> None:
        """While the websocket is paused no poll is sent; the runner's window fills and
        it stops reading the command; resuming delivers every byte exactly once."""
        p = await self.start()
        self.bridge.pause()
        p.out(b"x" * 200)  # the waiting poll takes this one
        polls = len(self.control.requests)
        written = [b"x" * 200]
        while not p.paused:  # a command writing as fast as the runner reads
            written.append(bytes([65 + len(written)]) * 200)
            p.out(written[-1])
        self.assertEqual(len(self.control.requests), polls)
        self.assertLessEqual(self.m.sessions["s1"].out.size, 1000 + 200)
        self.bridge.resume()
        self.assertFalse(p.paused)
        for i in range(5):
            written.append(bytes([97 + i]) * 200)
            p.out(written[-1])
        self.assertEqual(self.sink.data(), b"".join(written))

    async def test_keep_alive_renews_the_lease_while_paused(self) -> None:
        """A paused bridge still renews the runner's lease (polls with max 0), so a
        slow client does not count as gone."""
        await self.start()
        self.bridge.pause()
        self.clock.advance(0)
        for _ in range(10):
            self.clock.advance(3)
        self.assertTrue(self.m.sessions["s1"].attached)
        keepalives = [b for t, b in self.control.requests if t == "run.poll" and b["max"] == 0]
        self.assertGreaterEqual(len(keepalives), 9)

    async def test_input_in_order_with_a_lost_reply(self) -> None:
        """Input events go one at a time in order; when a reply is lost the same seq
        is sent again and the runner applies it once."""
        p = await self.start()
        self.control.lose["run.input"] = 1
        self.bridge.send(data=b"he")
        self.bridge.send(data=b"llo")
        self.bridge.send(rows=40, cols=100)
        self.bridge.send(data=b"!")
        seqs = [b["seq"] for t, b in self.control.requests if t == "run.input"]
        self.assertEqual(seqs, [0, 0, 1, 2, 3])  # seq 0 again after its lost reply
        self.assertEqual((self.m.sessions["s1"].rows, self.m.sessions["s1"].cols), (40, 100))
        self.assertEqual(p.written, [b"he", b"llo", b"!"])

    async def test_input_buffer_pauses_the_websocket(self) -> None:
        """Past run.input_buffer_kb of queued input the websocket is paused, and resumed
        once the runner took it."""
        p = await self.start()
        gate = defer.Deferred()
        real = self.control.request

        async def slow(endpoint: str, type: str, body: dict[str, Any],
                       timeout: float | None = None) -> dict[str, Any]:
            if type == "run.input":
                await gate
            return await real(endpoint, type, body, timeout)

        self.control.request = slow  # type: ignore[method-assign]
        for _ in range(5):
            self.bridge.send(data=b"k" * 40)
        self.assertEqual(self.sink.input_paused, 1)
        gate.callback(None)
        self.assertEqual(self.sink.input_resumed, 1)
        self.assertEqual(b"".join(p.written), b"k" * 200)

    async def test_runner_gone(self) -> None:
        """When the runner stops answering for the lease, the client gets an error."""
        await self.start()
        self.control.down = True
        for _ in range(30):
            self.clock.advance(1)
        self.assertEqual([c for c, _ in self.sink.errors], ["runner_unreachable"])

    async def test_close_detaches(self) -> None:
        """A closed websocket detaches the client on the runner (the command stays)."""
        await self.start()
        self.bridge.close()
        self.assertIn("run.detach", [t for t, _ in self.control.requests])
        self.assertFalse(self.m.sessions["s1"].attached)
        self.assertEqual(self.launcher.signals, [])
