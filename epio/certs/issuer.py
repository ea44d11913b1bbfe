"""The certificate issuer: one per cluster (store lock ``acme-issuer``), in the api role.

Every ``acme.check_interval`` seconds, and at once when a domain is added, the
leader looks at every custom domain of every app and orders a certificate
(:mod:`epio.certs.acmeclient`, in a thread) for each one that has none, whose
certificate expires within ``acme.renew_before_days``, or whose last failure's
retry time has come, once the name resolves to the cluster's routers
(:mod:`epio.certs.resolve`; else that is the failure).  A failure is recorded on
the domain's row (``epio certs`` shows it) and retried after ``acme.retry_min``
seconds, doubled per further failure up to ``acme.retry_max`` (rate limits
included); a certificate that fails to renew keeps being served until it
expires.  Owners' own certificates (``epio certs add``) are never touched.

The challenge: DNS-01 (:mod:`epio.certs.dns01`) when ``acme.dns01_zone`` is set and
the owner's ``_acme-challenge`` CNAME points at the domain's label, else HTTP-01.
Wildcard domains need DNS-01.  A domain whose DNS is not in place (neither pointing
at the routers nor with the CNAME) is ``pending_dns``, with the record to create;
it is looked at again after ``acme.check_interval``, doubling, at most
``acme.retry_min``, and never ordered until its DNS is right.

The platform's own certificates (app ``epio``, ``platform_certificates``): the
platform hostname (``api.hostname``) by HTTP-01, and, with ``acme.platform_wildcard``,
the platform wildcard ``*.<node.domain>`` by DNS-01 once the operator's CNAME
``_acme-challenge.<node.domain>`` points at the platform's label (until then
``pending_dns``, the record to create in the log line).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from epio.certs import records
from epio.certs.acmeclient import DNS01, HTTP01, AcmeClient, AcmeFailure
from epio.certs.crypto import new_account_key_pem, new_key_pem, not_after, seal, unseal
from epio.certs.dns01 import Dns01, base_name
from epio.certs.resolve import NameCheck, make_name_check
from epio.config.settings import AcmeSettings
from epio.domain import PLATFORM_APP, platform_hostname
from epio.store import LeaderService, Store

if TYPE_CHECKING:
    from epio.config import Settings
    from epio.node import Node

LOCK_NAME = "acme-issuer"
DAY = 86400.0
WILDCARD_ERROR = ("wildcard names need the DNS-01 challenge, which this cluster does not "
                  "offer (acme.dns01_zone): add your own certificate with `epio certs add`")


@attrs.frozen
class IssuerSettings:
    directory: str
    contact: str
    ca_bundle: str
    check_interval: float
    renew_before: float
    retry_min: float
    retry_max: float
    challenge_wait: float
    order_timeout: float

    @classmethod
    def from_settings(cls, acme: AcmeSettings) -> IssuerSettings:
        return cls(acme.directory, acme.contact, acme.ca_bundle, acme.check_interval,
                   acme.renew_before_days * DAY, acme.retry_min, acme.retry_max,
                   acme.challenge_wait, acme.order_timeout)


def _error_text(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text if len(text) <= 500 else text[:497] + "..."


class Issuer:
    """The issuing logic (the leader's): ``run_blocking(f, *args)`` runs a blocking
    ACME call off the reactor (``deferToThread``); ``make_client`` builds the
    :class:`AcmeClient` (injected for tests)."""

    log = Logger()

    def __init__(self, store: Store, settings: IssuerSettings, secret: bytes, clock: IReactorTime,
                 run_blocking: Callable[..., defer.Deferred[Any]] = deferToThread,
                 make_client: Callable[..., Any] = AcmeClient,
                 name_check: NameCheck | None = None, dns01: Dns01 | None = None,
                 platform_hostname: str = "", platform_wildcard: str = "") -> None:
        self.store = store
        self.s = settings
        self.secret = secret
        self.clock = clock
        self.run_blocking = run_blocking
        self.make_client = make_client
        self.name_check = name_check  # DNS before each order (epio.certs.resolve), or None
        self.dns01 = dns01  # DNS-01 (epio.certs.dns01), or None: HTTP-01 only
        # api.hostname, whose certificate is issued too ("": none, acme.platform_certificate)
        self.platform_hostname = platform_hostname
        # "*.<node.domain>", issued by DNS-01 ("": none, acme.platform_wildcard)
        self.platform_wildcard = platform_wildcard if dns01 is not None else ""
        self._client: Any = None
        self.issued = 0
        self.failed = 0

    def _account_context(self) -> str:
        return "acme-account:" + self.s.directory

    async def client(self) -> Any:
        """The cluster's account at the configured directory (created on first use)."""
        if self._client is not None:
            return self._client
        found = await records.get_account(self.store, self.s.directory)
        if found is None:
            key = await self.run_blocking(new_account_key_pem)
            uri = None
        else:
            key = unseal(self.secret, found[0], self._account_context())
            uri = found[1]
        verify: bool | str = self.s.ca_bundle or True
        client = self.make_client(self.s.directory, key, uri, verify=verify,
                                  contact=self.s.contact)
        registered = await self.run_blocking(client.register)
        if found is None or registered != uri:
            await records.put_account(self.store, self.s.directory,
                                      seal(self.secret, key, self._account_context()),
                                      registered)
            self.log.info("ACME account {uri} at {directory}", uri=registered,
                          directory=self.s.directory)
        self._client = client
        return client

    def due(self, rec: records.CertRecord | None, now: float, app: str) -> bool:
        """Whether ``app``'s domain needs an order now (``rec``: the hostname's row)."""
        if rec is None or rec.app != app:
            return True  # none, or a stale row of the hostname's earlier holder
        if rec.source == "owner":
            return False
        if rec.failures and now < rec.next_attempt:
            return False
        if rec.state == "issued" and rec.not_after is not None:
            return rec.not_after - now <= self.s.renew_before
        return True

    async def run_round(self) -> list[str]:
        """Issue or renew what is due; returns the hostnames attempted."""
        domains = await self.store.list_domains()
        hosts = {d.hostname: d for d in domains}
        await records.delete_certs_except(self.store, set(hosts))
        if self.dns01 is not None:
            await records.delete_dns_labels_except(
                self.store, {(d.app, base_name(d.hostname)) for d in domains})
        certs = {r.hostname: r for r in await records.list_certs(self.store)}
        attempted = []
        for host, dom in sorted(hosts.items()):
            now = self.clock.seconds()
            rec = certs.get(host)
            if not self.due(rec, now, dom.app):
                continue
            if rec is not None and rec.app != dom.app:
                rec = None  # an earlier holder's row: nothing of it is kept or served
            attempted.append(host)
            if dom.wildcard and self.dns01 is None:
                await self._failed(host, dom.app, rec, WILDCARD_ERROR, self.s.retry_max)
                continue
            challenge, problem = await self.plan(host, dom.app, dom.wildcard)
            if challenge is None:  # DNS not in place: no order, said how to fix it
                await self._failed(host, dom.app, rec, problem or "", self._dns_wait(rec),
                                   "pending_dns")
                continue
            await self.issue(host, dom.app, rec, challenge)
        attempted.extend(await self._platform_round())
        return attempted

    async def _platform_round(self) -> list[str]:
        """The platform's certificates (app ``epio``): its hostname by HTTP-01 like any
        domain's (the routers serve the platform's route and answer its challenges), and
        the platform wildcard by DNS-01."""
        hosts = [h for h in (self.platform_hostname, self.platform_wildcard) if h]
        await records.delete_platform_certs_except(self.store, set(hosts))
        platform = {r.hostname: r for r in await records.list_platform_certs(self.store)}
        attempted = []
        for host in hosts:
            rec = platform.get(host)
            if not self.due(rec, self.clock.seconds(), PLATFORM_APP):
                continue
            attempted.append(host)
            if host == self.platform_wildcard:
                await self._platform_wildcard(host, rec)
            else:
                await self._platform_hostname(host, rec)
        return attempted

    async def _platform_wildcard(self, host: str, rec: records.CertRecord | None) -> None:
        assert self.dns01 is not None
        problem = await self.dns01.problem(PLATFORM_APP, host)
        if problem is not None:  # the operator's CNAME: the log line says which
            await self._failed(host, PLATFORM_APP, rec, problem, self._dns_wait(rec),
                               "pending_dns")
            return
        await self.issue(host, PLATFORM_APP, rec, DNS01)

    async def _platform_hostname(self, host: str, rec: records.CertRecord | None) -> None:
        if self.name_check is not None:
            problem = await self.name_check.problem(host)
            if problem is not None:
                await self._failed(host, PLATFORM_APP, rec, problem, self._dns_wait(rec),
                                   "pending_dns")
                return
        await self.issue(host, PLATFORM_APP, rec, HTTP01)

    def _dns_wait(self, rec: records.CertRecord | None) -> float:
        """Seconds until a ``pending_dns`` domain is looked at again: check_interval,
        doubled per earlier attempt, at most retry_min (a DNS fix shows soon)."""
        doubled: float = self.s.check_interval * 2.0 ** (rec.failures if rec else 0)
        return min(doubled, self.s.retry_min)

    async def plan(self, host: str, app: str, wildcard: bool) -> tuple[str | None, str | None]:
        """The challenge to use for ``host`` -- DNS-01 when its owner's CNAME is in
        place, else HTTP-01 when it points at the routers (or is not checked) -- or
        (None, why not and what record to create)."""
        dns_problem = None
        if self.dns01 is not None:
            dns_problem = await self.dns01.problem(app, host)
            if dns_problem is None:
                return DNS01, None
            if wildcard:
                return None, dns_problem
        if self.name_check is not None:  # not pointing at the routers: no order
            problem = await self.name_check.problem(host)
            if problem is not None:
                if dns_problem is not None:
                    problem += f"; or, for a certificate by DNS-01: {dns_problem}"
                return None, problem
        return HTTP01, None

    async def issue(self, host: str, app: str, rec: records.CertRecord | None,
                    challenge: str = HTTP01) -> None:
        tokens: list[str] = []
        txt: list[tuple[str, str]] = []
        try:
            client = await self.client()
            key_pem = await self.run_blocking(new_key_pem)
            order, challs = await self.run_blocking(client.begin, host, key_pem, challenge)
            expires = self.clock.seconds() + self.s.challenge_wait + self.s.order_timeout + 60
            if challenge == DNS01 and self.dns01 is not None:
                txt = await self.dns01.publish(app, host, [v for _, v, _ in challs], expires)
            else:
                tokens = [t for t, _, _ in challs]
                await records.put_challenges(self.store, [(t, host, k) for t, k, _ in challs],
                                             expires)
            # every router (HTTP-01) or api node (DNS-01) must have the answer before the
            # CA asks for it
            if challs:
                await deferLater(self.clock, self.s.challenge_wait, lambda: None)
            chain = await self.run_blocking(client.finish, order, challs, self.s.order_timeout)
            expiry = not_after(chain.encode())
        except Exception as e:  # the CA, the network, requests, a bad answer: all recorded
            await self._cleanup(tokens, txt)
            if not isinstance(e, AcmeFailure):
                self._client = None  # start over with a fresh session next time
            await self._failed(host, app, rec, _error_text(e))
            return
        await self._cleanup(tokens, txt)
        await records.put_cert(self.store, records.CertRecord(
            hostname=host, app=app, source="acme", state="issued",
            updated=self.clock.seconds(), cert_pem=chain,
            key_sealed=seal(self.secret, key_pem, host), not_after=expiry), keep_owner=True)
        self.issued += 1
        self.log.info("certificate for {host} ({app}) issued by {challenge}, valid until "
                      "{expiry:.0f}", host=host, app=app, challenge=challenge, expiry=expiry)

    async def _cleanup(self, tokens: list[str], txt: list[tuple[str, str]]) -> None:
        try:
            await records.delete_challenges(self.store, tokens, self.clock.seconds())
            if self.dns01 is not None:
                await self.dns01.withdraw(txt, self.clock.seconds())
        except Exception as e:
            self.log.warn("withdrawing ACME challenges failed: {error}", error=str(e))

    async def _failed(self, host: str, app: str, rec: records.CertRecord | None, error: str,
                      delay: float | None = None, state: str = "failed") -> None:
        failures = (rec.failures if rec is not None else 0) + 1
        if delay is None:
            delay = min(self.s.retry_min * 2 ** (failures - 1), self.s.retry_max)
        now = self.clock.seconds()
        keep = rec if rec is not None and rec.cert_pem else None  # a renewal: keep serving
        await records.put_cert(self.store, records.CertRecord(
            hostname=host, app=app, source="acme", state=state, updated=now,
            cert_pem=keep.cert_pem if keep else None,
            key_sealed=keep.key_sealed if keep else None,
            not_after=keep.not_after if keep else None, last_error=error, failures=failures,
            next_attempt=now + delay), keep_owner=True)
        self.failed += 1
        self.log.warn("certificate for {host} ({app}) {state} (attempt {n}, next in {delay:g}s): "
                      "{error}", host=host, app=app, state=state, n=failures, delay=delay,
                      error=error)


class IssuerService(MultiService):
    """Runs :class:`Issuer` rounds while this api process holds ``acme-issuer``."""

    log = Logger()

    def __init__(self, issuer: Issuer, store: Store, clock: IReactorTime, retry_interval: float) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        self.issuer = issuer
        self.store = store
        self.clock = clock
        self._loop: LoopingCall | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._running_round = False
        self._again = False
        self.leader = LeaderService(store, LOCK_NAME, self._elected, self._lost, clock=clock,
                                    retry_interval=retry_interval)
        self.leader.setServiceParent(self)  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated

    async def _elected(self) -> None:
        self.log.info("elected leader for {lock}: certificates from {directory}",
                      lock=LOCK_NAME, directory=self.issuer.s.directory)

        def changed(change: Any) -> None:
            if change.kind in ("domain", "resync") and self._loop is not None:
                self.clock.callLater(0, self.kick)

        self._unsubscribe = await self.store.subscribe(changed)
        self._loop = LoopingCall(self.kick)
        self._loop.clock = self.clock
        self._loop.start(self.issuer.s.check_interval, now=True).addErrback(
            lambda f: self.log.failure("the certificate loop died", f))

    def _lost(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    def kick(self) -> None:
        """Run a round now (or right after the one running)."""
        if self._running_round:
            self._again = True
            return
        self._running_round = True

        def done(_: Any) -> None:
            self._running_round = False
            if self._again and self._loop is not None:
                self._again = False
                self.kick()

        defer.ensureDeferred(self.issuer.run_round()).addErrback(
            lambda f: self.log.failure("certificate round failed", f)).addBoth(done)

    def stopService(self) -> Any:
        self._lost()
        return super().stopService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated


def platform_certificate_host(settings: Settings) -> str:
    """The platform hostname the issuer gets a certificate for, or "" (none: the route
    is off, ``acme.platform_certificate = false``, or a localhost name no CA issues)."""
    host = platform_hostname(settings.api.hostname, settings.node.domain)
    if not settings.acme.platform_certificate or host == "localhost" or host.endswith(
            ".localhost"):
        return ""
    return host


def platform_wildcard_host(settings: Settings) -> str:
    """``*.<node.domain>`` when the issuer gets the platform wildcard by DNS-01
    (``acme.platform_wildcard`` with ``acme.dns01_zone``; never under localhost), or ""."""
    domain = settings.node.domain.lower().rstrip(".")
    if not (settings.acme.platform_wildcard and settings.acme.dns01_zone) or \
            domain == "localhost" or domain.endswith(".localhost"):
        return ""
    return "*." + domain


def make_issuer_service(node: Node, store: Store, retry_interval: float,
                        dns01: Dns01 | None = None) -> IssuerService | None:
    """The api role's issuer, when ``acme.directory`` is set; ``dns01`` when
    ``acme.dns01_zone`` is (:func:`epio.certs.dns01.make_dns01`)."""
    acme = node.settings.acme
    if not acme.directory:
        return None
    check = (make_name_check(node.reactor, list(acme.router_addresses), acme.dns_server,
                             node.settings.node.domain) if acme.name_check else None)
    issuer = Issuer(store, IssuerSettings.from_settings(acme), node.secret, node.reactor,
                    name_check=check, dns01=dns01,
                    platform_hostname=platform_certificate_host(node.settings),
                    platform_wildcard=platform_wildcard_host(node.settings))
    return IssuerService(issuer, store, node.reactor, retry_interval)
