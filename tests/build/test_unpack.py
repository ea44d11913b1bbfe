"""Unpacking an untrusted upload: every malicious member is refused, nothing is left."""

from __future__ import annotations

import io
import shutil
import tarfile
import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from epio.runner.build.unpack import UnpackError, safe_unpack


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as t:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
            else:
                t.addfile(info)
    return path


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info, None


class UnpackTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.tmp = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.tmp)
        self.dest = self.tmp / "out"

    def refuse(self, members: list, needle: str, max_bytes: int = 10**6) -> None:
        tb = _tar(self.tmp / "t.tgz", [_file("ok.txt")] + members)
        with self.assertRaises(UnpackError) as cm:
            safe_unpack(tb, self.dest, max_bytes)
        self.assertIn(needle, str(cm.exception))
        self.assertFalse(self.dest.exists(), "a refused upload leaves nothing behind")

    def test_good_tarball(self) -> None:
        """Files, dirs, inside symlinks and hard links unpack; modes lose setuid."""
        info, data = _file("bin/run", b"#!/bin/sh\n")
        info.mode = 0o4755
        tb = _tar(
            self.tmp / "t.tgz",
            [
                (info, data),
                _file("a/b.txt", b"hello"),
                _special("a/link", tarfile.SYMTYPE, "b.txt"),
                _special("a/up", tarfile.SYMTYPE, "../bin/run"),
                _special("a/hard", tarfile.LNKTYPE, "a/b.txt"),
            ],
        )
        n = safe_unpack(tb, self.dest, 10**6)
        self.assertEqual(n, 15)
        self.assertEqual((self.dest / "a/link").read_text(), "hello")
        self.assertEqual((self.dest / "a/hard").read_text(), "hello")
        self.assertEqual((self.dest / "bin/run").stat().st_mode & 0o7777, 0o755)

    def test_path_traversal(self) -> None:
        """A member with '..' is refused as path traversal."""
        self.refuse([_file("../../etc/evil")], "path traversal")

    def test_absolute_path(self) -> None:
        """An absolute member name is refused."""
        self.refuse([_file("/etc/evil")], "absolute path")

    def test_symlink_escape(self) -> None:
        """Symlinks pointing outside the tree (relative or absolute) are refused."""
        self.refuse(
            [_special("esc", tarfile.SYMTYPE, "../../etc/passwd")], "points outside the app"
        )
        self.refuse([_special("esc", tarfile.SYMTYPE, "/etc/passwd")], "absolute target")

    def test_symlink_chain_escape(self) -> None:
        """A chain of symlinks that each look inside on their text but together lead out
        of the tree (the reviewer's reproduction: ``m`` really points two levels above
        the upload, where a node keeps its DATA_DIR) is refused, the whole upload with it."""
        secret_dir = self.tmp / "data"
        secret_dir.mkdir()
        (secret_dir / "cluster-secret").write_text("s3cr3t-cluster-key\n")
        dest = secret_dir / "builds" / "out"
        dest.parent.mkdir()
        tb = _tar(
            self.tmp / "t.tgz",
            [
                _file("epio.ini", b"[process]\nw = python w.py\n"),
                _special("d1/d2/d3/up", tarfile.SYMTYPE, "../../.."),
                _special("m", tarfile.SYMTYPE, "d1/d2/d3/up/../../.."),
                _special("Procfile", tarfile.SYMTYPE, "m/cluster-secret"),
            ],
        )
        with self.assertRaises(UnpackError) as cm:
            safe_unpack(tb, dest, 10**6)
        self.assertIn("points outside the app", str(cm.exception))
        self.assertIn("through other symlinks", str(cm.exception))
        self.assertNotIn("s3cr3t", str(cm.exception))
        self.assertFalse(dest.exists(), "a refused upload leaves nothing behind")
        self.assertEqual((secret_dir / "cluster-secret").read_text(), "s3cr3t-cluster-key\n")

    def test_symlink_chain_escape_in_any_order(self) -> None:
        """The chain is refused whichever link comes first in the archive, and when the
        escaping link is dangling at the time it is unpacked."""
        self.refuse(
            [
                _special("m", tarfile.SYMTYPE, "d1/d2/d3/up/../../.."),
                _special("d1/d2/d3/up", tarfile.SYMTYPE, "../../.."),
            ],
            "points outside the app",
        )
        self.refuse(
            [
                _special("a/b/top", tarfile.SYMTYPE, "../.."),
                _special("x", tarfile.SYMTYPE, "a/b/top/.."),
            ],
            "points outside the app",
        )

    def test_symlink_chain_inside(self) -> None:
        """Chains of symlinks that stay inside the tree (even through the top) unpack."""
        tb = _tar(
            self.tmp / "t.tgz",
            [
                _file("conf/real.txt", b"ok"),
                _special("d1/d2/d3/up", tarfile.SYMTYPE, "../../.."),
                _special("m", tarfile.SYMTYPE, "d1/d2/d3/up/conf"),
                _special("cfg", tarfile.SYMTYPE, "m/real.txt"),
                _special("loop1", tarfile.SYMTYPE, "loop2"),
                _special("loop2", tarfile.SYMTYPE, "loop1"),
            ],
        )
        safe_unpack(tb, self.dest, 10**6)
        self.assertEqual((self.dest / "cfg").read_text(), "ok")

    def test_write_through_symlink(self) -> None:
        """A member written through an earlier symlink is refused."""
        self.refuse([_special("d", tarfile.SYMTYPE, "."), _file("d/x")], "through the symlink")

    def test_device_and_fifo(self) -> None:
        """Device files and FIFOs are refused."""
        self.refuse([_special("dev", tarfile.CHRTYPE)], "device file")
        self.refuse([_special("fifo", tarfile.FIFOTYPE)], "FIFO")

    def test_hard_link_outside(self) -> None:
        """A hard link to anything but an earlier member is refused."""
        self.refuse([_special("h", tarfile.LNKTYPE, "/etc/shadow")], "absolute path")
        self.refuse([_special("h", tarfile.LNKTYPE, "nothere")], "not an earlier file")

    def test_unpacked_size_limit(self) -> None:
        """Content beyond max_bytes is refused before it is written."""
        self.refuse([_file("big", b"y" * 5000)], "unpacks to more than", max_bytes=4096)

    def test_not_a_tarball(self) -> None:
        """Garbage gives a clear error."""
        (self.tmp / "g").write_bytes(b"\x00garbage" * 100)
        with self.assertRaises(UnpackError) as cm:
            safe_unpack(self.tmp / "g", self.dest, 10**6)
        self.assertIn("not a readable tar archive", str(cm.exception))
        self.assertFalse(self.dest.exists())
