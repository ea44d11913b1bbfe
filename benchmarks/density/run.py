#!/usr/bin/env python3
"""Many sleeping apps on one ``--role=all`` node: memory, control-plane speed, wakes.

    python benchmarks/density/run.py [--apps 1000] [--app wsgi|flask] [--idle-sleep 2]
                                     [--max-awake 20] [--wakes 50] [--rate 5]

Run by hand (never in the test suite): it deploys ``--apps`` copies of
``examples/wsgi`` (or ``examples/flask``) to one node, each its own app (its own UID,
data dir, route), with ``[http] idle_sleep = --idle-sleep`` seconds, never more than
``--max-awake`` of them awake at once (a new deploy waits while deploys in flight plus
apps deployed less than ``idle_sleep + 3`` s ago would exceed it; the figure printed
is the most ``epio_apps{state="awake"}`` the node's /metrics showed). One more app,
``ref``, has ``idle_sleep = off``: the always-awake reference of every figure.

Printed, each beside its reference measured in the same run:

- deploy time per app (POST of the tarball -> deploy ``succeeded``): the first deploy
  (cold caches) and the median and p99 of the rest;
- memory (``/proc``, ``VmRSS``) of every process of the node's tree — the node
  (api + nexus + runner + logger in one reactor), the router's feed and workers —
  after ``ref`` alone and again with every app asleep; the difference per asleep app
  is what the platform keeps per app (goal: at most 1 MiB, and no process);
- CPU the node spends per second while every app sleeps, beside the same with ``ref``
  alone (per-tick work that grows with the number of apps shows here);
- ``GET /api/v1/apps`` (every app) p50/p99 beside ``GET /api/v1/status``; ``epio ps``
  (the real CLI, a new interpreter each time) beside ``epio ps --app ref``'s own
  interpreter start (``epio --help``);
- wakes: ``--wakes`` different asleep apps requested in a random order, one request
  every ``1/--rate`` s (each on its own connection, not waiting for the previous):
  first byte p50/p99/max and failures (anything but a 200 within
  ``lb.wake_timeout``), beside ``ref`` requested at the same pace at the same time.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

CHECKOUT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(CHECKOUT))

from benchmarks.memory.run import describe, kib, tree  # noqa: E402
from tests.util import NodeProcess, free_port, isolated_config, to_toml  # noqa: E402

WAKE_TIMEOUT = 10.0


def quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def ms(xs: list[float]) -> str:
    return (f"p50 {statistics.median(xs) * 1000:7.1f} ms  p99 {quantile(xs, 0.99) * 1000:7.1f} ms"
            f"  max {max(xs) * 1000:7.1f} ms  (n={len(xs)})")


class Bench:
    def __init__(self, work: Path, args: argparse.Namespace) -> None:
        self.work = work
        self.args = args
        metrics_port = free_port()
        low = random.SystemRandom().randrange(20000, 55000, 500)
        doc, _ = isolated_config({
            "lb": {"pool_idle_timeout": 0.5, "wake_timeout": WAKE_TIMEOUT},
            "api": {"max_apps_per_user": 0, "app_changes_per_window": 0},
            "runner": {"uid_min": low, "uid_max": low + args.apps + 100},
            "metrics": {"listen": f"tcp:{metrics_port}:interface=127.0.0.1"},
        })
        self.api_port = int(str(doc["api"]["listen"]).split(":")[1])
        self.lb_port = int(str(doc["lb"]["listen"]).split(":")[1])
        self.node = NodeProcess(["--role=all"], data_dir=work / "data", config=to_toml(doc),
                                env={"PYTHONPATH": str(CHECKOUT)})
        self.env = dict(os.environ, PYTHONPATH=str(CHECKOUT),
                        EPIO_CONFIG_DIR=str(work / "cli"), HOME=str(work))
        self.metrics_port = metrics_port
        self.max_awake = 0
        self.tarballs: dict[str, bytes] = {}
        for name, sleep in (("sleepy", f"{args.idle_sleep:g}s"), ("ref", "off")):
            d = work / f"{args.app}-{name}"
            shutil.copytree(CHECKOUT / "examples" / args.app, d)
            text = (d / "epio.ini").read_text()
            if "[http]\n" in text:
                text = text.replace("[http]\n", f"[http]\nidle_sleep = {sleep}\n")
            else:
                text += f"\n[http]\nidle_sleep = {sleep}\n"
            (d / "epio.ini").write_text(text)
            from epio.appdir import make_tarball
            tb = make_tarball(d)
            self.tarballs[name] = tb.read_bytes()
            tb.unlink()

    # -- HTTP ----------------------------------------------------------------------------

    def call(self, method: str, path: str, body: bytes | None = None,
             ctype: str = "application/json") -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.api_port, timeout=120)
        headers = {"Authorization": f"Bearer {self.token}"}
        if body is not None:
            headers["Content-Type"] = ctype
        conn.request(method, "/api/v1/" + path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        return resp.status, json.loads(data) if data else None

    def route(self, app: str) -> tuple[int, float]:
        """GET / of ``app`` through the router: status and seconds to the first byte
        (status 0: no answer within the wake bound and a margin)."""
        t0 = time.perf_counter()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.lb_port,
                                              timeout=WAKE_TIMEOUT + 5)
            conn.request("GET", "/", headers={"Host": f"{app}.localhost"})
            resp = conn.getresponse()
            first = time.perf_counter() - t0
            resp.read()
            conn.close()
            return resp.status, first
        except OSError:
            return 0, time.perf_counter() - t0

    def metrics(self) -> dict[str, float]:
        conn = http.client.HTTPConnection("127.0.0.1", self.metrics_port, timeout=10)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
        out = {}
        for line in text.splitlines():
            if line.startswith("epio_apps{"):
                key, value = line.rsplit(" ", 1)
                out[key.split('"')[1]] = float(value)
        return out

    def epio(self, *args: str, stdin: str | None = None) -> float:
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", "import sys; from epio.cli.main import main; sys.exit(main())",
             *args], input=stdin, capture_output=True, text=True, env=self.env, cwd=self.work,
            timeout=600)
        if proc.returncode != 0:
            raise SystemExit(f"epio {' '.join(args)} exited {proc.returncode}:\n"
                             f"{proc.stdout}\n{proc.stderr}")
        return time.perf_counter() - t0

    # -- deploys -------------------------------------------------------------------------

    def deploy(self, app: str, kind: str) -> float:
        t0 = time.perf_counter()
        status, body = self.call("POST", "apps", json.dumps({"name": app}).encode())
        if status != 201:
            raise SystemExit(f"create {app}: {status} {body}")
        status, d = self.call("POST", f"apps/{app}/deploys", self.tarballs[kind],
                              "application/gzip")
        if status not in (200, 201, 202):
            raise SystemExit(f"deploy {app}: {status} {d}")
        while d["status"] not in ("succeeded", "failed", "cancelled", "superseded"):
            time.sleep(0.5)  # 14 deploys in flight: a look each 0.5 s
            _, d = self.call("GET", f"apps/{app}/deploys/{d['id']}")
        if d["status"] != "succeeded":
            raise SystemExit(f"deploy {app}: {d['status']} {d.get('reason')}\n"
                             f"{self.node.output()[-3000:]}")
        return time.perf_counter() - t0

    def deploy_all(self, names: list[str]) -> list[float]:
        """Deploy ``names`` with as many in flight as the awake bound allows."""
        times: list[float] = []
        lock = threading.Lock()
        recent: list[float] = []  # monotonic end of recent deploys (still awake)
        inflight = [0]
        errors: list[BaseException] = []
        window = self.args.idle_sleep + 3.0
        todo = list(names)
        started = time.monotonic()

        def one(app: str) -> None:
            try:
                t = self.deploy(app, "sleepy")
            except BaseException as e:  # noqa: BLE001 (reported by the main thread)
                errors.append(e)
                t = 0.0
            with lock:
                times.append(t)
                inflight[0] -= 1
                recent.append(time.monotonic())
                if len(times) % 50 == 0:
                    rate = len(times) / (time.monotonic() - started)
                    print(f"  {len(times)} deployed, {rate:.2f}/s, awake at most "
                          f"{self.max_awake}", flush=True)

        threads: list[threading.Thread] = []
        last_metrics = 0.0
        while todo and not errors:
            now = time.monotonic()
            with lock:
                recent[:] = [r for r in recent if now - r < window]
                busy = inflight[0] + len(recent) + 1  # + ref
                can = busy < self.args.max_awake and inflight[0] < self.args.parallel
                if can:
                    inflight[0] += 1
            if now - last_metrics > 5.0:  # a scrape of 1,000 apps is 450 kB
                self.max_awake = max(self.max_awake, int(self.metrics().get("awake", 0)))
                last_metrics = now
            if not can:
                time.sleep(0.05)
                continue
            t = threading.Thread(target=one, args=(todo.pop(0),), daemon=True)
            t.start()
            threads.append(t)
        for t in threads:
            t.join()
        if errors:
            raise SystemExit(f"a deploy failed: {errors[0]}")
        return times

    # -- measurements --------------------------------------------------------------------

    def memory(self) -> dict[str, int]:
        """KiB of RSS by kind of process in the node's tree (apps' processes as ``apps``)."""
        out: dict[str, int] = {}
        for pid in tree(self.node.proc.pid):
            what = describe(pid)
            kind = what if what.startswith(("node", "python -m epio")) else "apps"
            out[kind] = out.get(kind, 0) + kib(f"/proc/{pid}/status", "VmRSS")
            out.setdefault(f"#{kind}", 0)
            out[f"#{kind}"] += 1
        return out

    def cpu(self, seconds: float) -> float:
        """CPU seconds per second the node process (not its children) used."""
        def used() -> float:
            with open(f"/proc/{self.node.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        a = used()
        time.sleep(seconds)
        return (used() - a) / seconds

    def timed(self, fn: Callable[[], Any], n: int) -> list[float]:
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        return out

    def wait_asleep(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.metrics().get("awake", 0) > 1:
            if time.monotonic() > deadline:
                raise SystemExit(f"apps still awake after {timeout} s: {self.metrics()}")
            time.sleep(0.5)

    def wakes(self, names: list[str]) -> None:
        picks = random.sample(names, min(self.args.wakes, len(names)))
        results: dict[str, list[tuple[int, float]]] = {"wake": [], "ref": []}
        lock = threading.Lock()

        def ask(kind: str, app: str) -> None:
            r = self.route(app)
            with lock:
                results[kind].append(r)

        threads = []
        period = 1.0 / self.args.rate
        t0 = time.monotonic()
        for i, app in enumerate(picks):
            for kind, name in (("wake", app), ("ref", "ref")):
                t = threading.Thread(target=ask, args=(kind, name), daemon=True)
                t.start()
                threads.append(t)
            time.sleep(max(0.0, t0 + (i + 1) * period - time.monotonic()))
        for t in threads:
            t.join()
        for kind in ("wake", "ref"):
            rs = results[kind]
            ok = [s for st, s in rs if st == 200 and s <= WAKE_TIMEOUT]
            fails = len(rs) - len(ok)
            label = ("wake of an asleep app" if kind == "wake"
                     else "always-awake ref, same pace")
            print(f"{label:32s} {ms([s for _, s in rs])}  failed {fails}")
            if fails:
                print("   statuses:", sorted(st for st, _ in rs if st != 200))

    def show_log(self, app: str) -> None:
        """The app's log (build and platform lines), seconds from its first line."""
        _, body = self.call("GET", f"apps/{app}/logs?n=200")
        lines = body["lines"]
        t0 = None
        for ln in lines:
            t = float(ln["timestamp"])
            t0 = t if t0 is None else t0
            print(f"    {t - t0:7.3f} {ln.get('source', ''):9s} {ln['text'][:110]}")

    def run(self) -> None:
        a = self.args
        self.node.wait_for_log("api ready", timeout=120)
        self.node.wait_for_log("router listening on", timeout=60)
        self.token = (self.work / "data" / "admin-token").read_text().strip()
        self.epio("login", "--api", f"http://127.0.0.1:{self.api_port}", stdin=self.token)

        cold = self.deploy("ref", "ref")
        print(f"deploy of ref (cold caches): {cold:.2f} s")
        for _ in range(20):
            self.route("ref")
        time.sleep(2)
        mem0 = self.memory()
        cpu0 = self.cpu(10)
        names = [f"app{i:04d}" for i in range(a.apps)]
        t0 = time.monotonic()
        times = self.deploy_all(names)
        total = time.monotonic() - t0
        print(f"deployed {a.apps} apps in {total:.0f} s ({a.apps / total:.2f}/s, "
              f"{a.parallel} at most in flight); deploy time per app: {ms(times)}")
        if a.verbose:
            self.show_log(names[-1])
        print(f"awake apps at most (epio_apps{{state=\"awake\"}}, ref included): "
              f"{self.max_awake}")
        self.wait_asleep(120)
        time.sleep(3)
        print(f"metrics: {self.metrics()}")
        mem1 = self.memory()
        cpu1 = self.cpu(10)
        print(f"\nmemory (VmRSS, MiB)     {'ref alone':>10s} {f'+{a.apps} asleep':>14s}"
              f" {'per asleep app (KiB)':>22s}")
        for kind in sorted(k for k in set(mem0) | set(mem1) if not k.startswith("#")):
            before, after = mem0.get(kind, 0), mem1.get(kind, 0)
            print(f"  {kind[:34]:34s} x{mem1.get('#' + kind, 0):<3d} {before / 1024:8.1f} "
                  f"{after / 1024:12.1f} {(after - before) / a.apps:16.1f}")
        plat0 = sum(v for k, v in mem0.items() if not k.startswith("#") and k != "apps")
        plat1 = sum(v for k, v in mem1.items() if not k.startswith("#") and k != "apps")
        tot0 = sum(v for k, v in mem0.items() if not k.startswith("#"))
        tot1 = sum(v for k, v in mem1.items() if not k.startswith("#"))
        print(f"  node tree (platform processes)         {plat0 / 1024:8.1f} "
              f"{plat1 / 1024:12.1f} {(plat1 - plat0) / a.apps:16.1f}")
        print(f"  total (platform + awake apps)          {tot0 / 1024:8.1f} "
              f"{tot1 / 1024:12.1f}")
        nexus_kib, router_kib = route_memory(a.apps)
        print(f"  route tables (tracemalloc, {a.apps} asleep routes): nexus {nexus_kib:.1f} KiB, "
              f"router {router_kib:.1f} KiB per app")
        print(f"\nnode CPU while idle: {cpu0 * 100:.1f}% with ref alone, "
              f"{cpu1 * 100:.1f}% with {a.apps} apps asleep")

        status = self.timed(lambda: self.call("GET", "status"), 50)
        apps = self.timed(lambda: self.call("GET", "apps"), 50)
        print(f"\nGET /api/v1/status (reference)   {ms(status)}")
        print(f"GET /api/v1/apps ({a.apps + 1} apps)   {ms(apps)}")
        helps = [self.epio("--help") for _ in range(5)]
        pss = [self.epio("ps", "--app", random.choice(names)) for _ in range(10)]
        print(f"epio --help (interpreter start)   {ms(helps)}")
        print(f"epio ps --app <an asleep app>     {ms(pss)}")

        self.wait_asleep(60)
        time.sleep(a.idle_sleep + 1)
        print(f"\n{a.wakes} different asleep apps in a random order at {a.rate:g} req/s "
              f"(first byte; failed = not 200 within lb.wake_timeout {WAKE_TIMEOUT:g} s):")
        self.wakes(names)
        load = os.getloadavg()
        print(f"\nload average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


def route_memory(n: int) -> tuple[float, float]:
    """KiB per app of the route tables, measured with tracemalloc in this process: the
    nexus's :class:`~epio.nexus.table.RouteBook` and a router's
    :class:`~epio.routing.RouteTable` (through its :class:`~epio.routefeed.TableSink`,
    routes built as a request would build them) holding ``n`` asleep routes shaped as
    the nexus makes them (a hostname, no backend, release options, the runner to wake)."""
    import tracemalloc

    from epio.nexus.table import RouteBook
    from epio.routefeed import TableSink
    from epio.routing import RouteTable

    def wire(i: int) -> dict[str, Any]:
        return {"app": f"app{i:04d}", "hostnames": [f"app{i:04d}.localhost"], "backends": [],
                "maintenance": False,
                "options": {"idle_sleep": 2.0, "health_check": "/", "timeout": 30.0},
                "asleep": {"since": 1.7e9 + i, "wake": ["tcp://127.0.0.1:7731"]}}

    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    book = RouteBook()
    for i in range(n):
        book.update(f"app{i:04d}", wire(i))
    nexus = tracemalloc.get_traced_memory()[0] - base
    table = RouteTable("localhost")
    sink = TableSink(table)
    sink.replace(wire(i) for i in range(n))
    for i in range(n):
        table.lookup(f"app{i:04d}.localhost")
    router = tracemalloc.get_traced_memory()[0] - base - nexus
    tracemalloc.stop()
    del book, table, sink
    return nexus / n / 1024, router / n / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--apps", type=int, default=1000)
    ap.add_argument("--app", default="wsgi", choices=("wsgi", "flask"))
    ap.add_argument("--idle-sleep", type=float, default=2.0)
    ap.add_argument("--max-awake", type=int, default=20)
    ap.add_argument("--parallel", type=int, default=4, help="deploys in flight at most")
    ap.add_argument("--wakes", type=int, default=50)
    ap.add_argument("--rate", type=float, default=5.0)
    ap.add_argument("--verbose", action="store_true", help="print the last deploy's log")
    ap.add_argument("--keep-log", metavar="FILE", help="copy the node's log there at the end")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="epio-density-"))
    os.chmod(work, 0o711)
    bench = Bench(work, args)
    try:
        bench.run()
    finally:
        if args.keep_log:
            shutil.copy(bench.node.log_path, args.keep_log)
        bench.node.stop(timeout=60)
        bench.node.cleanup()
        subprocess.run(["sh", "-c", f"grep -o ' {work}[^ ]*' /proc/mounts | xargs -r -n1 "
                                    "umount -l"], check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
