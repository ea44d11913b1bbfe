"""Does a custom domain point at this cluster?  Asked before ordering its certificate.

An HTTP-01 challenge succeeds only when the CA, resolving the name, reaches one of
the cluster's routers.  :class:`NameCheck` asks DNS first (``twisted.names``: A and
AAAA, CNAMEs followed by the resolver) and compares with the routers' addresses:
``acme.router_addresses`` when set, else whatever the platform's own names
resolve to (``<node.domain>`` and ``epio-dns-check.<node.domain>``, the wildcard
the platform's app hostnames live under; loopback addresses left out).  A name that does not resolve, or
resolves to any other address (the CA may try any of them), gets a clear reason instead of an order (and of
a failed CA challenge, which also counts against the CA's rate limits).  When the
cluster's addresses cannot be known (neither set nor resolvable) the check passes,
and the CA's challenge decides as before.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any, cast

from twisted.internet import defer
from twisted.internet.error import DNSLookupError, TimeoutError
from twisted.internet.interfaces import IResolver
from twisted.logger import Logger
from twisted.names import dns
from twisted.names.error import DNSNameError, DomainError

# the name under the platform domain whose addresses stand for the routers' (wildcard)
PROBE_LABEL = "epio-dns-check"
TIMEOUT = (2, 4)  # twisted.names: a retry per entry, seconds
NOT_FOUND = DNSNameError  # NXDOMAIN (no records of a type is an empty answer)
# SERVFAIL, refused, timeouts (DomainError covers twisted.names' server errors)
FAILED = (DomainError, DNSLookupError, TimeoutError, defer.TimeoutError)


def _canonical(address: str) -> str:
    return str(ipaddress.ip_address(address))


async def addresses_of(resolver: IResolver, name: str) -> set[str]:
    """The A and AAAA addresses ``name`` resolves to (empty: none, or no such name);
    a resolver failure other than "no such name" is raised."""
    found: set[str] = set()
    for lookup, rtype in ((resolver.lookupAddress, dns.A), (resolver.lookupIPV6Address,
                                                             dns.AAAA)):
        try:
            # (answers, authority, additional): lists of RRHeader, whatever
            # IResolver's annotation says
            result: Any = await lookup(name, timeout=TIMEOUT)
        except NOT_FOUND:
            continue
        answers: list[dns.RRHeader] = result[0]
        for rr in answers:
            payload = rr.payload
            if rtype == dns.A and isinstance(payload, dns.Record_A):
                found.add(payload.dottedQuad())
            elif rtype == dns.AAAA and isinstance(payload, dns.Record_AAAA):
                found.add(str(ipaddress.IPv6Address(payload.address)))
    return found


class NameCheck:
    """Whether hostnames resolve to the cluster's routers (see the module)."""

    log = Logger()

    def __init__(self, resolver: IResolver, router_addresses: list[str], domain: str) -> None:
        self.resolver = resolver
        self.configured = {_canonical(a) for a in router_addresses}
        self.domain = domain.strip(".").lower()

    async def cluster_addresses(self) -> set[str]:
        """The routers' addresses: configured, else those of the platform's names."""
        if self.configured:
            return self.configured
        if not self.domain:
            return set()
        found: set[str] = set()
        for name in (self.domain, f"{PROBE_LABEL}.{self.domain}"):
            try:
                found |= await addresses_of(self.resolver, name)
            except FAILED as e:
                self.log.warn("cannot resolve {name} for the cluster's addresses: {error}",
                              name=name, error=str(e) or e.__class__.__name__)
        # node.domain = "localhost" (the single-box default) says nothing of where a CA
        # reaches the routers
        return {a for a in found if not ipaddress.ip_address(a).is_loopback}

    async def problem(self, host: str) -> str | None:
        """Why ``host`` cannot get a certificate by HTTP-01 now, or None (go ahead)."""
        cluster = await self.cluster_addresses()
        if not cluster:
            return None  # nothing to compare with: the CA's challenge decides
        shown = ", ".join(sorted(cluster))
        try:
            found = await addresses_of(self.resolver, host)
        except FAILED as e:
            return (f"{host} could not be resolved ({str(e) or e.__class__.__name__}); "
                    "retrying later")
        if not found:
            return (f"{host} does not resolve: point it at the cluster's routers ({shown}) "
                    "with an A/AAAA record or a CNAME to a platform hostname")
        foreign = found - cluster
        if foreign:  # the CA may try any of them
            return (f"{host} resolves to {', '.join(sorted(foreign))}, not to the cluster's "
                    f"routers ({shown}): point its DNS at them")
        return None


class _FirstUse:
    """A resolver made at its first lookup.  ``twisted.names.client.Resolver`` reads
    ``/etc/resolv.conf`` and schedules its re-reading when it is made: reactor work
    that a composition root never does at construction (docs/architecture.md)."""

    def __init__(self, make: Callable[[], IResolver]) -> None:
        self._make = make
        self._made: IResolver | None = None

    def __getattr__(self, name: str) -> Any:
        if self._made is None:
            self._made = self._make()
        return getattr(self._made, name)


def make_resolver(reactor: Any, dns_server: str) -> IResolver:
    """``acme.dns_server`` (``HOST:PORT``) or the system's resolver (``/etc/resolv.conf``
    and ``/etc/hosts``), made at its first lookup.  ``reactor``: UDP, TCP and time, as
    ``twisted.names.client.Resolver`` takes it."""

    def make() -> IResolver:
        from twisted.names import client, hosts, resolve

        if dns_server:
            host, _, port = dns_server.rpartition(":")
            return client.Resolver(servers=[(host.strip("[]"), int(port))],
                                   reactor=reactor)
        return resolve.ResolverChain([
            hosts.Resolver(), client.Resolver(resolv="/etc/resolv.conf", reactor=reactor)])

    return cast(IResolver, _FirstUse(make))


def make_name_check(reactor: Any, router_addresses: list[str], dns_server: str,
                    domain: str) -> NameCheck:
    """The issuer's :class:`NameCheck`, over :func:`make_resolver`'s resolver."""
    return NameCheck(make_resolver(reactor, dns_server), router_addresses, domain)
