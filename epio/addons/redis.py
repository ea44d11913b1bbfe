"""Dedicated Redis per app: its command line and a guard for its persistence.

Each app with ``[services] redis = true`` gets its own ``redis-server`` (run by a
runner like any supervised process) with a password, ``maxmemory`` from
``[redis] memory`` (MB) and an eviction policy.  Every write goes to the
append-only file (``appendfsync everysec``) and a clean stop saves
(``shutdown-on-sigterm save``).  Automatic RDB snapshots are off (``save ""``):
the :class:`PersistenceGuard` takes them on a schedule, and only when the data
directory has room for one — ep.io lost Redis data to a disk filled by
snapshots.  A refused or failed snapshot is reported, never silent.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attrs import frozen
from twisted.logger import Logger

from epio.secretfile import write_secret_file

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime


DEFAULT_MEMORY_MB = 16
DEFAULT_POLICY = "allkeys-lru"
POLICIES = frozenset({
    "noeviction", "allkeys-lru", "allkeys-lfu", "allkeys-random", "volatile-lru",
    "volatile-lfu", "volatile-random", "volatile-ttl",
})
# A snapshot needs room for the dump (at most the dataset) plus the old dump while
# the new one is written: ask for the used memory times this factor, plus a margin.
SPACE_FACTOR = 1.5
SPACE_MARGIN = 1 << 20
SNAPSHOT_TIMEOUT = 300.0  # seconds a BGSAVE may take before it is reported as failed


class RedisSpecError(ValueError):
    pass


@frozen
class RedisSpec:
    """Everything a runner needs to start an app's Redis."""

    app: str
    port: int
    password: str
    memory_mb: int
    policy: str
    data_dir: Path
    bind: str = "127.0.0.1"

    def argv(self, redis_server: str = "redis-server") -> list[str]:
        """The command line; the password is passed in a config file, not argv."""
        return [redis_server, str(self.config_path)]

    @property
    def config_path(self) -> Path:
        return self.data_dir / "redis.conf"

    def config_text(self) -> str:
        return "\n".join([
            *redis_config_lines(self.password, self.memory_mb, self.policy, self.bind),
            f"port {self.port}",
            f'dir "{self.data_dir}"',
            "",
        ])

    def write_config(self) -> Path:
        """Write the config file (0600: it holds the password)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return write_secret_file(self.config_path, self.config_text())

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@{self.bind}:{self.port}/0"

    def __repr__(self) -> str:
        return f"RedisSpec(app={self.app!r}, port={self.port}, memory_mb={self.memory_mb})"


def redis_config_lines(password: str, memory_mb: int, policy: str, bind: str) -> list[str]:
    """Every line of an app Redis' config except ``port`` and ``dir``."""
    return [
        f"bind {bind}",
        "protected-mode yes",
        f"requirepass {password}",
        f"maxmemory {memory_mb}mb",
        f"maxmemory-policy {policy}",
        "dbfilename dump.rdb",
        'save ""',
        # every write goes to the append-only file before it is acknowledged and is
        # fsynced within a second (docs/databases.md, "Durability")
        "appendonly yes",
        "appendfsync everysec",
        'appenddirname "appendonlydir"',
        # a clean stop (the runner's SIGTERM) is SHUTDOWN SAVE: AOF fsynced, RDB written;
        # "force": a save that fails (a full disk) does not keep the server from exiting
        "shutdown-on-sigterm save force",
        "shutdown-on-sigint save force",
        # the only replica is a backup's `redis-cli --rdb`: send it at once (default: 5 s)
        "repl-diskless-sync-delay 0",
        "daemonize no",
        'logfile ""',
        "stop-writes-on-bgsave-error yes",
        'rename-command CONFIG ""',
        'rename-command DEBUG ""',
        'rename-command SHUTDOWN ""',
    ]


def redis_spec(app: str, port: int, data_dir: Path, memory_mb: int | None = None,
               policy: str | None = None, password: str | None = None) -> RedisSpec:
    memory = DEFAULT_MEMORY_MB if memory_mb is None else memory_mb
    if not isinstance(memory, int) or not 1 <= memory <= 65536:
        raise RedisSpecError(f"[redis] memory must be 1..65536 MB, not {memory_mb!r}")
    chosen = policy or DEFAULT_POLICY
    if chosen not in POLICIES:
        raise RedisSpecError(f"[redis] policy must be one of {', '.join(sorted(POLICIES))}")
    return RedisSpec(app, port, password or secrets.token_urlsafe(24), memory, chosen, data_dir)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


class PersistenceGuard:
    """Take a Redis snapshot only when it fits on disk; report every refusal/failure.

    ``report(text)`` receives one human line per problem (the runner sends it to
    the app's log as a ``platform`` line); ``counters`` count outcomes.
    """

    log = Logger()

    def __init__(self, reactor: IReactorTime, spec: RedisSpec, report: Any) -> None:
        self.reactor = reactor
        self.spec = spec
        self.report = report
        self.counters = {"saved": 0, "refused": 0, "failed": 0}

    async def _conn(self) -> Any:
        import txredisapi

        return await txredisapi.Connection(self.spec.bind, self.spec.port,
                                           password=self.spec.password, reconnect=False)

    async def snapshot(self) -> bool:
        """BGSAVE if there is room; True when a snapshot was taken successfully."""
        from twisted.internet.task import deferLater

        conn = await self._conn()
        try:
            info = await conn.info("memory")
            used = int(info["used_memory"])
            need = int(used * SPACE_FACTOR) + SPACE_MARGIN
            have = free_bytes(self.spec.data_dir)
            if have < need:
                self.counters["refused"] += 1
                self.report(
                    f"redis snapshot refused: {have // 1024} KiB free in its data directory, "
                    f"{need // 1024} KiB needed; the data is only in memory until space is freed"
                )
                return False
            # rdb_saves (Redis >= 7) counts snapshots; older servers: the save time
            counter = "rdb_saves" if "rdb_saves" in await conn.info("persistence") \
                else "rdb_last_save_time"
            before = int((await conn.info("persistence"))[counter])
            await conn.bgsave()
            deadline = self.reactor.seconds() + SNAPSHOT_TIMEOUT
            while True:
                persistence = await conn.info("persistence")
                if int(persistence["rdb_bgsave_in_progress"]) == 0 and (
                    int(persistence[counter]) != before
                    or persistence["rdb_last_bgsave_status"] != "ok"
                ):
                    break
                if self.reactor.seconds() > deadline:
                    self.counters["failed"] += 1
                    self.report(f"redis snapshot did not finish within {SNAPSHOT_TIMEOUT:.0f}s")
                    return False
                await deferLater(self.reactor, 0.05, lambda: None)
            if persistence["rdb_last_bgsave_status"] != "ok":
                self.counters["failed"] += 1
                self.report("redis snapshot FAILED (rdb_last_bgsave_status=err); "
                            "writes are refused until a snapshot succeeds")
                return False
            self.counters["saved"] += 1
            return True
        finally:
            await conn.disconnect()
