"""OCSP stapling (epio.certs.ocsp): which chains staple, the response checks, the
refresh schedule and backoff, and the stapled bytes a handshake gets (docs/https.md)."""

from __future__ import annotations

import datetime
import socket
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from epio.certs.ocsp import (
    RETRY_MIN,
    OCSPError,
    Stapler,
    build_request,
    check_response,
    target_of,
)
from epio.lb.tls import server_context

URL = "http://ocsp.test.invalid/"
T0 = 1_800_000_000.0
HOUR = 3600.0


def _dt(t: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(t, datetime.UTC)


class OcspCA:
    """A throwaway CA whose leaves name an OCSP responder, and that answers for them."""

    def __init__(self, name: str = "ocsp test CA", now: float = T0) -> None:
        self.now = now  # certificates are valid around this time
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (x509.CertificateBuilder().subject_name(self.name).issuer_name(self.name)
                     .public_key(self.key.public_key()).serial_number(1)
                     .not_valid_before(_dt(now - 10 * 86400))
                     .not_valid_after(_dt(now + 3650 * 86400))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
                     .sign(self.key, hashes.SHA256()))

    def leaf(self, host: str, url: str | None = URL,
             key: Any = None) -> tuple[x509.Certificate, Any]:
        key = key or ec.generate_private_key(ec.SECP256R1())
        b = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
             .issuer_name(self.name).public_key(key.public_key())
             .serial_number(x509.random_serial_number())
             .not_valid_before(_dt(self.now - 86400))
             .not_valid_after(_dt(self.now + 90 * 86400))
             .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), False))
        if url is not None:
            b = b.add_extension(x509.AuthorityInformationAccess([x509.AccessDescription(
                AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(url))]),
                False)
        return b.sign(self.key, hashes.SHA256()), key

    def delegate(self, ocsp_signing: bool = True) -> tuple[x509.Certificate, Any]:
        """A responder certificate issued by this CA (with OCSPSigning or without)."""
        key = ec.generate_private_key(ec.SECP256R1())
        usage = ExtendedKeyUsageOID.OCSP_SIGNING if ocsp_signing else \
            ExtendedKeyUsageOID.SERVER_AUTH
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "responder")]))
                .issuer_name(self.name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(_dt(self.now - 86400))
             .not_valid_after(_dt(self.now + 90 * 86400))
                .add_extension(x509.ExtendedKeyUsage([usage]), False)
                .sign(self.key, hashes.SHA256()))
        return cert, key

    def respond(self, leaf: x509.Certificate, this: float, nxt: float | None,
                status: ocsp.OCSPCertStatus = ocsp.OCSPCertStatus.GOOD,
                signer: tuple[x509.Certificate, Any] | None = None) -> bytes:
        cert, key = signer or (self.cert, self.key)
        b = ocsp.OCSPResponseBuilder().add_response(
            cert=leaf, issuer=self.cert, algorithm=hashes.SHA1(), cert_status=status,
            this_update=_dt(this), next_update=None if nxt is None else _dt(nxt),
            revocation_time=_dt(this) if status == ocsp.OCSPCertStatus.REVOKED else None,
            revocation_reason=None).responder_id(ocsp.OCSPResponderEncoding.HASH, cert)
        if signer is not None:
            b = b.certificates([cert])
        return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


class TargetTests(SynchronousTestCase):
    def test_target_needs_an_ocsp_url_and_the_issuer(self) -> None:
        """A chain staples only when its leaf names an http(s) OCSP responder and the
        chain holds the leaf's issuer; the request asks about that leaf."""
        ca = OcspCA()
        leaf, _ = ca.leaf("www.example.com")
        target = target_of([leaf, ca.cert])
        assert target is not None
        self.assertEqual((target.url, target.leaf, target.issuer), (URL, leaf, ca.cert))
        req = ocsp.load_der_ocsp_request(build_request(target))
        self.assertEqual(req.serial_number, leaf.serial_number)
        self.assertIsNone(target_of([leaf]))  # no issuer in the chain
        self.assertIsNone(target_of([leaf, OcspCA("another CA").cert]))  # not its issuer
        bare, _ = ca.leaf("bare.example.com", url=None)
        self.assertIsNone(target_of([bare, ca.cert]))
        ldap, _ = ca.leaf("ldap.example.com", url="ldap://ocsp.example.com/")
        self.assertIsNone(target_of([ldap, ca.cert]))


class CheckTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.ca = OcspCA()
        self.leaf, _ = self.ca.leaf("www.example.com")
        target = target_of([self.leaf, self.ca.cert])
        assert target is not None
        self.target = target

    def test_a_good_response_is_accepted(self) -> None:
        """A response signed by the issuer, for the leaf, current: accepted, refreshed
        halfway through its validity (an hour on without nextUpdate)."""
        der = self.ca.respond(self.leaf, T0 - HOUR, T0 + 7 * HOUR)
        checked = check_response(der, self.target, T0)
        self.assertEqual(checked.der, der)
        self.assertEqual(checked.status, ocsp.OCSPCertStatus.GOOD)
        self.assertEqual(checked.refresh_at(), T0 + 3 * HOUR)
        open_ended = check_response(self.ca.respond(self.leaf, T0 - 60, None), self.target, T0)
        self.assertEqual(open_ended.refresh_at(), T0 - 60 + HOUR)
        revoked = self.ca.respond(self.leaf, T0 - HOUR, T0 + HOUR, ocsp.OCSPCertStatus.REVOKED)
        self.assertEqual(check_response(revoked, self.target, T0).status,
                         ocsp.OCSPCertStatus.REVOKED)

    def test_a_delegated_responder_needs_ocsp_signing(self) -> None:
        """A responder certificate issued by the CA signs responses only with the
        OCSPSigning extended key usage."""
        good = self.ca.respond(self.leaf, T0 - HOUR, T0 + HOUR, signer=self.ca.delegate())
        check_response(good, self.target, T0)
        bad = self.ca.respond(self.leaf, T0 - HOUR, T0 + HOUR,
                              signer=self.ca.delegate(ocsp_signing=False))
        with self.assertRaisesRegex(OCSPError, "not signed by the issuer"):
            check_response(bad, self.target, T0)

    def test_wrong_responses_are_refused(self) -> None:
        """Not stapled: a response signed by another CA, for another certificate,
        expired, not yet valid, "unknown", unsuccessful, or not OCSP at all."""
        other = OcspCA("ocsp test CA")  # same name, another key
        with self.assertRaisesRegex(OCSPError, "not signed"):
            check_response(other.respond(self.leaf, T0 - HOUR, T0 + HOUR), self.target, T0)
        sibling, _ = self.ca.leaf("other.example.com")
        with self.assertRaisesRegex(OCSPError, "not for this certificate"):
            check_response(self.ca.respond(sibling, T0 - HOUR, T0 + HOUR), self.target, T0)
        with self.assertRaisesRegex(OCSPError, "expired"):
            check_response(self.ca.respond(self.leaf, T0 - 2 * HOUR, T0 - HOUR),
                           self.target, T0)
        with self.assertRaisesRegex(OCSPError, "not valid yet"):
            check_response(self.ca.respond(self.leaf, T0 + HOUR, T0 + 2 * HOUR),
                           self.target, T0)
        with self.assertRaisesRegex(OCSPError, "does not know"):
            check_response(self.ca.respond(self.leaf, T0 - HOUR, T0 + HOUR,
                                           ocsp.OCSPCertStatus.UNKNOWN), self.target, T0)
        unauthorized = ocsp.OCSPResponseBuilder.build_unsuccessful(
            ocsp.OCSPResponseStatus.UNAUTHORIZED).public_bytes(serialization.Encoding.DER)
        with self.assertRaisesRegex(OCSPError, "UNAUTHORIZED"):
            check_response(unauthorized, self.target, T0)
        with self.assertRaisesRegex(OCSPError, "not an OCSP response"):
            check_response(b"<html>", self.target, T0)


class Responder:
    """The network side of the stapler's fetches: each call answers with the next
    queued result (bytes, or an exception to fail with), recording the request."""

    def __init__(self) -> None:
        self.queue: list[bytes | Exception] = []
        self.requests: list[tuple[str, bytes]] = []
        self.pending: list[defer.Deferred[bytes]] = []

    def fetch(self, url: str, body: bytes) -> defer.Deferred[bytes]:
        self.requests.append((url, body))
        if not self.queue:
            d: defer.Deferred[bytes] = defer.Deferred()
            self.pending.append(d)
            return d
        result = self.queue.pop(0)
        if isinstance(result, Exception):
            return defer.fail(result)
        return defer.succeed(result)


class StaplerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.net = Responder()
        self.stapler = Stapler(self.clock, self.net.fetch)
        self.ca = OcspCA()
        self.leaf, self.key = self.ca.leaf("www.example.com")

    def context(self, leaf: x509.Certificate, key: Any) -> SSL.Context:
        ctx = server_context()
        ctx.use_certificate(leaf)
        ctx.add_extra_chain_cert(self.ca.cert)
        ctx.use_privatekey(key)
        return ctx

    def handshake(self, ctx: SSL.Context) -> bytes:
        """A real TLS handshake over a socket pair with a client asking for the
        certificate status; the OCSP bytes it got stapled."""
        got: list[bytes] = []

        def on_status(conn: SSL.Connection, data: bytes, _: Any) -> bool:
            got.append(data)
            return True

        client_ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
        client_ctx.set_ocsp_client_callback(on_status)
        a, b = socket.socketpair()
        server = SSL.Connection(ctx, a)
        server.set_accept_state()
        client = SSL.Connection(client_ctx, b)
        client.set_tlsext_host_name(b"www.example.com")
        client.request_ocsp()
        client.set_connect_state()
        a.setblocking(False)
        b.setblocking(False)
        try:
            for _ in range(20):
                for conn in (client, server):
                    try:
                        conn.do_handshake()
                    except SSL.WantReadError:
                        pass
            self.assertEqual(len(got), 1)
        finally:
            a.close()
            b.close()
        return got[0]

    def test_fetched_at_attach_stapled_and_refreshed(self) -> None:
        """A certificate with an OCSP URL is fetched for at once, its response stapled
        to handshakes, fetched again halfway through its validity; a certificate
        without an OCSP URL gets no fetch and no staple."""
        first = self.ca.respond(self.leaf, T0 - HOUR, T0 + 7 * HOUR)
        self.net.queue.append(first)
        ctx = self.context(self.leaf, self.key)
        self.assertTrue(self.stapler.attach(ctx, [self.leaf, self.ca.cert]))
        self.assertEqual([u for u, _ in self.net.requests], [URL])
        self.assertEqual(self.handshake(ctx), first)
        bare, bare_key = self.ca.leaf("bare.example.com", url=None)
        bare_ctx = self.context(bare, bare_key)
        self.assertFalse(self.stapler.attach(bare_ctx, [bare, self.ca.cert]))
        self.assertEqual(self.handshake(bare_ctx), b"")
        self.assertEqual(len(self.net.requests), 1)

        self.clock.advance(3 * HOUR - 61)  # refresh at thisUpdate + half: T0 + 3h
        self.stapler.tick()
        self.assertEqual(len(self.net.requests), 1)
        second = self.ca.respond(self.leaf, T0 + 2 * HOUR, T0 + 9 * HOUR)
        self.net.queue.append(second)
        self.clock.advance(61)
        self.stapler.tick()
        self.assertEqual(len(self.net.requests), 2)
        self.assertEqual(self.handshake(ctx), second)

    def test_failures_back_off_and_keep_a_valid_response(self) -> None:
        """A failed refresh keeps stapling the previous response while it is valid,
        retries after one minute, then two; an expired response is no longer stapled; a
        refused answer counts as a failure too."""
        first = self.ca.respond(self.leaf, T0 - HOUR, T0 + 3 * HOUR)
        self.net.queue.append(first)
        ctx = self.context(self.leaf, self.key)
        self.stapler.attach(ctx, [self.leaf, self.ca.cert])
        self.clock.advance(HOUR)  # refresh due at the midpoint
        self.net.queue.append(OCSPError("the responder answered HTTP 503"))
        self.stapler.tick()
        self.assertEqual(len(self.net.requests), 2)
        self.assertEqual(self.handshake(ctx), first)
        self.clock.advance(RETRY_MIN - 1)
        self.stapler.tick()
        self.assertEqual(len(self.net.requests), 2)
        self.net.queue.append(OcspCA().respond(self.leaf, T0, T0 + 4 * HOUR))  # wrong signer
        self.clock.advance(1)
        self.stapler.tick()
        self.assertEqual(len(self.net.requests), 3)
        self.clock.advance(2 * RETRY_MIN - 1)
        self.stapler.tick()
        self.assertEqual(len(self.net.requests), 3)
        self.assertEqual(self.stapler.failures, 2)
        self.clock.advance(2 * HOUR)  # past nextUpdate: nothing stapled
        self.assertEqual(self.handshake(ctx), b"")

    def test_one_fetch_per_certificate_and_forgotten_when_unused(self) -> None:
        """Two contexts of one certificate share one fetch in flight; when no context
        serves it any more, the certificate is forgotten."""
        ctx = self.context(self.leaf, self.key)
        self.stapler.attach(ctx, [self.leaf, self.ca.cert])
        again = self.context(self.leaf, self.key)
        self.stapler.attach(again, [self.leaf, self.ca.cert])
        self.assertEqual(len(self.net.requests), 1)
        self.net.pending.pop().callback(self.ca.respond(self.leaf, T0 - HOUR, T0 + HOUR))
        self.assertEqual(self.handshake(again), self.handshake(ctx))
        del ctx, again
        import gc

        gc.collect()
        self.stapler.tick()
        self.assertEqual(self.stapler.entries, {})

    def test_store_certificates_staple_too(self) -> None:
        """A certificate from the store (ACME-issued or an owner's: context_from_pem)
        staples like one of lb.tls_cert_dir."""
        from epio.certs.router import context_from_pem

        der = self.ca.respond(self.leaf, T0 - HOUR, T0 + HOUR)
        self.net.queue.append(der)
        chain = (self.leaf.public_bytes(serialization.Encoding.PEM)
                 + self.ca.cert.public_bytes(serialization.Encoding.PEM))
        key = self.key.private_bytes(serialization.Encoding.PEM,
                                     serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())
        self.assertEqual(self.handshake(context_from_pem(chain, key, self.stapler)), der)
        self.assertEqual(self.handshake(context_from_pem(chain, key)), b"")
