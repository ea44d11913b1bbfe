"""Two OS processes contend for one store lock; killing the holder moves it."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.store import pg
from tests.util import epio_env

HOLDER = Path(__file__).with_name("lock_holder.py")
FAILOVER_BOUND = 5.0  # seconds from SIGKILL of the holder to the other process holding


class Holder:
    """A lock_holder.py subprocess and its output lines."""

    def __init__(self, url: str, name: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HOLDER), url, name], stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, env=epio_env(), start_new_session=True,
        )
        self.lines: list[str] = []
        self._buf = b""

    def wait_for(self, prefix: str, timeout: float) -> float:
        """Block until a line starting with ``prefix``; return when it came (monotonic)."""
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while True:
            for line in self.lines:
                if line.startswith(prefix):
                    return time.monotonic()
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {prefix!r} in {timeout}s; output: {self.lines}")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise AssertionError(f"holder exited before {prefix!r}: {self.lines}")
                self._buf += chunk
                *done, self._buf = self._buf.split(b"\n")
                self.lines += [d.decode("utf-8", "replace") for d in done]

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class FailoverMixin:
    def url(self) -> str:
        raise NotImplementedError

    def holder(self, url: str, name: str) -> Holder:
        h = Holder(url, name)
        self.addCleanup(h.kill)  # type: ignore[attr-defined]
        return h

    def test_lock_moves_when_holder_killed(self) -> None:
        """Process A holds the lock, B waits; after SIGKILL of A, B holds it within the bound."""
        url = self.url()
        name = f"leader-{os.getpid()}-{time.monotonic_ns()}"
        a = self.holder(url, name)
        a.wait_for("ACQUIRED", 30)
        b = self.holder(url, name)
        b.wait_for("WAITING", 30)
        time.sleep(1.0)
        self.assertFalse(any(x.startswith("ACQUIRED") for x in b.lines),  # type: ignore[attr-defined]
                         "B took the lock while A held it")
        killed = time.monotonic()
        a.kill()
        took = b.wait_for("ACQUIRED", FAILOVER_BOUND) - killed
        self.assertLess(took, FAILOVER_BOUND)  # type: ignore[attr-defined]
        print(f"\n{type(self).__name__}: lock moved {took * 1000:.0f} ms after SIGKILL")


class PostgresLockFailoverTests(FailoverMixin, SynchronousTestCase):
    """Session-level advisory locks on PostgreSQL: released when the holder dies."""

    def url(self) -> str:
        return pg.fresh_database_for_test(self)


class SqliteLockFailoverTests(FailoverMixin, SynchronousTestCase):
    """The SQLite store's local lock (flock) between two processes on one box."""

    def url(self) -> str:
        return f"sqlite:///{self.mktemp()}/store.sqlite3"
