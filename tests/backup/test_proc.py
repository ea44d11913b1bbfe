"""The backup role's child processes: output and exit codes collected; cancelling one
(a step timeout) kills its whole process group."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from epio.backup import proc

ENV = {"PATH": "/usr/bin:/bin"}


def processes_with(marker: str) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if marker.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    out.append(int(entry))
            except OSError:
                pass
    return out


class ProcTests(TestCase):
    timeout = 20

    async def test_output_and_codes(self) -> None:
        """stdout, stderr and the exit code come back; a signal is 128 + its number."""
        out, err, code = await proc.run(reactor, ["/bin/sh", "-c", "echo out; echo err >&2; "
                                                  "exit 3"], ENV)
        self.assertEqual((out, err, code), (b"out\n", b"err\n", 3))
        _, _, code = await proc.run(reactor, ["/bin/sh", "-c", "kill -TERM $$"], ENV)
        self.assertEqual(code, 128 + 15)

    async def test_cancel_kills_the_group(self) -> None:
        """Cancelling the Deferred kills the command and every child it started."""
        marker = "epio-proc-" + secrets.token_hex(4)
        d = proc.run(reactor, ["/bin/sh", "-c", f"sleep 30 & sleep 31; : {marker}"], ENV)
        for _ in range(500):  # the shell and its two sleeps have started (10 s at most:
            # a loaded machine took over 2 s to fork both)
            if processes_with(marker) and len(_group(processes_with(marker)[0])) >= 3:
                break
            await deferLater(reactor, 0.02, lambda: None)
        shell = processes_with(marker)[0]
        members = _group(shell)
        self.assertGreaterEqual(len(members), 3)  # sh and both sleeps
        self.assertNotEqual(os.getpgid(shell), os.getpgid(0))  # a group of its own
        d.cancel()
        with self.assertRaises(defer.CancelledError):
            await d
        for _ in range(100):
            if not [p for p in members if os.path.exists(f"/proc/{p}") and _alive(p)]:
                break
            await deferLater(reactor, 0.05, lambda: None)
        self.assertEqual([p for p in members if _alive(p)], [])


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _group(pid: int) -> list[int]:
    """Every process in ``pid``'s process group."""
    pgid = _pgid(pid)
    return [p for p in map(int, filter(str.isdigit, os.listdir("/proc"))) if _pgid(p) == pgid]


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for its parent)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
