"""DNS-01 and wildcard certificates: the cluster answers its own ACME TXT records.

Built the way acme-dns does it.  The operator delegates a zone to the api nodes
(``acme.dns01_zone``, e.g. ``acme.example.net``: NS records in its parent naming
them) and each api node answers DNS for it on ``acme.dns01_listen`` (UDP and TCP,
:class:`Dns01Service`).  Each app gets, per base name (the domain without its
``*.``), a random label kept in the store (``acme_dns_labels``); its owner adds
one record once::

    _acme-challenge.example.com.  CNAME  3f9c0d2a7b5e4411.acme.example.net.

and certificates for ``*.example.com`` and ``example.com`` are then issued and
renewed by DNS-01 with nothing more to do.  While an order is pending, the
issuer writes the TXT values to the store (``acme_dns_txt``); every api node's
server follows the store (:class:`ZoneData`: at every ``certificate`` change it
announces, and every ``acme.sync_interval`` seconds), so redundant nodes answer
the same TXT whichever one the CA's resolver asks.

The server answers only its zone, authoritatively: the zone's SOA, TXT for a
label (no data while no order is pending), NXDOMAIN for an unknown name under
the zone, REFUSED for any name outside it.  It is not a resolver.

:class:`Dns01` is the issuer's and the api's side: the label of a domain, the
record its owner must create, and whether that record is in place
(``_acme-challenge.BASE`` resolves, as a CNAME, to the label).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

from attrs import frozen
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IListeningPort, IResolver
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.names import dns, server
from twisted.protocols import policies

from epio.certs import records
from epio.store import Store

CHALLENGE_LABEL = "_acme-challenge"
TXT_TTL = 1  # seconds: a renewed order's new value must not meet a cached old one
SOA_TTL = 60
NEGATIVE_TTL = 1  # the SOA minimum: how long resolvers may cache "no such name / no data"
LABEL_BYTES = 8  # a label is 16 hex digits
TCP_IDLE_TIMEOUT = 10.0  # seconds a TCP client may stay connected without sending a query
TCP_MAX_CONNECTIONS = 256  # TCP connections at once (the api process's file descriptors)
TCP_MAX_PER_PEER = 8  # TCP connections at once from one address
TCP_MAX_QUERIES = 64  # queries answered on one TCP connection, then it is closed


def base_name(hostname: str) -> str:
    """``example.com`` for ``*.example.com`` and ``example.com``: both are validated
    at ``_acme-challenge.example.com``."""
    host = hostname.lower().rstrip(".")
    return host[2:] if host.startswith("*.") else host


def new_label() -> str:
    return secrets.token_hex(LABEL_BYTES)


@frozen
class Record:
    """A DNS record an owner is asked to create (``value`` without a trailing dot)."""

    name: str
    type: str
    value: str

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "type": self.type, "value": self.value}

    def zone_line(self) -> str:
        value = self.value + "." if self.type == "CNAME" else self.value
        return f"{self.name}. {self.type} {value}"


class Dns01:
    """Labels, the CNAME an owner creates, and the check that it is in place.
    ``resolver``: the name check's (``acme.dns_server`` or the system's)."""

    def __init__(self, store: Store, zone: str, resolver: IResolver) -> None:
        self.store = store
        self.zone = zone.lower().rstrip(".")
        self.resolver = resolver

    async def record(self, app: str, hostname: str) -> Record:
        """The CNAME ``app``'s owner creates for ``hostname`` (its label made if new)."""
        base = base_name(hostname)
        label = await records.dns_label(self.store, app, base, new_label())
        return Record(f"{CHALLENGE_LABEL}.{base}", "CNAME", f"{label}.{self.zone}")

    async def problem(self, app: str, hostname: str) -> str | None:
        """Why DNS-01 cannot be used for ``hostname`` now (the owner's CNAME missing or
        elsewhere, said with the record to create), or None."""
        from epio.certs.resolve import FAILED, NOT_FOUND, TIMEOUT

        want = await self.record(app, hostname)
        try:
            result: Any = await self.resolver.lookupCanonicalName(want.name, timeout=TIMEOUT)
            answers: list[dns.RRHeader] = result[0]
        except NOT_FOUND:
            answers = []
        except FAILED as e:
            return (f"{want.name} could not be resolved ({str(e) or e.__class__.__name__}); "
                    "retrying later")
        targets: list[str] = []
        for rr in answers:
            payload = rr.payload
            if (isinstance(payload, dns.Record_CNAME)
                    and str(rr.name).lower().rstrip(".") == want.name):
                targets.append(str(payload.name).lower().rstrip("."))
        if not targets:
            return f"{want.name} has no CNAME record: create `{want.zone_line()}`"
        if want.value not in targets:
            return (f"{want.name} is a CNAME to {targets[0]}, not to {want.value}: change it "
                    f"to `{want.zone_line()}`")
        return None

    async def publish(self, app: str, hostname: str, values: list[str],
                      expires: float) -> list[tuple[str, str]]:
        """Serve ``values`` as TXT of ``hostname``'s label; returns what to withdraw."""
        label = (await self.record(app, hostname)).value.split(".", 1)[0]
        items = [(label, v) for v in values]
        await records.put_dns_txt(self.store, items, expires)
        return items

    async def withdraw(self, items: list[tuple[str, str]], now: float) -> None:
        await records.delete_dns_txt(self.store, items, now)


