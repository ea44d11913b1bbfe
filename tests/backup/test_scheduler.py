"""The backup scheduler's lifecycle on a fake clock: one round at a time, and a stop
cancels the running round (see the drawing in epio.backup.service)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from epio.backup.service import BackupService
from epio.bus.testing import MemoryBus
from epio.config import validate


class StalledStore:
    """A store whose app list arrives when the test says (a round in progress)."""

    def __init__(self) -> None:
        self.asked: list[Deferred[list[Any]]] = []

    def list_apps(self) -> Deferred[list[Any]]:
        d: Deferred[list[Any]] = Deferred()
        self.asked.append(d)
        return d


class SchedulerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.store = StalledStore()
        root = Path(self.mktemp())
        settings = validate({"backup": {"dir": str(root / "backups"), "interval": 60.0,
                                        "control_bind": "tcp://127.0.0.1:7741"}}).settings

        async def get_store() -> Any:
            return self.store

        self.svc = BackupService(self.clock, settings.backup, settings.addons, root,
                                 MemoryBus(self.clock), get_store)

    def test_one_round_at_a_time(self) -> None:
        """A timer tick while a round of an earlier leadership still runs starts no
        second round; once it ends, the next tick starts one."""
        self.svc._elected()
        self.assertEqual(len(self.store.asked), 1)  # the timer's first call, at once
        self.svc._lost()
        self.svc._elected()  # elected again: its first tick finds the round running
        self.assertEqual(len(self.store.asked), 1)
        self.store.asked[0].callback([])
        self.clock.advance(60)
        self.assertEqual(len(self.store.asked), 2)
        self.store.asked[1].callback([])
        self.svc._lost()

    def test_stop_cancels_the_running_round(self) -> None:
        """Stopping the service cancels the round in progress, also one that began
        under an earlier leadership."""
        self.svc._elected()
        self.svc._lost()
        self.svc._elected()
        waiting = self.store.asked[0]
        round_ = self.svc._round
        assert round_ is not None
        self.svc._lost()
        self.svc.stopService()
        self.assertTrue(waiting.called)  # the store read of the round was cancelled
        self.assertTrue(round_.called)
        self.assertIsNone(self.svc._round)


class ArchiveRetentionSettingsTests(SynchronousTestCase):
    def test_archive_keys_set_the_archive_retention_apart_from_the_local_one(self) -> None:
        """backup.archive_hourly/daily/weekly/monthly are the archive's own retention
        (what archive pruning applies, test_archive.py), not backup.hourly/...'s."""
        from epio.retention import RetentionPolicy

        root = Path(self.mktemp())
        settings = validate({"backup": {
            "dir": str(root / "backups"), "control_bind": "tcp://127.0.0.1:7741",
            "hourly": 1, "daily": 2, "weekly": 3, "monthly": 4,
            "archive_hourly": 5, "archive_daily": 6, "archive_weekly": 7,
            "archive_monthly": 8}}).settings
        clock = Clock()

        async def get_store() -> Any:
            return StalledStore()

        svc = BackupService(clock, settings.backup, settings.addons, root,
                            MemoryBus(clock), get_store)
        ttl = settings.backup.failed_ttl
        self.assertEqual(svc.manager.policy, RetentionPolicy(1, 2, 3, 4, ttl))
        self.assertEqual(svc.manager.archive_policy, RetentionPolicy(5, 6, 7, 8, ttl))
