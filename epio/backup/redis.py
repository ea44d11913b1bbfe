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

from twisted.internet.task import deferLater

from epio.backup import proc
from epio.backup.postgres import BackupFailed, _last_line

KEYS = re.compile(rb"^db\d+:keys=(\d+)", re.M)


def _env(password: str | None) -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    if password:
        env["REDISCLI_AUTH"] = password  # never in argv
    return env


class RedisBackups:
    log_source = "backup"

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
                except Exception:
                    pass

    async def verify(self, rdb: Path, counts: dict[str, int]) -> int:
        got = await self.loaded_key_count(rdb)
        if not counts["keys_min"] <= got <= counts["keys_max"]:
            raise BackupFailed(
                f"verification failed: {got} keys loaded, live server had "
                f"{counts['keys_min']}..{counts['keys_max']}"
            )
        return got

    async def restore(self, rdb: Path, host: str, port: int, password: str | None) -> int:
        """Make the live server's data the snapshot's; return the keys restored.

        The snapshot is loaded into a scratch server first, so a damaged file
        never touches the live server.  Every key is then copied with DUMP/RESTORE
        REPLACE (keeping its TTL), and only after all copies succeeded are the live
        keys that the snapshot does not have deleted.
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
            scratch = live = None
            try:
                for _ in range(200):
                    if sock.exists():
                        break
                    await deferLater(self.reactor, 0.05, lambda: None)
                scratch = await txredisapi.UnixConnection(str(sock), charset=None, reconnect=False)
                live = await txredisapi.Connection(host, port, password=password, charset=None,
                                                   reconnect=False)
                restored: set[bytes] = set()
                cursor = 0
                while True:
                    cursor, keys = await scratch.scan(cursor, count=500)
                    for key in keys:
                        payload = await scratch.execute_command("DUMP", key)
                        ttl = await scratch.execute_command("PTTL", key)
                        await live.execute_command(
                            "RESTORE", key, max(int(ttl), 0), payload, "REPLACE"
                        )
                        restored.add(key)
                    if int(cursor) == 0:
                        break
                cursor = 0
                while True:
                    cursor, keys = await live.scan(cursor, count=500)
                    extra = [k for k in keys if k not in restored]
                    if extra:
                        await live.delete(extra)
                    if int(cursor) == 0:
                        break
                return len(restored)
            finally:
                for conn in (scratch, live):
                    if conn is not None:
                        await conn.disconnect()
                try:
                    transport.signalProcess("KILL")
                except Exception:
                    pass
