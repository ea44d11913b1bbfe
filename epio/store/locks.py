"""Named locks for leadership: PostgreSQL advisory locks, or a local file lock.

A :class:`Lock` is got from :meth:`epio.store.Store.lock`:

* On PostgreSQL (:class:`PgLock`) it is a session-level advisory lock
  (``pg_try_advisory_lock`` on a stable 64-bit key of the name) held on a
  connection dedicated to that lock.  When the holder's process or connection
  dies the server drops the lock and another node can take it.
* On SQLite (:class:`FileLock`) it is an exclusive ``flock`` on a file next to
  the database: every process on the box contends correctly, and the kernel
  drops the lock when the holder dies.

:class:`LeaderService` keeps trying to take a lock and tells its owner when it
is elected and when leadership is lost.
"""

from __future__ import annotations

import fcntl
import inspect
import os
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from epio.store.backend import PgConnector, close_quietly, lock_key
from epio.store.errors import StoreUnavailable

if TYPE_CHECKING:
    from epio.store.pgconn import PgConnection
    from epio.store.store import Store


class Lock(Protocol):
    """A named, exclusive, non-reentrant lock shared by every node of the store."""

    name: str

    @property
    def held(self) -> bool:
        """True while this object holds the lock (as far as it knows)."""

    async def acquire(self, block: bool = False, timeout: float | None = None) -> bool:
        """Try to take the lock; True when held.

        ``block=False``: one attempt.  ``block=True``: retry until taken or
        ``timeout`` seconds passed (None: forever).  Acquiring a lock this
        object already holds returns True.
        """

    async def release(self) -> None:
        """Give the lock up (a no-op when not held)."""

    async def check(self) -> bool:
        """Verify the lock is still held (PostgreSQL: round trip on its connection)."""

    def when_lost(self) -> Deferred[None]:
        """A Deferred that fires if the held lock is lost (not on release)."""


