#!/usr/bin/env python3
"""Wake latency of a sleeping app: first byte of the first request after sleep.

    python benchmarks/sleep/wake.py [--wakes 20] [--app wsgi|flask]

Starts ``twistd -n epio --role=all`` (a config from ``tests.util.isolated_config``:
free ports, ``lb.pool_idle_timeout = 0.5`` so the router's pooled connection does not
keep the app awake between rounds), deploys a copy of ``examples/wsgi`` (gunicorn; or
``examples/flask``, whose ``[http]`` section gets the key) with
``[http] idle_sleep = 1s``, then ``--wakes`` times: waits until ``ps`` says ``asleep``
(and one more second), asks the router for ``/`` and times the first byte.  An awake
request right after each wake is timed for reference.

Each wake is split with the server's timestamps of the app's ``platform`` log lines
(same host clock as the client's ``time.time()``):

    hold+spawn  request sent -> "starting release" (router holds it, runner.wake to the
                runner, the launcher prepares the sandbox: image mount, cgroups, dirs)
    boot        "starting release" -> "awake in" (bubblewrap, setpriv, the
                interpreter, gunicorn and the app imported, $PORT bound, and the first
                health probe that passes: every runner.wake_probe_interval, 20 ms)
    route       "awake in" -> first byte (heartbeat now -> nexus -> route feed ->
                router, which looks every 5 ms; connect; the app answers)

Prints each wake, then p50/p90/max of each phase and of the whole.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

CHECKOUT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(CHECKOUT))

from tests.util import NodeProcess, isolated_config, to_toml  # noqa: E402

APP = "sleepy"


def stamp(value: Any) -> float:
    if isinstance(value, int | float):
        return float(value)
    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()


def quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


class Bench:
    def __init__(self, work: Path, example: str, verbose: bool = False) -> None:
        self.work = work
        self.verbose = verbose
        doc, _ = isolated_config({"lb": {"pool_idle_timeout": 0.5},
                                  "api": {"reconcile_interval": 0.5}})
        self.api_port = int(str(doc["api"]["listen"]).split(":")[1])
        self.lb_port = int(str(doc["lb"]["listen"]).split(":")[1])
        self.node = NodeProcess(["--role=all"], data_dir=work / "data", config=to_toml(doc),
                                env={"PYTHONPATH": str(CHECKOUT)})
        self.env = dict(os.environ, PYTHONPATH=str(CHECKOUT),
                        EPIO_CONFIG_DIR=str(work / "cli"), HOME=str(work))
        self.app_dir = work / example
        shutil.copytree(CHECKOUT / "examples" / example, self.app_dir)
        ini = self.app_dir / "epio.ini"
        text = ini.read_text()  # examples/flask has an [http] section already
        ini.write_text(text.replace("[http]\n", "[http]\nidle_sleep = 1s\n") if "[http]\n" in text
                       else text + "\n[http]\nidle_sleep = 1s\n")

    def epio(self, *args: str, stdin: str | None = None) -> str:
        proc = subprocess.run(
            [sys.executable, "-c", "import sys; from epio.cli.main import main; sys.exit(main())",
             *args], input=stdin, capture_output=True, text=True, env=self.env, cwd=self.work,
            timeout=600)
        if proc.returncode != 0:
            raise SystemExit(f"epio {' '.join(args)} exited {proc.returncode}:\n"
                             f"{proc.stdout}\n{proc.stderr}\n--- node log ---\n"
                             f"{self.node.output()[-4000:]}")
        return proc.stdout

    def api(self, path: str) -> Any:
        token = (self.work / "data" / "admin-token").read_text().strip()
        conn = http.client.HTTPConnection("127.0.0.1", self.api_port, timeout=10)
        conn.request("GET", "/api/v1/" + path, headers={"Authorization": f"Bearer {token}"})
        body = conn.getresponse().read()
        conn.close()
        return json.loads(body)

    def get(self) -> tuple[int, float, float]:
        """GET / through the router: status, wall-clock send time, seconds to first byte."""
        conn = http.client.HTTPConnection("127.0.0.1", self.lb_port, timeout=30)
        conn.connect()
        t0 = time.time()
        p0 = time.perf_counter()
        conn.request("GET", "/", headers={"Host": f"{APP}.localhost"})
        resp = conn.getresponse()
        first = time.perf_counter() - p0
        resp.read()
        conn.close()
        return resp.status, t0, first

    def asleep(self) -> bool:
        return [p["state"] for p in self.api(f"apps/{APP}/ps")
                if p["name"].startswith("web.")] == ["asleep"]

    def run(self, wakes: int) -> None:
        self.node.wait_for_log("api ready", timeout=120)
        self.node.wait_for_log("router listening on", timeout=60)
        token = (self.work / "data" / "admin-token").read_text()
        self.epio("login", "--api", f"http://127.0.0.1:{self.api_port}", stdin=token)
        self.epio("apps", "create", APP)
        self.epio("deploy", str(self.app_dir), "--app", APP, "--poll", "0.2")
        rows: list[dict[str, float]] = []
        for n in range(wakes):
            deadline = time.monotonic() + 60
            while not self.asleep():
                if time.monotonic() > deadline:
                    raise SystemExit("the app did not go to sleep within 60 s")
                time.sleep(0.1)
            time.sleep(1.0)  # the sleeping process has exited
            status, sent, first = self.get()
            awake = self.get()[2]
            if status != 200:
                raise SystemExit(f"wake {n}: status {status}")
            time.sleep(0.5)  # the log lines reach the logger
            lines = self.api(f"apps/{APP}/logs?n=50&source=platform")["lines"]
            spawn = max(stamp(ln["timestamp"]) for ln in lines
                        if "starting release" in ln["text"])
            healthy = max(stamp(ln["timestamp"]) for ln in lines if "awake in" in ln["text"])
            row = {"total": first, "hold+spawn": spawn - sent, "boot": healthy - spawn,
                   "route": sent + first - healthy, "awake": awake}
            rows.append(row)
            if self.verbose:
                for ln in lines:
                    if stamp(ln["timestamp"]) > sent - 5:
                        print(f"    {stamp(ln['timestamp']) - sent:+8.3f} {ln['text'][:100]}")
            print(f"wake {n + 1:2d}: first byte {first * 1000:6.0f} ms = hold+spawn "
                  f"{row['hold+spawn'] * 1000:5.0f} + boot {row['boot'] * 1000:5.0f} + route "
                  f"{row['route'] * 1000:5.0f} ms; awake request {awake * 1000:5.1f} ms",
                  flush=True)
        print()
        for key in ("total", "hold+spawn", "boot", "route", "awake"):
            xs = [r[key] * 1000 for r in rows]
            print(f"{key:11s} p50 {statistics.median(xs):6.0f} ms  p90 {quantile(xs, 0.9):6.0f} ms"
                  f"  p99 {quantile(xs, 0.99):6.0f} ms  max {max(xs):6.0f} ms")
        load = os.getloadavg()
        print(f"\nload average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wakes", type=int, default=20)
    ap.add_argument("--app", default="wsgi", choices=("wsgi", "flask"))
    ap.add_argument("--verbose", action="store_true",
                    help="print the app's platform log lines around each wake")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="epio-wake-bench-"))
    os.chmod(work, 0o711)
    bench = Bench(work, args.app, args.verbose)
    try:
        bench.run(args.wakes)
    finally:
        bench.node.stop(timeout=20)
        bench.node.cleanup()
        subprocess.run(["sh", "-c", f"grep -o ' {work}[^ ]*' /proc/mounts | xargs -r -n1 "
                                    "umount -l"], check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
