"""The store's PostgreSQL connection, apart from :mod:`epio.store.backend` so that
psycopg2 and txpostgres are imported only by a node whose store (or add-on) is
PostgreSQL, not by one on SQLite (docs/router.md, "Memory of an idle node")."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from txpostgres.txpostgres import Connection as _TxConnection
from txpostgres.txpostgres import Cursor as _TxCursor


class PgCursor(_TxCursor):  # type: ignore[misc]
    """A txpostgres cursor whose cancelled query closes its connection (see
    :meth:`PgConnection._cancel`)."""

    def _cancel(self, d: Deferred[Any]) -> None:
        from epio.store.backend import close_quietly

        self._pollingD = None
        close_quietly(self._connection)


class PgConnection(_TxConnection):  # type: ignore[misc]
    """A txpostgres connection that closes itself when the server goes away.

    Plain txpostgres raises the server's "connection closed" error out of
    ``doRead`` into the reactor (an unhandled error in the log); this one
    closes the connection instead and calls ``on_lost(self)`` once.

    A cancelled Deferred of a query (or of the connect) closes the connection
    instead of asking the server to cancel: txpostgres would call psycopg2's
    ``cancel()``, libpq's PQcancel, which opens a new connection to the server
    with a *blocking* connect() and no timeout.  When the server's host has vanished
    that blocks the whole reactor (every role of the node: its router stops
    answering) for the kernel's SYN retries, about two minutes.  The Deferred fails
    with CancelledError; the closed connection is dropped from the pool.
    """

    cursorFactory = PgCursor

    def _cancel(self, d: Deferred[Any]) -> None:
        from epio.store.backend import close_quietly

        self._pollingD = None
        close_quietly(self)

    def __init__(self, reactor: IReactorTime, on_lost: Callable[[Any], None] | None = None) -> None:
        super().__init__(reactor=reactor)
        self.on_lost = on_lost
        self._lost_reported = False

    def doRead(self) -> None:
        try:
            super().doRead()
        except Exception:
            self.close()

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        if not self._lost_reported:
            self._lost_reported = True
            if self.on_lost is not None:
                self.on_lost(self)
