"""A syslog drain against a real local TCP syslog receiver (octet-counted RFC 5424)."""

from __future__ import annotations

import re

from twisted.internet import reactor, task
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from epio.logs.drains import DrainConfig, DrainManager
from epio.logs.records import LogRecord
from epio.metrics import MetricsRegistry

from .helpers import until


class SyslogReceiver(Protocol):
    """Parses RFC 6587 octet-counting frames."""

    def connectionMade(self) -> None:
        self.buf = b""

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        while True:
            sp = self.buf.find(b" ")
            if sp < 0:
                return
            n = int(self.buf[:sp])
            if len(self.buf) < sp + 1 + n:
                return
            self.factory.messages.append(self.buf[sp + 1 : sp + 1 + n].decode())
            self.buf = self.buf[sp + 1 + n :]


class ReceiverFactory(Factory):
    protocol = SyslogReceiver

    def __init__(self) -> None:
        self.messages: list[str] = []


MSG = re.compile(r"^<14>1 \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z node-x hello web\.1 - - line (\d+)$")


class SyslogDrainTests(TestCase):
    timeout = 60

    async def test_lines_reach_receiver_across_a_restart(self) -> None:
        """Lines are delivered framed and formatted; when the receiver goes away
        lines queue and are delivered after it comes back on the same port."""
        recv = ReceiverFactory()
        port = reactor.listenTCP(0, recv, interface="127.0.0.1")
        number = port.getHost().port
        registry = MetricsRegistry()
        mgr = DrainManager(reactor, DrainConfig(backoff_initial=0.1, backoff_max=0.5,
                                                hostname="node-x"), registry=registry)
        mgr.startService()
        self.addCleanup(mgr.stopService)
        mgr.add("d1", "hello", f"syslog://127.0.0.1:{number}")
        for i in range(1, 101):
            mgr.on_record("hello", LogRecord(i, 1.7e9, "web.1", f"line {i}"))

        async def got(n: int) -> bool:
            return len(recv.messages) >= n

        await until(lambda: got(100), 10)
        nums = [int(MSG.match(m).group(1)) for m in recv.messages]
        self.assertEqual(nums, list(range(1, 101)))

        # the receiver stops; lines queue; it comes back on the same port
        await port.stopListening()
        proto = mgr.drains["d1"].proto
        if proto is not None:  # the server side closed: make the client notice now
            proto.transport.loseConnection()
        await task.deferLater(reactor, 0.2, lambda: None)
        for i in range(101, 151):
            mgr.on_record("hello", LogRecord(i, 1.7e9, "web.1", f"line {i}"))
        port = reactor.listenTCP(number, recv, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        await until(lambda: got(150), 10)
        nums = [int(MSG.match(m).group(1)) for m in recv.messages]
        self.assertEqual(nums, list(range(1, 151)))
        delivered = registry.counter("epio_log_drain_delivered_total", "", ["drain", "app"])
        self.assertEqual(delivered.value("d1", "hello"), 150)
        mgr.remove("d1")


class HTTPDrainTests(TestCase):
    timeout = 60

    async def test_posts_logplex_batches_with_retry(self) -> None:
        """An HTTP drain POSTs application/logplex-1 batches to a real local server;
        the server's first two answers are 503, the batch is retried and delivered;
        counters say so."""
        from twisted.web.resource import Resource
        from twisted.web.server import Site

        bodies: list[tuple[bytes, bytes]] = []
        answers = [503, 503]

        class Sink(Resource):
            isLeaf = True

            def render_POST(self, request):  # noqa: N802
                if answers:
                    request.setResponseCode(answers.pop(0))
                    return b"busy"
                bodies.append((request.getHeader(b"content-type"), request.content.read()))
                return b"ok"

        port = reactor.listenTCP(0, Site(Sink()), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        registry = MetricsRegistry()
        mgr = DrainManager(reactor, DrainConfig(backoff_initial=0.05, max_attempts=5,
                                                hostname="node-x"), registry=registry)
        mgr.startService()
        self.addCleanup(mgr.stopService)
        mgr.add("h1", "hello", f"http://127.0.0.1:{port.getHost().port}/drain")
        for i in range(1, 4):
            mgr.on_record("hello", LogRecord(i, 1.7e9, "web.1", f"line {i}"))

        c = registry.counter("epio_log_drain_delivered_total", "", ["drain", "app"])

        async def delivered() -> bool:
            # the sink holds the lines when it answers; the drain counts them only once
            # it has read that answer, a moment later on a loaded machine
            return (sum(b.count(b"<14>1 ") for _, b in bodies) >= 3
                    and c.value("h1", "hello") >= 3)

        await until(delivered, 10)
        self.assertEqual({ct for ct, _ in bodies}, {b"application/logplex-1"})
        frames = b"".join(b for _, b in bodies)
        self.assertIn(b"node-x hello web.1 - - line 1", frames)
        self.assertRegex(frames.decode(), r"^\d+ <14>1 ")
        self.assertEqual(c.value("h1", "hello"), 3)
        mgr.remove("h1")


class SyslogTLSDrainTests(TestCase):
    timeout = 60

    async def test_tls_receiver_with_private_ca(self) -> None:
        """syslog+tls:// delivers over TLS to a server whose certificate is checked
        against the configured CA (a self-signed one made for the test)."""
        import subprocess
        import tempfile
        from pathlib import Path

        from twisted.internet.ssl import PrivateCertificate

        tmp = Path(tempfile.mkdtemp(prefix="epio-tls-"))
        self.addCleanup(lambda: [p.unlink() for p in tmp.iterdir()] and tmp.rmdir())
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
             "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
             "-keyout", str(tmp / "key.pem"), "-out", str(tmp / "cert.pem")],
            check=True, capture_output=True)
        pem = (tmp / "key.pem").read_bytes() + (tmp / "cert.pem").read_bytes()
        recv = ReceiverFactory()
        port = reactor.listenSSL(0, recv, PrivateCertificate.loadPEM(pem).options(),
                                 interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        mgr = DrainManager(reactor, DrainConfig(backoff_initial=0.1, hostname="node-x",
                                                tls_ca=str(tmp / "cert.pem")))
        mgr.startService()
        self.addCleanup(mgr.stopService)
        mgr.add("t1", "hello", f"syslog+tls://localhost:{port.getHost().port}")
        for i in range(1, 11):
            mgr.on_record("hello", LogRecord(i, 1.7e9, "web.1", f"line {i}"))

        async def got() -> bool:
            return len(recv.messages) >= 10

        await until(got, 10)
        self.assertEqual([int(MSG.match(m).group(1)) for m in recv.messages], list(range(1, 11)))
        self.assertEqual(mgr.drains["t1"].delivered, 10)
