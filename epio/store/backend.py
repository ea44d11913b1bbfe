"""The small internal query interface the domain methods are written over.

Two backends provide it:

* :class:`SqliteBackend` -- stdlib :mod:`sqlite3` on ONE dedicated worker
  thread (a :class:`~twisted.python.threadpool.ThreadPool` of size 1), WAL
  journal, foreign keys on, ``BEGIN IMMEDIATE`` write transactions.
* :class:`PostgresBackend` -- txpostgres (non-blocking psycopg2) with a small
  pool of connections; a connection that fails is thrown away and replaced.

SQL is written once with ``?`` placeholders (never a literal ``?`` or ``%`` in
the text); the PostgreSQL backend translates them for psycopg2.  Only code in
``epio/store`` uses this module.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sqlite3
import weakref
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from attrs import frozen
from twisted.internet.defer import Deferred, DeferredLock, DeferredSemaphore
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from epio.store.errors import IntegrityError, InvalidValue, StoreUnavailable

if TYPE_CHECKING:
    from epio.store.locks import Lock
    from epio.store.pgconn import PgConnection

T = TypeVar("T")

SQLITE = "sqlite"
POSTGRESQL = "postgresql"


def lock_key(name: str) -> int:
    """A stable signed 64-bit key for ``name`` (PostgreSQL advisory locks)."""
    digest = hashlib.sha256(b"epio-lock:" + name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@frozen
class Result:
    """Rows and row count of one statement."""

    columns: tuple[str, ...]
    rows: list[tuple[Any, ...]]
    rowcount: int

    def dicts(self) -> list[dict[str, Any]]:
        """Rows as dicts keyed by column name."""
        return [dict(zip(self.columns, row, strict=True)) for row in self.rows]

    def one(self) -> dict[str, Any] | None:
        """The first row as a dict, or None."""
        if not self.rows:
            return None
        return dict(zip(self.columns, self.rows[0], strict=True))

    def scalar(self) -> Any:
        """The first column of the first row, or None."""
        return self.rows[0][0] if self.rows else None


class Transaction(Protocol):
    """One open transaction: statements run in order, all or nothing."""

    dialect: str

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> Result:
        """Run one statement (``?`` placeholders)."""

    async def exclusive(self, name: str) -> None:
        """Serialise the rest of this transaction with every other holder of ``name``."""

    async def notify(self, payload: dict[str, Any]) -> None:
        """Announce a change to every listener once (and only if) this transaction commits."""


class Backend(Protocol):
    """A database the store can run transactions on."""

    dialect: str

    async def open(self) -> None:
        """Connect (no schema work)."""

    async def close(self) -> None:
        """Disconnect; pending work fails with StoreUnavailable."""

    async def transaction(
        self, fn: Callable[[Transaction], Awaitable[T]], readonly: bool = False
    ) -> T:
        """Run ``fn(tx)`` in a transaction: commit if it returns, roll back if it raises."""

    def lock(self, name: str) -> Lock:
        """A :class:`epio.store.locks.Lock` named ``name``."""

    async def listen(self, callback: Callable[[dict[str, Any]], None]) -> Callable[[], None]:
        """Call ``callback(payload)`` for every committed ``notify``; returns an unsubscriber.

        Fires once listening is established.  ``{"kind": "resync"}`` means
        notifications may have been missed (listener reconnected): reload.
        """


CHANNEL = "epio_changes"

_log = Logger()


async def _release_locks(locks: weakref.WeakSet[Any]) -> None:
    """Closing a store gives up every lock made from it (held or not)."""
    for lock in list(locks):
        try:
            await lock.shutdown()
        except StoreUnavailable:
            pass  # its connection is gone, and the lock with it
        except Exception:
            _log.failure("giving up lock {name} failed", name=getattr(lock, "name", "?"))


class _Listeners:
    """Local callbacks; a failing callback is logged and never stops the others."""

    log = Logger()

    def __init__(self) -> None:
        self.callbacks: list[Callable[[dict[str, Any]], None]] = []

    def add(self, callback: Callable[[dict[str, Any]], None]) -> Callable[[], None]:
        self.callbacks.append(callback)

        def remove() -> None:
            if callback in self.callbacks:
                self.callbacks.remove(callback)

        return remove

    def deliver(self, payload: dict[str, Any]) -> None:
        for cb in list(self.callbacks):
            try:
                cb(payload)
            except Exception:
                self.log.failure("store change listener failed")


# --------------------------------------------------------------------- SQLite


class _SqliteTx:
    dialect = SQLITE

    def __init__(self, backend: SqliteBackend) -> None:
        self._backend = backend
        self.pending: list[dict[str, Any]] = []

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> Result:
        return await self._backend._call(self._backend._execute, sql, tuple(params))

    async def exclusive(self, name: str) -> None:
        # BEGIN IMMEDIATE already holds the database's single write lock.
        return None

    async def notify(self, payload: dict[str, Any]) -> None:
        # delivered in this process after COMMIT (SQLite has no LISTEN/NOTIFY)
        if payload not in self.pending:
            self.pending.append(payload)


class SqliteBackend:
    """SQLite on one dedicated thread; transactions are serialised in-process."""

    log = Logger()
    dialect = SQLITE

    def __init__(self, path: str, reactor: Any, lock_dir: Path | None = None,
                 busy_timeout: float = 10.0) -> None:
        self.path = path
        self._reactor = reactor
        self._busy_timeout = busy_timeout
        self.lock_dir = lock_dir if lock_dir is not None else (
            Path(path).absolute().parent / (Path(path).name + ".locks")
        )
        self._pool: ThreadPool | None = None
        self._conn: sqlite3.Connection | None = None
        self._txlock = DeferredLock()
        self._closed = False
        self._listeners = _Listeners()
        self._locks: weakref.WeakSet[Any] = weakref.WeakSet()

    def _call(self, f: Callable[..., T], *args: Any) -> Awaitable[T]:
        if self._pool is None or self._closed:
            raise StoreUnavailable("the store is closed")
        return deferToThreadPool(self._reactor, self._pool, f, *args)

    async def open(self) -> None:
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="epio-store-sqlite")
        self._pool.start()
        try:
            await self._call(self._connect)
        except BaseException:
            self._pool.stop()
            self._pool = None
            raise

    def _connect(self) -> None:
        # The store holds config vars (app secrets) and token hashes: owner-only.
        # SQLite creates the -wal and -shm files with the database file's mode.
        path = Path(self.path).absolute()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
            if path.stat().st_mode & 0o077:
                os.chmod(path, 0o600)
        except OSError as e:
            raise StoreUnavailable(f"cannot open {self.path}: {e.strerror}") from None
        try:
            conn = sqlite3.connect(self.path, timeout=self._busy_timeout,
                                   isolation_level=None, check_same_thread=False)
        except sqlite3.Error as e:
            raise StoreUnavailable(f"cannot open {self.path}: {e}") from None
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA synchronous=NORMAL")
        self._conn = conn

    def _execute(self, sql: str, params: tuple[Any, ...]) -> Result:
        assert self._conn is not None
        try:
            cur = self._conn.execute(sql, params)
            rows = cur.fetchall()
        except sqlite3.IntegrityError as e:
            raise IntegrityError(str(e)) from None
        except OverflowError as e:
            raise InvalidValue(f"value out of range: {e}") from None
        except sqlite3.OperationalError as e:
            if "locked" in str(e) or "busy" in str(e):
                raise StoreUnavailable(f"database is busy: {e}") from None
            raise
        cols = tuple(d[0] for d in cur.description) if cur.description else ()
        return Result(cols, rows, cur.rowcount)

    def _statement(self, sql: str) -> None:
        assert self._conn is not None
        self._conn.execute(sql)

    def _rollback(self) -> None:
        assert self._conn is not None
        if self._conn.in_transaction:
            self._conn.execute("ROLLBACK")

    async def transaction(
        self, fn: Callable[[Transaction], Awaitable[T]], readonly: bool = False
    ) -> T:
        await self._txlock.acquire()
        try:
            await self._call(self._statement, "BEGIN" if readonly else "BEGIN IMMEDIATE")
            tx = _SqliteTx(self)
            try:
                result = await fn(tx)
            except BaseException:
                if not self._closed:
                    await self._call(self._rollback)
                raise
            await self._call(self._statement, "COMMIT")
        finally:
            self._txlock.release()
        for payload in tx.pending:
            self._listeners.deliver(payload)
        return result

    async def listen(self, callback: Callable[[dict[str, Any]], None]) -> Callable[[], None]:
        # Same-process changes only: other processes sharing the file are not seen.
        return self._listeners.add(callback)

    async def close(self) -> None:
        await _release_locks(self._locks)
        if self._closed or self._pool is None:
            self._closed = True
            return
        await self._txlock.acquire()
        try:
            conn, self._conn = self._conn, None
            if conn is not None:
                await deferToThreadPool(self._reactor, self._pool, conn.close)
        finally:
            self._closed = True
            self._txlock.release()
            pool, self._pool = self._pool, None
            pool.stop()

    def lock(self, name: str) -> Lock:
        from epio.store.locks import FileLock

        lock = FileLock(name, self.lock_dir, self._reactor)
        self._locks.add(lock)
        return lock


# ----------------------------------------------------------------- PostgreSQL


def _pg_errors() -> tuple[Any, Any, Any]:
    import psycopg2

    return psycopg2.IntegrityError, psycopg2.OperationalError, psycopg2.InterfaceError


def _pg_data_error() -> Any:
    import psycopg2

    return psycopg2.DataError


def close_quietly(conn: Any) -> None:
    """Close a txpostgres connection that may be broken or half open.  psycopg2's
    errors (already closed, broken) and a connect that never got as far as a libpq
    connection (txpostgres then has none to close) are expected: closing is done
    either way.  Anything else is a bug, logged."""
    import psycopg2

    try:
        conn.close()
    except (psycopg2.Error, AttributeError):
        pass  # nothing left to close
    except Exception:
        _log.failure("closing a PostgreSQL connection failed")


@functools.lru_cache(maxsize=4096)  # the store's statements are a few hundred constants
def to_pyformat(sql: str) -> str:
    """Translate ``?`` placeholders to psycopg2's ``%s`` (escaping ``%``)."""
    return sql.replace("%", "%%").replace("?", "%s")


