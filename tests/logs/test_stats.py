"""Stats aggregation into 10 s / 1 min buckets, and their table in the store."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from epio.logs.stats import Aggregator, Point, StatsService, StoreStats, quantile
from epio.logs.store import run_inline
from epio.store import Store, open_store
from tests.store import pg


def router(requests: int, s2: int, s5: int, fast: int, slow: int, mean: float = 20.0) -> dict:
    return {"requests": requests, "status_2xx": s2, "status_5xx": s5, "latency_le_10ms": fast,
            "latency_le_500ms": slow, "latency_gt_60000ms": 0, "latency_ms_mean": mean,
            "bytes_out": 100 * requests}


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


class StatsInStoreMixin:
    """Stats written to and read from the node's store (both backends)."""

    clock: Clock
    store: Store
    db: StoreStats
    svc: StatsService

    def url(self) -> str:
        raise NotImplementedError

    async def setUp(self) -> None:  # type: ignore[override]
        self.clock = Clock()
        self.clock.advance(100_000)
        self.store = await open_store(self.url(), reactor)
        self.addCleanup(self.store.close)  # type: ignore[attr-defined]
        self.db = StoreStats(self.get_store, None, run_inline)
        self.svc = StatsService(self.db, self.clock, flush_delay=1.0,
                                retention={10: 600.0, 60: 3600.0})
        await self.svc.open()

    async def get_store(self) -> Store:
        return self.store

    async def test_write_query_and_retention(self) -> None:
        """Points are written when due, read back as series, and expire per resolution."""
        t = self.clock.seconds()
        self.svc.sample("a", "router", router(10, 10, 0, 10, 0), t)
        self.svc.sample("a", "process", {"instance": "web.1", "rss": 123}, t)
        self.clock.advance(70)
        await self.svc.tick()
        res, series = await self.svc.query("a", None, t - 100, t + 100, None)
        self.assertEqual(res, 10)  # type: ignore[attr-defined]
        self.assertEqual(series["requests"], [[int(t // 10 * 10), 10.0]])  # type: ignore[attr-defined]
        self.assertEqual(series["rss:web.1"], [[int(t // 10 * 10), 123.0]])  # type: ignore[attr-defined]
        _, minute = await self.svc.query("a", "requests", t - 100, t + 100, 60)
        self.assertEqual(list(minute), ["requests"])  # type: ignore[attr-defined]
        self.clock.advance(700)
        await self.svc.expire()
        _, series = await self.svc.query("a", None, 0, t + 1000, 10)
        self.assertEqual(series, {})  # type: ignore[attr-defined]
        _, series = await self.svc.query("a", None, 0, t + 1000, 60)
        self.assertIn("requests", series)  # type: ignore[attr-defined]

    async def test_upsert_keeps_larger(self) -> None:
        """Two loggers writing the same bucket: the larger count wins, nothing doubles."""
        await self.db.write([Point("a", "requests", "", 10, 100, 5.0)])
        await self.db.write([Point("a", "requests", "", 10, 100, 7.0)])
        await self.db.write([Point("a", "requests", "", 10, 100, 6.0)])
        rows = await self.db.query("a", "requests", 0, 1000, 10)
        self.assertEqual(rows, [("requests", "", 100, 7.0)])  # type: ignore[attr-defined]

    async def test_many_points_in_one_write(self) -> None:
        """A batch larger than one INSERT's rows is written whole."""
        points = [Point("a", "requests", "", 10, ts, 1.0) for ts in range(0, 2500, 10)]
        await self.db.write(points)
        rows = await self.db.query("a", "requests", 0, 10_000, 10)
        self.assertEqual(len(rows), 250)  # type: ignore[attr-defined]

    async def test_metric_prefix(self) -> None:
        """A metric query matches the name and names starting with it, literally."""
        await self.db.write([Point("a", "status_2xx", "", 10, 100, 1.0),
                             Point("a", "status_5xx", "", 10, 100, 2.0),
                             Point("a", "statusX", "", 10, 100, 3.0)])
        rows = await self.db.query("a", "status_", 0, 1000, 10)
        self.assertEqual(sorted(r[0] for r in rows), ["status_2xx", "status_5xx"])  # type: ignore[attr-defined]


class SqliteStatsTests(StatsInStoreMixin, TestCase):
    """Stats in an SQLite store."""

    def url(self) -> str:
        return f"sqlite:///{self.mktemp()}/store.sqlite3"


class PostgresStatsTests(StatsInStoreMixin, TestCase):
    """Stats in a PostgreSQL store."""

    def url(self) -> str:
        return pg.pg_url_for_test(self)


LEGACY_DDL = ("CREATE TABLE epio_stats (app TEXT NOT NULL, metric TEXT NOT NULL, "
              "instance TEXT NOT NULL DEFAULT '', resolution INTEGER NOT NULL, "
              "ts INTEGER NOT NULL, value REAL NOT NULL, "
              "PRIMARY KEY (app, metric, instance, resolution, ts))")


class LegacyStatsTests(TestCase):
    """Stats kept before they moved into the store stay readable."""

    async def test_sqlite_file_imported_once(self) -> None:
        """An SQLite node's DATA_DIR/stats.sqlite3 is copied into the store at the first
        open, renamed *.imported, and not read again; a point the store already has
        keeps the larger value."""
        data = Path(self.mktemp())
        data.mkdir()
        legacy = data / "stats.sqlite3"
        db = sqlite3.connect(legacy)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(LEGACY_DDL)
        db.executemany("INSERT INTO epio_stats VALUES (?, ?, ?, ?, ?, ?)",
                       [("shop", "requests", "", 10, ts, 2.0) for ts in range(0, 70_000, 10)]
                       + [("shop", "rss", "web.1", 60, 60, 9.0)])
        db.commit()
        db.close()
        store = await open_store(f"sqlite:///{data}/store.sqlite3", reactor)
        self.addCleanup(store.close)
        await StoreStats(lambda: succeed(store), None, run_inline).write(
            [Point("shop", "requests", "", 10, 0, 5.0)])

        async def get_store() -> Store:
            return store

        def in_thread(f: Callable[[], Any]) -> Deferred[Any]:
            return deferToThread(f)

        stats = StoreStats(get_store, legacy, in_thread)
        await stats.open()
        rows = await stats.query("shop", "requests", 0, 100_000, 10)
        self.assertEqual(len(rows), 7000)
        self.assertEqual(rows[0], ("requests", "", 0, 5.0))
        self.assertEqual(rows[1], ("requests", "", 10, 2.0))
        self.assertEqual(await stats.query("shop", "rss", 0, 1000, 60),
                         [("rss", "web.1", 60, 9.0)])
        self.assertFalse(legacy.exists())
        self.assertTrue((data / "stats.sqlite3.imported").exists())
        await stats.write([Point("shop", "requests", "", 10, 10, 1.0)])
        await stats.open()  # nothing left to import: the point written since stays
        self.assertEqual((await stats.query("shop", "requests", 10, 11, 10)),
                         [("requests", "", 10, 2.0)])

    async def test_postgres_table_kept(self) -> None:
        """A PostgreSQL database whose logger created epio_stats itself migrates to
        the store's table and keeps its rows."""
        url = pg.pg_url_for_test(self)
        import psycopg2

        conn = psycopg2.connect(url)
        with conn, conn.cursor() as cur:
            cur.execute(LEGACY_DDL.replace("ts INTEGER", "ts BIGINT")
                        .replace("value REAL", "value DOUBLE PRECISION"))
            cur.execute("CREATE INDEX epio_stats_expiry ON epio_stats (resolution, ts)")
            cur.execute("INSERT INTO epio_stats VALUES ('shop', 'requests', '', 10, 100, 4.0)")
        conn.close()
        store = await open_store(url, reactor)
        self.addCleanup(store.close)
        rows = await StoreStats(lambda: succeed(store), None, run_inline).query(
            "shop", None, 0, 1000, 10)
        self.assertEqual(rows, [("requests", "", 100, 4.0)])
