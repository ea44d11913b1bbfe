"""Sleeping apps: an idle web process is stopped, the next request wakes it.

A real single-box node (``--role=all``: runner, nexus, router, api), real builds and a
real HTTP client through the router:

* ``sleepy`` is ``examples/wsgi`` (gunicorn) with ``[http] idle_sleep = 2s`` and a
  ``worker`` process type.  Left without a request it goes to sleep: ``epio ps`` says
  ``asleep``, its gunicorn is gone from ``/proc``, its worker still runs, ``/metrics``
  counts it asleep.  Then 20 concurrent first requests, spread by the kernel over two
  router processes (``lb.workers = 2``) that each hold them and each may ask for a wake,
  all get 200 from one start of web (one ``waking up``), and the figures of that wake are
  printed (first byte of the first request).
* A config change to the asleep ``sleepy`` makes v2, which boots, passes its health
  check and sleeps at once; the next request wakes v2.
* ``awake`` says ``idle_sleep = off``: it never sleeps, whatever the node's default.
* ``broken`` (no epio.ini: it sleeps after the node's ``runner.idle_sleep``) serves
  once, then refuses to boot (its ``/data`` remembers the first boot).  Asleep, a request gets 503 with ``Retry-After`` within ``lb.wake_timeout``.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.e2e.test_rollover import workers
from tests.integration.run.helpers import CLI, RunNode, skip_reason, wait_until
from tests.util import CHECKOUT, free_port

WAKE_TIMEOUT = 4.0
TICK = """\
import time
while True:
    print("tick", flush=True)
    time.sleep(0.5)
"""
# boots once: the second start (a wake) exits at once, like an app broken by a bad deploy
ONCE = """\
import http.server, os, sys
mark = os.path.join(os.environ["EPIO_DATA_DIR"], "booted")
if os.path.exists(mark):
    print("refusing to boot twice", flush=True)
    sys.exit(3)
open(mark, "w").close()


class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")


