"""The stats table: the logger's 10 s and 1 min points (see :mod:`epio.logs.stats`).

``epio_stats (app, metric, instance, resolution, ts, value)``, primary key on all
but value, created by store migration 8.  Several loggers write the same rows: the
upsert keeps the larger value (``MAX``/``GREATEST``), so loggers that saw the same
stream agree and one that missed samples cannot lower a count.

Before migration 8 the logger kept this table itself: in the store's PostgreSQL
database (the migration finds it there and keeps it), or with an SQLite store in a
file of its own, ``DATA_DIR/stats.sqlite3``, which :func:`import_legacy_sqlite`
copies into the store once.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from attrs import frozen
from twisted.internet.defer import Deferred

from epio.store.backend import POSTGRESQL, Transaction
from epio.store.store import Store

TABLE = "epio_stats"
COLUMNS = ("app", "metric", "instance", "resolution", "ts", "value")
KEY = "app, metric, instance, resolution, ts"
WRITE_CHUNK = 100  # rows per INSERT (SQLite allows 999 parameters in old builds)


@frozen
class Point:
    """One value of one metric (of one instance, for gauges) in one bucket."""

    app: str
    metric: str
    instance: str
    resolution: int
    ts: int
    value: float


def _like_prefix(metric: str) -> str:
    return metric.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _upsert(dialect: str, rows: int) -> str:
    larger = "GREATEST" if dialect == POSTGRESQL else "MAX"
    values = ", ".join(["(?, ?, ?, ?, ?, ?)"] * rows)
    return (f"INSERT INTO {TABLE} ({', '.join(COLUMNS)}) VALUES {values} "
            f"ON CONFLICT ({KEY}) DO UPDATE SET value = {larger}({TABLE}.value, excluded.value)")


async def _write_rows(store: Store, rows: Sequence[tuple[Any, ...]]) -> None:
    async def q(tx: Transaction) -> None:
        for i in range(0, len(rows), WRITE_CHUNK):
            chunk = rows[i:i + WRITE_CHUNK]
            await tx.execute(_upsert(tx.dialect, len(chunk)), [v for r in chunk for v in r])

    if rows:
        await store.transaction(q)


async def write_points(store: Store, points: Sequence[Point]) -> None:
    """Write ``points`` in one transaction, keeping the larger of two values."""
    await _write_rows(store, [(p.app, p.metric, p.instance, p.resolution, p.ts, p.value)
                              for p in points])


async def query_points(store: Store, app: str, metric: str | None, since: float, until: float,
                       resolution: int) -> list[tuple[str, str, int, float]]:
    """``(metric, instance, ts, value)`` of ``app`` at ``resolution`` in ``[since, until)``,
    by metric, instance and time; ``metric`` matches itself and its ``metric.*``
    children (a LIKE prefix, escaped)."""
    sql = (f"SELECT metric, instance, ts, value FROM {TABLE} WHERE app = ? "
           "AND resolution = ? AND ts >= ? AND ts < ?")
    args: list[Any] = [app, resolution, since, until]
    if metric:
        sql += " AND (metric = ? OR metric LIKE ? ESCAPE '\\')"
        args += [metric, _like_prefix(metric)]
    sql += " ORDER BY metric, instance, ts"

    async def q(tx: Transaction) -> list[tuple[str, str, int, float]]:
        rows = (await tx.execute(sql, args)).rows
        return [(str(r[0]), str(r[1]), int(r[2]), float(r[3])) for r in rows]

    return await store.transaction(q, readonly=True)


async def expire_points(store: Store, resolution: int, before: float) -> int:
    """Delete the points of ``resolution`` older than ``before``; how many went."""

    async def q(tx: Transaction) -> int:
        return (await tx.execute(f"DELETE FROM {TABLE} WHERE resolution = ? AND ts < ?",
                                 (resolution, before))).rowcount

    return await store.transaction(q)


IMPORT_BATCH = 5000  # legacy rows read and written at a time


async def import_legacy_sqlite(store: Store, path: Path,
                               run_blocking: Callable[[Callable[[], Any]], Deferred[Any]]) -> int:
    """Copy the rows of a pre-migration-8 stats file into the store, then rename the
    file ``*.imported``; the number of rows copied (0 when there is no such file).

    An import cut short is done again at the next start: the upsert keeps the
    larger value, so a row copied twice is still right.
    """
    if not path.exists():
        return 0

    def read(after: int) -> list[tuple[Any, ...]]:
        db = sqlite3.connect(str(path), timeout=10)
        try:
            return db.execute(f"SELECT rowid, {', '.join(COLUMNS)} FROM {TABLE} "
                              "WHERE rowid > ? ORDER BY rowid LIMIT ?",
                              (after, IMPORT_BATCH)).fetchall()
        except sqlite3.OperationalError as e:
            if "no such table" in str(e):
                return []  # a file the old logger created but never got to write
            raise
        finally:
            db.close()

    copied, last = 0, 0
    while True:
        rows: list[tuple[Any, ...]] = await run_blocking(partial(read, last))
        if not rows:
            break
        last = int(rows[-1][0])
        await _write_rows(store, [r[1:] for r in rows])
        copied += len(rows)

    def retire() -> None:
        for suffix in ("", "-wal", "-shm"):
            part = path.with_name(path.name + suffix)
            if part.exists():
                part.rename(part.with_name(part.name + ".imported"))

    await run_blocking(retire)
    return copied
