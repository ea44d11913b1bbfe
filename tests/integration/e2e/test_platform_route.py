"""App 0: the platform's API and dashboard served through the router, like an app.

A real ``--role=all`` node (A) and a second ``--role=api`` node (B) share one
PostgreSQL store and one cluster secret; B publishes ``api.heartbeat`` to A's nexus.
The router serves the platform at ``api.hostname`` (here ``127.0.0.1``: the test
machine resolves no ``*.localhost`` name, and a hostname that is an address is a
valid ``api.hostname``), balanced across both api nodes.  Through the router's
HTTPS URL only (its ``default.pem``, trusted by the CLI through ``SSL_CERT_FILE``),
the real CLI logs in, is refused the reserved app name, creates an app, deploys
examples/wsgi, follows its logs and runs a PTY session (``epio run``) over websockets
(wss); the router's access log
(``epio logs --app epio``, admins only), its stats (``epio stats --app epio``) and
/metrics show the platform's requests;
B is SIGKILLed and requests through the router keep working; B started again takes
routed requests again, and stopped gracefully while requests flow, no request fails.
"""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.e2e.test_quickstart import _unmount_under, http_get, wait_until
from tests.store.pg import fresh_database_for_test
from tests.util import CHECKOUT, NodeProcess, epio_env, free_port, isolated_config, to_toml

PLATFORM_HOST = "127.0.0.1"


