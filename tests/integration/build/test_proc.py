"""Build steps as real processes: lines streamed, whole process group killed on timeout."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from twisted.internet import reactor
from twisted.trial.unittest import SkipTest, TestCase

from epio.runner.build.proc import MemoryCgroup, run_step

ENV = {"PATH": "/usr/bin:/bin"}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


class RunStepTests(TestCase):
    timeout = 30

    async def test_lines_streamed_and_exit_code(self) -> None:
        """stdout and stderr arrive as lines (a last line without newline too); the exit
        status is reported."""
        lines: list[str] = []
        res = await run_step(
            reactor,
            ["/bin/sh", "-c", "echo one; echo two >&2; printf three; exit 3"],
            env=ENV,
            cwd="/",
            on_line=lines.append,
            timeout=10,
        )
        self.assertEqual(sorted(lines), ["one", "three", "two"])
        self.assertEqual((res.exit_code, res.timed_out, res.ok), (3, False, False))

    async def test_timeout_kills_whole_group(self) -> None:
        """On timeout the step and every process it started are killed."""
        tmp = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, tmp)
        pidfile = tmp / "pids"
        lines: list[str] = []
        start = reactor.seconds()
        res = await run_step(
            reactor,
            [
                "/bin/sh",
                "-c",
                f"sleep 300 & echo $! > {pidfile}; sleep 300 & echo $! >> {pidfile}; wait",
            ],
            env=ENV,
            cwd="/",
            on_line=lines.append,
            timeout=1.0,
        )
        self.assertTrue(res.timed_out)
        self.assertLess(reactor.seconds() - start, 10)
        pids = [int(p) for p in pidfile.read_text().split()]
        self.assertEqual(len(pids), 2)
        for _ in range(50):
            if not any(_alive(p) for p in pids):
                break
            await __import__("twisted.internet.task", fromlist=["deferLater"]).deferLater(
                reactor, 0.05, lambda: None
            )
        self.assertFalse(any(_alive(p) for p in pids), "a child of the step survived its timeout")

    async def test_memory_cgroup_and_build_user(self) -> None:
        """A step runs in its memory cgroup as the given uid, with the file-size rlimit."""
        if os.geteuid() != 0:
            raise SkipTest("needs root")
        cg = MemoryCgroup.create(f"test-{os.getpid()}", 256 * 1024 * 1024)
        if cg is None:
            raise SkipTest("no cgroup v1 memory controller")
        self.addCleanup(
            lambda: __import__(
                "twisted.internet.defer", fromlist=["Deferred"]
            ).Deferred.fromCoroutine(cg.remove(reactor))
        )
        lines: list[str] = []
        res = await run_step(
            reactor,
            ["/bin/sh", "-c", "id -u; cat /proc/self/cgroup | grep memory; ulimit -f"],
            env=ENV,
            cwd="/",
            on_line=lines.append,
            timeout=10,
            uid=65534,
            gid=65534,
            cgroup=cg,
            rlimit_fsize=1024 * 1024,
        )
        self.assertTrue(res.ok, lines)
        self.assertEqual(lines[0], "65534")
        self.assertTrue(lines[1].endswith(f"/epio-build/test-{os.getpid()}"), lines)
        self.assertIn(lines[2], ("2048", "1024"))  # 1 MiB in the shell's blocks
