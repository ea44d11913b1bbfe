"""Opening a store from its URL, and the :class:`StoreService` of a node."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from epio.config import Config
from epio.store.backend import Backend, PostgresBackend, SqliteBackend
from epio.store.errors import StoreUnavailable
from epio.store.migrations import migrate
from epio.store.store import Store

log = Logger()


def make_backend(url: str, reactor: Any, pool_size: int = 4, connect_timeout: float = 10.0,
                 busy_timeout: float = 10.0) -> Backend:
    """The backend for a store URL: ``sqlite:///PATH`` or ``postgresql://...``.

    ``sqlite:///relative.db`` and ``sqlite:////absolute/path.db`` (SQLAlchemy's
    convention).  No I/O happens here.
    """
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
        if not path:
            raise ValueError("sqlite store URL needs a path: sqlite:///PATH")
        return SqliteBackend(path, reactor, busy_timeout=busy_timeout)
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresBackend(url, reactor, pool_size=pool_size, connect_timeout=connect_timeout)
    raise ValueError(f"store URL must start with sqlite:/// or postgresql://, not {url!r}")


async def open_store(url: str, reactor: Any, migrate_schema: bool = True,
                     **options: Any) -> Store:
    """Connect to the store at ``url``, apply pending migrations, return the Store.

    ``options``: ``pool_size``, ``connect_timeout``, ``busy_timeout`` (see
    :func:`make_backend` and the ``[store]`` config keys).
    """
    backend = make_backend(url, reactor, **options)
    await backend.open()
    try:
        if migrate_schema:
            await migrate(backend, reactor.seconds)
    except BaseException:
        await backend.close()
        raise
    return Store(backend, reactor)


def redact_url(url: str) -> str:
    """The URL without a password (in the userinfo or a ``password=`` query), for logs."""
    import re

    if "://" in url and "@" in url.split("://", 1)[1].split("?", 1)[0]:
        scheme, rest = url.split("://", 1)
        path_and_query = ""
        if "?" in rest:
            rest, query = rest.split("?", 1)
            path_and_query = "?" + query
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        url = (f"{scheme}://{user}:***@{host}" if ":" in creds else f"{scheme}://{user}@{host}") \
            + path_and_query
    return re.sub(r"(?i)([?&](?:password|sslpassword)=)[^&]*", r"\1***", url)


class StoreService(Service):
    """Opens the store (and migrates it) when started; ``whenReady()`` gives the Store.

    ``startService`` never fails asynchronously: an error is logged and every
    ``whenReady()`` Deferred errbacks with it.  ``stopService`` closes the
    store and always fires.
    """

    log = Logger()

    def __init__(self, url: str, reactor: IReactorTime | None = None, *, pool_size: int = 4,
                 connect_timeout: float = 10.0, busy_timeout: float = 10.0) -> None:
        self.url = url
        self._reactor = reactor
        self._options: dict[str, Any] = {"pool_size": pool_size, "connect_timeout": connect_timeout,
                         "busy_timeout": busy_timeout}
        self._store: Store | None = None
        self._failure: Failure | None = None
        self._waiters: list[Deferred[Store]] = []
        self._starting: Deferred[None] | None = None

    @property
    def reactor(self) -> Any:
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        self._failure = None
        self.log.info("opening store {url}", url=redact_url(self.url))
        self._starting = ensureDeferred(self._start())

    async def _start(self) -> None:
        try:
            store = await open_store(self.url, self.reactor, **self._options)
        except BaseException:
            f = Failure()
            if isinstance(f.value, StoreUnavailable | ValueError):
                self.log.error("cannot open store {url}: {error}", url=redact_url(self.url),
                               error=str(f.value))
            else:
                self.log.failure("cannot open store {url}", f, url=redact_url(self.url))
            self._failure = f
            waiters, self._waiters = self._waiters, []
            for d in waiters:
                d.errback(f)
            return
        if not self.running:
            await store.close()
            return
        self._store = store
        self.log.info("store ready ({dialect})", dialect=store.dialect)
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(store)

    @classmethod
    def from_config(cls, config: Config, data_dir: Path, reactor: IReactorTime | None = None) -> StoreService:
        """The service for a node's validated config (the ``[store]`` section)."""
        section = config.settings.store
        return cls(section.url or default_sqlite_url(data_dir), reactor=reactor,
                   pool_size=section.pool_size, connect_timeout=section.connect_timeout,
                   busy_timeout=section.busy_timeout)

    def whenReady(self) -> Deferred[Store]:
        """Fires with the :class:`Store` once open and migrated (or with the error)."""
        if self._store is not None:
            return succeed(self._store)
        if self._failure is not None:
            return fail(self._failure)
        d: Deferred[Store] = Deferred()
        self._waiters.append(d)
        return d

    @property
    def store(self) -> Store | None:
        """The Store once ready, else None."""
        return self._store

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated

        async def stop() -> None:
            if self._starting is not None:
                await self._starting
            store, self._store = self._store, None
            if store is not None:
                try:
                    await store.close()
                except Exception:
                    self.log.failure("closing the store failed")

        return ensureDeferred(stop())


def default_sqlite_url(data_dir: Path) -> str:
    """The embedded default store URL for a data dir."""
    return f"sqlite:///{data_dir / 'store.sqlite3'}"
