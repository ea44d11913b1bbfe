"""The node's image store: content-addressed, immutable app images.

``DATA_DIR/images/<sha256>.squashfs`` is a SquashFS file whose sha256 is its
name.  Where SquashFS or loop mounts are unavailable, ``DATA_DIR/images/<sha256>/``
is a read-only directory image whose name is :func:`tree_digest` of its content
(a canonical listing: every path, its type, whether a file is executable, and the
sha256 of each file or the target of each symlink).  Both hold ``app/``, ``venv/`` and
``epio/manifest.json``.

SquashFS images are loop-mounted read-only (``nodev,nosuid``) at
``DATA_DIR/mounts/<sha256>``, once per node: :meth:`ImageStore.mount` is
reference-counted and idempotent, adopts a mount left by a previous run, and
:meth:`ImageStore.unmount` releases it when the last user is gone.  A directory
image "mounts" in place.

Runners fetch an image they lack from another node: the holder streams
:meth:`ImageStore.open_for_read` and the receiver feeds
:meth:`ImageStore.begin_import` (or :meth:`ImageStore.import_image`), which
verifies the digest before the image appears in the store.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from twisted.logger import Logger

_DIGEST = re.compile(r"^[0-9a-f]{64}$")
FORMATS = ("squashfs", "dir")


class ImageError(Exception):
    """An image operation failed; the message says why."""


def check_digest(digest: str) -> str:
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise ImageError(f"not an image digest: {digest!r}")
    return digest


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1024 * 1024), b""):
            h.update(chunk)
    return h.hexdigest()


def tree_listing(root: Path) -> Iterable[bytes]:
    """The canonical listing of a directory tree (one line per entry, sorted)."""

    def walk(d: Path, prefix: str) -> Iterable[bytes]:
        for name in sorted(os.listdir(d)):
            p = d / name
            rel = prefix + name
            st = p.lstat()
            if stat.S_ISDIR(st.st_mode):
                yield f"d {rel}\n".encode("utf-8", "surrogateescape")
                yield from walk(p, rel + "/")
            elif stat.S_ISLNK(st.st_mode):
                target = os.readlink(p)
                yield f"l {rel}\0{target}\n".encode("utf-8", "surrogateescape")
            elif stat.S_ISREG(st.st_mode):
                x = "x" if st.st_mode & 0o100 else "-"
                yield f"f {x} {file_digest(p)} {rel}\n".encode("utf-8", "surrogateescape")
            else:
                raise ImageError(f"special file in image tree: {rel}")

    yield from walk(root, "")


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for line in tree_listing(root):
        h.update(line)
    return h.hexdigest()


def keep_digests(releases: Mapping[str, Sequence[str]], keep_releases: int) -> set[str]:
    """Digests to keep: the newest ``keep_releases`` of each app's releases.

    ``releases`` maps an app to its releases' image digests, newest first.
    """
    keep: set[str] = set()
    for digests in releases.values():
        keep.update(digests[: max(keep_releases, 1)])
    return keep


def _mounted_at(mountinfo: Path = Path("/proc/self/mountinfo")) -> set[str]:
    out = set()
    try:
        for line in mountinfo.read_text().splitlines():
            parts = line.split()
            if len(parts) > 4:
                out.add(parts[4].replace("\\040", " "))
    except OSError:
        pass
    return out


class ImageWriter:
    """Receives an image's bytes and installs it only if they hash to ``digest``."""

    def __init__(self, store: ImageStore, digest: str, fmt: str) -> None:
        self.store = store
        self.digest = digest
        self.format = fmt
        store.images_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=store.images_dir, prefix=".import-")
        self._tmp = Path(name)
        self._file: IO[bytes] = os.fdopen(fd, "wb")
        self._hash = hashlib.sha256()

    def write(self, data: bytes) -> None:
        self._file.write(data)
        if self.format == "squashfs":
            self._hash.update(data)

    def abort(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)

    def finish(self) -> Path:
        """Verify and install; raises ImageError (and removes the data) on mismatch."""
        self._file.close()
        try:
            if self.format == "squashfs":
                got = self._hash.hexdigest()
                if got != self.digest:
                    raise ImageError(f"image data hashes to {got}, not {self.digest}")
                final = self.store.images_dir / f"{self.digest}.squashfs"
                os.chmod(self._tmp, 0o444)
                os.replace(self._tmp, final)
                return final
            tmpdir = Path(tempfile.mkdtemp(dir=self.store.images_dir, prefix=".import-"))
            try:
                from epio.runner.build.unpack import UnpackError, safe_unpack

                try:
                    safe_unpack(self._tmp, tmpdir / "t", max_bytes=1 << 40)
                except UnpackError as e:
                    raise ImageError(f"image archive rejected: {e}") from None
                got = tree_digest(tmpdir / "t")
                if got != self.digest:
                    raise ImageError(f"image tree hashes to {got}, not {self.digest}")
                final = self.store.images_dir / self.digest
                make_read_only(tmpdir / "t")
                if final.exists():
                    return final
                _move_read_only_dir(tmpdir / "t", final)
                return final
            finally:
                shutil.rmtree(tmpdir, ignore_errors=True)
        finally:
            self._tmp.unlink(missing_ok=True)