class ZoneData:
    """One api node's copy of the zone's labels and TXT values (see the module)."""

    log = Logger()

    def __init__(self, reactor: Any, store_ready: Callable[[], defer.Deferred[Any]],
                 interval: float) -> None:
        self.reactor = reactor
        self._store_ready = store_ready
        self.interval = interval
        self.labels: dict[str, list[str]] = {}
        self._loop: LoopingCall | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._busy = False
        self._again = False
        self._waiters: list[defer.Deferred[None]] = []
        self.loads = 0

    def start(self) -> None:
        self._loop = LoopingCall(self.refresh)
        self._loop.clock = self.reactor
        self._loop.start(self.interval, now=True)
        defer.ensureDeferred(self._subscribe()).addErrback(
            lambda f: self.log.failure("DNS-01 zone: cannot follow store changes", f))

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

    def stop(self) -> defer.Deferred[None]:
        """Stop following the store; fires once no reload is running."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        self._again = False
        if not self._busy:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._waiters.append(waiter)
        return waiter

    def refresh(self) -> defer.Deferred[None]:
        """Reload from the store (one at a time; a request meanwhile runs after, and
        its Deferred fires when that reload is done)."""
        if self._busy:
            self._again = True
            waiter: defer.Deferred[None] = defer.Deferred()
            self._waiters.append(waiter)
            return waiter
        self._busy = True
        d = defer.ensureDeferred(self._refresh())

        def done(result: Any) -> Any:
            self._busy = False
            waiters, self._waiters = self._waiters, []
            if not self._again:
                for w in waiters:
                    w.callback(None)
            else:
                self._again = False

                def wake(_: object) -> None:
                    for w in waiters:
                        w.callback(None)

                self.refresh().addBoth(wake)
            return result

        d.addBoth(done)
        d.addErrback(lambda f: self.log.warn("DNS-01 zone: reload failed: {error}",
                                             error=f.getErrorMessage()))
        return d

    async def _refresh(self) -> None:
        store = await self._store_ready()
        self.labels = await records.dns_zone_data(store, self.reactor.seconds())
        self.loads += 1


def answer(zone: str, labels: dict[str, list[str]], name: str, qtype: int,
           serial: int) -> tuple[int, list[dns.RRHeader], list[dns.RRHeader]]:
    """(rcode, answers, authority) for one question: the zone's whole logic."""
    name = name.lower().rstrip(".")
    if name != zone and not name.endswith("." + zone):
        return dns.EREFUSED, [], []
    soa = dns.RRHeader(zone, dns.SOA, ttl=SOA_TTL, auth=True, payload=dns.Record_SOA(
        mname=zone, rname=f"hostmaster.{zone}", serial=serial, refresh=3600, retry=600,
        expire=86400, minimum=NEGATIVE_TTL, ttl=SOA_TTL))
    if name == zone:
        if qtype in (dns.SOA, dns.ALL_RECORDS):
            return dns.OK, [soa], []
        return dns.OK, [], [soa]
    label = name[:-len(zone) - 1]
    if label not in labels:
        return dns.ENAME, [], [soa]
    if qtype in (dns.TXT, dns.ALL_RECORDS) and labels[label]:
        return dns.OK, [dns.RRHeader(name, dns.TXT, ttl=TXT_TTL, auth=True,
                                     payload=dns.Record_TXT(v.encode("ascii"), ttl=TXT_TTL))
                        for v in labels[label]], []
    return dns.OK, [], [soa]


class ZoneServerFactory(server.DNSServerFactory):
    """Answers every query from :class:`ZoneData` (synchronously: no lookup, no I/O)."""

    log = Logger()

    def __init__(self, zone: str, data: ZoneData) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # twisted.names is unannotated
        self.zone = zone.lower().rstrip(".")
        self.data = data
        self.queries = 0
        self.dropped = 0  # messages dropped unanswered: undecodable, or not queries

    def messageReceived(self, message: dns.Message, proto: Any, address: Any = None) -> None:
        # never answer a response (QR set): a spoofed "response" from another DNS
        # server (another api node's) would otherwise start a reply ping-pong
        if message.answer:
            self.dropped += 1
            return
        super().messageReceived(message, proto, address)  # type: ignore[no-untyped-call]  # unannotated

    def handleQuery(self, message: dns.Message, protocol: Any, address: Any) -> None:
        self.queries += 1
        if isinstance(protocol, dns.DNSProtocol):  # TCP
            # a client that sends queries and never reads the answers would make them
            # pile up in memory here: a connection answers so many, then is closed
            asked = getattr(protocol, "epio_queries", 0) + 1
            protocol.epio_queries = asked  # type: ignore[attr-defined]  # our counter
            if asked > TCP_MAX_QUERIES:
                self.dropped += 1
                if protocol.transport is not None:
                    protocol.transport.loseConnection()
                return
        query = message.queries[0]  # one at least: allowQuery refuses a message without
        rcode, answers, authority = answer(
            self.zone, self.data.labels, query.name.name.decode("ascii", "replace"),
            query.type, int(self.data.reactor.seconds()) % 2**32)
        response = self._responseFromMessage(  # type: ignore[no-untyped-call]  # unannotated
            message=message, rCode=rcode, answers=answers, authority=authority)
        response.auth = rcode != dns.EREFUSED
        self.sendReply(protocol, response, address)  # type: ignore[no-untyped-call]


