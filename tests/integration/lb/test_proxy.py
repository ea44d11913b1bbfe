"""The router against real backends over real sockets: routing, balancing,
keep-alive pools, HTTP/1.1 semantics, headers, errors and timeouts."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectionRefusedError
from twisted.trial.unittest import TestCase

from epio.routing import Backend as RBackend
from epio.routing import Route

from .helpers import (
    Backend,
    get,
    raw_client,
    request,
    simple_route,
    sleep,
    start_router,
    wait_until,
)


class RouterTestCase(TestCase):
    timeout = 20

    async def router(self, routes: list[Route], **kw: Any) -> int:
        svc, port = await start_router(routes, **kw)
        self.addCleanup(svc.stopService)
        self.svc = svc
        return port

    async def backend(self, interface: str = "127.0.0.1") -> Backend:
        b = await Backend().start(interface)
        self.addCleanup(b.stop)
        return b

    def client_cleanup(self, c: Any) -> None:
        self.addCleanup(lambda: c.transport.abortConnection() if not c.closed else None)


class RoutingTests(RouterTestCase):
    async def test_routes_by_host_exact_wildcard_and_platform_domain(self) -> None:
        """Exact host, the longest wildcard and <app>.<domain> reach the right app; unknown is 404."""
        b1, b2, b3 = await self.backend(), await self.backend(), await self.backend()
        port = await self.router([
            simple_route("one", b1, hostnames=("www.example.com",)),
            simple_route("two", b2, hostnames=("*.example.com",)),
            simple_route("three", b3, hostnames=("*.deep.example.com",)),
        ], domain="apps.test")
        for host, b in [("WWW.Example.com.:80", b1), ("x.example.com", b2),
                        ("a.deep.example.com", b3), ("one.apps.test", b1)]:
            status, headers, body, c = await request(port, get(host))
            self.client_cleanup(c)
            self.assertEqual(status, 200, host)
            self.assertEqual(int(headers[b"x-backend-port"]), b.address[1], host)
        status, headers, body, c = await request(port, get("nope.example.org"))
        self.client_cleanup(c)
        self.assertEqual(status, 404)
        self.assertIn(b"<html", body)
        status, headers, body, c = await request(port, get("nope.org", extra="Accept: application/json\r\n"))
        self.client_cleanup(c)
        self.assertEqual(json.loads(body)["error"]["code"], "no_route")
        self.assertEqual(headers[b"content-type"], b"application/json")

    async def test_maintenance_and_no_backend(self) -> None:
        """Maintenance answers a 503 page; an app without healthy backends 503s at once."""
        b = await self.backend()
        port = await self.router([
            simple_route("m", b, maintenance=True),
            Route("empty", ["empty.example.com"], []),
            Route("draining", ["draining.example.com"], [b.backend(state="draining")]),
        ])
        for host, code in [("m.example.com", "maintenance"), ("empty.example.com", "no_backend"),
                           ("draining.example.com", "no_backend")]:
            status, _, body, c = await request(port, get(host, extra="Accept: application/json\r\n"))
            self.client_cleanup(c)
            self.assertEqual(status, 503)
            self.assertEqual(json.loads(body)["error"]["code"], code)
        self.assertEqual(b.requests, [])

    async def test_route_table_swap_applies_to_next_request(self) -> None:
        """Replacing the routes moves the next request to the new backend, same connection."""
        b1, b2 = await self.backend(), await self.backend()
        port = await self.router([simple_route("a", b1)])
        c = await raw_client(port)
        self.client_cleanup(c)
        c.send(get("a.example.com"))
        self.assertEqual((await c.response())[0], 200)
        self.svc.route_source.set([simple_route("a", b2)])  # type: ignore[union-attr]
        c.send(get("a.example.com"))
        status, headers, _ = await c.response()
        self.assertEqual(int(headers[b"x-backend-port"]), b2.address[1])


class KeepAliveTests(RouterTestCase):
    async def test_backend_connections_are_pooled(self) -> None:
        """Many requests over several client connections reuse one backend connection."""
        b = await self.backend()
        port = await self.router([simple_route("a", b)])
        for _ in range(3):
            c = await raw_client(port)
            self.client_cleanup(c)
            for _ in range(5):
                c.send(get("a.example.com"))
                self.assertEqual((await c.response())[0], 200)
        self.assertEqual(len(b.requests), 15)
        self.assertEqual(len(b.connections), 1)
        self.assertEqual(b.requests[0].request_line, b"GET / HTTP/1.1")

    async def test_pool_idle_timeout_closes_backend_connection(self) -> None:
        """An idle pooled connection is closed after lb.pool_idle_timeout."""
        b = await self.backend()
        port = await self.router([simple_route("a", b)], pool_idle_timeout=0.3)
        _, _, _, c = await request(port, get("a.example.com"))
        self.client_cleanup(c)
        self.assertEqual(b.open, 1)
        await wait_until(lambda: b.open == 0, 3, "pooled connection closed")

    async def test_stale_pooled_connection_retried_once_for_idempotent(self) -> None:
        """A GET on a pooled connection the backend closed (no byte sent) is retried and succeeds."""
        b = await self.backend()
        port = await self.router([simple_route("a", b)])
        c = await raw_client(port)
        self.client_cleanup(c)
        c.send(get("a.example.com"))
        await c.response()
        # the backend drops the pooled connection just as the next request arrives
        c.send(get("a.example.com", "/drop"))
        status, _, _ = await c.response()
        self.assertEqual(status, 502)  # /drop drops every time: retried once, then 502
        self.assertEqual([r.target for r in b.requests], [b"/", b"/drop", b"/drop"])
        c.send(b"POST /drop HTTP/1.1\r\nHost: a.example.com\r\nContent-Length: 0\r\n\r\n")
        status, _, _ = await c.response()
        self.assertEqual(status, 502)
        self.assertEqual(len(b.requests), 4, "a POST is never retried")

    async def test_pipelined_requests_answered_in_order(self) -> None:
        """Pipelined requests (slow first) are answered in order on one connection."""
        b = await self.backend()
        port = await self.router([simple_route("a", b)])
        c = await raw_client(port)
        self.client_cleanup(c)
        c.send(get("a.example.com", "/slow?0.2") + get("a.example.com", "/one")
               + b"POST /two HTTP/1.1\r\nHost: a.example.com\r\nContent-Length: 3\r\n\r\nabc"
               + get("a.example.com", "/three"))
        bodies = [(await c.response())[2] for _ in range(4)]
        self.assertEqual(bodies, [b"ok GET /slow?0.2 0", b"ok GET /one 0", b"ok POST /two 3",
                                  b"ok GET /three 0"])

    async def test_http10_client(self) -> None:
        """An HTTP/1.0 client gets its response and the connection closes."""
        b = await self.backend()
        port = await self.router([simple_route("a", b)])
        status, headers, body, c = await request(port, b"GET /x HTTP/1.0\r\nHost: a.example.com\r\n\r\n")
        self.assertEqual((status, body), (200, b"ok GET /x 0"))
        await c.lost
        status, headers, body, c = await request(
            port, b"GET /chunked HTTP/1.0\r\nHost: a.example.com\r\nConnection: keep-alive\r\n\r\n")
        await c.lost
        self.assertEqual(body, b"hello world")
        self.assertNotIn(b"transfer-encoding", headers)


class BalancingTests(RouterTestCase):
    async def test_least_outstanding_spreads_concurrent_requests(self) -> None:
        """Concurrent slow requests spread evenly over the backends."""
        bs = [await self.backend() for _ in range(3)]
        port = await self.router([simple_route("a", *bs)])
        clients = []
        for _ in range(6):
            c = await raw_client(port)
            self.client_cleanup(c)
            c.send(get("a.example.com", "/slow?0.3"))
            clients.append(c)
        for c in clients:
            self.assertEqual((await c.response())[0], 200)
        self.assertEqual(sorted(len(b.requests) for b in bs), [2, 2, 2])

    async def test_connect_failure_goes_to_next_backend(self) -> None:
        """A refused backend is skipped: the request succeeds on the next one."""
        good = await self.backend()
        dead = await self.backend()
        dead_backend = dead.backend()
        await defer.maybeDeferred(dead.port.stopListening)
        port = await self.router([Route("a", ["a.example.com"], [dead_backend, good.backend()])])
        for _ in range(4):
            status, _, _, c = await request(port, get("a.example.com"))
            self.client_cleanup(c)
            self.assertEqual(status, 200)

    async def test_all_refused_is_502_backend_refused(self) -> None:
        """When every attempt is refused the client gets 502 backend_refused."""
        dead = await self.backend()
        be = dead.backend()
        await defer.maybeDeferred(dead.port.stopListening)
        port = await self.router([Route("a", ["a.example.com"], [be])])
        status, _, body, c = await request(port, get("a.example.com", extra="Accept: application/json\r\n"))
        self.client_cleanup(c)
        self.assertEqual(status, 502)
        self.assertEqual(json.loads(body)["error"]["code"], "backend_refused")
        self.assertEqual(self.svc.lb.observer.totals.get("backend_refused"), 1)

    async def test_passive_ejection(self) -> None:
        """After eject_after failures a backend is ejected and the app's other backend
        takes every request (one backend alone is never ejected: tests/lb/test_proxy.py
        and tests/integration/e2e/test_router_edge.py)."""
        dead = await self.backend()
        be = dead.backend()
        await defer.maybeDeferred(dead.port.stopListening)
        live = await self.backend()
        port = await self.router([Route("a", ["a.example.com"], [be, live.backend()])],
                                 eject_after=2, eject_seconds=30, connect_attempts=1)
        statuses = []
        while statuses.count(502) < 2:
            status, _, _, c = await request(port, get("a.example.com"))
            self.client_cleanup(c)
            statuses.append(status)
            self.assertLess(len(statuses), 10, statuses)
        for _ in range(6):
            status, _, _, c = await request(port, get("a.example.com"))
            self.client_cleanup(c)
            self.assertEqual(status, 200)
        self.assertNotIn("no_backend", self.svc.lb.observer.totals)

    async def test_concurrency_cap_and_bounded_queue(self) -> None:
        """Past backend_max_conns requests queue; past the queue they get 503 at once."""
        b = await self.backend()
        port = await self.router([simple_route("a", b)], backend_max_conns=1, backend_queue_size=1)
        c1, c2, c3 = await raw_client(port), await raw_client(port), await raw_client(port)
        for c in (c1, c2, c3):
            self.client_cleanup(c)
        c1.send(get("a.example.com", "/slow?0.3"))
        await wait_until(lambda: len(b.requests) == 1)
        c2.send(get("a.example.com", "/q"))
        await sleep(0.05)
        c3.send(get("a.example.com", "/over"))
        self.assertEqual((await c3.response())[0], 503)
        self.assertEqual((await c1.response())[0], 200)
        self.assertEqual((await c2.response())[2], b"ok GET /q 0")
        self.assertEqual([r.target for r in b.requests], [b"/slow?0.3", b"/q"])


class HTTPSemanticsTests(RouterTestCase):
    async def test_chunked_both_ways(self) -> None:
        """A chunked upload is buffered and reaches the backend with its Content-Length
        (extensions and trailers gone); a chunked response streams back."""
        b = await self.backend()
        port = await self.router([simple_route("a", b)])
        status, _, body, c = await request(
            port, b"POST /up HTTP/1.1\r\nHost: a.example.com\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"3;x=y\r\nabc\r\n2\r\nde\r\n0\r\nX-T: 1\r\n\r\n")
        self.client_cleanup(c)
        self.assertEqual(body, b"ok POST /up 5")
        raw = b.all_raw()
        self.assertIn(b"\r\nContent-Length: 5\r\n", raw)
        self.assertNotIn(b"chunked", raw.lower())
        self.assertTrue(raw.endswith(b"\r\n\r\nabcde"))
        c.send(get("a.example.com", "/chunked"))
        status, headers, body = await c.response()
        self.assertEqual((headers[b"transfer-encoding"], body), (b"chunked", b"hello world"))

    async def test_chunked_streamed_when_buffering_is_off(self) -> None:
        """With request_buffering off for the app, a chunked upload is re-framed chunk
        by chunk (extensions and trailers dropped) and streamed as it comes."""
        b = await self.backend()
        port = await self.router([simple_route("a", b, request_buffering=False)])
        status, _, body, c = await request(
            port, b"POST /up HTTP/1.1\r\nHost: a.example.com\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"3;x=y\r\nabc\r\n2\r\nde\r\n0\r\nX-T: 1\r\n\r\n")
        self.client_cleanup(c)
        self.assertEqual(body, b"ok POST /up 5")
        self.assertIn(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n", b.all_raw())

    async def test_close_delimited_response_becomes_chunked(self) -> None:
        """A close-delimited backend response reaches a 1.1 client chunked, connection kept."""
        b = await self.backend()
        port = await self.router([simple_route("a", b)])
        c = await raw_client(port)
        self.client_cleanup(c)
        c.send(get("a.example.com", "/close"))
        status, headers, body = await c.response()
        self.assertEqual((body, headers[b"transfer-encoding"]), (b"until-close body", b"chunked"))
        c.send(get("a.example.com", "/after"))
        self.assertEqual((await c.response())[2], b"ok GET /after 0")

    async def test_head_204_304_have_no_body(self) -> None:
        """HEAD, 204 and 304 responses carry no body and the connection stays usable."""
        b = await self.backend()
        port = await self.router([simple_route("a", b)])
        c = await raw_client(port)
        self.client_cleanup(c)
        c.send(b"HEAD /h HTTP/1.1\r\nHost: a.example.com\r\n\r\n")
        status, headers, _ = await c.response(head_only=True)
        self.assertEqual(headers[b"content-length"], b"12")  # len(b"ok HEAD /h 0")
        c.send(get("a.example.com", "/204"))
        self.assertEqual((await c.response())[0], 204)
        c.send(get("a.example.com", "/304"))
        self.assertEqual((await c.response())[0], 304)
        c.send(get("a.example.com", "/last"))
        status, _, body = await c.response()
        self.assertEqual(body, b"ok GET /last 0")
        self.assertEqual(c.data, b"")

    async def test_expect_100_continue(self) -> None:
        """Expect: 100-continue gets an interim 100 before the body is sent; 413 when too big."""
        b = await self.backend()
        port = await self.router([simple_route("a", b, max_body_size=10)])
        c = await raw_client(port)
        self.client_cleanup(c)
        c.send(b"PUT /p HTTP/1.1\r\nHost: a.example.com\r\nContent-Length: 5\r\n"
               b"Expect: 100-continue\r\n\r\n")
        status, _, _ = await c.response()
        self.assertEqual(status, 100)
        c.send(b"hello")
        self.assertEqual((await c.response())[2], b"ok PUT /p 5")
        self.assertFalse(b.saw_expect)
        status, headers, _, c2 = await request(
            port, b"PUT /p HTTP/1.1\r\nHost: a.example.com\r\nContent-Length: 50\r\n"
                  b"Expect: 100-continue\r\n\r\n")
        self.assertEqual(status, 413)
        await c2.lost

    async def test_413_reaches_a_client_still_sending(self) -> None:
        """A client pushing a body over the limit still reads the whole 413 (lingering close)."""
        b = await self.backend()
        port = await self.router([simple_route("a", b, max_body_size=1000)])
        c = await raw_client(port)
        c.send(b"POST /x HTTP/1.1\r\nHost: a.example.com\r\nContent-Length: 4000000\r\n\r\n"
               + b"y" * 4000000)
        status, headers, body = await c.response()
        self.assertEqual((status, headers.get(b"connection")), (413, b"close"))
        self.assertIn(b"too large", body)
        await c.lost
        self.assertEqual(b.requests, [])

    async def test_body_over_limit_chunked_is_413(self) -> None:
        """A chunked body that grows past the app's limit is refused with 413."""
        b = await self.backend()
        port = await self.router([simple_route("a", b, max_body_size=4)])
        status, _, _, c = await request(
            port, b"POST /x HTTP/1.1\r\nHost: a.example.com\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"5\r\nhello\r\n0\r\n\r\n")
        self.assertEqual(status, 413)
        await c.lost

    async def test_websocket_upgrade_tunnel(self) -> None:
        """An Upgrade request tunnels after 101; bytes pass both ways; idle tunnels close."""
        b = await self.backend()
        port = await self.router([simple_route("a", b)], websocket_idle_timeout=0.6)
        c = await raw_client(port)
        self.client_cleanup(c)
        c.send(b"GET /ws HTTP/1.1\r\nHost: a.example.com\r\nConnection: Upgrade\r\n"
               b"Upgrade: websocket\r\nSec-WebSocket-Key: x\r\n\r\n")
        status, headers, _ = await c.response()
        self.assertEqual((status, headers[b"upgrade"]), (101, b"websocket"))
        self.assertEqual(b.requests[0].get(b"upgrade"), b"websocket")
        c.send(b"frame-1")
        await wait_until(lambda: c.data == b"echo:frame-1")
        await c.lost  # closed by the tunnel idle timeout


class HeaderTests(RouterTestCase):
    async def test_forwarded_headers_and_request_id(self) -> None:
        """X-Forwarded-*, X-Request-Start and Via are set; spoofed values from untrusted peers are dropped."""
        b = await self.backend()
        port = await self.router([simple_route("a", b)])
        _, _, _, c = await request(port, get("a.example.com", extra=(
            "X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: https\r\nX-Request-Id: short\r\n"
            "Connection: X-Drop\r\nX-Drop: 1\r\nKeep-Alive: 1\r\nTE: trailers\r\n")))
        self.client_cleanup(c)
        r = b.requests[0]
        self.assertEqual(r.all(b"x-forwarded-for"), [b"127.0.0.1"])
        self.assertEqual(r.get(b"x-forwarded-proto"), b"http")
        self.assertEqual(r.get(b"x-forwarded-port"), str(port).encode())
        self.assertEqual(r.get(b"via"), b"1.1 epio")
        self.assertTrue(r.get(b"x-request-start").startswith(b"t="))  # type: ignore[union-attr]
        rid = r.get(b"x-request-id")
        self.assertNotEqual(rid, b"short")
        self.assertGreaterEqual(len(rid), 20)  # type: ignore[arg-type]
        for h in (b"x-drop", b"keep-alive", b"te", b"connection"):
            self.assertIsNone(r.get(h), h)
        good = "abcdefghij0123456789-xyz"
        _, _, _, c = await request(port, get("a.example.com", extra=f"X-Request-Id: {good}\r\n"))
        self.client_cleanup(c)
        self.assertEqual(b.requests[1].get(b"x-request-id"), good.encode())

    async def test_trusted_proxy_values_kept(self) -> None:
        """From a trusted proxy the client's X-Forwarded-For is extended and its proto kept."""
        b = await self.backend()
        port = await self.router([simple_route("a", b)], trusted_proxies=["127.0.0.1"])
        _, _, _, c = await request(port, get("a.example.com", extra=(
            "X-Forwarded-For: 10.0.0.1\r\nX-Forwarded-Proto: https\r\n")))
        self.client_cleanup(c)
        r = b.requests[0]
        self.assertEqual(r.get(b"x-forwarded-for"), b"10.0.0.1, 127.0.0.1")
        self.assertEqual(r.get(b"x-forwarded-proto"), b"https")

    async def test_response_hop_by_hop_stripped(self) -> None:
        """Hop-by-hop and Connection-named response headers do not reach the client."""
        b = await self.backend()
        port = await self.router([simple_route("a", b)])
        _, headers, body, c = await request(port, get("a.example.com", "/hop"))
        self.client_cleanup(c)
        self.assertEqual(body, b"ok")
        self.assertNotIn(b"x-secret", headers)
        self.assertNotIn(b"keep-alive", headers)


class TimeoutTests(RouterTestCase):
    async def test_first_byte_timeout_is_504(self) -> None:
        """A backend that never answers gives 504 after the (per-app) first-byte timeout."""
        b = await self.backend()
        port = await self.router([simple_route("a", b, first_byte_timeout=0.5)])
        t0 = self.svc.reactor.seconds()
        status, _, body, c = await request(port, get("a.example.com", "/hang", "Accept: application/json\r\n"))
        self.assertEqual(status, 504)
        self.assertEqual(json.loads(body)["error"]["code"], "timeout")
        self.assertLess(self.svc.reactor.seconds() - t0, 2.0)

    async def test_header_timeout_is_408_and_idle_keepalive_closes(self) -> None:
        """A half-sent head gets 408; an idle kept-alive connection is closed silently."""
        b = await self.backend()
        port = await self.router([simple_route("a", b)], header_timeout=0.4, keepalive_timeout=0.4)
        c = await raw_client(port)
        c.send(b"GET / HTTP/1.1\r\nHost: a.exa")
        status, _, _ = await c.response()
        self.assertEqual(status, 408)
        await c.lost
        c = await raw_client(port)
        c.send(get("a.example.com"))
        await c.response()
        await c.lost
        self.assertEqual(c.data, b"")

    async def test_backend_closes_without_response(self) -> None:
        """A fresh connection closed without a response is 502 backend_closed."""
        b = await self.backend()
        port = await self.router([simple_route("a", b)])
        status, _, body, c = await request(port, get("a.example.com", "/drop", "Accept: application/json\r\n"))
        self.client_cleanup(c)
        self.assertEqual((status, json.loads(body)["error"]["code"]), (502, "backend_closed"))

    async def test_client_closed_first_is_logged(self) -> None:
        """A client that leaves before the answer is counted as client_closed."""
        b = await self.backend()
        port = await self.router([simple_route("a", b)])
        c = await raw_client(port)
        c.send(get("a.example.com", "/hang"))
        await wait_until(lambda: len(b.requests) == 1)
        c.transport.loseConnection()
        await wait_until(lambda: self.svc.lb.observer.totals.get("client_closed") == 1)
        await wait_until(lambda: b.open == 0, what="backend connection closed too")


class IPv6Tests(RouterTestCase):
    async def test_ipv6_listener_and_backend(self) -> None:
        """A router on ::1 proxies to a backend on ::1."""
        b = await self.backend("::1")
        port = await self.router([simple_route("a", b)], interface="::1")
        status, _, body, c = await request(port, get("a.example.com"), host="::1")
        self.client_cleanup(c)
        self.assertEqual((status, body), (200, b"ok GET / 0"))
        self.assertEqual(b.requests[0].get(b"x-forwarded-for"), b"::1")


class GracefulStopTests(RouterTestCase):
    async def test_stop_finishes_in_flight_then_closes(self) -> None:
        """On stop the listener closes, idle clients go, an in-flight request completes."""
        b = await self.backend()
        svc, port = await start_router([simple_route("a", b)])
        idle = await raw_client(port)
        busy = await raw_client(port)
        busy.send(get("a.example.com", "/slow?0.3"))
        await wait_until(lambda: len(b.requests) == 1)
        d = svc.stopService()
        await idle.lost
        status, headers, body = await busy.response()
        self.assertEqual((status, headers.get(b"connection")), (200, b"close"))
        await d
        await busy.lost
        with self.assertRaises(ConnectionRefusedError):
            await raw_client(port)

    async def test_stop_order(self) -> None:
        """LBService stops in its drawn order: the listener first, then the in-flight
        requests drain with routes still followed, then the route source stops."""
        b = await self.backend()
        svc, port = await start_router([simple_route("a", b)])
        busy = await raw_client(port)
        busy.send(get("a.example.com", "/slow?0.3"))
        await wait_until(lambda: len(b.requests) == 1)
        d = svc.stopService()
        await wait_until(lambda: not svc.ports, what="listener closed")
        with self.assertRaises(ConnectionRefusedError):
            await raw_client(port)
        self.assertFalse(d.called)  # still draining
        self.assertIsNotNone(svc.route_source.table)  # routes followed while draining
        status, _, _ = await busy.response()
        self.assertEqual(status, 200)
        await d
        self.assertIsNone(svc.route_source.table)
        self.assertFalse(svc.children.running)


del RBackend
