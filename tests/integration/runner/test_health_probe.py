"""The real health probes against real listeners, over IPv4 and IPv6."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from epio.runner.health import NetworkProbe
from tests.util import free_port


class Status(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        code = int(request.path.decode().strip("/") or 200)
        request.setResponseCode(code)
        if code == 302:
            request.setHeader(b"location", b"/elsewhere")
        return b"x"


class Silent(Protocol):
    """Accepts and never answers (a hung app)."""


class ProbeTests(TestCase):
    timeout = 30

    async def listen(self, description: str, factory: Any) -> int:
        port = await serverFromString(reactor, description).listen(factory)
        self.addCleanup(port.stopListening)
        return int(port.getHost().port)

    async def test_tcp_and_http_probes_ipv4_and_ipv6(self) -> None:
        """TCP: a listening port is healthy, a closed one not. HTTP: 2xx and 3xx are
        healthy, 4xx/5xx not, a server that never answers times out as unhealthy; the
        same holds over IPv6 (::1)."""
        probe = NetworkProbe(reactor)
        for host, iface in (("127.0.0.1", "127.0.0.1"), ("::1", "\\:\\:1")):
            kind = "tcp6" if ":" in host else "tcp"
            web = await self.listen(f"{kind}:0:interface={iface}", Site(Status()))
            hung = await self.listen(f"{kind}:0:interface={iface}",
                                     Factory.forProtocol(Silent))
            closed = free_port(host)
            self.assertTrue(await probe.check(host, web, None, 2), host)
            self.assertFalse(await probe.check(host, closed, None, 2), host)
            self.assertTrue(await probe.check(host, web, "/200", 2), host)
            self.assertTrue(await probe.check(host, web, "/302", 2), host)
            self.assertFalse(await probe.check(host, web, "/404", 2), host)
            self.assertFalse(await probe.check(host, web, "/500", 2), host)
            self.assertFalse(await probe.check(host, hung, "/", 0.5), host)
