"""The router's side of certificates: HTTP-01 answers and store certificates.

:class:`RouterCerts` keeps, in each router process, a copy of the store's
pending ACME challenges (answered at ``/.well-known/acme-challenge/TOKEN`` for
the challenge's own hostname, before routing) and of its certificates (handed
to :class:`epio.lb.tls.SNIContexts` as contexts by hostname).  It reloads on
every ``certificate`` change the store announces (PostgreSQL: from any node)
and every ``acme.sync_interval`` seconds in any case (SQLite announces only
within one process), so a certificate reaches every router without a restart.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from epio.certs import records
from epio.certs.crypto import CertificateError, load_chain, unseal

if TYPE_CHECKING:
    from epio.certs.ocsp import Stapler
    from epio.config import Settings
    from epio.node import Node

CHALLENGE_PREFIX = b"/.well-known/acme-challenge/"


def context_from_pem(cert_pem: bytes, key_pem: bytes,
                     stapler: Stapler | None = None) -> SSL.Context:
    """A server context (TLS 1.2+, the router's ciphers) for one certificate chain,
    stapling OCSP responses when ``stapler`` is given and the chain allows."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from epio.lb.tls import server_context

    chain = load_chain(cert_pem)
    ctx = server_context()
    ctx.use_certificate(chain[0])
    for extra in chain[1:]:
        ctx.add_extra_chain_cert(extra)
    ctx.use_privatekey(load_pem_private_key(key_pem, password=None))  # type: ignore[arg-type]
    ctx.check_privatekey()
    if stapler is not None:
        stapler.attach(ctx, chain)
    return ctx


class RouterCerts:
    """Challenges and certificates of the store, for one router process."""

    log = Logger()

    def __init__(self, reactor: IReactorTime, store_ready: Callable[[], defer.Deferred[Any]],
                 secret: bytes, interval: float, stapler: Stapler | None = None) -> None:
        self.reactor = reactor
        self.stapler = stapler  # OCSP for the store's certificates (epio.certs.ocsp)
        self._store_ready = store_ready
        self.secret = secret
        self.interval = interval
        self.challenges: dict[bytes, tuple[str, bytes]] = {}
        self.contexts: dict[str, SSL.Context] = {}
        self._loaded: dict[str, float] = {}  # hostname -> the row's `updated` loaded
        self._listeners: list[Callable[[dict[str, SSL.Context]], None]] = []
        self._loop: LoopingCall | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._busy = False
        self._again = False
        self.loads = 0

    def on_contexts(self, fn: Callable[[dict[str, SSL.Context]], None]) -> None:
        """Call ``fn(contexts)`` now and whenever the certificates change."""
        self._listeners.append(fn)
        fn(self.contexts)

    def start(self) -> None:
        self._loop = LoopingCall(self.refresh)
        self._loop.clock = self.reactor
        self._loop.start(self.interval, now=True)
        defer.ensureDeferred(self._subscribe()).addErrback(
            lambda f: self.log.failure("certificates: cannot follow store changes", f))

    async def _subscribe(self) -> None:
        store = await self._store_ready()

        def changed(change: Any) -> None:
            if change.kind in ("certificate", "domain", "resync"):
                self.refresh()

        unsub = await store.subscribe(changed)
        if self._loop is None:  # stopped meanwhile
            unsub()
        else:
            self._unsubscribe = unsub

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    def refresh(self) -> defer.Deferred[None]:
        """Reload from the store (one reload at a time; a request meanwhile runs after)."""
        if self._busy:
            self._again = True
            return defer.succeed(None)
        self._busy = True
        d = defer.ensureDeferred(self._refresh())

        def done(result: Any) -> Any:
            self._busy = False
            if self._again:
                self._again = False
                self.refresh()
            return result

        d.addBoth(done)
        d.addErrback(lambda f: self.log.warn("certificates: reload failed: {error}",
                                             error=f.getErrorMessage()))
        return d

    async def _refresh(self) -> None:
        store = await self._store_ready()
        now = self.reactor.seconds()
        found = await records.list_challenges(store, now)
        self.challenges = {t.encode("ascii", "replace"): (h, k.encode("ascii"))
                           for t, (h, k) in found.items()}
        rows = await records.list_served_certs(store)
        contexts = dict(self.contexts)
        seen = set()
        changed = False
        for r in rows:
            if not r.cert_pem or not r.key_sealed:
                continue
            seen.add(r.hostname)
            if self._loaded.get(r.hostname) == r.updated:
                continue
            try:
                key = unseal(self.secret, r.key_sealed, r.hostname)
                contexts[r.hostname] = context_from_pem(r.cert_pem.encode(), key,
                                                           self.stapler)
            except (CertificateError, SSL.Error, ValueError) as e:
                self.log.error("certificate of {host} not loaded: {error}", host=r.hostname,
                               error=str(e))
                continue
            self._loaded[r.hostname] = r.updated
            changed = True
        for gone in set(contexts) - seen:
            del contexts[gone]
            self._loaded.pop(gone, None)
            changed = True
        if changed:
            self.contexts = contexts
            self.loads += 1
            self.log.info("loaded {count} certificates from the store", count=len(contexts))
            for fn in self._listeners:
                fn(contexts)

    def respond(self, host: str, target: bytes) -> bytes | None:
        """The key authorization for an HTTP-01 request, or None (not ours: route it)."""
        if not target.startswith(CHALLENGE_PREFIX):
            return None
        entry = self.challenges.get(target[len(CHALLENGE_PREFIX):])
        if entry is None:
            return None
        name = host.lower().rstrip(".")
        if name.startswith("[") or name.count(":") != 1:
            bare = name
        else:
            bare = name.rsplit(":", 1)[0]
        return entry[1] if entry[0] == bare else None


def needs_store(settings: Settings) -> bool:
    """Whether a router with these settings follows the store's certificates: it serves
    TLS or ACME is configured, and it is fed by the cluster (not a standalone
    ``--routes``)."""
    lb = settings.lb
    return not lb.routes_file and bool(lb.tls_listen or settings.acme.directory)


def router_certs(node: Node, stapler: Stapler | None = None) -> RouterCerts | None:
    """The :class:`RouterCerts` of a router process of ``node`` (see :func:`needs_store`),
    or None; ``stapler`` staples OCSP responses for its certificates."""
    if node.store_service is None or not needs_store(node.settings):
        return None
    store_service = node.store_service
    return RouterCerts(node.reactor, store_service.whenReady, node.secret,
                       node.settings.acme.sync_interval, stapler)