# TCP keepalives so that a dead peer is noticed in ~15 s on idle connections, and
# tcp_user_timeout (ms) for a connection with a query in flight (keepalives do not
# probe while sent data is unacknowledged: without it the kernel retransmits for
# ~15 minutes before a dead server's connection fails).
PG_CONNECT_KW = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2,
                 "keepalives_count": 3, "tcp_user_timeout": 15000, "application_name": "epio"}

#: The same on the server's side of every session (settings any user may give at
#: connect time).  A node whose host vanishes (power, network: no FIN, no RST) leaves
#: its sessions open on PostgreSQL for the kernel's default keepalive, two hours, and a
#: session-level advisory lock with them: the scheduler leader's lock would outlive
#: its holder, and no other api could lead.  With these the server drops the session
#: (and its locks) about 15 s after the host went silent; ``tcp_user_timeout`` also
#: ends it when data it sent stays unacknowledged that long.
PG_SERVER_OPTIONS = ("-c tcp_keepalives_idle=5 -c tcp_keepalives_interval=2 "
                     "-c tcp_keepalives_count=3 -c tcp_user_timeout=15000")


def connect_options(dsn: str) -> dict[str, Any]:
    """The connect keywords for ``dsn``: client keepalives, the application name, and
    the server-side keepalives appended to any ``options`` the URL already gives."""
    from psycopg2.extensions import parse_dsn

    given = parse_dsn(dsn).get("options", "")
    return dict(PG_CONNECT_KW, options=f"{given} {PG_SERVER_OPTIONS}".strip())


