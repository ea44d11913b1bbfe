"""Change notifications (Store.subscribe) on both backends."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from epio.store import Change, Conflict, Instance, Store, open_store
from tests.store import pg


async def wait_until(pred: Any, timeout: float = 10.0) -> None:
    """Poll ``pred()`` on the real reactor until true, or fail after ``timeout``."""
    deadline = reactor.seconds() + timeout
    while not pred():
        if reactor.seconds() > deadline:
            raise AssertionError(f"condition not met in {timeout}s")
        await deferLater(reactor, 0.01, lambda: None)


class ChangesMixin:
    def url(self) -> str:
        raise NotImplementedError

    async def open(self) -> Store:
        store = await open_store(self.store_url, reactor)
        self.addCleanup(store.close)  # type: ignore[attr-defined]
        return store

    async def setUp(self) -> None:  # type: ignore[override]
        self.store_url = self.url()
        self.store = await self.open()
        self.changes: list[Change] = []
        self.unsubscribe = await self.store.subscribe(self.changes.append)
        self.user = await self.store.create_user("u")

    async def settle(self) -> None:
        """Let in-flight notifications arrive (a marker change made last is seen)."""
        await self.store.upsert_node("marker", [])
        await wait_until(lambda: Change("node", None, "marker") in self.changes)
        self.changes[:] = [c for c in self.changes if c != Change("node", None, "marker")]

    async def test_committed_changes_are_announced(self) -> None:
        """Each committed change is announced with its kind, app and id."""
        await self.store.create_app("a", self.user.id)
        await self.store.set_config_and_release("a", {"X": "1"}, description="x")
        await self.store.upsert_instance(Instance("i1", "a", 1, "web", 1, "n", None, None,
                                                  "pending", 0.0))
        await self.store.delete_instance("i1")
        await self.store.add_domain("a", "a.example.com")
        await self.settle()
        self.assertEqual(
            [c for c in self.changes if c.kind != "user"],
            [Change("app", "a"), Change("config", "a"), Change("release", "a"),
             Change("instance", "a"), Change("instance", "a", "i1"), Change("domain", "a")])

    async def test_failed_changes_are_not_announced(self) -> None:
        """A transaction that fails (a Conflict) announces nothing."""
        await self.store.create_app("a", self.user.id)
        await self.settle()
        self.changes.clear()
        with self.assertRaises(Conflict):  # type: ignore[attr-defined]
            await self.store.create_app("a", self.user.id)
        await self.settle()
        self.assertEqual(self.changes, [])  # type: ignore[attr-defined]

    async def test_unsubscribe(self) -> None:
        """After unsubscribing the callback is not called any more."""
        self.unsubscribe()
        seen: list[Change] = []
        await self.store.subscribe(seen.append)
        await self.store.create_app("b", self.user.id)
        await wait_until(lambda: Change("app", "b") in seen)
        self.assertNotIn(Change("app", "b"), self.changes)  # type: ignore[attr-defined]


class SqliteChangesTests(ChangesMixin, TestCase):
    """Change notifications in one process on SQLite."""

    def url(self) -> str:
        return f"sqlite:///{self.mktemp()}/store.sqlite3"


class PostgresChangesTests(ChangesMixin, TestCase):
    """Change notifications through LISTEN/NOTIFY on PostgreSQL."""

    def url(self) -> str:
        return pg.pg_url_for_test(self)

    async def test_other_nodes_changes_seen(self) -> None:
        """A change committed through another connection pool (another node) is seen."""
        other = await self.open()
        await other.create_app("far", self.user.id)
        await wait_until(lambda: Change("app", "far") in self.changes)

    async def test_resync_after_listener_loss(self) -> None:
        """When the listening connection dies the subscriber gets a resync after the
        listener reconnects, and later changes are announced again."""
        import psycopg2

        conn = psycopg2.connect(pg.run_database())
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE query LIKE 'LISTEN epio_changes%%' AND datname = current_database() "
                        "AND pid <> pg_backend_pid()")
            self.assertEqual(len(cur.fetchall()), 1)
        conn.close()
        await wait_until(lambda: Change("resync") in self.changes)
        await self.store.create_app("after", self.user.id)
        await wait_until(lambda: Change("app", "after") in self.changes)
