"""DNS-01 (epio.certs.dns01; docs/https.md): the cluster's own zone server over real
UDP and TCP, two api nodes answering the same TXT from one store; the issuer choosing
DNS-01 once the owner's CNAME is in place (pending_dns with the record before); the
DNS check of `epio domains add` (also through the real api).  The store parts on
SQLite and PostgreSQL."""

from __future__ import annotations

import re
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, task, threads
from twisted.internet.defer import ensureDeferred
from twisted.names import client, dns
from twisted.names.common import ResolverBase
from twisted.names.error import DNSNameError, DNSQueryRefusedError
from twisted.trial.unittest import SynchronousTestCase, TestCase

from epio.certs import records
from epio.certs.api import Certs, DomainCheck
from epio.certs.dns01 import Dns01, Dns01Service, ZoneData, answer, base_name
from epio.certs.issuer import DAY, Issuer, IssuerSettings
from epio.certs.resolve import PROBE_LABEL, NameCheck
from epio.store import open_store
from tests.api.support import Harness
from tests.certs.test_certs import CA, SECRET, FakeAcme, sync
from tests.certs.test_resolve import Zone
from tests.util import free_port

ZONE = "acme.epio.test"
ROUTER = "198.51.100.1"


def tcp_query(port: int, name: str, qtype: int) -> dns.Message:
    """One query over TCP with a plain blocking socket (RFC 1035 4.2.2 framing)."""
    import socket
    import struct

    query = dns.Message(id=4242)
    query.queries = [dns.Query(name, qtype)]
    wire = query.toStr()
    with socket.create_connection(("127.0.0.1", port), 5) as sock:
        sock.sendall(struct.pack("!H", len(wire)) + wire)
        buf = b""
        while len(buf) < 2 or len(buf) < 2 + struct.unpack("!H", buf[:2])[0]:
            chunk = sock.recv(4096)
            if not chunk:
                raise AssertionError("the server closed the connection")
            buf += chunk
    reply = dns.Message()
    reply.fromStr(buf[2:])
    return reply


class Silent(ResolverBase):
    """A resolver that never answers (a DNS server lost on the network)."""

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any = None) -> Any:
        return defer.Deferred()


class StoreTestCase(TestCase):
    timeout = 30

    def store_url(self) -> str:
        return f"sqlite:///{Path(tempfile.mkdtemp(prefix='epio-dns01-'))}/store.db"

    async def setUp(self) -> None:  # type: ignore[override]
        self.store = await open_store(self.store_url(), reactor)
        self.addCleanup(self.store.close)
        user = await self.store.create_user("alice")
        await self.store.create_app("hello", user.id)
        await self.store.create_app("other", user.id)


class AnswerTests(SynchronousTestCase):
    def test_answer_table(self) -> None:
        """The zone's logic: SOA at the apex, a label's TXT values, no data for a
        label with no pending order, NXDOMAIN for an unknown name, REFUSED outside."""
        labels = {"abc": ["v1", "v2"], "idle": []}
        rcode, ans, auth = answer(ZONE, labels, "ABC.acme.epio.test.", dns.TXT, 7)
        self.assertEqual(rcode, dns.OK)
        self.assertEqual([a.payload.data for a in ans], [[b"v1"], [b"v2"]])  # type: ignore[union-attr]
        self.assertEqual([a.ttl for a in ans], [1, 1])
        self.assertEqual(answer(ZONE, labels, "idle.acme.epio.test", dns.TXT, 7)[:2],
                         (dns.OK, []))
        rcode, ans, auth = answer(ZONE, labels, "nope.acme.epio.test", dns.TXT, 7)
        self.assertEqual((rcode, ans, [a.type for a in auth]), (dns.ENAME, [], [dns.SOA]))
        rcode, ans, _ = answer(ZONE, labels, ZONE, dns.SOA, 7)
        self.assertEqual((rcode, [a.type for a in ans]), (dns.OK, [dns.SOA]))
        self.assertEqual(answer(ZONE, labels, "example.com", dns.TXT, 7), (dns.EREFUSED, [], []))
        self.assertEqual(answer(ZONE, labels, "xacme.epio.test", dns.TXT, 7)[0], dns.EREFUSED)


