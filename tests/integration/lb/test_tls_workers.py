"""TLS in every router process, and the TLS floor, on a real ``twistd epio --role=lb``.

A standalone router (``--routes``) with ``lb.workers = 2`` and ``lb.tls_listen``: HTTPS
requests on many connections are answered by the parent and by the worker (their
access-log lines tell them apart), with the certificate of ``lb.tls_cert_dir``.  A client
offering only TLS 1.1, or only a TLS 1.2 cipher without AEAD, gets no handshake; the same
client with an AEAD ECDHE cipher does.
"""

from __future__ import annotations

import http.client
import signal
import socket
import ssl
import time
import warnings

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.lb.tlsnode import HOST, start_tls_router


class TlsWorkerTests(SynchronousTestCase):
    def setUp(self) -> None:
        start_tls_router(self)

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def get(self, path: str, ctx: ssl.SSLContext | None = None) -> tuple[int, bytes]:
        ctx = ctx or self.context()
        sock = socket.create_connection(("127.0.0.1", self.tls_port), 5)
        conn = http.client.HTTPSConnection(HOST, self.tls_port, timeout=5, context=ctx)
        conn.sock = ctx.wrap_socket(sock, server_hostname=HOST)
        try:
            conn.request("GET", path)
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def test_every_worker_serves_tls_with_the_floor(self) -> None:
        """HTTPS connections are served by both router processes (SO_REUSEPORT), with the
        directory's certificate; TLS 1.1 and non-AEAD TLS 1.2 ciphers are refused."""
        for i in range(40):
            self.assertEqual(self.get(f"/hello.txt?n={i}"), (200, b"hello over tls\n"))
        deadline = time.monotonic() + 10
        while True:
            lines = [ln for ln in self.node.output().splitlines()
                     if "GET /hello.txt?n=" in ln and "status=200" in ln]
            by_worker = [ln for ln in lines if "worker 1: " in ln]
            if len(lines) >= 40 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        self.assertEqual(len(lines), 40, self.node.output()[-3000:])
        self.assertTrue(0 < len(by_worker) < 40,
                        f"{len(by_worker)} of 40 TLS requests served by the worker")

        old = self.context()
        with warnings.catch_warnings():  # deprecated: that is the point
            warnings.simplefilter("ignore", DeprecationWarning)
            old.minimum_version = ssl.TLSVersion.TLSv1
            old.maximum_version = ssl.TLSVersion.TLSv1_1
        old.set_ciphers("ALL:@SECLEVEL=0")
        with self.assertRaises(ssl.SSLError):
            self.get("/hello.txt", old)
        weak = self.context()
        weak.maximum_version = ssl.TLSVersion.TLSv1_2
        weak.set_ciphers("ECDHE-ECDSA-AES128-SHA")  # forward secret, but CBC: refused
        with self.assertRaises(ssl.SSLError):
            self.get("/hello.txt", weak)
        good = self.context()
        good.maximum_version = ssl.TLSVersion.TLSv1_2
        good.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256")
        self.assertEqual(self.get("/hello.txt", good)[0], 200)
        self.assertIn(self.node.stop(), (0, -signal.SIGTERM), self.node.output())
