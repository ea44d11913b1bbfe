"""Offsite archives of verified backups: encrypted on the backup node, copied by an
operator-given command.

After a backup is verified, the backup node packs its record and data into one
object, encrypts it (below) and runs ``backup.archive_command`` to copy it offsite
(``rsync``, ``rclone copyto``, ``aws s3 cp`` ...; the tool and its credentials live
on the backup node only -- app runners and database servers never hold them).  A
failed command is tried again ``backup.archive_retries`` times, waiting
``backup.archive_retry_initial`` seconds, doubling, at most ``archive_retry_max``;
then the backup's archive is recorded as failed with the tail of the command's
stderr.  ``backup.fetch_command`` brings an object back for a restore when the local
copy is gone (pruned, or the node's disk wiped); ``archive_delete_command`` removes
one that the archive retention drops.

**Object format** (``<app>/<id>.epioarc``): ``MAGIC`` (8 bytes), a random 16-byte
salt, then the plaintext -- a 4-byte big-endian length, the record's JSON, the
backup's data -- in AES-256-GCM chunks of :data:`CHUNK` bytes (each followed by its
16-byte tag).  The key is HKDF-SHA256 of the operator's master key
(``backup.archive_key_file``) with the salt, bound to the object's name; chunk ``i``'s
nonce is ``i`` (11 bytes) plus a final-chunk flag, and every chunk authenticates the
header and the name.  So an object altered, truncated, reordered or renamed is
refused when it is fetched, before anything is restored; its plaintext must then
also match the record's sha256.

**Secrets in commands**: commands are never logged.  Their output (kept as the
reason of a failed archive, and logged) is masked: the values of options and
``NAME=value`` assignments whose names contain pass, secret, token, key, auth or
credential, and URL passwords (``scheme://user:PASSWORD@``), become ``***``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import shlex
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from epio.backup import proc
from epio.backup.catalog import BackupRecord, sha256_file

MAGIC = b"EPIOARC1"
SALT = 16
TAG = 16
CHUNK = 1 << 20
SUFFIX = ".epioarc"
MIN_KEY = 32
STDERR_TAIL = 300  # characters of a failed command's stderr kept as its reason

_SECRET_NAME = r"[\w.-]*(?:pass|secret|token|key|auth|credential)[\w.-]*"
_SECRET_PATTERNS = (
    re.compile(r"://[^/\s:@]*:([^@\s/]+)@"),  # URL password
    re.compile(r"(?i)(?:^|[\s;&|(])-{0,2}" + _SECRET_NAME
               + r"=(\"[^\"]*\"|'[^']*'|[^\s;&|)]+)"),
    re.compile(r"(?i)(?:^|[\s;&|(])--?" + _SECRET_NAME
               + r"\s+(\"[^\"]*\"|'[^']*'|[^\s;&|)-][^\s;&|)]*)"),
)


class ArchiveFailed(Exception):
    """An archive could not be written, fetched or read; ``str()`` is safe to show."""

    code = "archive_failed"


class ArchiveNotFetched(ArchiveFailed):
    """``backup.fetch_command`` failed (no such object, or the store unreachable)."""


def secrets_in(command: str) -> list[str]:
    """The values in ``command`` that look like secrets (see the module docstring)."""
    found: list[str] = []
    for pattern in _SECRET_PATTERNS:
        for m in pattern.finditer(command):
            value = m.group(1)
            found.append(value)
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                found.append(value[1:-1])
    # the longest first, so that no secret is left half-masked by a shorter one
    return sorted({s for s in found if s}, key=len, reverse=True)


def mask(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


_PLACEHOLDER = re.compile(r"\{(path|name|app|id)\}")


def fill(template: str, values: Mapping[str, str]) -> str:
    """``template`` with ``{path}``, ``{name}``, ``{app}`` and ``{id}`` replaced by their
    shell-quoted values; any other brace (``awk '{print}'``) is left as it is."""
    return _PLACEHOLDER.sub(lambda m: shlex.quote(values[m.group(1)]), template)


def load_key(path: Path) -> bytes:
    """The master key in ``path``: hex (64+ digits) or at least :data:`MIN_KEY` raw bytes;
    refused when others may read the file (as the cluster secret is)."""
    mode = path.stat().st_mode
    if mode & 0o077:
        raise ArchiveFailed(f"backup.archive_key_file {path} is readable by others (mode "
                            f"{mode & 0o777:o}); run: chmod 600 {path}")
    raw = path.read_bytes().strip()
    try:
        key = bytes.fromhex(raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        key = raw
    if len(key) < MIN_KEY:
        raise ArchiveFailed(f"backup.archive_key_file holds {len(key)} bytes; at least "
                            f"{MIN_KEY} are needed")
    return key


def object_name(app: str, backup_id: str) -> str:
    return f"{app}/{backup_id}{SUFFIX}"


def _key(master: bytes, salt: bytes, name: str) -> AESGCM:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt,
                info=b"epio backup archive v1|" + name.encode())
    return AESGCM(hkdf.derive(master))


def _nonce(i: int, final: bool) -> bytes:
    return i.to_bytes(11, "big") + (b"\x01" if final else b"\x00")


class _Prefixed:
    """``prefix`` then the file: reads of exactly ``n`` bytes until the end."""

    def __init__(self, prefix: bytes, f: Any) -> None:
        self.prefix = prefix
        self.f = f

    def read(self, n: int) -> bytes:
        out, self.prefix = self.prefix[:n], self.prefix[n:]
        while len(out) < n:
            more = self.f.read(n - len(out))
            if not more:
                break
            out += more
        return bytes(out)


def encrypt(master: bytes, name: str, meta: bytes, data: Path, dest: Path) -> str:
    """Write the archive object of ``meta`` + ``data`` to ``dest``; return its sha256."""
    salt = os.urandom(SALT)
    header = MAGIC + salt
    aad = header + name.encode()
    aes = _key(master, salt, name)
    digest = hashlib.sha256(header)
    with open(data, "rb") as f, open(dest, "wb") as out:
        out.write(header)
        src = _Prefixed(struct.pack(">I", len(meta)) + meta, f)
        pending = src.read(CHUNK)
        i = 0
        while True:
            nxt = src.read(CHUNK)
            block = aes.encrypt(_nonce(i, not nxt), pending, aad)
            out.write(block)
            digest.update(block)
            if not nxt:
                break
            pending, i = nxt, i + 1
    return digest.hexdigest()


def decrypt(master: bytes, name: str, src: Path, data: Path) -> dict[str, Any]:
    """Check and decrypt archive object ``src`` (of ``name``): write the data to ``data``
    and return the record; :class:`ArchiveFailed` if anything does not authenticate."""
    with open(src, "rb") as f, open(data, "wb") as out:
        header = f.read(len(MAGIC) + SALT)
        if len(header) != len(MAGIC) + SALT or not hmac.compare_digest(header[:8], MAGIC):
            raise ArchiveFailed(f"archive {name} is not an epio archive; refusing")
        aes = _key(master, header[8:], name)
        aad = header + name.encode()
        meta: bytes | None = None
        head = b""
        block = f.read(CHUNK + TAG)
        i = 0
        while True:
            nxt = f.read(CHUNK + TAG)
            try:
                plain = aes.decrypt(_nonce(i, not nxt), block, aad)
            except InvalidTag:
                raise ArchiveFailed(f"archive {name} does not authenticate (altered, "
                                    "truncated, or another key); refusing") from None
            if meta is None:
                head += plain
                if len(head) >= 4 and len(head) >= 4 + struct.unpack(">I", head[:4])[0]:
                    n = struct.unpack(">I", head[:4])[0]
                    meta, plain = head[4:4 + n], head[4 + n:]
                else:
                    plain = b""
            out.write(plain)
            if not nxt:
                break
            block, i = nxt, i + 1
    if meta is None:
        raise ArchiveFailed(f"archive {name} holds no record; refusing")
    record: dict[str, Any] = json.loads(meta)
    return record


class Archiver:
    """Writes, fetches and deletes the offsite archives of one backup node."""

    log = Logger()

    def __init__(self, reactor: Any, key: bytes, command: str, fetch_command: str = "",
                 delete_command: str = "", retries: int = 3, retry_initial: float = 5.0,
                 retry_max: float = 300.0, timeout: float = 3600.0) -> None:
        self.reactor = reactor
        self._key = key
        self.command = command
        self.fetch_command = fetch_command
        self.delete_command = delete_command
        self.retries = retries
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.timeout = timeout
        self._secrets = secrets_in(" ".join((command, fetch_command, delete_command)))
        self.counters = {"archived": 0, "archive_failed": 0, "archive_retries": 0,
                         "archive_fetched": 0, "archive_deleted": 0}

    def _env(self) -> Mapping[str, str]:
        return {k: v for k, v in os.environ.items()
                if k in ("PATH", "HOME", "USER", "LANG", "TMPDIR")}

    async def _thread(self, f: Any, *args: Any) -> Any:
        return await deferToThreadPool(self.reactor, self.reactor.getThreadPool(), f, *args)

    async def _run_once(self, which: str, template: str, values: dict[str, str]) -> str:
        """Run one command; "" when it succeeded, else why not (masked)."""
        command = fill(template, values)
        d: Deferred[tuple[bytes, bytes, int]] = proc.run(
            self.reactor, ["/bin/sh", "-c", command], self._env())
        d.addTimeout(self.timeout, self.reactor)
        try:
            _, err, code = await d
        except (TimeoutError, DeferredTimeout):
            return f"backup.{which} timed out after {self.timeout:g}s (backup.step_timeout)"
        if code == 0:
            return ""
        tail = err.decode("utf-8", "replace").strip()[-STDERR_TAIL:]
        return mask(f"backup.{which} exited {code}" + (f": {tail}" if tail else ""),
                    self._secrets)

    async def _run(self, which: str, template: str, values: dict[str, str],
                   what: str) -> tuple[str, int]:
        """Run a command with the retries: ("", tries) or (the last reason, tries)."""
        delay = self.retry_initial
        tries = 0
        while True:
            tries += 1
            why = await self._run_once(which, template, values)
            if not why:
                return "", tries
            if tries > self.retries:
                return why, tries
            self.counters["archive_retries"] += 1
            self.log.warn("{what}: try {n} of {of} failed, again in {delay:g}s: {why}",
                          what=what, n=tries, of=self.retries + 1, delay=delay, why=why)
            await deferLater(self.reactor, delay, lambda: None)
            delay = min(delay * 2, self.retry_max)

    async def archive(self, record: BackupRecord, data: Path, workdir: Path) -> None:
        """Encrypt and copy one verified backup offsite; record the outcome on ``record``
        (``archive``: ``archived`` or ``failed`` with ``archive_error``).  Never raises
        but for a cancellation."""
        name = object_name(record.app, record.id)
        meta = json.dumps(record.to_json(), sort_keys=True).encode()
        tmp = workdir / f"{record.id}{SUFFIX}"
        what = f"archive of backup {record.id} of {record.app}"
        try:
            digest = await self._thread(encrypt, self._key, name, meta, data, tmp)
            why, tries = await self._run("archive_command", self.command,
                                         {"path": str(tmp), "name": name, "app": record.app,
                                          "id": record.id}, what)
        except CancelledError:
            raise
        except OSError as e:
            why, tries = f"cannot write the archive: {e.strerror or type(e).__name__}", 0
        finally:
            tmp.unlink(missing_ok=True)
        record.archive_tries = tries
        record.archive_name = name
        if why:
            record.archive, record.archive_error = "failed", why
            self.counters["archive_failed"] += 1
            self.log.error("{what} FAILED after {tries} tries: {why}", what=what, tries=tries,
                           why=why)
            return
        record.archive, record.archive_error = "archived", ""
        record.archive_sha256 = digest
        record.archived = self.reactor.seconds()
        self.counters["archived"] += 1
        self.log.info("{what} copied offsite as {name}", what=what, name=name)

    async def fetch(self, app: str, backup_id: str, dest: Path,
                    expected_sha256: str = "", retry: bool = True) -> dict[str, Any]:
        """Fetch archive ``<app>/<id>``, check it and write its data to ``dest``; return
        the record it carries.  :class:`ArchiveFailed` when it cannot be had or is refused.
        ``retry`` False: one try (an ID nobody knows may well not exist: answer soon)."""
        if not self.fetch_command:
            raise ArchiveFailed(f"backup {backup_id} has no local copy and "
                                "backup.fetch_command is not set")
        name = object_name(app, backup_id)
        tmp = dest.with_name(dest.name + SUFFIX)
        what = f"fetch of archive {name}"
        try:
            values = {"path": str(tmp), "name": name, "app": app, "id": backup_id}
            if retry:
                why, _ = await self._run("fetch_command", self.fetch_command, values, what)
            else:
                why = await self._run_once("fetch_command", self.fetch_command, values)
            if why:
                raise ArchiveNotFetched(f"backup {backup_id}: {why}")
            if not tmp.exists():
                raise ArchiveFailed(f"backup {backup_id}: backup.fetch_command wrote no file")
            if expected_sha256 and await self._thread(sha256_file, tmp) != expected_sha256:
                raise ArchiveFailed(f"archive {name} does not match its recorded checksum; "
                                    "refusing")
            record: dict[str, Any] = await self._thread(decrypt, self._key, name, tmp, dest)
        except BaseException:
            dest.unlink(missing_ok=True)
            raise
        finally:
            tmp.unlink(missing_ok=True)
        if (record.get("app"), record.get("id")) != (app, backup_id):
            dest.unlink(missing_ok=True)
            raise ArchiveFailed(f"archive {name} holds another backup; refusing")
        if await self._thread(sha256_file, dest) != record.get("sha256"):
            dest.unlink(missing_ok=True)
            raise ArchiveFailed(f"archive {name}: the data does not match the backup's "
                                "sha256; refusing")
        self.counters["archive_fetched"] += 1
        self.log.info("{what}: checked, {size} bytes", what=what, size=dest.stat().st_size)
        return record

    async def delete(self, app: str, backup_id: str) -> bool:
        """Delete an archive the archive retention dropped; False if it could not be."""
        if not self.delete_command:
            return True  # the offsite store's own lifecycle decides
        name = object_name(app, backup_id)
        why, _ = await self._run("archive_delete_command", self.delete_command,
                                 {"name": name, "app": app, "id": backup_id, "path": ""},
                                 f"deletion of archive {name}")
        if why:
            self.log.error("archive {name} could not be deleted: {why}", name=name, why=why)
            return False
        self.counters["archive_deleted"] += 1
        return True
