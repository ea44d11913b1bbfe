"""Certificates, pending ACME challenges and the ACME account, in the store.

``certificates``: one row per hostname (an app's custom domain): ``source`` is
``acme`` (issued by the platform) or ``owner`` (uploaded with ``epio certs add``);
``state`` is ``pending`` (no certificate yet), ``issued``, ``failed`` (the last
attempt failed: ``last_error``, retried at ``next_attempt``; a failed renewal keeps
serving the certificate it has) or ``pending_dns`` (not ordered: the domain's DNS is
not in place; ``last_error`` says what record to create; looked at again at
``next_attempt``).  Keys are sealed (:mod:`epio.certs.crypto`).
Every change announces ``Change("certificate")`` so routers reload at once
(PostgreSQL; SQLite routers in other processes poll).
"""

from __future__ import annotations

from typing import Any

from attrs import field, frozen

from epio.domain import PLATFORM_APP
from epio.store import Change, Store
from epio.store.backend import Transaction

SOURCES = ("acme", "owner")
STATES = ("pending", "issued", "failed", "pending_dns")


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


def _table(app: str) -> str:
    """The platform hostname's certificate (app ``epio``, no row in ``apps``) has a table
    of its own; every app's is in ``certificates``."""
    return "platform_certificates" if app == PLATFORM_APP else "certificates"


async def put_cert(store: Store, rec: CertRecord, keep_owner: bool = False) -> CertRecord:
    """Insert or replace the row of ``rec.hostname``.  ``keep_owner``: if the row is an
    owner's certificate, leave it (the issuer never overwrites one that arrived while
    its order ran) and return it."""
    if rec.source not in SOURCES or rec.state not in STATES:
        raise ValueError(f"bad certificate record {rec.source}/{rec.state}")
    table = _table(rec.app)

    async def q(tx: Transaction) -> CertRecord:
        if keep_owner:
            row = (await tx.execute(f"SELECT * FROM {table} WHERE hostname = ?",
                                    (rec.hostname,))).one()
            if row is not None and row["source"] == "owner" and row["app"] == rec.app:
                return _cert(row)
        await tx.execute(f"DELETE FROM {table} WHERE hostname = ?", (rec.hostname,))
        await tx.execute(
            f"INSERT INTO {table} (hostname, app, source, state, cert_pem, key_sealed,"
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
    of the same app (a stale row of an earlier holder is never served to the next), and
    the platform hostname's."""
    rows = await store.fetch_all(
        "SELECT c.* FROM certificates c JOIN domains d "
        "ON d.hostname = c.hostname AND d.app = c.app ORDER BY c.hostname")
    return [_cert(r) for r in rows] + await list_platform_certs(store)


async def list_platform_certs(store: Store) -> list[CertRecord]:
    return [_cert(r) for r in await store.fetch_all(
        "SELECT * FROM platform_certificates ORDER BY hostname")]


async def delete_platform_certs_except(store: Store, keep: set[str]) -> None:
    """Forget the platform certificates of hostnames not in ``keep`` (an earlier
    ``api.hostname`` or ``node.domain``, a platform wildcard turned off)."""
    gone = [r.hostname for r in await list_platform_certs(store) if r.hostname not in keep]
    if not gone:
        return

    async def q(tx: Transaction) -> None:
        for host in gone:
            await tx.execute("DELETE FROM platform_certificates WHERE hostname = ?", (host,))

    await store.transaction(q, change=[Change("certificate")])


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


# --- DNS-01 (epio.certs.dns01) ------------------------------------------------------


async def dns_label(store: Store, app: str, base: str, new_label: str) -> str:
    """The label under ``acme.dns01_zone`` for ``app``'s names under ``base`` (the
    domain without its ``*.``): the existing one, else ``new_label`` (random), kept."""

    async def q(tx: Transaction) -> str:
        await tx.execute("INSERT INTO acme_dns_labels (app, base, label, created)"
                         " VALUES (?, ?, ?, ?) ON CONFLICT (app, base) DO NOTHING",
                         (app, base, new_label, store.now()))
        found = (await tx.execute("SELECT label FROM acme_dns_labels WHERE app = ? AND base = ?",
                                  (app, base))).scalar()
        return str(found)

    return await store.transaction(q)


async def delete_dns_labels_except(store: Store, keep: set[tuple[str, str]]) -> None:
    """Forget the labels of (app, base) pairs no longer among the apps' domains: a CNAME
    left pointing at one answers nothing any more."""
    rows = await store.fetch_all("SELECT app, base FROM acme_dns_labels")
    gone = [(r["app"], r["base"]) for r in rows if (r["app"], r["base"]) not in keep]
    if not gone:
        return

    async def q(tx: Transaction) -> None:
        for app, base in gone:
            await tx.execute("DELETE FROM acme_dns_labels WHERE app = ? AND base = ?",
                             (app, base))

    await store.transaction(q, change=[Change("certificate")])


async def put_dns_txt(store: Store, items: list[tuple[str, str]], expires: float) -> None:
    """Publish DNS-01 answers: ``(label, TXT value)``."""

    async def q(tx: Transaction) -> None:
        for label, value in items:
            await tx.execute("DELETE FROM acme_dns_txt WHERE label = ? AND value = ?",
                             (label, value))
            await tx.execute("INSERT INTO acme_dns_txt (label, value, expires) VALUES (?, ?, ?)",
                             (label, value, expires))

    await store.transaction(q, change=[Change("certificate")])


async def delete_dns_txt(store: Store, items: list[tuple[str, str]], now: float) -> None:
    """Withdraw DNS-01 answers (and any expired ones)."""

    async def q(tx: Transaction) -> None:
        for label, value in items:
            await tx.execute("DELETE FROM acme_dns_txt WHERE label = ? AND value = ?",
                             (label, value))
        await tx.execute("DELETE FROM acme_dns_txt WHERE expires < ?", (now,))

    await store.transaction(q, change=[Change("certificate")])


async def dns_zone_data(store: Store, now: float) -> dict[str, list[str]]:
    """label -> its unexpired TXT values, for every label (known labels without a
    pending order map to ``[]``: the DNS server answers them with no data, not NXDOMAIN)."""
    out: dict[str, list[str]] = {r["label"]: [] for r in await store.fetch_all(
        "SELECT label FROM acme_dns_labels")}
    for r in await store.fetch_all(
            "SELECT label, value FROM acme_dns_txt WHERE expires >= ? ORDER BY label, value",
            (now,)):
        out.setdefault(r["label"], []).append(r["value"])
    return out
