"""Cluster membership in the store: join tokens and the nexus/logger endpoint lists.

**Join tokens** (docs/cluster.md, "Joining a host").  An admin asks the api for a
token; the store keeps its sha256 (never the token), the node id it grants, the
cluster secret *sealed* with a key only the token derives (epio.cluster: the secret
is never in the store in the clear), the cluster-wide settings a new node must
share, who made it and when it expires.  Redeeming marks the row used in the same
transaction that reads it: a token works once (of two redeems at once, one wins).
Used and expired rows are kept for :data:`KEEP_REFUSED` seconds after they expire so
a refusal can say *why* (used, expired) instead of "unknown"; then they are deleted
whenever a token is made.

**Endpoint lists.**  A node running the ``nexus`` or ``logger`` role registers its
endpoints (one row per node and role) and refreshes the row's ``updated`` time while
it runs; it deletes the row when it stops.  Every node reads the rows refreshed
within ``cluster.endpoint_ttl`` (a crashed node's row ages out).
"""

from __future__ import annotations

import hmac
import json
import uuid
from collections.abc import Mapping
from typing import Any

from attrs import frozen

from epio.store.backend import Transaction
from epio.store.errors import InvalidValue, StoreError
from epio.store.store import Store, hash_token

#: seconds a used or expired token's row is kept after its expiry (to say why it is refused)
KEEP_REFUSED = 7 * 86400.0

#: the roles whose endpoints the store lists
LISTED_ROLES = ("nexus", "logger", "lb")


class JoinRefused(StoreError):
    """A join token that does not admit: ``code`` is ``unknown``, ``used`` or ``expired``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@frozen
class JoinTokenInfo:
    """A join token's stored facts (never the token, nor the sealed secret)."""

    id: str
    node_id: str
    created_by: str
    created: float
    expires: float
    used: float | None
    used_by: str | None


@frozen
class RedeemedToken:
    """What a redeemed token grants: the node id, the sealed secret, shared settings."""

    id: str
    node_id: str
    sealed: str
    shared: dict[str, dict[str, Any]]


async def create_join_token(store: Store, token: str, token_id: str, node_id: str, sealed: str,
                            shared: Mapping[str, Mapping[str, Any]], created_by: str,
                            ttl: float) -> JoinTokenInfo:
    """Store a new join token (its hash) valid ``ttl`` seconds from now."""
    if not ttl > 0:
        raise InvalidValue("a join token must be valid for some time")
    now = store.now()
    info = JoinTokenInfo(token_id, node_id, created_by, now, now + ttl, None, None)

    async def q(tx: Transaction) -> None:
        await tx.execute("DELETE FROM join_tokens WHERE expires <= ?", (now - KEEP_REFUSED,))
        await tx.execute(
            "INSERT INTO join_tokens (id, token_hash, node_id, sealed, shared, created_by, "
            "created, expires) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (token_id, hash_token(token), node_id, sealed, json.dumps(dict(shared)),
             created_by, now, now + ttl))

    await store.transaction(q, conflict="a join token with that id exists")
    return info


async def redeem_join_token(store: Store, token: str, used_by: str) -> RedeemedToken:
    """Use a join token up; raise :class:`JoinRefused` saying why it does not admit."""
    digest = hash_token(token)
    now = store.now()

    async def q(tx: Transaction) -> RedeemedToken:
        row = (await tx.execute(
            "SELECT id, token_hash, node_id, sealed, shared, expires, used FROM join_tokens "
            "WHERE token_hash = ?", (digest,))).one()
        if row is None or not hmac.compare_digest(str(row["token_hash"]), digest):
            raise JoinRefused("unknown", "this join token is not known to the store (mistyped, "
                                         "or made for another cluster)")
        if row["used"] is not None:
            raise JoinRefused("used", f"join token {row['id']} was used already (a token "
                                      "admits one node once); ask for a new one")
        if float(row["expires"]) <= now:
            raise JoinRefused("expired", f"join token {row['id']} expired; ask for a new one")
        # only the UPDATE that flips used from NULL may use it: two redeems at once, one wins
        won = (await tx.execute("UPDATE join_tokens SET used = ?, used_by = ? "
                                "WHERE id = ? AND used IS NULL",
                                (now, used_by[:200], row["id"]))).rowcount
        if not won:
            raise JoinRefused("used", f"join token {row['id']} was used already")
        return RedeemedToken(str(row["id"]), str(row["node_id"]), str(row["sealed"]),
                             json.loads(row["shared"]))

    return await store.transaction(q)