def make_read_only(root: Path) -> None:
    """Owner root (when we are root), no write bits anywhere, readable by all."""
    is_root = os.geteuid() == 0
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if is_root:
                os.lchown(p, 0, 0)
            if not stat.S_ISLNK(st.st_mode):
                mode = stat.S_IMODE(st.st_mode)
                mode = (
                    mode | 0o444 | (0o111 if mode & 0o100 or stat.S_ISDIR(st.st_mode) else 0)
                ) & 0o555
                os.chmod(p, mode)
    if is_root:
        os.lchown(root, 0, 0)
    os.chmod(root, 0o555)


class ImageStore:
    """Images of one node under ``DATA_DIR/images`` and their mounts under ``DATA_DIR/mounts``."""

    log = Logger()

    def __init__(self, data_dir: str | Path, reactor: Any = None) -> None:
        self.data_dir = Path(data_dir)
        self.images_dir = self.data_dir / "images"
        self.mounts_dir = self.data_dir / "mounts"
        self.reactor = reactor
        self._refs: dict[str, int] = {}
        self._locks: dict[str, Any] = {}

    def _lock(self, digest: str) -> Any:
        from twisted.internet.defer import DeferredLock

        return self._locks.setdefault(digest, DeferredLock())

    # ------------------------------------------------------------------ lookup

    def path(self, digest: str) -> Path:
        """Where the image is (raises ImageError if this node does not have it)."""
        check_digest(digest)
        f = self.images_dir / f"{digest}.squashfs"
        if f.is_file():
            return f
        d = self.images_dir / digest
        if d.is_dir():
            return d
        raise ImageError(f"image {digest} is not on this node")

    def has(self, digest: str) -> bool:
        try:
            self.path(digest)
            return True
        except ImageError:
            return False

    def format(self, digest: str) -> str:
        return "squashfs" if self.path(digest).suffix == ".squashfs" else "dir"

    def digests(self) -> set[str]:
        out = set()
        if self.images_dir.is_dir():
            for p in self.images_dir.iterdir():
                name = p.name.removesuffix(".squashfs")
                if _DIGEST.match(name):
                    out.add(name)
        return out

    def verify(self, digest: str) -> bool:
        """Recompute the image's digest (blocking: run it in a thread for big images)."""
        p = self.path(digest)
        got = file_digest(p) if p.is_file() else tree_digest(p)
        return got == digest

    # ------------------------------------------------------------------ adding

    def add_squashfs(self, tmp_file: Path) -> str:
        """Move a finished SquashFS file into the store under its digest."""
        digest = file_digest(tmp_file)
        self.images_dir.mkdir(parents=True, exist_ok=True)
        final = self.images_dir / f"{digest}.squashfs"
        if final.exists():
            tmp_file.unlink()
        else:
            os.chmod(tmp_file, 0o444)
            os.replace(tmp_file, final)
        return digest

    def add_tree(self, tree: Path) -> str:
        """Move a finished image tree into the store as a read-only directory image."""
        make_read_only(tree)
        digest = tree_digest(tree)
        self.images_dir.mkdir(parents=True, exist_ok=True)
        final = self.images_dir / digest
        if final.exists():
            _force_rmtree(tree)
        else:
            _move_read_only_dir(tree, final)
        return digest

    def begin_import(self, digest: str, fmt: str = "squashfs") -> ImageWriter:
        check_digest(digest)
        if fmt not in FORMATS:
            raise ImageError(f"unknown image format {fmt!r}")
        return ImageWriter(self, digest, fmt)

    def import_image(self, stream: IO[bytes], digest: str, fmt: str = "squashfs") -> Path:
        """Read an image from ``stream`` (as :meth:`open_for_read` gives it); verify; install."""
        if self.has(digest):
            return self.path(digest)
        w = self.begin_import(digest, fmt)
        try:
            for chunk in iter(lambda: stream.read(1024 * 1024), b""):
                w.write(chunk)
        except BaseException:
            w.abort()
            raise
        return w.finish()

    def open_for_read(self, digest: str) -> IO[bytes]:
        """A binary stream of the image for another node: the SquashFS file itself,
        or an uncompressed tar of a directory image."""
        p = self.path(digest)
        if p.is_file():
            return open(p, "rb")
        buf = tempfile.SpooledTemporaryFile(max_size=64 * 1024 * 1024)
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames.sort()
                for name in sorted(dirnames + filenames):
                    full = Path(dirpath) / name
                    tar.add(full, arcname=str(full.relative_to(p)), recursive=False)
        buf.seek(0)
        return buf

    # ------------------------------------------------------------------ mounts

    def mount_point(self, digest: str) -> Path:
        return self.mounts_dir / check_digest(digest)

    def is_mounted(self, digest: str) -> bool:
        return str(self.mount_point(digest)) in _mounted_at()

    async def mount(self, digest: str) -> Path:
        """Mount the image read-only (once per node; counted); return where its root is.

        Idempotent: a mount left by a previous run of the node is adopted.
        """
        p = self.path(digest)
        if p.is_dir():
            self._refs[digest] = self._refs.get(digest, 0) + 1
            return p
        mp = self.mount_point(digest)
        lock = self._lock(digest)
        await lock.acquire()
        try:
            if not self.is_mounted(digest):
                mp.mkdir(parents=True, exist_ok=True)
                await self._run(
                    ["mount", "-t", "squashfs", "-o", "loop,ro,nodev,nosuid", str(p), str(mp)]
                )
                self.log.info("mounted image {digest} at {path}", digest=digest, path=str(mp))
            self._refs[digest] = self._refs.get(digest, 0) + 1
        finally:
            lock.release()
        return mp

    async def unmount(self, digest: str, force: bool = False) -> None:
        """Release one reference; unmount when none is left (or at once with ``force``)."""
        n = self._refs.get(digest, 0) - 1
        if n > 0 and not force:
            self._refs[digest] = n
            return
        self._refs.pop(digest, None)
        if self.path(digest).is_dir():
            return
        mp = self.mount_point(digest)
        lock = self._lock(digest)
        await lock.acquire()
        try:
            if self.is_mounted(digest) and not self._refs.get(digest):
                await self._run(["umount", str(mp)])
                self.log.info("unmounted image {digest}", digest=digest)
                try:
                    mp.rmdir()
                except OSError:
                    pass
        finally:
            lock.release()

    async def _run(self, argv: list[str]) -> None:
        from epio.runner.build.proc import run_step

        if self.reactor is None:
            raise ImageError("ImageStore needs a reactor to mount images")
        lines: list[str] = []
        result = await run_step(
            self.reactor,
            argv,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
            cwd="/",
            on_line=lines.append,
            timeout=60.0,
        )
        if not result.ok:
            raise ImageError(f"{argv[0]} failed: {' '.join(lines[-3:]) or result}")

    # ------------------------------------------------------------------ gc

    def gc(self, keep: set[str], *, grace: float = 0.0, now: float | None = None) -> list[str]:
        """Remove images not in ``keep``, not mounted and older than ``grace`` seconds.

        Returns the removed digests.  ``now`` is the current time (reactor.seconds()).
        """
        removed = []
        mounted = _mounted_at()
        for digest in sorted(self.digests()):
            if digest in keep or self._refs.get(digest) or str(self.mount_point(digest)) in mounted:
                continue
            try:
                p = self.path(digest)
            except ImageError:
                continue
            if grace and now is not None and now - p.lstat().st_mtime < grace:
                continue
            if p.is_dir():
                _force_rmtree(p)
            else:
                p.unlink(missing_ok=True)
            removed.append(digest)
            self.log.info("image {digest} removed: no release references it", digest=digest)
        return removed


