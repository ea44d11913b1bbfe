"""The certificates of an app, for the API (``GET/POST /apps/{app}/certs``)."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from epio.api import errors
from epio.certs import records
from epio.certs.crypto import CertificateError, check_pair, seal
from epio.certs.dns01 import Dns01, Record, base_name
from epio.certs.resolve import PROBE_LABEL, NameCheck
from epio.store import App, Store

MAX_PEM = 64 * 1024
CHECK_TIMEOUT = 5.0  # seconds `epio domains add` waits for its DNS check (docs/https.md)
# DNS checks running at once on one api process; past it a check is skipped (each
# lookup holds a UDP socket: parallel `domains add` calls must not exhaust them)
MAX_CHECKS = 16


class DomainCheck:
    """The DNS check of ``epio domains add``: does the new domain point at the routers
    (a wildcard: does a name under it), and has a wildcard the DNS-01 CNAME?  Never
    fatal: the answer says what record to create; the issuer checks again."""

    log = Logger()

    def __init__(self, clock: IReactorTime, name_check: NameCheck | None, dns01: Dns01 | None,
                 acme_on: bool, timeout: float = CHECK_TIMEOUT,
                 max_checks: int = MAX_CHECKS) -> None:
        self.clock = clock
        self.name_check = name_check
        self.dns01 = dns01
        self.acme_on = acme_on
        self.timeout = timeout
        self.max_checks = max_checks
        self.running = 0

    async def check(self, app: str, host: str, wildcard: bool) -> dict[str, Any]:
        """``{"state": "ok" | "pending_dns" | "unknown", "message", "records"}`` within
        ``timeout`` seconds; "unknown" at once while ``max_checks`` run."""
        if self.running >= self.max_checks:
            return {"state": "unknown", "records": [],
                    "message": "DNS not checked: too many checks running now (the "
                               "certificate issuer checks again)"}
        self.running += 1
        d = defer.Deferred.fromCoroutine(self._check(app, host, wildcard))
        d.addTimeout(self.timeout, self.clock)
        try:
            return await d
        except defer.TimeoutError:
            return {"state": "unknown", "records": [],
                    "message": f"DNS not checked: no answer within {self.timeout:g} s "
                               "(the certificate issuer checks again)"}
        except Exception:  # a bug or the store: the domain is saved all the same
            self.log.failure("DNS check of {host} ({app})", host=host, app=app)
            return {"state": "unknown", "records": [],
                    "message": "DNS not checked (the certificate issuer checks again)"}
        finally:
            self.running -= 1

    async def _check(self, app: str, host: str, wildcard: bool) -> dict[str, Any]:
        wanted: list[Record] = []
        notes: list[str] = []
        routing_known = False
        if self.name_check is not None:
            cluster = await self.name_check.cluster_addresses()
            if cluster:
                routing_known = True
                # a wildcard's traffic: any name one label under it
                probe = f"{PROBE_LABEL}.{base_name(host)}" if wildcard else host
                problem = await self.name_check.problem(probe)
                if problem is not None:
                    notes.append(problem.replace(probe, host))
                    wanted += [Record(host, "AAAA" if ":" in a else "A", a)
                               for a in sorted(cluster)]
        cname_ok = False
        if wildcard and self.dns01 is not None:
            problem = await self.dns01.problem(app, host)
            if problem is None:
                cname_ok = True
            else:
                notes.append(f"its certificate needs DNS-01: {problem}")
                wanted.append(await self.dns01.record(app, host))
        elif wildcard and self.acme_on:
            notes.append("wildcard certificates need DNS-01, which this cluster does not "
                         "offer: add your own with `epio certs add`")
        if wanted:
            state = "pending_dns"
        elif routing_known or cname_ok:
            state = "ok"
        else:
            state = "unknown"
        if not notes:
            notes.append({"ok": "DNS is in place",
                          "unknown": "DNS not checked: the routers' addresses are not known "
                                     "(acme.router_addresses)"}.get(state, ""))
        return {"state": state, "message": "; ".join(n for n in notes if n),
                "records": [r.as_dict() for r in wanted]}


class Certs:
    """The api's certificate use cases (``secret``: the cluster secret, to seal keys)."""

    def __init__(self, store: Store, secret: bytes, acme_on: bool, clock: IReactorTime,
                 domain_check: DomainCheck | None = None) -> None:
        self.store = store
        self.secret = secret
        self.acme_on = acme_on
        self.clock = clock
        self.domain_check = domain_check  # None: `epio domains add` checks nothing

    async def check_domain(self, app: str, hostname: str, wildcard: bool) -> dict[str, Any]:
        if self.domain_check is None:
            return {"state": "unknown", "records": [],
                    "message": "DNS not checked (acme.name_check = false)"}
        return await self.domain_check.check(app, hostname, wildcard)

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
                    "next_attempt": (r.next_attempt if r.state in ("failed", "pending_dns")
                                     else None),
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
