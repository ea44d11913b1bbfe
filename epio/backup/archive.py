"""Offsite archives of verified backups: encrypted on the backup node, copied to each
archive target -- an S3-compatible store (``backup.archive_s3_*``, :mod:`epio.backup.s3`)
and/or an operator-given command -- each copy recorded on its own (``record.copies``).

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
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from attrs import frozen
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
from epio.backup.s3 import S3Client, S3Error, S3NotFound, S3Refused
from epio.config.settings import BackupSettings

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


def load_secret(path: Path, what: str) -> str:
    """A secret kept in a file (``backup.archive_s3_secret_key_file``): refused when
    others may read the file, or when it is empty."""
    mode = path.stat().st_mode
    if mode & 0o077:
        raise ArchiveFailed(f"{what} {path} is readable by others (mode {mode & 0o777:o}); "
                            f"run: chmod 600 {path}")
    secret = path.read_text().strip()
    if not secret:
        raise ArchiveFailed(f"{what} {path} is empty")
    return secret


def s3_client(reactor: Any, settings: BackupSettings) -> S3Client:
    """The S3 archive target of ``backup.archive_s3_*`` (its secret read from its file)."""
    secret = load_secret(Path(settings.archive_s3_secret_key_file),
                         "backup.archive_s3_secret_key_file")
    return S3Client(reactor, settings.archive_s3_endpoint, settings.archive_s3_bucket,
                    settings.archive_s3_access_key_id, secret, settings.archive_s3_region,
                    settings.archive_s3_prefix, settings.archive_s3_part_mb << 20,
                    settings.archive_s3_timeout)


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


@frozen
class Fetched:
    """An archive object fetched and checked: the record it carries, the target it came
    from and the encrypted object's sha256."""

    record: dict[str, Any]
    target: str
    sha256: str


TARGETS = ("command", "s3")


