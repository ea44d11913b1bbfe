"""A dedicated app Redis: its config holds the limits, snapshots never fill the disk."""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from pathlib import Path

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from epio.addons.redis import PersistenceGuard, RedisSpecError, redis_spec
from tests.util import free_port, small_tmpfs


class RedisAddonTests(TestCase):
    timeout = 120

    def start(self, spec) -> None:  # type: ignore[no-untyped-def]
        spec.write_config()
        self.assertEqual(spec.config_path.stat().st_mode & 0o777, 0o600)
        proc = subprocess.Popen(spec.argv(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(lambda: (proc.kill(), proc.wait()))
        self.assertNotIn(spec.password, " ".join(spec.argv()))
        for _ in range(100):
            if self.cli(spec, "PING") == "PONG":
                return
            time.sleep(0.05)
        raise AssertionError("redis did not start")

    def cli(self, spec, *args: str) -> str:  # type: ignore[no-untyped-def]
        return subprocess.run(
            ["redis-cli", "-p", str(spec.port), *args], capture_output=True, text=True,
            env={**os.environ, "REDISCLI_AUTH": spec.password},
        ).stdout.strip()

    def test_limits_and_password(self) -> None:
        """The server enforces the password and maxmemory from [redis] memory."""
        spec = redis_spec("app1", free_port(), Path(self.mktemp()).absolute(), memory_mb=8)
        self.start(spec)
        self.assertIn("NOAUTH", subprocess.run(
            ["redis-cli", "-p", str(spec.port), "GET", "x"], capture_output=True, text=True
        ).stdout)
        self.assertEqual(self.cli(spec, "INFO", "memory").split("maxmemory:")[1].split()[0],
                         str(8 * 1024 * 1024))
        with self.assertRaises(RedisSpecError):
            redis_spec("app1", 1, Path("/tmp"), memory_mb=0)

    async def test_snapshot_refused_when_disk_too_small(self) -> None:
        """With less free space than the dataset needs the guard refuses to snapshot and
        says so; with room it snapshots and the dump exists."""
        small = small_tmpfs(self, "2m")
        spec = redis_spec("app2", free_port(), small, memory_mb=64)
        self.start(spec)
        for i in range(40):
            self.cli(spec, "SET", f"k{i}", secrets.token_hex(50_000))
        reports: list[str] = []
        guard = PersistenceGuard(reactor, spec, reports.append)
        self.assertFalse(await guard.snapshot())
        self.assertEqual(guard.counters["refused"], 1)
        self.assertIn("snapshot refused", reports[0])
        self.assertFalse((small / "dump.rdb").exists())

        roomy = redis_spec("app3", free_port(), Path(self.mktemp()).absolute(), memory_mb=64)
        self.start(roomy)
        for i in range(40):
            self.cli(roomy, "SET", f"k{i}", secrets.token_hex(50_000))
        guard = PersistenceGuard(reactor, roomy, reports.append)
        self.assertTrue(await guard.snapshot())
        self.assertGreater((roomy.data_dir / "dump.rdb").stat().st_size, 1_000_000)
