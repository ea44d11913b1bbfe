"""Body limits of the api's real Site over real TCP connections."""

from __future__ import annotations

import json
import socket
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from epio.api.service import make_site
from tests.api.support import Harness


def exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


class BodyLimitTests(TestCase):
    timeout = 30

    async def _setup(self) -> None:
        self.h = Harness()
        await self.h.start()
        self.port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            make_site(self.h.api, 128 * 1024))
        self.addCleanup(self.port.stopListening)
        await self.h.store.create_app("big", (await self.h.store.get_user_by_name("alice")).id)

    def setUp(self) -> Any:
        self.addCleanup(lambda: ensureDeferred(self.h.stop()))
        return ensureDeferred(self._setup())

    async def test_huge_content_length_refused_at_once(self) -> None:
        """A 10 GB Content-Length is answered 413 (JSON) before any body is sent."""
        head = (f"POST /api/v1/apps/big/deploys HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {self.h.alice_token}\r\n"
                "Content-Type: application/gzip\r\nContent-Length: 10000000000\r\n\r\n")
        raw = await deferToThread(exchange, self.port.getHost().port, head.encode())
        status_line, _, rest = raw.partition(b"\r\n")
        self.assertEqual(status_line, b"HTTP/1.1 413 Payload Too Large")
        body = json.loads(rest.split(b"\r\n\r\n", 1)[1])
        self.assertEqual(body["error"]["code"], "payload_too_large")
        self.assertIn("the upload is 9.3 GiB; the limit is", body["error"]["message"])
        self.assertIn(".epioignore", body["error"]["message"])

    async def test_chunked_upload_over_limit(self) -> None:
        """A chunked upload that grows past the limit is refused with 413 and no deploy."""
        chunk = b"x" * 32768
        body = b"".join(b"%x\r\n" % len(chunk) + chunk + b"\r\n" for _ in range(8)) + b"0\r\n\r\n"
        head = (f"POST /api/v1/apps/big/deploys HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {self.h.alice_token}\r\nConnection: close\r\n"
                "Content-Type: application/gzip\r\nTransfer-Encoding: chunked\r\n\r\n")
        raw = await deferToThread(exchange, self.port.getHost().port, head.encode() + body)
        self.assertTrue(raw.startswith(b"HTTP/1.1 413 "), raw[:200])
        self.assertEqual(await self.h.store.list_deploys("big"), [])
