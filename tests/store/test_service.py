"""StoreService: readiness, failure reporting and shutdown."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from epio.store import Store, StoreService, StoreUnavailable
from epio.store.service import make_backend, redact_url
from tests.store import pg
from tests.util import free_port


class StoreServiceTests(TestCase):
    """The node's StoreService."""

    async def test_ready_and_stop_sqlite(self) -> None:
        """whenReady() fires with a migrated Store; stopService closes it."""
        svc = StoreService(f"sqlite:///{self.mktemp()}/s.sqlite3", reactor=reactor)
        early = svc.whenReady()
        svc.startService()
        store = await early
        self.assertIsInstance(store, Store)
        self.assertIs(await svc.whenReady(), store)
        user = await store.create_user("x")
        self.assertEqual((await store.get_user(user.id)).name, "x")
        await svc.stopService()
        with self.assertRaises(StoreUnavailable):
            await store.get_user(user.id)

    async def test_ready_postgres(self) -> None:
        """The same service opens a PostgreSQL store from a postgresql:// URL."""
        svc = StoreService(pg.pg_url_for_test(self), reactor=reactor)
        svc.startService()
        store = await svc.whenReady()
        self.assertEqual(store.dialect, "postgresql")
        await svc.stopService()

    async def test_unreachable_postgres_errbacks_when_ready(self) -> None:
        """An unreachable database: startService does not raise, whenReady errbacks
        with StoreUnavailable, and stopService still fires."""
        url = f"postgresql://postgres:sekrit@127.0.0.1:{free_port()}/nope"
        svc = StoreService(url, reactor=reactor)
        svc.startService()
        with self.assertRaises(StoreUnavailable):
            await svc.whenReady()
        with self.assertRaises(StoreUnavailable):
            await svc.whenReady()
        await svc.stopService()
        self.assertNotIn("sekrit", redact_url(url))

    def test_redact_url(self) -> None:
        """Passwords leave store URLs before they are logged, in userinfo or query."""
        from epio.store.service import redact_url

        for url, shown in [
            ("postgresql://u:sekrit@h:5/db", "postgresql://u:***@h:5/db"),
            ("postgresql://u@h/db?password=sekrit&sslmode=require",
             "postgresql://u@h/db?password=***&sslmode=require"),
            ("postgresql://h/db?sslmode=require&password=sekrit",
             "postgresql://h/db?sslmode=require&password=***"),
            ("sqlite:////var/lib/epio/store.sqlite3", "sqlite:////var/lib/epio/store.sqlite3"),
        ]:
            self.assertEqual(redact_url(url), shown)

    async def test_bad_url(self) -> None:
        """A URL of an unknown kind fails whenReady with a clear ValueError."""
        svc = StoreService("mysql://x", reactor=reactor)
        svc.startService()
        with self.assertRaises(ValueError) as cm:
            await svc.whenReady()
        self.assertIn("sqlite:///", str(cm.exception))
        await svc.stopService()

    async def test_silent_server_times_out(self) -> None:
        """A server that accepts TCP but never answers fails the start (and a lock
        attempt) with StoreUnavailable after connect_timeout, not never."""
        import socket

        silent = socket.socket()
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        self.addCleanup(silent.close)
        url = f"postgresql://postgres@127.0.0.1:{silent.getsockname()[1]}/x"
        svc = StoreService(url, reactor=reactor, connect_timeout=0.3)
        started = reactor.seconds()
        svc.startService()
        with self.assertRaises(StoreUnavailable) as cm:
            await svc.whenReady()
        self.assertIn("0.3", str(cm.exception))
        self.assertLess(reactor.seconds() - started, 5)
        await svc.stopService()
        lock = make_backend(url, reactor, connect_timeout=0.3).lock("x")
        with self.assertRaises(StoreUnavailable):
            await lock.acquire()
        self.assertFalse(lock.held)

    async def test_from_config(self) -> None:
        """from_config uses [store] url and options, defaulting to SQLite in the data dir."""
        from pathlib import Path

        from epio.config import load_config

        data = Path(self.mktemp())
        svc = StoreService.from_config(
            load_config(None, {"store": {"busy_timeout": 2.5}}), data, reactor)
        self.assertEqual(svc.url, f"sqlite:///{data / 'store.sqlite3'}")
        svc.startService()
        store = await svc.whenReady()
        self.assertEqual(store.backend.dialect, "sqlite")
        self.assertEqual(store.backend._busy_timeout, 2.5)  # type: ignore[attr-defined]
        self.assertTrue((data / "store.sqlite3").exists())
        await svc.stopService()

    def test_make_backend_does_no_io(self) -> None:
        """Building a backend from a URL touches nothing (init does no I/O)."""
        path = self.mktemp()
        backend = make_backend(f"sqlite:///{path}/x.sqlite3", reactor)
        self.assertEqual(backend.dialect, "sqlite")
        import os

        self.assertFalse(os.path.exists(path))
