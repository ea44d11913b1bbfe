"""What the backup role backs up: every app's add-on databases, read from the store.

A :class:`Target` is one add-on with the address and credentials the backup
node pulls with (the servers hold nothing of the backup store).  Apps whose
shared PostgreSQL database exists but that have no add-on record (created by an
older epio, or by hand) are still backed up as shared PostgreSQL.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from epio.addons.postgres import SharedPostgres
    from epio.store.store import Store
from urllib.parse import quote

from attrs import field, frozen


@frozen
class Target:
    app: str
    kind: str  # postgres | redis
    plan: str  # shared | dedicated
    host: str | None = None
    port: int | None = None
    database: str | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)

    def describe(self) -> str:
        """Where the data comes from, without credentials."""
        if self.kind == "postgres" and self.plan == "shared":
            return str(self.database)
        where = f"{self.host}:{self.port}"
        return f"{self.database}@{where}" if self.database else where


def dedicated_postgres_url(t: Target) -> str:
    """The superuser URL of an app's dedicated server (the app's own role owns it), on the
    ``postgres`` maintenance database: a restore ends the sessions of the app's database."""
    auth = quote(str(t.user), safe="")
    if t.password:
        auth += ":" + quote(t.password, safe="")
    host = f"[{t.host}]" if t.host and ":" in t.host else t.host
    return f"postgresql://{auth}@{host}:{t.port}/postgres"


def target_of(addon: Any) -> Target:
    """A :class:`Target` from a store :class:`~epio.store.addons.Addon`."""
    return Target(addon.app, addon.kind, addon.plan, addon.host, addon.port, addon.database,
                  addon.username, addon.password)


async def targets_for(store: Store, app: str, kind: str | None = None,
                      shared: SharedPostgres | None = None,
                      down_too: bool = False) -> list[Target]:
    """The app's backup targets (of ``kind``): its ready add-ons, plus a shared
    PostgreSQL database that exists without a record.  ``down_too`` (the scheduled
    round) adds the dedicated servers that are down (``failed``: being started again,
    or their node is gone): the backup waits for them to accept connections, and is
    recorded as failed if they do not -- a scheduled backup is never skipped silently."""
    from epio.addons import db_identifier
    from epio.store.addons import list_addons

    states = ("ready", "failed") if down_too else ("ready",)
    found = [target_of(a) for a in await list_addons(store, app)
             if a.state in states and (kind is None or a.kind == kind)
             and (a.state == "ready" or (a.plan == "dedicated" and a.port))]
    if (kind in (None, "postgres") and not any(t.kind == "postgres" for t in found)
            and shared is not None and await shared.exists(app)):
        found.append(Target(app, "postgres", "shared", database=db_identifier(app)))
    return found
