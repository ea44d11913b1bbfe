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


class FillTests(SynchronousTestCase):
    def test_placeholders_are_quoted_other_braces_kept(self) -> None:
        """{path}/{name}/{app}/{id} become shell-quoted values (a space or a quote in a
        path cannot split or end the command); other braces stay as written."""
        got = archive.fill("cp {path} /off/{name} && awk '{print}' {x}",
                           {"path": "/b/it's here", "name": "a/1.epioarc", "app": "a",
                            "id": "1"})
        self.assertEqual(got, "cp '/b/it'\"'\"'s here' /off/a/1.epioarc && awk '{print}' {x}")
