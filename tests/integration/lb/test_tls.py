"""The TLS listener: a certificate per hostname chosen by SNI, reloaded without restart."""

from __future__ import annotations

import datetime
import socket
import ssl
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from epio.config import load_config
from epio.lb.service import LBService
from epio.routing import StaticRouteSource

from .helpers import Backend, simple_route


def write_cert(path: Path, *names: str) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False)
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption())
        + cert.public_bytes(serialization.Encoding.PEM))


def tls_get(port: int, sni: str, host: str) -> tuple[str, bytes]:
    """Blocking HTTPS GET; returns the served certificate's CN and the response."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=sni) as s:
            der = s.getpeercert(binary_form=True)
            cn = x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(
                NameOID.COMMON_NAME)[0].value
            s.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
    return str(cn), data


class TLSTests(TestCase):
    timeout = 30

    async def test_sni_certificates_and_reload(self) -> None:
        """Each SNI name gets its certificate (wildcards too); new files are used without restart."""
        certs = Path(self.mktemp())
        certs.mkdir()
        write_cert(certs / "a.example.com.pem", "a.example.com")
        write_cert(certs / "_wildcard.w.example.com.pem", "*.w.example.com")
        write_cert(certs / "default.pem", "default.invalid")
        b = await Backend().start()
        self.addCleanup(b.stop)
        section: dict[str, Any] = {"listen": "tcp:0:interface=127.0.0.1", "access_log": "off",
                                   "tls_listen": "tcp:0:interface=127.0.0.1",
                                   "tls_cert_dir": str(certs)}
        svc = LBService(reactor, load_config(None, {"lb": section}).settings.lb, "localhost",
                        StaticRouteSource([simple_route("a", b, hostnames=("a.example.com",))]))
        svc.startService()
        self.addCleanup(svc.stopService)
        ports = await svc.whenReady()
        port = ports[1].getHost().port
        cn, data = await deferToThread(tls_get, port, "a.example.com", "a.example.com")
        self.assertEqual(cn, "a.example.com")
        self.assertTrue(data.startswith(b"HTTP/1.1 200"), data[:100])
        self.assertEqual(b.requests[0].get(b"x-forwarded-proto"), b"https")
        cn, _ = await deferToThread(tls_get, port, "x.w.example.com", "a.example.com")
        self.assertEqual(cn, "*.w.example.com")
        cn, _ = await deferToThread(tls_get, port, "unknown.example.org", "a.example.com")
        self.assertEqual(cn, "default.invalid")
        write_cert(certs / "new.example.com.pem", "new.example.com")
        svc.reload()  # what SIGHUP (or the periodic rescan) does
        cn, _ = await deferToThread(tls_get, port, "new.example.com", "a.example.com")
        self.assertEqual(cn, "new.example.com")
