"""Health probes for web instances.

A web instance is healthy when its ``[http] health_check`` path answers 2xx or
3xx over HTTP/1.1, or, without a path, when its port accepts TCP connections.
The probe is an injected :class:`IHealthProbe` so the supervisor's health logic
is unit-tested with a fake; :class:`NetworkProbe` is the real one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers
from zope.interface import Interface, implementer

if TYPE_CHECKING:
    from epio.node import INodeReactor


class IHealthProbe(Interface):
    def check(host: str, port: int, path: str | None, timeout: float) -> defer.Deferred[bool]:
        """Fire True if the instance at host:port is healthy, False otherwise (never errback)."""


class _Close(Protocol):
    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.loseConnection()


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@implementer(IHealthProbe)
class NetworkProbe:
    """Real probes over TCP and HTTP, with the reactor injected."""

    log = Logger()

    def __init__(self, reactor: INodeReactor, host_header: str = "localhost") -> None:
        self.reactor = reactor
        self.host_header = host_header
        self.agent = Agent(reactor, connectTimeout=5)

    def check(self, host: str, port: int, path: str | None, timeout: float) -> defer.Deferred[bool]:
        d = defer.Deferred.fromCoroutine(self._check(host, port, path))
        d.addTimeout(timeout, self.reactor)
        d.addErrback(lambda f: False)
        return d

    async def _check(self, host: str, port: int, path: str | None) -> bool:
        if not path:
            ep = HostnameEndpoint(self.reactor, host, port, timeout=5)
            factory: Any = Factory.forProtocol(_Close)
            await ep.connect(factory)
            return True
        if not path.startswith("/"):
            path = "/" + path
        url = f"http://{url_host(host)}:{port}{path}".encode("ascii")
        response = await self.agent.request(
            b"GET", url, Headers({b"host": [self.host_header.encode("idna")],
                                  b"user-agent": [b"epio-health"]})
        )
        await readBody(response)
        code: int = response.code  # IResponse is a zope interface: its attributes are Any
        return 200 <= code < 400
