"""A real single-box node serves an app's [static] files itself (docs/static.md).

``twistd -n epio --role=all`` in a temp dir; the real CLI deploys a copy of
examples/flask (plus a larger stylesheet and ep.io's ``[http] gzip = true`` /
``expires-/static = 600``); the static files come through the real router from
the runner's static file server -- gzipped, with caching headers and 304s -- and
never reach the app's gunicorn.
"""

from __future__ import annotations

import gzip
import http.client
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.e2e.test_quickstart import _unmount_under, http_get, wait_until
from tests.util import CHECKOUT, NodeProcess, epio_env, isolated_config, to_toml

BIG_CSS = "".join(f".c{i} {{ color: #{i:06x}; margin: {i}px; }}\n" for i in range(400))


def fetch(port: int, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"Host": "hello.localhost", **headers})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


class NodeStaticTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="epio-static-e2e-"))
        os.chmod(self.tmp, 0o711)
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.addCleanup(_unmount_under, self.tmp)
        base = random.randrange(21000, 32000, 100)
        doc, _ = isolated_config({
            "api": {"reconcile_interval": 0.5, "drain_seconds": 1.0, "stop_grace": 3.0},
            "runner": {"backoff_initial": 0.2, "port_min": base, "port_max": base + 99},
        })
        self.api_port = int(str(doc["api"]["listen"]).split(":")[1])
        self.lb_port = int(str(doc["lb"]["listen"]).split(":")[1])
        self.node = NodeProcess(["--role=all"], data_dir=self.tmp / "data", config=to_toml(doc))
        self.addCleanup(self.node.cleanup)
        self.app = self.tmp / "flask"
        shutil.copytree(CHECKOUT / "examples" / "flask", self.app)
        (self.app / "static" / "big.css").write_text(BIG_CSS)
        ini = (self.app / "epio.ini").read_text()
        (self.app / "epio.ini").write_text(
            ini.replace("[http]\n", "[http]\ngzip = true\nexpires-/static = 600\n"))

    def epio(self, *args: str, stdin: str | None = None) -> str:
        env = epio_env({"EPIO_CONFIG_DIR": str(self.tmp / "cli"), "HOME": str(self.tmp)})
        proc = subprocess.run(
            [sys.executable, "-c", "import sys; from epio.cli.main import main; sys.exit(main())",
             *args], input=stdin, capture_output=True, text=True, env=env, cwd=self.tmp,
            timeout=240)
        if proc.returncode != 0:
            raise AssertionError(f"epio {' '.join(args)}: {proc.stdout}\n{proc.stderr}\n"
                                 f"--- node log ---\n{self.node.output()[-5000:]}")
        return proc.stdout

    def test_static_files_served_by_the_platform(self) -> None:
        """examples/flask's /static is served through the router by the runner's static
        server: right bytes, gzip for a large stylesheet, Cache-Control from
        expires-/static, ETag and 304; gunicorn never sees these requests."""
        self.node.wait_for_log("api ready", timeout=60)
        token = (self.tmp / "data" / "admin-token").read_text()
        self.epio("login", "--api", f"http://127.0.0.1:{self.api_port}", stdin=token)
        self.epio("apps", "create", "hello")
        self.epio("deploy", str(self.app), "--app", "hello", "--poll", "0.5")
        wait_until("the app serves", lambda: http_get(self.lb_port, "hello.localhost")[0] == 200,
                   timeout=30)

        def static_served() -> tuple[int, dict[str, str], bytes] | None:
            r = fetch(self.lb_port, "/static/style.css", {})
            return r if r[0] == 200 and r[1].get("server") == "epio-static" else None

        status, headers, body = wait_until("static server answers /static", static_served,
                                           timeout=20)
        self.assertEqual(body, (self.app / "static" / "style.css").read_bytes())
        self.assertEqual(headers["cache-control"], "public, max-age=600")
        self.assertEqual(headers["content-type"], "text/css; charset=utf-8")
        status, headers, body = fetch(self.lb_port, "/static/big.css",
                                      {"Accept-Encoding": "gzip"})
        self.assertEqual((status, headers.get("content-encoding")), (200, "gzip"))
        self.assertEqual(headers["server"], "epio-static")
        self.assertEqual(gzip.decompress(body).decode(), BIG_CSS)
        self.assertLess(len(body), len(BIG_CSS) // 3)
        status, h304, body = fetch(self.lb_port, "/static/big.css",
                                   {"Accept-Encoding": "gzip", "If-None-Match": headers["etag"]})
        self.assertEqual((status, body, h304["etag"]), (304, b"", headers["etag"]))
        # outside the image's static directory, or missing: the static server's 404
        # (the app's gunicorn is never asked: its answers say "Server: gunicorn")
        for path in ("/static/../app.py", "/static/%2e%2e/app.py", "/static/nothing.css"):
            status, h, body = fetch(self.lb_port, path, {})
            self.assertEqual((status, h["server"]), (404, "epio-static"), path)
            self.assertNotIn(b"Flask", body)
        status, h, _ = fetch(self.lb_port, "/", {})
        self.assertEqual((status, h["server"]), (200, "gunicorn"))
