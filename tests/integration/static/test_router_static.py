"""Router and static file server over real sockets (IPv4 and IPv6): static paths are
answered by the runner's static server through the router with caching headers and
gzip; other paths reach the app; a client can neither forge X-Epio-Static through the
router nor read files by connecting to the static server itself."""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from epio.routing import Backend as RBackend
from epio.routing import Route
from epio.runner.build.images import ImageStore
from epio.runner.static import StaticServer, default_listen
from tests.integration.lb.helpers import Backend, get, request, start_router
from tests.static.helpers import Inst, Spec, make_image

SECRET = os.urandom(32)
DIGEST = "ab" * 32
CSS = b".button { border: 1px solid #333; padding: 4px; }\n" * 50


class RouterStaticTests(TestCase):
    timeout = 20

    async def setup(self, host: str = "127.0.0.1") -> tuple[int, Backend, StaticServer]:
        tmp = Path(tempfile.mkdtemp(prefix="epio-static-int-"))
        self.addCleanup(shutil.rmtree, tmp, True)
        data = tmp / "data"
        make_image(data / "images" / DIGEST, {"/static": "app/static"},
                   expires={"/static/img": 600},
                   files={"app/static/style.css": CSS, "app/static/img/a.gif": b"GIF89a"})
        server = StaticServer(
            reactor, SECRET, ImageStore(data, reactor=reactor), data,
            lambda: [Inst(Spec("hello", 3, DIGEST, os.getuid()))],
            listen=default_listen(host), advertise_host=host, uid_check=False)
        server.startService()
        self.addCleanup(server.stopService)
        for _ in range(100):
            if server.endpoint and server.releases:
                break
            await _sleep(0.02)
        self.assertTrue(server.endpoint and server.releases, "static server not ready")
        app = await Backend().start(host)
        self.addCleanup(app.stop)
        self.static_port = server.port.getHost().port
        route = Route("hello", ["hello.localhost"], [app.backend()],
                      static_prefixes=("/static",),
                      static_backends=(RBackend(host, self.static_port),))
        svc, port = await start_router([route], interface=host)
        svc.lb.static_secret = SECRET
        self.addCleanup(svc.stopService)
        return port, app, server

    async def check(self, host: str) -> None:
        port, app, server = await self.setup(host)
        # a static file, gzipped, with caching headers, through the router
        status, headers, body, c = await request(port, get(
            "hello.localhost", "/static/style.css",
            "Accept-Encoding: gzip\r\nX-Epio-Static: hello forged\r\n"), host=host)
        c.transport.loseConnection()
        self.assertEqual(status, 200)
        self.assertEqual(headers[b"content-encoding"], b"gzip")
        self.assertEqual(gzip.decompress(body), CSS)
        self.assertEqual(headers[b"cache-control"], b"public, max-age=3600")
        self.assertEqual(headers[b"content-type"], b"text/css; charset=utf-8")
        self.assertEqual(headers[b"vary"], b"Accept-Encoding")
        self.assertIn(b"epio", headers[b"via"])
        etag = headers[b"etag"].decode()
        self.assertEqual(_all_raw(app), b"", "the app process saw no static request")
        # revalidation: 304 through the router, no body
        status, headers, body, c = await request(port, get(
            "hello.localhost", "/static/style.css",
            f"Accept-Encoding: gzip\r\nIf-None-Match: {etag}\r\n"), host=host)
        c.transport.loseConnection()
        self.assertEqual((status, body), (304, b""))
        # expires-/static/img
        status, headers, body, c = await request(port, get(
            "hello.localhost", "/static/img/a.gif"), host=host)
        c.transport.loseConnection()
        self.assertEqual((status, body), (200, b"GIF89a"))
        self.assertEqual(headers[b"cache-control"], b"public, max-age=600")
        # a path outside the prefix goes to the app, without any X-Epio-Static
        status, headers, body, c = await request(port, get(
            "hello.localhost", "/staticky", "X-Epio-Static: hello forged\r\n"), host=host)
        c.transport.loseConnection()
        self.assertEqual(status, 200)
        self.assertEqual(headers[b"x-backend-port"], str(app.address[1]).encode())
        self.assertNotIn(b"x-epio-static", _all_raw(app).lower())
        # straight to the static server: no token, a forged one -> 403
        for extra in ("", "X-Epio-Static: hello " + "0" * 32 + "\r\n"):
            status, _, body, c = await request(self.static_port, get(
                "hello.localhost", "/static/style.css", extra), host=host)
            c.transport.loseConnection()
            self.assertEqual(status, 403)
            self.assertNotIn(b"border", body)

    async def test_static_through_router_ipv4(self) -> None:
        """Over IPv4: gzip, Cache-Control, ETag/304, expires-/path through the router;
        forged headers neither reach the app nor open the static server."""
        await self.check("127.0.0.1")

    async def test_static_through_router_ipv6(self) -> None:
        """The same over IPv6 (router, app and static server on ::1)."""
        await self.check("::1")


def _all_raw(app: Backend) -> bytes:
    return app.all_raw()


async def _sleep(seconds: float) -> Any:
    from twisted.internet import task

    await task.deferLater(reactor, seconds, lambda: None)
