"""`epio logs` and `epio logs -f` against a real node (api + logger roles)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from epio.bus import Bus
from epio.pipeline import BusLogSink
from tests.util import NodeProcess, epio_env, isolated_config, to_toml


class LogsCliTests(TestCase):
    timeout = 120

    def epio(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", "import sys; from epio.cli.main import main; sys.exit(main())",
             *args], input=stdin, capture_output=True, text=True, env=self.env, timeout=60,
            cwd=self.home)

    async def test_logs_filters_and_follow(self) -> None:
        """Lines pushed by a node's pipeline show up in `epio logs`, filtered by source
        and regex, and `epio logs -f` prints the last N then follows new lines."""
        doc, _ = isolated_config({"logger": {"stats_flush_delay": 0.5,
                                               "maintenance_interval": 0.5}})
        node = NodeProcess(["--role=api,logger"], config=to_toml(doc))
        self.addCleanup(node.cleanup)
        node.wait_for_log("api ready", timeout=60)
        self.home = Path(self.mktemp()).absolute()
        self.home.mkdir(parents=True)
        self.env = epio_env({"EPIO_CONFIG_DIR": str(self.home / "cli"), "HOME": str(self.home)})
        api = "http://127.0.0.1:" + doc["api"]["listen"].split(":")[1]
        token = (node.data_dir / "admin-token").read_text()
        self.assertEqual(self.epio("login", "--api", api, stdin=token).returncode, 0)
        made = self.epio("apps", "create", "logsapp", "--no-remember")
        self.assertEqual(made.returncode, 0, made.stderr)
        # its process types (no release yet: the formation names them)
        scaled = self.epio("scale", "--app", "logsapp", "web=0", "worker=0")
        self.assertEqual(scaled.returncode, 0, scaled.stderr)

        secret = bytes.fromhex((node.data_dir / "cluster-secret").read_text())
        bus = Bus(reactor, secret, "test-sender")
        sink = BusLogSink(bus, doc["cluster"]["loggers"], clock=reactor)
        sink.startService()
        self.addCleanup(sink.stopService)
        await deferLater(reactor, 0.5, lambda: None)  # PUSH connects
        for i in range(30):
            sink.emit("logsapp", "web.1", f"line {i}")
        for i in range(5):
            sink.emit("logsapp", "worker.1", f"job {i} done")

        deadline = time.monotonic() + 30
        while True:
            shown = self.epio("logs", "--app", "logsapp", "-n", "100")
            if shown.stdout.count("\n") >= 35 or time.monotonic() > deadline:
                break
            await deferLater(reactor, 0.3, lambda: None)
        lines = shown.stdout.splitlines()
        self.assertEqual(len(lines), 35, shown.stdout + shown.stderr)
        self.assertTrue(lines[0].endswith("web.1: line 0"), lines[0])
        self.assertRegex(lines[0], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z ")
        workers = self.epio("logs", "--app", "logsapp", "--source", "worker.1").stdout
        self.assertEqual(len(workers.splitlines()), 5)
        greps = self.epio("logs", "--app", "logsapp", "--grep", r"line 1\d$").stdout
        self.assertEqual(len(greps.splitlines()), 10)
        bad = self.epio("logs", "--app", "logsapp", "--source", "bad source!")
        self.assertEqual(bad.returncode, 1)
        self.assertIn("invalid source", bad.stderr)
        self.assertNotIn("Traceback", bad.stderr)
        # a well-formed source the app cannot have is refused with the list, not "nothing"
        for flag in ([], ["-f"]):
            bogus = self.epio("logs", "--app", "logsapp", "--source", "bogus", *flag)
            self.assertEqual((bogus.returncode, bogus.stderr.strip()), (1, (
                "epio: logsapp has no log source 'bogus'; its sources are: build, release, "
                "platform, router, run, cron, web, worker, epio-redis, epio-postgres (a "
                "process type matches each instance: web matches web.1, web.2, ...)")))
        ok = self.epio("logs", "--app", "logsapp", "--source", "web.1,run.4,router")
        self.assertEqual(ok.returncode, 0, ok.stderr)

        follow = subprocess.Popen(
            [sys.executable, "-c", "import sys; from epio.cli.main import main; sys.exit(main())",
             "logs", "--app", "logsapp", "-f", "-n", "2"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env)
        self.addCleanup(lambda: follow.poll() is None and follow.kill())
        await deferLater(reactor, 2.0, lambda: None)
        for i in range(3):
            sink.emit("logsapp", "web.1", f"later {i}")
        await deferLater(reactor, 2.0, lambda: None)
        follow.terminate()
        out, err = follow.communicate(timeout=10)
        followed = [ln.split(": ", 1)[1] for ln in out.splitlines()]
        self.assertEqual(followed, ["job 3 done", "job 4 done", "later 0", "later 1", "later 2"],
                         err)

        # the dashboard's websocket: no Authorization header (browsers cannot send one);
        # the token rides in a subprotocol and the server selects only "epio.v1"
        port = int(doc["api"]["listen"].split(":")[1])
        head, body = ws_handshake(port, "/api/v1/apps/logsapp/logs?n=3",
                                  f"epio.v1, epio.bearer.{token.strip()}")
        self.assertTrue(head.startswith("HTTP/1.1 101"), head)
        self.assertIn("sec-websocket-protocol: epio.v1\r\n", head.lower())
        self.assertNotIn(token.strip(), head)
        self.assertIn(b"later 2", body)
        head, _ = ws_handshake(port, "/api/v1/apps/logsapp/logs?n=3",
                               "epio.v1, epio.bearer.epio_not-a-token")
        self.assertTrue(head.startswith("HTTP/1.1 401"), head)

        # stats: router samples of a bucket that has ended are written and served
        past = PastClock(reactor, 25.0)
        stats_sink = BusLogSink(bus, doc["cluster"]["loggers"], clock=past)
        stats_sink.startService()
        self.addCleanup(stats_sink.stopService)
        await deferLater(reactor, 0.5, lambda: None)
        stats_sink.emit_stats("logsapp", "router", {"requests": 7, "status_2xx": 6,
                                                    "status_5xx": 1, "latency_le_50ms": 7})
        stats_sink.emit_stats("logsapp", "process", {"process": "web.1",
                                                     "memory_bytes": 30_347_300})
        deadline = time.monotonic() + 30
        while True:
            shown = self.epio("stats", "--app", "logsapp", "--json", "--resolution", "10")
            if '"requests"' in shown.stdout or time.monotonic() > deadline:
                break
            await deferLater(reactor, 0.5, lambda: None)
        self.assertEqual(shown.returncode, 0, shown.stderr)
        series = json.loads(shown.stdout)["series"]
        self.assertEqual(sum(v for _, v in series["requests"]), 7, series)
        self.assertEqual(series["memory_bytes:web.1"][-1][1], 30_347_300)
        # for people: units (req/s over the 10 s bucket, ms, MiB) and a text chart
        human = self.epio("stats", "--app", "logsapp", "--resolution", "10")
        rows = {ln.split()[0] + (" " + ln.split()[1] if ln.startswith("memory") else ""): ln
                for ln in human.stdout.splitlines()[2:]}
        self.assertRegex(rows["requests"], r"^requests +0\.70 req/s +0\.70 req/s +0\.70 req/s"
                                           r" +[\u2581-\u2588 ]+$")
        self.assertIn("0.10 req/s", rows["status_5xx"])
        self.assertRegex(rows["latency_p50_ms"], r"^latency_p50_ms +50 ms ")
        self.assertRegex(rows["memory_bytes web.1"], r"^memory_bytes web\.1 +28\.9 MiB ")
        self.assertNotIn("e+07", human.stdout)
        # an unknown metric is refused with the list of metrics, not "no stats yet"
        nope = self.epio("stats", "--app", "logsapp", "--metric", "nope")
        self.assertEqual(nope.returncode, 1)
        self.assertTrue(nope.stderr.startswith(
            "epio: unknown metric 'nope'; the metrics are: requests, status_1xx, "), nope.stderr)
        self.assertIn("latency_p99_ms", nope.stderr)
        only = self.epio("stats", "--app", "logsapp", "--metric", "latency", "--json")
        self.assertEqual(only.returncode, 0, only.stderr)
        self.assertTrue(json.loads(only.stdout)["series"])


def ws_handshake(port: int, path: str, protocols: str) -> tuple[str, bytes]:
    """A raw websocket upgrade (as a browser sends it); the response head and what
    arrived in the next half second."""
    import base64
    import socket

    key = base64.b64encode(os.urandom(16)).decode()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                      "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                      f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                      f"Sec-WebSocket-Protocol: {protocols}\r\n\r\n").encode())
        data = b""
        deadline = time.monotonic() + 5
        while b"\r\n\r\n" not in data and time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        sock.settimeout(0.5)
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                rest += chunk
        except TimeoutError:
            pass
    return head.decode("latin-1") + "\r\n", rest


class PastClock:
    """The reactor, with seconds() some time in the past (samples of an ended bucket)."""

    def __init__(self, reactor: object, behind: float) -> None:
        self._reactor = reactor
        self._behind = behind

    def seconds(self) -> float:
        return self._reactor.seconds() - self._behind  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self._reactor, name)
