"""Shared PostgreSQL add-ons and pull-only backups on the machine's real servers."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
from pathlib import Path

import psycopg2
from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from epio.addons.postgres import SharedPostgres
from epio.backup.catalog import BackupRecord, Catalog, sha256_file
from epio.backup.postgres import BackupFailed, PostgresBackups
from epio.backup.redis import RedisBackups
from tests.util import free_port

# as the platform's app Redis: a backup's full-sync snapshot starts at once, not after 5 s
NO_SYNC_DELAY = ("--repl-diskless-sync-delay", "0")
ADMIN_URL = os.environ.get("EPIO_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")


def app_name() -> str:
    return "t" + secrets.token_hex(5)


def table_dump(url_kwargs: dict) -> str:
    """The data of every table, as pg_dump prints it (ordered, comparable)."""
    env = dict(os.environ, PGPASSWORD=url_kwargs["password"])
    out = subprocess.run(
        ["pg_dump", "--data-only", "--inserts", "--rows-per-insert=1", "-h", url_kwargs["host"],
         "-p", str(url_kwargs["port"]), "-U", url_kwargs["user"], url_kwargs["dbname"]],
        env=env, capture_output=True, text=True, check=True, timeout=60,
    ).stdout
    return "\n".join(sorted(ln for ln in out.splitlines() if ln.startswith("INSERT")))


class SharedPostgresTests(TestCase):
    timeout = 120

    async def provision(self, shared: SharedPostgres) -> tuple[str, dict]:
        app = app_name()
        creds = await shared.provision(app)
        self.addCleanup(lambda: shared.deprovision(app))
        return app, {"host": creds.host, "port": creds.port, "user": creds.user,
                     "password": creds.password, "dbname": creds.database}

    async def test_apps_cannot_reach_each_other(self) -> None:
        """Two apps get their own database; each connects to its own and is refused
        by the other's; the password is in the URL but not in the repr."""
        shared = SharedPostgres(reactor, ADMIN_URL)
        a, ka = await self.provision(shared)
        b, kb = await self.provision(shared)
        with psycopg2.connect(**ka) as conn:
            conn.cursor().execute("CREATE TABLE t (x int)")
        with self.assertRaises(psycopg2.OperationalError) as cm:
            psycopg2.connect(**{**ka, "dbname": kb["dbname"]})
        self.assertIn("permission denied", str(cm.exception))
        old_hash = self.password_hash(ka["user"])
        creds = await shared.provision(a)  # rotation: new password, data kept
        self.assertNotIn(creds.password, repr(creds))
        self.assertTrue(creds.url.startswith(f"postgresql://{creds.user}:"))
        self.assertNotEqual(self.password_hash(ka["user"]), old_hash)
        with psycopg2.connect(**{**ka, "password": creds.password}) as conn:
            cur = conn.cursor()
            cur.execute("SELECT count(*) FROM t")
            self.assertEqual(cur.fetchone(), (0,))

    def password_hash(self, role: str) -> str:
        """The server's stored hash (this machine trusts local connections, so a
        wrong password would still connect: compare what the server stores)."""
        with psycopg2.connect(ADMIN_URL) as conn:
            cur = conn.cursor()
            cur.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s", (role,))
            return cur.fetchone()[0]

    async def test_deprovision_drops(self) -> None:
        """Removing the add-on drops the database and the role."""
        shared = SharedPostgres(reactor, ADMIN_URL)
        app, _ = await self.provision(shared)
        self.assertTrue(await shared.exists(app))
        await shared.deprovision(app)
        self.assertFalse(await shared.exists(app))


