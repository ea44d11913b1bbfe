"""Stats in a real PostgreSQL (a fresh database, dropped afterwards)."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from epio.logs.stats import Point, StatsService, StoreStats
from epio.logs.store import run_inline
from epio.store import Store, open_store
from tests.store.pg import fresh_database_for_test


class PostgresStatsTests(TestCase):
    timeout = 60

    async def test_write_aggregate_read_back(self) -> None:
        """Router and process samples aggregate into 10 s / 1 min points that are
        written through the store's connections and read back; two writers of the
        same point keep the larger value; retention deletes per resolution."""
        url = fresh_database_for_test(self)
        clock = Clock()
        clock.advance(1_800_000_000)
        store = await open_store(url, reactor)
        self.addCleanup(store.close)

        async def get_store() -> Store:
            return store

        db = StoreStats(get_store, None, run_inline)
        svc = StatsService(db, clock, flush_delay=1.0, retention={10: 600.0, 60: 7200.0})
        await svc.open()
        await svc.open()  # idempotent: a second logger opening the stats is fine
        t = clock.seconds()
        for i in range(6):
            svc.sample("shop", "router", {"requests": 10, "status_2xx": 9, "status_5xx": 1,
                                          "latency_le_5ms": 9, "latency_le_250ms": 1,
                                          "latency_ms_mean": 12.0}, t + i * 10)
        svc.sample("shop", "process", {"instance": "web.1", "cpu": 12.5, "rss": 50_000_000,
                                       "restarts": 2}, t + 5)
        clock.advance(200)
        await svc.tick()
        self.assertEqual(svc.pending, [])
        res, series = await svc.query("shop", None, t - 60, t + 120, 10)
        self.assertEqual(res, 10)
        self.assertEqual([v for _, v in series["requests"]], [10.0] * 6)
        self.assertEqual(series["latency_p99_ms"][0][1], 250.0)
        self.assertEqual(series["rss:web.1"], [[int(t), 50_000_000.0]])
        _, minute = await svc.query("shop", "requests", t - 60, t + 120, 60)
        self.assertEqual(sum(v for _, v in minute["requests"]), 60.0)

        await db.write([Point("shop", "requests", "", 10, int(t), 11.0)])
        await db.write([Point("shop", "requests", "", 10, int(t), 3.0)])
        _, series = await svc.query("shop", "requests", t - 1, t + 1, 10)
        self.assertEqual(series["requests"], [[int(t), 11.0]])

        clock.advance(1000)
        await svc.expire()
        _, series = await svc.query("shop", None, 0, t + 10_000, 10)
        self.assertEqual(series, {})
        _, series = await svc.query("shop", None, 0, t + 10_000, 60)
        self.assertIn("requests", series)
