"""Standby servers of dedicated databases: roles, fencing, promotion, lag (issue 24).

A dedicated PostgreSQL or Redis add-on created with a standby has two servers on two
runners: the primary (the add-on record's ``instance``/``node``/``host``/``port``) and
a standby (``options["standby_*"]``) that follows it -- PostgreSQL by streaming
replication from a physical replication slot, with a replication role of its own;
Redis with ``replicaof`` and ``masterauth``.

**Which server is which is decided by the store, at every start.**  Each server's
start body carries ``EPIO_ADDON_EPOCH``; before its runner spawns it (the first start,
a crash restart, a restart from the runner's state file after the runner itself came
back) the runner asks :func:`server_role`: the instance named by the record as the
primary starts as the primary, the one named as the standby starts as a standby of the
recorded primary, and any other instance is **fenced**: refused, never started.  A
failover writes the record first (the standby becomes the primary, the epoch goes up),
so an old primary that comes back can never accept a write again.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from typing import Any

from epio.addons import AddonError

REPLICATION_USER = "epio_replication"
EPOCH_ENV = "EPIO_ADDON_EPOCH"
ROLE_ENV = "EPIO_SERVER_ROLE"
PROBE_TIMEOUT = 3.0  # seconds for one lag or promotion query


class Fenced(AddonError):
    """The add-on record no longer names this server: it must not start."""

    code = "fenced"


def slot_name(data_key: str) -> str:
    """The primary's replication slot for the standby whose data dir key is ``data_key``."""
    return f"epio_standby_{data_key}"


def application_name(data_key: str) -> str:
    return f"epio_standby_{data_key}"


def role_of(addon: Any, instance_id: str) -> dict[str, str]:
    """The environment a server of ``addon`` (an :class:`epio.store.addons.Addon`) starts
    with, decided from the record; raises :class:`Fenced` for any other instance."""
    o: Mapping[str, Any] = addon.options
    epoch = int(o.get("epoch") or 1)
    if addon.instance == instance_id:
        return {ROLE_ENV: "primary"}
    if o.get("standby_instance") == instance_id:
        if not addon.host or not addon.port:
            raise AddonError("the add-on's primary has no address yet")
        return {ROLE_ENV: "standby", "EPIO_PRIMARY_HOST": str(addon.host),
                "EPIO_PRIMARY_PORT": str(addon.port)}
    raise Fenced(f"fenced: the {addon.kind} add-on of {addon.app} is at epoch {epoch} and "
                 f"names other servers; {instance_id} is no longer its primary or standby")


async def server_role(store: Any, app: str, kind: str, instance_id: str) -> dict[str, str]:
    """:func:`role_of` with the record read from ``store`` (the runner's gate)."""
    from epio.store.addons import find_addon

    addon = await find_addon(store, app, kind)
    if addon is None or addon.plan != "dedicated":
        raise Fenced(f"fenced: {app} has no dedicated {kind} add-on any more")
    return role_of(addon, instance_id)


# --- PostgreSQL (psycopg2, called in a thread) -------------------------------------------


def _pg(host: str, port: int, user: str, password: str) -> Any:
    import psycopg2

    conn = psycopg2.connect(host=host, port=port, user=user, password=password,
                            dbname="postgres", connect_timeout=int(PROBE_TIMEOUT))
    conn.autocommit = True
    return conn


def pg_prepare_primary(host: str, port: int, user: str, password: str,
                       repl_password: str, data_key: str) -> None:
    """On the primary: the replication role (its own password) and the standby's slot."""
    conn = _pg(host, port, user, password)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (REPLICATION_USER,))
            verb = "ALTER" if cur.fetchone() else "CREATE"
            # the SCRAM verifier, made here: the password itself never reaches the server,
            # so never its log (a failed ALTER ROLE logs the statement)
            from psycopg2.extensions import encrypt_password

            verifier = encrypt_password(repl_password, REPLICATION_USER, conn, "scram-sha-256")
            cur.execute(f"{verb} ROLE {REPLICATION_USER} WITH LOGIN REPLICATION PASSWORD %s",
                        (verifier,))
            cur.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s",
                        (slot_name(data_key),))
            if cur.fetchone() is None:
                cur.execute("SELECT pg_create_physical_replication_slot(%s)",
                            (slot_name(data_key),))
    finally:
        conn.close()


