"""The offsite archive object (epio.backup.archive): encryption that refuses any change,
and the masking of secrets in archive commands' output."""

from __future__ import annotations

import json
import os
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from epio.backup import archive
from epio.backup.archive import ArchiveFailed, decrypt, encrypt, mask, secrets_in

KEY = bytes(range(32))


class FormatTests(SynchronousTestCase):
    def make(self, size: int) -> tuple[Path, Path, bytes]:
        data = Path(self.mktemp())
        body = os.urandom(size)
        data.write_bytes(body)
        obj = Path(self.mktemp())
        encrypt(KEY, "app/1-a.epioarc", json.dumps({"id": "1-a"}).encode(), data, obj)
        return data, obj, body

    def test_round_trip_across_chunks(self) -> None:
        """Data of 0, less than, exactly and more than one chunk (plus the record) comes
        back byte for byte with the record it was packed with; the object holds none of
        the plaintext."""
        for size in (0, 100, archive.CHUNK - 10, archive.CHUNK, 2 * archive.CHUNK + 7):
            _, obj, body = self.make(size)
            out = Path(self.mktemp())
            self.assertEqual(decrypt(KEY, "app/1-a.epioarc", obj, out), {"id": "1-a"})
            self.assertEqual(out.read_bytes(), body, size)
            if size >= 100:
                self.assertNotIn(body[:64], obj.read_bytes())

    def test_any_change_is_refused(self) -> None:
        """A flipped bit, a truncation at a chunk boundary, a dropped tail, another name
        or another key: each is refused (ArchiveFailed), never half-read as good."""
        _, obj, _ = self.make(2 * archive.CHUNK + 7)
        raw = obj.read_bytes()
        header = len(archive.MAGIC) + archive.SALT
        whole_chunk = header + archive.CHUNK + archive.TAG
        variants = {
            "bit": raw[:5000] + bytes([raw[5000] ^ 1]) + raw[5001:],
            "cut at a chunk": raw[:whole_chunk],
            "tail dropped": raw[:-1],
            "magic": b"X" + raw[1:],
        }
        for why, body in variants.items():
            tampered = Path(self.mktemp())
            tampered.write_bytes(body)
            with self.assertRaises(ArchiveFailed, msg=why):
                decrypt(KEY, "app/1-a.epioarc", tampered, Path(self.mktemp()))
        with self.assertRaises(ArchiveFailed):
            decrypt(KEY, "other/1-a.epioarc", obj, Path(self.mktemp()))
        with self.assertRaises(ArchiveFailed):
            decrypt(bytes(32), "app/1-a.epioarc", obj, Path(self.mktemp()))

    def test_short_key_is_refused(self) -> None:
        """A master key under 32 bytes is an error; 64 hex digits are 32 bytes; a key
        file others may read is refused."""
        short = Path(self.mktemp())
        short.write_text("ab" * 10)
        short.chmod(0o600)
        with self.assertRaises(ArchiveFailed):
            archive.load_key(short)
        good = Path(self.mktemp())
        good.write_text("ab" * 32 + "\n")
        good.chmod(0o600)
        self.assertEqual(archive.load_key(good), b"\xab" * 32)
        good.chmod(0o640)
        with self.assertRaises(ArchiveFailed) as cm:
            archive.load_key(good)
        self.assertIn("readable by others (mode 640)", str(cm.exception))


class MaskTests(SynchronousTestCase):
    def test_secrets_in_commands_are_masked(self) -> None:
        """URL passwords, NAME=value with a secret-like name and the values of secret-like
        options are masked wherever they appear; paths and placeholders are not."""
        cases = {
            "PGPASSWORD=pw1; cp {path} /x": "pw1",
            "rclone --s3-secret-access-key k2 copyto {path} s3:b/{name}": "k2",
            "aws --password='p 3' s3 cp": "p 3",
            "rsync -a {path} rsync://u:pw4@host/x/{name}": "pw4",
            "x --api-token=t5|cat": "t5",
        }
        for command, secret in cases.items():
            found = secrets_in(command)
            self.assertIn(secret, found, command)
            self.assertEqual(mask(f"error near {secret}!", found), "error near ***!")
        self.assertEqual(secrets_in("mkdir -p /off/{app} && cp {path} /off/{name}"), [])


