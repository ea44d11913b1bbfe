"""Builders of heartbeat bodies and store views for the nexus unit tests."""

from __future__ import annotations

from typing import Any

from epio.nexus.table import AppFacts, StoreView


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
         maintenance: set[str] | None = None) -> StoreView:
    facts = {}
    for app in apps:
        hosts = (f"{app}.{domain}", *(extra_hosts or {}).get(app, ()))
        rel = (live or {}).get(app)
        facts[app] = AppFacts(
            name=app, hostnames=hosts, maintenance=app in (maintenance or set()),
            live_releases=frozenset(rel) if rel is not None else None,
        )
    return StoreView(apps=facts, loaded_at=loaded_at)