def pg_drop_slots(host: str, port: int, user: str, password: str, keep: str = "") -> None:
    """Drop the inactive standby slots but ``keep``'s (a gone standby's slot would keep
    WAL on the primary for ever)."""
    conn = _pg(host, port, user, password)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                        "WHERE slot_name LIKE 'epio_standby_%%' AND NOT active "
                        "AND slot_name <> %s", (slot_name(keep) if keep else "",))
    finally:
        conn.close()


def pg_promote(host: str, port: int, user: str, password: str) -> None:
    """``pg_promote()`` on the standby, waited for (60 s)."""
    conn = _pg(host, port, user, password)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_is_in_recovery()")
            row = cur.fetchone()
            if row and row[0]:
                cur.execute("SELECT pg_promote(true, 60)")
                done = cur.fetchone()
                if not done or not done[0]:
                    raise AddonError("pg_promote() did not finish within 60s")
    finally:
        conn.close()


def pg_lag(host: str, port: int, user: str, password: str, data_key: str) -> dict[str, Any]:
    """The standby's replication as the primary sees it (``pg_stat_replication``)."""
    conn = _pg(host, port, user, password)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT state, pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint, "
                "COALESCE(EXTRACT(EPOCH FROM replay_lag), 0)::float8 "
                "FROM pg_stat_replication WHERE application_name = %s",
                (application_name(data_key),))
            row = cur.fetchone()
    finally:
        conn.close()
    if row is None:
        return {"state": "disconnected", "lag_bytes": None, "lag_seconds": None}
    return {"state": str(row[0]), "lag_bytes": int(row[1] or 0),
            "lag_seconds": round(float(row[2] or 0.0), 3)}


# --- Redis (a plain socket, called in a thread) ------------------------------------------


def _resp(*args: str) -> bytes:
    out = [f"*{len(args)}\r\n".encode()]
    for a in args:
        b = a.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def redis_call(host: str, port: int, password: str, *command: str) -> str:
    """AUTH, then one command; its reply as text (errors raise AddonError)."""
    with socket.create_connection((host, port), timeout=PROBE_TIMEOUT) as s:
        s.sendall(_resp("AUTH", password) + _resp(*command))
        f = s.makefile("rb")
        replies = []
        for _ in range(2):
            line = f.readline()
            if not line:
                raise AddonError("redis closed the connection")
            if line.startswith(b"-"):
                raise AddonError("redis: " + line[1:].decode(errors="replace").strip())
            if line.startswith(b"$"):
                n = int(line[1:])
                replies.append(b"" if n < 0 else f.read(n + 2)[:-2])
            else:
                replies.append(line[1:].strip())
        return replies[1].decode(errors="replace")


def redis_info(text: str) -> dict[str, str]:
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def redis_lag(host: str, port: int, password: str, standby_port: int) -> dict[str, Any]:
    """The replica on ``standby_port`` as the primary sees it (``INFO replication``)."""
    info = redis_info(redis_call(host, port, password, "INFO", "replication"))
    master = int(info.get("master_repl_offset", "0") or 0)
    for key, value in info.items():
        if not key.startswith("slave") or not key[5:].isdigit():
            continue
        fields = dict(kv.split("=", 1) for kv in value.strip().split(",") if "=" in kv)
        if fields.get("port") == str(standby_port):
            return {"state": fields.get("state", "?"),
                    "lag_bytes": max(0, master - int(fields.get("offset", "0") or 0)),
                    "lag_seconds": float(fields.get("lag", "0") or 0)}
    return {"state": "disconnected", "lag_bytes": None, "lag_seconds": None}


def redis_promote(host: str, port: int, password: str) -> None:
    """``REPLICAOF NO ONE`` on the replica, then check that it is a master."""
    redis_call(host, port, password, "REPLICAOF", "NO", "ONE")
    role = redis_info(redis_call(host, port, password, "INFO", "replication")).get("role")
    if role != "master":
        raise AddonError(f"redis is still a {role} after REPLICAOF NO ONE")
