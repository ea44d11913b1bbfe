"""Reading what routing needs from the store, in three bulk queries.

- apps (:meth:`Store.list_apps`): every app gets ``<app>.<domain>`` and its
  maintenance flag;
- custom hostnames and wildcards (:meth:`Store.all_hostnames`);
- live releases (:meth:`Store.list_instances`): the releases of the app's
  instances the store holds in an active state (``pending``, ``starting``,
  ``healthy``, ``crashed`` -- still wanted, coming back) are the releases that
  may serve.  During a rollover both the old
  and the new release are there; once the old instances are marked draining or
  stopped only the new one is.  An app with no active instance record has
  ``live_releases = None``: any release reported healthy by its runners serves.
"""

from __future__ import annotations

from typing import Any, Protocol

from epio.nexus.table import AppFacts, StoreView

ACTIVE_STATES = frozenset({"pending", "starting", "healthy", "crashed"})


class RoutingStore(Protocol):
    """The part of :class:`epio.store.Store` the nexus reads."""

    async def list_apps(self, for_user: str | None = None) -> list[Any]: ...

    async def all_hostnames(self) -> dict[str, str]: ...

    async def list_instances(self, app: str | None = None,
                             node: str | None = None) -> list[Any]: ...


async def load_view(store: RoutingStore, domain: str, now: float) -> StoreView:
    """One :class:`StoreView` from the store."""
    apps = await store.list_apps()
    hostnames = await store.all_hostnames()
    instances = await store.list_instances()
    by_app: dict[str, list[str]] = {}
    for host, app in sorted(hostnames.items()):
        by_app.setdefault(app, []).append(host)
    live: dict[str, set[int]] = {}
    for inst in instances:
        if inst.state in ACTIVE_STATES:
            live.setdefault(inst.app, set()).add(int(inst.release))
    domain = domain.strip().lower().rstrip(".")
    facts = {}
    for app in apps:
        own = f"{app.name}.{domain}" if domain else app.name
        names = [own, *(h for h in by_app.get(app.name, ()) if h != own)]
        releases = live.get(app.name)
        facts[app.name] = AppFacts(
            name=app.name,
            hostnames=tuple(names),
            maintenance=bool(app.maintenance),
            live_releases=frozenset(releases) if releases else None,
        )
    return StoreView(apps=facts, loaded_at=now)
