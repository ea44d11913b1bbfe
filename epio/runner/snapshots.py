"""Scheduled btrfs snapshots of dedicated data directories (issue 10, docs/databases.md).

Every ``addons.snapshot_interval`` seconds (0 disables) the runner takes a read-only
snapshot of every dedicated data directory it hosts that is a btrfs subvolume
(``DATA_DIR/appdata/<app>/.epio-<kind>[-<key>]``) into
``DATA_DIR/snapshots/<app>/<kind>[-<key>]/<YYYYmmddTHHMMSSZ>`` (root only, 0700), then
prunes each directory's snapshots with the backups' history policy
(:func:`epio.retention.to_keep` with the ``backup`` section's hourly/daily/
weekly/monthly counts).  Data dirs that are plain directories are skipped (the reason
is logged once per directory).  The btrfs calls block: they run in a thread.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attrs import define, field
from twisted.application.internet import TimerService
from twisted.internet import threads
from twisted.logger import Logger

from epio import domain
from epio.addons import btrfs
from epio.config.settings import AddonsSettings, BackupSettings
from epio.retention import Candidate, RetentionPolicy, to_keep

if TYPE_CHECKING:
    from epio.node import INodeReactor

DEDICATED_DIR = re.compile(r"^\.epio-(redis|postgres)(-[0-9a-f]{1,32})?$")
APP_NAME = domain.APP_NAME
STAMP = "%Y%m%dT%H%M%SZ"
STAMP_RE = re.compile(r"^\d{8}T\d{6}Z$")


@define
class SnapshotResult:
    taken: list[str] = field(factory=list)
    pruned: list[str] = field(factory=list)
    skipped: dict[str, str] = field(factory=dict)  # data dir -> reason
    failed: dict[str, str] = field(factory=dict)  # data dir or snapshot -> error


def stamp_of(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime(STAMP)


def time_of(stamp: str) -> float:
    return datetime.strptime(stamp, STAMP).replace(tzinfo=UTC).timestamp()


def dedicated_dirs(appdata: Path) -> list[tuple[str, Path]]:
    """``(app, data dir)`` of every dedicated data directory under ``appdata``."""
    found: list[tuple[str, Path]] = []
    try:
        apps = sorted(p for p in appdata.iterdir() if not p.name.startswith("."))
    except FileNotFoundError:
        return []
    for app in apps:
        try:
            children = sorted(app.iterdir())
        except (NotADirectoryError, PermissionError, FileNotFoundError):
            continue
        found.extend((app.name, c) for c in children
                     if DEDICATED_DIR.match(c.name) and c.is_dir() and not c.is_symlink())
    return found


def snapshot_all(data_dir: Path, now: float, policy: RetentionPolicy) -> SnapshotResult:
    """Snapshot every dedicated subvolume under ``data_dir`` and prune (blocking)."""
    result = SnapshotResult()
    root = data_dir / "snapshots"
    for app, data in dedicated_dirs(data_dir / "appdata"):
        if not btrfs.is_subvolume(data):
            reason = btrfs.unsupported_reason(data.parent) or "a plain directory (made " \
                "before subvolumes were available)"
            result.skipped[str(data)] = reason
            continue
        target = root / app / data.name.lstrip(".").removeprefix("epio-")
        try:
            for d in (root, root / app, target):
                d.mkdir(mode=0o700, exist_ok=True)
                os.chmod(d, 0o700)
            dest = target / stamp_of(now)
            if not dest.exists():
                btrfs.snapshot(data, dest)
                result.taken.append(str(dest))
        except (OSError, btrfs.BtrfsError) as e:
            result.failed[str(data)] = str(e)
            continue
        prune(target, now, policy, result)
    return result


def prune(target: Path, now: float, policy: RetentionPolicy, result: SnapshotResult) -> None:
    """Delete the snapshots in ``target`` that the history policy does not keep."""
    snaps = [p for p in target.iterdir() if STAMP_RE.match(p.name)]
    keep = to_keep([Candidate(p.name, time_of(p.name), True) for p in snaps], now, policy)
    for p in snaps:
        if p.name in keep:
            continue
        try:
            btrfs.delete_snapshot(p)
            result.pruned.append(str(p))
        except btrfs.BtrfsError as e:
            result.failed[str(p)] = str(e)


class SnapshotError(Exception):
    """A snapshot cannot be listed or restored; ``code`` is the bus error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _snapshot_dir(data_dir: Path, app: str, addon_dir: str) -> Path:
    if not APP_NAME.match(app) or not DEDICATED_DIR.match(addon_dir):
        raise SnapshotError("bad_request", "not an app name and a dedicated data directory")
    return data_dir / "snapshots" / app / addon_dir.lstrip(".").removeprefix("epio-")