class ZoneServerTests(StoreTestCase):
    async def test_two_api_nodes_answer_the_same_txt(self) -> None:
        """Two api nodes' servers (UDP and TCP, each with its own copy of the store)
        answer the TXT values the issuer published, authoritatively, and stop once they
        are withdrawn; an unknown label is NXDOMAIN, a name outside the zone REFUSED."""
        dns01 = Dns01(self.store, ZONE, Zone({}))
        wild = await dns01.record("hello", "*.hello.test")
        apex = await dns01.record("hello", "hello.test")
        other = await dns01.record("other", "*.hello.test")
        self.assertEqual(wild, apex)  # one CNAME for the wildcard and the apex
        self.assertEqual(wild.name, "_acme-challenge.hello.test")
        self.assertRegex(wild.value, r"^[0-9a-f]{16}\.acme\.epio\.test$")
        self.assertNotEqual(other.value, wild.value)  # each app its own label
        self.assertEqual(wild.zone_line(),
                         f"_acme-challenge.hello.test. CNAME {wild.value}.")
        servers = []
        for _ in range(2):
            data = ZoneData(reactor, lambda: defer.succeed(self.store), 30.0)
            port = free_port()
            service = Dns01Service(reactor, f"127.0.0.1:{port}", ZONE, data)
            service.startService()
            self.addCleanup(service.stopService)
            servers.append((data, port))
        now = time.time()
        items = await dns01.publish("hello", "*.hello.test", ["tok-a", "tok-b"], now + 60)
        for data, _ in servers:
            await data.refresh()

        async def txt(port: int, name: str, tcp: bool = False) -> list[bytes]:
            if tcp:
                msg = await threads.deferToThread(tcp_query, port, name, dns.TXT)
                self.assertTrue(msg.auth)
                return sorted(b"".join(a.payload.data) for a in msg.answers)
            resolver = client.Resolver(servers=[("127.0.0.1", port)], reactor=reactor)
            msg = await resolver.queryUDP([dns.Query(name, dns.TXT)], timeout=(2,))
            self.assertTrue(msg.auth)
            return sorted(b"".join(a.payload.data) for a in msg.answers)

        for _, port in servers:
            self.assertEqual(await txt(port, wild.value), [b"tok-a", b"tok-b"])
            self.assertEqual(await txt(port, wild.value.upper(), tcp=True), [b"tok-a", b"tok-b"])
            self.assertEqual(await txt(port, other.value), [])  # the other app's: no data
        resolver = client.Resolver(servers=[("127.0.0.1", servers[0][1])], reactor=reactor)
        with self.assertRaises(DNSNameError):
            await resolver.lookupText(f"nope.{ZONE}", timeout=(2,))
        with self.assertRaises(DNSQueryRefusedError):
            await resolver.lookupText("_acme-challenge.hello.test", timeout=(2,))
        await dns01.withdraw(items, time.time())
        for data, port in servers:
            await data.refresh()
            self.assertEqual(await txt(port, wild.value), [])


    async def test_malformed_query_and_idle_tcp(self) -> None:
        """A query without a question is refused (and the server keeps answering); a
        TCP connection that sends nothing is closed after the idle timeout."""
        import socket

        data = ZoneData(reactor, lambda: defer.succeed(self.store), 30.0)
        port = free_port()
        service = Dns01Service(reactor, f"127.0.0.1:{port}", ZONE, data, tcp_idle_timeout=0.5)
        service.startService()
        self.addCleanup(service.stopService)

        def udp(wire: bytes) -> dns.Message:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(5)
                s.sendto(wire, ("127.0.0.1", port))
                reply = dns.Message()
                reply.fromStr(s.recvfrom(4096)[0])
                return reply

        empty = dns.Message(id=7)
        reply = await threads.deferToThread(udp, empty.toStr())
        self.assertEqual((reply.id, reply.rCode, reply.answers), (7, dns.EREFUSED, []))
        soa = dns.Message(id=8)
        soa.queries = [dns.Query(ZONE, dns.SOA)]
        reply = await threads.deferToThread(udp, soa.toStr())
        self.assertEqual((reply.rCode, [a.type for a in reply.answers]), (dns.OK, [dns.SOA]))

        def idle() -> float:
            started = time.monotonic()
            with socket.create_connection(("127.0.0.1", port), 5) as s:
                s.settimeout(5)
                self.assertEqual(s.recv(10), b"")  # closed by the server
            return time.monotonic() - started

        took = await threads.deferToThread(idle)
        self.assertGreaterEqual(took, 0.4)
        self.assertLess(took, 4.0)


