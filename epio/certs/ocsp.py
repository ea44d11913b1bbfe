"""OCSP stapling for the router's certificates (RFC 6960, RFC 6066 ``status_request``).

A certificate whose leaf names an OCSP responder (Authority Information Access,
``http://`` or ``https://``) and whose chain holds its issuer gets a stapled OCSP
response: :class:`Stapler`, one per router process, fetches the response with
Twisted's HTTP client (POST ``application/ocsp-request``) as soon as the
certificate is loaded, checks it (the responder signed it: the issuer itself or a
certificate the issuer gave ``OCSPSigning``; it is for this leaf's serial and
issuer; it is current), keeps it in memory and hands it to OpenSSL on every
handshake that asks for it.  It fetches again halfway through the response's
validity (``thisUpdate`` .. ``nextUpdate``; every hour when the responder gives
no ``nextUpdate``), after a failure with a backoff from one minute doubling to an
hour, and keeps serving the previous response while it is still valid.  A
response the check refuses, a ``unknown`` status or an expired response is never
stapled; a certificate without an OCSP URL, or without its issuer in the chain,
is served without stapling, silently.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID
from OpenSSL import SSL
from twisted.internet import defer, error
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.client import ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers

# how often the stapler looks for responses due (a new certificate is fetched at once)
CHECK_INTERVAL = 60.0
RETRY_MIN = 60.0
RETRY_MAX = 3600.0
# refresh period when the responder gives no nextUpdate
NO_NEXT_UPDATE = 3600.0
# clock skew accepted on a response's thisUpdate
SKEW = 300.0
MAX_RESPONSE = 64 * 1024
FETCH_TIMEOUT = 10.0


class OCSPError(ValueError):
    """An OCSP response that cannot be stapled, or a fetch that failed."""


@attrs.frozen
class Target:
    """What to ask, and whom, for one leaf certificate."""

    url: str
    leaf: x509.Certificate
    issuer: x509.Certificate

    @property
    def key(self) -> bytes:
        return self.leaf.fingerprint(hashes.SHA256())


@attrs.frozen
class Checked:
    """A response that passed :func:`check_response`."""

    der: bytes
    status: ocsp.OCSPCertStatus
    this_update: float
    next_update: float | None

    def refresh_at(self) -> float:
        """When to fetch again: halfway through its validity, or an hour on."""
        if self.next_update is None:
            return self.this_update + NO_NEXT_UPDATE
        return self.this_update + (self.next_update - self.this_update) / 2


def target_of(chain: list[x509.Certificate]) -> Target | None:
    """The OCSP target of a chain (leaf first), or None: no OCSP URL, or no issuer of
    the leaf in the chain."""
    if not chain:
        return None
    leaf = chain[0]
    try:
        aia = leaf.extensions.get_extension_for_class(x509.AuthorityInformationAccess)
    except x509.ExtensionNotFound:
        return None
    urls = [d.access_location.value for d in aia.value
            if d.access_method == AuthorityInformationAccessOID.OCSP
            and isinstance(d.access_location, x509.UniformResourceIdentifier)]
    urls = [u for u in urls if u.lower().startswith(("http://", "https://"))]
    if not urls:
        return None
    for cand in chain[1:]:
        try:
            leaf.verify_directly_issued_by(cand)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return Target(urls[0], leaf, cand)
    return None


def build_request(target: Target) -> bytes:
    """The DER OCSP request for ``target``'s leaf (SHA-1 CertID, as every responder
    understands; no nonce, so that one response serves every handshake)."""
    req = ocsp.OCSPRequestBuilder().add_certificate(target.leaf, target.issuer, hashes.SHA1())
    return req.build().public_bytes(serialization.Encoding.DER)


def _verify(cert: x509.Certificate, signature: bytes, data: bytes,
            algorithm: hashes.HashAlgorithm | None) -> None:
    pub = cert.public_key()
    if isinstance(pub, rsa.RSAPublicKey) and algorithm is not None:
        pub.verify(signature, data, padding.PKCS1v15(), algorithm)
    elif isinstance(pub, ec.EllipticCurvePublicKey) and algorithm is not None:
        pub.verify(signature, data, ec.ECDSA(algorithm))
    elif isinstance(pub, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        pub.verify(signature, data)
    else:
        raise OCSPError("unsupported OCSP signature key")


def _key_hash(cert: x509.Certificate) -> bytes:
    return x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest


def _signer(resp: ocsp.OCSPResponse, issuer: x509.Certificate) -> x509.Certificate:
    """The certificate that signed ``resp``: the issuer, or a delegated responder the
    issuer certified for OCSP signing."""

    def is_responder(cert: x509.Certificate) -> bool:
        if resp.responder_key_hash is not None:
            return resp.responder_key_hash == _key_hash(cert)
        return resp.responder_name == cert.subject

    if is_responder(issuer):
        return issuer
    for cert in resp.certificates:
        if not is_responder(cert):
            continue
        try:
            cert.verify_directly_issued_by(issuer)
            eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
            continue
        if ExtendedKeyUsageOID.OCSP_SIGNING in eku:
            return cert
    raise OCSPError("the OCSP response is not signed by the issuer or its delegated responder")


def check_response(der: bytes, target: Target, now: float) -> Checked:
    """``der`` checked for stapling with ``target``'s leaf at time ``now``
    (OCSPError otherwise)."""
    try:
        resp = ocsp.load_der_ocsp_response(der)
    except ValueError as e:
        raise OCSPError(f"not an OCSP response: {e}") from None
    if resp.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        raise OCSPError(f"the responder answered {resp.response_status.name}")
    signer = _signer(resp, target.issuer)
    try:
        _verify(signer, resp.signature, resp.tbs_response_bytes, resp.signature_hash_algorithm)
    except InvalidSignature:
        raise OCSPError("the OCSP response's signature is wrong") from None
    issuer_name = target.issuer.subject.public_bytes()
    for single in resp.responses:
        if single.serial_number != target.leaf.serial_number:
            continue
        digest = hashes.Hash(single.hash_algorithm)
        digest.update(issuer_name)
        if digest.finalize() != single.issuer_name_hash:
            continue
        this_update = single.this_update_utc.timestamp()
        next_update = (None if single.next_update_utc is None
                       else single.next_update_utc.timestamp())
        if this_update > now + SKEW:
            raise OCSPError("the OCSP response is not valid yet")
        if next_update is not None and next_update <= now:
            raise OCSPError("the OCSP response has expired")
        if single.certificate_status == ocsp.OCSPCertStatus.UNKNOWN:
            raise OCSPError("the responder does not know the certificate")
        return Checked(der, single.certificate_status, this_update, next_update)
    raise OCSPError("the OCSP response is not for this certificate")


# what a fetch may fail with, besides a refused answer (logged as a warning)
FETCH_ERRORS = (OCSPError, ValueError, OSError, error.ConnectError, error.DNSLookupError,
                error.TimeoutError, defer.CancelledError, ResponseFailed, ResponseNeverReceived)



def describe(e: BaseException) -> str:
    """A one-line reason for a failed fetch (no traceback, no failure reprs)."""
    if isinstance(e, ResponseFailed | ResponseNeverReceived):
        return "; ".join(describe(r.value) for r in e.reasons) or "no response"
    if isinstance(e, defer.CancelledError | error.TimeoutError):
        return f"no answer within {FETCH_TIMEOUT:g}s"
    return str(e) or e.__class__.__name__


Fetch = Callable[[str, bytes], "defer.Deferred[bytes]"]


def http_fetch(reactor: Any) -> Fetch:
    """POST an OCSP request with Twisted's HTTP client (treq); the body, at most
    MAX_RESPONSE bytes."""
    import treq

    async def fetch(url: str, body: bytes) -> bytes:
        resp = await treq.post(url, data=body, reactor=reactor, timeout=FETCH_TIMEOUT,
                               headers=Headers({b"Content-Type": [b"application/ocsp-request"]}))
        chunks: list[bytes] = []
        size = 0

        def collect(data: bytes) -> None:
            nonlocal size
            size += len(data)
            if size > MAX_RESPONSE:
                raise OCSPError("the OCSP response is too large")
            chunks.append(data)

        await treq.collect(resp, collect)
        if resp.code != 200:
            raise OCSPError(f"the responder answered HTTP {resp.code}")
        return b"".join(chunks)

    return lambda url, body: defer.Deferred.fromCoroutine(fetch(url, body))


@attrs.define
class _Entry:
    target: Target
    host: str
    users: weakref.WeakSet[SSL.Context] = attrs.field(factory=weakref.WeakSet)
    checked: Checked | None = None
    due: float = 0.0
    failures: int = 0
    fetching: bool = False


class Stapler:
    """OCSP responses for the certificates of one router process (see the module)."""

    log = Logger()

    def __init__(self, reactor: IReactorTime, fetch: Fetch | None = None) -> None:
        self.reactor = reactor
        self._fetch = fetch if fetch is not None else http_fetch(reactor)
        self.entries: dict[bytes, _Entry] = {}
        self.fetches = 0
        self.failures = 0

    def attach(self, ctx: SSL.Context, chain: list[x509.Certificate]) -> bool:
        """Staple OCSP responses on ``ctx`` (not used for a connection yet) if its chain
        allows; whether it does.  The first fetch starts now."""
        target = target_of(chain)
        if target is None:
            return False
        key = target.key
        entry = self.entries.get(key)
        if entry is None:
            names = target.leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
            host = str(names[0].value) if names else target.url
            entry = self.entries[key] = _Entry(target, host)
        entry.users.add(ctx)
        ctx.set_ocsp_server_callback(self._staple, key)
        if entry.checked is None and not entry.fetching and entry.due <= self.reactor.seconds():
            self._start_fetch(entry)
        return True

    def response(self, key: bytes) -> bytes:
        """The response to staple for the leaf of SHA-256 fingerprint ``key`` (empty:
        none, or no longer valid)."""
        entry = self.entries.get(key)
        if entry is None or entry.checked is None:
            return b""
        nxt = entry.checked.next_update
        if nxt is not None and nxt <= self.reactor.seconds():
            return b""
        return entry.checked.der

    def _staple(self, conn: SSL.Connection, key: bytes | None) -> bytes:
        return self.response(key) if key is not None else b""

    def tick(self) -> None:
        """Fetch every response due; forget certificates no context serves (the
        router calls it every CHECK_INTERVAL seconds)."""
        now = self.reactor.seconds()
        for key, entry in list(self.entries.items()):
            if not entry.users:
                del self.entries[key]
            elif not entry.fetching and entry.due <= now:
                self._start_fetch(entry)

    def _start_fetch(self, entry: _Entry) -> None:
        entry.fetching = True
        self.fetches += 1
        d = defer.Deferred.fromCoroutine(self._update(entry))
        d.addErrback(lambda f: self.log.failure("OCSP update of {host} failed", f,
                                                host=entry.host))

    def _failed(self, entry: _Entry) -> float:
        entry.failures += 1
        self.failures += 1
        delay: float = min(RETRY_MAX, RETRY_MIN * 2.0 ** (entry.failures - 1))
        entry.due = self.reactor.seconds() + delay
        return delay

    async def _update(self, entry: _Entry) -> None:
        target = entry.target
        try:
            der = await self._fetch(target.url, build_request(target))
            checked = check_response(der, target, self.reactor.seconds())
        except FETCH_ERRORS as e:  # a network error or a refused answer: retry later
            delay = self._failed(entry)
            self.log.warn("OCSP response for {host} from {url} not updated ({error}); "
                          "retry in {delay:g}s", host=entry.host, url=target.url,
                          error=describe(e), delay=delay)
            return
        except Exception:
            delay = self._failed(entry)
            self.log.failure("OCSP update of {host} failed; retry in {delay:g}s",
                             host=entry.host, delay=delay)
            return
        finally:
            entry.fetching = False
        entry.failures = 0
        entry.checked = checked
        entry.due = max(checked.refresh_at(), self.reactor.seconds() + RETRY_MIN)
        self.log.info("OCSP response for {host} stapled: {status}, refreshed in {delay:.0f}s",
                      host=entry.host, status=checked.status.name,
                      delay=entry.due - self.reactor.seconds())