def list_snapshots(data_dir: Path, app: str, addon_dir: str) -> list[dict[str, Any]]:
    """The snapshots of one dedicated data dir (``.epio-<kind>[-<key>]``), newest first:
    ``{"id": stamp, "created": seconds}``."""
    target = _snapshot_dir(data_dir, app, addon_dir)
    try:
        stamps = [p.name for p in target.iterdir() if STAMP_RE.match(p.name)]
    except FileNotFoundError:
        return []
    return [{"id": s, "created": time_of(s)} for s in sorted(stamps, reverse=True)]


def restore_snapshot(data_dir: Path, app: str, addon_dir: str, snapshot_id: str,
                     now: float) -> str:
    """Make the data dir ``addon_dir`` of ``app`` the snapshot's (blocking; the server
    must be stopped).  Restore, then switch: a writable copy of the snapshot is made
    beside the data dir first; then the live data dir is renamed to
    ``<addon_dir>.pre-<stamp>`` (kept for the operator, never snapshotted nor used) and
    the copy renamed into its place.  Returns the kept name."""
    if not STAMP_RE.match(snapshot_id):
        raise SnapshotError("bad_request", f"not a snapshot id: {snapshot_id!r}")
    snap = _snapshot_dir(data_dir, app, addon_dir) / snapshot_id
    if not snap.is_dir():
        raise SnapshotError("snapshot_not_found", f"no snapshot {snapshot_id} of {addon_dir}")
    data = data_dir / "appdata" / app / addon_dir
    staged = data.parent / f"{addon_dir}.restoring-{snapshot_id}"
    kept = data.parent / f"{addon_dir}.pre-{stamp_of(now)}"
    if os.path.lexists(kept):
        raise SnapshotError("snapshot_failed", f"{kept.name} exists: one restore a second")
    try:
        if os.path.lexists(staged):
            btrfs.delete_snapshot(staged)  # a restore that died before its switch
        btrfs.snapshot_writable(snap, staged)
    except btrfs.BtrfsError as e:
        raise SnapshotError("snapshot_failed", str(e)) from None
    if os.path.lexists(data):
        os.rename(data, kept)
    os.rename(staged, data)
    return kept.name


class SnapshotService(TimerService):
    """Runs :func:`snapshot_all` every ``interval`` seconds, in a thread, one at a time."""

    log = Logger()

    def __init__(self, reactor: INodeReactor, data_dir: Path, interval: float, policy: RetentionPolicy,
                 run: Callable[..., SnapshotResult] = snapshot_all) -> None:
        super().__init__(interval, self.tick)  # type: ignore[no-untyped-call]  # Twisted leaves it untyped
        self.clock = reactor
        self.reactor = reactor
        self.data_dir = Path(data_dir)
        self.policy = policy
        self.run = run
        self.busy = False
        self.told: set[str] = set()

    async def _tick(self) -> None:
        result = await threads.deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), self.run, self.data_dir,
            self.reactor.seconds(), self.policy)
        for path in result.taken:
            self.log.info("btrfs snapshot taken: {path}", path=path)
        for path in result.pruned:
            self.log.info("btrfs snapshot pruned (history policy): {path}", path=path)
        for path, error in result.failed.items():
            self.log.warn("btrfs snapshot of {path} FAILED: {error}", path=path, error=error)
        for path, reason in result.skipped.items():
            if path not in self.told:
                self.told.add(path)
                self.log.info("no btrfs snapshots of {path}: {reason}", path=path,
                              reason=reason)

    def tick(self) -> Any:
        if self.busy:
            return None
        self.busy = True
        from twisted.internet import defer

        d = defer.Deferred.fromCoroutine(self._tick())

        def done(r: Any) -> None:
            self.busy = False
            if hasattr(r, "getErrorMessage"):
                self.log.failure("btrfs snapshots failed", r)

        d.addBoth(done)
        return None


def make_snapshots(reactor: INodeReactor, data_dir: Path, addons: AddonsSettings,
                   backup: BackupSettings) -> SnapshotService | None:
    """The runner's snapshot job (``addons.snapshot_interval``; 0 disables: None),
    keeping what the ``backup`` retention policy keeps."""
    if not addons.snapshot_interval:
        return None
    policy = RetentionPolicy(hourly=backup.hourly, daily=backup.daily, weekly=backup.weekly,
                             monthly=backup.monthly)
    svc = SnapshotService(reactor, data_dir, addons.snapshot_interval, policy)
    svc.setName("btrfs-snapshots")  # type: ignore[no-untyped-call]  # Twisted leaves it untyped
    return svc