class _LostNotifier:
    _reactor: Any
    _poll_interval: float

    def __init__(self) -> None:
        self._lost_waiters: list[Deferred[None]] = []
        self._shut = False

    async def _poll(self, attempt: Callable[[], Awaitable[bool]], block: bool,
                    timeout: float | None) -> bool:
        """``attempt()`` until it takes the lock; without ``block``, or past ``timeout``
        seconds, give up (False).  Tries again every ``poll_interval``."""
        deadline = None if timeout is None else self._reactor.seconds() + timeout
        while True:
            if await attempt():
                return True
            if not block or (deadline is not None and self._reactor.seconds() >= deadline):
                return False
            await deferLater(self._reactor, self._poll_interval, lambda: None)
            self._check_open()

    async def release(self) -> None:
        raise NotImplementedError

    async def shutdown(self) -> None:
        """Release for good: the store this lock came from is closing."""
        self._shut = True
        await self.release()

    def _check_open(self) -> None:
        if self._shut:
            raise StoreUnavailable(f"lock {getattr(self, 'name', '?')}: the store is closed")

    def when_lost(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._lost_waiters.append(d)
        return d

    def _fire_lost(self) -> None:
        waiters, self._lost_waiters = self._lost_waiters, []
        for d in waiters:
            d.callback(None)

    def _drop_waiters(self) -> None:
        self._lost_waiters = []


class PgLock(_LostNotifier):
    """A PostgreSQL session-level advisory lock on its own connection."""

    log = Logger()

    def __init__(self, name: str, connector: PgConnector, reactor: IReactorTime,
                 poll_interval: float = 0.25) -> None:
        super().__init__()
        self.name = name
        self.key = lock_key(name)
        self._connector = connector
        self._reactor = reactor
        self._poll_interval = poll_interval
        self._conn: PgConnection | None = None
        self._held = False

    @property
    def held(self) -> bool:
        return self._held

    def _on_connection_lost(self, conn: PgConnection) -> None:
        if conn is not self._conn:
            return
        self._conn = None
        if self._held:
            self._held = False
            self.log.warn("lock {name}: connection to PostgreSQL lost, lock released",
                          name=self.name)
            self._fire_lost()

    async def _connection(self) -> PgConnection:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        try:
            conn = await self._connector.connect(on_lost=self._on_connection_lost)
        except StoreUnavailable as e:
            raise StoreUnavailable(f"lock {self.name}: {e}") from None
        self._conn = conn
        return conn

    async def _query(self, sql: str) -> Any:
        conn = await self._connection()
        try:
            rows = await conn.runQuery(sql, (self.key,))
        except Exception as e:
            self._close()
            raise StoreUnavailable(f"lock {self.name}: {str(e).strip()}") from None
        return rows[0][0]

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            close_quietly(conn)
        if self._held:
            self._held = False
            self._fire_lost()

    async def acquire(self, block: bool = False, timeout: float | None = None) -> bool:
        self._check_open()
        if self._held:
            return True

        async def attempt() -> bool:
            if await self._query("SELECT pg_try_advisory_lock(%s)"):
                self._held = True
            return self._held

        return await self._poll(attempt, block, timeout)

    async def release(self) -> None:
        if not self._held:
            self._close()
            return
        self._held = False
        self._drop_waiters()
        try:
            await self._query("SELECT pg_advisory_unlock(%s)")
        except StoreUnavailable:
            pass  # the connection is gone, and with it the lock
        self._close()

    async def check(self) -> bool:
        if not self._held:
            return False
        try:
            still = await self._query(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                "AND pid = pg_backend_pid() AND granted "
                "AND ((classid::bigint << 32) | objid::bigint) = %s"
            )
        except StoreUnavailable:
            return False
        if not still and self._held:
            self._held = False
            self._fire_lost()
        return bool(still)


_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


class FileLock(_LostNotifier):
    """An exclusive ``flock`` on ``lock_dir/<name>.lock`` (one box, many processes)."""

    def __init__(self, name: str, lock_dir: Path, reactor: IReactorTime, poll_interval: float = 0.1) -> None:
        super().__init__()
        self.name = name
        safe = _SAFE.sub("_", name)[:64]
        self.path = lock_dir / f"{safe}-{lock_key(name) & 0xFFFFFFFF:08x}.lock"
        self._reactor = reactor
        self._poll_interval = poll_interval
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _try(self) -> bool:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    async def acquire(self, block: bool = False, timeout: float | None = None) -> bool:
        self._check_open()
        if self._fd is not None:
            return True

        async def attempt() -> bool:
            return self._try()

        return await self._poll(attempt, block, timeout)

    async def release(self) -> None:
        fd, self._fd = self._fd, None
        self._drop_waiters()
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    async def check(self) -> bool:
        return self._fd is not None


def _call(f: Callable[[], Any]) -> Deferred[Any]:
    def run() -> Any:
        r = f()
        if inspect.iscoroutine(r):
            return ensureDeferred(r)
        return r

    return maybeDeferred(run)


class LeaderService(Service):
    """Keep trying to become the holder of lock ``name``; report gains and losses.

    ``on_elected()`` is called (and awaited, if it returns an awaitable) when
    the lock is taken; ``on_lost()`` when it is lost (connection died, check
    failed) or given up because the service stops.  While not leader the
    service retries every ``retry_interval`` seconds; while leader it checks
    the lock at that interval (and notices a dropped connection at once).
    """

    log = Logger()

    def __init__(self, store: Store, name: str, on_elected: Callable[[], Any],
                 on_lost: Callable[[], Any], clock: IReactorTime,
                 retry_interval: float = 5.0) -> None:
        self.store = store
        self.lock_name = name
        self.on_elected = on_elected
        self.on_lost = on_lost
        self.clock = clock
        self.retry_interval = retry_interval
        self._lock: Lock | None = None
        self._loop: LoopingCall | None = None
        self._busy = False
        self.is_leader = False

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        self._lock = self.store.lock(self.lock_name)
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self.clock
        self._loop.start(self.retry_interval, now=True).addErrback(
            lambda f: self.log.failure("leader loop for {name} died", f, name=self.lock_name)
        )

    def _tick(self) -> Deferred[None] | None:
        if self._busy or not self.running:
            return None
        self._busy = True
        d = ensureDeferred(self._step())
        d.addErrback(lambda f: self.log.failure("leader step for {name} failed", f,
                                                name=self.lock_name))

        def done(_: Any) -> None:
            self._busy = False

        d.addBoth(done)
        return None

    async def _step(self) -> None:
        lock = self._lock
        assert lock is not None
        if not self.is_leader:
            try:
                got = await lock.acquire(block=False)
            except StoreUnavailable as e:
                self.log.warn("leader {name}: cannot try the lock: {error}",
                              name=self.lock_name, error=str(e))
                return
            if got and self.running:
                self.is_leader = True
                lock.when_lost().addCallback(lambda _: self._lost("connection lost"))
                self.log.info("elected leader for {name}", name=self.lock_name)
                try:
                    await _call(self.on_elected)
                except Exception:
                    self.log.failure("on_elected for {name} failed", name=self.lock_name)
            elif got:
                await lock.release()
        else:
            if not await lock.check():
                self._lost("lock check failed")

    def _lost(self, why: str) -> None:
        if not self.is_leader:
            return
        self.is_leader = False
        self.log.warn("lost leadership of {name}: {why}", name=self.lock_name, why=why)
        _call(self.on_lost).addErrback(
            lambda f: self.log.failure("on_lost for {name} failed", f, name=self.lock_name))

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        if self._loop is not None and self._loop.running:
            self._loop.stop()

        async def stop() -> None:
            lock = self._lock
            if self.is_leader:
                self.is_leader = False
                try:
                    await _call(self.on_lost)
                except Exception:
                    self.log.failure("on_lost for {name} failed", name=self.lock_name)
            if lock is not None:
                try:
                    await lock.release()
                except Exception:
                    self.log.failure("releasing lock {name} failed", name=self.lock_name)

        return ensureDeferred(stop())
