"""A store URL that lists several PostgreSQL hosts (a primary and its standbys).

Against the real local PostgreSQL: a host that refuses, a host that accepts and
never answers, and a connection whose session turned read-only (as one on a
primary demoted to a standby does).  The promotion of a real standby under a
running cluster is tests/cluster (docs/cluster.md).
"""

from __future__ import annotations

import socket
import time
import urllib.parse

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from epio.store import open_store
from epio.store.backend import PgConnector, PostgresBackend, pg_hosts
from epio.store.errors import StoreUnavailable
from tests.store import pg


def with_hosts(url: str, *hosts: str) -> str:
    """``url`` listing ``hosts`` (``addr:port`` each) and asking for a read-write session."""
    parts = urllib.parse.urlsplit(url)
    user = parts.netloc.rsplit("@", 1)[0]
    query = parts.query + "&target_session_attrs=read-write"
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}@{','.join(hosts)}",
                                                  query=query))


def refusing_port() -> int:
    """A local port nothing listens on (bound, then closed)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class MultiHostTests(TestCase):
    def setUp(self) -> None:
        self.url = pg.pg_url_for_test(self)
        real = urllib.parse.urlsplit(self.url)
        self.real = f"{real.hostname}:{real.port or 5432}"

    def silent_host(self) -> str:
        """A TCP port that accepts connections (the kernel's backlog) and never answers:
        what a hung server, or a black-holed address, looks like to libpq."""
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        self.addCleanup(s.close)
        return f"127.0.0.1:{s.getsockname()[1]}"

    def test_pg_hosts(self) -> None:
        self.assertIsNone(pg_hosts("postgresql://u@a:5432/db"))
        self.assertEqual(pg_hosts("postgresql://u@a:5432,b:5433/db"),
                         [("a", "5432"), ("b", "5433")])
        self.assertEqual(pg_hosts("host=a,b port=6000 dbname=x"),
                         [("a", "6000"), ("b", "6000")])
        self.assertEqual(pg_hosts("postgresql://u@a,b/db"), [("a", ""), ("b", "")])

    async def test_refusing_first_host(self) -> None:
        """The first host refuses: the store opens on the second, migrates, writes,
        listens and takes a lock there."""
        url = with_hosts(self.url, f"127.0.0.1:{refusing_port()}", self.real)
        store = await open_store(url, reactor, connect_timeout=5)
        self.addCleanup(store.close)
        self.assertEqual(store.backend.connector.last_good, 1)  # type: ignore[attr-defined]
        seen: list[dict[str, object]] = []
        await store.backend.listen(seen.append)
        await store.backend.transaction(
            lambda tx: tx.execute("CREATE TABLE t (x int)"))
        await store.backend.transaction(lambda tx: tx.execute("INSERT INTO t VALUES (1)"))
        lock = store.lock("failover-" + self.id())
        self.addCleanup(lock.release)
        self.assertTrue(await lock.acquire())
        self.assertTrue(await lock.check())

    async def test_silent_first_host(self) -> None:
        """A first host that never answers costs its share of connect_timeout once; later
        connections start with the host that answered."""
        url = with_hosts(self.url, self.silent_host(), self.real)
        backend = PostgresBackend(url, reactor, connect_timeout=2.0)
        self.addCleanup(backend.close)
        t0 = time.monotonic()
        await backend.open()
        first = time.monotonic() - t0
        self.assertGreaterEqual(first, 0.9)  # the silent host's 1 s share, then the real one
        self.assertLess(first, 2.0)
        t0 = time.monotonic()
        conns = [await backend._connect() for _ in range(3)]
        self.assertLess(time.monotonic() - t0, 0.9)
        for c in conns:
            c.close()

    async def test_every_host_down(self) -> None:
        """No host answers: StoreUnavailable naming each host and why, within the timeout."""
        silent = self.silent_host()
        refusing = f"127.0.0.1:{refusing_port()}"
        url = with_hosts(self.url, silent, refusing)
        backend = PostgresBackend(url, reactor, connect_timeout=2.0)
        self.addCleanup(backend.close)
        t0 = time.monotonic()
        with self.assertRaises(StoreUnavailable) as e:
            await backend.open()
        self.assertLess(time.monotonic() - t0, 3.0)
        self.assertIn(f"{silent}: no answer within 1 s", str(e.exception))
        self.assertIn(refusing, str(e.exception))

    async def test_read_only_connection_dropped(self) -> None:
        """A pooled connection whose session became read-only (a primary demoted under
        it) fails a write: it is dropped and the transaction runs again on a new one."""
        backend = PostgresBackend(self.url, reactor, pool_size=1)
        self.addCleanup(backend.close)
        await backend.open()
        await backend.transaction(lambda tx: tx.execute("CREATE TABLE t (x int)"))

        async def make_read_only(tx: object) -> int:
            await tx.execute(  # type: ignore[attr-defined]
                "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
            return (await tx.execute("SELECT pg_backend_pid()")).scalar()  # type: ignore[attr-defined,no-any-return]

        old_pid = await backend.transaction(make_read_only)

        async def write(tx: object) -> int:
            await tx.execute("INSERT INTO t VALUES (1)")  # type: ignore[attr-defined]
            return (await tx.execute("SELECT pg_backend_pid()")).scalar()  # type: ignore[attr-defined,no-any-return]

        new_pid = await backend.transaction(write)
        self.assertNotEqual(new_pid, old_pid)
        count = await backend.transaction(
            lambda tx: tx.execute("SELECT count(*) FROM t"), readonly=True)
        self.assertEqual(count.scalar(), 1)


class CancelTests(TestCase):
    async def test_cancelled_query_closes_its_connection(self) -> None:
        """Cancelling a query's Deferred closes the connection at once (CancelledError)
        instead of libpq's PQcancel, a blocking connect to the server that holds the
        reactor when the server's host has vanished."""
        from twisted.internet.defer import CancelledError

        url = pg.pg_url_for_test(self)
        lost: list[object] = []
        conn = await PgConnector(reactor, url, 5.0).connect(on_lost=lost.append)
        self.addCleanup(conn.close)
        d = conn.runQuery("SELECT pg_sleep(30)")
        t0 = time.monotonic()
        d.cancel()
        with self.assertRaises(CancelledError):
            await d
        self.assertLess(time.monotonic() - t0, 1.0)
        self.assertTrue(conn.closed)
        self.assertEqual(lost, [conn])
