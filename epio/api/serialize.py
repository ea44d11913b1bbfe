"""Store records -> the JSON shapes of :mod:`epio.api.spec` (no secrets, ever)."""

from __future__ import annotations

from typing import Any

from epio.store import Domain, Instance, TokenInfo, User


def user(u: User) -> dict[str, Any]:
    return {"id": u.id, "name": u.name, "email": u.email, "is_admin": u.is_admin,
            "created": u.created}


def token(t: TokenInfo) -> dict[str, Any]:
    return {"id": t.id, "prefix": t.prefix, "description": t.description, "created": t.created,
            "last_used": t.last_used}


def instance(i: Instance) -> dict[str, Any]:
    return {"id": i.id, "name": f"{i.process_type}.{i.number}", "type": i.process_type,
            "number": i.number, "release": i.release, "node": i.node, "host": i.host,
            "port": i.port, "state": i.state, "since": i.since, "restarts": i.restarts}


def domain(d: Domain, builtin: bool = False) -> dict[str, Any]:
    hostname = d.hostname
    return {"hostname": hostname, "wildcard": d.wildcard, "created": d.created,
            "builtin": builtin}


def join_token(t: Any) -> dict[str, Any]:
    """A join token's stored facts (epio.store.cluster.JoinTokenInfo): never the token."""
    return {"id": t.id, "node_id": t.node_id, "created_by": t.created_by,
            "created": t.created, "expires": t.expires, "used": t.used,
            "used_by": t.used_by}
