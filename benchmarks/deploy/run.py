#!/usr/bin/env python3
"""`epio deploy` to the first 200 through the router, phase by phase, cold and warm.

    python benchmarks/deploy/run.py [--warm 3] [--ref CHECKOUT]

Starts ``twistd -n epio --role=all`` with the default timings (a config from
``tests.util.isolated_config``: free ports, local PostgreSQL and Redis as the tests
use them), logs the real ``epio`` CLI in with the admin token and creates an app.
Then deploys a copy of ``examples/flask`` once (cold: empty wheel cache) and
``--warm`` more times with an unchanged requirements file; each deploy changes one
word of the page (``#N``) so the router's answer says which release served it.

For each deploy a thread asks the router for the page every 10 ms; the figures are
seconds from starting ``epio deploy`` (wall clock), taken from the server's
timestamps of the deploy's lines in the app's log (``GET /apps/{app}/logs``), the
build's own step lines (source ``build``), the instant the router first answers
200 with the new page, and the CLI's exit:

    upload   epio deploy started -> the API's "Received" (pack + POST)
    build    "Building on" -> "Built image" (split into the build log's steps)
    image    "Built image" -> "Release vN" (add-ons, release phase, release record)
    start    "Release vN" -> the new web instance reported "starting"
    health   "starting" -> "healthy"
    route    "healthy" -> first 200 of the new page through the router
    done     first 200 -> the CLI exits ("is live")
    (deployed: first 200 -> the api's "Deployed vN" line, part of done)

With ``--ref`` the node and CLI of another checkout (e.g. ``git archive`` of the
base commit) run beside this one: both nodes are started, then their deploys
alternate (this, ref, ref, this, this, ref, ...), so load from other work on the
shared machine falls on both alike; each warm median is printed as a ratio against
the reference's. The machine's load average is printed: other work slows every phase.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

CHECKOUT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(CHECKOUT))

from tests.util import NodeProcess, isolated_config, to_toml  # noqa: E402

PHASES = ("upload", "build", "image", "start", "health", "route", "done")
APP = "bench"


def stamp(value: Any) -> float:
    if isinstance(value, int | float):
        return float(value)
    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()


class FirstNew:
    """Asks the router for the page every 10 ms until it answers 200 with ``marker``."""

    def __init__(self, port: int, marker: str) -> None:
        self.port, self.marker = port, marker
        self.at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set() and self.at is None:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/", headers={"Host": f"{APP}.localhost"})
                resp = conn.getresponse()
                body = resp.read().decode("utf-8", "replace")
                conn.close()
                if resp.status == 200 and self.marker in body:
                    self.at = time.time()
                    return
            except (OSError, http.client.HTTPException):
                pass
            time.sleep(0.01)

    def wait(self, timeout: float) -> float | None:
        self._thread.join(timeout)
        self._stop.set()
        return self.at


class Bench:
    def __init__(self, checkout: Path, work: Path, slot: int = 0) -> None:
        self.checkout, self.work = checkout, work
        base = 21000 + (os.getpid() % 50) * 200 + slot * 100
        doc, _ = isolated_config({"runner": {"port_min": base, "port_max": base + 99}})
        self.api_port = int(str(doc["api"]["listen"]).split(":")[1])
        self.lb_port = int(str(doc["lb"]["listen"]).split(":")[1])
        self.node = NodeProcess(["--role=all"], data_dir=work / "data", config=to_toml(doc),
                                env={"PYTHONPATH": str(checkout)})
        self.env = dict(os.environ, PYTHONPATH=str(checkout),
                        EPIO_CONFIG_DIR=str(work / "cli"), HOME=str(work))
        self.app_dir = work / "flask"
        shutil.copytree(CHECKOUT / "examples" / "flask", self.app_dir)
        self.page = (self.app_dir / "app.py").read_text()

    def epio(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-c", "import sys; from epio.cli.main import main; sys.exit(main())",
             *args], input=stdin, capture_output=True, text=True, env=self.env, cwd=self.work,
            timeout=600)
        if proc.returncode != 0:
            raise SystemExit(f"epio {' '.join(args)} exited {proc.returncode}:\n"
                             f"{proc.stdout}\n{proc.stderr}\n--- node log ---\n"
                             f"{self.node.output()[-4000:]}")
        return proc

    def logs(self) -> list[dict[str, Any]]:
        token = (self.work / "data" / "admin-token").read_text().strip()
        conn = http.client.HTTPConnection("127.0.0.1", self.api_port, timeout=10)
        conn.request("GET", f"/api/v1/apps/{APP}/logs?n=1000&source=platform,build",
                     headers={"Authorization": f"Bearer {token}"})
        body = conn.getresponse().read()
        conn.close()
        return list(json.loads(body)["lines"])

    def start(self) -> None:
        self.node.wait_for_log("api ready", timeout=120)
        self.node.wait_for_log("router listening on", timeout=60)
        token = (self.work / "data" / "admin-token").read_text()
        self.epio("login", "--api", f"http://127.0.0.1:{self.api_port}", stdin=token)
        self.epio("apps", "create", APP)

    def deploy(self, n: int) -> dict[str, Any]:
        marker = f"on epio! #{n}"
        (self.app_dir / "app.py").write_text(self.page.replace("on epio!", marker))
        seen = {ln["id"] for ln in self.logs()}
        probe = FirstNew(self.lb_port, marker)
        t0 = time.time()
        self.epio("deploy", str(self.app_dir))
        t_cli = time.time()
        routed = probe.wait(60)
        lines = [ln for ln in self.logs() if ln["id"] not in seen]
        return phases(t0, t_cli, routed, lines)

    def stop(self) -> None:
        self.node.stop(30)
        self.node.cleanup()


def phases(t0: float, t_cli: float, routed: float | None,
           lines: list[dict[str, Any]]) -> dict[str, Any]:
    """The phase durations of one deploy from its log lines (see the module doc)."""
    def first(source: str | None, pattern: str) -> float | None:
        for ln in lines:
            if (source is None or ln["source"] == source) and re.search(pattern, ln["text"]):
                return stamp(ln["timestamp"])
        return None

    marks = {
        "received": first(None, r"^Received "),
        "building": first(None, r"^Building on "),
        "built": first(None, r"^Built image "),
        "release": first(None, r"^Release v\d+ "),
        "starting": first(None, r"^\s*web\.\d+: starting"),
        "healthy": first(None, r"^\s*web\.\d+: healthy"),
        "deployed": first(None, r"^Deployed v\d+"),
    }
    missing = [k for k, v in marks.items() if v is None]
    if missing or routed is None:
        texts = "\n".join(f"{ln['source']:8} {ln['text']}" for ln in lines)
        raise SystemExit(f"deploy log lacks {missing} (router 200: {routed}):\n{texts}")
    m: dict[str, float] = {k: float(v) for k, v in marks.items() if v is not None}
    out: dict[str, Any] = {
        "upload": m["received"] - t0,
        "build": m["built"] - m["building"],
        "image": m["release"] - m["built"],
        "start": m["starting"] - m["release"],
        "health": m["healthy"] - m["starting"],
        "route": routed - m["healthy"],
        "done": t_cli - routed,
        "deployed": m["deployed"] - routed,
        "deployed_line": m["deployed"] - t0,
        "first_200": routed - t0,
        "total": t_cli - t0,
    }
    # the build's own steps: each build-log line's time since the previous one
    steps: list[tuple[str, float]] = []
    prev = m["building"]
    for ln in lines:
        if ln["source"] != "build":
            continue
        t = stamp(ln["timestamp"])
        if not m["building"] <= t <= m["built"]:
            continue
        text = ln["text"].strip()
        if text.startswith("Processing ") and steps and steps[-1][0].startswith("Processing "):
            steps[-1] = ("Processing (wheels from the cache)", steps[-1][1] + t - prev)
        else:
            steps.append((text[:60], t - prev))
        prev = t
    out["build_steps"] = steps
    return out


def run(checkouts: list[Path], warm: int) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """Cold then ``warm`` deploys on a node of each checkout, the nodes side by side and
    their deploys alternating (ABBA: neither always goes first)."""
    benches: list[Bench] = []
    try:
        for slot, checkout in enumerate(checkouts):
            work = Path(tempfile.mkdtemp(prefix="epio-bench-deploy-"))
            work.chmod(0o711)
            benches.append(Bench(checkout, work, slot))
        for b in benches:
            b.start()
        results: list[list[dict[str, Any]]] = [[] for _ in benches]
        for n in range(warm + 1):
            order = list(range(len(benches)))
            for i in order if n % 2 == 0 else reversed(order):
                results[i].append(benches[i].deploy(n))
        return [(r[0], r[1:]) for r in results]
    finally:
        for b in benches:
            b.stop()
            for p in b.work.rglob("*"):
                try:
                    if p.is_dir() and not p.is_symlink():
                        p.chmod(0o755)
                except OSError:
                    pass
            shutil.rmtree(b.work, ignore_errors=True)


def show(label: str, cold: dict[str, Any], warms: list[dict[str, Any]]) -> dict[str, float]:
    cols = ["cold"] + [f"warm{i + 1}" for i in range(len(warms))]
    runs = [cold, *warms]
    print(f"\n== {label}  (seconds; load average {os.getloadavg()[0]:.2f}) ==")
    print(f"{'phase':14}" + "".join(f"{c:>9}" for c in cols) + f"{'warm med':>10}")
    med: dict[str, float] = {}
    for key in (*PHASES, "deployed", "first_200", "total"):
        med[key] = statistics.median(r[key] for r in warms) if warms else float("nan")
        print(f"{key:14}" + "".join(f"{r[key]:9.2f}" for r in runs) + f"{med[key]:10.2f}")
    for i, r in enumerate(runs):
        print(f"  build steps of {cols[i]} (time since the previous line):")
        for text, dt in r["build_steps"]:
            print(f"    {dt:6.2f}  {text}")
    slow = max(PHASES, key=lambda k: med[k])
    print(f"slowest warm phase: {slow} ({med[slow]:.2f} s); warm total / cold total: "
          f"{med['total'] / cold['total']:.2f}")
    print("goal warm <= 5 s (epio deploy -> first 200):",
          "met" if med["first_200"] <= 5 else "NOT met",
          f"(first 200 {med['first_200']:.2f} s, CLI done {med['total']:.2f} s)")
    return med


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warm", type=int, default=3, help="warm deploys after the cold one")
    ap.add_argument("--ref", type=Path, help="another checkout to measure the same way")
    a = ap.parse_args()
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    runs = run([CHECKOUT] + ([a.ref.resolve()] if a.ref is not None else []), a.warm)
    cold, warms = runs[0]
    med = show(f"this checkout {CHECKOUT}", cold, warms)
    if a.ref is not None:
        rcold, rwarms = runs[1]
        rmed = show(f"reference {a.ref}", rcold, rwarms)
        print("\nwarm median, this / reference:")
        for key in (*PHASES, "deployed", "first_200", "total"):
            ratio = med[key] / rmed[key] if rmed[key] > 0 else float("nan")
            print(f"  {key:12} {med[key]:6.2f} / {rmed[key]:6.2f} = {ratio:5.2f}")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