def pg_hosts(dsn: str) -> list[tuple[str, str]] | None:
    """The (host, port) pairs of a URL that lists several hosts
    (``postgresql://u@a:5432,b:5432/db``, or ``host=a,b port=5432,5432``); None for
    one host, or when ``hostaddr`` is given (libpq then goes its own way)."""
    from psycopg2.extensions import parse_dsn

    params = parse_dsn(dsn)
    hosts = params.get("host", "").split(",")
    if len(hosts) < 2 or "hostaddr" in params:
        return None
    ports = params.get("port", "").split(",")
    if len(ports) == 1:
        ports = ports * len(hosts)
    if len(ports) != len(hosts):
        return None  # libpq refuses it with its own message
    return list(zip(hosts, ports, strict=True))


class PgConnector:
    """Opens connections to one PostgreSQL store URL, remembering which of its hosts
    answered last.

    A store URL listing a primary and its standbys is tried from the host that
    answered last, so after a failover new connections go straight to the new
    primary instead of waiting on a dead first host every time.  The backend owns
    one (made with it in the node's composition root) and shares it with its locks
    and its listener, so all of them follow the same primary.
    """

    def __init__(self, reactor: Any, dsn: str, timeout: float) -> None:
        self._reactor = reactor
        self.dsn = dsn
        self.timeout = timeout
        self._hosts = pg_hosts(dsn)
        #: index in the URL's host list of the host that last took a connection
        self.last_good = 0

    async def connect(self, on_lost: Callable[[PgConnection], None] | None = None
                      ) -> PgConnection:
        """Open a :class:`~epio.store.pgconn.PgConnection`, failing with
        StoreUnavailable after ``timeout`` s.

        libpq does not enforce ``connect_timeout`` on non-blocking connects, so a
        server that accepts but never answers (or a black-holed address) would
        hang forever: the connection is closed when the timer fires.

        A URL listing several hosts (with ``target_session_attrs=read-write``: the
        primary of a replicated pair) is tried one host at a time here, each within
        its share of ``timeout`` (at least 1 s), starting with the host that answered
        last: libpq would try them in order too, but without a timeout a silent first
        host would hold every connect forever.  libpq still checks each host's
        ``target_session_attrs`` (a standby refuses a read-write session).
        """
        hosts = self._hosts
        reactor, dsn, timeout = self._reactor, self.dsn, self.timeout
        if hosts is None:
            return await _connect_one(reactor, dsn, {}, timeout, on_lost)
        first = self.last_good % len(hosts)
        share = max(timeout / len(hosts), 1.0)
        errors = []
        for i in [*range(first, len(hosts)), *range(first)]:
            host, port = hosts[i]
            where = {"host": host, "port": port} if port else {"host": host}
            try:
                conn = await _connect_one(reactor, dsn, where, share, on_lost)
            except StoreUnavailable as e:
                errors.append(f"{host}:{port or 5432}: {str(e).removeprefix(_CANNOT)}")
                continue
            self.last_good = i
            return conn
        raise StoreUnavailable(_CANNOT + "; ".join(errors))

    def forget_host(self) -> None:
        """The host that last answered is no use any more (read-only): the next
        connect tries the hosts from the next one."""
        if self._hosts is not None:
            self.last_good = (self.last_good + 1) % len(self._hosts)


