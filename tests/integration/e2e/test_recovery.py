"""A node killed mid-build and mid-rollout decides both at once when it comes back.

A real single-box node (``twistd -n epio --role=all``, SQLite store) and the real CLI.
App ``slow`` serves v1; ``epio config set BOOT_DELAY=4 --no-wait`` starts the rollout
of v2, whose web process takes 4 s to listen; app ``fresh`` is uploaded with
``epio deploy --no-wait``.  While v2 rolls out and ``fresh`` builds, the node gets
SIGKILL.  A new node on the same data dir must, within 10 s of being ready, have
failed the build ("interrupted by a node restart") and finished the rollout from what
the instances report (v2 is current) -- not leave them for a timer.  Then a deploy
whose web process listens on another port than $PORT fails, saying so, with its output.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.run.helpers import CLI, RunNode, skip_reason, wait_until
from tests.util import NodeProcess, to_toml

SERVER = """\
import http.server, os, time
time.sleep(float(os.environ.get("BOOT_DELAY", "0")))

class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"release {os.environ['EPIO_RELEASE']}\\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

http.server.HTTPServer(("", int(os.environ["PORT"])), H).serve_forever()
"""

WRONG_PORT = """\
import socket, time
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen()
print("listening on", s.getsockname()[1], flush=True)
time.sleep(600)
"""

DECIDE_WITHIN = 10.0  # seconds after the restarted node is ready (the bound)


class RecoveryTests(SynchronousTestCase):
    def setUp(self) -> None:
        if skip_reason():
            self.skipTest(skip_reason() or "")
        self.node = RunNode(api={"reconcile_interval": 0.5, "runner_dead_after": 10.0,
                                 "drain_seconds": 1.0, "stop_grace": 3.0},
                            app="slow")
        self.addCleanup(self.node.close)
        self.node.start(seed=False)
        self.node.epio("apps", "create", "fresh")
        self.dirs: dict[str, Path] = {}
        for app in ("slow", "fresh"):
            d = self.dirs[app] = self.node.tmp / "apps" / app
            d.mkdir(parents=True)
            # the app's name in its code: two identical uploads would be one build (the
            # build cache, docs/builds.md) and fresh would never be seen building
            (d / "server.py").write_text(f"# {app}\n{SERVER}")
            (d / "Procfile").write_text("web: python server.py\n")
            (d / "requirements.txt").write_text("")

    def api(self, path: str) -> Any:
        conn = http.client.HTTPConnection("127.0.0.1", self.node.api_port, timeout=10)
        try:
            conn.request("GET", "/api/v1/" + path,
                         headers={"Authorization": f"Bearer {self.node.token}"})
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 200:
                raise AssertionError(f"GET {path}: {resp.status} {body[:300]!r}")
            return json.loads(body)
        finally:
            conn.close()

    def deploys(self, app: str) -> list[dict[str, Any]]:
        return [self.api(f"apps/{app}/deploys/{d['id']}?log_offset=0")
                for d in self.api(f"apps/{app}/deploys")]

    def test_kill_mid_build_and_mid_rollout(self) -> None:
        """kill -9 while v2 rolls out and another app builds; after the restart the build
        is failed and the rollout finished within 10 s, and v2 serves as current.  Then a
        web process listening on another port than $PORT fails its deploy, whose output
        shows its last lines and says "web listens on N; it must listen on $PORT"."""
        code, out, err = self.node.epio("deploy", str(self.dirs["slow"]), "--app", "slow",
                                        "--poll", "0.2", check=False, timeout=180)
        self.assertEqual(code, 0, out + err)
        self.node.epio("config", "set", "BOOT_DELAY=4", "--app", "slow", "--no-wait")
        subprocess.run([*CLI, "deploy", str(self.dirs["fresh"]), "--app", "fresh",
                        "--no-wait"], env=self.node.env, cwd=self.node.tmp, check=True,
                       capture_output=True, timeout=60)

        def mid_way() -> bool:
            rollout = self.deploys("slow")[0]
            build = self.deploys("fresh")[0]
            # v2's instance is web.2: v1's web.1 serves on (names unique across releases)
            return (rollout["status"] == "deploying" and "web.2: starting" in rollout["log"]
                    and build["status"] == "building")

        try:
            wait_until("v2 rolling out while fresh builds", mid_way, timeout=60,
                       interval=0.05)
        except AssertionError as e:
            raise self.node.fail(str(e)) from None
        killed = self.node.node
        killed.kill()
        self.addCleanup(killed.cleanup)

        self.node.node = NodeProcess(["--role=all"], data_dir=self.node.tmp / "data",
                                     config=to_toml(self.node.doc))
        self.node.node.wait_for_log("api ready", timeout=60)
        ready = time.monotonic()

        def decided() -> bool:
            return (self.deploys("slow")[0]["status"] != "deploying"
                    and self.deploys("fresh")[0]["status"] != "building")

        try:
            wait_until("both deploys decided", decided, timeout=DECIDE_WITHIN + 20,
                       interval=0.1)
        except AssertionError as e:
            raise self.node.fail(str(e)) from None
        took = time.monotonic() - ready
        sys.stderr.write(f"[recovery] both deploys decided {took:.1f}s after the node was "
                         "ready\n")
        rollout, build = self.deploys("slow")[0], self.deploys("fresh")[0]
        self.assertEqual((build["status"], build["reason"]),
                         ("failed", "interrupted by a node restart; deploy again"))
        self.assertEqual(rollout["status"], "succeeded", rollout["log"])
        self.assertIn("Deployed v2 (rollout finished after a node restart)", rollout["log"])
        self.assertLess(took, DECIDE_WITHIN, f"decided {took:.1f}s after the node was ready")
        releases = self.api("apps/slow/releases")
        self.assertEqual([(r["version"], r["status"]) for r in releases],
                         [(2, "current"), (1, "superseded")])
        self.assertEqual(self.api("apps/fresh/releases"), [])
        wait_until("only v2 runs", lambda: [(i["release"], i["state"]) for i in
                                            self.api("apps/slow/ps")] == [(2, "healthy")],
                   timeout=30, interval=0.2)

        # a web process on the wrong port: the deploy fails saying so, with its output
        wrong = self.node.tmp / "apps" / "wrong"
        wrong.mkdir()
        (wrong / "server.py").write_text(WRONG_PORT)
        (wrong / "Procfile").write_text("web: python server.py\n")
        (wrong / "requirements.txt").write_text("")
        (wrong / "epio.ini").write_text("[http]\nboot_timeout = 3\n")
        code, out, err = self.node.epio("deploy", str(wrong), "--app", "fresh", "--poll", "0.2",
                                        check=False, timeout=180)
        self.assertEqual(code, 1, out + err)
        port = int(out.split("| listening on ", 1)[1].split()[0])
        self.assertIn("last 1 lines of web.1's output:", out)
        self.assertIn(f"web listens on {port}; it must listen on $PORT (", out)
        self.assertIn("web.1 of v1 failed before becoming healthy", err)

