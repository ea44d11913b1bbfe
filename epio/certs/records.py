"""Certificates, pending ACME challenges and the ACME account, in the store.

``certificates``: one row per hostname (an app's custom domain): ``source`` is
``acme`` (issued by the platform) or ``owner`` (uploaded with ``epio certs add``);
``state`` is ``pending`` (no certificate yet), ``issued`` or ``failed`` (the last
attempt failed: ``last_error``, retried at ``next_attempt``; a failed renewal keeps
serving the certificate it has).  Keys are sealed (:mod:`epio.certs.crypto`).
Every change announces ``Change("certificate")`` so routers reload at once
(PostgreSQL; SQLite routers in other processes poll).
"""

from __future__ import annotations

from typing import Any

from attrs import field, frozen

from epio.store import Change, Store
from epio.store.backend import Transaction

SOURCES = ("acme", "owner")
STATES = ("pending", "issued", "failed")


@frozen
class CertRecord:
    hostname: str
    app: str
    source: str
    state: str
    updated: float
    cert_pem: str | None = None
    key_sealed: str | None = field(default=None, repr=False)
    not_after: float | None = None
    last_error: str | None = None
    failures: int = 0
    next_attempt: float = 0.0


def _cert(row: dict[str, Any]) -> CertRecord:
    return CertRecord(
        hostname=row["hostname"], app=row["app"], source=row["source"], state=row["state"],
        updated=float(row["updated"]), cert_pem=row["cert_pem"], key_sealed=row["key_sealed"],
        not_after=None if row["not_after"] is None else float(row["not_after"]),
        last_error=row["last_error"], failures=int(row["failures"]),
        next_attempt=float(row["next_attempt"]))


async def put_cert(store: Store, rec: CertRecord, keep_owner: bool = False) -> CertRecord:
    """Insert or replace the row of ``rec.hostname``.  ``keep_owner``: if the row is an
    owner's certificate, leave it (the issuer never overwrites one that arrived while
    its order ran) and return it."""
    if rec.source not in SOURCES or rec.state not in STATES:
        raise ValueError(f"bad certificate record {rec.source}/{rec.state}")

    async def q(tx: Transaction) -> CertRecord:
        if keep_owner:
            row = (await tx.execute("SELECT * FROM certificates WHERE hostname = ?",
                                    (rec.hostname,))).one()
            if row is not None and row["source"] == "owner" and row["app"] == rec.app:
                return _cert(row)
        await tx.execute("DELETE FROM certificates WHERE hostname = ?", (rec.hostname,))
        await tx.execute(
            "INSERT INTO certificates (hostname, app, source, state, cert_pem, key_sealed,"
            " not_after, last_error, failures, next_attempt, updated)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (rec.hostname, rec.app, rec.source, rec.state, rec.cert_pem, rec.key_sealed,
             rec.not_after, rec.last_error, rec.failures, rec.next_attempt, rec.updated))
        return rec

    return await store.transaction(q, change=[Change("certificate", rec.app, rec.hostname)])


async def list_certs(store: Store, app: str | None = None) -> list[CertRecord]:
    if app is None:
        rows = await store.fetch_all("SELECT * FROM certificates ORDER BY hostname")
    else:
        rows = await store.fetch_all("SELECT * FROM certificates WHERE app = ? ORDER BY hostname",
                                (app,))
    return [_cert(r) for r in rows]


async def list_served_certs(store: Store) -> list[CertRecord]:
    """The certificates the routers serve: only those whose hostname is still a domain
    of the same app (a stale row of an earlier holder is never served to the next)."""
    rows = await store.fetch_all(
        "SELECT c.* FROM certificates c JOIN domains d "
        "ON d.hostname = c.hostname AND d.app = c.app ORDER BY c.hostname")
    return [_cert(r) for r in rows]


async def delete_certs_except(store: Store, keep: set[str]) -> list[str]:
    """Forget certificates of hostnames no longer any app's domain; returns them."""
    gone = [r.hostname for r in await list_certs(store) if r.hostname not in keep]
    if not gone:
        return []

    async def q(tx: Transaction) -> None:
        for h in gone:
            await tx.execute("DELETE FROM certificates WHERE hostname = ?", (h,))

    await store.transaction(q, change=[Change("certificate")])
    return gone


async def put_challenges(store: Store, items: list[tuple[str, str, str]],
                         expires: float) -> None:
    """Publish HTTP-01 answers: ``(token, hostname, key_authorization)``."""

    async def q(tx: Transaction) -> None:
        for token, host, keyauth in items:
            await tx.execute("DELETE FROM acme_challenges WHERE token = ?", (token,))
            await tx.execute("INSERT INTO acme_challenges (token, hostname, key_authorization,"
                             " expires) VALUES (?, ?, ?, ?)", (token, host, keyauth, expires))

    await store.transaction(q, change=[Change("certificate")])


async def delete_challenges(store: Store, tokens: list[str], now: float) -> None:
    """Withdraw answers (and any expired ones)."""

    async def q(tx: Transaction) -> None:
        for t in tokens:
            await tx.execute("DELETE FROM acme_challenges WHERE token = ?", (t,))
        await tx.execute("DELETE FROM acme_challenges WHERE expires < ?", (now,))

    await store.transaction(q, change=[Change("certificate")])


async def list_challenges(store: Store, now: float) -> dict[str, tuple[str, str]]:
    """token -> (hostname, key authorization) of every unexpired challenge."""
    rows = await store.fetch_all("SELECT * FROM acme_challenges WHERE expires >= ?", (now,))
    return {r["token"]: (r["hostname"], r["key_authorization"]) for r in rows}


async def get_account(store: Store, directory: str) -> tuple[str, str | None] | None:
    """(sealed key, account URI) of the cluster's account at ``directory``."""
    row = await store.fetch_one("SELECT * FROM acme_accounts WHERE directory = ?", (directory,))
    return None if row is None else (row["key_sealed"], row["uri"])


async def put_account(store: Store, directory: str, key_sealed: str, uri: str | None) -> None:
    async def q(tx: Transaction) -> None:
        await tx.execute("DELETE FROM acme_accounts WHERE directory = ?", (directory,))
        await tx.execute("INSERT INTO acme_accounts (directory, key_sealed, uri, created)"
                         " VALUES (?, ?, ?, ?)", (directory, key_sealed, uri, store.now()))

    await store.transaction(q)
