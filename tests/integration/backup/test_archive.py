"""Offsite archives of verified backups (``backup.archive_command``) on the machine's real
PostgreSQL: a plain directory stands for the offsite store, ``cp`` for the tool that
copies into it."""

from __future__ import annotations

import hashlib
import secrets
import shlex
import shutil
import time
from pathlib import Path

import psycopg2
from twisted.internet import reactor
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from epio.addons.postgres import SharedPostgres
from epio.backup.archive import Archiver, decrypt, load_key, object_name
from epio.backup.catalog import Catalog, sha256_file
from epio.backup.postgres import BackupFailed, PostgresBackups
from epio.backup.service import BackupManager
from epio.bus import Bus, RemoteError
from epio.retention import RetentionPolicy
from epio.store.service import open_store
from tests.integration.backup import test_databases as redis_helpers
from tests.store.pg import ADMIN_URL, fresh_database_for_test
from tests.util import NodeProcess, free_port, to_toml


def _drop(database: str) -> None:
    conn = psycopg2.connect(ADMIN_URL)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                    (database,))
        cur.execute(f'DROP DATABASE IF EXISTS "{database}"')
    conn.close()


def copy_into(offsite: Path) -> str:
    """An archive_command that copies the object into ``offsite`` (a password set in it,
    as an operator's real command might hold one)."""
    off = shlex.quote(str(offsite))
    return (f"RCLONE_CONFIG_PASS=Hunter2Secret mkdir -p {off}/{{app}} && "
            f"cp {{path}} {off}/{{name}}")


def fetch_from(offsite: Path) -> str:
    return f"cp {shlex.quote(str(offsite))}/{{name}} {{path}}"


