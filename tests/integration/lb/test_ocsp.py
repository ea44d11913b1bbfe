"""OCSP stapling on a real ``twistd epio --role=lb`` against a real OCSP responder.

A test CA (made here) signs two certificates of ``lb.tls_cert_dir``: one naming an
OCSP responder (``openssl ocsp`` serving the CA's index on loopback), one naming
none.  With ``lb.workers = 2`` every router process fetches the response and staples
it: handshakes served by both processes (their access-log lines tell them apart)
carry a response, signed by the CA, saying "good" for that certificate's serial.
The certificate without an OCSP URL is served, with nothing stapled.
"""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import ocsp
from OpenSSL import SSL
from twisted.trial.unittest import SynchronousTestCase

from tests.certs.test_ocsp import OcspCA
from tests.util import NodeProcess, free_port, wait_for_port

STAPLED = "a.example.com"
BARE = "b.example.com"


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


class OcspStaplingTests(SynchronousTestCase):
    def setUp(self) -> None:
        if shutil.which("openssl") is None:
            self.skipTest("needs the openssl command (Debian: openssl)")
        self.tmp = Path(self.mktemp()).absolute()
        certs = self.tmp / "certs"
        certs.mkdir(parents=True)
        (self.tmp / "www").mkdir()
        (self.tmp / "www" / "hello.txt").write_text("hello\n")
        bport = free_port()
        backend = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(bport), "--bind", "127.0.0.1"],
            cwd=self.tmp / "www", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(lambda: (backend.kill(), backend.wait()))

        ocsp_port = free_port()
        ca = OcspCA(now=time.time())
        self.ca = ca
        leaf, key = ca.leaf(STAPLED, url=f"http://127.0.0.1:{ocsp_port}/")
        bare, bare_key = ca.leaf(BARE, url=None)
        self.serial = leaf.serial_number
        for host, cert, k in ((STAPLED, leaf, key), (BARE, bare, bare_key)):
            (certs / f"{host}.pem").write_bytes(
                k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()) + pem(cert) + pem(ca.cert))
        # the responder's database: openssl ca's index.txt format
        expiry = leaf.not_valid_after_utc.strftime("%y%m%d%H%M%SZ")
        lines = [f"V\t{expiry}\t\t{c.serial_number:X}\tunknown\t/CN={h}\n"
                 for h, c in ((STAPLED, leaf), (BARE, bare))]
        (self.tmp / "index.txt").write_text("".join(lines))
        (self.tmp / "ca.pem").write_bytes(pem(ca.cert))
        (self.tmp / "ca.key").write_bytes(ca.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        responder_log = self.tmp / "ocsp.log"
        with responder_log.open("wb") as out:
            responder = subprocess.Popen(
                ["openssl", "ocsp", "-index", "index.txt", "-port", str(ocsp_port), "-rsigner",
                 "ca.pem", "-rkey", "ca.key", "-CA", "ca.pem", "-ndays", "1", "-ignore_err"],
                cwd=self.tmp, stdout=out, stderr=subprocess.STDOUT)
        self.addCleanup(lambda: (responder.kill(), responder.wait()))
        wait_for_port("127.0.0.1", bport)
        # not wait_for_port: openssl's responder serves one connection at a time and
        # hangs on a connection that sends nothing
        deadline = time.monotonic() + 10
        while b"waiting for OCSP client connections" not in responder_log.read_bytes():
            self.assertIsNone(responder.poll(), responder_log.read_text())
            self.assertLess(time.monotonic(), deadline, responder_log.read_text())
            time.sleep(0.05)

        routes = self.tmp / "routes.toml"
        routes.write_text(f'[apps.hello]\nhostnames = ["{STAPLED}", "{BARE}"]\n'
                          f'backends = ["127.0.0.1:{bport}"]\n')
        self.tls_port = free_port()
        config = (f'[lb]\nworkers = 2\ntls_listen = "tcp:{self.tls_port}:interface=127.0.0.1"\n'
                  f'tls_cert_dir = "{certs}"\n')
        self.node = NodeProcess(["--role=lb", "--routes", str(routes), "--lb-listen",
                                 f"tcp:{free_port()}:interface=127.0.0.1"],
                                data_dir=self.tmp / "data", config=config)
        self.addCleanup(self.node.cleanup)

    def handshake(self, host: str, n: int) -> bytes:
        """One HTTPS GET to ``host`` asking for the certificate status: the stapled OCSP
        bytes (empty when none), after checking the answer is 200."""
        got: list[bytes] = []

        def on_status(conn: SSL.Connection, data: bytes, _: Any) -> bool:
            got.append(data)
            return True

        ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
        ctx.set_ocsp_client_callback(on_status)
        sock = socket.create_connection(("127.0.0.1", self.tls_port), 5)
        sock.settimeout(None)  # pyOpenSSL wants a blocking socket; reads time out by
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 5, 0))
        conn = SSL.Connection(ctx, sock)
        conn.set_tlsext_host_name(host.encode())
        conn.request_ocsp()
        conn.set_connect_state()
        try:
            conn.do_handshake()
            conn.sendall(f"GET /hello.txt?n={n} HTTP/1.1\r\nHost: {host}\r\n"
                         f"Connection: close\r\n\r\n".encode())
            body = b""
            while True:
                try:
                    chunk = conn.recv(65536)
                except (SSL.ZeroReturnError, SSL.SysCallError):
                    break
                if not chunk:
                    break
                body += chunk
        finally:
            sock.close()
        self.assertTrue(body.startswith(b"HTTP/1.1 200"), body[:200])
        self.assertEqual(len(got), 1)
        return got[0]

    def test_every_process_staples_the_responders_answer(self) -> None:
        """Both router processes staple a response the CA signed, "good" for the
        certificate's serial; the certificate without an OCSP URL gets none."""
        deadline = time.monotonic() + 40
        # every process logs its fetch once it has the response
        while self.node.output().count(f"OCSP response for {STAPLED} stapled") < 2:
            self.assertLess(time.monotonic(), deadline, self.node.output()[-3000:])
            time.sleep(0.2)
        while self.node.output().count("router listening on") < 4:  # 2 ports x 2 processes
            self.assertLess(time.monotonic(), deadline, self.node.output()[-3000:])
            time.sleep(0.1)
        for i in range(30):
            der = self.handshake(STAPLED, i)
            self.assertTrue(der, f"connection {i}: nothing stapled")
            resp = ocsp.load_der_ocsp_response(der)
            self.assertEqual(resp.response_status, ocsp.OCSPResponseStatus.SUCCESSFUL)
            self.assertEqual(resp.serial_number, self.serial)
            self.assertEqual(resp.certificate_status, ocsp.OCSPCertStatus.GOOD)
            self.assertTrue(resp.next_update_utc)
        self.assertEqual(self.handshake(BARE, 99), b"")
        deadline = time.monotonic() + 10
        while True:
            lines = [ln for ln in self.node.output().splitlines()
                     if "GET /hello.txt?n=" in ln and "status=200" in ln]
            if len(lines) >= 31 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        by_worker = [ln for ln in lines if "worker 1: " in ln]
        self.assertEqual(len(lines), 31, self.node.output()[-3000:])
        self.assertTrue(0 < len(by_worker) < 31,
                        f"{len(by_worker)} of 31 TLS requests served by the worker")
        self.assertNotIn("Traceback", self.node.output())
