"""`epio restart` against a real single-box node, under load through the router.

A real node (``twistd -n epio --role=all``, tests.integration.run.helpers.RunNode),
the real CLI, a real build of a tiny app without requirements whose web process
answers its own PID (and a worker that only sleeps).  While a thread sends requests
back to back through the router (tests.integration.e2e.test_quickstart.RouterLoad),
``epio restart`` replaces every instance; then ``epio restart web`` replaces only
the web ones.
"""

from __future__ import annotations

import json
import subprocess
import time
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.e2e.test_quickstart import RouterLoad, http_get
from tests.integration.e2e.test_rollover import workers
from tests.integration.run.helpers import CLI, RunNode, skip_reason, wait_until

SERVER = """\
import os
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# the sandbox's PID namespace numbers every instance alike: a start id tells them apart
BOOT = uuid.uuid4().hex[:12]


class Pid(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = f"pid {os.getpid()} boot {BOOT}\\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("0.0.0.0", int(os.environ["PORT"])), Pid).serve_forever()
"""

SLEEPER = "import time\nwhile True:\n    time.sleep(1)\n"

#: the load runs at most this long (requests every 20 ms on one keep-alive connection)
LOAD_BOUND = 90.0


class RestartCliTests(SynchronousTestCase):
    def setUp(self) -> None:
        if skip_reason():
            self.skipTest(skip_reason() or "")
        self.node = RunNode(api={"reconcile_interval": 0.5, "runner_dead_after": 10.0,
                                 "drain_seconds": 1.0, "stop_grace": 3.0}, app="pids")
        self.addCleanup(self.node.close)
        self.node.start(seed=False)
        self.lb_port = int(str(self.node.doc["lb"]["listen"]).split(":")[1])
        self.dir = self.node.tmp / "apps" / "pids"
        self.dir.mkdir(parents=True)
        (self.dir / "server.py").write_text(SERVER)
        (self.dir / "sleeper.py").write_text(SLEEPER)
        (self.dir / "Procfile").write_text("web: python server.py\nworker: python sleeper.py\n")
        (self.dir / "requirements.txt").write_text("")

    def epio(self, *args: str) -> str:
        return self.node.epio(*args, "--app", "pids", timeout=240)[1]

    def ps(self) -> list[dict[str, Any]]:
        return list(json.loads(self.epio("ps", "--json")))

    def pids(self, n: int = 30) -> set[str]:
        """The web processes answering through the router over ``n`` requests (each
        says its PID in its sandbox and a random id drawn at its start)."""
        seen = set()
        for _ in range(n):
            status, body = http_get(self.lb_port, "pids.localhost")
            if status == 200:
                seen.add(body.strip())
        return seen

    def test_restart_under_load(self) -> None:
        """`epio restart` waits until new processes serve (new PIDs through the router,
        every instance of a new release) while no request fails; `epio restart web`
        replaces the web instances and leaves the worker's; --no-wait returns before
        the rollout ends; a bad type exits 1 with the API's sentence."""
        out = self.node.epio("deploy", str(self.dir), "--app", "pids", "--poll", "0.2",
                             timeout=240)[1]
        self.assertIn("pids is live at", out)
        self.epio("scale", "web=2")
        wait_until("two web instances serve", lambda: len(self.pids()) == 2, timeout=60,
                   interval=0.5)
        before = self.pids()
        host_before = set(workers("pids", b"server.py"))
        self.assertEqual(len(host_before), 2)
        load = RouterLoad(self.lb_port, "pids.localhost")
        load.start()
        self.addCleanup(load.stop)
        started = time.monotonic()
        out = self.epio("restart", "--poll", "0.2")
        self.assertRegex(out.splitlines()[0], r"^Restarting every instance of pids: v\d+ runs "
                                              r"the same code and config on new processes$")
        self.assertRegex(out.splitlines()[-1], r"^v\d+ is current$")
        version = int(out.splitlines()[-1].split()[0][1:])
        ps = self.ps()
        self.assertEqual(sorted((i["type"], i["release"], i["state"]) for i in ps if
                                i["state"] != "draining"),
                         [("web", version, "healthy"), ("web", version, "healthy"),
                          ("worker", version, "healthy")], ps)
        # the old web instances drain (api.drain_seconds) and stop; the new PIDs serve
        wait_until("only the new release's instances remain", lambda: {
            i["release"] for i in self.ps()} == {version}, timeout=30, interval=0.5)
        after = self.pids()
        self.assertEqual(len(after), 2, after)
        self.assertFalse(after & before, (before, after))
        # and on the host: two web processes, none of them an old one
        host_after = set(workers("pids", b"server.py"))
        self.assertEqual(len(host_after), 2, host_after)
        self.assertFalse(host_after & host_before)
        time.sleep(1.0)  # requests after the old ones stopped
        load.stop()
        self.assertLess(time.monotonic() - started, LOAD_BOUND)
        self.assertGreater(load.ok, 20, load.report())
        self.assertEqual(load.failures, [], load.report())
        served = {b.strip() for b in load.bodies}
        self.assertTrue(served >= after, load.report())  # the new ones served the load
        self.assertTrue(served <= before | after, load.report())

        # one type: the worker instance stays (same release, same name, same since)
        worker = [i for i in self.ps() if i["type"] == "worker"]
        sleeper = workers("pids", b"sleeper.py")
        self.assertEqual(len(sleeper), 1)
        out = self.epio("restart", "web", "--poll", "0.2")
        self.assertIn("Restarting web instances of pids", out)
        wait_until("the old web instances stopped", lambda: len(self.ps()) == 3, timeout=30,
                   interval=0.5)
        self.assertEqual([i for i in self.ps() if i["type"] == "worker"], worker)
        self.assertEqual(workers("pids", b"sleeper.py"), sleeper)
        self.assertFalse(self.pids() & after)

        # --no-wait: the restart's release is still deploying when the command returns
        code, out, err = self.node.epio("restart", "--app", "pids", "--no-wait", "--json")
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out)["status"], "deploying")
        proc = subprocess.run([*CLI, "restart", "clock", "--app", "pids"], env=self.node.env,
                              cwd=self.node.tmp, capture_output=True, text=True, timeout=60)
        self.assertEqual(proc.returncode, 1, proc.stdout + proc.stderr)
        self.assertIn("pids has no process type 'clock' (it has: web, worker)", proc.stderr)
        self.assertNotIn("Traceback", proc.stderr)
