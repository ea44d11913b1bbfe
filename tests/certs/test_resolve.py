"""The "name resolves to the cluster" check before ordering a certificate
(epio.certs.resolve; docs/https.md)."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.names import dns
from twisted.names.common import ResolverBase
from twisted.names.error import DNSNameError, DNSServerError
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from epio.certs.resolve import PROBE_LABEL, NameCheck, addresses_of, make_name_check


class Zone(ResolverBase):
    """A resolver answering from a table, the way a recursive server does: a CNAME's
    target records come along in the answer; a name not in the table is NXDOMAIN, one
    mapped to None fails with SERVFAIL."""

    def __init__(self, names: dict[str, list[str] | str | None]) -> None:
        super().__init__()
        self.names = names

    def _records(self, name: str, qtype: int) -> list[dns.RRHeader]:
        value = self.names[name]
        if isinstance(value, str):  # a CNAME
            return [dns.RRHeader(name, dns.CNAME, payload=dns.Record_CNAME(value))] + \
                self._records(value, qtype)
        out = []
        for addr in value or []:
            if qtype == dns.A and ":" not in addr:
                out.append(dns.RRHeader(name, dns.A, payload=dns.Record_A(addr)))
            elif qtype == dns.AAAA and ":" in addr:
                out.append(dns.RRHeader(name, dns.AAAA, payload=dns.Record_AAAA(addr)))
        return out

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any = None) -> Any:
        host = name.decode() if isinstance(name, bytes) else str(name)
        if host not in self.names:
            return defer.fail(DNSNameError(host))
        if self.names[host] is None:
            return defer.fail(DNSServerError(host))
        return defer.succeed((self._records(host, type), [], []))


def run(coro: Any) -> Any:
    d = defer.Deferred.fromCoroutine(coro)
    return SynchronousTestCase().successResultOf(d)


class ResolveTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.zone = Zone({
            f"{PROBE_LABEL}.apps.example.com": ["198.51.100.1", "2001:db8::1"],
            "www.good.com": ["198.51.100.1"],
            "v6.good.com": ["2001:db8:0:0::1"],
            "alias.good.com": "app.apps.example.com",
            "app.apps.example.com": ["198.51.100.1"],
            "www.other.com": ["203.0.113.9"],
            "mixed.com": ["198.51.100.1", "203.0.113.9"],
            "empty.com": [],
            "broken.com": None,
        })

    def test_the_resolver_interface(self) -> None:
        """The fake is a real IResolver; addresses follow CNAMEs, v4 and v6."""
        from twisted.internet.interfaces import IResolver

        verifyObject(IResolver, self.zone)
        self.assertEqual(run(addresses_of(self.zone, "alias.good.com")), {"198.51.100.1"})
        self.assertEqual(run(addresses_of(self.zone, "v6.good.com")), {"2001:db8::1"})
        self.assertEqual(run(addresses_of(self.zone, "nowhere.com")), set())

    def test_names_pointing_at_the_platform_domain_pass(self) -> None:
        """With no configured addresses, the platform domain's wildcard gives them: a
        name at those addresses (directly, by CNAME, over IPv6) needs no more."""
        check = NameCheck(self.zone, [], "apps.example.com.")
        self.assertEqual(run(check.cluster_addresses()), {"198.51.100.1", "2001:db8::1"})
        for host in ("www.good.com", "alias.good.com", "v6.good.com"):
            self.assertIsNone(run(check.problem(host)), host)

    def test_names_elsewhere_get_a_clear_reason(self) -> None:
        """A name resolving elsewhere (even partly), not at all, or not resolvable now
        gets a reason naming it and the routers' addresses."""
        check = NameCheck(self.zone, [], "apps.example.com")
        other = run(check.problem("www.other.com"))
        self.assertEqual(other, "www.other.com resolves to 203.0.113.9, not to the cluster's "
                                "routers (198.51.100.1, 2001:db8::1): point its DNS at them")
        self.assertIn("resolves to 203.0.113.9", run(check.problem("mixed.com")))
        self.assertIn("nowhere.com does not resolve", run(check.problem("nowhere.com")))
        self.assertIn("empty.com does not resolve", run(check.problem("empty.com")))
        self.assertIn("broken.com could not be resolved", run(check.problem("broken.com")))

    def test_configured_addresses_win_and_unknown_passes(self) -> None:
        """acme.router_addresses replaces the platform domain's; loopback addresses of
        the platform domain ("localhost") do not count; with neither known, the check
        lets the CA decide."""
        check = NameCheck(self.zone, ["203.0.113.9"], "apps.example.com")
        self.assertIsNone(run(check.problem("www.other.com")))
        self.assertIn("not to the cluster's routers (203.0.113.9)",
                      run(check.problem("www.good.com")))
        self.zone.names["localhost"] = ["127.0.0.1", "::1"]  # the single-box default
        self.assertEqual(run(NameCheck(self.zone, [], "localhost").cluster_addresses()), set())
        self.assertIsNone(run(NameCheck(self.zone, [], "localhost").problem("www.other.com")))
        unknown = NameCheck(self.zone, [], "nothing.example.net")
        self.assertIsNone(run(unknown.problem("www.other.com")))
        self.assertIsNone(run(NameCheck(self.zone, [], "").problem("www.other.com")))


class RealDnsTests(TestCase):
    async def test_over_a_dns_server(self) -> None:
        """make_name_check with acme.dns_server asks that server over UDP (a
        twisted.names server on loopback answering from a Zone)."""
        from twisted.internet import reactor
        from twisted.names import server

        zone = Zone({f"{PROBE_LABEL}.apps.example.com": ["192.0.2.1"],
                     "www.good.com": ["192.0.2.1"], "www.other.com": ["192.0.2.3"]})
        factory = server.DNSServerFactory(clients=[zone])
        port = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory),  # type: ignore[attr-defined]
                                 interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        check = make_name_check(reactor, [], f"127.0.0.1:{port.getHost().port}",
                                "apps.example.com")
        self.assertIsNone(await check.problem("www.good.com"))
        self.assertEqual(await check.problem("www.other.com"),
                         "www.other.com resolves to 192.0.2.3, not to the cluster's routers "
                         "(192.0.2.1): point its DNS at them")
        self.assertIn("does not resolve", await check.problem("nowhere.com") or "")
