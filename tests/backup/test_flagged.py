"""Backups that keep what matters (issue 17), on a fake clock: suspicious backups are
flagged and never displace the last good one; a database that does not accept
connections yet is waited for with a backoff instead of being recorded as failed."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from epio.backup import checks
from epio.backup.catalog import BackupRecord, Catalog
from epio.backup.postgres import BackupFailed, NotReady
from epio.backup.service import BackupManager
from epio.backup.targets import Target
from epio.retention import RetentionPolicy

T0 = datetime(2026, 6, 1, tzinfo=UTC).timestamp()
TARGET = Target("shop", "redis", "dedicated", "127.0.0.1", 6379, password="pw")


class InlineThreadPool:
    """Runs 'thread' work at once (the checksums): the test stays on the fake clock."""

    def callInThreadWithCallback(self, on_result: Any, f: Any, *a: Any, **kw: Any) -> None:
        try:
            result = f(*a, **kw)
        except Exception as e:
            on_result(False, e)
        else:
            on_result(True, result)


class FakeReactor(Clock):
    def getThreadPool(self) -> InlineThreadPool:
        return InlineThreadPool()

    def callFromThread(self, f: Any, *a: Any, **kw: Any) -> None:
        f(*a, **kw)


class FakeRedisTool:
    """The three RedisBackups calls a backup makes; ``keys``/``fail`` set what the next
    backup sees, ``down_until`` when the server starts accepting connections."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.keys = 1000
        self.fail = ""
        self.down_until = 0.0
        self.hang_until = 0.0
        self.refused = False
        self.probes: list[float] = []

    async def key_count(self, host: str, port: int, password: str | None) -> int:
        from twisted.internet.defer import Deferred

        self.probes.append(self.clock.seconds())
        if self.clock.seconds() < self.hang_until:
            await Deferred()  # a server that accepts the connection but never answers
        if self.clock.seconds() < self.down_until:
            raise NotReady("redis does not accept connections yet: LOADING Redis is loading")
        if self.refused:
            raise BackupFailed("cannot query redis: WRONGPASS invalid username-password pair")
        return self.keys

    async def dump(self, host: str, port: int, password: str | None, dest: Path) -> dict[str, int]:
        dest.write_bytes(b"REDIS" + b"x" * (100 * self.keys))
        return {"keys_min": self.keys, "keys_max": self.keys}

    async def verify(self, rdb: Path, counts: dict[str, int]) -> int:
        if self.fail:
            raise BackupFailed(self.fail)
        return counts["keys_max"]


class Harness:
    def __init__(self, test: SynchronousTestCase) -> None:
        self.test = test
        self.clock = FakeReactor()
        self.clock.advance(T0)
        self.tool = FakeRedisTool(self.clock)
        self.catalog = Catalog(Path(test.mktemp()))
        self.manager = BackupManager(self.clock, self.catalog, RetentionPolicy(), None, None,
                                     redis=self.tool)  # type: ignore[arg-type]

    def backup(self) -> BackupRecord:
        record: BackupRecord = self.test.successResultOf(
            ensureDeferred(self.manager.backup(TARGET)))
        self.manager.prune(TARGET.app, TARGET.kind)
        return record


class FlaggedRetentionTests(SynchronousTestCase):
    def test_a_week_ending_in_empty_and_failed_backups(self) -> None:
        """A week of hourly backups of a Redis with data, the last 3 empty, failed, empty
        (the server came back empty): the last good backup is kept, both empty ones are
        verified but flagged (reason given) and kept, the failed one is kept, and the
        history is exactly the policy's set of good backups plus those."""
        h = Harness(self)
        made = []
        for hour in range(7 * 24):
            if hour >= 7 * 24 - 3:
                h.tool.keys = 0
                h.tool.fail = "verification failed: the RDB file is damaged" \
                    if hour == 7 * 24 - 2 else ""
            made.append(h.backup())
            h.clock.advance(3600)
        last_good, empty1, failed, empty2 = made[-4:]
        kept = {r.id: r for r in h.catalog.list("shop", "redis")}
        self.assertIn(last_good.id, kept)
        self.assertEqual(kept[last_good.id].suspicious, "")
        for r in (empty1, empty2):
            self.assertEqual(kept[r.id].status, "verified")
            self.assertEqual(kept[r.id].suspicious,
                             f"empty: the last good backup {last_good.id} held 1000 keys")
        self.assertEqual(kept[failed.id].status, "failed")
        # the good history is untouched by the three: 24 hourly (the newest good ones,
        # back to Jun 6 21:00) plus the newest of Jun 1..5 (7 daily in all); the week
        # and the month are the last good one's
        good = sorted(r.created for r in kept.values() if r.counts_in_history)
        self.assertEqual(len(good), 24 + 5)
        self.assertEqual(good[-1], last_good.created)
        self.assertEqual(len(kept), 24 + 5 + 3)
        self.assertEqual(h.manager.counters["flagged"], 2)

    def test_size_collapse_is_flagged_and_small_changes_are_not(self) -> None:
        """A backup under a tenth of the last good one's size (which was at least
        64 KiB) is flagged; one at a fifth of it is not; nor is any change of a backup
        whose last good one was smaller than 64 KiB."""
        h = Harness(self)
        h.tool.keys = 1000  # ~100 KB
        h.backup()
        h.clock.advance(3600)
        h.tool.keys = 99  # < 10 %
        self.assertTrue(h.backup().suspicious.startswith("size collapse:"))
        h.clock.advance(3600)
        h.tool.keys = 200
        self.assertEqual(h.backup().suspicious, "")  # 20 % of the last good (1000 keys)
        h.clock.advance(3600)
        h.tool.keys = 10  # 2 % of 200 keys' ~20 KB: under the 64 KiB floor
        self.assertEqual(h.backup().suspicious, "")
        self.assertEqual(checks.SIZE_COLLAPSE_MIN_BYTES, 64 * 1024)

    def test_newest_verified_is_never_pruned(self) -> None:
        """Even with a policy keeping nothing, the newest good and the newest verified
        (here flagged) backups stay."""
        h = Harness(self)
        h.manager.policy = RetentionPolicy(0, 0, 0, 0, failed_ttl=0)
        good = h.backup()
        h.clock.advance(3600)
        h.tool.keys = 0
        flagged = h.backup()
        self.assertEqual({r.id for r in h.catalog.list("shop")}, {good.id, flagged.id})