def _move_read_only_dir(src: Path, dest: Path) -> None:
    """Rename a read-only directory (moving a directory needs write access to it)."""
    os.chmod(src, 0o755)
    try:
        os.replace(src, dest)
    finally:
        os.chmod(dest if dest.exists() else src, 0o555)


def unlock_tree(path: Path, mode: int = 0o700) -> None:
    """Make every real directory under ``path`` writable again (never through a symlink)."""
    for dirpath, dirnames, _ in os.walk(path):
        for d in dirnames:
            p = os.path.join(dirpath, d)
            if not os.path.islink(p):
                try:
                    os.chmod(p, mode)
                except OSError:
                    pass
    if not path.is_symlink():
        try:
            os.chmod(path, mode)
        except OSError:
            pass


def _force_rmtree(path: Path) -> None:
    unlock_tree(path)
    shutil.rmtree(path, ignore_errors=True)


async def collect_garbage(
    store: Any, images: ImageStore, keep_releases: int, *, grace: float, now: float
) -> list[str]:
    """GC this node's images against the store: keep each app's newest ``keep_releases``
    releases' images and those of deploys still in flight; remove the rest (unless
    mounted or younger than ``grace`` seconds).  Returns the removed digests."""
    releases: dict[str, list[str]] = {}
    keep: set[str] = set()
    # destroyed apps too: a restored app runs its release's image again
    for app in [*await store.list_apps(), *await store.list_apps(destroyed=True)]:
        rel = await store.list_releases(app.name, limit=keep_releases)
        releases[app.name] = [r.image for r in rel if r.image]
        for d in await store.list_deploys(app.name, limit=20):
            if d.image and d.status in ("building", "built", "deploying"):
                keep.add(d.image)
    keep |= keep_digests(releases, keep_releases)
    if images.reactor is not None:
        from twisted.internet import threads

        removed: list[str] = await threads.deferToThreadPool(
            images.reactor,
            images.reactor.getThreadPool(),
            lambda: images.gc(keep, grace=grace, now=now),
        )
        return removed
    return images.gc(keep, grace=grace, now=now)
