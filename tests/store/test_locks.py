"""Locks and leader election on both backends, plus LeaderService on a fake clock."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from epio.store import LeaderService, Store, open_store
from epio.store.backend import lock_key
from tests.store import pg


async def wait_until(pred: Any, timeout: float = 10.0, step: float = 0.02) -> None:
    """Poll ``pred()`` on the real reactor until true, or fail after ``timeout``."""
    deadline = reactor.seconds() + timeout
    while not pred():
        if reactor.seconds() > deadline:
            raise AssertionError(f"condition not met in {timeout}s")
        await deferLater(reactor, step, lambda: None)


class Events:
    """Records leader callbacks."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.events: list[str] = []

    def elected(self) -> None:
        self.events.append("elected")

    def lost(self) -> None:
        self.events.append("lost")


class LeaderMixin:
    def url(self) -> str:
        raise NotImplementedError

    async def open(self) -> Store:
        store = await open_store(self.store_url, reactor)
        self.addCleanup(store.close)  # type: ignore[attr-defined]
        return store

    async def setUp(self) -> None:  # type: ignore[override]
        self.store_url = self.url()
        self.stores = [await self.open(), await self.open()]
        self.name = "sched-" + self.id()  # type: ignore[attr-defined]

    def leader(self, store: Store, ev: Events) -> LeaderService:
        svc = LeaderService(store, self.name, ev.elected, ev.lost, clock=reactor,
                            retry_interval=0.05)
        svc.startService()
        self.addCleanup(lambda: svc.stopService() if svc.running else None)  # type: ignore[attr-defined]
        return svc

    async def test_one_leader_and_handover_on_stop(self) -> None:
        """Of two LeaderServices exactly one leads; stopping it hands leadership over."""
        ea, eb = Events("a"), Events("b")
        a = self.leader(self.stores[0], ea)
        await wait_until(lambda: a.is_leader)
        b = self.leader(self.stores[1], eb)
        await deferLater(reactor, 0.3, lambda: None)
        self.assertFalse(b.is_leader)
        self.assertEqual(eb.events, [])
        await a.stopService()
        self.assertEqual(ea.events, ["elected", "lost"])
        await wait_until(lambda: b.is_leader)
        self.assertEqual(eb.events, ["elected"])


    async def test_closing_store_releases_its_locks(self) -> None:
        """Closing a store gives up the locks made from it: another store can take
        them, and the closed store's lock refuses to be acquired again."""
        from epio.store import StoreUnavailable

        a = self.stores[0].lock(self.name)
        b = self.stores[1].lock(self.name)
        self.addCleanup(b.release)  # type: ignore[attr-defined]
        self.assertTrue(await a.acquire())
        self.assertFalse(await b.acquire())
        await self.stores[0].close()
        self.assertFalse(a.held)  # type: ignore[attr-defined]
        self.assertTrue(await b.acquire(block=True, timeout=5))
        with self.assertRaises(StoreUnavailable):  # type: ignore[attr-defined]
            await a.acquire()


class SqliteLeaderTests(LeaderMixin, TestCase):
    """Leader election on the SQLite store's local lock."""

    def url(self) -> str:
        return f"sqlite:///{self.mktemp()}/store.sqlite3"


