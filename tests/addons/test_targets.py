"""What the backup role backs up, read from a real SQLite store's add-on records."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from epio.backup.targets import Target, dedicated_postgres_url, targets_for
from epio.store import NotFound, open_store
from epio.store.addons import Addon, delete_addon, get_addon, list_addons, put_addon


class FakeShared:
    def __init__(self, *apps: str) -> None:
        self.apps = set(apps)

    async def exists(self, app: str) -> bool:
        return app in self.apps


class TargetTests(TestCase):
    timeout = 20

    url = ""

    async def store(self):  # type: ignore[no-untyped-def]
        url = self.url
        if not url:
            tmp = Path(tempfile.mkdtemp(prefix="epio-targets-"))
            self.addCleanup(shutil.rmtree, tmp, True)
            url = f"sqlite:///{tmp / 's.sqlite3'}"
        elif url == "postgresql":
            from tests.store.pg import fresh_database_for_test

            url = fresh_database_for_test(self)
        store = await open_store(url, reactor)
        self.addCleanup(store.close)
        user = await store.create_user("u")
        for app in ("a", "b", "c"):
            await store.create_app(app, user.id)
        return store

    async def test_records_round_trip_without_leaking(self) -> None:
        """An add-on record keeps every fact; its repr never shows the password; it goes
        with its app."""
        store = await self.store()
        rec = Addon("a", "redis", "dedicated", "ready", 1.0, 1.0, "127.0.0.1", 7000,
                    password="s3cret", node="r1", instance="i1", options={"memory_mb": 8})
        await put_addon(store, rec)
        got = await get_addon(store, "a", "redis")
        self.assertEqual((got.password, got.port, got.options), ("s3cret", 7000,
                                                                 {"memory_mb": 8}))
        self.assertNotIn("s3cret", repr(got))
        await store.delete_app("a")
        self.assertEqual(await list_addons(store), [])
        with self.assertRaises(NotFound):
            await get_addon(store, "a", "redis")
        self.assertFalse(await delete_addon(store, "a", "redis"))

    async def test_targets(self) -> None:
        """Ready add-ons are targets (failed/provisioning ones are not); a shared database
        without a record is still backed up; ``kind`` filters."""
        store = await self.store()
        await put_addon(store, Addon("a", "redis", "dedicated", "ready", 1.0, 1.0, "h", 1,
                                     password="p"))
        await put_addon(store, Addon("a", "postgres", "dedicated", "provisioning", 1.0, 1.0))
        await put_addon(store, Addon("b", "postgres", "shared", "ready", 1.0, 1.0, "h", 5432,
                                     "app_b", "app_b", "p"))
        shared = FakeShared("a", "c")
        got = await targets_for(store, "a", shared=shared)
        self.assertEqual([(t.kind, t.plan) for t in got],
                         [("redis", "dedicated"), ("postgres", "shared")])
        self.assertEqual(await targets_for(store, "a", "redis", shared=shared), got[:1])
        self.assertEqual([t.database for t in await targets_for(store, "b", shared=shared)],
                         ["app_b"])
        self.assertEqual([t.describe() for t in await targets_for(store, "c", shared=shared)],
                         ["app_c"])
        self.assertEqual(await targets_for(store, "c", "redis", shared=shared), [])

    async def test_scheduled_round_includes_servers_that_are_down(self) -> None:
        """For the scheduled round (``down_too``) a dedicated server that is down
        (``failed``, with its address) is a target too -- its backup waits for it, never
        skipped silently; one that never got an address, or a provisioning one, is not."""
        store = await self.store()
        await put_addon(store, Addon("c", "redis", "dedicated", "failed", 1.0, 1.0, "h", 7,
                                     password="p"))
        await put_addon(store, Addon("c", "postgres", "dedicated", "failed", 1.0, 1.0))
        await put_addon(store, Addon("b", "redis", "dedicated", "provisioning", 1.0, 1.0,
                                     "h", 8, password="p"))
        self.assertEqual(await targets_for(store, "c"), [])
        self.assertEqual([(t.kind, t.port) for t in await targets_for(store, "c",
                                                                        down_too=True)],
                         [("redis", 7)])
        self.assertEqual(await targets_for(store, "b", down_too=True), [])

    def test_dedicated_url(self) -> None:
        """The backup node reaches a dedicated server's maintenance database as the app's
        role; IPv6 hosts are bracketed; the repr hides the password."""
        t = Target("a", "postgres", "dedicated", "::1", 7001, "app_a", "app_a", "p/w")
        self.assertEqual(dedicated_postgres_url(t), "postgresql://app_a:p%2Fw@[::1]:7001/postgres")
        self.assertNotIn("p/w", repr(t))


class PostgresTargetTests(TargetTests):
    """The same on a PostgreSQL store."""

    url = "postgresql"
