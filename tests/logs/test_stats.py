"""Stats aggregation into 10 s / 1 min buckets, and the SQLite writer."""

from __future__ import annotations

import tempfile
from pathlib import Path

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from epio.logs.stats import Aggregator, SQLiteStats, StatsService, quantile
from epio.logs.store import run_inline


def router(requests: int, s2: int, s5: int, fast: int, slow: int, mean: float = 20.0) -> dict:
    return {"requests": requests, "status_2xx": s2, "status_5xx": s5, "latency_le_10ms": fast,
            "latency_le_500ms": slow, "latency_gt_60000ms": 0, "latency_ms_mean": mean,
            "bytes_out": 100 * requests}


def run(coro) -> object:
    out: list = []
    d = coro if isinstance(coro, Deferred) else Deferred.fromCoroutine(coro)
    d.addBoth(out.append)
    assert out, "did not finish synchronously"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


class AggregatorTests(SynchronousTestCase):
    def test_buckets_and_flush_delay(self) -> None:
        """Samples add up in their 10 s and 1 min buckets; a bucket is handed out
        only flush_delay seconds after it ends."""
        agg = Aggregator(flush_delay=5)
        agg.add("a", "router", router(10, 9, 1, 8, 2), 1003.0)
        agg.add("a", "router", router(5, 5, 0, 5, 0), 1007.0)
        agg.add("a", "router", router(4, 4, 0, 4, 0), 1012.0)
        self.assertEqual(agg.due(1014.9), [])
        pts = {(p.metric, p.resolution, p.ts): p.value for p in agg.due(1015.0)}
        self.assertEqual(pts[("requests", 10, 1000)], 15)
        self.assertEqual(pts[("status_5xx", 10, 1000)], 1)
        self.assertEqual(pts[("bytes_out", 10, 1000)], 1500)
        self.assertEqual(pts[("latency_p50_ms", 10, 1000)], 10)
        self.assertEqual(pts[("latency_p99_ms", 10, 1000)], 500)
        self.assertAlmostEqual(pts[("latency_mean_ms", 10, 1000)], 20.0)
        self.assertNotIn(("requests", 60, 960), pts)  # the minute is not over
        pts = {(p.metric, p.resolution, p.ts): p.value for p in agg.due(1025.0)}
        self.assertEqual(pts[("requests", 60, 960)], 19)
        self.assertEqual(pts[("requests", 10, 1010)], 4)

    def test_late_sample_counted(self) -> None:
        """A sample for buckets already written is refused and counted as late."""
        late: list[int] = []
        agg = Aggregator(flush_delay=0, on_late=lambda: late.append(1))
        agg.add("a", "router", router(1, 1, 0, 1, 0), 1001.0)
        agg.due(2000.0)
        self.assertFalse(agg.add("a", "router", router(1, 1, 0, 1, 0), 1002.0))
        self.assertEqual(late, [1])

    def test_process_gauges_per_instance(self) -> None:
        """Process samples keep the last value per instance."""
        agg = Aggregator(flush_delay=0)
        agg.add("a", "process", {"instance": "web.1", "cpu": 10.0, "rss": 1000, "restarts": 0}, 1001)
        agg.add("a", "process", {"instance": "web.1", "cpu": 30.0, "rss": 2000, "restarts": 1}, 1005)
        agg.add("a", "process", {"instance": "web.2", "cpu": 5.0, "rss": 500, "restarts": 0}, 1005)
        pts = {(p.metric, p.instance): p.value for p in agg.due(1100) if p.resolution == 10}
        self.assertEqual(pts[("cpu", "web.1")], 30.0)
        self.assertEqual(pts[("rss", "web.2")], 500)
        self.assertEqual(pts[("restarts", "web.1")], 1)

    def test_quantile(self) -> None:
        """Quantiles are the upper bound of the bucket that holds the rank; the
        overflow bucket reports the last finite bound."""
        self.assertEqual(quantile({1.0: 50, 10.0: 49, float("inf"): 1}, 0.5), 1.0)
        self.assertEqual(quantile({1.0: 50, 10.0: 49, float("inf"): 1}, 0.99), 10.0)
        self.assertEqual(quantile({1.0: 1, float("inf"): 99}, 0.99), 1.0)
        self.assertIsNone(quantile({}, 0.5))


class SQLiteStatsTests(SynchronousTestCase):
    def setUp(self) -> None:
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.clock = Clock()
        self.clock.advance(100_000)
        self.db = SQLiteStats(str(Path(tmp.name) / "stats.sqlite3"), run_inline)
        self.svc = StatsService(self.db, self.clock, flush_delay=1.0,
                                retention={10: 600.0, 60: 3600.0})
        run(self.svc.open())
        self.addCleanup(lambda: self.db.close())

    def test_write_query_and_retention(self) -> None:
        """Points are written when due, read back as series, and expire per resolution."""
        t = self.clock.seconds()
        self.svc.sample("a", "router", router(10, 10, 0, 10, 0), t)
        self.svc.sample("a", "process", {"instance": "web.1", "rss": 123}, t)
        self.clock.advance(70)
        run(self.svc.tick())
        res, series = run(self.svc.query("a", None, t - 100, t + 100, None))
        self.assertEqual(res, 10)
        self.assertEqual(series["requests"], [[int(t // 10 * 10), 10.0]])
        self.assertEqual(series["rss:web.1"], [[int(t // 10 * 10), 123.0]])
        _, minute = run(self.svc.query("a", "requests", t - 100, t + 100, 60))
        self.assertEqual(list(minute), ["requests"])
        self.clock.advance(700)
        run(self.svc.expire())
        _, series = run(self.svc.query("a", None, 0, t + 1000, 10))
        self.assertEqual(series, {})
        _, series = run(self.svc.query("a", None, 0, t + 1000, 60))
        self.assertIn("requests", series)

    def test_upsert_keeps_larger(self) -> None:
        """Two loggers writing the same bucket: the larger count wins, nothing doubles."""
        from epio.logs.stats import Point

        run(self.db.write([Point("a", "requests", "", 10, 100, 5.0)]))
        run(self.db.write([Point("a", "requests", "", 10, 100, 7.0)]))
        run(self.db.write([Point("a", "requests", "", 10, 100, 6.0)]))
        rows = run(self.db.query("a", "requests", 0, 1000, 10))
        self.assertEqual(rows, [("requests", "", 100, 7.0)])

    def test_metric_prefix(self) -> None:
        """A metric query matches the name and names starting with it, literally."""
        from epio.logs.stats import Point

        run(self.db.write([Point("a", "status_2xx", "", 10, 100, 1.0),
                           Point("a", "status_5xx", "", 10, 100, 2.0),
                           Point("a", "statusX", "", 10, 100, 3.0)]))
        rows = run(self.db.query("a", "status_", 0, 1000, 10))
        self.assertEqual(sorted(r[0] for r in rows), ["status_2xx", "status_5xx"])
