"""Upload -> image time for the Flask example, cold and warm wheel cache.

    python benchmarks/build/run.py [--app examples/flask] [--runs 3]

Cold: a fresh node data dir with an empty wheel cache (downloads from the index).
Warm: the same node again with unchanged requirements (offline from the cache).
Each figure covers tarball creation (what `epio deploy` uploads) through the
finished image in the store.  Goal: warm <= 3 s.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from twisted.internet import defer, task

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))

from epio.appdir import make_tarball  # noqa: E402
from epio.config import validate  # noqa: E402
from epio.runner.build import Builder  # noqa: E402


class NullSink:
    def emit(self, app: str, source: str, text: str, timestamp: float | None = None) -> None:
        pass


async def main(reactor: object, app_dir: Path, runs: int, fmt: str) -> None:
    data = Path(tempfile.mkdtemp(prefix="epio-bench-build-"))
    data.chmod(0o711)
    try:
        builder = Builder(reactor, data, validate({"build": {"image_format": fmt}}), NullSink())

        async def one() -> tuple[float, str]:
            t0 = time.perf_counter()
            tb = make_tarball(app_dir)
            try:
                r = await builder.build("bench", tb, {})
            finally:
                tb.unlink()
            return time.perf_counter() - t0, r.digest

        cold, digest = await one()
        warm = []
        for _ in range(runs):
            t, d = await one()
            assert d == digest, "warm rebuild gave a different image"
            warm.append(t)
        fmt_used = builder.image_format()
        print(f"app {app_dir.name}  image format {fmt_used}  digest {digest[:12]}")
        print(f"cold (empty wheel cache): {cold:.2f} s")
        print(
            f"warm (unchanged requirements, offline), {runs} runs: "
            f"median {statistics.median(warm):.2f} s, min {min(warm):.2f} s, max {max(warm):.2f} s"
        )
        print("goal warm <= 3 s:", "met" if statistics.median(warm) <= 3 else "NOT met")
    finally:
        for p in data.rglob("*"):
            if p.is_dir() and not p.is_symlink():
                p.chmod(0o755)
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--app", default=str(ROOT / "examples" / "flask"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--format", default="auto", choices=["auto", "squashfs", "dir"])
    a = ap.parse_args()
    task.react(lambda r: defer.Deferred.fromCoroutine(main(r, Path(a.app), a.runs, a.format)))
