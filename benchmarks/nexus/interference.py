"""What load on one CPU does to a router's p99 on the other, with no route work at all.

Runs by hand from the checkout (see docs/nexus.md)::

    /work/venv/bin/python benchmarks/nexus/interference.py [--rounds 3] [--seconds 8]
        [--rate 500] [--duty 0.4] [--period 0.01] [--working-set N]

A router (``twistd epio --role=lb`` with one route from a routes file), an HTTP
backend and this client are pinned to the last CPU; a busy loop (``--duty`` of
the time busy, the rest asleep) is pinned to the first.  Each round measures the
router's latency at ``--rate`` requests/s with the first CPU idle, then busy.
If the p99 rises although nothing on the router's CPU changed (a virtual
machine whose CPUs share a physical core or a host), that is a part of a
router's p99 change under route churn (benchmarks/nexus/run.py --pin) that is
the machine's, not the router's.  On the development VM it did not rise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(CHECKOUT))
sys.path.insert(0, str(HERE))

from run import Bench, percentile, pin  # noqa: E402

from tests.util import NodeProcess, epio_env, free_port, wait_for_port  # noqa: E402

BURN = """import time
data = [{{"instance": i, "app": "app-%04d" % (i % 1000), "port": i}} for i in range({items})]
while True:
    t = time.perf_counter()
    i = 0
    while time.perf_counter() - t < {busy}:
        if data:  # walk a working set the size of a nexus's (caches shared between CPUs)
            d = data[i % len(data)]
            d["port"] = d["port"] + 1
            i += 4099
    time.sleep({idle})
"""


class Client:
    """What Bench.fixed_rate needs of its bench: nothing to keep alive."""

    def keepalive(self) -> None:
        pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=8.0, help="seconds of load per measurement")
    p.add_argument("--rate", type=int, default=500)
    p.add_argument("--duty", type=float, default=0.4, help="share of time the busy loop spins")
    p.add_argument("--working-set", type=int, default=0,
                   help="dicts the busy loop walks at random (0: spin only; 300000 is about "
                   "100 MB, a nexus's heap for 10k instances and more)")
    p.add_argument("--period", type=float, default=0.01,
                   help="seconds of one spin + sleep cycle (short: many wake-ups, as the "
                   "nexuses' and runners' processes make)")
    a = p.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("needs at least 2 CPUs")
    tmp = Path(tempfile.mkdtemp(prefix="epio-interference-"))
    procs: list[subprocess.Popen[bytes]] = []
    router = None
    try:
        state = tmp / "backends.json"
        procs.append(subprocess.Popen([sys.executable, str(HERE / "procs.py"), "backend",
                                       str(state), "stable"], env=epio_env()))
        while not state.exists():
            time.sleep(0.05)
        port = json.loads(state.read_text())["stable"]
        (tmp / "routes.toml").write_text(
            f'[apps.stable]\nhostnames = ["stable.localhost"]\nbackends = ["127.0.0.1:{port}"]\n')
        secret = tmp / "secret"
        fd = os.open(secret, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, os.urandom(32).hex().encode())
        os.close(fd)
        lb_port = free_port()
        router = NodeProcess(["--role=lb"], data_dir=tmp / "router", config=(
            f"[cluster]\nsecret_file = {json.dumps(str(secret))}\n[lb]\n"
            f"listen = \"tcp:{lb_port}:interface=127.0.0.1\"\naccess_log = \"off\"\n"
            f"routes_file = {json.dumps(str(tmp / 'routes.toml'))}\n"))
        wait_for_port("127.0.0.1", lb_port, timeout=60)
        for pid in (router.proc.pid, procs[0].pid, os.getpid()):
            pin(pid, {cpus[-1]})
        period = a.period
        burn = BURN.format(busy=a.duty * period, idle=(1 - a.duty) * period,
                           items=a.working_set)
        client = Client()
        rows = []
        for rnd in range(a.rounds):
            (idle,), _ = Bench.fixed_rate(client, [lb_port], a.rate, a.seconds)  # type: ignore[arg-type]
            burner = subprocess.Popen([sys.executable, "-c", burn])
            try:
                pin(burner.pid, {cpus[0]})
                time.sleep(0.5)
                (busy,), _ = Bench.fixed_rate(client, [lb_port], a.rate, a.seconds)  # type: ignore[arg-type]
            finally:
                burner.kill()
                burner.wait()
            row = {"idle_p99_ms": round(percentile(idle, 99) * 1000, 3),
                   "busy_p99_ms": round(percentile(busy, 99) * 1000, 3)}
            rows.append(row)
            print(f"round {rnd + 1}: router p99 on CPU {cpus[-1]} with CPU {cpus[0]} idle "
                  f"{row['idle_p99_ms']} ms, {round(a.duty * 100)}% busy "
                  f"{row['busy_p99_ms']} ms ({row['busy_p99_ms'] - row['idle_p99_ms']:+.3f})",
                  flush=True)
        print(json.dumps(rows))
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        if router is not None:
            router.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