class StartRetryTests(SynchronousTestCase):
    def test_waits_for_the_server_with_backoff(self) -> None:
        """A Redis that accepts connections only after 20 s: probed at 0, 1, 3, 7, 15 and
        31 s, then backed up -- one verified backup, no failed one recorded."""
        h = Harness(self)
        h.tool.down_until = T0 + 20
        d = ensureDeferred(h.manager.backup(TARGET))
        for _ in range(40):
            h.clock.advance(1)
        record = self.successResultOf(d)
        self.assertEqual(record.status, "verified")
        self.assertEqual([p - T0 for p in h.tool.probes[:6]], [0, 1, 3, 7, 15, 31])
        self.assertEqual([r.status for r in h.catalog.list("shop")], ["verified"])

    def test_a_probe_that_hangs_is_timed_out_and_retried(self) -> None:
        """A server that accepts connections but does not answer for 30 s: each probe is
        given up after 10 s and retried after the backoff; then the backup is taken."""
        h = Harness(self)
        h.tool.hang_until = T0 + 30
        d = ensureDeferred(h.manager.backup(TARGET))
        for _ in range(80):
            h.clock.advance(1)
        self.assertEqual(self.successResultOf(d).status, "verified")
        self.assertEqual([p - T0 for p in h.tool.probes[:4]], [0, 11, 23, 37])
        self.assertEqual(checks.START_PROBE_TIMEOUT, 10.0)

    def test_gives_up_once_after_the_start_timeout(self) -> None:
        """A server that never answers: retried (delays capped at 30 s) for 300 s, then
        ONE failed backup saying why."""
        h = Harness(self)
        h.tool.down_until = float("inf")
        d = ensureDeferred(h.manager.backup(TARGET))
        for _ in range(400):
            h.clock.advance(1)
        record = self.successResultOf(d)
        self.assertEqual(record.status, "failed")
        self.assertIn(f"did not accept connections within {checks.START_TIMEOUT:g}s",
                      record.error)
        gaps = [b - a for a, b in zip(h.tool.probes, h.tool.probes[1:], strict=False)]
        self.assertEqual(max(gaps), checks.START_RETRY_MAX)
        self.assertLessEqual(h.tool.probes[-1] - T0, checks.START_TIMEOUT)
        self.assertEqual(len(h.catalog.list("shop")), 1)

    def test_a_permanent_failure_is_not_waited_for(self) -> None:
        """A refused password (or a database that does not exist) will not pass by
        waiting: one probe, and the backup is recorded failed at once, with the reason."""
        h = Harness(self)
        h.tool.refused = True
        record = self.successResultOf(ensureDeferred(h.manager.backup(TARGET)))
        self.assertEqual(record.status, "failed")
        self.assertIn("WRONGPASS", record.error)
        self.assertEqual(len(h.tool.probes), 1)

    def test_cancelled_by_a_stop_leaves_no_record(self) -> None:
        """A backup cancelled by the node's clean stop -- waiting for its server, or
        running -- leaves no record (neither failed nor half-made)."""
        h = Harness(self)
        h.tool.down_until = float("inf")
        d = ensureDeferred(h.manager.backup(TARGET))
        h.clock.advance(5)
        d.cancel()
        self.failureResultOf(d)
        self.assertEqual(h.catalog.list("shop"), [])

        class Hanging(FakeRedisTool):
            async def verify(self, rdb: Path, counts: dict[str, int]) -> int:
                from twisted.internet.defer import Deferred

                return await Deferred()

        h.manager.redis = Hanging(h.clock)  # type: ignore[assignment]
        d = ensureDeferred(h.manager.backup(TARGET))
        self.assertEqual([r.status for r in h.catalog.list("shop")], ["running"])
        d.cancel()
        self.failureResultOf(d)
        self.assertEqual(h.catalog.list("shop"), [])
