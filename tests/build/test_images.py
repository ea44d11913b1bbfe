"""The image store: digests, verification on import, garbage collection."""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from epio.runner.build.images import ImageError, ImageStore, keep_digests, tree_digest


class ImageStoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.tmp = Path(tempfile.mkdtemp())
        self.addCleanup(self._cleanup)
        self.store = ImageStore(self.tmp / "node")

    def _cleanup(self) -> None:
        for dirpath, dirnames, _ in os.walk(self.tmp):
            for d in dirnames:
                if not os.path.islink(os.path.join(dirpath, d)):
                    os.chmod(os.path.join(dirpath, d), 0o755)
        shutil.rmtree(self.tmp)

    def _tree(self, content: str) -> Path:
        t = Path(tempfile.mkdtemp(dir=self.tmp))
        (t / "app").mkdir()
        (t / "app" / "x.py").write_text(content)
        os.symlink("x.py", t / "app" / "y.py")
        return t

    def _squashfs_like(self, data: bytes) -> str:
        f = self.tmp / "img.tmp"
        f.write_bytes(data)
        return self.store.add_squashfs(f)

    def test_tree_digest_is_content_only(self) -> None:
        """Equal content gives equal digests; changed content changes them."""
        a, b, c = self._tree("1"), self._tree("1"), self._tree("2")
        os.utime(b / "app" / "x.py", (0, 0))
        self.assertEqual(tree_digest(a), tree_digest(b))
        self.assertNotEqual(tree_digest(a), tree_digest(c))

    def test_dir_image_is_read_only_and_verifies(self) -> None:
        """add_tree stores a read-only directory image named by its digest."""
        digest = self.store.add_tree(self._tree("v1"))
        p = self.store.path(digest)
        self.assertEqual(p.name, digest)
        self.assertEqual(p.stat().st_mode & 0o222, 0)
        self.assertTrue(self.store.verify(digest))
        self.assertEqual(self.store.format(digest), "dir")

    def test_export_import_verifies_digest(self) -> None:
        """Another node's store imports an image only when the bytes hash to its digest."""
        digest = self._squashfs_like(b"image bytes" * 1000)
        other = ImageStore(self.tmp / "other")
        with self.store.open_for_read(digest) as stream:
            other.import_image(stream, digest)
        self.assertTrue(other.verify(digest))
        bad = "0" * 64
        with self.assertRaises(ImageError):
            other.import_image(io.BytesIO(b"tampered"), bad)
        self.assertFalse(other.has(bad))
        self.assertEqual([p.name for p in other.images_dir.iterdir() if p.name.startswith(".")], [])

    def test_dir_image_export_import(self) -> None:
        """A directory image travels as a tar and is re-verified by tree digest."""
        digest = self.store.add_tree(self._tree("dir"))
        other = ImageStore(self.tmp / "other")
        with self.store.open_for_read(digest) as stream:
            other.import_image(stream, digest, fmt="dir")
        self.assertTrue(other.verify(digest))

    def test_gc_keeps_referenced_and_recent(self) -> None:
        """gc removes unreferenced images, keeps referenced ones and those within grace."""
        old = self._squashfs_like(b"old")
        kept = self._squashfs_like(b"kept")
        now = os.stat(self.store.path(old)).st_mtime
        self.assertEqual(self.store.gc({kept}, grace=3600, now=now + 10), [])
        self.assertEqual(self.store.gc({kept}, grace=3600, now=now + 7200), [old])
        self.assertTrue(self.store.has(kept))
        self.assertFalse(self.store.has(old))

    def test_keep_digests(self) -> None:
        """The newest N releases of each app are kept."""
        keep = keep_digests({"a": ["a3", "a2", "a1"], "b": ["b1"]}, 2)
        self.assertEqual(keep, {"a3", "a2", "b1"})

    def test_bad_digest(self) -> None:
        """Digests are checked before touching the filesystem."""
        self.assertRaises(ImageError, self.store.path, "../../etc")
        self.assertFalse(self.store.has("f" * 64))
