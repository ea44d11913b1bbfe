"""The api node's ``api.heartbeat``: how the routers come to serve the platform itself.

"www.ep.io runs on ep.io, just like any other app (App ID 0 is special)."  Every api
node publishes ``api.heartbeat`` (topic ``hb``) to every nexus each
``api.heartbeat_interval`` seconds, once its API is open: its node id, boot id, a
sequence number and the ``host``/``port`` where routers reach its listener.  Each
nexus lists the api nodes heard from as the backends of the platform's own route
(:data:`epio.domain.PLATFORM_APP`, at ``api.hostname``), expired like runners
(``nexus.node_timeout``), so the routers balance the API and dashboard across every
live api node with their limits, access logs and stats (docs/router.md).

On stop, a last heartbeat says ``draining``: the nexuses take the node out of the
route at once (no new request; those in flight finish), as a runner's draining
instance; should it be lost, the node leaves the route ``nexus.node_timeout`` later and
the routers retry a refused connect on the next api node meanwhile.

Where the routers reach it: ``api.advertise`` (``HOST:PORT``), or else the port the
listener really got (so ``tcp:0`` works) on its interface, or on
``runner.advertise_host`` when it listens on every address.  A Unix-socket listener
without ``api.advertise`` is not advertised (logged once).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

HEARTBEAT_TOPIC = b"hb"
WILDCARDS = frozenset({"", "0.0.0.0", "::"})

Address = tuple[str, int]


class RecordingEndpoint:
    """A server endpoint that remembers the port it listened on (the api's own, whose
    real port number the beacon advertises)."""

    def __init__(self, inner: IStreamServerEndpoint | Any) -> None:
        self.inner = inner
        self.port: IListeningPort | None = None

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        d: Deferred[IListeningPort] = self.inner.listen(factory)

        def keep(port: IListeningPort) -> IListeningPort:
            self.port = port
            return port

        return d.addCallback(keep)


def parse_advertise(value: str) -> Address | None:
    """``HOST:PORT`` (``[V6]:PORT``) -> (host, port); None when empty."""
    if not value:
        return None
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


def advertised(explicit: Address | None, port: IListeningPort | None,
               wildcard_host: str) -> Address | None:
    """Where routers reach this api: ``explicit``, else the listening port's own address
    (a wildcard interface replaced by ``wildcard_host``); None when unknown (not
    listening yet, or a Unix socket)."""
    if explicit is not None:
        return explicit
    if port is None:
        return None
    addr = port.getHost()
    if not isinstance(addr, IPv4Address | IPv6Address):
        return None
    host = wildcard_host if addr.host in WILDCARDS else addr.host
    return host, addr.port


class ApiBeacon(MultiService):
    """Publishes ``api.heartbeat`` every ``interval`` seconds through ``publisher`` (a
    PUB connected to every nexus's heartbeat endpoint, a child of this service) while
    running; ``address()`` says where routers reach the api (None: not advertised)."""

    log = Logger()

    def __init__(self, clock: IReactorTime, publisher: Any, node_id: str, boot_id: str,
                 interval: float, address: Callable[[], Address | None]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        publisher.setServiceParent(self)
        self._clock = clock
        self._publisher = publisher
        self.node_id = node_id
        self.boot_id = boot_id
        self.interval = interval
        self._address = address
        self.seq = 0
        self._warned = False
        self._loop: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        self._loop = LoopingCall(self.beat)
        self._loop.clock = self._clock
        self._loop.start(self.interval, now=True).addErrback(
            lambda f: self.log.failure("the api heartbeat loop died", f))

    def stopService(self) -> Any:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
            self.beat(draining=True)  # the nexuses take it out of the route at once
        self._loop = None
        return super().stopService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated

    def body(self, draining: bool = False) -> dict[str, Any] | None:
        """The next heartbeat's body (None: nothing to advertise)."""
        address = self._address()
        if address is None:
            return None
        self.seq += 1
        body: dict[str, Any] = {
            "node_id": self.node_id, "boot_id": self.boot_id, "seq": self.seq,
            "interval": self.interval, "host": address[0], "port": address[1]}
        if draining:
            body["draining"] = True
        return body

    def beat(self, draining: bool = False) -> None:
        try:
            body = self.body(draining)
            if body is None:
                if not self._warned:
                    self._warned = True
                    self.log.warn("the api's listener has no TCP address to advertise: set "
                                  "api.advertise (HOST:PORT) for the routers to serve it")
                return
            self._publisher.publish("api.heartbeat", body, topic=HEARTBEAT_TOPIC)
        except Exception:
            self.log.failure("publishing api.heartbeat failed")
