"""Certificates on fakes and a real SQLite store: sealing, owners' certificates, the
issuer's decisions (issue, renew, back off, keep serving, wildcards, account reuse),
the routers' copy (challenge answers, contexts) and the proxy's HTTP-01 answer."""

from __future__ import annotations

import datetime
import tempfile
import time
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import defer, reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from epio.certs import records
from epio.certs.acmeclient import AcmeFailure
from epio.certs.crypto import CertificateError, check_pair, covers, seal, unseal
from epio.certs.issuer import WILDCARD_ERROR, Issuer, IssuerSettings
from epio.certs.router import RouterCerts
from epio.config import ConfigError, validate
from epio.lb.observe import Observer
from epio.lb.proxy import LB, LBFactory, Settings
from epio.routing import Backend, Route, RouteTable
from epio.store import open_store

SECRET = b"s" * 32
DAY = 86400.0


class CA:
    """A throwaway CA that signs leaf certificates for names."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])

    def cert_pem(self) -> bytes:
        """The CA's own (self-signed) certificate, for clients to trust."""
        t0 = datetime.datetime.fromtimestamp(time.time() - 3600, datetime.UTC)
        cert = (x509.CertificateBuilder().subject_name(self.name).issuer_name(self.name)
                .public_key(self.key.public_key()).serial_number(1).not_valid_before(t0)
                .not_valid_after(t0 + datetime.timedelta(days=2))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(self.key, hashes.SHA256()))
        return cert.public_bytes(serialization.Encoding.PEM)

    def leaf(self, names: list[str], days: float = 90, key: Any = None,
             start: float | None = None) -> tuple[bytes, bytes]:
        key = key or ec.generate_private_key(ec.SECP256R1())
        t0 = datetime.datetime.fromtimestamp(start or time.time() - 60, datetime.UTC)
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
                .issuer_name(self.name).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(t0)
                .not_valid_after(t0 + datetime.timedelta(days=days))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                               critical=False)
                .sign(self.key, hashes.SHA256()))
        return (cert.public_bytes(serialization.Encoding.PEM),
                key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))


class CryptoTests(SynchronousTestCase):
    def test_seal_round_trip_and_binding(self) -> None:
        """A sealed key opens with the same secret and context only; the text holds no
        plaintext."""
        sealed = seal(SECRET, b"private key bytes", "www.example.com")
        self.assertNotIn("private", sealed)
        self.assertEqual(unseal(SECRET, sealed, "www.example.com"), b"private key bytes")
        self.assertRaises(CertificateError, unseal, b"t" * 32, sealed, "www.example.com")
        self.assertRaises(CertificateError, unseal, SECRET, sealed, "other.example.com")

    def test_owner_certificate_checks(self) -> None:
        """An owner's certificate is accepted only when its key matches, its names cover
        the domain and it is valid now."""
        ca = CA()
        cert, key = ca.leaf(["www.example.com"])
        now = time.time()
        self.assertGreater(check_pair(cert, key, "www.example.com", now), now + 80 * DAY)
        _, other_key = ca.leaf(["www.example.com"])
        with self.assertRaisesRegex(CertificateError, "does not match"):
            check_pair(cert, other_key, "www.example.com", now)
        with self.assertRaisesRegex(CertificateError, "not api.example.com"):
            check_pair(cert, key, "api.example.com", now)
        wild, wkey = ca.leaf(["*.example.com"])
        check_pair(wild, wkey, "api.example.com", now)
        self.assertFalse(covers(["*.example.com"], "a.b.example.com"))
        with self.assertRaisesRegex(CertificateError, "expired"):
            check_pair(cert, key, "www.example.com", now + 100 * DAY)
        with self.assertRaisesRegex(CertificateError, "not PEM|no certificate"):
            check_pair(b"junk", key, "www.example.com", now)

    def test_acme_config_cross_checks(self) -> None:
        """A challenge wait not above the routers' sync interval, or retry_min above
        retry_max, is refused at start."""
        with self.assertRaisesRegex(ConfigError, "challenge_wait"):
            validate({"acme": {"challenge_wait": 1.0, "sync_interval": 2.0}})
        with self.assertRaisesRegex(ConfigError, "retry_min"):
            validate({"acme": {"retry_min": 100.0, "retry_max": 10.0}})
        # DNS-01: the zone and its listener go together, need a directory, and are
        # well formed
        d = "https://ca.test/dir"
        with self.assertRaisesRegex(ConfigError, "dns01_zone and acme.dns01_listen go together"):
            validate({"acme": {"directory": d, "dns01_zone": "acme.example.net"}})
        with self.assertRaisesRegex(ConfigError, "dns01_zone needs acme.directory"):
            validate({"acme": {"dns01_zone": "acme.example.net", "dns01_listen": "0.0.0.0:53"}})
        with self.assertRaisesRegex(ConfigError, "at least two labels"):
            validate({"acme": {"directory": d, "dns01_zone": "net", "dns01_listen": ":53"}})
        with self.assertRaisesRegex(ConfigError, "must be HOST:PORT"):
            validate({"acme": {"directory": d, "dns01_zone": "a.example", "dns01_listen": "53"}})
        validate({"acme": {"directory": d, "dns01_zone": "acme.example.net.",
                           "dns01_listen": "0.0.0.0:53"}})