_CANNOT = "cannot connect to PostgreSQL: "


async def _connect_one(reactor: Any, dsn: str, where: dict[str, str], timeout: float,
                       on_lost: Callable[[PgConnection], None] | None) -> PgConnection:
    from epio.store.pgconn import PgConnection  # psycopg2: 4.6 MiB, only for PostgreSQL

    conn = PgConnection(reactor, on_lost)
    timed_out = False

    def expire() -> None:
        nonlocal timed_out
        timed_out = True
        close_quietly(conn)

    timer = reactor.callLater(timeout, expire)
    try:
        await conn.connect(dsn, **connect_options(dsn), **where)
    except Exception as e:
        close_quietly(conn)
        if timed_out:
            raise StoreUnavailable(f"{_CANNOT}no answer within {timeout:g} s") from None
        raise StoreUnavailable(f"{_CANNOT}{str(e).strip()}") from None
    finally:
        if timer.active():
            timer.cancel()
    return conn


class _PgTx:
    dialect = POSTGRESQL

    def __init__(self, cursor: Any) -> None:
        self._cursor = cursor

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> Result:
        integrity, _, _ = _pg_errors()
        try:
            await self._cursor.execute(to_pyformat(sql), tuple(params))
        except integrity as e:
            raise IntegrityError(str(e).strip()) from None
        except _pg_data_error() as e:
            raise InvalidValue(str(e).strip().splitlines()[0]) from None
        cur = self._cursor
        if cur.description is None:
            return Result((), [], cur.rowcount)
        cols = tuple(d[0] for d in cur.description)
        return Result(cols, [tuple(r) for r in cur.fetchall()], cur.rowcount)

    async def exclusive(self, name: str) -> None:
        await self.execute("SELECT pg_advisory_xact_lock(?)", (lock_key(name),))

    async def notify(self, payload: dict[str, Any]) -> None:
        # NOTIFY is transactional: delivered on COMMIT, identical ones folded
        await self.execute("SELECT pg_notify(?, ?)",
                           (CHANNEL, json.dumps(payload, sort_keys=True)))


