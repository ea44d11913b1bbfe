#!/usr/bin/env python3
"""Where the router's CPU goes: py-spy on the real router under wrk.

    python benchmarks/lb/profile.py [--duration 10] [--native] [--top 40]

Starts the same backend (nginx, one worker) and router (``twistd epio --role=lb
--routes``) as ``benchmarks/lb/run.py``, runs ``wrk -t1 -c50`` against the router
and samples it with ``py-spy record`` for ``--duration`` seconds (py-spy from PyPI:
``pip install py-spy``; root or ptrace permission needed). Prints the functions by
share of samples, self and inclusive, and the CPU per request of the router process
over the same window. With ``--native`` the C frames are kept (the kernel's share
shows up as the syscall wrappers: ``send``, ``recv``, ``epoll_wait``).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402  (benchmarks/lb/run.py: the same backend and router)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--native", action="store_true")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--rate", type=int, default=997, help="py-spy samples per second")
    args = ap.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    procs = run.Procs()
    tmp = Path(tempfile.mkdtemp(prefix="epio-lb-prof-"))
    try:
        backend, _ = run.start_backend(procs, tmp)
        port = run.start_epio(procs, tmp, backend)
        pid = procs.procs[-1].pid
        run.run_wrk(port, 1)  # warm up
        raw = tmp / "stacks.txt"
        wrk = subprocess.Popen(
            [*run.pin(1), "wrk", "-t1", "-c50", f"-d{args.duration + 2:g}s", "-H",
             f"Host: {run.HOST}", f"http://127.0.0.1:{port}/"],
            stdout=subprocess.PIPE, text=True)
        cpu0 = run.group_cpu(pid)
        subprocess.run([spy, "record", "-p", str(pid), "-d", str(int(args.duration)),
                        "-r", str(args.rate), "-f", "raw", "-o", str(raw), "--nonblocking",
                        *(["--native"] if args.native else [])],
                       check=True, capture_output=True)
        cpu1 = run.group_cpu(pid)
        out = wrk.communicate()[0]
        n = float(run.re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
        self_n: collections.Counter[str] = collections.Counter()
        incl: collections.Counter[str] = collections.Counter()
        total = 0
        for line in raw.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            c = int(count)
            total += c
            frames = [f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0].rsplit("/", 1)[-1]
                      + ")" if " (" in f else f for f in stack.split(";")]
            self_n[frames[-1]] += c
            for f in set(frames):
                incl[f] += c
        print(f"router: {n:.0f} req/s under wrk, "
              f"CPU {(cpu1 - cpu0) / args.duration * 100:.0f}% of a core, "
              f"{(cpu1 - cpu0) / (n * args.duration) * 1e6:.1f} us CPU/request "
              f"({total} samples)")
        print(f"\n{'self %':>7} {'incl %':>7}  function")
        for f, c in self_n.most_common(args.top):
            print(f"{c * 100 / total:7.1f} {incl[f] * 100 / total:7.1f}  {f}")
        print(f"\ninclusive top {args.top}:")
        for f, c in incl.most_common(args.top):
            print(f"{c * 100 / total:7.1f}  {f}")
    finally:
        procs.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
