"""The runner's session manager on fakes: a Clock that spawns fake processes and a
launcher that records signals.  Flow-control window, poll/ack, ordered input,
take-over, leases and idle timeout, lifetime, teardown, detached output."""

from __future__ import annotations

import fcntl
import os
import struct
import termios
from typing import Any

from twisted.internet import defer, task
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from epio.bus import RemoteError
from epio.pipeline import MemoryLogSink
from epio.runner.fence import FenceNotApplied
from epio.runner.sessions import (
    OutputWindow,
    RunSettings,
    SessionManager,
    command_text,
    set_window_size,
)
from epio.runner.supervisor import ILauncher, Launch, Settings

DIGEST = "a" * 64


class Env:
    def __init__(self, type: str, body: dict[str, Any]) -> None:
        self.type = type
        self.body = body


class FakeProcess:
    """What spawnProcess returns: records writes, pauses, stdin closing."""

    def __init__(self, proto: Any, pid: int) -> None:
        self.proto = proto
        self.pid = pid
        self.paused = False
        self.written: list[bytes] = []
        self.stdin_closed = False
        self.producer: Any = None

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def writeToChild(self, fd: int, data: bytes) -> None:
        self.written.append(data)

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def out(self, data: bytes, fd: int = 1) -> None:
        self.proto.childDataReceived(fd, data)

    def end(self, code: int = 0, sig: int | None = None) -> None:
        reason = ProcessDone(0) if code == 0 and sig is None else ProcessTerminated(code, sig)
        self.proto.processEnded(Failure(reason))


class ProcessClock(task.Clock):
    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[FakeProcess] = []

    def spawnProcess(self, proto: Any, executable: str, args: list[str], env: Any = None,
                     path: Any = None, uid: Any = None, gid: Any = None, usePTY: Any = 0,
                     childFDs: Any = None) -> FakeProcess:
        p = FakeProcess(proto, 1000 + len(self.spawned))
        self.spawned.append(p)
        proto.makeConnection(p)
        return p


@implementer(ILauncher)
class FakeLauncher:
    isolation = None

    def __init__(self) -> None:
        self.signals: list[int] = []
        self.killed = 0
        self.cleaned = 0
        self.specs: list[Any] = []

    def prepare(self, spec: Any, port: int | None) -> defer.Deferred[Launch]:
        self.specs.append(spec)
        return defer.succeed(Launch(argv=["/bin/true"], env={}, cwd="/",
                                    child_fds={0: "w", 1: "r", 2: "r"}))

    def spawned(self, launch: Launch, pid: int) -> None:
        launch.pid = pid

    def signal(self, launch: Launch, sig: int) -> None:
        self.signals.append(sig)

    def kill_all(self, launch: Launch) -> None:
        self.killed += 1

    def oom_kills(self, launch: Launch) -> int:
        return 0

    def listening_ports(self, launch: Launch, host: str | None = None) -> list[int]:
        return []

    def cleanup(self, launch: Launch) -> defer.Deferred[None]:
        self.cleaned += 1
        return defer.succeed(None)


class OutputWindowTests(SynchronousTestCase):
    def test_offsets_ack_and_read(self) -> None:
        """Output is addressed by byte offset: acks free bytes (even inside a chunk),
        reads start at any kept offset, stale or future offsets are clamped."""
        w = OutputWindow(10)
        w.append(1, b"hello")
        w.append(2, b"err")
        w.append(1, b"world")
        self.assertEqual((w.start, w.end, w.size, w.full), (0, 13, 13, True))
        self.assertEqual(w.read(3, 100), (3, [[1, b"lo"], [2, b"err"], [1, b"world"]]))
        self.assertEqual(w.read(0, 4), (0, [[1, b"hell"]]))
        w.ack(7)
        self.assertEqual((w.start, w.size, w.full), (7, 6, False))
        self.assertEqual(w.read(0, 100), (7, [[2, b"r"], [1, b"world"]]))
        w.ack(3)  # an old ack changes nothing
        self.assertEqual(w.start, 7)
        w.ack(99)  # past the end: everything
        self.assertEqual((w.start, w.size, w.read(0, 10)), (13, 0, (13, [])))

    def test_window_size_on_a_real_pty(self) -> None:
        """set_window_size is TIOCSWINSZ: the PTY reports the new size."""
        master, slave = os.openpty()
        self.addCleanup(os.close, master)
        self.addCleanup(os.close, slave)
        set_window_size(master, 33, 101)
        rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(slave, termios.TIOCGWINSZ,
                                                             b"\0" * 8))
        self.assertEqual((rows, cols), (33, 101))

    def test_command_text(self) -> None:
        """One argument is a shell string; several are an argv quoted exactly."""
        self.assertEqual(command_text(["yes | head"]), "yes | head")
        self.assertEqual(command_text(["echo", "a b", "$HOME"]), "echo 'a b' '$HOME'")


