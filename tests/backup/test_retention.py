"""The backup history policy keeps the newest good backup of each recent period."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from twisted.trial.unittest import SynchronousTestCase

from epio.retention import Candidate, RetentionPolicy, to_keep

T0 = datetime(2026, 6, 1, tzinfo=UTC)


def hourly_backups(hours: int, failed: set[int] = frozenset()) -> list[Candidate]:  # type: ignore[assignment]
    return [
        Candidate(f"b{i}", (T0 + timedelta(hours=i)).timestamp(), i not in failed)
        for i in range(hours)
    ]


class RetentionTests(SynchronousTestCase):
    def test_hourly_daily_weekly_monthly(self) -> None:
        """After 200 days of hourly backups exactly the GFS set survives: 24 hourly,
        7 daily, 4 weekly, 6 monthly (overlapping ones counted once)."""
        backups = hourly_backups(24 * 200)
        now = backups[-1].created
        keep = to_keep(backups, now, RetentionPolicy())
        newest = {b.id for b in backups[-24:]}
        self.assertTrue(newest <= keep)
        older = sorted(
            datetime.fromtimestamp(b.created, UTC).strftime("%m-%d %H")
            for b in backups[:-24] if b.id in keep
        )
        # the last backup is 12-17 23:00 (a Thursday): 6 months' newest (Jul-Nov
        # plus December's, which is the newest of all), the newest of the 6 days
        # before today, of the 3 ISO weeks before this one (Sundays).
        self.assertEqual(
            older,
            ["07-31 23", "08-31 23", "09-30 23", "10-31 23", "11-29 23", "11-30 23",
             "12-06 23", "12-11 23", "12-12 23", "12-13 23", "12-14 23", "12-15 23",
             "12-16 23"],
        )
        self.assertEqual(len(keep), 24 + len(older))

    def test_failed_do_not_count(self) -> None:
        """A day of failures keeps the last good backups and the recent failures."""
        backups = hourly_backups(48, failed=set(range(24, 48)))
        now = backups[-1].created
        keep = to_keep(backups, now, RetentionPolicy(hourly=24, daily=0, weekly=0, monthly=0))
        self.assertEqual(keep, {b.id for b in backups})  # 24 good hourly + 24 recent failures

    def test_old_failures_pruned(self) -> None:
        """Failures older than failed_ttl are pruned."""
        backups = [Candidate("ok", T0.timestamp(), True), Candidate("bad", T0.timestamp() + 1, False)]
        keep = to_keep(backups, T0.timestamp() + 8 * 86400, RetentionPolicy())
        self.assertEqual(keep, {"ok"})

    def test_pruning_over_time(self) -> None:
        """Simulated with a moving clock: the kept set never exceeds the policy's bound."""
        policy = RetentionPolicy(hourly=3, daily=2, weekly=0, monthly=0)
        kept: list[Candidate] = []
        for i in range(24 * 10):
            kept.append(Candidate(f"b{i}", (T0 + timedelta(hours=i)).timestamp(), True))
            ids = to_keep(kept, kept[-1].created, policy)
            kept = [b for b in kept if b.id in ids]
            self.assertLessEqual(len(kept), 5)
        self.assertEqual(kept[-1].id, "b239")
