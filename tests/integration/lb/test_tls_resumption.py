"""TLS session resumption with ``lb.workers = 2`` on a real ``twistd epio --role=lb``.

Each router process has its own session-ticket keys, so with the kernel's spread a
session resumes only on the process that issued it.  With ``lb.tls_affinity =
"client"`` a client address's connections all go to one process: every reconnection
with the session resumes, while two client addresses (127.0.0.1 and 127.0.0.2) are
served by the two processes (the access log's worker field tells them apart).
"""

from __future__ import annotations

import socket
import ssl
import time

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.lb.tlsnode import HOST, start_tls_router

ROUNDS = 24  # connections per client address (a random spread of 24 never lands on one side)


class ResumptionTests(SynchronousTestCase):
    def start(self, affinity: str) -> None:
        start_tls_router(self, f'tls_affinity = "{affinity}"\n')

    def connect_many(self, source: str) -> list[bool]:
        """ROUNDS HTTPS GETs from ``source``, each offering the session of the first:
        whether each was resumed (the first never is)."""
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        session = None
        reused = []
        for i in range(ROUNDS):
            raw = socket.create_connection(("127.0.0.1", self.tls_port), 5,
                                           source_address=(source, 0))
            with ctx.wrap_socket(raw, server_hostname=HOST, session=session) as s:
                s.sendall(f"GET /hello.txt?src={source}&n={i} HTTP/1.1\r\nHost: {HOST}\r\n"
                          f"Connection: close\r\n\r\n".encode())
                body = b""
                while chunk := s.recv(65536):
                    body += chunk
                self.assertTrue(body.startswith(b"HTTP/1.1 200"), body[:200])
                self.assertIn(b"hello over tls", body)
                reused.append(s.session_reused)
                if session is None:
                    session = s.session  # TLS 1.3: the ticket came with the response
        return reused

    def served_by(self, source: str) -> set[str]:
        """Which router processes ("parent", "worker 1") served ``source``'s GETs."""
        deadline = time.monotonic() + 10
        while True:
            lines = [ln for ln in self.node.output().splitlines()
                     if f"GET /hello.txt?src={source}&" in ln and "status=200" in ln]
            if len(lines) >= ROUNDS or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        self.assertEqual(len(lines), ROUNDS, self.node.output()[-3000:])
        return {"worker 1" if "worker 1: " in ln else "parent" for ln in lines}

    def test_client_affinity_resumes_every_session(self) -> None:
        """With lb.tls_affinity = "client", every reconnection after the first resumes,
        for two client addresses served by the two different processes."""
        self.start("client")
        self.assertIn("by client address (lb.tls_affinity)", self.node.output())
        seen = []
        for source in ("127.0.0.1", "127.0.0.2"):
            reused = self.connect_many(source)
            self.assertEqual(reused, [False] + [True] * (ROUNDS - 1), source)
            served = self.served_by(source)
            self.assertEqual(len(served), 1, f"{source} served by {served}")
            seen.append(served.pop())
        self.assertEqual(sorted(seen), ["parent", "worker 1"])

    def test_without_affinity_a_session_resumes_only_where_it_was_issued(self) -> None:
        """With the kernel's spread (the default), one client's connections land on
        both processes, and the ones on the other process get a full handshake — what
        lb.tls_affinity is for (docs/https.md)."""
        self.start("none")
        reused = self.connect_many("127.0.0.1")
        self.assertEqual(self.served_by("127.0.0.1"), {"parent", "worker 1"})
        self.assertIn(False, reused[1:])
        self.assertIn(True, reused[1:])
