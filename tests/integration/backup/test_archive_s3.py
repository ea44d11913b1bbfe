"""The S3 archive target (``backup.archive_s3_*``) against a real S3-compatible server:
moto in server mode, checking every request's SigV4 signature (tests/integration/backup/
moto.py), and the machine's real PostgreSQL."""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import socket
import time
from pathlib import Path

import psycopg2
from twisted.internet import reactor
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from epio.api.addons import describe_backup
from epio.backup.archive import Archiver, decrypt, load_key, object_name
from epio.backup.catalog import sha256_file
from epio.backup.postgres import BackupFailed
from epio.backup.s3 import META_SHA256, S3Client, S3Error, S3Refused
from epio.cli.backups import copies_text
from epio.retention import RetentionPolicy
from tests.integration.backup import test_archive
from tests.integration.backup.moto import MIN_PART, REGION, Moto, moto_server


def s3_client(moto: Moto, bucket: str, prefix: str = "", part_size: int = 16 << 20,
              timeout: float = 30.0, secret: str | None = None) -> S3Client:
    return S3Client(reactor, moto.endpoint, bucket, moto.access_key_id,
                    moto.secret_key if secret is None else secret, REGION, prefix, part_size,
                    timeout)


class S3ArchiveTests(TestCase):
    timeout = 180
    app_database = test_archive.ArchiveTests.app_database
    manager = test_archive.ArchiveTests.manager
    count = test_archive.ArchiveTests.count

    def setUp(self) -> None:
        self.moto = moto_server()
        self.bucket = "epio-" + secrets.token_hex(6)
        self.moto.create_bucket(self.bucket)
        key_file = Path(self.mktemp())
        key_file.write_text(secrets.token_hex(32))
        key_file.chmod(0o600)
        self.key = load_key(key_file)
        self.logged: list[str] = []

        def observe(event: LogEvent) -> None:
            self.logged.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def client(self, **kw: object) -> S3Client:
        c = s3_client(self.moto, self.bucket, **kw)  # type: ignore[arg-type]
        self.addCleanup(c.close)
        return c

    async def test_round_trip_both_targets_retention_wipe_and_tampering(self) -> None:
        """With archive_command and S3 both configured, a verified backup is copied to
        each (each copy recorded, listed by ``epio backups``); the S3 object is encrypted,
        its sha256 the recorded one.  The archive retention deletes an old object from
        S3 (and the command's store).  The backup node's store wiped, a node with only the
        S3 target restores from S3 alone.  A tampered S3 object is refused -- by its
        upload checksum, and (checksum forged too) by its authentication -- and nothing is
        restored."""
        app, dsn = await self.app_database(100)
        offsite = Path(self.mktemp()).absolute()
        offsite.mkdir(parents=True)
        prefix = "t" + secrets.token_hex(3) + "-"
        s3 = self.client(prefix=prefix)
        archiver = Archiver(reactor, self.key, test_archive.copy_into(offsite),
                            test_archive.fetch_from(offsite),
                            f"rm {offsite}/{{name}}", retries=0, s3=s3)
        root = Path(self.mktemp()).absolute()
        one = RetentionPolicy(1, 0, 0, 0, 3600.0)
        manager = self.manager(root, archiver, one, one)

        first = await manager.backup_postgres(app)
        self.assertEqual((first.status, first.archive), ("verified", "archived"),
                         first.archive_error)
        name = object_name(app, first.id)
        self.assertEqual(sorted(first.copies), ["command", "s3"])
        self.assertEqual(first.copies["s3"]["where"], f"s3://{self.bucket}/{prefix}{name}")
        listed = {o.key: o.size for o in await s3.list()}
        self.assertEqual(set(listed), {name})
        got = Path(self.mktemp())
        await s3.get_file(name, got)
        self.assertEqual(sha256_file(got), first.copies["s3"]["sha256"])
        self.assertNotIn(b"ledger_private", got.read_bytes())
        plain = Path(self.mktemp())
        self.assertEqual(decrypt(self.key, name, got, plain)["id"], first.id)
        self.assertEqual(sha256_file(plain), first.sha256)
        shown = describe_backup(first.to_json())
        self.assertEqual(copies_text(shown),
                         f"local, archive, s3://{self.bucket}/{prefix}{name}")

        # the second backup; local retention drops the first's data, the archive
        # retention then deletes the first from S3 and the command's store
        second = await manager.backup_postgres(app)
        self.assertEqual(second.archive, "archived", second.archive_error)
        self.assertEqual(manager.prune(app, "postgres"), 1)
        self.assertEqual(await manager.prune_archives(app, "postgres"), 1)
        self.assertEqual({o.key for o in await s3.list()}, {object_name(app, second.id)})
        self.assertFalse((offsite / name).exists())

        # wiped: a node with the S3 target alone restores from S3 alone
        shutil.rmtree(root)
        shutil.rmtree(offsite)
        s3_only = Archiver(reactor, self.key, retries=0, s3=s3)
        fresh = self.manager(root, s3_only)
        with psycopg2.connect(**dsn) as conn:
            conn.cursor().execute("DELETE FROM ledger_private")
        moved = await fresh.restore(app, second.id)
        self.addCleanup(test_archive._drop, moved)
        self.assertEqual(self.count(dsn), 100)
        adopted = fresh.catalog.get(second.id, app)
        self.assertEqual((adopted.status, adopted.archive, adopted.local, adopted.held_by()),
                         ("verified", "archived", True, ["s3"]))

        # tampered in S3: one flipped byte is refused by the upload's checksum; with the
        # checksum forged to match, by the authentication; the database is untouched
        boto = self.moto.boto()
        key = prefix + object_name(app, second.id)
        raw = bytearray(boto.get_object(Bucket=self.bucket, Key=key)["Body"].read())
        raw[len(raw) // 2] ^= 0x01
        with psycopg2.connect(**dsn) as conn:
            conn.cursor().execute("DELETE FROM ledger_private WHERE n > 50")
        for forged in (False, True):
            meta = {META_SHA256[len("x-amz-meta-"):]: hashlib.sha256(raw).hexdigest()
                    } if forged else {}
            if not forged:
                head = boto.head_object(Bucket=self.bucket, Key=key)
                meta = head["Metadata"]
            boto.put_object(Bucket=self.bucket, Key=key, Body=bytes(raw), Metadata=meta)
            shutil.rmtree(root, ignore_errors=True)
            with self.assertRaises(BackupFailed) as cm:
                await self.manager(root, s3_only).restore(app, second.id)
            self.assertIn("does not authenticate" if forged else
                          "does not match the sha256 it was uploaded with",
                          str(cm.exception))
            self.assertEqual(self.count(dsn), 50)
        self.assertFalse(any(self.moto.secret_key in line for line in self.logged))

    async def test_multipart_ranges_timeout_and_refused_signature(self) -> None:
        """An object above the part size goes up as a multipart upload and comes back in
        ranges, byte for byte; a tampered download is refused; a wrong secret is refused
        by the server (its signature) and never shown; a store that does not answer fails
        after backup.archive_s3_timeout."""
        s3 = self.client(part_size=MIN_PART)
        path = Path(self.mktemp())
        path.write_bytes(os.urandom(2 * MIN_PART + 123))
        digest = sha256_file(path)
        await s3.put_file("a/big.epioarc", path, digest)
        self.assertIn("multipart upload of a/big.epioarc: 3 parts", "\n".join(self.logged))
        self.assertEqual([(o.key, o.size) for o in await s3.list("a")],
                         [("a/big.epioarc", 2 * MIN_PART + 123)])
        back = Path(self.mktemp())
        self.assertEqual(await s3.get_file("a/big.epioarc", back), digest)
        self.assertEqual(sha256_file(back), digest)
        small = Path(self.mktemp())
        small.write_bytes(b"x" * 100)
        await s3.put_file("a/small.epioarc", small, "0" * 64)  # a sha256 not its own
        with self.assertRaises(S3Refused):
            await s3.get_file("a/small.epioarc", back)
        self.assertFalse(back.exists())
        await s3.delete("a/big.epioarc")
        await s3.delete("a/big.epioarc")  # already gone: no error
        self.assertEqual([o.key for o in await s3.list("a")], ["a/small.epioarc"])

        wrong = self.client(secret="not-" + self.moto.secret_key)
        with self.assertRaises(S3Error) as cm:
            await wrong.list()
        self.assertIn("HTTP 403 SignatureDoesNotMatch", str(cm.exception))
        self.assertNotIn(self.moto.secret_key, str(cm.exception))

        silent = socket.socket()
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        self.addCleanup(silent.close)
        dead = S3Client(reactor, f"http://127.0.0.1:{silent.getsockname()[1]}", self.bucket,
                        "AKIA", "secret", timeout=0.5)
        self.addCleanup(dead.close)
        started = time.monotonic()
        with self.assertRaises(S3Error) as cm:
            await dead.list()
        self.assertIn("no answer within 0.5s (backup.archive_s3_timeout)", str(cm.exception))
        self.assertLess(time.monotonic() - started, 5)
