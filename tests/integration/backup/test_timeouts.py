"""A backup step that outlives backup.step_timeout is killed, not left running: a real
pg_dump blocked on a lock held by another connection, on the machine's PostgreSQL."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import psycopg2
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from epio.addons.postgres import SharedPostgres
from epio.backup.catalog import Catalog
from epio.backup.postgres import PostgresBackups
from epio.backup.service import BackupManager
from epio.retention import RetentionPolicy

ADMIN_URL = os.environ.get("EPIO_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")


def pg_dumps_of(database: str) -> list[int]:
    """Pids of pg_dump processes (zombies included) working on ``database``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"pg_dump") and database.encode() in argv:
            pids.append(int(entry))
    return pids


class StepTimeoutTests(TestCase):
    timeout = 60

    async def test_timed_out_pg_dump_is_killed(self) -> None:
        """pg_dump waits for a lock another connection holds; after step_timeout the
        backup is failed ("timed out") and no pg_dump process of it is left."""
        shared = SharedPostgres(reactor, ADMIN_URL)
        app = "t" + secrets.token_hex(5)
        creds = await shared.provision(app)
        self.addCleanup(lambda: shared.deprovision(app))
        admin = {"host": "127.0.0.1", "port": creds.port, "user": "postgres",
                 "dbname": creds.database}
        with psycopg2.connect(**admin) as conn:
            cur = conn.cursor()
            cur.execute("CREATE TABLE items (id serial primary key)")
            cur.execute("INSERT INTO items DEFAULT VALUES")
            cur.execute("CREATE SEQUENCE slow_seq")
        conn.close()
        # the row counts (tables only) pass; pg_dump then waits to read the sequence
        locker = psycopg2.connect(**admin)
        self.addCleanup(locker.close)
        locker.cursor().execute("ALTER SEQUENCE slow_seq RENAME TO slow_seq_locked")

        manager = BackupManager(reactor, Catalog(Path(self.mktemp())),
                                RetentionPolicy(1, 1, 1, 1, 60.0), shared,
                                PostgresBackups(reactor, ADMIN_URL), step_timeout=2.0)
        seen: list[list[int]] = []

        def look() -> None:  # while the step runs: pg_dump is there, blocked on the lock
            seen.append(pg_dumps_of(creds.database))
            with psycopg2.connect(**{**admin, "dbname": "postgres"}) as c, c.cursor() as cur:
                cur.execute("SELECT wait_event_type FROM pg_stat_activity WHERE datname = %s "
                            "AND application_name = 'pg_dump'", (creds.database,))
                seen.append([0] if cur.fetchall() == [("Lock",)] else [])

        probe = deferLater(reactor, 1.2, look)
        record = await manager.backup_postgres(app)
        await probe
        self.assertEqual(record.status, "failed")
        self.assertIn("timed out after 2s", record.error)
        self.assertTrue(seen[0], "pg_dump was not running during the step")
        self.assertTrue(seen[1], "pg_dump was not waiting for the lock")
        for _ in range(100):  # SIGKILLed at the timeout; reaped by the reactor
            if not pg_dumps_of(creds.database):
                break
            await deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(pg_dumps_of(creds.database), [])
        self.assertEqual(manager.catalog.get(record.id, app).status, "failed")
        locker.rollback()
