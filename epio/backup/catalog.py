"""The backup store: one directory per backup with its data and a ``meta.json``.

Layout: ``ROOT/<app>/<kind>/<id>/`` holding ``data`` (a pg_dump custom-format
archive or a Redis RDB file) and ``meta.json``.  ``ROOT`` is created 0700 and owned
by the backup node's user, so app processes (their own UIDs) cannot read it; the
database servers never hold credentials to it (backups are pulled).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from attrs import asdict, define, field

STATUSES = ("running", "verified", "failed")
# app names, kinds and backup ids: no glob metacharacters, no path separators, no ".."
_SAFE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$")


class BackupNotFound(Exception):
    code = "backup_not_found"


@define
class BackupRecord:
    id: str
    app: str
    kind: str  # "postgres" or "redis"
    created: float
    status: str = "running"
    source: str = ""  # database name or redis address (never credentials)
    size: int = 0
    sha256: str = ""
    counts: dict[str, int] = field(factory=dict)  # table -> rows, or {"keys": n}
    error: str = ""
    finished: float | None = None
    suspicious: str = ""  # why a verified backup is flagged (epio.backup.checks), or ""
    pinned: str = ""  # why it is kept for backup.failed_ttl whatever the history, or ""
    # the offsite copy (epio.backup.archive): "" (none configured, or not verified),
    # "archived" or "failed" (archive_error says why)
    archive: str = ""
    archive_error: str = ""
    archive_name: str = ""  # the object name given to backup.archive_command
    archive_sha256: str = ""  # of the encrypted object
    archive_tries: int = 0
    archived: float | None = None
    local: bool = True  # False: pruned here, kept in the archive (its record stays)
    # each archive target's copy: target ("command": backup.archive_command, "s3":
    # backup.archive_s3_*) -> {"state": "archived"|"failed", "where", "error", "tries",
    # "sha256" (of the encrypted object it holds), "at"}
    copies: dict[str, dict[str, Any]] = field(factory=dict)

    @property
    def good(self) -> bool:
        """Verified: restorable (flagged or not)."""
        return self.status == "verified"

    @property
    def counts_in_history(self) -> bool:
        """Verified and not flagged: counts towards the retention history."""
        return self.good and not self.suspicious

    def held_by(self) -> list[str]:
        """The archive targets that hold a copy; a record from before copies were kept
        per target was archived by the command."""
        if self.copies:
            return [t for t, c in self.copies.items() if c.get("state") == "archived"]
        return ["command"] if self.archive == "archived" else []

    @property
    def offsite(self) -> bool:
        """At least one archive target holds a copy (restorable from it)."""
        return bool(self.held_by())

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class Catalog:
    """Backups on disk.  All methods are quick file operations."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def ensure(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)

    def dir_for(self, record: BackupRecord) -> Path:
        return self.root / record.app / record.kind / record.id

    def data_path(self, record: BackupRecord) -> Path:
        return self.dir_for(record) / "data"

    def create(self, record: BackupRecord) -> Path:
        self.ensure()
        d = self.dir_for(record)
        d.mkdir(parents=True, mode=0o700)
        self.save(record)
        return d / "data"

    def save(self, record: BackupRecord) -> None:
        d = self.dir_for(record)
        tmp = d / "meta.json.tmp"
        tmp.write_text(json.dumps(record.to_json(), sort_keys=True))
        os.replace(tmp, d / "meta.json")

    def _read(self, meta: Path) -> BackupRecord | None:
        try:
            return BackupRecord(**json.loads(meta.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def list(self, app: str | None = None, kind: str | None = None) -> list[BackupRecord]:
        """Records, newest first; with ``app`` only that app's directory is read."""
        out: list[BackupRecord] = []
        if not self.root.exists():
            return out
        if app is not None and not _SAFE.match(app):
            return out  # not an app name (and not a glob pattern of our making)
        pattern = f"{app or '*'}/{kind if kind and _SAFE.match(kind) else '*'}/*/meta.json"
        for meta in self.root.glob(pattern):
            record = self._read(meta)
            if record is None:
                continue
            if (app is None or record.app == app) and (kind is None or record.kind == kind):
                out.append(record)
        return sorted(out, key=lambda r: r.created, reverse=True)

    def get(self, backup_id: str, app: str | None = None) -> BackupRecord:
        """One record: with ``app``, read straight from its directory (downloads ask for
        every chunk, so no scan of the catalog)."""
        if app is not None and _SAFE.match(app) and _SAFE.match(backup_id):
            for meta in self.root.glob(f"{app}/*/{backup_id}/meta.json"):
                record = self._read(meta)
                if record is not None and record.id == backup_id and record.app == app:
                    return record
            raise BackupNotFound(f"no backup {backup_id}")
        for record in self.list(app):
            if record.id == backup_id:
                return record
        raise BackupNotFound(f"no backup {backup_id}")

    def delete(self, record: BackupRecord) -> None:
        shutil.rmtree(self.dir_for(record), ignore_errors=True)

    def drop_data(self, record: BackupRecord) -> None:
        """Delete the local data of an archived backup; its record stays (``local`` False)."""
        self.data_path(record).unlink(missing_ok=True)
        record.local = False
        self.save(record)

    def adopt(self, record: BackupRecord) -> Path:
        """The directory of a record fetched from its archive (created); its data path."""
        self.ensure()
        d = self.dir_for(record)
        d.mkdir(parents=True, mode=0o700, exist_ok=True)
        return d / "data"