class Archiver:
    """Writes, fetches and deletes the offsite archives of one backup node, on each
    configured target: ``command`` (``backup.archive_command`` and its fetch and delete
    commands) and ``s3`` (``backup.archive_s3_*``, :mod:`epio.backup.s3`)."""

    log = Logger()

    def __init__(self, reactor: Any, key: bytes, command: str = "", fetch_command: str = "",
                 delete_command: str = "", retries: int = 3, retry_initial: float = 5.0,
                 retry_max: float = 300.0, timeout: float = 3600.0,
                 s3: S3Client | None = None) -> None:
        self.reactor = reactor
        self._key = key
        self.command = command
        self.fetch_command = fetch_command
        self.delete_command = delete_command
        self.retries = retries
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.timeout = timeout
        self.s3 = s3
        self.targets = [t for t, on in (("command", bool(command)), ("s3", s3 is not None))
                        if on]
        self._secrets = secrets_in(" ".join((command, fetch_command, delete_command)))
        self.counters = {"archived": 0, "archive_failed": 0, "archive_retries": 0,
                         "archive_fetched": 0, "archive_deleted": 0}

    def where(self, target: str, name: str) -> str:
        """Where ``target`` keeps object ``name``, for people."""
        if target == "s3" and self.s3 is not None:
            return self.s3.where(name)
        return f"archive_command ({name})"

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

    async def _retrying(self, what: str,
                        attempt: Callable[[], Awaitable[str]]) -> tuple[str, int]:
        """``attempt`` (it answers "" or why it failed) with the retries: ("", tries) or
        (the last reason, tries)."""
        delay = self.retry_initial
        tries = 0
        while True:
            tries += 1
            why = await attempt()
            if not why:
                return "", tries
            if tries > self.retries:
                return why, tries
            self.counters["archive_retries"] += 1
            self.log.warn("{what}: try {n} of {of} failed, again in {delay:g}s: {why}",
                          what=what, n=tries, of=self.retries + 1, delay=delay, why=why)
            await deferLater(self.reactor, delay, lambda: None)
            delay = min(delay * 2, self.retry_max)

    async def _run(self, which: str, template: str, values: dict[str, str],
                   what: str) -> tuple[str, int]:
        """Run a command with the retries: ("", tries) or (the last reason, tries)."""
        return await self._retrying(what, lambda: self._run_once(which, template, values))

    async def _s3_put(self, path: Path, name: str, digest: str) -> str:
        """One upload to S3, then the object is looked for in the bucket's listing with
        its size: "" when it is there, else why not."""
        assert self.s3 is not None
        size = path.stat().st_size
        try:
            await self.s3.put_file(name, path, digest)
            listed = {o.key: o.size for o in await self.s3.list(name.split("/", 1)[0])}
        except S3Error as e:
            return str(e)
        if listed.get(name) != size:
            return (f"{self.s3.where(name)} is not listed with its {size} bytes after the "
                    "upload")
        return ""

    async def archive(self, record: BackupRecord, data: Path, workdir: Path) -> None:
        """Encrypt one verified backup and copy it to each archive target that does not
        hold it yet; record each outcome in ``record.copies`` and the sum on ``record``
        (``archive``: ``archived`` when every target holds a copy, else ``failed`` with
        ``archive_error``).  Never raises but for a cancellation."""
        name = object_name(record.app, record.id)
        if not record.copies and record.archive == "archived":  # archived before copies
            record.copies["command"] = {"state": "archived", "where": self.where("command", name),
                                        "error": "", "tries": record.archive_tries,
                                        "sha256": record.archive_sha256, "at": record.archived}
        wanted = [t for t in self.targets if t not in record.held_by()]
        if not wanted:
            return
        meta = json.dumps({k: v for k, v in record.to_json().items() if k != "copies"},
                          sort_keys=True).encode()
        tmp = workdir / f"{record.id}{SUFFIX}"
        what = f"archive of backup {record.id} of {record.app}"
        outcome: dict[str, tuple[str, int]] = {}
        digest = ""
        try:
            digest = await self._thread(encrypt, self._key, name, meta, data, tmp)
            for target in wanted:
                if target == "command":
                    outcome[target] = await self._run(
                        "archive_command", self.command,
                        {"path": str(tmp), "name": name, "app": record.app, "id": record.id},
                        what)
                else:
                    outcome[target] = await self._retrying(
                        f"{what} to S3", lambda: self._s3_put(tmp, name, digest))
        except CancelledError:
            raise
        except OSError as e:
            why = f"cannot write the archive: {e.strerror or type(e).__name__}"
            outcome = {t: outcome.get(t, (why, 0)) for t in wanted}
        finally:
            tmp.unlink(missing_ok=True)
        now = self.reactor.seconds()
        for target, (why, tries) in outcome.items():
            where = self.where(target, name)
            record.copies[target] = {"state": "failed" if why else "archived", "where": where,
                                     "error": why, "tries": tries,
                                     "sha256": "" if why else digest,
                                     "at": None if why else now}
            if why:
                self.counters["archive_failed"] += 1
                self.log.error("{what} FAILED after {tries} tries: {why}", what=what,
                               tries=tries, why=why)
            else:
                self.counters["archived"] += 1
                self.log.info("{what} copied offsite to {where}", what=what, where=where)
        record.archive_tries = max(tries for _, tries in outcome.values())
        record.archive_name = name
        failed = [(t, record.copies[t]["error"]) for t in self.targets
                  if record.copies.get(t, {}).get("state") != "archived"]
        if any(not why for why, _ in outcome.values()):
            record.archive_sha256 = digest
            record.archived = now
        if failed:
            record.archive = "failed"
            # each reason names its target: backup.archive_command ..., S3 PUT ...
            record.archive_error = "; ".join(why for _, why in failed)
        else:
            record.archive, record.archive_error = "archived", ""

    def _fetchable(self, target: str) -> bool:
        return target in self.targets and (target == "s3" or bool(self.fetch_command))

    async def fetch(self, app: str, backup_id: str, dest: Path,
                    known: BackupRecord | None = None, retry: bool = True) -> Fetched:
        """Fetch archive ``<app>/<id>`` from a target that holds it (``known``'s copies,
        else every target), check it and write its data to ``dest``; a copy that is
        refused (altered) is skipped for the next target's.  :class:`ArchiveFailed`
        when no copy can be had or every one is refused (:class:`ArchiveNotFetched`:
        none could be had at all).  ``retry`` False: one try per target (an ID nobody
        knows may well not exist: answer soon)."""
        holders = known.held_by() if known is not None else self.targets
        sources = [t for t in holders if self._fetchable(t)]
        if not sources:
            if "command" in holders and not self.fetch_command:
                raise ArchiveFailed(f"backup {backup_id} has no local copy and "
                                    "backup.fetch_command is not set")
            raise ArchiveFailed(f"backup {backup_id} has no local copy and no configured "
                                "archive target holds it")
        missing: list[str] = []
        refused: ArchiveFailed | None = None
        for target in sources:
            expected = ""
            if known is not None:
                expected = str(known.copies.get(target, {}).get("sha256")
                               or known.archive_sha256)
            try:
                return await self._fetch_from(target, app, backup_id, dest, expected, retry)
            except ArchiveNotFetched as e:
                missing.append(str(e))
            except ArchiveFailed as e:
                refused = refused or e
                self.log.error("archive of backup {id} of {app} on {target} REFUSED: {why}",
                               id=backup_id, app=app, target=target, why=str(e))
        if refused is not None:
            raise refused
        raise ArchiveNotFetched("; ".join(missing))

    async def _get(self, target: str, name: str, tmp: Path, values: dict[str, str],
                   retry: bool, backup_id: str) -> None:
        """Bring object ``name`` from ``target`` to ``tmp`` as it is stored."""
        what = f"fetch of archive {name}"
        if target == "command":
            if retry:
                why, _ = await self._run("fetch_command", self.fetch_command, values, what)
            else:
                why = await self._run_once("fetch_command", self.fetch_command, values)
            if why:
                raise ArchiveNotFetched(f"backup {backup_id}: {why}")
            return
        assert self.s3 is not None
        s3 = self.s3
        refusal: list[S3Refused] = []

        async def attempt() -> str:
            try:
                await s3.get_file(name, tmp)
            except S3Refused as e:
                refusal.append(e)
                return ""
            except S3NotFound:
                return f"{s3.where(name)} does not exist"
            except S3Error as e:
                return str(e)
            return ""

        if retry:
            why, _ = await self._retrying(f"{what} from S3", attempt)
        else:
            why = await attempt()
        if refusal:
            raise ArchiveFailed(str(refusal[0]))
        if why:
            raise ArchiveNotFetched(f"backup {backup_id}: {why}")

    async def _fetch_from(self, target: str, app: str, backup_id: str, dest: Path,
                          expected_sha256: str, retry: bool) -> Fetched:
        name = object_name(app, backup_id)
        tmp = dest.with_name(dest.name + SUFFIX)
        what = f"fetch of archive {name}"
        try:
            values = {"path": str(tmp), "name": name, "app": app, "id": backup_id}
            await self._get(target, name, tmp, values, retry, backup_id)
            if not tmp.exists():
                raise ArchiveFailed(f"backup {backup_id}: backup.fetch_command wrote no file")
            digest = await self._thread(sha256_file, tmp)
            if expected_sha256 and digest != expected_sha256:
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
        self.log.info("{what}: checked, {size} bytes, from {where}", what=what,
                      size=dest.stat().st_size, where=self.where(target, name))
        return Fetched(record, target, digest)

    async def delete(self, app: str, backup_id: str, known: BackupRecord | None = None) -> bool:
        """Delete an archive the archive retention dropped from every target holding it
        (``known``'s copies, else every target); False if a deletion failed (the next
        round tries again).  A command target without archive_delete_command, or a
        target no longer configured, leaves its copy (the store's own lifecycle
        decides)."""
        name = object_name(app, backup_id)
        holders = known.held_by() if known is not None else self.targets
        done = True
        for target in holders:
            if target == "command" and self.delete_command and "command" in self.targets:
                why, _ = await self._run("archive_delete_command", self.delete_command,
                                         {"name": name, "app": app, "id": backup_id,
                                          "path": ""}, f"deletion of archive {name}")
            elif target == "s3" and self.s3 is not None:
                try:
                    await self.s3.delete(name)
                    why = ""
                except S3Error as e:
                    why = str(e)
            else:
                continue
            if why:
                self.log.error("archive {name} could not be deleted from {target}: {why}",
                               name=name, target=target, why=why)
                done = False
            else:
                self.counters["archive_deleted"] += 1
        return done