class _Datagrams(dns.DNSDatagramProtocol):
    """UDP: a datagram that does not decode is dropped and counted, not logged (a
    flood of spoofed junk must not become a flood of log lines)."""

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        message = dns.Message()
        try:
            message.fromStr(data)
        except Exception:
            self.controller.dropped += 1
            return
        self.controller.messageReceived(message, self, addr)


class _IdleTimeout(policies.TimeoutFactory):
    """Closes a TCP connection idle for ``timeout`` seconds (a resolver sends its
    queries at once; a client holding connections open gets nothing from it), and
    refuses a connection past ``max_connections`` at once or ``max_per_peer`` from one
    address (connections held open must not exhaust the api's file descriptors)."""

    def __init__(self, reactor: Any, factory: Any, timeout: float,
                 max_connections: int = TCP_MAX_CONNECTIONS,
                 max_per_peer: int = TCP_MAX_PER_PEER) -> None:
        super().__init__(factory, timeout)  # type: ignore[no-untyped-call]  # unannotated
        self.reactor = reactor
        self.max_connections = max_connections
        self.max_per_peer = max_per_peer
        self.refused = 0

    def buildProtocol(self, addr: Any) -> Any:
        host = getattr(addr, "host", None)
        from_peer = sum(1 for p in self.protocols
                        if getattr(p.transport.getPeer(), "host", None) == host)
        if len(self.protocols) >= self.max_connections or from_peer >= self.max_per_peer:
            self.refused += 1
            return None  # the connection is closed at once
        return super().buildProtocol(addr)  # type: ignore[no-untyped-call]  # unannotated

    def callLater(self, period: float, func: Callable[[], Any]) -> Any:
        return self.reactor.callLater(period, func)


class Dns01Service(Service):
    """The api node's DNS server for ``acme.dns01_zone`` on ``acme.dns01_listen``."""

    log = Logger()

    def __init__(self, reactor: Any, listen: str, zone: str, data: ZoneData,
                 tcp_idle_timeout: float = TCP_IDLE_TIMEOUT,
                 tcp_max_connections: int = TCP_MAX_CONNECTIONS,
                 tcp_max_per_peer: int = TCP_MAX_PER_PEER) -> None:
        self.reactor = reactor
        self.tcp_idle_timeout = tcp_idle_timeout
        self.tcp_max_connections = tcp_max_connections
        self.tcp_max_per_peer = tcp_max_per_peer
        self.tcp_factory: _IdleTimeout | None = None
        host, _, port = listen.rpartition(":")
        self.host = host.strip("[]")
        self.port = int(port)
        self.zone = zone
        self.data = data
        self.factory = ZoneServerFactory(zone, data)
        self._ports: list[IListeningPort] = []

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        self.data.start()
        datagrams = _Datagrams(self.factory)  # type: ignore[no-untyped-call]  # unannotated
        udp = self.reactor.listenUDP(self.port, datagrams, interface=self.host)
        self.tcp_factory = _IdleTimeout(self.reactor, self.factory, self.tcp_idle_timeout,
                                        self.tcp_max_connections, self.tcp_max_per_peer)
        tcp = self.reactor.listenTCP(self.port, self.tcp_factory, interface=self.host)
        self._ports = [udp, tcp]
        self.log.info("DNS-01: answering {zone} on {host}:{port} (UDP and TCP)",
                      zone=self.zone, host=self.host, port=self.port)

    def stopService(self) -> defer.Deferred[Any]:
        super().stopService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        ports, self._ports = self._ports, []
        waits: list[defer.Deferred[Any]] = [defer.maybeDeferred(p.stopListening)
                                            for p in ports]
        waits.append(self.data.stop())
        return defer.gatherResults(waits, consumeErrors=True).addCallback(lambda _: None)


def make_dns01(node: Any, store: Store) -> tuple[Dns01, Dns01Service] | None:
    """The api role's :class:`Dns01` and its server, when ``acme.dns01_zone`` is set."""
    from epio.certs.resolve import make_resolver

    acme = node.settings.acme
    if not (acme.directory and acme.dns01_zone):
        return None
    dns01 = Dns01(store, acme.dns01_zone, make_resolver(node.reactor, acme.dns_server))
    data = ZoneData(node.reactor, lambda: defer.succeed(store), acme.sync_interval)
    return dns01, Dns01Service(node.reactor, acme.dns01_listen, acme.dns01_zone, data)
