"""Helpers for real-build tests: one warm wheel cache shared by the whole session."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from epio.config import validate

EXAMPLES = Path(__file__).resolve().parent.parent.parent.parent / "examples"
_shared: Path | None = None


def _rmtree(path: Path) -> None:
    for dirpath, dirnames, _ in os.walk(path):
        for d in dirnames:
            try:
                os.chmod(os.path.join(dirpath, d), 0o755)
            except OSError:
                pass
    shutil.rmtree(path, ignore_errors=True)


def shared_cache() -> Path:
    """The session's node cache (wheels, pip cache, resolved markers), made once."""
    global _shared
    if _shared is None:
        _shared = Path(tempfile.mkdtemp(prefix="epio-build-cache-"))
        os.chmod(_shared, 0o755)
        atexit.register(_rmtree, _shared)
    return _shared


def data_dir(test: Any) -> Path:
    """A fresh node data dir for ``test`` whose cache is the shared one."""
    d = Path(tempfile.mkdtemp(prefix="epio-build-"))
    os.chmod(d, 0o711)
    (d / "cache").symlink_to(shared_cache())
    test.addCleanup(_rmtree, d)
    return d


def config(**build: Any) -> Any:
    return validate({"build": build})


class Sink:
    """Records emitted log lines (implements ILogSink.emit)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, str]] = []

    def emit(self, app: str, source: str, text: str, timestamp: float | None = None) -> None:
        self.lines.append((app, source, text))

    def text(self) -> str:
        return "\n".join(t for _, _, t in self.lines)


def write_app(root: Path, files: dict[str, str]) -> Path:
    for name, content in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(content)
    return root


def build_cgroups() -> list[Path]:
    """Build memory cgroups that still exist (none may survive a build)."""
    own = "/"
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and "memory" in parts[1].split(","):
            own = parts[2]
    base = Path("/sys/fs/cgroup/memory") / own.lstrip("/") / "epio-build"
    return [p for p in base.iterdir() if p.is_dir()] if base.is_dir() else []
