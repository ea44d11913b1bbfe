"""The session manager with real processes and a real PTY, without a sandbox
(tests.run.fakes.PlainLauncher: the path a runner takes when bubblewrap is off).

Checks what only a real terminal shows: the command's controlling terminal is the
PTY (so 0x03 is SIGINT for the command and a resize is SIGWINCH), output uses
CRLF, and a full window stops reading the PTY until the client acknowledges.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from epio.pipeline import MemoryLogSink
from epio.runner.sessions import RunSettings, SessionManager
from epio.runner.supervisor import Settings
from tests.run.fakes import PlainLauncher
from tests.run.test_sessions import DIGEST, Env


class LocalPtyTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.launcher = PlainLauncher()
        self.m = SessionManager(reactor, self.launcher, MemoryLogSink(),
                                RunSettings(window=64 * 1024, chunk=16 * 1024, kill_grace=1.0),
                                Settings(uid_min=1000, uid_max=65000), node_id="local")

    async def tearDown(self) -> None:
        for s in list(self.m.sessions.values()):
            if s.live and s.launch is not None:
                self.launcher.kill_all(s.launch)
        await deferLater(reactor, 0.3, lambda: None)
        for s in list(self.m.sessions.values()):
            self.m._cancel_all(s)

    async def call(self, type: str, **body: Any) -> dict[str, Any]:
        _, reply = await self.m.handle(Env(type, body))
        return reply

    async def start(self, command: str, rows: int = 24, cols: int = 80) -> None:
        await self.call("run.start", session_id="s1", app="hello", uid=20001, number=1,
                        command=[command], image_digest=DIGEST, tty=True, detach=False,
                        client="c1", rows=rows, cols=cols)
        self.ack = 0
        self.seq = 0
        self.output = b""

    async def read_until(self, text: bytes, timeout: float = 10) -> dict[str, Any]:
        deadline = reactor.seconds() + timeout
        while True:
            reply = await self.call("run.poll", session_id="s1", client="c1", ack=self.ack,
                                    max=1 << 20, wait=1.0)
            offset = reply["offset"]
            for _, data in reply["chunks"]:
                self.output += data
                offset += len(data)
            self.ack = offset
            if text in self.output or reply["exited"]:
                return reply
            if reactor.seconds() > deadline:
                self.fail(f"{text!r} not in the output (last bytes: {self.output[-200:]!r})")

    async def send(self, **event: Any) -> None:
        await self.call("run.input", session_id="s1", client="c1", seq=self.seq, **event)
        self.seq += 1

    async def test_pty_size_resize_and_ctrl_c(self) -> None:
        """The PTY has the client's size from the start, a resize reaches the command
        as SIGWINCH, and the byte 0x03 interrupts it (SIGINT)."""
        await self.start("trap 'echo winch; stty size' WINCH; stty size; echo ready; "
                         "while true; do sleep 0.1; done", rows=33, cols=101)
        await self.read_until(b"ready")
        self.assertIn(b"33 101\r\n", self.output)
        await self.send(rows=40, cols=120)
        await self.read_until(b"40 120")
        await deferLater(reactor, 0.3, lambda: None)  # let the trap handler finish
        await self.send(data=b"\x03")
        reply = await self.read_until(b"never")
        self.assertTrue(reply["exited"])
        # without bubblewrap the shell itself dies of SIGINT (bwrap reports 128 + 2)
        self.assertIn((reply["status"], reply["signal"]), [(130, None), (None, "SIGINT")])

    async def test_signals_are_not_left_ignored(self) -> None:
        """The command does not inherit ignored SIGPIPE/SIGINT (Python's, or the
        runner's): `yes | head` ends quietly, as in a terminal."""
        await self.start("yes | head -c 5; echo; grep SigIgn /proc/self/status")
        reply = await self.read_until(b"never")
        self.assertNotIn(b"Broken pipe", self.output)
        self.assertIn(b"SigIgn:\t0000000000000000", self.output)
        self.assertEqual(reply["status"], 0)

    async def test_full_window_stops_reading_the_pty(self) -> None:
        """An unread flood fills the window and stops there (the writer blocks on the
        PTY); acknowledging lets the rest through, byte-exact."""
        await self.start("head -c 1000000 /dev/zero | tr '\\0' x; echo; echo done")
        await deferLater(reactor, 1.0, lambda: None)
        s = self.m.sessions["s1"]
        self.assertTrue(s.paused)
        self.assertLess(s.out.size, 64 * 1024 + 65536)
        reply = await self.read_until(b"done")
        self.assertEqual(self.output.count(b"x"), 1000000)
        if not reply["exited"]:
            reply = await self.read_until(b"never")
        self.assertEqual(reply["status"], 0)