class HostilePacketTests(StoreTestCase):
    async def test_responses_junk_and_connection_floods(self) -> None:
        """A "response" (QR set, as spoofed from another DNS server) is never answered
        (no reply ping-pong between two api nodes), a datagram that does not decode is
        dropped without a log line; both are counted and the server keeps answering.
        TCP connections past TCP_MAX_PER_PEER from one address, or past
        TCP_MAX_CONNECTIONS in all, are closed at once; one that pipelines queries
        without reading is closed after TCP_MAX_QUERIES answers."""
        import socket

        from twisted.logger import globalLogPublisher

        logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        data = ZoneData(reactor, lambda: defer.succeed(self.store), 30.0)
        port = free_port()
        service = Dns01Service(reactor, f"127.0.0.1:{port}", ZONE, data, tcp_idle_timeout=5.0,
                               tcp_max_connections=3, tcp_max_per_peer=2)
        service.startService()
        self.addCleanup(service.stopService)

        def udp(wire: bytes, wait: float) -> bytes | None:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(wait)
                s.sendto(wire, ("127.0.0.1", port))
                try:
                    return s.recvfrom(4096)[0]
                except TimeoutError:
                    return None

        response = dns.Message(id=9, answer=1)
        response.queries = [dns.Query(ZONE, dns.SOA)]
        self.assertIsNone(await threads.deferToThread(udp, response.toStr(), 0.3))
        self.assertIsNone(await threads.deferToThread(udp, b"\x00\x07\x01", 0.3))
        soa = dns.Message(id=8)
        soa.queries = [dns.Query(ZONE, dns.SOA)]
        wire = await threads.deferToThread(udp, soa.toStr(), 5.0)
        assert wire is not None
        reply = dns.Message()
        reply.fromStr(wire)
        self.assertEqual((reply.id, reply.rCode), (8, dns.OK))
        self.assertEqual(service.factory.dropped, 2)
        self.assertFalse([e for e in logged if "packet" in str(e.get("log_format", ""))])

        def flood() -> list[bool]:
            """Whether each connection (all held open) is closed by the server: it
            answers a query on it, or closes it."""
            import struct

            framed = struct.pack("!H", len(soa.toStr())) + soa.toStr()
            held, closed = [], []
            try:
                for source in ("127.0.0.1",) * 3 + ("127.0.0.2",) * 2:
                    s = socket.create_connection(("127.0.0.1", port), 5, (source, 0))
                    held.append(s)
                    s.settimeout(5.0)
                    try:
                        s.sendall(framed)
                        closed.append(s.recv(2) == b"")
                    except ConnectionError:
                        closed.append(True)
            finally:
                for s in held:
                    s.close()
            return closed

        self.assertEqual(await threads.deferToThread(flood), [False, False, True, False, True])
        assert service.tcp_factory is not None
        self.assertEqual(service.tcp_factory.refused, 2)

        def one_by_one(n: int) -> int:
            """Send up to ``n`` queries on one connection, each once the last is
            answered; how many are answered before the server closes it."""
            import struct

            framed = struct.pack("!H", len(soa.toStr())) + soa.toStr()
            answered = 0
            with socket.create_connection(("127.0.0.1", port), 5) as s:
                s.settimeout(5.0)

                def exactly(k: int) -> bytes | None:
                    buf = b""
                    while len(buf) < k:
                        try:
                            chunk = s.recv(k - len(buf))
                        except ConnectionError:
                            return None
                        if not chunk:
                            return None
                        buf += chunk
                    return buf

                for _ in range(n):
                    s.sendall(framed)
                    head = exactly(2)
                    if head is None or exactly(struct.unpack("!H", head)[0]) is None:
                        break
                    answered += 1
            return answered

        from epio.certs import dns01 as dns01_module

        self.patch(dns01_module, "TCP_MAX_QUERIES", 3)
        for _ in range(100):  # the flood's connections gone on the server's side too
            if not service.tcp_factory.protocols:
                break
            await task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(await threads.deferToThread(one_by_one, 10), 3)


