"""Helpers for real-build tests: one warm wheel cache shared by the whole session."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from epio.config import validate
from epio.pipeline import MemoryLogSink

EXAMPLES = Path(__file__).resolve().parent.parent.parent.parent / "examples"
_shared: Path | None = None


def _rmtree(path: Path) -> None:
    for dirpath, dirnames, _ in os.walk(path):
        for d in dirnames:
            try:
                if not os.path.islink(os.path.join(dirpath, d)):
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


class Sink(MemoryLogSink):
    """The pipeline's in-memory ILogSink, plus the text of every line."""

    def text(self) -> str:
        return "\n".join(r.text for r in self.lines)


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


class PostgresDatabase:
    """A throw-away database on the machine's PostgreSQL (127.0.0.1:5432, user postgres)."""

    def __init__(self) -> None:
        import uuid

        self.name = f"epio_build_{uuid.uuid4().hex[:10]}"
        self.url = f"postgres://postgres@127.0.0.1:5432/{self.name}"

    def _admin(self, sql: str) -> None:
        import psycopg2

        conn = psycopg2.connect(
            host="127.0.0.1", port=5432, user="postgres", dbname="postgres", connect_timeout=5
        )
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
        finally:
            conn.close()

    def create(self) -> PostgresDatabase:
        self._admin(f'CREATE DATABASE "{self.name}"')
        return self

    def drop(self) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
