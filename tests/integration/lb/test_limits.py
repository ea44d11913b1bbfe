"""Per-listener connection limits on real sockets: the router and the api stop
accepting at max_connections (new connections wait in the kernel's backlog, they are
not refused) and serve them as soon as one closes."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.trial.unittest import TestCase

from epio.api.service import make_site
from epio.listen import ConnectionLimit, LimitedEndpoint

from .helpers import Backend, get, raw_client, simple_route, sleep, start_router, wait_until


class ConnectionLimitTests(TestCase):
    timeout = 30

    async def test_router_waits_at_max_connections(self) -> None:
        """With max_connections = 3, three idle clients hold the listener; a fourth
        connects (backlog) but is served only once one of them closes."""
        b = await Backend().start()
        self.addCleanup(b.stop)
        svc, port = await start_router([simple_route("a", b)], max_connections=3)
        self.addCleanup(svc.stopService)
        held = [await raw_client(port) for _ in range(3)]
        for c in held:
            self.addCleanup(c.transport.abortConnection)
        await wait_until(lambda: svc.limit.open == 3)
        self.assertTrue(svc.limit.paused)
        fourth = await raw_client(port)  # the kernel completes the handshake
        self.addCleanup(fourth.transport.abortConnection)
        fourth.send(get("a.example.com"))
        await sleep(0.5)
        self.assertEqual((fourth.data, svc.limit.open), (b"", 3), "not accepted yet")
        held[0].transport.loseConnection()
        status, _, body = await fourth.response()
        self.assertEqual((status, body), (200, b"ok GET / 0"))
        self.assertEqual(svc.limit.refused, 0)
        from prometheus_client.parser import text_string_to_metric_families

        from epio.lb.service import listener_families
        from epio.metrics import MetricsRegistry

        reg = MetricsRegistry()
        reg.add_collector(lambda: listener_families(svc))
        fams = {f.name: {s.labels.get("listener"): s.value for s in f.samples}
                for f in text_string_to_metric_families(reg.render().decode())}
        # paused at 3, resumed at 2, paused again when the fourth came in
        self.assertEqual(fams["epio_lb_listener_paused"]["http"], 2.0)
        self.assertEqual(fams["epio_lb_connections_open"]["http"], 3.0)
        self.assertEqual(fams["epio_lb_request_bodies_spooled"], {None: 0.0})

    async def test_api_waits_at_max_connections(self) -> None:
        """The api's listener (LimitedEndpoint + make_site, as ApiService wires them)
        behaves the same."""
        from tests.api.support import Harness

        h = Harness()
        await h.start()
        self.addCleanup(lambda: defer.ensureDeferred(h.stop()))
        limit = ConnectionLimit("api", 2)
        ep = LimitedEndpoint(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"), limit)
        p: Any = await ep.listen(make_site(h.api, 1 << 20, limit=limit))
        self.addCleanup(p.stopListening)
        port = p.getHost().port
        held = [await raw_client(port) for _ in range(2)]
        for c in held:
            self.addCleanup(c.transport.abortConnection)
        await wait_until(lambda: limit.open == 2)
        third = await raw_client(port)
        self.addCleanup(third.transport.abortConnection)
        third.send(b"GET /api/v1/openapi.json HTTP/1.1\r\nHost: x\r\n\r\n")
        await sleep(0.5)
        self.assertEqual(third.data, b"")
        held[1].transport.loseConnection()
        status, _, _ = await third.response()
        self.assertEqual(status, 200)