class IssuerDns01Tests(StoreTestCase):
    async def setUp(self) -> None:  # type: ignore[override]
        await super().setUp()
        self.clock = task.Clock()
        self.clock.advance(time.time())
        self.acme = FakeAcme(CA())
        self.settings = IssuerSettings("https://ca.test/dir", "", "", 60.0, 30 * DAY, 300.0,
                                       1200.0, 3.0, 60.0)
        self.zone = Zone({"hello.test": ["203.0.113.9"]})
        self.dns01 = Dns01(self.store, ZONE, self.zone)
        self.issuer = Issuer(self.store, self.settings, SECRET, self.clock, run_blocking=sync,
                             make_client=self.acme.make,
                             name_check=NameCheck(self.zone, [ROUTER], ""), dns01=self.dns01)

    async def run_round(self) -> tuple[list[str], list[dict[str, list[str]]]]:
        """A round, advancing the fake clock past each challenge wait; also the zone's
        TXT values seen while the issuer waited."""
        seen = []
        d = defer.ensureDeferred(self.issuer.run_round())
        while not d.called:
            await task.deferLater(reactor, 0.005, lambda: None)
            zone = await records.dns_zone_data(self.store, self.clock.seconds())
            if any(zone.values()):
                seen.append(zone)
            self.clock.advance(self.settings.challenge_wait)
        return await d, seen

    async def cert(self, host: str) -> records.CertRecord:
        return {r.hostname: r for r in await records.list_certs(self.store)}[host]

    async def test_wildcard_and_apex_by_dns01(self) -> None:
        """Without the owner's CNAME a wildcard is pending_dns with the exact record to
        create (its apex, pointing elsewhere, too: either fix), looked at again after
        check_interval, doubling, at most retry_min, never ordered; a CNAME elsewhere
        says so; with it both get certificates by DNS-01, the TXT values published on
        the label while the CA checks and withdrawn after; removing the domains forgets
        the label."""
        await self.store.add_domain("hello", "*.hello.test")
        await self.store.add_domain("hello", "hello.test")
        record = await self.dns01.record("hello", "hello.test")
        self.assertEqual((await self.run_round())[0], ["*.hello.test", "hello.test"])
        wild, apex = await self.cert("*.hello.test"), await self.cert("hello.test")
        missing = (f"_acme-challenge.hello.test has no CNAME record: create "
                   f"`_acme-challenge.hello.test. CNAME {record.value}.`")
        self.assertEqual((wild.state, wild.last_error), ("pending_dns", missing))
        self.assertEqual((apex.state, apex.last_error), (
            "pending_dns", "hello.test resolves to 203.0.113.9, not to the cluster's routers "
            f"(198.51.100.1): point its DNS at them; or, for a certificate by DNS-01: {missing}"))
        self.assertAlmostEqual(wild.next_attempt - wild.updated, 60.0)
        for wait in (60.0, 120.0, 240.0):
            self.clock.advance(wait)
            await self.run_round()
            wild = await self.cert("*.hello.test")
            self.assertAlmostEqual(wild.next_attempt - wild.updated, min(wait * 2, 300.0))
        self.assertEqual(self.acme.orders, [])
        self.zone.names["_acme-challenge.hello.test"] = f"someone.{ZONE}"
        self.zone.names[f"someone.{ZONE}"] = []
        self.clock.advance(300)
        await self.run_round()
        self.assertEqual((await self.cert("*.hello.test")).last_error,
                         f"_acme-challenge.hello.test is a CNAME to someone.{ZONE}, not to "
                         f"{record.value}: change it to `_acme-challenge.hello.test. CNAME "
                         f"{record.value}.`")
        self.zone.names["_acme-challenge.hello.test"] = record.value
        self.zone.names[record.value] = []
        self.clock.advance(300)
        attempted, seen = await self.run_round()
        self.assertEqual(attempted, ["*.hello.test", "hello.test"])
        self.assertEqual(self.acme.orders, ["*.hello.test", "hello.test"])
        self.assertEqual(self.acme.challenges, ["dns-01", "dns-01"])
        label = record.value.split(".")[0]
        self.assertEqual([z[label] for z in seen if z.get(label)][:1], [["tok-1.thumb"]])
        self.assertIn(["tok-2.thumb"], [z[label] for z in seen if z.get(label)])
        for host in ("*.hello.test", "hello.test"):
            rec = await self.cert(host)
            self.assertEqual((rec.state, rec.failures, rec.last_error), ("issued", 0, None))
        self.assertEqual(await records.dns_zone_data(self.store, self.clock.seconds()),
                         {label: []})  # withdrawn; the label stays for renewals
        await self.store.remove_domain("hello", "*.hello.test")
        await self.run_round()
        self.assertIn(label, await records.dns_zone_data(self.store, self.clock.seconds()))
        await self.store.remove_domain("hello", "hello.test")
        await self.run_round()
        self.assertEqual(await records.dns_zone_data(self.store, self.clock.seconds()), {})
        # the next holder of the name gets a new label: the old CNAME answers nothing
        await self.store.add_domain("other", "*.hello.test")
        self.assertNotEqual((await self.dns01.record("other", "*.hello.test")).value,
                            record.value)


