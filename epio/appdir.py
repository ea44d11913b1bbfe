"""An app directory as the CLI uploads it: ``.epioignore`` rules and the tarball.

``.epioignore`` uses gitignore syntax: one pattern a line, ``#`` comments,
``!`` re-includes, a trailing ``/`` matches directories only, a pattern with a
``/`` elsewhere is anchored at the app root (otherwise it matches at any depth),
``*``/``?``/``[...]`` do not cross ``/``, ``**`` does.  As in git, a file inside an
excluded directory cannot be re-included.  A few patterns are always applied
first (:data:`DEFAULT_IGNORES`); the app's own rules may re-include them.
"""

from __future__ import annotations

import os
import re
import stat
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

from attrs import frozen

__all__ = ["DEFAULT_IGNORES", "IGNORE_FILE", "IgnoreRules", "iter_app_files", "make_tarball"]

IGNORE_FILE = ".epioignore"
DEFAULT_IGNORES = (".git/", ".hg/", ".svn/", "__pycache__/", "*.py[co]", ".epio-app")


@frozen
class _Rule:
    regex: re.Pattern[str]
    negate: bool
    dir_only: bool


def _translate(pat: str) -> str:
    out: list[str] = []
    i, n = 0, len(pat)
    while i < n:
        c = pat[i]
        if pat.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pat.startswith("/**", i) and i + 3 == n:
            out.append("/.*")
            i += 3
        elif pat.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            j = pat.find("]", i + 2 if pat[i + 1 : i + 2] in ("!", "^") else i + 1)
            if j == -1:
                out.append(re.escape(c))
                i += 1
                continue
            body = pat[i + 1 : j]
            if body[:1] in ("!", "^"):
                body = "^" + body[1:]
            out.append("[" + body.replace("\\", "\\\\") + "]")
            i = j + 1
        elif c == "\\" and i + 1 < n:
            out.append(re.escape(pat[i + 1]))
            i += 2
        else:
            out.append(re.escape(c))
            i += 1
    return "".join(out)


def _compile(line: str) -> _Rule | None:
    line = line.rstrip("\n")
    # trailing spaces are ignored unless escaped
    while line.endswith(" ") and not line.endswith("\\ "):
        line = line[:-1]
    if not line or line.startswith("#"):
        return None
    negate = False
    if line.startswith("!"):
        negate, line = True, line[1:]
    elif line.startswith(("\\!", "\\#")):
        line = line[1:]
    dir_only = line.endswith("/")
    line = line.rstrip("/")
    if not line:
        return None
    anchored = "/" in line
    line = line.lstrip("/")
    body = _translate(line)
    regex = "^" + ("" if anchored else "(?:.*/)?") + body + "$"
    return _Rule(re.compile(regex, re.DOTALL), negate, dir_only)


class IgnoreRules:
    """Compiled ``.epioignore`` rules; ``ignored(path, is_dir)`` answers for one path."""

    def __init__(self, lines: list[str] | tuple[str, ...]) -> None:
        self.rules = [r for r in (_compile(line) for line in lines) if r is not None]

    @classmethod
    def for_app(cls, app_dir: str | Path) -> IgnoreRules:
        p = Path(app_dir) / IGNORE_FILE
        lines = list(DEFAULT_IGNORES)
        if p.is_file():
            lines += p.read_text("utf-8").splitlines()
        return cls(lines)

    def ignored(self, relpath: str, is_dir: bool = False) -> bool:
        """Whether ``relpath`` (posix, relative to the app root) is excluded."""
        result = False
        for rule in self.rules:
            if rule.dir_only and not is_dir:
                continue
            if rule.regex.match(relpath):
                result = not rule.negate
        return result


def iter_app_files(
    app_dir: str | Path, rules: IgnoreRules | None = None
) -> Iterator[tuple[str, Path]]:
    """Yield ``(relpath, path)`` for every directory, file and symlink to upload, sorted.

    Excluded directories are not descended into; sockets, FIFOs and devices are skipped.
    """
    root = Path(app_dir)
    rules = rules if rules is not None else IgnoreRules.for_app(root)

    def walk(d: Path, prefix: str) -> Iterator[tuple[str, Path]]:
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError:
            return
        for e in entries:
            rel = f"{prefix}{e.name}"
            is_dir = e.is_dir(follow_symlinks=False)
            if rules.ignored(rel, is_dir):
                continue
            mode = e.stat(follow_symlinks=False).st_mode
            if is_dir:
                yield rel, Path(e.path)
                yield from walk(Path(e.path), rel + "/")
            elif stat.S_ISREG(mode) or stat.S_ISLNK(mode):
                yield rel, Path(e.path)

    yield from walk(root, "")


def make_tarball(app_dir: str | Path, dest: str | Path | None = None) -> Path:
    """Write the upload tarball (gzip) of ``app_dir`` honouring ``.epioignore``.

    Returns the tarball's path (``dest``, or a new temporary file the caller
    removes).  Owners are normalised to 0/0 so the archive reveals nothing about
    the user's machine.
    """
    root = Path(app_dir)
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a directory")
    if dest is None:
        fd, name = tempfile.mkstemp(prefix="epio-upload-", suffix=".tar.gz")
        os.close(fd)
        dest = name
    out = Path(dest)

    def clean(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

    with tarfile.open(out, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        for rel, path in iter_app_files(root):
            tar.add(path, arcname=rel, recursive=False, filter=clean)
    return out