class PostgresBackupTests(TestCase):
    timeout = 180

    async def test_backup_drop_restore_identical(self) -> None:
        """backup -> drop a table -> restore -> the data is identical to before, and the
        previous live database is kept under another name."""
        shared = SharedPostgres(reactor, ADMIN_URL)
        app = app_name()
        creds = await shared.provision(app)
        self.addCleanup(lambda: shared.deprovision(app))
        kw = {"host": creds.host, "port": creds.port, "user": creds.user,
              "password": creds.password, "dbname": creds.database}
        with psycopg2.connect(**kw) as conn:
            cur = conn.cursor()
            cur.execute("CREATE TABLE items (id serial primary key, name text, data bytea)")
            cur.execute("CREATE TABLE notes (body text)")
            cur.executemany("INSERT INTO items (name, data) VALUES (%s, %s)",
                            [(f"item {i}", bytes([i % 256]) * i) for i in range(500)])
            cur.execute("INSERT INTO notes VALUES ('hello'), ('world')")
        before = table_dump(kw)

        catalog = Catalog(Path(self.mktemp()) / "backups")
        backups = PostgresBackups(reactor, ADMIN_URL)
        record = BackupRecord(id="b1", app=app, kind="postgres", created=time.time(),
                              source=creds.database)
        path = catalog.create(record)
        counts = await backups.dump(creds.database, path)
        self.assertEqual(counts, {"public.items": 500, "public.notes": 2})
        await backups.verify(path, counts)
        self.assertEqual(oct(catalog.root.stat().st_mode & 0o777), "0o700")

        with psycopg2.connect(**kw) as conn:
            conn.cursor().execute("DROP TABLE items")
        self.assertNotEqual(table_dump(kw), before)

        kept = await backups.restore(path, creds.database, creds.user, stamp="s1")
        self.addCleanup(lambda: backups.drop_database(kept))
        self.assertEqual(table_dump(kw), before)
        with psycopg2.connect(**{**kw, "user": "postgres", "dbname": kept}) as conn:
            cur = conn.cursor()
            cur.execute("SELECT count(*) FROM notes")
            self.assertEqual(cur.fetchone(), (2,))  # the pre-restore data is still there

    async def test_corrupted_backup_fails_verification(self) -> None:
        """A damaged archive is caught by verification, not reported good."""
        shared = SharedPostgres(reactor, ADMIN_URL)
        app = app_name()
        creds = await shared.provision(app)
        self.addCleanup(lambda: shared.deprovision(app))
        with psycopg2.connect(host=creds.host, port=creds.port, user=creds.user,
                              password=creds.password, dbname=creds.database) as conn:
            cur = conn.cursor()
            cur.execute("CREATE TABLE t AS SELECT g AS n, md5(g::text) AS h FROM generate_series(1, 5000) g")
        backups = PostgresBackups(reactor, ADMIN_URL)
        path = Path(self.mktemp())
        counts = await backups.dump(creds.database, path)
        digest = sha256_file(path)
        data = bytearray(path.read_bytes())
        mid = len(data) // 2
        data[mid:mid + 64] = bytes(64)
        path.write_bytes(bytes(data))
        self.assertNotEqual(sha256_file(path), digest)
        with self.assertRaises(BackupFailed) as cm:
            await backups.verify(path, counts)
        self.assertIn("failed", str(cm.exception))


class ReadinessTests(TestCase):
    timeout = 60

    async def test_not_ready_is_told_from_failed(self) -> None:
        """The probes a backup waits on, against real servers: a closed port is NotReady
        (worth waiting for), a database that does not exist or a wrong Redis password is
        a plain BackupFailed (recorded at once)."""
        from epio.backup.postgres import NotReady

        closed = free_port()
        with self.assertRaises(NotReady):
            await PostgresBackups(reactor, f"postgresql://postgres@127.0.0.1:{closed}/x").ping("x")
        with self.assertRaises(BackupFailed) as cm:
            await PostgresBackups(reactor, ADMIN_URL).ping("epio_no_such_db_" + app_name())
        self.assertNotIsInstance(cm.exception, NotReady)
        await PostgresBackups(reactor, ADMIN_URL).ping("postgres")
        with self.assertRaises(NotReady):
            await RedisBackups(reactor).key_count("127.0.0.1", closed, "pw")