class PostgresLeaderTests(LeaderMixin, TestCase):
    """Leader election on PostgreSQL advisory locks."""

    def url(self) -> str:
        return pg.pg_url_for_test(self)

    def terminate_lock_holder(self, name: str) -> int:
        """Kill (server side) every connection holding the advisory lock ``name`` in this
        run's database (pg_locks lists every database's: another test run holding a
        lock of the same name must not lose it)."""
        import psycopg2

        key = lock_key(name)
        conn = psycopg2.connect(pg.run_database())
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' "
                    "AND granted AND ((classid::bigint << 32) | objid::bigint) = %s "
                    "AND database = (SELECT oid FROM pg_database "
                    "WHERE datname = current_database())", (key,))
                return len(cur.fetchall())
        finally:
            conn.close()

    async def test_lock_lost_when_connection_dies(self) -> None:
        """When the holder's connection dies the lock is dropped, the holder is told
        (when_lost fires, held turns False) and another session can take it."""
        a = self.stores[0].lock(self.name)
        b = self.stores[1].lock(self.name)
        self.addCleanup(a.release)
        self.addCleanup(b.release)
        self.assertTrue(await a.acquire())
        lost = a.when_lost()
        self.assertFalse(await b.acquire())
        self.assertEqual(self.terminate_lock_holder(self.name), 1)
        await lost
        self.assertFalse(a.held)
        self.assertTrue(await b.acquire(block=True, timeout=5))
        self.assertFalse(await a.check())

    async def test_leader_notices_connection_loss(self) -> None:
        """A leader whose lock connection dies calls on_lost; then exactly one of the
        two nodes leads again (whoever retries first)."""
        ea, eb = Events("a"), Events("b")
        a = self.leader(self.stores[0], ea)
        await wait_until(lambda: a.is_leader)
        b = self.leader(self.stores[1], eb)
        await deferLater(reactor, 0.2, lambda: None)
        self.assertFalse(b.is_leader)
        self.assertEqual(self.terminate_lock_holder(self.name), 1)
        await wait_until(lambda: "lost" in ea.events)
        self.assertEqual(ea.events[:2], ["elected", "lost"])
        await wait_until(lambda: a.is_leader or b.is_leader)
        await deferLater(reactor, 0.2, lambda: None)
        self.assertTrue(a.is_leader != b.is_leader)
        self.assertEqual(self.terminate_lock_holder(self.name), 1)

    async def test_check_detects_lock_gone(self) -> None:
        """check() is True while held and False after the server dropped the lock."""
        a = self.stores[0].lock(self.name)
        self.addCleanup(a.release)
        self.assertFalse(await a.check())
        self.assertTrue(await a.acquire())
        self.assertTrue(await a.check())
        await a.release()
        self.assertFalse(a.held)
        self.assertFalse(await a.check())


class FakeLock:
    """An in-memory Lock shared through ``owners``."""

    def __init__(self, name: str, owners: dict[str, object]) -> None:
        self.name = name
        self.owners = owners
        self.lost: list[Deferred[None]] = []
        self.fail_check = False

    @property
    def held(self) -> bool:
        return self.owners.get(self.name) is self

    def acquire(self, block: bool = False, timeout: float | None = None) -> Deferred[bool]:
        if self.owners.get(self.name) in (None, self):
            self.owners[self.name] = self
            return succeed(True)
        return succeed(False)

    def release(self) -> Deferred[None]:
        if self.held:
            del self.owners[self.name]
        return succeed(None)

    def check(self) -> Deferred[bool]:
        if self.fail_check and self.held:
            del self.owners[self.name]
        return succeed(self.held)

    def when_lost(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.lost.append(d)
        return d


class FakeStore:
    def __init__(self, owners: dict[str, object]) -> None:
        self.owners = owners
        self.locks: list[FakeLock] = []

    def lock(self, name: str) -> FakeLock:
        lock = FakeLock(name, self.owners)
        self.locks.append(lock)
        return lock


class LeaderServiceClockTests(SynchronousTestCase):
    """LeaderService timing on a fake clock."""

    def test_retries_every_interval_and_loses_on_failed_check(self) -> None:
        """A follower retries every retry_interval; a failed check makes the leader
        report loss, and the follower wins at its next retry."""
        clock = Clock()
        owners: dict[str, object] = {}
        ea, eb = Events("a"), Events("b")
        sa, sb = FakeStore(owners), FakeStore(owners)
        a = LeaderService(sa, "x", ea.elected, ea.lost, clock=clock, retry_interval=5)
        b = LeaderService(sb, "x", eb.elected, eb.lost, clock=clock, retry_interval=5)
        a.startService()
        b.startService()
        self.assertTrue(a.is_leader)
        self.assertFalse(b.is_leader)
        clock.advance(5)
        self.assertEqual((ea.events, eb.events), (["elected"], []))
        sa.locks[0].fail_check = True
        clock.advance(5)  # a checks and loses; b (ticking at the same time) may win now or next
        self.assertEqual(ea.events, ["elected", "lost"])
        clock.advance(5)
        self.assertTrue(b.is_leader)
        self.assertEqual(eb.events, ["elected"])
        self.successResultOf(b.stopService())
        self.assertEqual(eb.events, ["elected", "lost"])
        self.assertNotIn("x", owners)
        self.successResultOf(a.stopService())

    def test_connection_loss_reported_at_once(self) -> None:
        """A lock reporting loss (when_lost) makes the leader call on_lost without waiting."""
        clock = Clock()
        ev = Events("a")
        store = FakeStore({})
        a = LeaderService(store, "y", ev.elected, ev.lost, clock=clock, retry_interval=60)
        a.startService()
        self.assertTrue(a.is_leader)
        store.owners.clear()
        store.locks[0].lost[0].callback(None)
        self.assertFalse(a.is_leader)
        self.assertEqual(ev.events, ["elected", "lost"])
        self.successResultOf(a.stopService())
        self.assertEqual(ev.events, ["elected", "lost"])