class PostgresZoneServerTests(ZoneServerTests):
    """The zone server and labels on PostgreSQL (the production store)."""

    def store_url(self) -> str:
        from tests.store import pg

        return pg.pg_url_for_test(self)


class PostgresIssuerDns01Tests(IssuerDns01Tests):
    """The DNS-01 issuer on PostgreSQL."""

    def store_url(self) -> str:
        from tests.store import pg

        return pg.pg_url_for_test(self)


class PlatformCertificateTests(StoreTestCase):
    async def test_platform_hostname_certificate(self) -> None:
        """The issuer orders the platform hostname's certificate (app epio) by HTTP-01
        like a domain's, keeps it apart from the apps' and the routers serve it; a new
        api.hostname replaces it; localhost names and acme.platform_certificate = false
        get none."""
        from epio.certs.issuer import platform_certificate_host
        from epio.config import validate

        clock = task.Clock()
        clock.advance(time.time())
        acme = FakeAcme(CA())
        settings = IssuerSettings("https://ca.test/dir", "", "", 60.0, 30 * DAY, 300.0,
                                  1200.0, 3.0, 60.0)

        async def round_with(host: str) -> list[str]:
            issuer = Issuer(self.store, settings, SECRET, clock, run_blocking=sync,
                            make_client=acme.make, platform_hostname=host)
            d = defer.ensureDeferred(issuer.run_round())
            while not d.called:
                await task.deferLater(reactor, 0.005, lambda: None)
                clock.advance(settings.challenge_wait)
            return await d

        self.assertEqual(await round_with("epio.example.test"), ["epio.example.test"])
        self.assertEqual((acme.orders, acme.challenges), (["epio.example.test"], ["http-01"]))
        (rec,) = await records.list_platform_certs(self.store)
        self.assertEqual((rec.hostname, rec.app, rec.state), ("epio.example.test", "epio",
                                                              "issued"))
        self.assertEqual(await records.list_certs(self.store), [])  # not an app's
        self.assertEqual([r.hostname for r in await records.list_served_certs(self.store)],
                         ["epio.example.test"])
        self.assertEqual(await round_with("epio.example.test"), [])  # not due
        self.assertEqual(await round_with("api.example.test"), ["api.example.test"])
        self.assertEqual([r.hostname for r in await records.list_platform_certs(self.store)],
                         ["api.example.test"])
        await round_with("")
        self.assertEqual(await records.list_platform_certs(self.store), [])

        def host(**acme_keys: Any) -> str:
            return platform_certificate_host(validate(
                {"node": {"domain": "example.test"}, "acme": {
                    "directory": "https://ca.test/dir", **acme_keys}}).settings)

        self.assertEqual(host(), "epio.example.test")
        self.assertEqual(host(platform_certificate=False), "")
        self.assertEqual(platform_certificate_host(validate(
            {"acme": {"directory": "https://ca.test/dir"}}).settings), "")  # epio.localhost