class SniTests(SynchronousTestCase):
    def test_store_certificates_by_name(self) -> None:
        """Store certificates answer their exact name, and a wildcard domain's (*.suffix)
        answers names one label under it; a file of the directory for the same exact
        name wins."""
        from epio.certs.router import context_from_pem
        from epio.lb.tls import SNIContexts

        ca = CA()
        tmp = Path(tempfile.mkdtemp(prefix="epio-sni-"))
        cert, key = ca.leaf(["file.test"])
        (tmp / "file.test.pem").write_bytes(key + cert)
        sni = SNIContexts(tmp)
        sni.refresh(force=True)
        exact = context_from_pem(*ca.leaf(["www.shop.test"]))
        wild = context_from_pem(*ca.leaf(["*.wild.test"]))
        shadowed = context_from_pem(*ca.leaf(["file.test"]))
        sni.set_stored({"www.shop.test": exact, "*.wild.test": wild, "file.test": shadowed})
        self.assertIs(sni.context_for("www.shop.test"), exact)
        self.assertIs(sni.context_for("a.wild.test"), wild)
        self.assertIsNone(sni.context_for("a.b.wild.test"))
        self.assertIsNone(sni.context_for("other.test"))
        self.assertIsNot(sni.context_for("file.test"), shadowed)
        self.assertIsNotNone(sni.context_for("file.test"))


class FakeAcme:
    """Stands in for the CA in the issuer's tests: signs with a local CA, or fails."""

    def __init__(self, ca: CA, days: float = 90) -> None:
        self.ca = ca
        self.days = days
        self.fail: str | None = None
        self.registered = 0
        self.orders: list[str] = []
        self.challenges: list[str] = []
        self.keys: list[bytes] = []

    def make(self, directory: str, key: bytes, uri: str | None, **kw: Any) -> FakeAcme:
        self.keys.append(key)
        self.uri = uri
        return self

    def register(self) -> str:
        self.registered += 1
        return self.uri or "https://ca.test/acct/1"

    def begin(self, host: str, key_pem: bytes, challenge: str = "http-01"
              ) -> tuple[Any, list[tuple[str, str, Any]]]:
        self.orders.append(host)
        self.challenges.append(challenge)
        return (host, key_pem), [(f"tok-{len(self.orders)}", f"tok-{len(self.orders)}.thumb",
                                  None)]

    def finish(self, order: Any, challs: Any, timeout: float) -> str:
        if self.fail:
            raise AcmeFailure(self.fail)
        host, key_pem = order
        key = serialization.load_pem_private_key(key_pem, None)
        cert, _ = self.ca.leaf([host], days=self.days, key=key)
        return cert.decode()