class RedisBackupTests(TestCase):
    timeout = 120

    def start_redis(self, *extra: str) -> tuple[int, str]:
        """A dedicated redis-server with a password, as the platform runs per app."""
        port = free_port()
        password = secrets.token_urlsafe(16)
        work = Path(self.mktemp())
        work.mkdir()
        proc = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--requirepass", password,
             "--dir", str(work), "--save", "", "--appendonly", "no", *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.addCleanup(lambda: (proc.kill(), proc.wait()))
        for _ in range(100):
            r = subprocess.run(["redis-cli", "-p", str(port), "--no-auth-warning", "-a", password, "PING"],
                               capture_output=True, text=True)
            if r.stdout.strip() == "PONG":
                return port, password
            time.sleep(0.05)
        raise AssertionError("redis-server did not start")

    def cli(self, port: int, password: str, *args: str) -> str:
        return subprocess.run(
            ["redis-cli", "-p", str(port), "--no-auth-warning", "-a", password, *args],
            capture_output=True, text=True, check=True,
        ).stdout.strip()

    async def test_round_trip(self) -> None:
        """Snapshot pulled over the network -> verified by loading -> keys changed ->
        restore gives back exactly the snapshot's keys, values and TTLs."""
        port, password = self.start_redis()
        for i in range(300):
            self.cli(port, password, "SET", f"k{i}", f"value-{i}")
        self.cli(port, password, "HSET", "h", "a", "1", "b", "2")
        self.cli(port, password, "SET", "ttl", "x", "EX", "1000")
        backups = RedisBackups(reactor)
        path = Path(self.mktemp())
        counts = await backups.dump("127.0.0.1", port, password, path)
        self.assertEqual(counts, {"keys_min": 302, "keys_max": 302})
        self.assertEqual(await backups.verify(path, counts), 302)

        self.cli(port, password, "DEL", "k1", "h")
        self.cli(port, password, "SET", "k2", "changed")
        self.cli(port, password, "SET", "new", "extra")
        restored = await backups.restore(path, "127.0.0.1", port, password)
        self.assertEqual(restored, 302)
        self.assertEqual(self.cli(port, password, "DBSIZE"), "302")
        self.assertEqual(self.cli(port, password, "GET", "k1"), "value-1")
        self.assertEqual(self.cli(port, password, "GET", "k2"), "value-2")
        self.assertEqual(self.cli(port, password, "EXISTS", "new"), "0")
        self.assertEqual(self.cli(port, password, "HGET", "h", "b"), "2")
        self.assertGreater(int(self.cli(port, password, "TTL", "ttl")), 900)

    async def test_corrupted_rdb_detected(self) -> None:
        """A damaged RDB fails verification and is never restored."""
        port, password = self.start_redis()
        for i in range(50):
            self.cli(port, password, "SET", f"k{i}", "v" * 100)
        backups = RedisBackups(reactor)
        path = Path(self.mktemp())
        counts = await backups.dump("127.0.0.1", port, password, path)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        with self.assertRaises(BackupFailed):
            await backups.verify(path, counts)
        self.cli(port, password, "SET", "k0", "live")
        with self.assertRaises(BackupFailed):
            await backups.restore(path, "127.0.0.1", port, password)
        self.assertEqual(self.cli(port, password, "GET", "k0"), "live")


    def fill(self, port: int, password: str, n: int) -> None:
        """Keys k0..k<n-1>, 1000 bytes each, in one call."""
        self.cli(port, password, "EVAL", "for i = 0, tonumber(ARGV[1]) - 1 do "
                 "redis.call('SET', 'k' .. i, string.rep('v', 1000)) end", "0", str(n))

    async def test_wrong_password_is_not_a_server_not_ready(self) -> None:
        """A Redis that refuses the password fails the probe for good (BackupFailed,
        not NotReady): its backup is recorded failed at once, not waited for."""
        from epio.backup.postgres import NotReady

        port, password = self.start_redis()
        self.assertEqual(await RedisBackups(reactor).key_count("127.0.0.1", port, password), 0)
        with self.assertRaises(BackupFailed) as cm:
            await RedisBackups(reactor).key_count("127.0.0.1", port, "wrong-password")
        self.assertNotIsInstance(cm.exception, NotReady)

    async def test_restore_is_built_apart_then_switched(self) -> None:
        """A restore builds the snapshot's keys in database 15 and SWAPDBs it with
        database 0: refused with nothing changed while the app keeps keys in database
        15 (they are not touched) or when maxmemory cannot hold both copies; otherwise
        database 0 is the snapshot's and database 15 is empty again."""
        port, password = self.start_redis("--maxmemory", "8mb", *NO_SYNC_DELAY)
        self.fill(port, password, 200)
        backups = RedisBackups(reactor)
        path = Path(self.mktemp())
        await backups.dump("127.0.0.1", port, password, path)
        self.cli(port, password, "SET", "k0", "live")
        self.cli(port, password, "-n", "15", "SET", "mine", "app data")
        with self.assertRaises(BackupFailed) as cm:
            await backups.restore(path, "127.0.0.1", port, password)
        self.assertIn("database 15 of the app's redis holds 1 keys", str(cm.exception))
        self.assertEqual(self.cli(port, password, "-n", "15", "GET", "mine"), "app data")
        self.assertEqual(self.cli(port, password, "GET", "k0"), "live")
        self.cli(port, password, "-n", "15", "DEL", "mine")

        restored = await backups.restore(path, "127.0.0.1", port, password)
        self.assertEqual(restored, 200)
        self.assertEqual(self.cli(port, password, "GET", "k0"), "v" * 1000)
        self.assertEqual(self.cli(port, password, "-n", "15", "DBSIZE"), "0")

        # ~1.4 MB of live data + ~1.4 MB restored do not fit in 90 % of 2.5 MB
        small, pw2 = self.start_redis("--maxmemory", "2500kb", *NO_SYNC_DELAY)
        self.fill(small, pw2, 1200)
        big = Path(self.mktemp())
        await backups.dump("127.0.0.1", small, pw2, big)
        self.cli(small, pw2, "SET", "k0", "live")
        with self.assertRaises(BackupFailed) as cm:
            await backups.restore(big, "127.0.0.1", small, pw2)
        self.assertIn("cannot hold the restored data", str(cm.exception))
        self.assertEqual(self.cli(small, pw2, "GET", "k0"), "live")
        self.assertEqual(self.cli(small, pw2, "-n", "15", "DBSIZE"), "0")

    async def test_restore_keeps_the_previous_data_as_a_pinned_backup(self) -> None:
        """Through the backup manager, a Redis restore first takes a verified backup of
        the live data, pinned (kept for failed_ttl whatever the history) and named in the
        answer; restoring that one brings the pre-restore data back."""
        from epio.backup.service import BackupManager
        from epio.backup.targets import Target
        from epio.retention import RetentionPolicy

        port, password = self.start_redis(*NO_SYNC_DELAY)
        manager = BackupManager(reactor, Catalog(Path(self.mktemp())),
                                RetentionPolicy(0, 0, 0, 0, failed_ttl=3600), None, None)
        target = Target("rapp", "redis", "dedicated", "127.0.0.1", port, password=password)
        for i in range(20):
            self.cli(port, password, "SET", f"old{i}", "v")
        first = await manager.backup(target)
        self.assertEqual(first.status, "verified")
        self.cli(port, password, "FLUSHDB")
        for i in range(5):
            self.cli(port, password, "SET", f"new{i}", "v")
        kept = await manager.restore("rapp", first.id, target=target)
        self.assertRegex(kept, r"^backup \S+ \(20 keys restored\)$")
        before_id = kept.split()[1]
        before = manager.catalog.get(before_id, "rapp")
        self.assertEqual((before.status, before.counts["keys_max"]), ("verified", 5))
        self.assertEqual(before.pinned, f"the data before restoring backup {first.id}")
        self.assertEqual(self.cli(port, password, "DBSIZE"), "20")
        manager.prune("rapp", "redis")  # a policy keeping nothing: the pinned one stays
        self.assertIn(before_id, {r.id for r in manager.catalog.list("rapp")})
        await manager.restore("rapp", before_id, target=target)
        self.assertEqual(self.cli(port, password, "EXISTS", "new3", "old3"), "1")


class BackupStoreIsolationTests(TestCase):
    def test_app_user_cannot_read_backups(self) -> None:
        """A process running as an app's UID cannot list or read the backup store."""
        if os.geteuid() != 0 or shutil.which("setpriv") is None:
            raise self.skipTest("needs root and setpriv to run as another UID")
        root = Path(self.mktemp()).absolute()
        catalog = Catalog(root / "backups")
        record = BackupRecord(id="b1", app="a", kind="postgres", created=0.0)
        catalog.create(record).write_text("secret dump")
        os.chmod(root, 0o755)
        target = catalog.data_path(record)
        probe = subprocess.run(
            ["setpriv", "--reuid=20999", "--regid=20999", "--clear-groups", "cat", str(target)],
            capture_output=True, text=True, timeout=30,
        )
        self.assertNotEqual(probe.returncode, 0)
        self.assertIn("Permission denied", probe.stderr)
        listing = subprocess.run(
            ["setpriv", "--reuid=20999", "--regid=20999", "--clear-groups", "ls", str(catalog.root)],
            capture_output=True, text=True, timeout=30,
        )
        self.assertNotEqual(listing.returncode, 0)
