"""The wrapper a runner runs for a dedicated Redis (epio.addons.services): its config
(0600, password never in argv), and its persistence guard -- snapshots only when the data
directory has room, a refusal reported on its output (the app's log); its durability --
the append-only file, SHUTDOWN SAVE on a stop, a snapshot from before AOF kept."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from epio.addons.services import REDIS_DIR, redis_start_body
from tests.util import free_port, small_tmpfs


class RedisWrapperTests(SynchronousTestCase):
    def start(self, data: Path, memory_mb: int = 64,
              password: str | None = None) -> tuple[subprocess.Popen, int, str, Path]:
        port, password = free_port(), password or secrets.token_urlsafe(16)
        body = redis_start_body(app="w", uid=20001, instance_id="w-1", image_digest="a" * 64,
                                password=password, memory_mb=memory_mb, policy="allkeys-lru",
                                host="127.0.0.1", snapshot_interval=1, boot_timeout=30)
        out = data.parent / f"out-{port}.txt"
        env = {**body["env"], "EPIO_DATA_DIR": str(data), "PORT": str(port),
               "PATH": "/usr/bin:/bin"}
        proc = subprocess.Popen(body["command"], env=env, stdout=open(out, "wb"),
                                stderr=subprocess.STDOUT, start_new_session=True)

        def stop() -> None:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(10)

        self.addCleanup(stop)
        self.assertNotIn(password, " ".join(body["command"]))
        for _ in range(100):
            if self.cli(port, password, "PING") == "PONG":
                return proc, port, password, out
            time.sleep(0.05)
        raise AssertionError("redis did not start: " + out.read_text())

    def cli(self, port: int, password: str, *args: str) -> str:
        return subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True,
                              text=True, env={**os.environ, "REDISCLI_AUTH": password},
                              timeout=10).stdout.strip()

    def test_config_and_snapshots(self) -> None:
        """The config file is 0600 in the data dir; with room, the guard snapshots."""
        data = Path(self.mktemp()).absolute()
        data.mkdir(parents=True)
        _, port, password, out = self.start(data)
        conf = data / REDIS_DIR / "redis.conf"
        self.assertEqual(conf.stat().st_mode & 0o777, 0o600)
        self.assertIn(f"port {port}", conf.read_text())
        self.cli(port, password, "SET", "k", "v")
        dump = data / REDIS_DIR / "dump.rdb"
        deadline = time.monotonic() + 10
        while not dump.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        self.assertTrue(dump.exists(), out.read_text())

    def test_snapshot_refused_when_disk_too_small(self) -> None:
        """More data than the data dir can hold: no snapshot, and the refusal is reported."""
        small = small_tmpfs(self, "2m")
        _, port, password, out = self.start(small)
        for i in range(40):
            self.cli(port, password, "SET", f"k{i}", secrets.token_hex(50_000))
        deadline = time.monotonic() + 10
        while "snapshot refused" not in out.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        self.assertIn("redis snapshot refused", out.read_text())
        self.assertFalse((small / REDIS_DIR / "dump.rdb").exists())

    def test_crash_ends_the_wrapper_at_once(self) -> None:
        """When redis-server dies the wrapper exits and its output pipe closes at once (no
        sleeping guard keeps it open), so the runner sees the end and restarts it."""
        import threading

        data = Path(self.mktemp()).absolute()
        data.mkdir(parents=True)
        port, password = free_port(), secrets.token_urlsafe(16)
        body = redis_start_body(app="w", uid=20001, instance_id="w-1", image_digest="a" * 64,
                                password=password, memory_mb=16, policy="allkeys-lru",
                                host="127.0.0.1", snapshot_interval=600, boot_timeout=30)
        env = {**body["env"], "EPIO_DATA_DIR": str(data), "PORT": str(port),
               "PATH": "/usr/bin:/bin"}
        proc = subprocess.Popen(body["command"], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.addCleanup(lambda: (os.killpg(proc.pid, signal.SIGKILL)
                                 if proc.poll() is None else None))
        eof = threading.Event()
        threading.Thread(target=lambda: (proc.stdout.read(), eof.set()), daemon=True).start()
        for _ in range(100):
            if self.cli(port, password, "PING") == "PONG":
                break
            time.sleep(0.05)
        self.cli(port, password, "DEBUG", "SEGFAULT")  # renamed away: no effect
        self.assertEqual(self.cli(port, password, "PING"), "PONG")
        [pid] = subprocess.run(["pgrep", "-f", f"redis-server.*:{port}"], capture_output=True,
                               text=True).stdout.split()
        os.kill(int(pid), signal.SIGKILL)
        self.assertTrue(eof.wait(5), "the wrapper's output stayed open after redis died")
        proc.wait(5)
        self.assertNotEqual(proc.returncode, 0)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the guard's sleep, if any, is harmless
        except ProcessLookupError:
            pass

    def test_clean_stop_saves_and_restart_keeps_every_write(self) -> None:
        """SIGTERM to the wrapper's group (the runner's stop): the wrapper ends only after
        redis-server has finished its SHUTDOWN SAVE (exit 0, 'DB saved' in its output);
        a new server on the same directory has every key, written after the last
        scheduled snapshot included; then a SIGKILL of redis-server alone loses no write
        acknowledged more than a second before it (the append-only file)."""
        data = Path(self.mktemp()).absolute()
        data.mkdir(parents=True)
        proc, port, password, out = self.start(data)
        for i in range(200):
            self.cli(port, password, "SET", f"k{i}", f"v{i}")
        os.killpg(proc.pid, signal.SIGTERM)
        self.assertEqual(proc.wait(15), 0, out.read_text())
        self.assertIn("DB saved on disk", out.read_text())
        self.assertTrue((data / REDIS_DIR / "appendonlydir").is_dir())

        proc, port, password, out = self.start(data, password=password)
        self.assertEqual(self.cli(port, password, "DBSIZE"), "200")
        self.assertEqual(self.cli(port, password, "GET", "k199"), "v199")
        self.cli(port, password, "SET", "late", "x")
        time.sleep(1.5)  # appendfsync everysec: acknowledged more than 1 s before the kill
        [pid] = subprocess.run(["pgrep", "-f", f"redis-server.*:{port}"], capture_output=True,
                               text=True).stdout.split()
        os.kill(int(pid), signal.SIGKILL)
        proc.wait(10)
        proc, port, password, out = self.start(data, password=password)
        self.assertEqual((self.cli(port, password, "DBSIZE"),
                          self.cli(port, password, "GET", "late")), ("201", "x"))

    def test_snapshot_of_a_server_from_before_aof_is_kept(self) -> None:
        """A data dir of a Redis that ran without the append-only file (a dump.rdb, no
        appendonlydir/): the wrapper makes the snapshot the AOF's base, so the server
        starts with its keys instead of an empty AOF, and says so."""
        data = Path(self.mktemp()).absolute()
        rdir = data / REDIS_DIR
        rdir.mkdir(parents=True)
        port = free_port()
        old = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                                "--dir", str(rdir), "--save", "", "--appendonly", "no"],
                               stdout=subprocess.DEVNULL)
        self.addCleanup(lambda: (old.kill(), old.wait()))
        for _ in range(100):
            if self.cli(port, "", "PING") == "PONG":
                break
            time.sleep(0.05)
        for i in range(30):
            self.cli(port, "", "SET", f"old{i}", "v")
        self.cli(port, "", "SAVE")
        old.kill()
        old.wait()
        _, port, password, out = self.start(data)
        self.assertEqual(self.cli(port, password, "DBSIZE"), "30")
        self.assertIn("base of the new append-only file", out.read_text())