async def list_join_tokens(store: Store) -> list[JoinTokenInfo]:
    """Every join token kept, newest first."""
    rows = await store.fetch_all("SELECT id, node_id, created_by, created, expires, used, "
                                 "used_by FROM join_tokens ORDER BY created DESC")
    return [JoinTokenInfo(str(r["id"]), str(r["node_id"]), str(r["created_by"]),
                          float(r["created"]), float(r["expires"]),
                          None if r["used"] is None else float(r["used"]),
                          None if r["used_by"] is None else str(r["used_by"]))
            for r in rows]


def new_token_id() -> str:
    return uuid.uuid4().hex[:16]


async def register_endpoints(store: Store, node_id: str, role: str,
                             endpoints: Mapping[str, str]) -> None:
    """Insert or refresh this node's row for ``role`` (``nexus``: its heartbeat,
    router and publish endpoints; ``logger``: its pull, router and publish ones;
    ``lb``: ``addresses``, its host's addresses separated by spaces)."""
    if role not in LISTED_ROLES:
        raise InvalidValue(f"role {role!r} has no endpoints in the store")
    value = json.dumps(dict(endpoints), sort_keys=True)
    now = store.now()

    async def q(tx: Transaction) -> None:
        done = (await tx.execute(
            "UPDATE cluster_endpoints SET endpoints = ?, updated = ? "
            "WHERE node_id = ? AND role = ?", (value, now, node_id, role))).rowcount
        if not done:
            await tx.execute("INSERT INTO cluster_endpoints (node_id, role, endpoints, updated) "
                             "VALUES (?, ?, ?, ?)", (node_id, role, value, now))

    await store.transaction(q, conflict=f"{role} endpoints of {node_id} registered twice at once")


async def unregister_endpoints(store: Store, node_id: str, role: str) -> None:
    """Remove this node's row for ``role`` (the node stops)."""
    async def q(tx: Transaction) -> None:
        await tx.execute("DELETE FROM cluster_endpoints WHERE node_id = ? AND role = ?",
                         (node_id, role))

    await store.transaction(q)


@frozen
class StoredEndpoints:
    """The live rows of the endpoint lists: nexus tables and logger PULL endpoints,
    each in node id order."""

    nexus: tuple[tuple[str, dict[str, str]], ...] = ()
    loggers: tuple[tuple[str, str], ...] = ()
    #: each logger's router and publish endpoints (what the api queries: logger.peers)
    logger_peers: tuple[tuple[str, dict[str, str]], ...] = ()
    #: each router (lb) node's addresses: the sources the runners' fences let reach
    #: instance ports (epio.runner.fence)
    routers: tuple[tuple[str, tuple[str, ...]], ...] = ()


async def read_endpoints(store: Store, ttl: float) -> StoredEndpoints:
    """The rows refreshed within the last ``ttl`` seconds."""
    rows = await store.fetch_all("SELECT node_id, role, endpoints FROM cluster_endpoints "
                                 "WHERE updated > ? ORDER BY node_id, role",
                                 (store.now() - ttl,))
    nexus: list[tuple[str, dict[str, str]]] = []
    loggers: list[tuple[str, str]] = []
    peers: list[tuple[str, dict[str, str]]] = []
    routers: list[tuple[str, tuple[str, ...]]] = []
    for r in rows:
        try:
            value = json.loads(r["endpoints"])
        except ValueError:
            continue
        if r["role"] == "nexus" and isinstance(value, dict):
            nexus.append((str(r["node_id"]), {str(k): str(v) for k, v in value.items()}))
        elif r["role"] == "logger" and isinstance(value, dict) and value.get("pull"):
            loggers.append((str(r["node_id"]), str(value["pull"])))
            if value.get("router") and value.get("publish"):
                peers.append((str(r["node_id"]), {"router": str(value["router"]),
                                                  "publish": str(value["publish"])}))
        elif r["role"] == "lb" and isinstance(value, dict):
            routers.append((str(r["node_id"]), tuple(str(value.get("addresses", "")).split())))
    return StoredEndpoints(tuple(nexus), tuple(loggers), tuple(peers), tuple(routers))
