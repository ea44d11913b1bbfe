"""The router as a real process: ``twistd -n epio --role=lb --routes routes.toml``.

Checks start-up, proxying to a backend in another process, SIGHUP route reload,
``lb.workers = 2`` (two processes on one port via SO_REUSEPORT) and a clean stop.
"""

from __future__ import annotations

import http.client
import signal
import subprocess
import sys
import time
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.util import NodeProcess, free_port, wait_for_port


def fetch(port: int, host: str, path: str = "/") -> tuple[int, bytes, dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"Host": host})
        r = conn.getresponse()
        return r.status, r.read(), {k.lower(): v for k, v in r.getheaders()}
    finally:
        conn.close()


class RouterProcessTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.tmp = Path(self.mktemp()).absolute()
        self.tmp.mkdir(parents=True)
        (self.tmp / "hello.txt").write_text("hello from the backend\n")
        self.bport = free_port()
        self.backend = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(self.bport), "--bind", "127.0.0.1"],
            cwd=self.tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(self._stop_backend)
        wait_for_port("127.0.0.1", self.bport)
        self.routes = self.tmp / "routes.toml"
        self.routes.write_text(
            f'[apps.hello]\nhostnames = ["hello.example.com"]\nbackends = ["127.0.0.1:{self.bport}"]\n')

    def _stop_backend(self) -> None:
        self.backend.kill()
        self.backend.wait()

    def start_node(self, config: str | None = None) -> tuple[NodeProcess, int]:
        port = free_port()
        node = NodeProcess(["--role=lb", "--routes", str(self.routes),
                            "--lb-listen", f"tcp:{port}:interface=127.0.0.1"],
                           data_dir=self.tmp / "data", config=config)
        self.addCleanup(node.cleanup)
        node.wait_for_log("router listening on")
        return node, port

    def test_twistd_router_proxies_reloads_and_stops(self) -> None:
        """The lb role proxies by Host, picks up routes on SIGHUP and stops cleanly."""
        node, port = self.start_node()
        status, body, headers = fetch(port, "hello.example.com", "/hello.txt")
        self.assertEqual((status, body), (200, b"hello from the backend\n"))
        self.assertEqual(headers["via"], "1.1 epio")
        self.assertEqual(fetch(port, "other.example.com")[0], 404)
        self.assertEqual(fetch(port, "hello.localhost", "/hello.txt")[0], 200)
        self.routes.write_text(
            f'[apps.other]\nhostnames = ["other.example.com"]\nbackends = ["127.0.0.1:{self.bport}"]\n')
        node.proc.send_signal(1)  # SIGHUP
        deadline = time.monotonic() + 10
        while fetch(port, "other.example.com")[0] != 200:
            self.assertLess(time.monotonic(), deadline, node.output())
            time.sleep(0.05)
        self.assertEqual(fetch(port, "hello.example.com")[0], 404)
        out = node.wait_for_log("router: GET /hello.txt host=hello.example.com status=200")
        self.assertIn("backend=127.0.0.1:", out)
        # twistd stops cleanly, then re-raises SIGTERM so the exit status says why
        self.assertIn(node.stop(), (0, -signal.SIGTERM), node.output())
        self.assertIn("Server Shut Down", node.output())

    def test_workers_share_the_port(self) -> None:
        """With lb.workers = 2 a worker process serves the same port; both stop on SIGTERM."""
        node, port = self.start_node(config="[lb]\nworkers = 2\n")
        node.wait_for_log("worker 1: ")
        node.wait_for_log("router listening on", timeout=30)
        deadline = time.monotonic() + 15
        while "worker 1:" not in node.output() or "listening" not in node.output().split("worker 1:", 1)[1]:
            self.assertLess(time.monotonic(), deadline, node.output())
            time.sleep(0.1)
        for _ in range(20):
            self.assertEqual(fetch(port, "hello.example.com", "/hello.txt")[0], 200)
        self.assertIn(node.stop(), (0, -signal.SIGTERM), node.output())
        self.assertIn("Server Shut Down", node.output())
        time.sleep(0.3)
        with self.assertRaises(OSError):
            fetch(port, "hello.example.com")