def write_self_signed(path: Path, ip: str) -> None:
    """A key and a self-signed certificate for the address ``ip`` (the router's
    default.pem: clients send no SNI for an address)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "epio test platform")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]),
                       False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption())
        + cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def metric(port: int, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples with ``labels`` on a node's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = http_get(port, "localhost", "/metrics")[1]
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            if smp.name == name and all(smp.labels.get(k) == v for k, v in labels.items()):
                total += smp.value
    return total


class PlatformRouteTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="epio-app0-"))
        os.chmod(self.tmp, 0o711)
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.addCleanup(_unmount_under, self.tmp)  # after the nodes are killed (LIFO)
        url = fresh_database_for_test(self)
        secret_file = self.tmp / "secret"
        fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, secrets.token_bytes(32).hex().encode() + b"\n")
        os.close(fd)
        base = 21000 + (os.getpid() % 110) * 100
        certs = self.tmp / "certs"
        certs.mkdir()
        write_self_signed(certs / "default.pem", PLATFORM_HOST)
        self.ca_file = certs / "default.crt"
        self.tls_port = free_port()
        doc, _ = isolated_config({
            "store": {"url": url},
            "cluster": {"secret_file": str(secret_file)},
            "api": {"hostname": PLATFORM_HOST, "reconcile_interval": 0.5,
                    "drain_seconds": 1.0, "stop_grace": 3.0, "rollout_timeout": 60.0,
                    "heartbeat_interval": 0.5},
            "runner": {"backoff_initial": 0.2, "port_min": base, "port_max": base + 99},
            "lb": {"stats_interval": 0.5, "tls_cert_dir": str(certs), "header_timeout": 1.0,
                   "tls_listen": f"tcp:{self.tls_port}:interface=127.0.0.1"},
            "nexus": {"node_timeout": 2.0},
            # stats rows are written on the logger's maintenance ticks (10 s by default)
            "logger": {"maintenance_interval": 0.5},
            "metrics": {"listen": f"tcp:{free_port()}:interface=127.0.0.1"},
        })
        doc.setdefault("node", {})["id"] = "node-a"
        self.doc = doc
        self.lb_port = int(str(doc["lb"]["listen"]).split(":")[1])
        self.metrics_a = int(str(doc["metrics"]["listen"]).split(":")[1])
        # the CLI uses the router's HTTPS listener (same certificate machinery as apps)
        self.router_url = f"https://{PLATFORM_HOST}:{self.tls_port}"
        self.node_a = NodeProcess(["--role=all"], data_dir=self.tmp / "a" / "data",
                                  config=to_toml(doc))
        self.addCleanup(self.node_a.cleanup)
        # B: an api node of its own (own listener, own /metrics), same store and nexus
        self.metrics_b = free_port()
        doc_b = {k: dict(v) for k, v in doc.items()}
        doc_b["node"] = {"id": "node-b"}
        doc_b["api"] = dict(doc["api"], listen=f"tcp:{free_port()}:interface=127.0.0.1")
        doc_b["metrics"] = {"listen": f"tcp:{self.metrics_b}:interface=127.0.0.1"}
        self.config_b = to_toml(doc_b)
        self.node_b: NodeProcess | None = None
        self.home = self.tmp / "home"
        self.home.mkdir()
        os.chmod(self.home, 0o700)
        self.work = self.home / "epio"
        shutil.copytree(CHECKOUT / "examples" / "wsgi", self.work / "examples" / "wsgi")

    def start_b(self) -> NodeProcess:
        node = NodeProcess(["--role=api"], data_dir=self.tmp / "b" / "data",
                           config=self.config_b)
        self.addCleanup(node.cleanup)
        node.wait_for_log("api ready", timeout=60)
        self.node_b = node
        return node

    def epio(self, *args: str, stdin: str | None = None, check: bool = True
             ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-c", "import sys; from epio.cli.main import main; sys.exit(main())",
             *args], input=stdin, capture_output=True, text=True, env=self.env(),
            cwd=self.work, timeout=300)
        if check and proc.returncode != 0:
            self.fail(f"epio {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n"
                      f"{proc.stderr}\n--- node A (end) ---\n{self.node_a.output()[-5000:]}")
        return proc

    def env(self) -> dict[str, str]:
        return epio_env({"EPIO_CONFIG_DIR": str(self.home / ".config" / "epio"),
                         "HOME": str(self.home), "SSL_CERT_FILE": str(self.ca_file)})

    def routed_api(self, path: str) -> tuple[int, Any]:
        """GET /api/v1/PATH through the router, with the admin token."""
        conn = http.client.HTTPConnection("127.0.0.1", self.lb_port, timeout=10)
        try:
            conn.request("GET", "/api/v1/" + path, headers={
                "Host": PLATFORM_HOST, "Authorization": f"Bearer {self.token}",
                "Accept": "application/json"})
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read() or b"null")
        finally:
            conn.close()

    def follow_through_router(self, path: str) -> None:
        """``epio logs -f`` (a websocket through the router) prints the router's lines
        of requests to ``path`` made while it follows."""
        follow = subprocess.Popen(
            [sys.executable, "-c", "import sys; from epio.cli.main import main; sys.exit(main())",
             "logs", "--app", "hello", "-f", "-n", "0", "--source", "router"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env(),
            cwd=self.work)
        self.addCleanup(lambda: follow.poll() is None and follow.kill())
        lines: list[str] = []
        assert follow.stdout is not None
        reader = threading.Thread(target=lambda: lines.extend(follow.stdout or ()),
                                  daemon=True)
        reader.start()
        # requests until one made while the tail is connected shows up (not a fixed sleep:
        # the CLI's start and its TLS websocket handshake take what they take)
        deadline = time.monotonic() + 45
        while not any(path in ln for ln in list(lines)) and time.monotonic() < deadline \
                and follow.poll() is None:
            http_get(self.lb_port, "hello.localhost", path)
            time.sleep(0.5)
        follow.terminate()
        follow.wait(15)
        reader.join(10)
        err = follow.stderr.read() if follow.stderr is not None else ""
        self.assertTrue(any(path in ln for ln in lines), f"{lines[-5:]} {err}")

    def api_requests(self, metrics_port: int) -> float:
        return metric(metrics_port, "epio_api_requests_total")

    def test_platform_through_the_router(self) -> None:
        """Login (at an api node's own listener: the routed URL is kept), deploy and log
        tail through the router URL; the platform's requests
        are in the router's access log and /metrics; both api nodes serve; killing
        one keeps every request working; restarted, it serves again."""
        self.node_a.wait_for_log("api ready", timeout=90)
        self.token = (self.tmp / "a" / "data" / "admin-token").read_text().strip()
        # the first start names the routed URL (the app URL template: lb.listen's port)
        self.assertIn(f"epio login --api http://{PLATFORM_HOST}:{self.lb_port} <",
                      self.node_a.output())
        self.start_b()

        # the dashboard and the API answer through the router at the platform hostname
        wait_until("the router serves the dashboard", lambda: http_get(
            self.lb_port, PLATFORM_HOST, "/dashboard/")[0] == 200, timeout=30)
        self.assertEqual(http_get(self.lb_port, "unknown.localhost", "/dashboard/")[0], 404)

        # the router's protections apply to the platform: a slow head is cut off by the
        # router (lb.header_timeout, 1 s here; the api's own is 10 s), a tarball over the
        # platform route's body limit is refused by the router without reading it
        with socket.create_connection(("127.0.0.1", self.lb_port), timeout=10) as slow:
            slow.sendall(f"GET /api/v1/apps HTTP/1.1\r\nHost: {PLATFORM_HOST}\r\n".encode())
            started = time.monotonic()
            answer = slow.recv(4096)
            self.assertTrue(answer.startswith(b"HTTP/1.1 408"), answer[:200])
            self.assertLess(time.monotonic() - started, 5.0)
        conn = http.client.HTTPConnection("127.0.0.1", self.lb_port, timeout=10)
        conn.putrequest("POST", "/api/v1/apps/hello/deploys", skip_host=True)
        conn.putheader("Host", PLATFORM_HOST)
        conn.putheader("Content-Type", "application/gzip")
        conn.putheader("Content-Length", str(300 << 20))
        conn.putheader("Accept", "application/json")
        conn.endheaders()
        resp = conn.getresponse()
        refused = json.loads(resp.read())
        conn.close()
        # the router's code (the api's own would be payload_too_large)
        self.assertEqual((resp.status, refused["error"]["code"]), (413, "too_large"))

        # logged in at node A's own listener, the CLI keeps the routed URL the api names
        # (it answers through the router); given a routed URL, it keeps that one
        direct = "http://127.0.0.1:" + str(self.doc["api"]["listen"]).split(":")[1]
        done = json.loads(self.epio("login", "--api", direct, "--json",
                                    stdin=self.token + "\n").stdout)
        self.assertEqual(done["api"], f"http://{PLATFORM_HOST}:{self.lb_port}", done)
        self.assertIn("routed URL", done["note"])
        done = json.loads(self.epio("login", "--api", self.router_url, "--json",
                                    stdin=self.token + "\n").stdout)
        self.assertEqual((done["api"], done["note"]), (self.router_url, ""))

        refused = self.epio("apps", "create", "epio", check=False)
        self.assertNotEqual(refused.returncode, 0)
        self.assertIn("reserved", refused.stderr)
        apps = self.routed_api("apps")
        self.assertEqual(apps[0], 200)
        self.assertNotIn("epio", [a["name"] for a in apps[1]])

        self.epio("apps", "create", "hello")
        self.epio("deploy", "examples/wsgi", "--poll", "0.5")
        wait_until("the router serves the app", lambda: http_get(
            self.lb_port, "hello.localhost")[0] == 200, timeout=60)

        self.follow_through_router("/followed-through-the-router")

        # epio run: a PTY session over a websocket through the router
        import pexpect

        child = pexpect.spawn(
            sys.executable, ["-c", "import sys; from epio.cli.main import main; "
                             "sys.exit(main())", "run", "--app", "hello", "--",
                             "test -t 0 && echo tty-through-router; read line; "
                             "echo got-$line"],
            env=self.env(), cwd=str(self.work), timeout=90, encoding="utf-8")
        self.addCleanup(lambda: child.terminate(force=True))
        child.expect("tty-through-router")
        child.sendline("typed")
        child.expect("got-typed")
        child.expect(pexpect.EOF)
        child.close()
        self.assertEqual(child.exitstatus, 0)

        # the router's stats and access log show the platform's requests
        wait_until("the router counts the platform's requests", lambda: metric(
            self.metrics_a, "epio_lb_requests_total", app="epio") > 5, timeout=30)

        def logged() -> bool:  # an admin reads the platform's access log like an app's
            shown = self.epio("logs", "--app", "epio", "-n", "200")
            return any("router" in ln and "GET /api/v1/apps " in ln
                       for ln in shown.stdout.splitlines())

        wait_until("the platform's access log, through the router", logged, timeout=30)

        def stats() -> bool:  # and its stats, like an app's
            shown = self.epio("stats", "--app", "epio", "--json", "--resolution", "10")
            series = json.loads(shown.stdout)["series"]
            return sum(v for _, v in series.get("requests", [])) > 5

        wait_until("the platform's stats, through the router", stats, timeout=60, interval=2)

        # both api nodes take routed requests
        def both_serve() -> bool:
            before = self.api_requests(self.metrics_a), self.api_requests(self.metrics_b)
            for _ in range(10):
                self.assertEqual(self.routed_api("apps")[0], 200)
            return self.api_requests(self.metrics_a) > before[0] \
                and self.api_requests(self.metrics_b) > before[1]

        wait_until("both api nodes take routed requests", both_serve, timeout=30)

        # B killed: every request through the router keeps working
        assert self.node_b is not None
        self.node_b.kill()
        statuses = []
        deadline = time.monotonic() + 6.0
        while time.monotonic() < deadline:
            statuses.append(self.routed_api("apps")[0])
            time.sleep(0.05)
        self.assertEqual(set(statuses), {200}, statuses)
        shown = self.epio("logs", "--app", "hello", "-n", "5")
        self.assertIn("router", shown.stdout)
        # the dashboard and epio logs -f with one api node dead (issue 24's "must show")
        self.assertEqual(http_get(self.lb_port, PLATFORM_HOST, "/dashboard/")[0], 200)
        self.follow_through_router("/followed-with-one-api-node-dead")

        # B again: the route takes it back
        self.start_b()

        def b_serves() -> bool:
            before = self.api_requests(self.metrics_b)
            for _ in range(10):
                self.assertEqual(self.routed_api("apps")[0], 200)
            return self.api_requests(self.metrics_b) > before

        wait_until("the restarted api node takes routed requests", b_serves, timeout=30)

        # B stopped gracefully (SIGTERM) while requests flow: every one answers 200
        assert self.node_b is not None
        stopping = self.node_b
        stopping.proc.send_signal(signal.SIGTERM)
        statuses = []
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            statuses.append(self.routed_api("apps")[0])
            time.sleep(0.02)
        # twistd ends a SIGTERM'd run by re-raising the signal once stopped
        self.assertIn(stopping.stop(), (0, -signal.SIGTERM), stopping.output()[-3000:])
        self.assertEqual(set(statuses), {200}, statuses)
