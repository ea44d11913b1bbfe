#!/usr/bin/env python3
"""Idle memory of a ``--role=all`` node: every process of its tree, RSS and PSS.

    python benchmarks/memory/run.py [--settle 5] [--ref CHECKOUT]

Starts ``twistd -n epio --role=all`` with no apps (a config from
``tests.util.isolated_config``: free ports, local PostgreSQL and Redis as the tests
use them), waits until the router listens plus ``--settle`` seconds, then reads
``/proc`` for the node and all its descendants: ``VmRSS`` (``/proc/PID/status``) and
``Pss`` (``/proc/PID/smaps_rollup``: shared pages divided among the processes that
share them, so the PSS column adds up to what the tree really costs). With ``--ref``
the node of another checkout (e.g. a git worktree of the previous commit) is measured
the same way right after, and the ratio printed. Memory figures do not depend on the
machine's load, unlike the router's timings.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(CHECKOUT))

from tests.util import NodeProcess, isolated_config, to_toml  # noqa: E402


def tree(root: int) -> list[int]:
    """``root`` and every descendant (by ``/proc/*/stat`` ppid)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def kib(path: str, field: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def describe(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return "?"
    text = " ".join(a.decode(errors="replace") for a in argv if a)
    for key in ("-m epio.lb.feed", "-m epio.lb.worker", "--role=all"):
        if key in text:
            return {"--role=all": "node (twistd epio --role=all)"}.get(key, "python " + key)
    return text[:70]


def measure(checkout: Path, settle: float) -> tuple[float, float]:
    doc, _ = isolated_config()
    node = NodeProcess(["--role=all"], config=to_toml(doc),
                       env={"PYTHONPATH": str(checkout)})
    try:
        node.wait_for_log("router listening on", timeout=120)
        time.sleep(settle)
        rss_total = pss_total = 0
        print(f"{checkout}:")
        for pid in tree(node.proc.pid):
            rss = kib(f"/proc/{pid}/status", "VmRSS")
            pss = kib(f"/proc/{pid}/smaps_rollup", "Pss")
            rss_total += rss
            pss_total += pss
            print(f"  {pid:>7}  RSS {rss / 1024:6.1f} MiB  PSS {pss / 1024:6.1f} MiB  {describe(pid)}")
        print(f"  total    RSS {rss_total / 1024:6.1f} MiB  PSS {pss_total / 1024:6.1f} MiB")
        return rss_total / 1024, pss_total / 1024
    finally:
        node.stop(timeout=40)
        node.cleanup()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--settle", type=float, default=5.0, help="seconds idle before reading")
    ap.add_argument("--ref", metavar="CHECKOUT", help="also measure this checkout's node")
    args = ap.parse_args()
    rss, pss = measure(CHECKOUT, args.settle)
    if args.ref:
        rrss, rpss = measure(Path(args.ref), args.settle)
        print(f"this/ref: RSS {rss / rrss:.2f} ({rss:.1f} / {rrss:.1f} MiB), "
              f"PSS {pss / rpss:.2f} ({pss:.1f} / {rpss:.1f} MiB)")


if __name__ == "__main__":
    main()
