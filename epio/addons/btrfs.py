"""btrfs subvolumes and read-only snapshots for dedicated data directories (issue 10).

A dedicated server's data directory (``.epio-<kind>-<key>`` under the app's data dir)
is made a btrfs subvolume when its parent is on btrfs and ``btrfs`` is installed (the
runner does it as root, on the host, before the sandbox starts); otherwise it is a plain
directory.  A subvolume can be snapshotted atomically (read-only, copy-on-write): a
crash-consistent copy of a running server's files taken in milliseconds.

Everything here is blocking (``subprocess`` with timeouts, no shell): call it from a
thread, or where a short block is acceptable.
"""

from __future__ import annotations

import os
import shutil
import stat as stat_mod
import subprocess
from pathlib import Path

TIMEOUT = 30.0
# the root directory of every btrfs subvolume has this inode number
SUBVOLUME_INODE = 256


class BtrfsError(Exception):
    """A btrfs command failed (the message says which and why)."""


def btrfs_tool() -> str | None:
    return shutil.which("btrfs") or next(
        (p for p in ("/usr/bin/btrfs", "/bin/btrfs", "/sbin/btrfs", "/usr/sbin/btrfs")
         if os.access(p, os.X_OK)), None)


def _run(argv: list[str], timeout: float = TIMEOUT) -> str:
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise BtrfsError(f"{' '.join(argv[:3])} took more than {timeout:g} s") from None
    except OSError as e:
        raise BtrfsError(f"{argv[0]} cannot run: {e.strerror}") from None
    if done.returncode != 0:
        why = (done.stderr or done.stdout).strip().splitlines()
        raise BtrfsError(f"{' '.join(argv[:3])} failed (exit {done.returncode}): "
                         f"{why[-1] if why else 'no message'}")
    return done.stdout


def fs_type(path: str | os.PathLike[str]) -> str:
    """The filesystem type of ``path`` as ``stat -f`` names it (``btrfs``, ``ext2/ext3``...)."""
    return _run(["stat", "-f", "-c", "%T", os.fspath(path)], timeout=5.0).strip()


def is_btrfs(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` (which must exist) is on a btrfs filesystem."""
    try:
        return fs_type(path) == "btrfs"
    except BtrfsError:
        return False


def is_subvolume(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is the root of a btrfs subvolume (or snapshot)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return (stat_mod.S_ISDIR(st.st_mode) and st.st_ino == SUBVOLUME_INODE
            and is_btrfs(path))


def unsupported_reason(parent: str | os.PathLike[str]) -> str | None:
    """Why a subvolume cannot be made under ``parent``, or None when it can."""
    if not is_btrfs(parent):
        return f"{os.fspath(parent)} is not on btrfs"
    if btrfs_tool() is None:
        return "the btrfs tool (btrfs-progs) is not installed"
    if os.geteuid() != 0:
        return "not root"
    return None


def make_data_dir(path: str | os.PathLike[str], mode: int = 0o700) -> bool:
    """Create ``path``: a subvolume when its parent supports it, else a plain directory.

    Returns True for a subvolume.  Raises :class:`BtrfsError` when the parent is on
    btrfs and the subvolume cannot be made, ``FileExistsError`` when ``path`` exists.
    """
    path = Path(path)
    if path.exists() or path.is_symlink():
        raise FileExistsError(f"{path} exists")
    if unsupported_reason(path.parent) is None:
        _run([btrfs_tool() or "btrfs", "subvolume", "create", str(path)])
        os.chmod(path, mode)
        return True
    path.mkdir(mode=mode)
    os.chmod(path, mode)
    return False


def snapshot(path: str | os.PathLike[str], dest: str | os.PathLike[str]) -> None:
    """A read-only snapshot of subvolume ``path`` at ``dest`` (which must not exist)."""
    if not is_subvolume(path):
        raise BtrfsError(f"{os.fspath(path)} is not a btrfs subvolume: no snapshot")
    if os.path.lexists(dest):
        raise BtrfsError(f"{os.fspath(dest)} exists")
    _run([btrfs_tool() or "btrfs", "subvolume", "snapshot", "-r", os.fspath(path),
          os.fspath(dest)])


def snapshot_writable(path: str | os.PathLike[str], dest: str | os.PathLike[str]) -> None:
    """A writable snapshot of subvolume ``path`` at ``dest`` (a restore: the data dir
    made again from a read-only snapshot; ownership and modes come with it)."""
    if not is_subvolume(path):
        raise BtrfsError(f"{os.fspath(path)} is not a btrfs subvolume: no snapshot")
    if os.path.lexists(dest):
        raise BtrfsError(f"{os.fspath(dest)} exists")
    _run([btrfs_tool() or "btrfs", "subvolume", "snapshot", os.fspath(path), os.fspath(dest)])


def delete_snapshot(dest: str | os.PathLike[str]) -> None:
    """Delete the snapshot (a subvolume) at ``dest``."""
    if not is_subvolume(dest):
        raise BtrfsError(f"{os.fspath(dest)} is not a btrfs subvolume: not deleted")
    _run([btrfs_tool() or "btrfs", "subvolume", "delete", os.fspath(dest)])


def is_read_only(path: str | os.PathLike[str]) -> bool:
    """Whether subvolume ``path`` has the read-only property."""
    out = _run([btrfs_tool() or "btrfs", "property", "get", "-ts", os.fspath(path), "ro"])
    return out.strip() == "ro=true"
