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
from typing import Any

from attrs import define, field
from twisted.application.internet import TimerService
from twisted.internet import threads
from twisted.logger import Logger

from epio.addons import btrfs
from epio.retention import Candidate, RetentionPolicy, to_keep

DEDICATED_DIR = re.compile(r"^\.epio-(redis|postgres)(-[0-9a-f]{1,32})?$")
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


class SnapshotService(TimerService):
    """Runs :func:`snapshot_all` every ``interval`` seconds, in a thread, one at a time."""

    log = Logger()

    def __init__(self, reactor: Any, data_dir: Path, interval: float, policy: RetentionPolicy,
                 run: Callable[..., SnapshotResult] = snapshot_all) -> None:
        super().__init__(interval, self.tick)
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


def attach_snapshots(runner: Any, node: Any) -> SnapshotService | None:
    """Give the runner service its snapshot job (``addons.snapshot_interval``; 0 disables)."""
    interval = node.config["addons"].get("snapshot_interval", 0)
    if not interval:
        return None
    b = node.config["backup"]
    policy = RetentionPolicy(hourly=b["hourly"], daily=b["daily"], weekly=b["weekly"],
                             monthly=b["monthly"])
    svc = SnapshotService(node.reactor, node.data_dir, interval, policy)
    svc.setName("btrfs-snapshots")
    svc.setServiceParent(runner)
    return svc