http.server.HTTPServer(("", int(os.environ["PORT"])), H).serve_forever()
"""


def get(port: int, host: str, timeout: float = 30.0) -> tuple[int, dict[str, str], bytes,
                                                               float]:
    """GET / through the router: status, headers, body and seconds to the first byte."""
    t0 = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/", headers={"Host": host})
        resp = conn.getresponse()
        first = time.monotonic() - t0
        return resp.status, dict(resp.getheaders()), resp.read(), first
    finally:
        conn.close()


class SleepTests(SynchronousTestCase):
    def setUp(self) -> None:
        if skip_reason():
            self.skipTest(skip_reason() or "")
        self.node = RunNode(app="sleepy",
                            api={"reconcile_interval": 0.5, "runner_dead_after": 10.0,
                                 "stop_grace": 3.0},
                            # the operator's default: broken's epio.ini says nothing
                            runner={"grace": 3.0, "idle_sleep": 2.0},
                            # two router processes: both hold requests, both may ask
                            lb={"wake_timeout": WAKE_TIMEOUT, "pool_idle_timeout": 1.0,
                                "workers": 2},
                            metrics={"listen": f"tcp:{free_port()}:interface=127.0.0.1"})
        self.addCleanup(self.node.close)
        self.node.start(seed=False)
        self.lb_port = int(str(self.node.doc["lb"]["listen"]).split(":")[1])
        self.node.epio("apps", "create", "broken")
        base = self.node.tmp / "apps"
        sleepy = base / "sleepy"
        shutil.copytree(CHECKOUT / "examples" / "wsgi", sleepy)
        (sleepy / "tick.py").write_text(TICK)
        with (sleepy / "epio.ini").open("a") as f:
            f.write("\n[http]\nidle_sleep = 2s\n\n[process]\nworker = python tick.py\n")
        broken = base / "broken"
        broken.mkdir(parents=True)
        (broken / "once.py").write_text(ONCE)
        (broken / "Procfile").write_text("web: python once.py\n")
        (broken / "requirements.txt").write_text("")
        awake = base / "awake"
        shutil.copytree(broken, awake)
        (awake / "once.py").write_text(ONCE.replace('if os.path.exists(mark):',
                                                    'if False:'))
        (awake / "epio.ini").write_text("[http]\nidle_sleep = off\n")
        self.node.epio("apps", "create", "awake")
        self.dirs = {"sleepy": sleepy, "broken": broken, "awake": awake}

    def api(self, path: str) -> Any:
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

    def apps_metric(self) -> dict[str, float]:
        """``epio_apps{state=...}`` of the node's /metrics."""
        port = int(str(self.node.doc["metrics"]["listen"]).split(":")[1])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("GET", "/metrics")
            text = conn.getresponse().read().decode()
        finally:
            conn.close()
        out = {}
        for line in text.splitlines():
            if line.startswith("epio_apps{"):
                labels, value = line.rsplit(" ", 1)
                out[labels.split('"')[1]] = float(value)
        return out

    def web_state(self, app: str) -> str | None:
        states = [p["state"] for p in self.api(f"apps/{app}/ps") if p["name"].startswith("web.")]
        return states[0] if len(states) == 1 else None

    def wait_asleep(self, app: str) -> None:
        try:
            wait_until(f"{app} asleep", lambda: self.web_state(app) == "asleep", timeout=30,
                       interval=0.2)
        except AssertionError as e:
            raise self.node.fail(str(e)) from None

    def test_sleep_and_wake(self) -> None:
        """Idle web sleeps (ps, /proc) while the worker runs; 20 concurrent requests wake
        it once, all 200; a broken app's wake ends in 503 + Retry-After in the bound."""
        deploys = {app: subprocess.Popen(
            [*CLI, "deploy", str(d), "--app", app, "--poll", "0.2"], env=self.node.env,
            cwd=self.node.tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for app, d in self.dirs.items()}
        for app, proc in deploys.items():
            output = proc.communicate(timeout=180)[0]
            self.assertEqual(proc.returncode, 0, f"{app}: {output}")
        self.wait_asleep("sleepy")
        self.assertIn("asleep", self.node.epio("ps", "--app", "sleepy")[1])
        wait_until("gunicorn of sleepy gone", lambda: not _gunicorns("sleepy"), timeout=10,
                   interval=0.1)
        self.assertEqual(len(workers("sleepy", b"tick.py")), 1, "the worker sleeps too")
        wait_until("broken asleep too", lambda: self.web_state("broken") == "asleep",
                   timeout=30, interval=0.2)
        wait_until("/metrics counts two apps asleep, one awake",
                   lambda: self.apps_metric() == {"asleep": 2.0, "awake": 1.0}, timeout=10,
                   interval=0.2)
        wakes_before = self.node.node.output().count("waking up")

        results: list[tuple[int, bytes, float]] = []
        lock = threading.Lock()

        def one() -> None:
            status, _, body, first = get(self.lb_port, "sleepy.localhost")
            with lock:
                results.append((status, body, first))

        threads = [threading.Thread(target=one) for _ in range(20)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        elapsed = time.monotonic() - t0
        self.assertEqual([s for s, _, _ in results], [200] * 20,
                         f"{results}\n{self.node.node.output()[-3000:]}")
        self.assertIn(b"Hello from epio! (sleepy)", results[0][1])
        log = self.node.node.output()
        woken = log.count("waking up") - wakes_before
        self.assertEqual(woken, 1, "20 concurrent first requests made one start")
        asks = log.count("to wake sleepy")  # runner.wake sent, by either router process
        self.assertGreaterEqual(asks, 1)
        firsts = sorted(f for _, _, f in results)
        # the runner's own figure: runner.wake received -> first passing health check
        said = [ln["text"] for ln in self.api("apps/sleepy/logs?n=100&source=platform")["lines"]
                if "awake in" in ln["text"]]
        awake = get(self.lb_port, "sleepy.localhost")[3]
        print(f"\nwake of examples/wsgi (gunicorn): first byte {firsts[0] * 1000:.0f} ms, "
              f"all 20 answered in {elapsed * 1000:.0f} ms (slowest first byte "
              f"{firsts[-1] * 1000:.0f} ms); awake request {awake * 1000:.1f} ms; "
              f"runner.wake sent {asks} time(s) by the two router processes; the runner: "
              f"{said[-1] if said else '(no awake line yet)'}")
        self.assertEqual(len(workers("sleepy", b"tick.py")), 1)

        self.wait_asleep("broken")
        t0 = time.monotonic()
        status, headers, body, _ = get(self.lb_port, "broken.localhost")
        waited = time.monotonic() - t0
        self.assertEqual(status, 503, f"{headers} {body[:300]!r}\n"
                                      f"{self.node.node.output()[-6000:]}")
        self.assertEqual(headers.get("Retry-After"), "5")
        self.assertLess(waited, WAKE_TIMEOUT + 1.5)
        self.assertGreaterEqual(waited, WAKE_TIMEOUT - 1.0)

        # a config change to the asleep app: v2 boots, passes its health check, and
        # sleeps at once; v1 is gone; the next request wakes v2
        self.wait_asleep("sleepy")
        self.node.epio("config", "set", "ROUND=2", "--app", "sleepy", timeout=120)

        def web() -> list[tuple[int, str]]:
            return [(p["release"], p["state"]) for p in self.api("apps/sleepy/ps")
                    if p["name"].startswith("web.")]

        # "Deployed" once every nexus names v2 asleep; v1 goes at the scheduler's next pass
        wait_until("v1 retired, v2 asleep", lambda: web() == [(2, "asleep")], timeout=10,
                   interval=0.2)
        # asleep is said when the stop begins; gunicorn's graceful exit follows
        wait_until("v2's gunicorn gone", lambda: not _gunicorns("sleepy"), timeout=10,
                   interval=0.1)
        self.assertIn("a new release of an asleep app", self.node.node.output())
        status, headers, body, _ = get(self.lb_port, "sleepy.localhost")
        self.assertEqual(status, 200, f"{headers} {body[:300]!r}\n"
                                      f"{self.node.node.output()[-6000:]}")
        # idle_sleep = off: never asleep, whatever the node's default, and never woken
        self.assertEqual(self.web_state("awake"), "healthy")
        self.assertNotIn("awake: web.1: going to sleep", log)


def _gunicorns(app: str) -> list[int]:
    """Pids of gunicorn processes (master or worker) of ``app`` in /proc."""
    found = []
    needle = f"EPIO_APP={app}".encode()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"gunicorn" not in cmd:
                continue
            if needle in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                found.append(int(pid))
        except OSError:
            continue
    return found
