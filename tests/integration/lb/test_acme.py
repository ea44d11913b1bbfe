"""HTTPS for a custom domain, issued by a real ACME server (Debian's pebble).

Everything on loopback: ``pebble-challtestsrv`` answers DNS for the test names
(every A query 127.0.0.1, no AAAA; ``bad.test`` 127.0.0.2, where no router
listens), pebble validates HTTP-01 on the router's HTTP port, a real
``twistd epio --role=all`` node runs the issuer and a router, a second
``--role=lb`` node shares its store and cluster secret.  The first node runs two
router processes (``lb.workers = 2``), so challenges and certificates must reach its
worker as well as its parent.  Steps: deploy
examples/wsgi; ``epio domains add www.hello.test`` -> certificate issued within
30 s -> an HTTPS client trusting pebble's root (from its management API) gets
200 through the router; the second router serves the same certificate;
``epio domains add bad.test`` -> the failed challenge shown by ``epio certs``;
``far.test`` (127.0.0.3) -> refused before any order by the name check (the issuer
asks challtestsrv's DNS too; ``acme.router_addresses`` 127.0.0.1 and 127.0.0.2); the
app's ``[http] https_redirect`` and ``hsts_max_age`` -> 308 with path and query kept,
HSTS on HTTPS; the platform hostname (``api.hostname``) served with a pebble
certificate the issuer got by itself; DNS-01: ``epio domains add '*.hello.test'`` names the CNAME to create,
``epio certs`` shows it pending_dns, the CNAME set in challtestsrv -> a wildcard
certificate validated through epio's own DNS server (pebble asks a small recursor,
``dns_recursor.py``, that follows the owner's CNAME into epio's zone) and served for
``anything.hello.test`` by both routers, and the apex ``hello.test`` by DNS-01 too;
the platform wildcard (``acme.platform_wildcard``, ``node.domain = "apps.test"``): the
issuer's log names the operator's CNAME, set in challtestsrv -> ``*.apps.test``
served for the app's default hostname ``hello.apps.test`` by both routers;
the 90-second certificate renewed (70 s before expiry)
and the new one served by both routers.
"""

from __future__ import annotations

import datetime
import http.client
import json
import os
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.integration.e2e.test_quickstart import _unmount_under, wait_until
from tests.util import CHECKOUT, NodeProcess, epio_env, free_port, isolated_config, to_toml

ISSUE_WITHIN = 30.0  # seconds from `epio domains add` to a served certificate
CERT_LIFETIME = 90  # pebble's certificates live this long (certificateValidityPeriod) ...
# ... and are renewed this long before expiry: 20 s after issuance, time enough for the
# checks of the first certificate (both routers serve it, `epio certs` shows it) on a
# loaded machine, and no longer: the renewal step waits for it
RENEW_BEFORE = 70.0


def _minica(tmp: Path) -> tuple[Path, Path, Path]:
    """A CA and a 127.0.0.1/localhost certificate for pebble's own HTTPS listener."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "epio test minica")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    import ipaddress

    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_path, cert_path, key_path = tmp / "minica.pem", tmp / "pebble.pem", tmp / "pebble.key"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return ca_path, cert_path, key_path


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args[0]} exited: {log.read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"{proc.args[0]} not listening on {port}: {log.read_text()[-2000:]}")


def https_get(port: int, host: str, cafile: Path) -> tuple[int, str, bytes]:
    """GET / over TLS with SNI ``host``, verifying against ``cafile``; (status, body,
    the server's leaf certificate DER)."""
    ctx = ssl.create_default_context(cafile=str(cafile))
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=5, context=ctx)
    # connect to 127.0.0.1 but verify and send SNI for `host`
    conn.host = host
    sock = socket.create_connection(("127.0.0.1", port), 5)
    conn.sock = ctx.wrap_socket(sock, server_hostname=host)
    try:
        der = conn.sock.getpeercert(binary_form=True) or b""
        conn.request("GET", "/", headers={"Host": host})
        resp = conn.getresponse()
        return resp.status, resp.read().decode("utf-8", "replace"), der
    finally:
        conn.close()


