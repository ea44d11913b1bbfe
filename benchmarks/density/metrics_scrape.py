#!/usr/bin/env python3
"""The logger's share of a ``/metrics`` scrape with many apps, per app or summed.

    python benchmarks/density/metrics_scrape.py [--apps 1000] [--scrapes 10]

Run by hand from the checkout's root (never in the test suite).  The logger's
``LogCounters`` in a fresh ``MetricsRegistry``, filled as on the idle node of
docs/apps.md "Density" (each app: lines of ``web.1`` and ``platform``, ``process`` and
``router`` stats samples, its store size), rendered with ``logger.metrics_per_app`` on
and off: lines, bytes and the median time of a render.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from epio.logs.receiver import LogCounters  # noqa: E402
from epio.metrics import MetricsRegistry  # noqa: E402


def main(apps: int, scrapes: int) -> None:
    for per_app in (True, False):
        reg = MetricsRegistry()
        counters = LogCounters(reg, per_app=per_app)
        for n in range(apps):
            app = f"app{n}"
            for source in ("web.1", "platform"):
                counters.received.labels(app, source).inc(10)
                counters.written.labels(app, source).inc(10)
            for kind in ("process", "router"):
                counters.stats_received.labels(app, kind).inc()
            counters.store_bytes.labels(app).set(4096)
        times = []
        for _ in range(scrapes):
            t = time.perf_counter()
            body = reg.render()
            times.append(time.perf_counter() - t)
        print(f"{apps} apps, metrics_per_app = {str(per_app).lower():5}: "
              f"{len(body.splitlines()):>6} lines, {len(body):>8} bytes, "
              f"{statistics.median(times) * 1000:6.1f} ms a render")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--apps", type=int, default=1000)
    parser.add_argument("--scrapes", type=int, default=10)
    args = parser.parse_args()
    main(args.apps, args.scrapes)
