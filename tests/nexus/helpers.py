"""Builders of heartbeat bodies and store views for the nexus unit tests."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock

from epio.basicauth import hash_password
from epio.nexus.table import AppFacts, StoreView
from epio.store.records import App, Instance, Release


def instance(
    iid: str,
    app: str = "hello",
    *,
    release: int = 1,
    process_type: str = "web",
    host: str = "127.0.0.1",
    port: int | None = 8001,
    state: str = "healthy",
    since: float = 0.0,
) -> dict[str, Any]:
    return {
        "instance_id": iid, "app": app, "release": release, "process_type": process_type,
        "host": host, "port": port, "state": state, "since": since, "restarts": 0,
    }


def heartbeat(
    node: str = "n1",
    boot: str = "boot-a",
    seq: int = 1,
    instances: list[dict[str, Any]] | None = None,
    interval: float = 1.0,
    advertise_host: str = "127.0.0.1",
) -> dict[str, Any]:
    return {
        "node_id": node, "boot_id": boot, "seq": seq, "interval": interval,
        "load": {"cpu": 0.1, "mem": 0.2, "instances": len(instances or [])},
        "control": "tcp://127.0.0.1:7731", "advertise_host": advertise_host,
        "instances": list(instances or []),
    }


def view(*apps: str, domain: str = "localhost", loaded_at: float = 0.0,
         live: dict[str, set[int]] | None = None,
         extra_hosts: dict[str, list[str]] | None = None,
         maintenance: set[str] | None = None,
         options: dict[str, dict[int, dict[str, Any]]] | None = None) -> StoreView:
    """A store view of ``apps``.  ``options``: the route options read per release of
    an app; by default its live releases (release 1 without live releases) are read
    and have none."""
    facts = {}
    for app in apps:
        hosts = (f"{app}.{domain}", *(extra_hosts or {}).get(app, ()))
        rel = (live or {}).get(app)
        read = (options or {}).get(app)
        if read is None:
            read = {r: {} for r in (rel if rel is not None else {1})}
        facts[app] = AppFacts(
            name=app, hostnames=hosts, maintenance=app in (maintenance or set()),
            live_releases=frozenset(rel) if rel is not None else None,
            releases=read,
        )
    return StoreView(apps=facts, loaded_at=loaded_at)


AUTH = {"realm": "staff", "users": {"alice": hash_password("s3cret", salt=b"0" * 16)}}


class FlakyStore:
    """The nexus's reads from lists; ``get_release``/``latest_release`` fail while
    ``failing`` holds the key, and each read may cost ``cost`` seconds of the clock."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.apps = [App("hello", "u", 10001, False, 0.0), App("idle", "u", 10002, False, 0.0)]
        self.instances = [Instance("b", "hello", 2, "web", 1, "n1", "127.0.0.1", 8000,
                                   "healthy", 0.0)]
        self.meta: dict[tuple[str, int], dict[str, Any]] = {}
        self.failing: set[Any] = set()
        self.cost = 0.0

    async def list_apps(self, for_user: str | None = None) -> list[App]:
        return list(self.apps)

    async def all_hostnames(self) -> dict[str, str]:
        return {}

    async def list_instances(self, app: str | None = None,
                             node: str | None = None) -> list[Instance]:
        return list(self.instances)

    def _release(self, app: str, version: int) -> Release:
        return Release(app, version, None, {}, {"web": "run"}, "", 0.0, None,
                       self.meta[(app, version)])

    async def get_release(self, app: str, version: int) -> Release:
        self.clock.advance(self.cost)
        if (app, version) in self.failing:
            raise ConnectionError("store connection lost")
        return self._release(app, version)

    async def latest_release(self, app: str) -> Release | None:
        self.clock.advance(self.cost)
        if app in self.failing:
            raise ConnectionError("store connection lost")
        versions = [v for (a, v) in self.meta if a == app]
        return self._release(app, max(versions)) if versions else None