class AcmeTests(SynchronousTestCase):
    def setUp(self) -> None:
        for tool in ("pebble", "pebble-challtestsrv"):
            if shutil.which(tool) is None:
                raise SkipTest(f"{tool} is not installed (.ci/apt-packages)")
        self.tmp = Path(tempfile.mkdtemp(prefix="epio-acme-"))
        os.chmod(self.tmp, 0o711)
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.addCleanup(_unmount_under, self.tmp)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.addCleanup(self._stop_procs)

    def _stop_procs(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Any:
        log = self.tmp / f"{name}.log"
        out = open(log, "wb")
        self.addCleanup(out.close)
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})}, cwd=self.tmp)
        self.procs.append(proc)
        return proc, log

    def epio(self, *args: str, stdin: str | None = None, check: bool = True) -> str:
        env = epio_env({"EPIO_CONFIG_DIR": str(self.tmp / "cli"), "HOME": str(self.tmp)})
        proc = subprocess.run(
            [sys.executable, "-c", "import sys; from epio.cli.main import main; sys.exit(main())",
             *args], input=stdin, capture_output=True, text=True, env=env, cwd=self.tmp,
            timeout=240)
        if check and proc.returncode != 0:
            raise AssertionError(f"epio {' '.join(args)} exited {proc.returncode}:\n"
                                 f"{proc.stdout}\n{proc.stderr}\n--- node ---\n"
                                 f"{self.node.output()[-4000:]}")
        return proc.stdout

    def certs(self) -> dict[str, dict[str, Any]]:
        return {c["hostname"]: c for c in json.loads(self.epio("certs", "--app", "hello",
                                                               "--json"))}

    def test_acme_issue_serve_fail(self) -> None:
        """A custom domain gets a pebble-issued certificate within 30 s that two routers
        serve (trusted by pebble's root); a domain whose challenge cannot succeed shows
        as failed, with the CA's reason, in `epio certs`."""
        tmp = self.tmp
        minica, pcert, pkey = _minica(tmp)
        dns_port, cts_mgmt = free_port(), free_port()
        # pebble and epio's checks ask the recursor, which asks challtestsrv and follows
        # CNAMEs into epio's DNS-01 zone (served by the node's api role on dns01_port)
        recursor_port, dns01_port = free_port(), free_port()
        acme_port, acme_mgmt = free_port(), free_port()
        doc, _ = isolated_config({
            # two router processes: the worker must answer challenges and serve TLS too
            "lb": {"tls_listen": f"tcp:{free_port()}:interface=127.0.0.1", "workers": 2},
            "api": {"reconcile_interval": 0.5, "drain_seconds": 1.0, "stop_grace": 3.0,
                    # the platform's own route, whose certificate the issuer gets too
                    "hostname": "epio.platform.test"},
            # the platform domain, whose wildcard the issuer gets by DNS-01
            "node": {"domain": "apps.test"},
            "metrics": {"listen": f"tcp:{free_port()}:interface=127.0.0.1"},
            "store": {"url": f"sqlite:///{tmp}/store.db"},
            "cluster": {"secret_file": str(tmp / "cluster-secret")},
            "acme": {"directory": f"https://127.0.0.1:{acme_port}/dir",
                     "ca_bundle": str(minica), "check_interval": 2.0, "retry_min": 300.0,
                     "challenge_wait": 1.5, "sync_interval": 1.0, "order_timeout": 20.0,
                     "renew_before_days": RENEW_BEFORE / 86400,
                     # the name check asks challtestsrv's DNS, like pebble; 127.0.0.2
                     # counts as a router's address though none listens there, so that
                     # bad.test passes the check and fails at the CA
                     "router_addresses": ["127.0.0.1", "127.0.0.2"],
                     "dns_server": f"127.0.0.1:{recursor_port}",
                     "dns01_zone": "acme.epio.test",
                     "dns01_listen": f"127.0.0.1:{dns01_port}",
                     "platform_wildcard": True},
        })
        (tmp / "cluster-secret").write_text(secrets.token_hex(32) + "\n")
        os.chmod(tmp / "cluster-secret", 0o600)
        lb_port = int(doc["lb"]["listen"].split(":")[1])
        tls_port = int(doc["lb"]["tls_listen"].split(":")[1])
        doc["lb"]["https_port"] = tls_port  # the public HTTPS port, for redirects
        api_port = int(doc["api"]["listen"].split(":")[1])

        cts, cts_log = self._spawn("challtestsrv", [
            "pebble-challtestsrv", "-dns01", f"127.0.0.1:{dns_port}", "-http01", "",
            "-https01", "", "-tlsalpn01", "", "-management", f"127.0.0.1:{cts_mgmt}",
            "-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
        (tmp / "pebble.json").write_text(json.dumps({"pebble": {
            "listenAddress": f"127.0.0.1:{acme_port}",
            "managementListenAddress": f"127.0.0.1:{acme_mgmt}",
            "certificate": str(pcert), "privateKey": str(pkey),
            "httpPort": lb_port, "tlsPort": free_port(), "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
            "certificateValidityPeriod": CERT_LIFETIME}}))
        recursor, recursor_log = self._spawn("recursor", [
            sys.executable, "-m", "tests.integration.lb.dns_recursor",
            "--listen", f"127.0.0.1:{recursor_port}", "--upstream", f"127.0.0.1:{dns_port}",
            "--zone", "acme.epio.test", "--zone-server", f"127.0.0.1:{dns01_port}"],
            env={"PYTHONPATH": str(CHECKOUT)})
        pebble, pebble_log = self._spawn(
            "pebble", ["pebble", "-config", str(tmp / "pebble.json"),
                       "-dnsserver", f"127.0.0.1:{recursor_port}"],
            env={"PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0",
                 "PEBBLE_AUTHZREUSE": "0"})
        _wait_port(cts_mgmt, cts, cts_log)
        _wait_port(acme_port, pebble, pebble_log)
        _wait_port(acme_mgmt, pebble, pebble_log)
        wait_until("the recursor", lambda: "listening" in recursor_log.read_text()
                   or recursor.poll() is not None, timeout=15)
        self.assertIsNone(recursor.poll(), recursor_log.read_text())

        self.node = NodeProcess(["--role=all"], data_dir=tmp / "data", config=to_toml(doc))
        self.addCleanup(self.node.cleanup)
        self.node.wait_for_log("api ready", timeout=60)
        # the platform wildcard: the issuer's first round logs the operator's CNAME; set
        # at once (its pending_dns re-check doubles), issued while the app deploys
        out = self.node.wait_for_log("_acme-challenge.apps.test has no CNAME record",
                                     timeout=30)
        platform_cname = re.search(r"certificate for \*\.apps\.test \(epio\) pending_dns .*"
                                   r"create `_acme-challenge\.apps\.test\. CNAME "
                                   r"([0-9a-f]{16}\.acme\.epio\.test)\.`", out)
        self.assertIsNotNone(platform_cname, out)
        assert platform_cname is not None
        urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{cts_mgmt}/set-cname",
            data=json.dumps({"host": "_acme-challenge.apps.test.",
                             "target": platform_cname.group(1) + "."}).encode(),
            method="POST"), timeout=5).read()
        self.epio("login", "--api", f"http://127.0.0.1:{api_port}",
                  stdin=(tmp / "data" / "admin-token").read_text())
        self.epio("apps", "create", "hello")
        # examples/wsgi with the app's HTTPS policy (epio.ini [http], checked at the end)
        app = tmp / "secure-app"
        shutil.copytree(CHECKOUT / "examples" / "wsgi", app)
        with open(app / "epio.ini", "a") as f:
            f.write("\n[http]\nhttps_redirect = true\nhsts_max_age = 600\n")
        self.epio("deploy", str(app), "--app", "hello", "--poll", "0.5")

        # the second router (its own node, same store and cluster secret), started now so
        # that it is up when the certificate is issued: it must serve the first certificate
        # well before the renewal (RENEW_BEFORE) replaces it
        doc2 = json.loads(json.dumps(doc))
        doc2["lb"]["listen"] = f"tcp:{free_port()}:interface=127.0.0.1"
        doc2["lb"]["tls_listen"] = f"tcp:{free_port()}:interface=127.0.0.1"
        doc2["metrics"]["listen"] = f"tcp:{free_port()}:interface=127.0.0.1"
        router2 = NodeProcess(["--role=lb"], data_dir=tmp / "data2", config=to_toml(doc2))
        self.addCleanup(router2.cleanup)
        tls2 = int(doc2["lb"]["tls_listen"].split(":")[1])

        # issuance: `epio domains add` -> certificate served within ISSUE_WITHIN seconds
        added = time.monotonic()
        self.epio("domains", "add", "www.hello.test", "--app", "hello")
        ctx = ssl.create_default_context(cafile=str(minica))
        root = urllib.request.urlopen(f"https://127.0.0.1:{acme_mgmt}/roots/0", context=ctx,
                                      timeout=5).read()
        root_path = tmp / "pebble-root.pem"
        root_path.write_bytes(root)
        status, body, der1 = wait_until(
            "HTTPS with the issued certificate",
            lambda: https_get(tls_port, "www.hello.test", root_path), timeout=ISSUE_WITHIN)
        took = time.monotonic() - added
        sys.stderr.write(f"[acme] certificate served {took:.1f}s after `epio domains add`\n")
        self.assertEqual((status, body), (200, "Hello from epio! (hello)\n"))
        cert = self.certs()["www.hello.test"]
        self.assertEqual((cert["state"], cert["source"], cert["serving"]),
                         ("issued", "acme", True))
        leaf = x509.load_der_x509_certificate(der1)
        self.assertAlmostEqual(cert["not_after"], leaf.not_valid_after_utc.timestamp(), 0)
        # a challenge path without a pending token is not answered by the router: the
        # app's policy applies (redirected to HTTPS)
        conn = http.client.HTTPConnection("127.0.0.1", lb_port, timeout=5)
        conn.request("GET", "/.well-known/acme-challenge/none", headers={
            "Host": "www.hello.test"})
        self.assertEqual(conn.getresponse().status, 308)
        conn.close()

        # the platform hostname (api.hostname, the API through the routers) got its
        # certificate from pebble too (ordered at start, by HTTP-01 on the routers)
        status, body, der_platform = wait_until(
            "HTTPS for the platform hostname",
            lambda: https_get(tls_port, "epio.platform.test", root_path), timeout=30)
        self.assertEqual(x509.load_der_x509_certificate(der_platform).extensions
                         .get_extension_for_class(x509.SubjectAlternativeName).value
                         .get_values_for_type(x509.DNSName), ["epio.platform.test"])
        self.assertIn('Value:"epio.platform.test"', pebble_log.read_text())

        # a second router (its own node, same store and cluster secret) serves it too
        status, body, der2 = wait_until(
            "the second router serves the certificate",
            lambda: https_get(tls2, "www.hello.test", root_path), timeout=30)
        self.assertEqual((status, der2), (200, der1))

        # an owner's own certificate (`epio certs add`), served by the router; a key that
        # does not match is refused with the reason
        from tests.certs.test_certs import CA

        own_ca = CA()
        cert, key = own_ca.leaf(["own.hello.test"])
        _, other_key = own_ca.leaf(["own.hello.test"])
        (tmp / "own.pem").write_bytes(cert)
        (tmp / "own.key").write_bytes(key)
        (tmp / "other.key").write_bytes(other_key)
        (tmp / "own-ca.pem").write_bytes(own_ca.cert_pem())
        self.epio("domains", "add", "own.hello.test", "--app", "hello")
        env = epio_env({"EPIO_CONFIG_DIR": str(tmp / "cli"), "HOME": str(tmp)})
        refused = subprocess.run(
            [sys.executable, "-m", "epio.cli.main", "certs", "add", "own.hello.test", "--app",
             "hello", "--cert", str(tmp / "own.pem"), "--key", str(tmp / "other.key")],
            capture_output=True, text=True, env=env, cwd=tmp, timeout=60)
        self.assertNotEqual(refused.returncode, 0)
        self.assertIn("the key does not match the certificate", refused.stderr + refused.stdout)
        self.epio("certs", "add", "own.hello.test", "--app", "hello", "--cert",
                  str(tmp / "own.pem"), "--key", str(tmp / "own.key"))
        status, _, der_own = wait_until(
            "the owner's certificate served",
            lambda: https_get(tls_port, "own.hello.test", tmp / "own-ca.pem"), timeout=15)
        self.assertEqual(x509.load_der_x509_certificate(der_own).public_bytes(
            serialization.Encoding.PEM), cert)
        self.assertEqual(self.certs()["own.hello.test"]["source"], "owner")

        # a challenge that cannot succeed: bad.test resolves where no router listens
        req = urllib.request.Request(
            f"http://127.0.0.1:{cts_mgmt}/add-a",
            data=json.dumps({"host": "bad.test.", "addresses": ["127.0.0.2"]}).encode(),
            method="POST")
        urllib.request.urlopen(req, timeout=5).read()
        self.epio("domains", "add", "bad.test", "--app", "hello")
        bad = wait_until("the failed challenge in epio certs",
                         lambda: (lambda c: c if c["state"] == "failed" else None)(
                             self.certs()["bad.test"]), timeout=30)
        self.assertIn("challenge failed", bad["last_error"])
        self.assertIn("bad.test", bad["last_error"])
        self.assertFalse(bad["serving"])
        self.assertGreater(bad["next_attempt"], time.time() + 200)  # acme.retry_min backoff
        human = self.epio("certs", "--app", "hello")
        self.assertIn("bad.test  failed", human)
        self.assertIn("last error: challenge failed", human)
        self.assertIn("www.hello.test  issued  source=acme", human)
        # a name resolving elsewhere is never ordered: the reason comes from the check
        req = urllib.request.Request(
            f"http://127.0.0.1:{cts_mgmt}/add-a",
            data=json.dumps({"host": "far.test.", "addresses": ["127.0.0.3"]}).encode(),
            method="POST")
        urllib.request.urlopen(req, timeout=5).read()
        self.epio("domains", "add", "far.test", "--app", "hello")
        far = wait_until("the name check's reason in epio certs",
                         lambda: (lambda c: c if c["state"] == "pending_dns" else None)(
                             self.certs()["far.test"]), timeout=30)
        self.assertRegex(far["last_error"], re.escape(
            "far.test resolves to 127.0.0.3, not to the cluster's routers "
            "(127.0.0.1, 127.0.0.2): point its DNS at them; or, for a certificate by "
            "DNS-01: _acme-challenge.far.test has no CNAME record: create "
            "`_acme-challenge.far.test. CNAME ") + r"[0-9a-f]{16}\.acme\.epio\.test\.`$")
        self.assertNotIn("far.test", pebble_log.read_text())  # no order, no challenge
        # the working domain kept its certificate
        self.assertEqual(https_get(tls_port, "www.hello.test", root_path)[0], 200)

        # the app's HTTPS policy (epio.ini [http]): plain HTTP -> 308 to https:// with the
        # path and query; HTTPS responses carry HSTS with the owner's max-age

        def plain(path: str) -> tuple[int, str | None, str | None]:
            conn = http.client.HTTPConnection("127.0.0.1", lb_port, timeout=5)
            try:
                conn.request("GET", path, headers={"Host": "www.hello.test"})
                r = conn.getresponse()
                r.read()
                return r.status, r.getheader("Location"), r.getheader(
                    "Strict-Transport-Security")
            finally:
                conn.close()

        status, location, sts = wait_until(
            "the redirect", lambda: (lambda r: r if r[0] == 308 else None)(
                plain("/some/path?q=1&x=%2F")), timeout=30)
        self.assertEqual(location, f"https://www.hello.test:{tls_port}/some/path?q=1&x=%2F")
        self.assertIsNone(sts)  # HSTS is only sent over HTTPS

        def secure() -> tuple[int, bytes, str | None]:
            ctx = ssl.create_default_context(cafile=str(root_path))
            conn = http.client.HTTPSConnection("127.0.0.1", tls_port, timeout=5, context=ctx)
            conn.sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", tls_port), 5),
                                        server_hostname="www.hello.test")
            try:
                conn.request("GET", "/some/path?q=1", headers={"Host": "www.hello.test"})
                resp = conn.getresponse()
                return resp.status, resp.read(), resp.getheader("Strict-Transport-Security")
            finally:
                conn.close()

        self.assertEqual(secure(), (200, b"Hello from epio! (hello)\n", "max-age=600"))

        # DNS-01: a wildcard; `epio domains add` names the one record to create
        added_wild = self.epio("domains", "add", "*.hello.test", "--app", "hello")
        m = re.search(r"^    _acme-challenge\.hello\.test\.  CNAME  ([0-9a-f]{16}\.acme\.epio"
                      r"\.test)\.$", added_wild, re.M)
        self.assertIsNotNone(m, added_wild)
        assert m is not None
        target = m.group(1)
        self.assertIn("DNS is not in place yet", added_wild)
        self.assertNotIn("  A  ", added_wild)  # its names already reach the routers
        wild = wait_until("the wildcard pending_dns in epio certs",
                          lambda: (lambda c: c if c["state"] == "pending_dns" else None)(
                              self.certs()["*.hello.test"]), timeout=30)
        self.assertIn(f"create `_acme-challenge.hello.test. CNAME {target}.`",
                      wild["last_error"])
        self.assertRegex(self.epio("certs", "--app", "hello"),
                         r"\*\.hello\.test  pending_dns  source=acme  expires=-  next check=")
        self.assertNotIn("hello.test", pebble_log.read_text().replace("www.hello.test", "")
                         .replace("own.hello.test", ""))  # never ordered
        req = urllib.request.Request(
            f"http://127.0.0.1:{cts_mgmt}/set-cname",
            data=json.dumps({"host": "_acme-challenge.hello.test.",
                             "target": target + "."}).encode(), method="POST")
        urllib.request.urlopen(req, timeout=5).read()
        added = time.monotonic()
        status, body, der_wild = wait_until(
            "the wildcard certificate served for any name under it",
            lambda: https_get(tls_port, "anything.hello.test", root_path), timeout=ISSUE_WITHIN)
        sys.stderr.write(f"[acme] wildcard served {time.monotonic() - added:.1f}s after the "
                         "CNAME\n")
        self.assertEqual((status, body), (200, "Hello from epio! (hello)\n"))
        wild_leaf = x509.load_der_x509_certificate(der_wild)
        self.assertEqual(wild_leaf.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName),
            ["*.hello.test"])
        self.assertEqual(self.certs()["*.hello.test"]["state"], "issued")
        _, _, der_wild2 = wait_until(
            "the second router serves the wildcard",
            lambda: https_get(tls2, "other.hello.test", root_path), timeout=30)
        self.assertEqual(der_wild2, der_wild)
        # the apex, with the same CNAME in place: DNS-01 as well
        apex_added = self.epio("domains", "add", "hello.test", "--app", "hello")
        self.assertIn("DNS is in place", apex_added)
        status, _, der_apex = wait_until(
            "the apex's certificate", lambda: https_get(tls_port, "hello.test", root_path),
            timeout=ISSUE_WITHIN)
        self.assertEqual(x509.load_der_x509_certificate(der_apex).extensions
                         .get_extension_for_class(x509.SubjectAlternativeName).value
                         .get_values_for_type(x509.DNSName), ["hello.test"])
        # validated by DNS only: pebble never fetched an HTTP-01 answer for it
        self.assertIn('Value:"hello.test"', pebble_log.read_text())
        self.assertNotIn("http://hello.test:", pebble_log.read_text())

        # the platform wildcard (set up right after start): the app's default hostname
        # over TLS, by both routers
        waited = time.monotonic()
        for port in (tls_port, tls2):
            status, body, der_platform_wild = wait_until(
                "the platform wildcard served for the app's default hostname",
                lambda: https_get(port, "hello.apps.test", root_path),  # noqa: B023
                timeout=ISSUE_WITHIN)
            self.assertEqual((status, body), (200, "Hello from epio! (hello)\n"))
            self.assertEqual(x509.load_der_x509_certificate(der_platform_wild).extensions
                             .get_extension_for_class(x509.SubjectAlternativeName).value
                             .get_values_for_type(x509.DNSName), ["*.apps.test"])
        sys.stderr.write(f"[acme] platform wildcard: waited {time.monotonic() - waited:.1f}s "
                         "for it at the end\n")

        # renewal: a short-lived certificate is replaced before it expires, on both routers
        first = x509.load_der_x509_certificate(der1)

        def renewed(port: int) -> x509.Certificate | None:
            leaf = x509.load_der_x509_certificate(https_get(port, "www.hello.test",
                                                            root_path)[2])
            return leaf if leaf.not_valid_after_utc > first.not_valid_after_utc else None

        for port in (tls_port, tls2):
            leaf = wait_until("the renewed certificate", lambda: renewed(port),  # noqa: B023
                              timeout=CERT_LIFETIME - RENEW_BEFORE + 15)
            self.assertNotEqual(leaf.serial_number, first.serial_number)
            self.assertGreater(leaf.not_valid_after_utc.timestamp(), time.time())
