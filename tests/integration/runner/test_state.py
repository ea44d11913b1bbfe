"""Cleanup of a previous run's leftovers: only what the state file proves is ours."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from twisted.trial.unittest import TestCase

from epio.runner.launcher import proc_start_time
from epio.runner.state import kill_leftovers, load, mounted_under, save


class LeftoverTests(TestCase):
    def spawn(self) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(["sleep", "30"])
        self.addCleanup(p.wait)
        self.addCleanup(p.kill)
        return p

    def test_only_recorded_pid_with_same_start_time_is_killed(self) -> None:
        """A recorded pid is killed when its start time matches; a pid whose start time
        differs (reused by another process) is left alone."""
        mine, other = self.spawn(), self.spawn()
        records = [
            {"pid": mine.pid, "start_time": proc_start_time(mine.pid), "group": None,
             "uid": 20001},
            {"pid": other.pid, "start_time": (proc_start_time(other.pid) or 0) + 1,
             "group": None, "uid": 20001},
        ]
        self.assertEqual(kill_leftovers(records), 1)
        mine.wait(timeout=5)
        time.sleep(0.1)
        self.assertIsNone(other.poll())

    def test_state_file_roundtrip_and_bad_files(self) -> None:
        """The state file is written 0600 and read back; a corrupt or foreign-version
        file is ignored (the runner starts empty) rather than crashing it."""
        path = Path(self.mktemp()) / "runner" / "state.json"
        save(path, {"instances": [{"spec": {"instance_id": "a"}}]})
        self.assertEqual(path.stat().st_mode & 0o777, 0o600)
        self.assertEqual(load(path)["instances"][0]["spec"]["instance_id"], "a")  # type: ignore[index]
        path.write_text("{not json")
        self.assertIsNone(load(path))
        path.write_text('{"version": 99}')
        self.assertIsNone(load(path))
        self.assertIsNone(load(path.parent / "missing.json"))

    def test_mounted_under_parses_mountinfo(self) -> None:
        """Mount points directly below a directory are found in mountinfo."""
        info = Path(self.mktemp())
        info.write_text(
            "36 35 7:1 / /d/mounts/abc ro,nodev - squashfs /dev/loop1 ro\n"
            "37 35 7:2 / /d/mounts/x/y ro - squashfs /dev/loop2 ro\n"
            "38 35 0:1 / /other rw - tmpfs tmpfs rw\n")
        self.assertEqual(mounted_under(Path("/d/mounts"), info), [Path("/d/mounts/abc")])
