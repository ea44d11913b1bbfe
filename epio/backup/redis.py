"""Redis backups: pull an RDB snapshot over the network, verify it by loading it.

``redis-cli --rdb`` asks the server for a full-sync snapshot, so the backup node
pulls and the Redis server holds nothing of the backup store.  Verification runs
``redis-check-rdb`` (the RDB's CRC64) and loads the file into a scratch
``redis-server`` on a unix socket (no TCP port), comparing its key count with the
live count measured around the dump.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet.error import ProcessExitedAlready
from twisted.internet.task import deferLater
from twisted.logger import Logger

from epio.backup import proc
from epio.backup.postgres import BackupFailed, NotReady, _last_line

KEYS = re.compile(rb"^db\d+:keys=(\d+)", re.M)
MEMORY = re.compile(rb"^(used_memory|used_memory_dataset|maxmemory):(\d+)", re.M)
# a restore builds the new data in this database of the live server, then SWAPDBs it
# with database 0 (the app's REDIS_URL); Redis has 16 databases by default
STAGING_DB = 15
# the live server's used memory plus the restored data must fit in this share of its
# maxmemory (above it, eviction could drop keys of either copy)
MEMORY_HEADROOM = 0.9


def _env(password: str | None) -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    if password:
        env["REDISCLI_AUTH"] = password  # never in argv
    return env


class RedisBackups:
    log_source = "backup"
    log = Logger()

    def __init__(self, reactor: Any, redis_cli: str = "redis-cli",
                 redis_server: str = "redis-server", check_rdb: str = "redis-check-rdb") -> None:
        self.reactor = reactor
        self.redis_cli = redis_cli
        self.redis_server = redis_server
        self.check_rdb = check_rdb

    async def _cli(self, args: list[str], password: str | None) -> tuple[bytes, bytes, int]:
        out, err, code = await proc.run(self.reactor, [self._which(self.redis_cli), *args],
                                        _env(password))
        return out, err, code

    @staticmethod
    def _which(name: str) -> str:
        if os.sep in name:
            return name
        for d in os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep):
            p = os.path.join(d, name)
            if os.access(p, os.X_OK):
                return p
        return f"/usr/bin/{name}"

    async def key_count(self, host: str, port: int, password: str | None) -> int:
        out, err, code = await self._cli(["-h", host, "-p", str(port), "--no-raw", "INFO", "keyspace"], password)
        if b"LOADING" in out or b"Connection refused" in err + out:
            raise NotReady(f"redis at {host}:{port} does not accept connections yet: "
                           f"{_last_line(err or out)}")
        if code != 0 or b"NOAUTH" in out or b"ERR" in out[:10]:
            raise BackupFailed(f"cannot query redis at {host}:{port}: {_last_line(err or out)}")
        return sum(int(n) for n in KEYS.findall(out))

    async def dump(self, host: str, port: int, password: str | None, dest: Path) -> dict[str, int]:
        """Pull an RDB snapshot to ``dest``; return the live key counts around it."""
        before = await self.key_count(host, port, password)
        out, err, code = await self._cli(["-h", host, "-p", str(port), "--rdb", str(dest)], password)
        if code != 0 or not dest.exists() or dest.stat().st_size == 0:
            raise BackupFailed(f"redis snapshot from {host}:{port} failed: {_last_line(err or out)}")
        after = await self.key_count(host, port, password)
        return {"keys_min": min(before, after), "keys_max": max(before, after)}

    async def loaded_key_count(self, rdb: Path) -> int:
        """Load ``rdb`` into a scratch redis-server (unix socket only) and count keys."""
        _, err, code = await proc.run(self.reactor, [self._which(self.check_rdb), str(rdb)],
                                      _env(None))
        if code != 0:
            raise BackupFailed("verification failed: the RDB file is damaged")
        with tempfile.TemporaryDirectory(prefix="epio-verify-") as tmp:
            work = Path(tmp)
            shutil.copyfile(rdb, work / "dump.rdb")
            sock = work / "redis.sock"
            proc_args = [
                "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700",
                "--dir", str(work), "--dbfilename", "dump.rdb", "--save", "",
                "--appendonly", "no", "--daemonize", "no", "--logfile", str(work / "log"),
            ]
            from twisted.internet.protocol import ProcessProtocol

            proto = ProcessProtocol()
            transport = self.reactor.spawnProcess(
                proto, self._which(self.redis_server), [self.redis_server, *proc_args],
                env=_env(None),
            )
            try:
                for _ in range(200):
                    if sock.exists():
                        out, _, code = await self._cli(["-s", str(sock), "PING"], None)
                        if out.strip() == b"PONG":
                            break
                    await deferLater(self.reactor, 0.05, lambda: None)
                else:
                    log = (work / "log").read_bytes() if (work / "log").exists() else b""
                    raise BackupFailed(f"verification failed: scratch redis did not load it: {_last_line(log)}")
                out, _, code = await self._cli(["-s", str(sock), "DBSIZE"], None)
                return int(out.strip() or b"-1")
            finally:
                try:
                    transport.signalProcess("KILL")
                except ProcessExitedAlready:
                    pass  # the scratch server is gone already: nothing to kill

    async def verify(self, rdb: Path, counts: dict[str, int]) -> int:
        got = await self.loaded_key_count(rdb)
        if not counts["keys_min"] <= got <= counts["keys_max"]:
            raise BackupFailed(
                f"verification failed: {got} keys loaded, live server had "
                f"{counts['keys_min']}..{counts['keys_max']}"
            )
        return got

    async def _memory(self, args: list[str], password: str | None) -> dict[str, int]:
        out, err, code = await self._cli([*args, "INFO", "memory"], password)
        if code != 0:
            raise BackupFailed(f"cannot query redis memory: {_last_line(err or out)}")
        return {m.group(1).decode(): int(m.group(2)) for m in MEMORY.finditer(out)}

    async def restore(self, rdb: Path, host: str, port: int, password: str | None) -> int:
        """Make database 0 of the live server the snapshot's; return the keys restored.

        Restore, then switch -- as a PostgreSQL restore is a new database, then a
        rename: the snapshot is loaded into a scratch server first (a damaged file
        never touches the live one); its keys are copied with DUMP/RESTORE (TTLs
        kept) into database :data:`STAGING_DB` of the live server, which must be
        empty; the copy is counted; only then does ``SWAPDB 0 STAGING_DB`` switch
        the app to it, in one atomic step, and the previous data (now in the
        staging database) is flushed -- the caller backed it up first.  A failure
        before the switch flushes the staging database and leaves database 0 as it
        was.  Refused, with nothing changed, when the live server's ``maxmemory``
        cannot hold both copies (:data:`MEMORY_HEADROOM`).
        """
        import txredisapi

        await self.loaded_key_count(rdb)  # refuses a damaged file before any change
        with tempfile.TemporaryDirectory(prefix="epio-restore-") as tmp:
            work = Path(tmp)
            shutil.copyfile(rdb, work / "dump.rdb")
            sock = work / "redis.sock"
            from twisted.internet.protocol import ProcessProtocol

            transport = self.reactor.spawnProcess(
                ProcessProtocol(), self._which(self.redis_server),
                [self.redis_server, "--port", "0", "--unixsocket", str(sock), "--dir", str(work),
                 "--dbfilename", "dump.rdb", "--save", "", "--appendonly", "no"],
                env=_env(None),
            )
            scratch = live = staging = None
            building = switched = False
            try:
                if not await self._scratch_answers(sock):
                    raise BackupFailed("restore failed: the scratch redis did not load the "
                                       "snapshot; nothing was changed")
                scratch = await txredisapi.UnixConnection(str(sock), charset=None, reconnect=False)
                live = await txredisapi.Connection(host, port, password=password, charset=None,
                                                   reconnect=False, dbid=0)
                staging = await txredisapi.Connection(host, port, password=password,
                                                      charset=None, reconnect=False,
                                                      dbid=STAGING_DB)
                await self._check_room(staging, sock, host, port, password)
                building = True  # from here on the staging database holds our keys only
                restored = await self._copy_keys(scratch, staging)
                built = int(await staging.dbsize())
                if built < restored:
                    raise BackupFailed(f"restore incomplete: {built} of {restored} keys "
                                       f"survived in the staging database; nothing was changed")
                await live.execute_command("SWAPDB", 0, STAGING_DB)
                switched = True
                await staging.execute_command("FLUSHDB")  # the previous data (backed up)
                return restored
            finally:
                if staging is not None and building and not switched:
                    try:
                        await staging.execute_command("FLUSHDB")
                    except Exception as e:
                        self.log.warn("restore: cannot empty the staging database: {error}",
                                      error=str(e))
                for conn in (scratch, live, staging):
                    if conn is not None:
                        await conn.disconnect()
                try:
                    transport.signalProcess("KILL")
                except ProcessExitedAlready:
                    pass  # the scratch server is gone already: nothing to kill

    async def _scratch_answers(self, sock: Path) -> bool:
        """Whether the scratch server at ``sock`` answers PING within its start-up time.
        The socket file exists a moment before the server accepts on it (and it answers
        LOADING while it loads the snapshot): wait for a PONG."""
        for _ in range(200):
            if sock.exists():
                out, _, _ = await self._cli(["-s", str(sock), "PING"], None)
                if out.strip() == b"PONG":
                    return True
            await deferLater(self.reactor, 0.05, lambda: None)
        return False

    async def _check_room(self, staging: Any, sock: Path, host: str, port: int,
                          password: str | None) -> None:
        """Refuse the restore, with nothing changed, unless the live server's staging
        database is empty and its ``maxmemory`` can hold the restored data (loaded in
        the scratch server at ``sock``) next to its own (:data:`MEMORY_HEADROOM`)."""
        busy = int(await staging.dbsize())
        if busy:
            raise BackupFailed(
                f"database {STAGING_DB} of the app's redis holds {busy} keys; a restore "
                f"builds the new data there before switching to it: empty it first. "
                f"Nothing was changed")
        need = (await self._memory(["-s", str(sock)], None)).get("used_memory_dataset", 0)
        mem = await self._memory(["-h", host, "-p", str(port)], password)
        limit = mem.get("maxmemory", 0)
        if limit and mem.get("used_memory", 0) + need > limit * MEMORY_HEADROOM:
            raise BackupFailed(
                f"the app's redis cannot hold the restored data ({need // 1024} KiB) "
                f"next to its live data ({mem.get('used_memory', 0) // 1024} KiB) "
                f"within {MEMORY_HEADROOM:.0%} of its maxmemory ({limit // 1024} KiB); "
                f"nothing was changed")

    @staticmethod
    async def _copy_keys(scratch: Any, staging: Any) -> int:
        """Copy every key of ``scratch`` into ``staging`` with DUMP/RESTORE (TTLs kept;
        a key expired meanwhile is skipped); return how many were copied."""
        restored = 0
        cursor = 0
        while True:
            cursor, keys = await scratch.scan(cursor, count=500)
            for key in keys:
                payload = await scratch.execute_command("DUMP", key)
                ttl = await scratch.execute_command("PTTL", key)
                if payload is None:  # expired meanwhile
                    continue
                await staging.execute_command(
                    "RESTORE", key, max(int(ttl), 0), payload, "REPLACE")
                restored += 1
            if int(cursor) == 0:
                break
        return restored
