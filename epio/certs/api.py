"""The certificates of an app, for the API (``GET/POST /apps/{app}/certs``)."""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorTime

from epio.api import errors
from epio.certs import records
from epio.certs.crypto import CertificateError, check_pair, seal
from epio.store import App, Store

MAX_PEM = 64 * 1024


class Certs:
    """The api's certificate use cases (``secret``: the cluster secret, to seal keys)."""

    def __init__(self, store: Store, secret: bytes, acme_on: bool, clock: IReactorTime) -> None:
        self.store = store
        self.secret = secret
        self.acme_on = acme_on
        self.clock = clock

    async def describe(self, app: App) -> list[dict[str, Any]]:
        return await describe_certs(self.store, app, self.acme_on)

    async def add(self, app: App, hostname: str, cert_pem: str, key_pem: str) -> dict[str, Any]:
        return await add_owner_cert(self.store, self.secret, app, hostname, cert_pem, key_pem,
                                    self.clock.seconds())


async def describe_certs(store: Store, app: App, acme_on: bool) -> list[dict[str, Any]]:
    """One entry per custom domain: its certificate's source, state, expiry, last error."""
    certs = {r.hostname: r for r in await records.list_certs(store, app.name)}
    out: list[dict[str, Any]] = []
    for d in await store.list_domains(app.name):
        r = certs.get(d.hostname)
        if r is None:
            out.append({"hostname": d.hostname, "source": "acme" if acme_on else None,
                        "state": "pending" if acme_on else "none", "not_after": None,
                        "last_error": None if acme_on else
                        "automatic certificates are off on this cluster (acme.directory)",
                        "next_attempt": None, "serving": False})
            continue
        out.append({"hostname": r.hostname, "source": r.source, "state": r.state,
                    "not_after": r.not_after, "last_error": r.last_error,
                    "next_attempt": r.next_attempt if r.state == "failed" else None,
                    "serving": bool(r.cert_pem)})
    return out


async def add_owner_cert(store: Store, secret: bytes, app: App, hostname: str, cert_pem: str,
                         key_pem: str, now: float) -> dict[str, Any]:
    """Keep an owner's certificate for one of the app's domains (validated)."""
    hostname = hostname.lower().rstrip(".")
    if hostname not in {d.hostname for d in await store.list_domains(app.name)}:
        raise errors.NotFound(f"{hostname} is not a domain of {app.name} "
                              "(epio domains add it first)")
    if len(cert_pem) > MAX_PEM or len(key_pem) > MAX_PEM:
        raise errors.BadRequest(f"certificate and key must each be under {MAX_PEM} bytes")
    try:
        expiry = check_pair(cert_pem.encode(), key_pem.encode(), hostname, now)
    except CertificateError as e:
        raise errors.BadRequest(f"certificate refused: {e}") from None
    await records.put_cert(store, records.CertRecord(
        hostname=hostname, app=app.name, source="owner", state="issued", updated=now,
        cert_pem=cert_pem, key_sealed=seal(secret, key_pem.encode(), hostname),
        not_after=expiry))
    return {"hostname": hostname, "source": "owner", "state": "issued", "not_after": expiry,
            "last_error": None, "next_attempt": None, "serving": True}
