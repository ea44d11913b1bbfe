"""btrfs subvolumes and snapshots of dedicated data dirs, on a real loop-mounted btrfs."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from twisted.trial import unittest

from epio.addons import btrfs
from epio.addons.services import postgres_start_body
from epio.retention import RetentionPolicy
from epio.runner import snapshots
from epio.runner.cgroups import CgroupSupport, Limits
from epio.runner.launcher import SandboxLauncher, purge_app_data
from epio.runner.sandbox import Isolation
from epio.runner.supervisor import InstanceSpec
from epio.runner.users import AppUser


def _run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True,
                          timeout=30).stdout


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (loop device, mount)"
    if not shutil.which("mkfs.btrfs") or btrfs.btrfs_tool() is None:
        return "mkfs.btrfs / btrfs not installed (apt-get install btrfs-progs)"
    return None


class BtrfsTests(unittest.TestCase):
    skip = _skip_reason()

    def setUp(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="epio-btrfs-"))
        self.addCleanup(shutil.rmtree, self.tmp, True)
        image = self.tmp / "fs.img"
        with open(image, "wb") as f:
            f.truncate(200 * 1024 * 1024)  # sparse
        _run("mkfs.btrfs", "-q", str(image))
        loop = _run("losetup", "--find", "--show", str(image)).strip()
        self.addCleanup(subprocess.run, ["losetup", "-d", loop], timeout=30, check=False)
        self.mnt = self.tmp / "mnt"
        self.mnt.mkdir()
        _run("mount", loop, str(self.mnt))
        self.addCleanup(subprocess.run, ["umount", "-l", str(self.mnt)], timeout=30,
                        check=False)
        self.plain = self.tmp / "plain"  # the temp dir's own filesystem, not btrfs
        self.plain.mkdir()

    def test_data_dir_is_subvolume_and_snapshot_is_frozen(self) -> None:
        """On btrfs a data dir is a subvolume; a snapshot is read-only and keeps the
        data as of that moment (later writes do not show in it)."""
        data = self.mnt / ".epio-postgres-ab12"
        self.assertTrue(btrfs.make_data_dir(data))
        self.assertTrue(btrfs.is_subvolume(data))
        self.assertEqual(data.stat().st_mode & 0o777, 0o700)
        (data / "f").write_text("before")
        snap = self.mnt / "snap1"
        btrfs.snapshot(data, snap)
        (data / "f").write_text("after")
        (data / "new").write_text("x")
        self.assertEqual((snap / "f").read_text(), "before")
        self.assertFalse((snap / "new").exists())
        self.assertTrue(btrfs.is_read_only(snap))
        with self.assertRaises(OSError):
            (snap / "f").write_text("changed")
        btrfs.delete_snapshot(snap)
        self.assertFalse(snap.exists())
        with self.assertRaises(FileExistsError):
            btrfs.make_data_dir(data)

    def test_plain_directory_elsewhere(self) -> None:
        """Off btrfs the data dir is a plain directory and a snapshot is refused with a
        clear reason."""
        self.assertFalse(btrfs.is_btrfs(self.plain))
        data = self.plain / ".epio-redis-cd34"
        self.assertFalse(btrfs.make_data_dir(data))
        self.assertTrue(data.is_dir())
        self.assertFalse(btrfs.is_subvolume(data))
        with self.assertRaises(btrfs.BtrfsError) as e:
            btrfs.snapshot(data, self.plain / "snap")
        self.assertIn("not a btrfs subvolume", str(e.exception))
        self.assertIn("not on btrfs", btrfs.unsupported_reason(self.plain) or "")

    def test_runner_job_snapshots_and_prunes(self) -> None:
        """The runner's job snapshots every dedicated subvolume into
        snapshots/<app>/<kind>/<stamp> (0700), skips plain dirs with a reason, and
        prunes with the history policy."""
        data_dir = self.mnt / "node"
        appdata = data_dir / "appdata" / "shop"
        appdata.mkdir(parents=True)
        sub = appdata / ".epio-postgres-ab12"
        btrfs.make_data_dir(sub)
        (sub / "PG_VERSION").write_text("15")
        (appdata / ".epio-redis").mkdir()  # an old plain directory
        (appdata / "user-file").write_text("not a data dir")
        policy = RetentionPolicy(hourly=2, daily=0, weekly=0, monthly=0)
        t0 = datetime(2026, 11, 27, 10, 0, tzinfo=UTC).timestamp()
        taken = []
        for hour in range(4):
            r = snapshots.snapshot_all(data_dir, t0 + hour * 3600, policy)
            self.assertEqual(r.failed, {})
            self.assertEqual(len(r.taken), 1)
            self.assertEqual(list(r.skipped), [str(appdata / ".epio-redis")])
            taken.extend(r.taken)
        target = data_dir / "snapshots" / "shop" / "postgres-ab12"
        self.assertEqual(sorted(p.name for p in target.iterdir()),
                         ["20261127T120000Z", "20261127T130000Z"])
        self.assertEqual(target.stat().st_mode & 0o777, 0o700)
        self.assertEqual((data_dir / "snapshots").stat().st_mode & 0o777, 0o700)
        self.assertEqual((target / "20261127T130000Z" / "PG_VERSION").read_text(), "15")
        self.assertTrue(btrfs.is_read_only(target / "20261127T130000Z"))
        self.assertEqual(taken[0], str(target / "20261127T100000Z"))

    def test_purge_deletes_subvolumes_and_snapshots(self) -> None:
        """Purging an app deletes its data dir with its dedicated subvolume and its
        read-only snapshots (the data is gone); another app's data stays, and an app of
        the same name owned by another UID is left alone."""
        data_dir = self.mnt / "node"
        appdata = data_dir / "appdata" / "shop"
        appdata.mkdir(parents=True)
        sub = appdata / ".epio-postgres-ab12"
        btrfs.make_data_dir(sub)
        (sub / "PG_VERSION").write_text("15")
        (appdata / "user-file").write_text("mine")
        other = data_dir / "appdata" / "other"
        other.mkdir()
        (other / "f").write_text("theirs")
        policy = RetentionPolicy(hourly=2, daily=0, weekly=0, monthly=0)
        t0 = datetime(2026, 11, 27, 10, 0, tzinfo=UTC).timestamp()
        snapshots.snapshot_all(data_dir, t0, policy)
        self.assertTrue((data_dir / "snapshots" / "shop").exists())
        os.chown(appdata, 20500, 20500)
        # another UID's "shop" (a live app of that name): nothing touched
        self.assertFalse(purge_app_data(data_dir, "shop", 20501, uid_switch=True))
        self.assertTrue((sub / "PG_VERSION").exists())
        self.assertTrue((data_dir / "snapshots" / "shop").exists())
        self.assertTrue(purge_app_data(data_dir, "shop", 20500, uid_switch=True))
        self.assertFalse(appdata.exists())
        self.assertFalse((data_dir / "snapshots" / "shop").exists())
        self.assertEqual((other / "f").read_text(), "theirs")
        self.assertNotIn(".epio-postgres-ab12",
                         _run("btrfs", "subvolume", "list", str(self.mnt)))
        self.assertFalse(purge_app_data(data_dir, "shop", 20500, uid_switch=True))

    def test_snapshots_listed_and_restored(self) -> None:
        """A dedicated data dir's snapshots are listed newest first; restoring one makes
        the data dir a writable copy of it (owner and mode kept), the previous data dir
        kept beside it as ``<dir>.pre-<stamp>`` (not snapshotted again), the snapshot
        itself untouched; an unknown id or a bad name is refused with nothing changed."""
        data_dir = self.mnt / "node"
        appdata = data_dir / "appdata" / "shop"
        appdata.mkdir(parents=True)
        sub = appdata / ".epio-redis-cd34"
        btrfs.make_data_dir(sub)
        os.chown(sub, 20042, 20042)
        (sub / "dump.rdb").write_text("v1")
        policy = RetentionPolicy(hourly=24, daily=0, weekly=0, monthly=0)
        t0 = datetime(2026, 11, 27, 10, 0, tzinfo=UTC).timestamp()
        snapshots.snapshot_all(data_dir, t0, policy)
        (sub / "dump.rdb").write_text("v2")
        snapshots.snapshot_all(data_dir, t0 + 3600, policy)
        (sub / "dump.rdb").write_text("v3 (damaged)")
        listed = snapshots.list_snapshots(data_dir, "shop", ".epio-redis-cd34")
        self.assertEqual([s["id"] for s in listed], ["20261127T110000Z", "20261127T100000Z"])
        self.assertEqual(listed[1]["created"], t0)
        self.assertEqual(snapshots.list_snapshots(data_dir, "shop", ".epio-postgres-cd34"), [])

        for bad in (("shop", ".epio-redis-cd34", "20261127T090000Z", "snapshot_not_found"),
                    ("shop", "../x", "20261127T100000Z", "bad_request"),
                    ("../shop", ".epio-redis-cd34", "20261127T100000Z", "bad_request"),
                    ("shop", ".epio-redis-cd34", "../../etc", "bad_request")):
            with self.assertRaises(snapshots.SnapshotError) as cm:
                snapshots.restore_snapshot(data_dir, *bad[:3], t0 + 7200)
            self.assertEqual(cm.exception.code, bad[3])
        self.assertEqual((sub / "dump.rdb").read_text(), "v3 (damaged)")

        kept = snapshots.restore_snapshot(data_dir, "shop", ".epio-redis-cd34",
                                          "20261127T100000Z", t0 + 7200)
        self.assertEqual(kept, ".epio-redis-cd34.pre-20261127T120000Z")
        self.assertEqual((sub / "dump.rdb").read_text(), "v1")
        self.assertTrue(btrfs.is_subvolume(sub))
        self.assertFalse(btrfs.is_read_only(sub))
        self.assertEqual((sub.stat().st_uid, sub.stat().st_mode & 0o777), (20042, 0o700))
        (sub / "dump.rdb").write_text("v4")  # writable
        self.assertEqual((appdata / kept / "dump.rdb").read_text(), "v3 (damaged)")
        snap = data_dir / "snapshots" / "shop" / "redis-cd34" / "20261127T100000Z"
        self.assertEqual((snap / "dump.rdb").read_text(), "v1")
        self.assertEqual([d for _, d in snapshots.dedicated_dirs(data_dir / "appdata")],
                         [sub])

    def test_launcher_makes_service_data_dir_as_subvolume(self) -> None:
        """Before a dedicated server starts, the runner makes its data dir (named by
        the start body) on the host: a subvolume owned by the app UID on btrfs, a plain
        directory elsewhere; other process types get nothing."""
        body = postgres_start_body(app="shop", uid=12345, instance_id="i1", image_digest="0",
                                   user="u", password="p", host="127.0.0.1", pg_bin="/x",
                                   boot_timeout=5, data_key="ab12")
        iso = Isolation(sandbox="none", uid_switch=True, namespaces=(), cgroups=(),
                        nofile=True, off={})
        user = AppUser(app="shop", uid=12345, gid=12345)

        def spec(process_type: str) -> InstanceSpec:
            return InstanceSpec(instance_id="i1", app="shop", uid=12345, release=0,
                                process_type=process_type, index=1, command=("true",),
                                image_digest="0", env=dict(body["env"]),
                                limits=Limits(0, 0, 0, 0), health_check=None,
                                boot_timeout=5, grace=1)

        for base, subvolume in ((self.mnt, True), (self.plain, False)):
            launcher = SandboxLauncher(None, base, iso, CgroupSupport({}, {}), None,
                                       bwrap=None, setpriv=None)
            data = base / "appdata" / "shop"
            data.mkdir(parents=True)
            launcher._service_data_dir(spec("web"), data, user)
            self.assertEqual(list(data.iterdir()), [])
            launcher._service_data_dir(spec("epio-postgres"), data, user)
            made = data / ".epio-postgres-ab12"
            self.assertEqual(btrfs.is_subvolume(made), subvolume)
            st = made.stat()
            self.assertEqual((st.st_uid, st.st_mode & 0o777), (12345, 0o700))
            launcher._service_data_dir(spec("epio-postgres"), data, user)  # exists: kept
            self.assertEqual(btrfs.is_subvolume(made), subvolume)

    async def _service_run(self) -> None:
        from twisted.internet import reactor, task

        data_dir = self.mnt / "node"
        sub = data_dir / "appdata" / "shop" / ".epio-redis-cd34"
        sub.parent.mkdir(parents=True)
        btrfs.make_data_dir(sub)
        svc = snapshots.SnapshotService(reactor, data_dir, 3600.0, RetentionPolicy())
        svc.startService()
        self.addCleanup(svc.stopService)
        target = data_dir / "snapshots" / "shop" / "redis-cd34"
        for _ in range(100):
            if not svc.busy and target.exists() and any(target.iterdir()):
                break
            await task.deferLater(reactor, 0.05, lambda: None)
        made = list(target.iterdir())
        self.assertEqual(len(made), 1)
        self.assertTrue(btrfs.is_read_only(made[0]))

    def test_service_snapshots_at_start(self) -> None:
        """The runner's snapshot service takes its first snapshots when it starts (in a
        thread, off the reactor)."""
        from twisted.internet import defer

        return defer.Deferred.fromCoroutine(self._service_run())