class ConfigTests(SynchronousTestCase):
    def test_archive_command_needs_a_key_and_sane_backoff(self) -> None:
        """archive_command without archive_key_file, and a first retry wait above the
        longest, are start-up errors reported together."""
        from epio.config import ConfigError, validate

        with self.assertRaises(ConfigError) as cm:
            validate({"backup": {"archive_command": "cp {path} /offsite/{name}",
                                 "archive_retry_initial": 10.0, "archive_retry_max": 5.0}})
        self.assertIn("needs backup.archive_key_file", str(cm.exception))
        self.assertIn("archive_retry_initial (10) must not be above", str(cm.exception))
        validate({"backup": {"archive_command": "cp {path} /offsite/{name}",
                             "archive_key_file": "/etc/epio/archive.key"}})

    def test_s3_target_keys(self) -> None:
        """An S3 endpoint needs the bucket, the access key id, the secret key file and the
        archive key; an S3 key set without the endpoint, an endpoint with a path, a
        prefix with other characters and a part below S3's 5 MiB are refused -- all at
        once; a complete S3 target alone (no archive_command) is valid."""
        from epio.config import ConfigError, validate

        with self.assertRaises(ConfigError) as cm:
            validate({"backup": {"archive_s3_endpoint": "http://127.0.0.1:9000"}})
        for key in ("archive_key_file", "archive_s3_bucket", "archive_s3_access_key_id",
                    "archive_s3_secret_key_file"):
            self.assertIn(f"backup.archive_s3_endpoint needs backup.{key}", str(cm.exception))
        with self.assertRaises(ConfigError) as cm:
            validate({"backup": {"archive_s3_bucket": "b", "archive_s3_prefix": "a b",
                                 "archive_s3_part_mb": 4}})
        text = str(cm.exception)
        self.assertIn("archive_s3_prefix", text)
        self.assertIn("must be 5 to 5120, not 4", text)
        with self.assertRaises(ConfigError) as cm:
            validate({"backup": {"archive_s3_bucket": "b"}})
        self.assertIn("backup.archive_s3_bucket is set but backup.archive_s3_endpoint is not",
                      str(cm.exception))
        with self.assertRaises(ConfigError) as cm:
            validate({"backup": {"archive_s3_endpoint": "http://h:9000/bucket"}})
        self.assertIn("no path", str(cm.exception))
        with self.assertRaises(ConfigError) as cm:  # a credential there would be shown
            validate({"backup": {"archive_s3_endpoint": "https://AKIA:hunter2@s3.example"}})
        self.assertIn("no user:password@", str(cm.exception))
        validate({"backup": {"archive_s3_endpoint": "https://s3.eu-west-1.amazonaws.com",
                             "archive_s3_bucket": "b", "archive_s3_access_key_id": "AKIA",
                             "archive_s3_secret_key_file": "/etc/epio/s3.secret",
                             "archive_s3_prefix": "epio/", "archive_key_file": "/k"}})


class CopiesTests(SynchronousTestCase):
    def test_listing_says_where_each_copy_is(self) -> None:
        """``epio backups`` COPIES: each target's copy (archive_command's as ``archive``,
        S3's as its s3:// address), a failed one with its reason; a record from before
        copies were kept per target reads as before."""
        from epio.api.addons import describe_backup
        from epio.cli.backups import copies_text

        both = describe_backup({
            "id": "1-a", "app": "a", "kind": "postgres", "status": "verified", "local": True,
            "archive": "archived", "copies": {
                "command": {"state": "archived", "where": "archive_command (a/1-a.epioarc)"},
                "s3": {"state": "archived", "where": "s3://bk/epio/a/1-a.epioarc"}}})
        self.assertEqual([c["target"] for c in both["copies"]], ["command", "s3"])
        self.assertEqual(copies_text(both), "local, archive, s3://bk/epio/a/1-a.epioarc")
        half = describe_backup({
            "id": "1-a", "app": "a", "kind": "postgres", "status": "verified", "local": False,
            "archive": "failed", "copies": {
                "command": {"state": "failed", "error": "backup.archive_command exited 1"},
                "s3": {"state": "archived", "where": "s3://bk/a/1-a.epioarc"}}})
        self.assertEqual(copies_text(half), "s3://bk/a/1-a.epioarc (ARCHIVE FAILED: "
                                            "backup.archive_command exited 1)")
        old = describe_backup({"id": "1-a", "app": "a", "kind": "postgres",
                               "status": "verified", "archive": "failed",
                               "archive_error": "exited 2"})
        self.assertEqual(old["copies"][0]["target"], "command")
        self.assertEqual(copies_text(old), "local (ARCHIVE FAILED: exited 2)")


class FillTests(SynchronousTestCase):
    def test_placeholders_are_quoted_other_braces_kept(self) -> None:
        """{path}/{name}/{app}/{id} become shell-quoted values (a space or a quote in a
        path cannot split or end the command); other braces stay as written."""
        got = archive.fill("cp {path} /off/{name} && awk '{print}' {x}",
                           {"path": "/b/it's here", "name": "a/1.epioarc", "app": "a",
                            "id": "1"})
        self.assertEqual(got, "cp '/b/it'\"'\"'s here' /off/a/1.epioarc && awk '{print}' {x}")