def sync(f: Any, *args: Any) -> defer.Deferred[Any]:
    return defer.maybeDeferred(f, *args)


class IssuerTests(TestCase):
    def store_url(self) -> str:
        return f"sqlite:///{Path(tempfile.mkdtemp(prefix='epio-certs-'))}/store.db"

    async def setUp(self) -> None:  # type: ignore[override]
        self.store = await open_store(self.store_url(), reactor)
        self.addCleanup(self.store.close)
        user = await self.store.create_user("alice")
        await self.store.create_app("hello", user.id)
        self.clock = task.Clock()
        self.clock.advance(time.time())
        self.ca = CA()
        self.acme = FakeAcme(self.ca)
        self.settings = IssuerSettings("https://ca.test/dir", "", "", 60.0, 30 * DAY, 300.0,
                                       1200.0, 3.0, 60.0)
        self.issuer = self.make_issuer()

    def make_issuer(self) -> Issuer:
        return Issuer(self.store, self.settings, SECRET, self.clock, run_blocking=sync,
                      make_client=self.acme.make)

    async def run_round(self) -> list[str]:
        """A round, advancing the fake clock past each challenge wait."""
        d = defer.ensureDeferred(self.issuer.run_round())
        while not d.called:
            await task.deferLater(reactor, 0.005, lambda: None)
            self.clock.advance(self.settings.challenge_wait)
        return await d

    async def cert(self, host: str) -> records.CertRecord:
        return {r.hostname: r for r in await records.list_certs(self.store)}[host]

    async def test_issue_publishes_challenge_then_stores_sealed_key(self) -> None:
        """A new domain: the HTTP-01 answer is in the store while the CA checks it, the
        certificate lands with a sealed key that opens to the certificate's key, and the
        answer is withdrawn."""
        await self.store.add_domain("hello", "www.hello.test")
        d = defer.ensureDeferred(self.issuer.run_round())
        for _ in range(400):
            found = await records.list_challenges(self.store, self.clock.seconds())
            if found:
                break
            await task.deferLater(reactor, 0.005, lambda: None)
        self.assertEqual(found, {"tok-1": ("www.hello.test", "tok-1.thumb")})
        self.assertFalse(d.called)  # waiting acme.challenge_wait for the routers
        self.clock.advance(self.settings.challenge_wait)
        self.assertEqual(await d, ["www.hello.test"])
        rec = await self.cert("www.hello.test")
        self.assertEqual((rec.state, rec.source, rec.failures), ("issued", "acme", 0))
        key = unseal(SECRET, rec.key_sealed or "", "www.hello.test")
        self.assertNotIn(key.decode(), rec.key_sealed or "")
        check_pair((rec.cert_pem or "").encode(), key, "www.hello.test", self.clock.seconds())
        self.assertEqual(await records.list_challenges(self.store, self.clock.seconds()), {})
        # nothing due on the next round
        self.assertEqual(await self.run_round(), [])

    async def test_failures_back_off_and_renewal_keeps_serving(self) -> None:
        """A failed order is recorded with its error and retried after retry_min,
        doubled per failure and capped at retry_max; a renewal is due 30 days before
        expiry and a failed renewal keeps the certificate it had."""
        await self.store.add_domain("hello", "www.hello.test")
        self.acme.fail = "challenge failed: www.hello.test: connection refused"
        await self.run_round()
        rec = await self.cert("www.hello.test")
        self.assertEqual((rec.state, rec.failures, rec.last_error),
                         ("failed", 1, "challenge failed: www.hello.test: connection refused"))
        self.assertAlmostEqual(rec.next_attempt - rec.updated, 300.0)
        self.assertEqual(await self.run_round(), [])  # not before next_attempt
        self.clock.advance(300)
        await self.run_round()
        rec = await self.cert("www.hello.test")
        self.assertAlmostEqual(rec.next_attempt - rec.updated, 600.0)
        self.clock.advance(600)
        await self.run_round()
        self.clock.advance(1200)
        await self.run_round()
        rec = await self.cert("www.hello.test")
        self.assertEqual(rec.failures, 4)
        self.assertAlmostEqual(rec.next_attempt - rec.updated, 1200.0)  # retry_max
        self.acme.fail = None
        self.clock.advance(1200)
        await self.run_round()
        rec = await self.cert("www.hello.test")
        self.assertEqual((rec.state, rec.failures, rec.last_error), ("issued", 0, None))
        # 61 days later (a 90-day certificate): not due; 61 + 1 = within 30 days: due
        self.clock.advance(59 * DAY)
        self.assertEqual(await self.run_round(), [])
        self.clock.advance(2 * DAY)
        self.acme.fail = "rateLimited: too many certificates"
        self.assertEqual(await self.run_round(), ["www.hello.test"])
        failed = await self.cert("www.hello.test")
        self.assertEqual((failed.state, failed.cert_pem, failed.not_after),
                         ("failed", rec.cert_pem, rec.not_after))  # still served
        self.acme.fail = None
        self.clock.advance(300)
        await self.run_round()
        renewed = await self.cert("www.hello.test")
        self.assertEqual(renewed.state, "issued")
        self.assertNotEqual(renewed.cert_pem, rec.cert_pem)

    async def test_a_name_elsewhere_is_never_ordered(self) -> None:
        """With the name check, a domain resolving elsewhere is marked pending_dns with
        the check's reason and looked at again after check_interval, without asking the
        CA; once its DNS points at the routers it is ordered."""
        from epio.certs.resolve import NameCheck
        from tests.certs.test_resolve import Zone

        zone = Zone({"www.hello.test": ["203.0.113.9"]})
        self.issuer = Issuer(self.store, self.settings, SECRET, self.clock, run_blocking=sync,
                             make_client=self.acme.make,
                             name_check=NameCheck(zone, ["198.51.100.1"], ""))
        await self.store.add_domain("hello", "www.hello.test")
        self.assertEqual(await self.run_round(), ["www.hello.test"])
        rec = await self.cert("www.hello.test")
        self.assertEqual((rec.state, rec.failures, rec.last_error), (
            "pending_dns", 1, "www.hello.test resolves to 203.0.113.9, not to the cluster's "
            "routers (198.51.100.1): point its DNS at them"))
        self.assertAlmostEqual(rec.next_attempt - rec.updated, 60.0)  # check_interval
        self.assertEqual(await self.run_round(), [])  # not before next_attempt
        self.clock.advance(60)
        await self.run_round()  # still elsewhere: the next look is twice as far
        rec = await self.cert("www.hello.test")
        self.assertEqual((rec.state, rec.failures), ("pending_dns", 2))
        self.assertAlmostEqual(rec.next_attempt - rec.updated, 120.0)
        self.assertEqual((self.acme.orders, self.acme.registered), ([], 0))
        zone.names["www.hello.test"] = ["198.51.100.1"]
        self.clock.advance(120)
        await self.run_round()
        rec = await self.cert("www.hello.test")
        self.assertEqual((rec.state, rec.failures, rec.last_error), ("issued", 0, None))
        self.assertEqual(self.acme.orders, ["www.hello.test"])

    async def test_owner_wildcard_removed_and_account(self) -> None:
        """Owners' certificates are never ordered; a wildcard domain is failed with the
        reason; a removed domain's certificate goes; the account key is made once and
        reused (sealed) by a later issuer."""
        await self.store.add_domain("hello", "own.hello.test")
        await self.store.add_domain("hello", "*.wild.test")
        await self.store.add_domain("hello", "gone.hello.test")
        cert, key = self.ca.leaf(["own.hello.test"])
        await records.put_cert(self.store, records.CertRecord(
            "own.hello.test", "hello", "owner", "issued", self.clock.seconds(), cert.decode(),
            seal(SECRET, key, "own.hello.test"), self.clock.seconds() + 10 * DAY))
        await self.run_round()
        self.assertEqual(self.acme.orders, ["gone.hello.test"])
        wild = await self.cert("*.wild.test")
        self.assertEqual((wild.state, wild.last_error), ("failed", WILDCARD_ERROR))
        self.assertEqual((await self.cert("own.hello.test")).source, "owner")
        await self.store.remove_domain("hello", "gone.hello.test")
        await self.run_round()
        self.assertNotIn("gone.hello.test",
                         {r.hostname for r in await records.list_certs(self.store)})
        # the account: one key, stored sealed, reused by a new issuer (a new leader)
        sealed, uri = await records.get_account(self.store, "https://ca.test/dir") or ("", "")
        self.assertEqual(uri, "https://ca.test/acct/1")
        self.assertEqual(unseal(SECRET, sealed, "acme-account:https://ca.test/dir"),
                         self.acme.keys[0])
        self.issuer = self.make_issuer()
        await self.store.add_domain("hello", "new.hello.test")
        await self.run_round()
        self.assertEqual(self.acme.keys[1], self.acme.keys[0])
        self.assertEqual(self.acme.uri, "https://ca.test/acct/1")

    async def test_owner_certificate_wins_a_running_order(self) -> None:
        """An owner's certificate added while an order for its domain runs is kept: the
        order's result does not overwrite it."""
        await self.store.add_domain("hello", "www.hello.test")
        d = defer.ensureDeferred(self.issuer.run_round())
        while not await records.list_challenges(self.store, self.clock.seconds()):
            await task.deferLater(reactor, 0.005, lambda: None)
        cert, key = self.ca.leaf(["www.hello.test"])
        await records.put_cert(self.store, records.CertRecord(
            "www.hello.test", "hello", "owner", "issued", self.clock.seconds(), cert.decode(),
            seal(SECRET, key, "www.hello.test"), self.clock.seconds() + 10 * DAY))
        self.clock.advance(self.settings.challenge_wait)
        await d
        rec = await self.cert("www.hello.test")
        self.assertEqual((rec.source, rec.cert_pem), ("owner", cert.decode()))

    async def test_router_copy(self) -> None:
        """A router loads the store's challenges (answered for their own hostname only,
        any port) and certificates (as TLS contexts), and drops a removed one."""
        await self.store.add_domain("hello", "www.hello.test")
        cert, key = CA().leaf(["www.hello.test"])
        await records.put_cert(self.store, records.CertRecord(
            "www.hello.test", "hello", "owner", "issued", 1.0, cert.decode(),
            seal(SECRET, key, "www.hello.test"), 2e9))
        await records.put_challenges(self.store, [("abc", "www.hello.test", "abc.thumb")],
                                     time.time() + 60)
        rc = RouterCerts(reactor, lambda: defer.succeed(self.store), SECRET, 1.0)
        seen: list[dict[str, Any]] = []
        rc.on_contexts(seen.append)
        await rc.refresh()
        self.assertEqual(list(seen[-1]), ["www.hello.test"])
        path = b"/.well-known/acme-challenge/abc"
        self.assertEqual(rc.respond("www.hello.test", path), b"abc.thumb")
        self.assertEqual(rc.respond("WWW.hello.test:5002", path), b"abc.thumb")
        self.assertIsNone(rc.respond("other.test", path))
        self.assertIsNone(rc.respond("www.hello.test", b"/.well-known/acme-challenge/zzz"))
        await records.delete_certs_except(self.store, set())
        await rc.refresh()
        self.assertEqual(seen[-1], {})


    async def test_removed_domain_certificate_not_served_to_next_holder(self) -> None:
        """Removing a domain deletes its owner's certificate in the same transaction;
        a stale row of an earlier holder (left by an older version) is not served by
        the routers once another app holds the hostname, and the issuer orders a new
        certificate for the new holder instead of keeping the earlier owner's."""
        bob = await self.store.create_user("bob")
        await self.store.create_app("other", bob.id)
        await self.store.add_domain("hello", "shop.hello.test")
        cert, key = self.ca.leaf(["shop.hello.test"])
        owner = records.CertRecord(
            "shop.hello.test", "hello", "owner", "issued", self.clock.seconds(),
            cert.decode(), seal(SECRET, key, "shop.hello.test"), self.clock.seconds() + 10 * DAY)
        await records.put_cert(self.store, owner)
        await self.store.remove_domain("hello", "shop.hello.test")
        self.assertEqual(await records.list_certs(self.store), [])
        # a stale row (what remove_domain used to leave), the hostname now bob's
        await self.store.add_domain("other", "shop.hello.test")
        await records.put_cert(self.store, owner)
        rc = RouterCerts(reactor, lambda: defer.succeed(self.store), SECRET, 1.0)
        seen: list[dict[str, Any]] = []
        rc.on_contexts(seen.append)
        await rc.refresh()
        self.assertEqual(seen[-1], {})
        self.assertEqual(await self.run_round(), ["shop.hello.test"])
        rec = await self.cert("shop.hello.test")
        self.assertEqual((rec.app, rec.source, rec.state), ("other", "acme", "issued"))
        self.assertNotEqual(rec.cert_pem, cert.decode())
        await rc.refresh()
        self.assertEqual(list(seen[-1]), ["shop.hello.test"])

    async def test_purged_app_certificate_goes(self) -> None:
        """Deleting (purging) an app deletes its certificates."""
        await self.store.add_domain("hello", "www.hello.test")
        cert, key = self.ca.leaf(["www.hello.test"])
        await records.put_cert(self.store, records.CertRecord(
            "www.hello.test", "hello", "owner", "issued", 1.0, cert.decode(),
            seal(SECRET, key, "www.hello.test"), 2e9))
        await self.store.delete_app("hello")
        self.assertEqual(await records.list_certs(self.store), [])


