"""Nexus benchmark: heartbeat -> route visible in a router, and proxying under route churn.

Runs by hand from the checkout (see docs/nexus.md)::

    /work/venv/bin/python benchmarks/nexus/run.py [--apps 1000] [--instances 10000]
        [--nodes 100] [--nexuses 2] [--samples 200] [--changes 2] [--rate 500]
        [--load-seconds 8] [--rounds 4] [--cpu-seconds 6] [--delta-interval S]
        [--route-feed process|inline|auto] [--fed-nexus] [--feed-interval S]
        [--pin [--nice-fed N] [--feed-cpu route|http]] [--wrk]

What it starts (all real processes on 127.0.0.1): a store with the apps, HTTP
backends, ``--nexuses`` nexus nodes and two routers (``twistd epio
--role=nexus`` / ``--role=lb``), and a churn process simulating ``--nodes``
runners that announce ``--instances`` instances over ``--apps`` apps every
second.  The first router follows the nexuses; the second, the *control*,
takes its one route from a routes file.  The benchmark itself is a runner too
(node ``probe``): it moves the app ``probe`` from one real backend to another
with one heartbeat and polls the fed router (Host ``probe.localhost``) until
the answer comes from the new backend.  That time is heartbeat ->
route-visible-in-router, end to end.

Two phases, alternating in ``--rounds`` short rounds so that other load on the
machine falls on both alike: *steady* (heartbeats flowing, no route changing) and *churn*
(every runner flips ``--changes`` instances per heartbeat between healthy and
starting: ``nodes * changes`` route changes a second).  In each phase it
measures the CPU the nexuses and routers use with no HTTP load, the
propagation latency (p50/p99), and the request latency of both routers on an
unrelated app (``stable.localhost``) at ``--rate`` requests/s each, the two
taking turns request by request (optionally also saturated by wrk).

On a small machine the nexuses and the simulated runners share the CPUs with
the routers, so churn may slow *every* process a little.  The reference for
"the machine's part" is the control router measured while the fed router is
stopped (SIGSTOP, for less than ``nexus.feed_timeout``): same machine, same
churn, no route work near the HTTP path.  The last line is what churn does to
the fed router's p99 beyond what it does to that reference, with a 95%
confidence interval (:func:`churn_effect`).  ``--pin`` puts the route traffic
on one CPU and the HTTP path on another, as if they were separate machines.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

CHECKOUT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(CHECKOUT))

from tests.util import (  # noqa: E402
    NodeProcess,
    child_processes,
    epio_env,
    free_port,
    wait_for_port,
)

HERE = Path(__file__).resolve().parent


class Clockish:
    """What Bus needs of a reactor outside one: the time."""

    @staticmethod
    def seconds() -> float:
        return time.time()


class Probe:
    """A synchronous runner stand-in: PUB heartbeats and DEALER queries with pyzmq."""

    def __init__(self, secret: bytes, hb_endpoints: list[str]) -> None:
        import zmq

        from epio.bus import Bus

        self.zmq = zmq
        self.bus = Bus(Clockish(), secret, "probe")
        self.ctx = zmq.Context()
        self.pub = self.ctx.socket(zmq.PUB)
        for opt, value in self.bus.socket_options(bind=False):
            self.pub.setsockopt(opt, value)
        for ep in hb_endpoints:
            self.pub.connect(ep)
        self.boot = uuid.uuid4().hex
        self.seq = 0
        self.last_beat = 0.0

    def beat(self, probe_port: int, stable_port: int) -> float:
        self.seq += 1
        insts = [
            {"instance_id": "probe-web", "app": "probe", "release": 1, "process_type": "web",
             "host": "127.0.0.1", "port": probe_port, "state": "healthy", "since": 0.0,
             "restarts": 0},
            {"instance_id": "stable-web", "app": "stable", "release": 1, "process_type": "web",
             "host": "127.0.0.1", "port": stable_port, "state": "healthy", "since": 0.0,
             "restarts": 0},
        ]
        frame = self.bus.seal_new("runner.heartbeat", {
            "node_id": "probe", "boot_id": self.boot, "seq": self.seq, "interval": 1.0,
            "load": {}, "control": "tcp://127.0.0.1:1", "advertise_host": "127.0.0.1",
            "instances": insts,
        }, pattern="publish", topic=b"hb")
        t0 = time.perf_counter()
        self.pub.send_multipart([b"hb", frame])
        self.last_beat = time.monotonic()
        return t0

    def ask(self, endpoint: str, type: str, body: dict[str, Any]) -> dict[str, Any]:
        zmq = self.zmq
        sock = self.ctx.socket(zmq.DEALER)
        try:
            for opt, value in self.bus.socket_options(bind=False):
                sock.setsockopt(opt, value)
            sock.connect(endpoint)
            sock.send(self.bus.seal_new(type, body, pattern="request"))
            if not sock.poll(5000):
                raise TimeoutError(f"no reply from {endpoint}")
            env = self.bus.open(sock.recv(), pattern="reply")
            return env.body
        finally:
            sock.close(linger=0)

    def close(self) -> None:
        self.pub.close(linger=0)
        self.ctx.term()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pin(pid: int, cpus: set[int]) -> None:
    """Pin a process and all its threads (ZeroMQ's I/O threads too) to ``cpus``."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), cpus)


def percentile(values: list[float], p: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def _blocks(xs: list[float], block: int) -> list[list[float]]:
    return [xs[i:i + block] for i in range(0, len(xs) - block + 1, block)]


def churn_effect(router_steady: list[float], router_churn: list[float],
                 ref_steady: list[float], ref_churn: list[float],
                 resamples: int = 1000, block: int = 50) -> dict[str, Any]:
    """What route churn does to the fed router's p99, beyond what it does to a reference.

    The reference is the control router measured while the fed router is
    stopped (SIGSTOP): the same machine, the same churn on the other processes,
    but no route work anywhere near the HTTP path.  (The control measured
    *beside* the running fed router is no reference: on a shared CPU it waits
    while the fed router works, so it pays part of the fed router's cost.)

    The effect is the difference of the two p99 changes (steady -> churn).  Its
    95% confidence interval comes from a block bootstrap: blocks of ``block``
    consecutive requests are drawn with replacement from each series, so that
    slow moments (which come in runs, not one request at a time) stay together.
    An interval that holds zero is "not measurable".
    """
    def p99(xs: list[float]) -> float:
        return percentile(xs, 99)

    rng = random.Random(99)
    ms = lambda v: round(v * 1000, 3)  # noqa: E731
    series = [_blocks(xs, block) for xs in (router_steady, router_churn, ref_steady, ref_churn)]
    if any(len(b) < 10 for b in series):
        return {"verdict": f"too few samples (need {10 * block} requests per series)"}
    flat = [[x for b in bs for x in b] for bs in series]

    def did(rs: list[float], rc: list[float], fs: list[float], fc: list[float]) -> float:
        return (p99(rc) - p99(rs)) - (p99(fc) - p99(fs))

    est = did(*flat)
    boot = sorted(
        did(*([x for _ in bs for x in bs[rng.randrange(len(bs))]] for bs in series))
        for _ in range(resamples))
    lo, hi = boot[int(0.025 * resamples)], boot[int(0.975 * resamples) - 1]
    if lo > 0:
        verdict = f"measurable: between {ms(lo)} and {ms(hi)} ms at 95%"
    elif hi < 0:
        verdict = "measurable, negative: the reference's p99 rises more"
    else:
        verdict = f"not measurable (at most {ms(hi)} ms at 95%)"
    return {
        "router_steady_ms": ms(p99(flat[0])), "router_churn_ms": ms(p99(flat[1])),
        "reference_steady_ms": ms(p99(flat[2])), "reference_churn_ms": ms(p99(flat[3])),
        "feed_effect_ms": ms(est), "ci95_ms": [ms(lo), ms(hi)], "verdict": verdict,
    }


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="epio-nexus-bench-"))
        self.procs: list[NodeProcess] = []
        self.scripts: list[subprocess.Popen[bytes]] = []

    def spawn(self, *argv: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.tmp / f"proc-{len(self.scripts)}.log", "wb")
        p = subprocess.Popen([sys.executable, str(HERE / "procs.py"), *argv],
                             env=epio_env(env), stdout=log, stderr=subprocess.STDOUT)
        self.scripts.append(p)
        return p

    def cleanup(self) -> None:
        for p in self.scripts:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
                p.wait()
        for n in self.procs:
            n.cleanup()
        if not self.args.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def run(self) -> dict[str, Any]:
        a = self.args
        secret_path = self.tmp / "secret"
        fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT, 0o600)
        secret = secrets.token_bytes(32)
        os.write(fd, secret.hex().encode())
        os.close(fd)
        store_url = f"sqlite:///{self.tmp / 'store.sqlite3'}"
        t = time.monotonic()
        subprocess.run([sys.executable, str(HERE / "procs.py"), "store", store_url, str(a.apps)],
                       env=epio_env(), check=True)
        print(f"store: {a.apps + 2} apps created in {time.monotonic() - t:.1f}s", flush=True)

        backends_file = self.tmp / "backends.json"
        self.spawn("backend", str(backends_file), "A", "B", "stable")
        while not backends_file.exists():
            time.sleep(0.05)
        ports = json.loads(backends_file.read_text())

        cluster = [{"heartbeat": f"tcp://127.0.0.1:{free_port()}",
                    "router": f"tcp://127.0.0.1:{free_port()}",
                    "publish": f"tcp://127.0.0.1:{free_port()}"} for _ in range(a.nexuses)]
        nexus_toml = ", ".join(
            "{" + ", ".join(f"{k} = {json.dumps(v)}" for k, v in c.items()) + "}" for c in cluster)
        common = (f"[cluster]\nsecret_file = {json.dumps(str(secret_path))}\n"
                  f"nexus = [{nexus_toml}]\n[store]\nurl = {json.dumps(store_url)}\n")
        for i, c in enumerate(cluster):
            if i == 0 and a.fed_nexus:
                continue  # nexus 0 runs in the fed router's own process
            self.procs.append(NodeProcess(
                ["--role=nexus"], data_dir=self.tmp / f"nexus{i}",
                config=common + f"[nexus]\nheartbeat_bind = {json.dumps(c['heartbeat'])}\n"
                f"router_bind = {json.dumps(c['router'])}\n"
                f"publish_bind = {json.dumps(c['publish'])}\n"
                + (f"delta_interval = {a.delta_interval}\n" if a.delta_interval is not None
                   else "")))
        lb_port = free_port()
        fed_nexus = ""
        if a.fed_nexus:  # a --role=all node's router: its reactor runs a nexus too
            c = cluster[0]
            fed_nexus = (f"[nexus]\nheartbeat_bind = {json.dumps(c['heartbeat'])}\n"
                         f"router_bind = {json.dumps(c['router'])}\n"
                         f"publish_bind = {json.dumps(c['publish'])}\n"
                         + (f"delta_interval = {a.delta_interval}\n"
                            if a.delta_interval is not None else ""))
        router = NodeProcess(["--role=lb,nexus" if a.fed_nexus else "--role=lb"],
                             data_dir=self.tmp / "router",
                             config=common + fed_nexus + f"[lb]\nlisten = \"tcp:{lb_port}:interface=127.0.0.1\"\n"
                             f"access_log = \"off\"\nroute_feed = \"{a.route_feed}\"\n"
                             + (f"feed_interval = {a.feed_interval}\n"
                                if a.feed_interval is not None else ""))
        self.procs.append(router)
        # The control router: same build, same machine, same load, but its one route
        # comes from a file.  Measured while the fed router is stopped, what its latency
        # does under churn is the machine's doing, not the route feed's.
        routes_file = self.tmp / "control-routes.toml"
        routes_file.write_text(
            f'[apps.stable]\nhostnames = ["stable.localhost"]\n'
            f'backends = ["127.0.0.1:{ports["stable"]}"]\n')
        control_port = free_port()
        control = NodeProcess(
            ["--role=lb"], data_dir=self.tmp / "control",
            config=f"[cluster]\nsecret_file = {json.dumps(str(secret_path))}\n"
            f"[lb]\nlisten = \"tcp:{control_port}:interface=127.0.0.1\"\n"
            f"access_log = \"off\"\nroutes_file = {json.dumps(str(routes_file))}\n")
        self.procs.append(control)
        hb = [c["heartbeat"] for c in cluster]
        per_node = a.instances // a.nodes
        self.spawn("churn", str(secret_path), str(a.nodes), str(per_node), str(a.apps),
                   str(a.changes), "1.0", *hb, env={"CHURN_START_OFF": "1"})
        churn = self.scripts[-1]
        for nexus_node in self.procs[:-2] + ([router] if a.fed_nexus else []):
            nexus_node.wait_for_log(" ready: ", timeout=60)
        wait_for_port("127.0.0.1", lb_port, timeout=60)
        wait_for_port("127.0.0.1", control_port, timeout=60)
        # the fed router's route feed process (lb.route_feed = "process"): route work
        # of the router node, measured and stopped with it
        feed_pids: list[int] = []
        deadline = time.monotonic() + 30
        feed_process = a.route_feed == "process" or (a.route_feed == "auto" and not a.fed_nexus)
        while feed_process and not feed_pids:
            if time.monotonic() > deadline:
                raise SystemExit("the fed router started no route feed process")
            feed_pids = child_processes(router.proc.pid, "epio.lb.feed")
            time.sleep(0.05)
        fed_pids = [router.proc.pid, *feed_pids]

        if a.pin:
            # two machines on one: the route traffic (nexuses, simulated runners) on
            # the first CPU, the HTTP path (client, routers, backends) on the last
            cpus = sorted(os.sched_getaffinity(0))
            if len(cpus) < 2:
                raise SystemExit("--pin needs at least 2 CPUs")
            http_cpu, route_cpu = {cpus[-1]}, {cpus[0]}
            for nexus_node in self.procs[:-2]:
                pin(nexus_node.proc.pid, route_cpu)
            pin(churn.pid, route_cpu)
            for pid in feed_pids:  # the router node's route work, off its HTTP path
                pin(pid, http_cpu if a.feed_cpu == "http" else route_cpu)
            for pid in (router.proc.pid, control.proc.pid, self.scripts[0].pid, os.getpid()):
                pin(pid, http_cpu)
            if a.nice_fed:
                # the fed router at a lower priority: does the control beside it still
                # pay for the fed router's route work? (on this VM it did)
                for tid in os.listdir(f"/proc/{router.proc.pid}/task"):
                    os.setpriority(os.PRIO_PROCESS, int(tid), a.nice_fed)
            print(f"pinned: nexuses and churn on CPU {route_cpu}, client, routers and "
                  f"backends on CPU {http_cpu}"
                  + (f", the route feed process on CPU "
                     f"{http_cpu if a.feed_cpu == 'http' else route_cpu}" if feed_pids else ""),
                  flush=True)
        probe = Probe(secret, hb)
        self.probe = probe
        self.ports = ports
        self.current = "A"
        conn = http.client.HTTPConnection("127.0.0.1", lb_port, timeout=5)
        self.conn = conn
        deadline = time.monotonic() + 30
        while self.get() != "A":
            if time.monotonic() > deadline:
                raise SystemExit("the router never routed probe.localhost:\n" + router.output()[-3000:])
            probe.beat(ports["A"], ports["stable"])
            time.sleep(0.1)
        # wait until every simulated instance is in the table
        deadline = time.monotonic() + 30
        while True:
            st = probe.ask(cluster[0]["router"], "nexus.status", {})
            if st.get("nodes", 0) >= a.nodes + 1 or time.monotonic() > deadline:
                break
            self.keepalive()
            time.sleep(0.2)
        print(f"table: {st['routes']} routes, {st['backends']} backends, {st['nodes']} nodes "
              f"on nexus[0]", flush=True)

        first = 1 if a.fed_nexus else 0  # nexus 0 in the fed router: its CPU is the router's
        named = {f"nexus{i + first}": n for i, n in enumerate(self.procs[:-2])}
        named["router"] = router
        named["control"] = control
        cpu_pids = {n: p.proc.pid for n, p in named.items()}
        if feed_pids:
            cpu_pids["router_feed"] = feed_pids[0]
        results: dict[str, Any] = {"apps": a.apps, "instances": per_node * a.nodes,
                                   "nodes": a.nodes, "nexuses": a.nexuses}
        # Phases alternate in short rounds so that load from elsewhere on the machine
        # falls on both alike.
        acc: dict[str, dict[str, Any]] = {
            ph: {"lat": [], "fixed": [], "control": [], "alone": [], "errors": 0, "changes": 0, "secs": 0.0,
                 "cpu": {n: 0.0 for n in cpu_pids}, "cpu_secs": 0.0, "wrk": []}
            for ph in ("steady", "churn")}
        churning = False
        for rnd in range(a.rounds):
            for phase in ("steady", "churn"):
                if (phase == "churn") != churning:
                    churn.send_signal(signal.SIGUSR1)
                    churning = not churning
                    self.settle(1.2)
                acc_p = acc[phase]
                before = probe.ask(cluster[0]["router"], "nexus.status", {})
                t = time.monotonic()
                # CPU in a window with no HTTP load: what the route traffic costs
                t_cpu = time.monotonic()
                cpu0 = {n: cpu_seconds(pid) for n, pid in cpu_pids.items()}
                self.settle(a.cpu_seconds / a.rounds)
                for n, pid in cpu_pids.items():
                    acc_p["cpu"][n] += cpu_seconds(pid) - cpu0[n]
                acc_p["cpu_secs"] += time.monotonic() - t_cpu
                acc_p["lat"] += self.propagation(a.samples // a.rounds)
                # the two routers take turns request by request, so that both see
                # the machine as it is at that moment
                (fed, ctl), errors = self.fixed_rate([lb_port, control_port], a.rate,
                                                     a.load_seconds / a.rounds)
                acc_p["fixed"] += fed
                acc_p["control"] += ctl
                acc_p["errors"] += errors
                # the reference: the control alone, the fed router stopped (1 s: with
                # keepalives every 0.5 s that stays under nexus.feed_timeout, so it
                # resumes without a snapshot)
                for pid in fed_pids:
                    os.kill(pid, signal.SIGSTOP)
                try:
                    (alone,), errors = self.fixed_rate([control_port], a.rate,
                                                       min(1.0, a.load_seconds / a.rounds))
                finally:
                    for pid in fed_pids:
                        os.kill(pid, signal.SIGCONT)
                acc_p["alone"] += alone
                acc_p["errors"] += errors
                self.settle(0.3)  # the fed router catches up on what it missed
                if a.wrk and rnd == a.rounds - 1:
                    acc_p["wrk"] = self.wrk(lb_port, a.load_seconds)
                after = probe.ask(cluster[0]["router"], "nexus.status", {})
                acc_p["changes"] += (after["table"].get("changes", 0)
                                     - before["table"].get("changes", 0))
                acc_p["secs"] += time.monotonic() - t
            print(f"round {rnd + 1}/{a.rounds} done", flush=True)
        for phase, acc_p in acc.items():
            lat, fixed = acc_p["lat"], acc_p["fixed"]
            results[phase] = {
                "propagation_ms": {"p50": round(percentile(lat, 50) * 1000, 2),
                                   "p99": round(percentile(lat, 99) * 1000, 2),
                                   "max": round(max(lat) * 1000, 2) if lat else None,
                                   "samples": len(lat),
                                   "lost": a.samples // a.rounds * a.rounds - len(lat)},
                "route_changes_per_s": round(acc_p["changes"] / acc_p["secs"], 1),
                "cpu_percent": {n: round(100 * v / acc_p["cpu_secs"], 1)
                                for n, v in acc_p["cpu"].items()},
                "router_fixed_rate": {"rate": a.rate, "requests": len(fixed),
                                      "errors": acc_p["errors"],
                                      "p50_ms": round(percentile(fixed, 50) * 1000, 3),
                                      "p99_ms": round(percentile(fixed, 99) * 1000, 3),
                                      "p999_ms": round(percentile(fixed, 99.9) * 1000, 3)},
                "alone_control_fixed_rate": {
                    "rate": a.rate, "requests": len(acc_p["alone"]),
                    "p50_ms": round(percentile(acc_p["alone"], 50) * 1000, 3),
                    "p99_ms": round(percentile(acc_p["alone"], 99) * 1000, 3)},
                "control_fixed_rate": {"rate": a.rate, "requests": len(acc_p["control"]),
                                       "p50_ms": round(percentile(acc_p["control"], 50) * 1000, 3),
                                       "p99_ms": round(percentile(acc_p["control"], 99) * 1000, 3),
                                       "p999_ms": round(percentile(acc_p["control"], 99.9) * 1000, 3)},
            }
            if a.wrk:
                results[phase]["router_wrk_saturated"] = acc_p["wrk"]
            print(f"{phase}: {json.dumps(results[phase])}", flush=True)
        results["churn_effect_on_p99"] = effect = churn_effect(
            acc["steady"]["fixed"], acc["churn"]["fixed"],
            acc["steady"]["alone"], acc["churn"]["alone"])
        if "ci95_ms" not in effect:
            print(f"churn effect on p99: {effect['verdict']}", flush=True)
        else:
            beside = [round(percentile(acc[ph]["control"], 99) * 1000, 3)
                      for ph in ("steady", "churn")]
            print(f"fed router p99 {effect['router_steady_ms']} -> {effect['router_churn_ms']} "
                  f"ms under churn; control with the fed router stopped "
                  f"{effect['reference_steady_ms']} -> {effect['reference_churn_ms']} ms "
                  f"(beside it running: {beside[0]} -> {beside[1]} ms); route churn's effect "
                  f"on proxying: {effect['feed_effect_ms']:+} ms (95% CI "
                  f"{effect['ci95_ms'][0]:+} .. {effect['ci95_ms'][1]:+}): {effect['verdict']}",
                  flush=True)
        conn.close()
        probe.close()
        return results

    def get(self) -> str | None:
        try:
            self.conn.request("GET", "/", headers={"Host": "probe.localhost"})
            resp = self.conn.getresponse()
            body = resp.read().decode()
            return body if resp.status == 200 else None
        except (OSError, http.client.HTTPException):
            self.conn.close()
            return None

    def keepalive(self) -> None:
        if time.monotonic() - self.probe.last_beat > 0.4:
            self.probe.beat(self.ports[self.current], self.ports["stable"])

    def propagation(self, samples: int) -> list[float]:
        out = []
        rng = random.Random(7)
        for _ in range(samples):
            target = "B" if self.current == "A" else "A"
            self.current = target
            t0 = self.probe.beat(self.ports[target], self.ports["stable"])
            deadline = t0 + 5.0
            while True:
                if self.get() == target:
                    out.append(time.perf_counter() - t0)
                    break
                if time.perf_counter() > deadline:
                    break
            pause = time.monotonic() + rng.uniform(0.02, 0.1)
            while time.monotonic() < pause:
                self.keepalive()
                time.sleep(0.01)
        return out

    def settle(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.keepalive()
            time.sleep(0.05)

    def fixed_rate(self, ports: list[int], rate: int,
                   seconds: float) -> tuple[list[list[float]], int]:
        """Requests at ``rate`` per port, one keep-alive connection each, taking turns
        in an order that rotates (0 1, 1 0, 0 1, ...: neither goes first more often):
        each port's latencies, paired in time."""
        conns = [http.client.HTTPConnection("127.0.0.1", port, timeout=5) for port in ports]
        lat: list[list[float]] = [[] for _ in ports]
        errors = 0
        gap = 1.0 / (rate * len(ports))
        start = time.perf_counter()
        n = 0
        while True:
            due = start + n * gap
            now = time.perf_counter()
            if now - start > seconds and n % len(ports) == 0:
                break
            if due > now:
                time.sleep(due - now)
            i = (n + n // len(ports)) % len(ports)
            conn = conns[i]
            t0 = time.perf_counter()
            try:
                conn.request("GET", "/", headers={"Host": "stable.localhost"})
                resp = conn.getresponse()
                resp.read()
                if resp.status != 200:
                    errors += 1
            except (OSError, http.client.HTTPException):
                errors += 1
                conn.close()
            lat[i].append(time.perf_counter() - t0)
            n += 1
            if n % 100 == 0:
                self.keepalive()
        for conn in conns:
            conn.close()
        return lat, errors

    def wrk(self, port: int, seconds: int) -> dict[str, Any]:
        if shutil.which("wrk") is None:
            return {"error": "wrk not installed"}
        p = subprocess.Popen(
            ["wrk", "-t1", "-c8", f"-d{seconds}s", "--latency", "-H", "Host: stable.localhost",
             f"http://127.0.0.1:{port}/"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        while p.poll() is None:
            self.keepalive()
            time.sleep(0.05)
        out = p.stdout.read().decode() if p.stdout else ""

        def ms(label: str) -> float | None:
            m = re.search(rf"^\s*{label}\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
            if m is None:
                return None
            return float(m[1]) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m[2]]

        rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
        errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        return {"p50_ms": ms("50%"), "p99_ms": ms("99%"),
                "rps": float(rps[1]) if rps else None,
                "non_2xx": int(errors[1]) if errors else 0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--apps", type=int, default=1000)
    p.add_argument("--instances", type=int, default=10000)
    p.add_argument("--nodes", type=int, default=100)
    p.add_argument("--nexuses", type=int, default=2)
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--changes", type=int, default=2,
                   help="instances flipped per runner heartbeat while churning")
    p.add_argument("--load-seconds", type=int, default=8,
                   help="seconds of fixed-rate router load per phase (split over the rounds)")
    p.add_argument("--rounds", type=int, default=4,
                   help="steady/churn phases alternate this many times")
    p.add_argument("--wrk", action="store_true",
                   help="also saturate the router with wrk in the last round")
    p.add_argument("--rate", type=int, default=500,
                   help="requests/s of the fixed-rate router latency run")
    p.add_argument("--cpu-seconds", type=float, default=6.0,
                   help="seconds per phase (split over the rounds) of CPU measurement with no "
                   "HTTP load")
    p.add_argument("--route-feed", choices=("process", "inline", "auto"), default="process",
                   help="lb.route_feed of the fed router (A/B of the route feed process)")
    p.add_argument("--fed-nexus", action="store_true",
                   help="the fed router runs nexus 0 in its own process (--role=lb,nexus, "
                   "as in a --role=all node), on the HTTP CPU with --pin")
    p.add_argument("--feed-interval", type=float, default=None,
                   help="lb.feed_interval of the fed router (default: the config default)")
    p.add_argument("--feed-cpu", choices=("route", "http"), default="route",
                   help="with --pin, the CPU of the route feed process: with the route "
                   "traffic (default) or with the routers")
    p.add_argument("--pin", action="store_true",
                   help="run the nexuses and the churn on one CPU, the HTTP path on another, "
                   "as if they were different machines")
    p.add_argument("--nice-fed", type=int, default=0,
                   help="with --pin, run the fed router at this nice level (e.g. 15)")
    p.add_argument("--delta-interval", type=float, default=None,
                   help="the nexuses' nexus.delta_interval (default: the configured default)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args()
    bench = Bench(args)
    try:
        results = bench.run()
    finally:
        bench.cleanup()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
