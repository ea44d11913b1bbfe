"""Add-on records of apps: which database each app has, where, and its credentials.

One row per (app, kind): ``kind`` is ``postgres`` or ``redis``, ``plan``
``shared`` or ``dedicated``.  The row holds what the platform needs to inject
the app's ``DATABASE_URL``/``REDIS_URL`` and what the backup role needs to pull
the data (host, port, database, user, password).  The password is never in a
``repr`` and never returned by the API (the app's own config var carries it).
Rows go with the app (``ON DELETE CASCADE``); callers take the final backup and
drop the database before deleting the app.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
from attrs import field, frozen

from epio.store.backend import Transaction
from epio.store.errors import InvalidValue, NotFound
from epio.store.store import Store

KINDS = ("postgres", "redis")
PLANS = ("shared", "dedicated")
STATES = ("provisioning", "ready", "failed", "deleting")


@frozen
class Addon:
    """One add-on of an app (credentials included: never log or serialise it whole)."""

    app: str
    kind: str
    plan: str
    state: str
    created: float
    updated: float
    host: str | None = None
    port: int | None = None
    database: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    node: str | None = None
    instance: str | None = None
    options: dict[str, Any] = field(factory=dict)


def _addon(row: dict[str, Any]) -> Addon:
    return Addon(
        app=row["app"], kind=row["kind"], plan=row["plan"], state=row["state"],
        created=float(row["created"]), updated=float(row["updated"]), host=row["host"],
        port=None if row["port"] is None else int(row["port"]), database=row["database"],
        username=row["username"], password=row["password"], node=row["node"],
        instance=row["instance"], options=json.loads(row["options"] or "{}"),
    )


def _check(addon: Addon) -> None:
    if addon.kind not in KINDS:
        raise InvalidValue(f"add-on kind must be one of {', '.join(KINDS)}, not {addon.kind!r}")
    if addon.plan not in PLANS:
        raise InvalidValue(f"add-on plan must be one of {', '.join(PLANS)}, not {addon.plan!r}")
    if addon.state not in STATES:
        raise InvalidValue(f"add-on state must be one of {', '.join(STATES)}")


async def put_addon(store: Store, addon: Addon) -> Addon:
    """Insert or replace the (app, kind) add-on; ``updated`` is set to now."""
    _check(addon)
    addon = attrs.evolve(addon, updated=store.now())
    a = addon

    async def q(tx: Transaction) -> Addon:
        await store.app_exists(tx, a.app)
        await tx.execute("DELETE FROM addons WHERE app = ? AND kind = ?", (a.app, a.kind))
        await tx.execute(
            "INSERT INTO addons (app, kind, plan, state, host, port, database, username,"
            " password, node, instance, options, created, updated)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (a.app, a.kind, a.plan, a.state, a.host, a.port, a.database, a.username,
             a.password, a.node, a.instance, json.dumps(a.options, sort_keys=True),
             a.created, a.updated))
        return a

    return await store.transaction(q)


async def get_addon(store: Store, app: str, kind: str) -> Addon:
    """The app's add-on of ``kind``; ``NotFound`` otherwise."""
    row = await store.fetch_one("SELECT * FROM addons WHERE app = ? AND kind = ?", (app, kind))
    if row is None:
        raise NotFound(f"{app} has no {kind} add-on")
    return _addon(row)


async def find_addon(store: Store, app: str, kind: str) -> Addon | None:
    try:
        return await get_addon(store, app, kind)
    except NotFound:
        return None


async def list_addons(store: Store, app: str | None = None) -> list[Addon]:
    """Every add-on (of one app), by app then kind."""
    if app is None:
        rows = await store.fetch_all("SELECT * FROM addons ORDER BY app, kind")
    else:
        rows = await store.fetch_all("SELECT * FROM addons WHERE app = ? ORDER BY kind", (app,))
    return [_addon(r) for r in rows]


async def addon_ports(store: Store, app: str) -> list[int]:
    """The ports of the app's shared add-on servers (its database on the shared
    PostgreSQL): the runners' network fence lets the app's processes, and only them,
    connect to these ports of the host (docs/security.md)."""
    return sorted({a.port for a in await list_addons(store, app)
                   if a.plan == "shared" and a.port is not None})


async def delete_addon(store: Store, app: str, kind: str) -> bool:
    """Forget the add-on; False if there was none."""

    async def q(tx: Transaction) -> bool:
        r = await tx.execute("DELETE FROM addons WHERE app = ? AND kind = ?", (app, kind))
        return bool(r.rowcount)

    return await store.transaction(q)