class PostgresIssuerTests(IssuerTests):
    """The same issuer and router tests on PostgreSQL (the production store)."""

    def store_url(self) -> str:
        from tests.store import pg

        return pg.pg_url_for_test(self)


class ProxyChallengeTests(SynchronousTestCase):
    def test_challenge_answered_before_routing(self) -> None:
        """A pending token's path is answered by the router itself (200, the key
        authorization, no backend connection); any other path goes to the app."""

        class Responder:
            def respond(self, host: str, target: bytes) -> bytes | None:
                return b"tok.thumb" if target.endswith(b"/tok") else None

        clock = MemoryReactorClock()
        table = RouteTable("localhost", [Route("a", ["a.example.com"],
                                               [Backend("127.0.0.1", 9000)])])
        lb = LB(clock, table, Settings(), Observer(None, None, enabled=False),
                acme=Responder())
        p = LBFactory(lb).buildProtocol(None)
        t = StringTransport(hostAddress=IPv4Address("TCP", "127.0.0.1", 80),
                            peerAddress=IPv4Address("TCP", "10.1.2.3", 5555))
        p.makeConnection(t)
        p.dataReceived(b"GET /.well-known/acme-challenge/tok HTTP/1.1\r\n"
                       b"Host: a.example.com\r\n\r\n")
        out = t.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 200 OK\r\n"), out)
        self.assertTrue(out.endswith(b"\r\n\r\ntok.thumb"), out)
        self.assertEqual(clock.tcpClients, [])
        p.dataReceived(b"GET /.well-known/acme-challenge/other HTTP/1.1\r\n"
                       b"Host: a.example.com\r\n\r\n")
        self.assertEqual(len(clock.tcpClients), 1)  # routed to the app's backend