class SessionTests(TestCase):
    def setUp(self) -> None:
        self.clock = ProcessClock()
        self.launcher = FakeLauncher()
        verifyObject(ILauncher, self.launcher)
        self.sink = MemoryLogSink()
        self.settings = RunSettings(max_sessions_per_app=2, max_lifetime=1000.0,
                                    detached_idle_timeout=60.0, lease=9.0, poll_wait=5.0,
                                    window=1000, chunk=400, kill_grace=2.0)
        self.gates: list[Any] = []  # the spawn gates, as the runner's root owns them
        self.m = SessionManager(self.clock, self.launcher, self.sink, self.settings,
                                Settings(uid_min=1000, uid_max=65000), node_id="n1",
                                observers=self.gates)

    async def call(self, type: str, **body: Any) -> dict[str, Any]:
        _, reply = await self.m.handle(Env(type, body))
        return reply

    async def start(self, sid: str = "s1", **kw: Any) -> FakeProcess:
        body = {"session_id": sid, "app": "hello", "uid": 20001, "number": 1,
                "command": ["cat"], "image_digest": DIGEST, "tty": False, "detach": False,
                "client": "c1", "user": "alice"}
        body.update(kw)
        await self.call("run.start", **body)
        return self.clock.spawned[-1]

    async def test_window_pauses_and_acks_resume(self) -> None:
        """Past run.window_kb of unacknowledged output the runner stops reading the
        command; an ack that frees room resumes it; polls carry at most chunk bytes."""
        p = await self.start()
        p.out(b"x" * 600)
        self.assertFalse(p.paused)
        p.out(b"y" * 600)
        self.assertTrue(p.paused)
        reply = await self.call("run.poll", session_id="s1", client="c1", ack=0, max=10_000)
        self.assertEqual(reply["offset"], 0)
        self.assertEqual(sum(len(c[1]) for c in reply["chunks"]), 400)  # the chunk limit
        self.assertTrue(p.paused)  # nothing acknowledged yet
        reply = await self.call("run.poll", session_id="s1", client="c1", ack=400, max=10_000)
        self.assertEqual(reply["offset"], 400)
        self.assertFalse(p.paused)  # 800 kept < 1000
        self.assertEqual(self.m.sessions["s1"].out.size, 800)

    async def test_poll_waits_for_output_or_times_out(self) -> None:
        """A poll with nothing to send waits (up to wait s) and returns as soon as the
        command writes; an empty poll comes back when the wait is over."""
        p = await self.start()
        d = defer.ensureDeferred(self.call("run.poll", session_id="s1", client="c1", ack=0,
                                           wait=3))
        self.assertNoResult(d)
        p.out(b"late")
        reply = self.successResultOf(d)
        self.assertEqual(reply["chunks"], [[1, b"late"]])
        d = defer.ensureDeferred(self.call("run.poll", session_id="s1", client="c1", ack=4,
                                           wait=3))
        self.clock.advance(2.9)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        self.assertEqual(self.successResultOf(d)["chunks"], [])

    async def test_input_is_applied_once_in_order(self) -> None:
        """Input events apply in seq order exactly once: a repeated seq (a retry) is
        acknowledged without writing again, a gap is refused."""
        p = await self.start()
        await self.call("run.input", session_id="s1", client="c1", seq=0, data=b"a")
        await self.call("run.input", session_id="s1", client="c1", seq=0, data=b"a")
        with self.assertRaises(RemoteError) as e:
            await self.call("run.input", session_id="s1", client="c1", seq=2, data=b"c")
        self.assertEqual(e.exception.code, "out_of_order")
        await self.call("run.input", session_id="s1", client="c1", seq=1, data=b"b", eof=True)
        self.assertEqual(p.written, [b"a", b"b"])
        self.assertTrue(p.stdin_closed)

    async def test_lifecycle_moves_only_forward(self) -> None:
        """A session is starting, then running once spawned (what run.start replies),
        then exited when its process and output ended; an exited session can never
        run again (SESSION_TRANSITIONS: such a move is a bug and raises)."""
        from epio.runner.sessions import SESSION_TRANSITIONS, SessionState
        from epio.runner.supervisor import InvalidTransition

        reply = await self.call("run.start", session_id="s1", app="hello", uid=20001,
                                number=1, command=["cat"], image_digest=DIGEST, tty=False,
                                detach=False, client="c1", user="alice")
        self.assertEqual(reply["state"], "running")
        p = self.clock.spawned[-1]
        p.end(0)
        s = self.m.sessions["s1"]
        self.assertIs(s.state, SessionState.EXITED)
        self.assertEqual(SESSION_TRANSITIONS[SessionState.EXITED], frozenset())
        with self.assertRaises(InvalidTransition):
            self.m._move(s, SessionState.RUNNING)
        self.assertIs(s.state, SessionState.EXITED)

    async def test_exit_only_after_all_output(self) -> None:
        """The exit status is reported once every byte was polled, never before."""
        p = await self.start()
        p.out(b"last words")
        p.end(3)
        reply = await self.call("run.poll", session_id="s1", client="c1", ack=0, max=4)
        self.assertEqual((reply["chunks"], reply["exited"]), ([[1, b"last"]], False))
        reply = await self.call("run.poll", session_id="s1", client="c1", ack=4)
        self.assertEqual(reply["chunks"], [[1, b" words"]])
        self.assertEqual((reply["exited"], reply["status"]), (True, 3))
        self.assertEqual(self.launcher.cleaned, 1)
        texts = self.sink.texts("hello", "platform")
        self.assertIn("run.1 started by alice on n1: cat", texts[0])
        self.assertIn("exited with status 3", texts[-1])

    async def test_a_tool_script_stays_out_of_the_app_log(self) -> None:
        """`epio psql` runs `sh -c SCRIPT psql ARGS`: the app's log names `psql ARGS` and
        the script's size, never the script; short commands show whole."""
        from epio.cli.addons import PSQL
        from epio.runner.sessions import log_text

        p = await self.start(command=["sh", "-c", PSQL, "psql", "-c", "select 1"])
        p.end(0)
        await self.call("run.poll", session_id="s1", client="c1", ack=0)
        texts = self.sink.texts("hello", "platform")
        self.assertEqual(texts[0], f"run.1 started by alice on n1: psql -c 'select 1' "
                                   f"(a {len(PSQL)}-character sh script)")
        self.assertTrue(texts[-1].startswith(
            f"run.1 (psql -c 'select 1' (a {len(PSQL)}-character sh script)) of alice "
            "exited with status 0"), texts[-1])
        self.assertFalse([t for t in texts if "DATABASE_URL" in t])
        self.assertEqual(log_text("sh -c 'echo hi' x"), "sh -c 'echo hi' x")
        self.assertEqual(log_text("yes | head"), "yes | head")
        self.assertEqual(log_text("echo 'unbalanced"), "echo 'unbalanced")

    async def test_take_over_by_a_new_client(self) -> None:
        """run.attach by another client takes the session over: the old client's
        waiting poll and later requests are refused (taken_over)."""
        await self.start(tty=False)
        self.m.sessions["s1"].tty = True  # attachable (a PTY session in real life)
        d = defer.ensureDeferred(self.call("run.poll", session_id="s1", client="c1", ack=0,
                                           wait=3))
        reply = await self.call("run.attach", session_id="s1", client="c2")
        self.assertEqual((reply["offset"], reply["seq"]), (0, 0))
        self.failureResultOf(d, RemoteError)
        with self.assertRaises(RemoteError) as e:
            await self.call("run.input", session_id="s1", client="c1", seq=0, data=b"x")
        self.assertEqual(e.exception.code, "taken_over")

    async def test_lease_expiry_then_idle_timeout_stops_and_audits(self) -> None:
        """An interactive session whose client is silent past the lease is detached; it
        keeps running for detached_idle_timeout, then SIGTERM, SIGKILL after the grace,
        and the end is a platform line with the reason."""
        p = await self.start()
        s = self.m.sessions["s1"]
        s.tty = True
        self.clock.advance(8)
        self.assertTrue(s.attached)
        self.clock.advance(2)
        self.assertFalse(s.attached)
        self.clock.advance(59)
        self.assertEqual(self.launcher.signals, [])
        self.clock.advance(1)
        self.assertEqual(self.launcher.signals, [15])
        self.clock.advance(2)
        self.assertEqual(self.launcher.signals, [15, 9])
        p.end(137)
        self.assertEqual(s.state, "exited")
        self.assertIn("run.detached_idle_timeout", s.reason or "")
        self.assertIn("run.detached_idle_timeout", self.sink.texts("hello", "platform")[-1])

    async def test_reattach_cancels_the_idle_timeout(self) -> None:
        """A client attaching before the idle timeout keeps the command alive."""
        await self.start()
        s = self.m.sessions["s1"]
        s.tty = True
        await self.call("run.detach", session_id="s1", client="c1")
        self.clock.advance(59)
        await self.call("run.attach", session_id="s1", client="c2")
        self.clock.advance(30)
        await self.call("run.poll", session_id="s1", client="c2", ack=0)
        self.clock.advance(30)
        self.assertEqual(self.launcher.signals, [])

    async def test_pipe_session_stops_when_its_client_goes(self) -> None:
        """Without a PTY nobody can reattach: the command is stopped at once and its
        pending output dropped (so a paused writer is not stuck)."""
        p = await self.start()
        p.out(b"z" * 1500)
        self.assertTrue(p.paused)
        await self.call("run.detach", session_id="s1", client="c1")
        self.assertFalse(p.paused)
        self.assertEqual(self.launcher.signals, [15])
        self.assertEqual(self.m.sessions["s1"].out.size, 0)

    async def test_lifetime_and_session_limit(self) -> None:
        """max_sessions_per_app refuses a third session of the app; max_lifetime stops
        a session however busy its client is."""
        await self.start("s1")
        await self.start("s2", number=2)
        with self.assertRaises(RemoteError) as e:
            await self.start("s3", number=3)
        self.assertEqual(e.exception.code, "session_limit")
        for _ in range(125):
            self.clock.advance(8)
            for sid in ("s1", "s2"):
                await self.call("run.poll", session_id=sid, client="c1", ack=0)
        self.assertIn(15, self.launcher.signals)
        self.assertIn("run.max_lifetime", self.m.sessions["s1"].reason or "")

    async def test_detached_output_goes_to_the_log(self) -> None:
        """A detached session's stdin is closed and each output line is a log line of
        source run.N; run.wait returns the status and the last lines."""
        p = await self.start(detach=True, client=None, number=7)
        self.assertTrue(p.stdin_closed)
        p.out(b"one\ntw")
        p.out(b"o\n", fd=2)
        p.out(b"o\nthree")
        d = defer.ensureDeferred(self.call("run.wait", session_id="s1", timeout=10))
        self.assertNoResult(d)
        p.end(0)
        reply = self.successResultOf(d)
        self.assertEqual((reply["state"], reply["status"]), ("exited", 0))
        self.assertEqual(self.sink.texts("hello", "run.7"), ["one", "o", "two", "three"])
        self.assertEqual(reply["tail"], ["one", "o", "two", "three"])

    async def test_runner_stop_ends_every_session(self) -> None:
        """Stopping the runner SIGTERMs every live session and waits for it to end."""
        p = await self.start()
        d = self.m.stopService()
        self.assertEqual(self.launcher.signals, [15])
        self.assertNoResult(d)
        p.end(143)
        self.successResultOf(d)
        self.assertEqual(self.m.sessions["s1"].reason, "the runner is stopping")

    async def test_addon_ports_and_observers(self) -> None:
        """A session's addon_ports reach the observers (the network fence) as (uid,
        port) while it lives; its process starts only once what an observer returned
        fired; the end tells the observers again; a stopping runner starts none."""
        gate: defer.Deferred[None] = defer.Deferred()
        calls: list[list[tuple[int, int]]] = []

        def observer() -> defer.Deferred[None] | None:
            calls.append(self.m.reach())
            return gate if len(calls) == 1 else None

        self.gates.append(observer)
        started = defer.ensureDeferred(self.start(addon_ports=[5432]))
        self.assertEqual(calls, [[(20001, 5432)]])
        self.assertEqual(self.clock.spawned, [])  # waits for the fence
        gate.callback(None)
        p = self.successResultOf(started)
        p.end(0)
        self.assertEqual(calls[-1], [])
        self.m.stopService()
        with self.assertRaises(RemoteError) as e:
            await self.start("s2")
        self.assertEqual(e.exception.code, "unavailable")

    async def test_a_refusing_observer_fails_the_start(self) -> None:
        """An observer that fails (the network fence is on but no table is in place)
        fails run.start with start_failed and its reason; nothing is spawned."""
        self.gates.append(lambda: defer.fail(FenceNotApplied(
            "network fence not applied (nft table inet t): nope")))
        with self.assertRaises(RemoteError) as e:
            await self.start()
        self.assertEqual(e.exception.code, "start_failed")
        self.assertIn("cannot start: network fence not applied (nft table inet t): nope",
                      str(e.exception))
        self.assertEqual(self.clock.spawned, [])
        self.assertEqual(self.m.sessions["s1"].state, "exited")

    async def test_bad_requests(self) -> None:
        """Unknown sessions, empty commands and bad sizes get clear errors."""
        with self.assertRaises(RemoteError) as e:
            await self.call("run.poll", session_id="nope", client="c1", ack=0)
        self.assertEqual(e.exception.code, "unknown_session")
        with self.assertRaises(RemoteError) as e:
            await self.start(command=[" "])
        self.assertEqual(e.exception.code, "bad_request")
        with self.assertRaises(RemoteError) as e:
            await self.start(rows=0)
        self.assertEqual(e.exception.code, "bad_request")
