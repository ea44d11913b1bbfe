"""Unpacking an uploaded tarball without trusting it.

Rejected, with a message naming the member: absolute paths, ``..`` components,
device files, FIFOs and other special files, hard links to anything but an
earlier regular member, symlinks whose target leaves the tree, members written
through a symlink, more than ``max_members`` entries, and more than
``max_bytes`` of content (the sum of member sizes, checked before each member is
written).

A symlink's target is checked twice: on its text when the member is read, and,
once every member is unpacked, by resolving the link for real
(:func:`os.path.realpath`, through every other link of the archive) — a *chain*
of links that each look inside (``d1/d2/d3/up -> ../../..`` then
``m -> d1/d2/d3/up/../../..``) can still lead out, and only the resolution of the
finished tree sees that.  On any error the destination is removed: nothing is left behind.
Modes are reduced to the permission bits (no setuid/setgid/sticky); owners are
not restored.  This runs in a worker thread (it blocks on disk I/O).
"""

from __future__ import annotations

import os
import posixpath
import shutil
import tarfile
from pathlib import Path

from epio.domain import UPLOAD_MAX_MEMBERS as MAX_MEMBERS


class UnpackError(Exception):
    """The upload is not an acceptable tarball; the message says why."""


def _check_name(name: str) -> str:
    if "\x00" in name:
        raise UnpackError(f"refusing {name!r}: NUL byte in the name")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise UnpackError(f"refusing {name!r}: absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnpackError(f"refusing {name!r}: '..' in the path (path traversal)")
    return "/".join(parts)


def safe_unpack(
    tarball: str | Path, dest: str | Path, max_bytes: int, max_members: int = MAX_MEMBERS
) -> int:
    """Unpack ``tarball`` (any compression tarfile reads) into the new directory ``dest``.

    Returns the number of content bytes written.  Raises :class:`UnpackError`.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=False)
    try:
        return _unpack(Path(tarball), dest, max_bytes, max_members)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise


def _unpack(tarball: Path, dest: Path, max_bytes: int, max_members: int) -> int:
    total = 0
    count = 0
    symlinks: set[str] = set()
    regular: set[str] = set()
    dirs: list[tuple[Path, int]] = []
    try:
        tar = tarfile.open(tarball, mode="r:*")
    except (tarfile.TarError, EOFError, OSError) as e:
        raise UnpackError(f"the upload is not a readable tar archive ({e})") from None
    with tar:
        try:
            for member in tar:
                count += 1
                if count > max_members:
                    raise UnpackError(f"the upload has more than {max_members} entries")
                name = _check_name(member.name)
                if not name:
                    continue
                # never write through a symlink the archive created
                parent = name
                while "/" in parent:
                    parent = parent.rsplit("/", 1)[0]
                    if parent in symlinks:
                        raise UnpackError(
                            f"refusing {member.name!r}: it would be written through the symlink {parent!r}"
                        )
                target = dest / name
                if name in symlinks or name in regular:
                    raise UnpackError(f"refusing {member.name!r}: duplicate entry")
                mode = member.mode & 0o777
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    dirs.append((target, mode | 0o700))
                elif member.isreg():
                    total += member.size
                    if total > max_bytes:
                        raise UnpackError(
                            f"the upload unpacks to more than {max_bytes // (1024 * 1024)} MB (limit build.max_unpacked_mb)"
                        )
                    target.parent.mkdir(parents=True, exist_ok=True)
                    src = tar.extractfile(member)
                    assert src is not None
                    with src, open(target, "xb") as out:
                        shutil.copyfileobj(src, out, 1024 * 1024)
                    os.chmod(target, mode | 0o600)
                    regular.add(name)
                elif member.issym():
                    link = member.linkname
                    if not link or link.startswith("/"):
                        raise UnpackError(
                            f"refusing symlink {member.name!r} -> {link!r}: absolute target escapes the app"
                        )
                    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(name), link))
                    if resolved == ".." or resolved.startswith("../"):
                        raise UnpackError(
                            f"refusing symlink {member.name!r} -> {link!r}: it points outside the app"
                        )
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.symlink(link, target)
                    symlinks.add(name)
                elif member.islnk():
                    linked = _check_name(member.linkname)
                    if linked not in regular:
                        raise UnpackError(
                            f"refusing hard link {member.name!r} -> {member.linkname!r}: not an earlier file of the upload"
                        )
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(dest / linked, target)
                    os.chmod(target, (dest / linked).stat().st_mode & 0o777)
                    regular.add(name)
                else:
                    kind = (
                        "device file"
                        if member.ischr() or member.isblk()
                        else "FIFO"
                        if member.isfifo()
                        else "special file"
                    )
                    raise UnpackError(f"refusing {member.name!r}: {kind}s are not allowed")
        except (tarfile.TarError, EOFError, OSError, UnicodeError) as e:
            raise UnpackError(f"the upload is a damaged tar archive ({e})") from None
    _check_links(dest, sorted(symlinks))
    for path, mode in reversed(dirs):
        os.chmod(path, mode)
    return total


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root + os.sep)


def _check_links(dest: Path, names: list[str]) -> None:
    """Resolve every symlink of the unpacked tree through the real file system (so
    through the archive's other links) and refuse any that ends outside ``dest``."""
    root = os.path.realpath(dest)
    for name in names:
        resolved = os.path.realpath(os.path.join(root, name))
        if not _inside(resolved, root):
            raise UnpackError(
                f"refusing symlink {name!r} -> {os.readlink(os.path.join(root, name))!r}: "
                "it points outside the app (through other symlinks of the upload)"
            )