class ArchiveTests(TestCase):
    timeout = 180

    def setUp(self) -> None:
        self.offsite = Path(self.mktemp()).absolute()
        self.offsite.mkdir(parents=True)
        key_file = Path(self.mktemp())
        key_file.write_text(secrets.token_hex(32))
        key_file.chmod(0o600)
        self.key = load_key(key_file)
        self.logged: list[str] = []

        def observe(event: LogEvent) -> None:
            self.logged.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    async def app_database(self, rows: int) -> tuple[str, dict]:
        shared = SharedPostgres(reactor, ADMIN_URL)
        app = "ar" + secrets.token_hex(4)
        creds = await shared.provision(app)
        self.addCleanup(lambda: shared.deprovision(app))
        dsn = dict(host=creds.host, port=creds.port, user=creds.user,
                   password=creds.password, dbname=creds.database)
        with psycopg2.connect(**dsn) as conn:
            conn.cursor().execute(
                f"CREATE TABLE ledger_private AS SELECT generate_series(1, {rows}) AS n")
        return app, dsn

    def manager(self, root: Path, archiver: Archiver | None,
                policy: RetentionPolicy | None = None,
                archive_policy: RetentionPolicy | None = None) -> BackupManager:
        return BackupManager(reactor, Catalog(root), policy or RetentionPolicy(),
                             SharedPostgres(reactor, ADMIN_URL),
                             PostgresBackups(reactor, ADMIN_URL), archiver=archiver,
                             archive_policy=archive_policy)

    def count(self, dsn: dict) -> int:
        with psycopg2.connect(**dsn) as conn:
            cur = conn.cursor()
            cur.execute("SELECT count(*) FROM ledger_private")
            return int(cur.fetchone()[0])

    async def test_archived_encrypted_pruned_and_restored_after_a_wipe(self) -> None:
        """A verified backup is copied offsite: the object is there, its sha256 is the
        recorded one, it holds no plaintext and decrypts to the backup's data.  Local
        pruning keeps the archive (and the record, local false); the archive retention
        deletes an old one offsite.  With the backup node's store wiped, a restore
        fetches the archive, checks it and brings the data back; a tampered object is
        refused and nothing is restored."""
        app, dsn = await self.app_database(100)
        root = Path(self.mktemp()).absolute()
        archiver = Archiver(reactor, self.key, copy_into(self.offsite), fetch_from(self.offsite),
                            f"rm {shlex.quote(str(self.offsite))}/{{name}}", retries=0)
        manager = self.manager(root, archiver, RetentionPolicy(1, 0, 0, 0, 3600.0),
                               RetentionPolicy(1, 0, 0, 0, 3600.0))

        first = await manager.backup_postgres(app)
        self.assertEqual((first.status, first.archive), ("verified", "archived"),
                         first.archive_error)
        obj = self.offsite / object_name(app, first.id)
        self.assertTrue(obj.exists())
        self.assertEqual(sha256_file(obj), first.archive_sha256)
        self.assertNotIn(b"ledger_private", obj.read_bytes())  # encrypted before it left
        plain = Path(self.mktemp())
        carried = decrypt(self.key, object_name(app, first.id), obj, plain)
        self.assertEqual(sha256_file(plain), first.sha256)
        self.assertEqual(carried["counts"], {"public.ledger_private": 100})
        self.assertFalse(any("Hunter2Secret" in line for line in self.logged))

        # a second backup: local retention (1 hourly) drops the first locally only
        second = await manager.backup_postgres(app)
        self.assertEqual(second.archive, "archived")
        self.assertEqual(manager.prune(app, "postgres"), 1)
        kept = manager.catalog.get(first.id, app)
        self.assertFalse(kept.local)
        self.assertFalse(manager.catalog.data_path(kept).exists())
        self.assertTrue(obj.exists(), "local pruning deleted the offsite copy")

        # the pruned one restores from its archive (fetched, checked against both sums)
        with psycopg2.connect(**dsn) as conn:
            conn.cursor().execute("DELETE FROM ledger_private WHERE n > 10")
        moved = await manager.restore(app, first.id)
        self.addCleanup(_drop, moved)
        self.assertEqual(self.count(dsn), 100)
        self.assertTrue(manager.catalog.get(first.id, app).local)

        # archive retention (1 hourly): pruned locally again, the older archive is
        # deleted offsite and forgotten; the newest stays
        self.assertEqual(manager.prune(app, "postgres"), 1)
        self.assertEqual(await manager.prune_archives(app, "postgres"), 1)
        self.assertFalse(obj.exists())
        self.assertEqual([r.id for r in manager.catalog.list(app)], [second.id])
        self.assertTrue((self.offsite / object_name(app, second.id)).exists())

        # the backup node's disk is wiped: the archive alone restores
        shutil.rmtree(root)
        fresh = self.manager(root, archiver)
        with psycopg2.connect(**dsn) as conn:
            conn.cursor().execute("DELETE FROM ledger_private")
        time.sleep(1.1)  # the kept database is named by the second
        moved = await fresh.restore(app, second.id)
        self.addCleanup(_drop, moved)
        self.assertEqual(self.count(dsn), 100)
        adopted = fresh.catalog.get(second.id, app)
        self.assertEqual((adopted.status, adopted.archive, adopted.local),
                         ("verified", "archived", True))

        # a tampered object is refused before anything is restored
        shutil.rmtree(root)
        other = self.offsite / object_name(app, second.id)
        raw = bytearray(other.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        other.write_bytes(bytes(raw))
        with psycopg2.connect(**dsn) as conn:
            conn.cursor().execute("DELETE FROM ledger_private WHERE n > 50")
        with self.assertRaises(BackupFailed) as cm:
            await self.manager(root, archiver).restore(app, second.id)
        self.assertIn("does not authenticate", str(cm.exception))
        self.assertEqual(self.count(dsn), 50)

    async def test_history_is_archived_once_the_store_answers(self) -> None:
        """Backups taken before archive_command was set, and one whose archive failed,
        are archived by a later round (oldest first) once the offsite store answers;
        while it still fails, the round stops at the first failure."""
        app, _ = await self.app_database(7)
        root = Path(self.mktemp()).absolute()
        before = await self.manager(root, None).backup_postgres(app)
        self.assertEqual((before.status, before.archive), ("verified", ""))
        down = Path(self.mktemp()).absolute()
        down.write_text("the offsite store is down")
        archiver = Archiver(reactor, self.key,
                            f"test ! -e {shlex.quote(str(down))} && " + copy_into(self.offsite),
                            retries=0)
        manager = self.manager(root, archiver)
        failed = await manager.backup_postgres(app)
        self.assertEqual((failed.archive, failed.archive_error),
                         ("failed", "backup.archive_command exited 1"))
        self.assertEqual(await manager.archive_history(app, "postgres"), 0)
        self.assertEqual(archiver.counters["archive_failed"], 2)  # stopped at the oldest
        down.unlink()
        self.assertEqual(await manager.archive_history(app, "postgres"), 2)
        for r in (before, failed):
            got = manager.catalog.get(r.id, app)
            self.assertEqual((got.archive, got.archive_error), ("archived", ""))
            self.assertEqual(sha256_file(self.offsite / object_name(app, r.id)),
                             got.archive_sha256)
        self.assertEqual(await manager.archive_history(app, "postgres"), 0)

    async def test_failing_command_is_retried_then_recorded_masked(self) -> None:
        """An archive_command exiting 1 is tried 1 + archive_retries times with a
        doubling wait; the backup stays verified, its archive is recorded failed with
        the stderr tail -- the password in the command masked there and in every log
        line."""
        app, _ = await self.app_database(5)
        command = ("PGPASSWORD=Hunter2Secret; "
                   "echo \"upload as backup:$PGPASSWORD refused by offsite\" >&2; exit 1")
        archiver = Archiver(reactor, self.key, command, retries=2, retry_initial=0.5,
                            retry_max=0.7)
        manager = self.manager(Path(self.mktemp()).absolute(), archiver)
        started = time.monotonic()
        record = await manager.backup_postgres(app)
        self.assertEqual((record.status, record.archive, record.archive_tries),
                         ("verified", "failed", 3))
        self.assertEqual(record.archive_error,
                         "backup.archive_command exited 1: upload as backup:*** refused "
                         "by offsite")
        self.assertGreaterEqual(time.monotonic() - started, 0.5 + 0.7)  # waited 0.5 then 0.7
        self.assertEqual(archiver.counters["archive_retries"], 2)
        self.assertEqual(manager.catalog.get(record.id, app).archive, "failed")
        joined = "\n".join(self.logged)
        self.assertIn("try 1 of 3 failed", joined)
        self.assertIn("FAILED after 3 tries", joined)
        self.assertNotIn("Hunter2Secret", joined)
        self.assertEqual(list(self.offsite.iterdir()), [])


class ArchiveNodeTests(TestCase):
    timeout = 180

    async def test_backup_node_archives_and_restores_after_wipe(self) -> None:
        """A real backup node with backup.archive_command and the S3 target
        (backup.archive_s3_*, on moto): backup.create answers a verified backup archived
        to both, each object with its recorded sha256; its backup store wiped,
        backup.adopt brings it back from the archive, and with the command's copy gone
        too backup.restore brings the data back from S3 alone; the command's password
        and the S3 secret never reach the node's log."""
        from tests.integration.backup.moto import REGION, moto_server

        moto = moto_server()
        bucket = "epio-" + secrets.token_hex(6)
        moto.create_bucket(bucket)
        s3_secret = Path(self.mktemp()).absolute()
        s3_secret.parent.mkdir(parents=True, exist_ok=True)
        s3_secret.write_text(moto.secret_key + "\n")
        s3_secret.chmod(0o600)
        store_url = fresh_database_for_test(self)
        secret = Path(self.mktemp()).absolute()
        secret.parent.mkdir(parents=True, exist_ok=True)
        secret.write_text(secrets.token_hex(32))
        secret.chmod(0o600)
        key = Path(self.mktemp()).absolute()
        key.write_text(secrets.token_hex(32))
        key.chmod(0o600)
        offsite = Path(self.mktemp()).absolute()
        offsite.mkdir(parents=True)
        control = f"tcp://127.0.0.1:{free_port()}"
        node = NodeProcess(["--role=backup"], config=to_toml({
            "store": {"url": store_url},
            "cluster": {"secret_file": str(secret)},
            "backup": {"interval": 3600.0, "control_bind": control,
                       "archive_command": copy_into(offsite),
                       "fetch_command": fetch_from(offsite),
                       "archive_key_file": str(key), "archive_retries": 1,
                       "archive_retry_initial": 0.2, "archive_retry_max": 0.2,
                       "archive_s3_endpoint": moto.endpoint, "archive_s3_bucket": bucket,
                       "archive_s3_region": REGION,
                       "archive_s3_access_key_id": moto.access_key_id,
                       "archive_s3_secret_key_file": str(s3_secret),
                       "archive_s3_prefix": "epio-", "archive_s3_part_mb": 5,
                       "archive_s3_timeout": 30.0},
            "addons": {"postgres_admin_url": ADMIN_URL},
        }))
        self.addCleanup(node.cleanup)
        node.wait_for_log("service backup started")
        shared = SharedPostgres(reactor, ADMIN_URL)
        app = "an" + secrets.token_hex(4)
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
        self.assertEqual((made["status"], made["archive"]), ("verified", "archived"),
                         made["archive_error"])
        obj = offsite / object_name(app, made["id"])
        self.assertEqual(sha256_file(obj), made["copies"]["command"]["sha256"])
        s3_key = "epio-" + object_name(app, made["id"])
        self.assertEqual(made["copies"]["s3"]["where"], f"s3://{bucket}/{s3_key}")
        in_s3 = moto.boto().get_object(Bucket=bucket, Key=s3_key)["Body"].read()
        self.assertEqual(hashlib.sha256(in_s3).hexdigest(), made["copies"]["s3"]["sha256"])

        shutil.rmtree(node.data_dir / "backups" / app)
        listing = await dealer.request("backup.list", {"app": app})
        self.assertEqual(listing.body["backups"], [])
        adopted = await dealer.request("backup.adopt", {"app": app, "id": made["id"]},
                                       timeout=60)
        self.assertEqual(adopted.body["backup"]["sha256"], made["sha256"])
        shutil.rmtree(node.data_dir / "backups" / app)  # restore fetches it itself too
        obj.unlink()  # and only S3 holds it now
        with psycopg2.connect(**dsn) as conn:
            conn.cursor().execute("DELETE FROM t")
        reply = await dealer.request("backup.restore", {"app": app, "id": made["id"]},
                                     timeout=60)
        self.addCleanup(_drop, reply.body["kept_as"])
        with psycopg2.connect(**dsn) as conn:
            cur = conn.cursor()
            cur.execute("SELECT count(*) FROM t")
            self.assertEqual(cur.fetchone(), (42,))
        # a download of a backup whose local copy is gone fetches it from the archive
        shutil.rmtree(node.data_dir / "backups" / app)
        chunk = await dealer.request("backup.fetch", {"app": app, "id": made["id"],
                                                      "offset": 0}, timeout=60)
        self.assertEqual(chunk.body["sha256"], made["sha256"])
        self.assertTrue(chunk.body["eof"])
        self.assertEqual(hashlib.sha256(chunk.body["data"]).hexdigest(), made["sha256"])
        with self.assertRaises(RemoteError) as cm:
            await dealer.request("backup.adopt", {"app": app, "id": "0000000001-abcdef"},
                                 timeout=60)
        self.assertEqual(cm.exception.code, "backup_not_found")
        self.assertNotIn("Hunter2Secret", node.output())
        self.assertNotIn(moto.secret_key, node.output())
        self.assertIn("copied offsite", node.output())
        self.assertIn(f"from s3://{bucket}/{s3_key}", node.output())


    async def test_scheduled_round_archives_the_history(self) -> None:
        """A backup node's scheduled round archives its new backup, then the backups
        taken before backup.archive_command was set (historical ones too): a node
        without archives makes one, the same node restarted with archives makes a second
        and both end up offsite, each decrypting to its backup's data."""
        store_url = fresh_database_for_test(self)
        store = await open_store(store_url, reactor)
        self.addCleanup(store.close)
        user = await store.create_user("owner")
        app = "ah" + secrets.token_hex(4)
        await store.create_app(app, user.id)
        shared = SharedPostgres(reactor, ADMIN_URL)
        creds = await shared.provision(app)
        self.addCleanup(lambda: shared.deprovision(app))
        with psycopg2.connect(host=creds.host, port=creds.port, user=creds.user,
                              password=creds.password, dbname=creds.database) as conn:
            conn.cursor().execute("CREATE TABLE t AS SELECT generate_series(1, 9) AS n")
        secret = Path(self.mktemp()).absolute()
        secret.parent.mkdir(parents=True, exist_ok=True)
        secret.write_text(secrets.token_hex(32))
        secret.chmod(0o600)
        key = Path(self.mktemp()).absolute()
        key.write_text(secrets.token_hex(32))
        key.chmod(0o600)
        offsite = Path(self.mktemp()).absolute()
        offsite.mkdir(parents=True)
        data_dir = Path(self.mktemp()).absolute() / "data"

        def node(archive: dict) -> NodeProcess:
            n = NodeProcess(["--role=backup"], data_dir=data_dir, config=to_toml({
                "store": {"url": store_url}, "cluster": {"secret_file": str(secret)},
                "backup": {"interval": 3600.0,
                           "control_bind": f"tcp://127.0.0.1:{free_port()}", **archive},
                "addons": {"postgres_admin_url": ADMIN_URL}}))
            self.addCleanup(n.cleanup)
            return n

        plain = node({})
        plain.wait_for_log("backup round done: 1 backed up", timeout=60)
        plain.stop()
        catalog = Catalog(data_dir / "backups")
        [old] = catalog.list(app)
        self.assertEqual((old.status, old.archive), ("verified", ""))
        archiving = node({"archive_command": copy_into(offsite), "archive_key_file": str(key)})
        archiving.wait_for_log("backup round done: 1 backed up", timeout=60)
        self.assertIn(f"archive of backup {old.id} of {app} copied offsite", archiving.output())
        # (both in one hour, the retentions -- 24 hourly -- keep only the newer one's
        # record; the older one's archive stays offsite: no archive_delete_command)
        new = catalog.list(app)[0]
        self.assertNotEqual(new.id, old.id)
        self.assertEqual((new.status, new.archive), ("verified", "archived"))
        self.assertEqual(sha256_file(offsite / object_name(app, new.id)), new.archive_sha256)
        plain_copy = Path(self.mktemp())
        decrypt(load_key(key), object_name(app, old.id), offsite / object_name(app, old.id),
                plain_copy)
        self.assertEqual(sha256_file(plain_copy), old.sha256)


class RedisArchiveTests(TestCase):
    timeout = 120
    start_redis = redis_helpers.RedisBackupTests.start_redis
    cli = redis_helpers.RedisBackupTests.cli

    async def test_redis_backup_restores_from_the_archive_alone(self) -> None:
        """A dedicated Redis backup is archived like a PostgreSQL one; with the backup
        node's store wiped and the keys flushed, a restore from the archive brings the
        keys back."""
        from epio.backup.targets import Target

        port, password = self.start_redis(*redis_helpers.NO_SYNC_DELAY)
        for i in range(50):
            self.cli(port, password, "SET", f"k{i}", f"v{i}")
        offsite = Path(self.mktemp()).absolute()
        offsite.mkdir(parents=True)
        key = Path(self.mktemp())
        key.write_text(secrets.token_hex(32))
        key.chmod(0o600)
        archiver = Archiver(reactor, load_key(key), copy_into(offsite), fetch_from(offsite),
                            retries=0)
        root = Path(self.mktemp()).absolute()
        app = "rd" + secrets.token_hex(4)
        target = Target(app, "redis", "dedicated", "127.0.0.1", port, password=password)
        made = await BackupManager(reactor, Catalog(root), RetentionPolicy(), None, None,
                                   archiver=archiver).backup(target)
        self.assertEqual((made.status, made.archive), ("verified", "archived"))
        self.assertNotIn(password.encode(), (offsite / object_name(app, made.id)).read_bytes())

        shutil.rmtree(root)
        self.cli(port, password, "FLUSHDB")
        fresh = BackupManager(reactor, Catalog(root), RetentionPolicy(), None, None,
                              archiver=archiver)
        await fresh.restore(app, made.id, target=target)
        self.assertEqual(self.cli(port, password, "DBSIZE"), "50")
        self.assertEqual(self.cli(port, password, "GET", "k7"), "v7")
