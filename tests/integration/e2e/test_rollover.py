"""Every process type rolls over on every release, checked from the process table.

A real single-box node (``twistd -n epio --role=all``, tests.integration.run.helpers
.RunNode) and the real CLI.  ``examples/worker`` is deployed once with no other
command: its worker ticks.  Two apps with a ``worker`` process (a real build of a
tiny app without requirements):

* ``hello`` rolls over start-first (the default), scaled to ``worker=2``;
* ``solo`` has ``[process:worker] rollover = stop-first``, ``worker=1``.

Both go through five releases -- deploy, config set, config set, rollback, deploy.
After each rollover completes (``epio ps`` shows only the new release, healthy),
the host's process table (``/proc``: processes whose environment says
``EPIO_APP=<app>`` running ``python tick.py``) holds exactly the scaled number of
workers, and still does a moment later.  A thread samples ``/proc`` every few
milliseconds during the whole test: ``solo`` never had two workers at once.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.run.helpers import CLI, RunNode, skip_reason, wait_until
from tests.util import CHECKOUT

TICK = """\
import os, time
n = 0
while True:
    n += 1
    print(f"tick {n} of release {os.environ['EPIO_RELEASE']}", flush=True)
    time.sleep(0.5)
"""

ROLLOUT_TIMEOUT = 60.0


def workers(app: str, script: bytes = b"tick.py") -> list[int]:
    """Pids of ``python SCRIPT`` processes of ``app`` in the host's process table.

    Cheap enough to run every few milliseconds beside the node on two cores: the
    first two arguments are read with one ``read`` (they fit in its 512 bytes when
    they are ``python SCRIPT`` at all), and only those processes' environment."""
    found = []
    want = [b"python", script]
    needle = f"EPIO_APP={app}".encode()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            fd = os.open(f"/proc/{pid}/cmdline", os.O_RDONLY)
            try:
                head = os.read(fd, 512)
            finally:
                os.close(fd)
            if head.split(b"\0", 2)[:2] != want:
                continue
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if needle in env and state != "Z":
            found.append(int(pid))
    return found


class Sampler:
    """Counts one app's worker processes every few milliseconds, in a thread."""

    def __init__(self, app: str) -> None:
        self.app = app
        self.most = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.most = max(self.most, len(workers(self.app)))
            self.samples += 1
            time.sleep(0.005)


class RolloverTests(SynchronousTestCase):
    def setUp(self) -> None:
        if skip_reason():
            self.skipTest(skip_reason() or "")
        self.node = RunNode(api={"reconcile_interval": 0.5, "runner_dead_after": 10.0,
                                 "drain_seconds": 1.0, "stop_grace": 3.0})
        self.addCleanup(self.node.close)
        self.node.start(seed=False)
        self.node.epio("apps", "create", "solo")
        base = self.node.tmp / "apps"
        self.dirs: dict[str, Path] = {}
        for app, ini in (("hello", ""), ("solo", "[process:worker]\nrollover = stop-first\n")):
            d = self.dirs[app] = base / app
            d.mkdir(parents=True)
            (d / "tick.py").write_text(TICK)
            (d / "Procfile").write_text("worker: python tick.py\n")
            (d / "requirements.txt").write_text("")
            if ini:
                (d / "epio.ini").write_text(ini)

    def epio(self, *args: str) -> str:
        return self.node.epio(*args, timeout=180)[1]

    def api(self, path: str) -> Any:
        """GET an API resource (polling through the API is cheaper than a CLI process)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.node.api_port, timeout=10)
        try:
            conn.request("GET", "/api/v1/" + path,
                         headers={"Authorization": f"Bearer {self.node.token}"})
            resp = conn.getresponse()
            body = resp.read()
            self.assertEqual(resp.status, 200, body[:300])
            return json.loads(body)
        finally:
            conn.close()

    def newest(self, app: str) -> int:
        return int(self.api(f"apps/{app}/releases")[0]["version"])

    def rolled_over(self, app: str, quantity: int) -> None:
        """Wait until ps shows only the newest release, ``quantity`` healthy workers; then
        the process table must hold exactly that many, now and a moment later."""
        version = self.newest(app)

        def done() -> bool:
            ps = self.api(f"apps/{app}/ps")
            return (len(ps) == quantity and {i["release"] for i in ps} == {version}
                    and {i["state"] for i in ps} == {"healthy"})

        try:
            wait_until(f"{app} v{version} rolled over", done, timeout=ROLLOUT_TIMEOUT,
                       interval=0.2)
        except AssertionError as e:
            raise self.node.fail(str(e)) from None
        for _ in range(3):
            pids = workers(app)
            self.assertEqual(len(pids), quantity,
                             f"{app} v{version}: processes {pids}, ps {self.api(f'apps/{app}/ps')}")
            time.sleep(0.2)

    def test_five_releases(self) -> None:
        """deploy, config set x2, rollback, deploy: after each rollover exactly the scaled
        number of workers run (start-first and stop-first); stop-first never ran two."""
        sampler = Sampler("solo")
        sampler.start()
        self.addCleanup(sampler.stop)
        scaled = {"hello": 2, "solo": 1}
        # the first deploys build side by side; examples/worker too: one `epio deploy`
        # and nothing else must make its worker tick
        self.node.epio("apps", "create", "ticker")
        self.dirs["ticker"] = CHECKOUT / "examples" / "worker"
        first = {app: subprocess.Popen(
            [*CLI, "deploy", str(self.dirs[app]), "--app", app, "--poll", "0.2"],
            env=self.node.env, cwd=self.node.tmp, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True) for app in [*scaled, "ticker"]}
        for app, proc in first.items():
            output = proc.communicate(timeout=180)[0]
            self.assertEqual(proc.returncode, 0, output)
            formation = "web=1, worker=1" if app == "ticker" else "worker=1"
            self.assertIn(f"rolling out {formation} (new process types start with 1:", output)

        def ticks() -> bool:
            lines = self.api("apps/ticker/logs?n=200")["lines"]
            return any(ln["text"] == "tick 2" for ln in lines)

        wait_until("examples/worker ticks", ticks, timeout=ROLLOUT_TIMEOUT, interval=0.5)
        self.assertEqual(len(workers("ticker", b"worker.py")), 1)
        self.epio("scale", "worker=2", "--app", "hello")
        for app, n in scaled.items():
            self.rolled_over(app, n)
        steps: list[tuple[str, ...]] = [("config", "set", "ROUND=1"), ("config", "set", "ROUND=2"),
                                        ("rollback",), ("deploy",)]
        for step in steps:
            # both apps' commands side by side; each waits for its rollout (and exits 0)
            runs = {app: subprocess.Popen(
                [*CLI, *step, *((str(self.dirs[app]),) if step == ("deploy",) else ()),
                 "--app", app, "--poll", "0.2"],
                env=self.node.env, cwd=self.node.tmp, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True) for app in scaled}
            for app, proc in runs.items():
                output = proc.communicate(timeout=180)[0]
                self.assertEqual(proc.returncode, 0, f"{app} {step}: {output}")
            for app, n in scaled.items():
                self.rolled_over(app, n)
        self.assertEqual(self.newest("hello"), 5)
        self.assertEqual(self.newest("solo"), 5)
        sampler.stop()
        self.assertGreater(sampler.samples, 100)
        self.assertEqual(sampler.most, 1, "the stop-first worker ran twice at once")
        logs = self.epio("logs", "--app", "solo", "-n", "300")
        self.assertIn("before starting its replacement", logs)
