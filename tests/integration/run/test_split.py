"""`epio run` with the api and the runner in separate processes (``--role=api`` and
``--role=runner``, one PostgreSQL store, one cluster secret): the session crosses a
real bus between processes, each process's memory is measured on its own during a
flood, and killing the api mid-session leaves the command to the runner's lease and
idle timeout, which stops and audits it."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.run.helpers import (
    ASK,
    CLI,
    rss_kb,
    skip_reason,
    unmount_under,
    wait_until,
)
from tests.integration.runner.helpers import make_image
from tests.store.pg import fresh_database_for_test
from tests.util import NodeProcess, epio_env, free_port, to_toml

LEASE, IDLE = 2.0, 3.0


class SplitRolesTests(SynchronousTestCase):
    def setUp(self) -> None:
        if skip_reason():
            self.skipTest(skip_reason() or "")
        self.tmp = Path(tempfile.mkdtemp(prefix="epio-run-split-"))
        os.chmod(self.tmp, 0o711)
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.addCleanup(unmount_under, self.tmp)
        self.url = fresh_database_for_test(self)
        secret_file = self.tmp / "secret"
        fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, secrets.token_bytes(32).hex().encode() + b"\n")
        os.close(fd)
        self.api_port = free_port()
        common: dict[str, Any] = {
            "store": {"url": self.url},
            "cluster": {"secret_file": str(secret_file), "loggers": [], "nexus": []},
            "run": {"lease": LEASE, "poll_wait": 1.0, "detached_idle_timeout": IDLE,
                    "kill_grace": 1.0},
        }
        runner_cfg = {**common, "node": {"id": "runner-1"},
                      "runner": {"control_bind": f"tcp://127.0.0.1:{free_port()}"}}
        api_cfg = {**common, "node": {"id": "api-1"},
                   "api": {"listen": f"tcp:{self.api_port}:interface=127.0.0.1"}}
        self.runner = NodeProcess(["--role=runner"], data_dir=self.tmp / "r" / "data",
                                  config=to_toml(runner_cfg))
        self.addCleanup(self.runner.cleanup)
        self.api = NodeProcess(["--role=api"], data_dir=self.tmp / "a" / "data",
                               config=to_toml(api_cfg))
        self.addCleanup(self.api.cleanup)
        self.env = epio_env({"EPIO_CONFIG_DIR": str(self.tmp / "cli"), "HOME": str(self.tmp),
                             "TERM": "xterm"})
        self.api.wait_for_log("api ready", timeout=60)
        self.runner.wait_for_log("sandbox=", timeout=60)
        token = (self.tmp / "a" / "data" / "admin-token").read_text()
        self.epio("login", "--api", f"http://127.0.0.1:{self.api_port}", stdin=token)
        self.epio("apps", "create", "hello")
        digest = make_image(self.tmp / "r" / "data", {"ask.py": ASK})
        subprocess.run([sys.executable, "-m", "tests.integration.run.seed", self.url, "hello",
                        digest], check=True, env=self.env, timeout=30)

    def epio(self, *args: str, stdin: str | None = None) -> str:
        proc = subprocess.run([*CLI, *args], input=stdin, capture_output=True, text=True,
                              env=self.env, cwd=self.tmp, timeout=60)
        if proc.returncode != 0:
            raise AssertionError(f"epio {args} exited {proc.returncode}: {proc.stderr}\n"
                                 f"--- api ---\n{self.api.output()[-3000:]}\n"
                                 f"--- runner ---\n{self.runner.output()[-3000:]}")
        return proc.stdout

    def audit(self) -> dict[int, dict[str, Any]]:
        out = subprocess.run([sys.executable, "-m", "tests.integration.run.seed", self.url,
                              "hello", "--runs"], check=True, env=self.env, timeout=30,
                             capture_output=True, text=True).stdout
        return {r["number"]: r for r in json.loads(out)}

    def test_flood_and_api_loss(self) -> None:
        """A 200 MiB flood through a slow reader leaves both the api's and the runner's
        memory flat; then the api process dies mid-session: the command keeps running
        until the runner's lease and idle timeout end it, and the end is audited."""
        api_pid, runner_pid = self.api.proc.pid, self.runner.proc.pid
        base = (rss_kb(api_pid), rss_kb(runner_pid))
        proc = subprocess.Popen([*CLI, "run", "--app", "hello", "-q", "--",
                                 "yes | head -c 200M"], stdout=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, env=self.env, bufsize=0)
        self.addCleanup(proc.kill)
        assert proc.stdout is not None
        total, peak = 0, list(base)
        started = time.monotonic()
        while True:
            slow = time.monotonic() - started < 3
            chunk = proc.stdout.read(16384 if slow else 1 << 20)
            if not chunk:
                break
            total += len(chunk)
            if slow:
                time.sleep(0.02)
            peak = [max(peak[0], rss_kb(api_pid)), max(peak[1], rss_kb(runner_pid))]
        self.assertEqual(proc.wait(timeout=30), 0)
        self.assertEqual(total, 200 << 20)
        growth = [(p - b) / 1024 for p, b in zip(peak, base, strict=True)]
        sys.stderr.write(f"[run split] RSS api {base[0]} -> {peak[0]} kB, runner {base[1]} -> "
                         f"{peak[1]} kB\n")
        self.assertLess(growth[0], 40, f"api RSS grew {growth[0]:.1f} MB")
        self.assertLess(growth[1], 40, f"runner RSS grew {growth[1]:.1f} MB")

        import pexpect

        child = pexpect.spawn(CLI[0], [*CLI[1:], "run", "--app", "hello", "--",
                                       "echo up; sleep 600"], env=self.env, timeout=20)
        self.addCleanup(lambda: child.terminate(force=True))
        child.expect(r"as run\.(\d+)")
        number = int(child.match.group(1))
        child.expect("up")
        self.api.kill()
        child.expect("connection lost")
        child.expect(pexpect.EOF)
        child.close()
        self.assertEqual(child.exitstatus, 255)
        killed_at = time.monotonic()
        self.assertEqual(self.audit()[number]["state"], "running")
        rec = wait_until("stopped and audited by the runner", lambda: (
            lambda r: r if r["state"] == "exited" else None)(self.audit()[number]),
            timeout=LEASE + IDLE + 15)
        self.assertGreaterEqual(time.monotonic() - killed_at, LEASE + IDLE - 1)
        self.assertIn("run.detached_idle_timeout", rec["reason"])
        self.assertEqual(rec["node"], "runner-1")
        # SIGTERM ended it (bubblewrap reports a child killed by signal N as 128 + N)
        self.assertTrue(rec["exit_signal"] == "SIGTERM"
                        or rec["exit_status"] == 128 + signal.SIGTERM, rec)
