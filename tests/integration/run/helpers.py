"""A real single-box node for the ``epio run`` tests, and the real CLI against it.

The node is ``twistd -n epio --role=all`` (tests.util.NodeProcess, free ports,
SQLite), the app's image is a directory image made in the node's data dir
(tests.integration.runner.helpers.make_image: no build, so the tests stay fast)
and the release is seeded through the Store API (tests.integration.run.seed).
The CLI runs as a real subprocess -- through a PTY with pexpect, or with pipes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.integration.e2e.test_quickstart import wait_until
from tests.integration.runner.helpers import make_image, skip_reason
from tests.util import NodeProcess, epio_env, isolated_config, to_toml

CLI = [sys.executable, "-c", "import sys; from epio.cli.main import main; sys.exit(main())"]

__all__ = ["RunNode", "skip_reason", "wait_until"]


class RunNode:
    """One node with one app (``hello``) whose release runs on a prepared image."""

    def __init__(self, run: dict[str, object] | None = None, app: str = "hello",
                 **sections: dict[str, object]) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="epio-run-it-"))
        os.chmod(self.tmp, 0o711)
        doc, _ = isolated_config({
            "api": {"reconcile_interval": 0.5, "runner_dead_after": 10.0},
            "run": {"lease": 3.0, "poll_wait": 2.0, **(run or {})},
            **sections,
        })
        self.doc = doc
        self.api_port = int(str(doc["api"]["listen"]).split(":")[1])
        self.node = NodeProcess(["--role=all"], data_dir=self.tmp / "data", config=to_toml(doc))
        self.app = app
        self.env = epio_env({"EPIO_CONFIG_DIR": str(self.tmp / "cli"), "HOME": str(self.tmp),
                             "TERM": "xterm"})

    def start(self, files: dict[str, str] | None = None, seed: bool = True) -> None:
        self.node.wait_for_log("api ready", timeout=60)
        self.node.wait_for_log("sandbox=", timeout=30)
        token = (self.tmp / "data" / "admin-token").read_text()
        self.token = token.strip()
        self.epio("login", "--api", f"http://127.0.0.1:{self.api_port}", stdin=token)
        self.epio("apps", "create", self.app)
        if not seed:
            return
        digest = make_image(self.tmp / "data", files or {"ask.py": ASK})
        self.seed(digest)

    def seed(self, digest: str) -> None:
        url = f"sqlite:///{self.tmp / 'data' / 'store.sqlite3'}"
        subprocess.run([sys.executable, "-m", "tests.integration.run.seed", url, self.app,
                        digest], check=True, env=self.env, timeout=30)

    def epio(self, *args: str, stdin: str | bytes | None = None, check: bool = True,
             timeout: float = 60.0, token: str | None = None) -> tuple[int, str, str]:
        env = dict(self.env)
        if token is not None:
            env["EPIO_TOKEN"] = token
        data = stdin.encode() if isinstance(stdin, str) else stdin
        proc = subprocess.run([*CLI, *args], input=data, capture_output=True, env=env,
                              cwd=self.tmp, timeout=timeout)
        out, err = proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace")
        if check and proc.returncode != 0:
            raise AssertionError(f"epio {' '.join(args)} exited {proc.returncode}:\n{out}\n{err}"
                                 f"\n--- node log (end) ---\n{self.node.output()[-4000:]}")
        return proc.returncode, out, err

    def spawn(self, *args: str, rows: int = 24, cols: int = 80, timeout: float = 20) -> Any:
        """The CLI in a pseudo-terminal (pexpect)."""
        import pexpect

        return pexpect.spawn(CLI[0], [*CLI[1:], *args], env=self.env, cwd=str(self.tmp),
                             dimensions=(rows, cols), timeout=timeout)

    def runs(self, history: bool = False) -> list[dict[str, Any]]:
        args = ["run", "--app", self.app, "--json", "--history" if history else "--list"]
        return json.loads(self.epio(*args)[1])

    def log_lines(self) -> str:
        return self.node.output()

    def close(self) -> None:
        self.node.stop(timeout=20)
        self.node.cleanup()
        unmount_under(self.tmp)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def fail(self, message: str) -> AssertionError:
        return AssertionError(f"{message}\n--- node log (end) ---\n{self.node.output()[-6000:]}")


# a small interactive program for the prompt test
ASK = """\
name = input("name? ")
print("hello, " + name.upper() + "!")
"""


def unmount_under(root: Path) -> None:
    """Unmount image mounts a stopped node left under ``root`` (its unmounts are
    asynchronous and may not finish before it exits), so the dir can be removed."""
    prefix = str(root) + "/"
    for line in Path("/proc/mounts").read_text().splitlines():
        target = line.split()[1]
        if target.startswith(prefix):
            subprocess.run(["umount", "-l", target], capture_output=True, timeout=30)


def rss_kb(pid: int) -> int:
    """Resident memory of one process (kB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def sleep(seconds: float) -> None:
    time.sleep(seconds)