class DomainCheckTests(StoreTestCase):
    async def setUp(self) -> None:  # type: ignore[override]
        await super().setUp()
        self.zone = Zone({"www.hello.test": [ROUTER], "far.hello.test": ["203.0.113.9"],
                          f"{PROBE_LABEL}.ok.test": [ROUTER]})
        self.dns01 = Dns01(self.store, ZONE, self.zone)
        self.check = DomainCheck(reactor, NameCheck(self.zone, [ROUTER], ""), self.dns01, True)

    async def test_records_to_create(self) -> None:
        """A name pointing at the routers is ok; one elsewhere is pending_dns with the
        A record to create; a wildcard needs its names and the DNS-01 CNAME; with both
        in place it is ok."""
        ok = await self.check.check("hello", "www.hello.test", False)
        self.assertEqual(ok, {"state": "ok", "message": "DNS is in place", "records": []})
        far = await self.check.check("hello", "far.hello.test", False)
        self.assertEqual(far["state"], "pending_dns")
        self.assertEqual(far["records"], [{"name": "far.hello.test", "type": "A",
                                           "value": ROUTER}])
        self.assertIn("far.hello.test resolves to 203.0.113.9", far["message"])
        wild = await self.check.check("hello", "*.hello.test", True)
        cname = (await self.dns01.record("hello", "*.hello.test")).value
        self.assertEqual(wild["state"], "pending_dns")
        self.assertEqual(wild["records"], [
            {"name": "*.hello.test", "type": "A", "value": ROUTER},
            {"name": "_acme-challenge.hello.test", "type": "CNAME", "value": cname}])
        self.assertIn("*.hello.test does not resolve", wild["message"])
        self.assertIn("its certificate needs DNS-01", wild["message"])
        self.zone.names["_acme-challenge.ok.test"] = (
            await self.dns01.record("hello", "*.ok.test")).value
        self.zone.names[self.zone.names["_acme-challenge.ok.test"]] = []  # type: ignore[index]
        self.assertEqual((await self.check.check("hello", "*.ok.test", True))["state"], "ok")
        # no DNS-01 on the cluster: a wildcard is told to bring its own certificate
        plain = DomainCheck(reactor, NameCheck(self.zone, [ROUTER], ""), None, True)
        res = await plain.check("hello", "*.ok.test", True)
        self.assertEqual(res["state"], "ok")
        self.assertIn("add your own with `epio certs add`", res["message"])
        # routers' addresses unknown: nothing to compare with
        blind = DomainCheck(reactor, NameCheck(self.zone, [], ""), None, True)
        res = await blind.check("hello", "far.hello.test", False)
        self.assertEqual(res["state"], "unknown")
        self.assertIn("acme.router_addresses", res["message"])

    async def test_timeout(self) -> None:
        """A DNS server that never answers: after CHECK_TIMEOUT seconds the check gives
        up with state unknown (the domain is saved all the same)."""
        clock = task.Clock()
        check = DomainCheck(clock, NameCheck(Silent(), [ROUTER], ""), None, True, timeout=5.0)
        d = defer.ensureDeferred(check.check("hello", "www.hello.test", False))
        clock.advance(4.9)
        self.assertFalse(d.called)
        clock.advance(0.1)
        res = await d
        self.assertEqual(res["state"], "unknown")
        self.assertIn("no answer within 5 s", res["message"])


    async def test_checks_at_once_are_capped(self) -> None:
        """Past MAX_CHECKS checks running at once (DNS that never answers), a further
        `domains add` check is skipped at once (state unknown); once they end, checks
        run again."""
        clock = task.Clock()
        check = DomainCheck(clock, NameCheck(Silent(), [ROUTER], ""), None, True,
                            timeout=5.0, max_checks=2)
        waiting = [defer.ensureDeferred(check.check("hello", f"w{i}.hello.test", False))
                   for i in range(2)]
        res = await check.check("hello", "w3.hello.test", False)
        self.assertEqual(res["state"], "unknown")
        self.assertIn("too many checks running", res["message"])
        clock.advance(5.0)
        for d in waiting:
            self.assertIn("no answer within", (await d)["message"])
        self.assertEqual(check.running, 0)
        later = defer.ensureDeferred(check.check("hello", "w4.hello.test", False))
        self.assertEqual(check.running, 1)
        clock.advance(5.0)
        self.assertIn("no answer within", (await later)["message"])

    async def test_unexpected_error(self) -> None:
        """A check that breaks (here: a resolver raising what no DNS failure raises)
        answers unknown and logs the failure; `epio domains add` still succeeds."""

        class Broken(ResolverBase):
            def _lookup(self, name: bytes, cls: int, type: int, timeout: Any = None) -> Any:
                return defer.fail(RuntimeError("resolver bug"))

        check = DomainCheck(reactor, NameCheck(Broken(), [ROUTER], ""), None, True)
        res = await check.check("hello", "www.hello.test", False)
        self.assertEqual(res["state"], "unknown")
        self.assertNotIn("resolver bug", res["message"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class DomainsAddApiTests(TestCase):
    timeout = 30

    def setUp(self) -> Any:
        self.h = Harness()
        self.addCleanup(lambda: ensureDeferred(self.h.stop()))
        return ensureDeferred(self.h.start())

    async def test_domains_add_says_which_record(self) -> None:
        """`POST /apps/{app}/domains` saves the domain whatever its DNS and answers
        (201) with the DNS check: a wildcard without its records is pending_dns with
        the A and CNAME records to create."""
        zone = Zone({})
        dns01 = Dns01(self.h.store, ZONE, zone)
        self.h.api.certs = Certs(self.h.store, SECRET, True, reactor,
                                 DomainCheck(reactor, NameCheck(zone, [ROUTER], ""), dns01, True))
        alice = self.h.alice_token
        await self.h.call("POST", "apps", token=alice, body={"name": "shop"})
        status, added, _ = await self.h.call("POST", "apps/shop/domains", token=alice,
                                             body={"hostname": "*.shop.test"})
        self.assertEqual((status, added["hostname"], added["wildcard"]), (201, "*.shop.test", True))
        self.assertEqual(added["dns"]["state"], "pending_dns")
        self.assertEqual([(r["name"], r["type"]) for r in added["dns"]["records"]],
                         [("*.shop.test", "A"), ("_acme-challenge.shop.test", "CNAME")])
        self.assertTrue(re.fullmatch(r"[0-9a-f]{16}\.acme\.epio\.test",
                                     added["dns"]["records"][1]["value"]))
        _, listed, _ = await self.h.call("GET", "apps/shop/domains", token=alice)
        self.assertIn("*.shop.test", [d["hostname"] for d in listed])
        self.assertEqual(base_name("*.shop.test"), "shop.test")
