#!/usr/bin/env python3
"""One scheduler pass over many idle apps: this checkout's code beside another ref's.

    python benchmarks/density/scheduler_pass.py [--apps 100 1000] [--passes 5] [--base main]

Run by hand from the checkout's root (never in the test suite).  For each ``--apps``
count: a fresh SQLite store with that many apps (one release, ``web`` scaled to 1) on
one in-memory runner (``tests.api.support.FakeRunners``, what tests/api/test_scheduler.py
uses), settled -- every instance placed and healthy, the idle node of docs/apps.md
"Density" -- then ``--passes`` steady passes of this checkout's ``Scheduler`` and as many
of ``--base``'s ``epio/api/scheduler.py`` (read with ``git show``, run against this
checkout's store: it must still have the store methods that file uses), alternately, on
the same store.  Printed per implementation: the median wall time of a pass, the SQL
statements and ``Instance.__eq__`` calls of one pass, and the ratio base / this.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from twisted.internet import defer, reactor, task  # noqa: E402

from epio.api.scheduler import Scheduler  # noqa: E402
from epio.api.settings import ApiSettings  # noqa: E402
from epio.store import Instance, open_store  # noqa: E402
from tests.api.support import DIGEST, FakeRunners  # noqa: E402


def base_scheduler(ref: str, tmp: Path) -> Any:
    """``ref``'s epio/api/scheduler.py as a module of its own."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:epio/api/scheduler.py"],
                            check=True, capture_output=True, text=True).stdout
    path = tmp / "base_scheduler.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("base_scheduler", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Scheduler


async def measure(apps: int, passes: int, base_cls: Any, tmp: Path) -> dict[str, Any]:
    store = await open_store(f"sqlite:///{tmp / f'store-{apps}.sqlite3'}", reactor)
    try:
        runners = FakeRunners()
        runners.add("tcp://r1:7731")
        await store.upsert_node("r1", ["runner"], "tcp://r1:7731", "boot")
        owner = await store.create_user("alice")
        t0 = time.perf_counter()
        for n in range(apps):
            await store.create_app(f"app{n}", owner.id)
            await store.create_release(f"app{n}", DIGEST, processes={"web": "run web"})
            await store.set_formation(f"app{n}", "web", 1)
        settings = ApiSettings(drain_seconds=0.0, reconcile_interval=3600.0, route_settle=0.0)
        impls = {"this": Scheduler(store, runners, reactor, settings),
                 "base": base_cls(store, runners, reactor, settings)}
        for _ in range(3):
            await impls["this"].reconcile()
        healthy = [i for i in await store.list_instances() if i.state == "healthy"]
        assert len(healthy) == apps, f"{len(healthy)} of {apps} healthy"
        setup = time.perf_counter() - t0
        conn = store.backend._conn  # type: ignore[attr-defined]
        real_eq = Instance.__eq__
        out: dict[str, Any] = {"setup": setup}
        for name, sched in impls.items():
            await sched.reconcile()  # its first pass: polls, fills its caches
            statements: list[str] = []
            compared = [0]

            def counting(a: Any, b: Any, compared: list[int] = compared) -> Any:
                compared[0] += 1
                return real_eq(a, b)

            conn.set_trace_callback(statements.append)
            Instance.__eq__ = counting  # type: ignore[method-assign,assignment]
            try:
                await sched.reconcile()
            finally:
                Instance.__eq__ = real_eq  # type: ignore[method-assign]
                conn.set_trace_callback(None)
            out[name] = {"statements": len(statements), "eq": compared[0], "times": []}
        for _ in range(passes):
            for name, sched in impls.items():
                t = time.perf_counter()
                await sched.reconcile()
                out[name]["times"].append(time.perf_counter() - t)
        return out
    finally:
        await store.close()


async def main(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="epio-sched-bench-"))
    try:
        base_cls = base_scheduler(args.base, tmp)
        print(f"scheduler pass, {args.passes} steady passes each, base = {args.base}")
        for apps in args.apps:
            r = await measure(apps, args.passes, base_cls, tmp)
            this, base = (statistics.median(r[k]["times"]) for k in ("this", "base"))
            print(f"{apps:>6} apps (setup {r['setup']:.0f} s): "
                  f"this {this * 1000:8.1f} ms, {r['this']['statements']} statements, "
                  f"{r['this']['eq']} __eq__ | base {base * 1000:8.1f} ms, "
                  f"{r['base']['statements']} statements, {r['base']['eq']} __eq__ | "
                  f"base/this {base / this:5.1f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--apps", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--base", default="main", help="git ref of the code to compare with")
    args = parser.parse_args()
    task.react(lambda _r: defer.ensureDeferred(main(args)))
