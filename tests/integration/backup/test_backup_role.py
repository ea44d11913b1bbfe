"""The backup role as real node processes: run-once scheduling on PostgreSQL, leader
failover, and list/create/restore over the bus."""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path

import psycopg2
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from epio.addons.postgres import SharedPostgres
from epio.bus import Bus, RemoteError
from epio.store.service import open_store
from tests.store.pg import ADMIN_URL, fresh_database_for_test
from tests.util import NodeProcess, free_port, to_toml


def records(root: Path) -> list[dict]:
    """The finished backups in a backup node's catalog."""
    found = [json.loads(p.read_text()) for p in root.glob("*/*/*/meta.json")]
    return [r for r in found if r["status"] != "running"]


class BackupRoleTests(TestCase):
    timeout = 180

    def secret_file(self) -> Path:
        path = Path(self.mktemp()).absolute()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_hex(32))
        path.chmod(0o600)
        return path

    def start_node(self, store_url: str, secret: Path, interval: float) -> tuple[NodeProcess, str]:
        control = f"tcp://127.0.0.1:{free_port()}"
        config = to_toml({
            "store": {"url": store_url},
            "cluster": {"secret_file": str(secret)},
            "backup": {"interval": interval, "control_bind": control, "hourly": 3,
                       "daily": 0, "weekly": 0, "monthly": 0},
            "addons": {"postgres_admin_url": ADMIN_URL},
        })
        node = NodeProcess(["--role=backup"], config=config)
        self.addCleanup(node.cleanup)
        return node, control

    async def wait_until(self, predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await deferLater(reactor, 0.2, lambda: None)

    async def test_one_scheduler_then_failover(self) -> None:
        """Two backup nodes on one PostgreSQL store: only the lock holder backs up; when
        it is killed the other takes over; every backup is verified; retention
        keeps at most `hourly` of them."""
        store_url = fresh_database_for_test(self)
        store = await open_store(store_url, reactor)
        self.addCleanup(store.close)
        user = await store.create_user("owner")
        app = "b" + secrets.token_hex(4)
        await store.create_app(app, user.id)
        shared = SharedPostgres(reactor, ADMIN_URL)
        creds = await shared.provision(app)
        self.addCleanup(lambda: shared.deprovision(app))
        with psycopg2.connect(host=creds.host, port=creds.port, user=creds.user,
                              password=creds.password, dbname=creds.database) as conn:
            conn.cursor().execute("CREATE TABLE t AS SELECT generate_series(1, 100) AS n")

        secret = self.secret_file()
        a, _ = self.start_node(store_url, secret, interval=1.0)
        b, _ = self.start_node(store_url, secret, interval=1.0)
        dirs = {a: a.data_dir / "backups", b: b.data_dir / "backups"}

        def made(node: NodeProcess) -> int:
            return node.output().count(f"of {app} verified")

        def rounds(node: NodeProcess) -> int:
            # A round logs this once its backups are recorded *and* pruned: reading
            # the catalog on "verified" alone races the prune that follows it.
            return node.output().count("backup round done:")

        await self.wait_until(lambda: rounds(a) + rounds(b) >= 3 and made(a) + made(b) >= 3,
                              60, "three scheduled backup rounds")
        leader = a if made(a) else b
        other = b if leader is a else a
        self.assertEqual(made(other), 0, "both nodes ran the schedule")
        self.assertEqual(records(dirs[other]), [])
        got = records(dirs[leader])
        self.assertTrue(all(r["status"] == "verified" for r in got), got)
        self.assertEqual(got[0]["counts"], {"public.t": 100})
        # hourly=3 (daily/weekly/monthly 0): pruning keeps the newest backup of each of
        # the last 3 hours -- one per distinct hour the backups were made in.  Rounds go
        # on every second and a new backup is on disk a moment before the prune that
        # follows it, so the catalog is read until a moment between the two (bounded: if
        # pruning kept extra backups, the count only grows).
        def pruned(node: NodeProcess) -> bool:
            got = records(dirs[node])
            return len(got) == len({int(r["created"] // 3600) for r in got})

        await self.wait_until(lambda: pruned(leader), 10, "retention applied")

        leader.kill()
        await self.wait_until(lambda: made(other) >= 2 and rounds(other) >= 2, 60,
                              "backup rounds after failover")
        await self.wait_until(lambda: pruned(other), 10, "retention applied after failover")
        got = records(dirs[other])
        self.assertTrue(all(r["status"] == "verified" for r in got), got)

    async def test_create_list_restore_over_bus(self) -> None:
        """backup.create answers with a verified backup, backup.list shows it, a
        corrupted file is refused at restore, a good one restores the data."""
        store_url = fresh_database_for_test(self)
        secret = self.secret_file()
        node, control = self.start_node(store_url, secret, interval=3600.0)
        node.wait_for_log("service backup started")
        app = "r" + secrets.token_hex(4)
        shared = SharedPostgres(reactor, ADMIN_URL)
        creds = await shared.provision(app)
        self.addCleanup(lambda: shared.deprovision(app))
        dsn = dict(host=creds.host, port=creds.port, user=creds.user,
                   password=creds.password, dbname=creds.database)
        with psycopg2.connect(**dsn) as conn:
            conn.cursor().execute("CREATE TABLE t AS SELECT generate_series(1, 42) AS n")

        bus = Bus(reactor, bytes.fromhex(secret.read_text()), "test")
        dealer = bus.dealer([control])
        dealer.startService()
        self.addCleanup(dealer.stopService)
        reply = await dealer.request("backup.create", {"app": app}, timeout=60)
        [made] = reply.body["backups"]
        self.assertEqual(made["status"], "verified")
        self.assertNotIn(creds.password, json.dumps(reply.body))
        listing = await dealer.request("backup.list", {"app": app})
        self.assertEqual([r["id"] for r in listing.body["backups"]], [made["id"]])

        with psycopg2.connect(**dsn) as conn:
            conn.cursor().execute("DELETE FROM t")
        reply = await dealer.request("backup.restore", {"app": app, "id": made["id"]}, timeout=60)
        kept = reply.body["kept_as"]
        self.addCleanup(lambda: _drop(kept))
        with psycopg2.connect(**dsn) as conn:
            cur = conn.cursor()
            cur.execute("SELECT count(*) FROM t")
            self.assertEqual(cur.fetchone(), (42,))

        data = node.data_dir / "backups" / app / "postgres" / made["id"] / "data"
        raw = bytearray(data.read_bytes())
        raw[-10] ^= 0xFF
        data.write_bytes(bytes(raw))
        with self.assertRaises(RemoteError) as cm:
            await dealer.request("backup.restore", {"app": app, "id": made["id"]}, timeout=60)
        self.assertIn("checksum mismatch", cm.exception.message)
        with self.assertRaises(RemoteError) as cm:
            await dealer.request("backup.create", {"app": "nosuchapp" + secrets.token_hex(2)})
        self.assertEqual(cm.exception.code, "backup_not_found")


def _drop(database: str) -> None:
    conn = psycopg2.connect(ADMIN_URL)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                    (database,))
        cur.execute(f'DROP DATABASE IF EXISTS "{database}"')
    conn.close()