MAX_CONFLICT_RETRIES = 3


async def _rollback(cursor: Any) -> bool:
    """Roll back; False if the connection is unusable."""
    try:
        await cursor.execute("ROLLBACK")
    except Exception:
        return False
    return True


class PostgresBackend:
    """PostgreSQL through txpostgres with a bounded pool of connections."""

    log = Logger()
    dialect = POSTGRESQL

    def __init__(self, dsn: str, reactor: Any, pool_size: int = 4,
                 connect_timeout: float = 10.0) -> None:
        self.dsn = dsn
        self._reactor = reactor
        self._pool_size = pool_size
        self.connector = PgConnector(reactor, dsn, connect_timeout)
        self._sem = DeferredSemaphore(pool_size)
        self._idle: list[PgConnection] = []
        self._closed = False
        self._listeners = _Listeners()
        self._locks: weakref.WeakSet[Any] = weakref.WeakSet()
        self._listen_conn: PgConnection | None = None
        self._listen_started = False
        self._listen_up = False
        self._listen_waiters: list[Deferred[None]] = []
        self._retry: IDelayedCall | None = None

    async def _connect(self) -> PgConnection:
        return await self.connector.connect()

    async def open(self) -> None:
        conn = await self._connect()
        self._idle.append(conn)

    async def _checkout(self) -> PgConnection:
        if self._closed:
            raise StoreUnavailable("the store is closed")
        await self._sem.acquire()
        if self._closed:
            self._sem.release()
            raise StoreUnavailable("the store is closed")
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                return conn
        try:
            return await self._connect()
        except BaseException:
            self._sem.release()
            raise

    def _checkin(self, conn: PgConnection, broken: bool) -> None:
        if broken or self._closed or conn.closed:
            close_quietly(conn)
        else:
            self._idle.append(conn)
        self._sem.release()

    async def transaction(
        self, fn: Callable[[Transaction], Awaitable[T]], readonly: bool = False
    ) -> T:
        from psycopg2.errors import ReadOnlySqlTransaction
        from psycopg2.extensions import TransactionRollbackError

        _, operational, interface = _pg_errors()
        stale_retry = True
        conflicts = 0
        while True:
            conn = await self._checkout()
            broken = False
            try:
                cursor = conn.cursor()
                try:
                    await cursor.execute("BEGIN READ ONLY" if readonly else "BEGIN")
                except (operational, interface) as e:
                    # a pooled connection that died while idle: retry once on a new one
                    broken = True
                    if stale_retry:
                        stale_retry = False
                        continue
                    raise StoreUnavailable(f"PostgreSQL: {str(e).strip()}") from None
                try:
                    result = await fn(_PgTx(cursor))
                    await cursor.execute("COMMIT")
                    return result
                except TransactionRollbackError as e:
                    # deadlock or serialization failure: nothing was committed and the
                    # transaction (pure database work) can be run again
                    broken = not await _rollback(cursor)
                    conflicts += 1
                    if conflicts < MAX_CONFLICT_RETRIES:
                        self.log.info("transaction conflict, retrying: {error}",
                                      error=str(e).strip())
                        continue
                    raise StoreUnavailable(
                        f"PostgreSQL: transaction kept conflicting: {str(e).strip()}") from None
                except (operational, interface) as e:
                    broken = True
                    raise StoreUnavailable(f"PostgreSQL: {str(e).strip()}") from None
                except ReadOnlySqlTransaction as e:
                    # the server became read-only under this connection (a primary
                    # demoted to a standby, or made read-only by its operator): no write
                    # will pass on it again.  Dropped; nothing was committed, so once
                    # more on a new connection, which a multi-host store URL with
                    # target_session_attrs=read-write opens on the current primary
                    broken = True
                    self.connector.forget_host()
                    if stale_retry and not readonly:
                        stale_retry = False
                        self.log.warn("store: the server is read-only; reconnecting")
                        continue
                    raise StoreUnavailable(f"PostgreSQL: {str(e).strip()}") from None
                except BaseException:
                    broken = not await _rollback(cursor)
                    raise
            finally:
                self._checkin(conn, broken)

    async def listen(self, callback: Callable[[dict[str, Any]], None]) -> Callable[[], None]:
        if self._closed:
            raise StoreUnavailable("the store is closed")
        remove = self._listeners.add(callback)
        if not self._listen_started:
            self._listen_started = True
            self._start_listening(0.0)
        if not self._listen_up:
            d: Deferred[None] = Deferred()
            self._listen_waiters.append(d)
            try:
                await d
            except BaseException:
                remove()
                raise
        return remove

    def _start_listening(self, delay: float) -> None:
        def attempt() -> None:
            self._retry = None
            Deferred.fromCoroutine(self._listen_once(delay)).addErrback(
                lambda f: self.log.failure("store listener failed", f))

        if delay:
            self._retry = self._reactor.callLater(delay, attempt)
        else:
            attempt()

    async def _listen_once(self, delay: float) -> None:
        if self._closed:
            return
        try:
            conn = await self.connector.connect(on_lost=self._listener_lost)
            conn.addNotifyObserver(self._notified)
            await conn.runOperation(f"LISTEN {CHANNEL}")
        except Exception as e:
            next_delay = min(max(delay * 2, 1.0), 30.0)
            self.log.warn("store listener: {error}; retrying in {delay} s",
                          error=str(e).strip(), delay=next_delay)
            self._start_listening(next_delay)
            return
        if self._closed:
            conn.close()
            return
        self._listen_conn = conn
        if not self._listen_up:
            self._listen_up = True
            waiters, self._listen_waiters = self._listen_waiters, []
            for d in waiters:
                d.callback(None)
        else:
            self.log.info("store listener reconnected; subscribers resync")
            self._listeners.deliver({"kind": "resync"})

    def _listener_lost(self, conn: PgConnection) -> None:
        if conn is not self._listen_conn:
            return
        self._listen_conn = None
        if not self._closed:
            self.log.warn("store listener: connection lost; reconnecting")
            self._start_listening(1.0)

    def _notified(self, notify: Any) -> None:
        try:
            payload = json.loads(notify.payload)
        except ValueError:
            return
        if isinstance(payload, dict):
            self._listeners.deliver(payload)

    async def close(self) -> None:
        self._closed = True
        await _release_locks(self._locks)
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        waiters, self._listen_waiters = self._listen_waiters, []
        for d in waiters:
            d.errback(StoreUnavailable("the store is closed"))
        conn, self._listen_conn = self._listen_conn, None
        if conn is not None:
            close_quietly(conn)
        idle, self._idle = self._idle, []
        for conn in idle:
            close_quietly(conn)

    def lock(self, name: str) -> Lock:
        from epio.store.locks import PgLock

        lock = PgLock(name, self.connector, self._reactor)
        self._locks.add(lock)
        return lock
