"""The store's PostgreSQL connection, apart from :mod:`epio.store.backend` so that
psycopg2 and txpostgres are imported only by a node whose store (or add-on) is
PostgreSQL, not by one on SQLite (docs/router.md, "Memory of an idle node")."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.python.failure import Failure
from txpostgres.txpostgres import Connection as _TxConnection


class PgConnection(_TxConnection):  # type: ignore[misc]
    """A txpostgres connection that closes itself when the server goes away.

    Plain txpostgres raises the server's "connection closed" error out of
    ``doRead`` into the reactor (an unhandled error in the log); this one
    closes the connection instead and calls ``on_lost(self)`` once.
    """

    def __init__(self, reactor: Any, on_lost: Callable[[Any], None] | None = None) -> None:
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
