"""ep.io manifest keys end to end on one real node: ``[cron]`` and ``[basic_auth]``.

One node (``--role=all``) and ONE real build of an app whose epio.ini has two
``* * * * *`` entries (one appends to the app's data directory and prints a line,
one exits non-zero), ``[basic_auth]`` with a realm, and ``[static]`` files served
by the runner's static server.  The steps share the node and the deploy (the cron
step waits for the first minute after the deploy, so it runs last).
"""

from __future__ import annotations

import base64
import http.client
import json
import time
from datetime import datetime
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.run.helpers import RunNode, skip_reason, wait_until

TICK = """\
import os, time
path = os.path.join(os.environ["EPIO_DATA_DIR"], "ticks")
with open(path, "a") as f:
    f.write("tick\\n")
print("tick uid=%d count=%d" % (os.getuid(), open(path).read().count("tick")), flush=True)
"""

INI = """\
[cron]
tick = * * * * * python tick.py
* * * * * = python -c "import sys; print('boom'); sys.exit(4)"

[basic_auth]
admin = correct horse:battery
_realm = Staging area

[static]
/static = static
"""

SERVER = """\
import http.server, os

class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("app saw %s" % self.headers.get("Authorization", "-")).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

http.server.HTTPServer(("", int(os.environ["PORT"])), H).serve_forever()
"""

CSS = "body { color: #123456; }\n"
RIGHT = "Basic " + base64.b64encode(b"admin:correct horse:battery").decode()
WRONG = "Basic " + base64.b64encode(b"admin:correct horse").decode()
REFRESH = 15.0  # nexus.store_refresh (seconds)


class EpioIniTests(SynchronousTestCase):
    node: RunNode
    started: float  # when the deploy began
    deployed: float  # when it ended

    @classmethod
    def setUpClass(cls) -> None:
        if skip_reason():
            return
        # the nexus reads the store every REFRESH seconds (not 2), and the deploy starts
        # right after one read: its release and instance are made before the next
        # periodic read, so the first healthy heartbeat reaches the nexus before any
        # read lists them (the first-deploy case of docs/nexus.md, "The table"), and the
        # deploy is routed by the early read that heartbeat asks for
        cls.node = RunNode(cron={"tick": 1.0}, nexus={"store_refresh": REFRESH})
        try:
            cls.node.start(seed=False)
            # the nexus knows the app (a route with no backend: 503) before the deploy
            wait_until("the nexus reads the new app", lambda: cls.fetch("/")[0] == 503,
                       timeout=3 * REFRESH, interval=0.1)
            app_dir = cls.node.tmp / "app"
            (app_dir / "static").mkdir(parents=True)
            for name, text in {"tick.py": TICK, "server.py": SERVER, "epio.ini": INI,
                               "static/style.css": CSS, "Procfile": "web: python server.py\n",
                               "requirements.txt": ""}.items():
                (app_dir / name).write_text(text)
            cls.started = time.time()
            code, out, err = cls.node.epio("deploy", str(app_dir), "--app", "hello", "--poll",
                                           "0.5", check=False, timeout=180)
            if code != 0:
                raise AssertionError(f"deploy failed: {out}{err}")
            cls.deployed = time.time()
        except BaseException:
            cls.node.close()
            raise

    @classmethod
    def tearDownClass(cls) -> None:
        if not skip_reason():
            cls.node.close()

    def setUp(self) -> None:
        if skip_reason():
            self.skipTest(skip_reason() or "")

    @classmethod
    def fetch(cls, path: str, auth: str | None = None) -> tuple[int, dict[str, str], str]:
        port = int(str(cls.node.doc["lb"]["listen"]).split(":")[1])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        headers = {"Host": "hello.localhost", **({"Authorization": auth} if auth else {})}
        try:
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            return (resp.status, {k.lower(): v for k, v in resp.getheaders()},
                    resp.read().decode("utf-8", "replace"))
        finally:
            conn.close()

    def test_basic_auth_at_the_router(self) -> None:
        """Through the router, the app's pages and its static files answer 401 with
        WWW-Authenticate (the realm) without or with wrong credentials, and serve with
        the right ones, from the first request after the deploy (no moment where the
        first route goes out without [basic_auth]); the router's log never shows the
        password."""
        # probed at once: the deploy ends when the nexus routes the new instance; the
        # router may not have the delta yet for a few milliseconds (404 no route, 503 no
        # backend), but it must never answer 200 without the password
        answers: list[int] = []

        def routed() -> bool:
            answers.append(self.fetch("/", None)[0])
            return answers[-1] not in (404, 503)

        wait_until("the router routes the app", routed, timeout=10, interval=0.02)
        self.assertEqual(answers[-1], 401, answers)
        status, headers, body = self.fetch("/", RIGHT)
        self.assertEqual((status, body), (200, f"app saw {RIGHT}"))
        # and it is not a whole store refresh late: the nexus read the store early when
        # the release it had not read was heard (the deploy ends once routed)
        platform: dict[str, datetime] = {}
        for line in self.node.epio("logs", "--app", "hello", "--source", "platform",
                                   "-n", "200")[1].splitlines():
            stamp, _, text = line.partition(" platform: ")
            for key, start in (("healthy", "web.1: healthy"), ("routed", "Deployed v1")):
                if text.startswith(start):
                    platform.setdefault(key, datetime.fromisoformat(stamp.rstrip("Z")))
        late = (platform["routed"] - platform["healthy"]).total_seconds()
        self.assertLess(late, REFRESH / 3, platform)
        for path in ("/", "/some/page", "/static/style.css"):
            for auth in (None, WRONG, "Bearer x"):
                status, headers, _ = self.fetch(path, auth)
                self.assertEqual(status, 401, (path, auth))
                self.assertEqual(headers["www-authenticate"],
                                 'Basic realm="Staging area", charset="UTF-8"')

        def static() -> Any:
            r = self.fetch("/static/style.css", RIGHT)
            return r if r[0] == 200 and r[1].get("server") == "epio-static" else None

        _, _, body = wait_until("the static server answers", static, timeout=20)
        self.assertEqual(body, CSS)
        # neither the node's log nor the app's (router access lines included) has it
        def app_log() -> str:
            return self.node.epio("logs", "--app", "hello", "-n", "500")[1]

        # the router flushes its access lines every half second, through the logger
        wait_until("the 401s are in the app's log", lambda: "/some/page" in app_log(),
                   timeout=15)
        log = self.node.log_lines() + app_log()
        self.assertNotIn("battery", log)
        self.assertNotIn(RIGHT.split()[1], log)

    def test_cron_entries_run_at_their_minute_in_the_sandbox(self) -> None:
        """Deployed entries run once at the next minute as the app's UID; the output is
        in the log under source cron.NAME; a failing entry is FAILED in epio ps and
        'failed' (exit 4) in epio cron."""
        entries = json.loads(self.node.epio("cron", "--app", "hello", "--json")[1])
        self.assertEqual([(e["name"], e["schedule"]) for e in entries][0],
                         ("tick", "* * * * *"))
        failing = entries[1]["name"]
        self.assertTrue(failing.startswith("cron-"), failing)

        def ran() -> bool:
            got = json.loads(self.node.epio("cron", "--app", "hello", "--json")[1])
            return all(e["status"] in ("succeeded", "failed") for e in got)

        wait_until("both entries ran", ran, timeout=60 - self.deployed % 60 + 30)
        entries = json.loads(self.node.epio("cron", "--app", "hello", "--json")[1])
        self.assertEqual([e["status"] for e in entries], ["succeeded", "failed"])
        self.assertEqual(entries[1]["last_run"]["exit_status"], 4)
        slot = entries[0]["last_slot"]
        self.assertEqual(slot % 60, 0)
        self.assertGreaterEqual(slot, self.started)  # a slot after the release was made
        # the file it wrote in the app's data directory is the app's, not root's
        [ticks] = (self.node.tmp / "data").rglob("ticks")
        uid = ticks.stat().st_uid
        self.assertNotEqual(uid, 0)
        self.assertEqual(ticks.read_text(), "tick\n")

        def logged() -> str:
            return self.node.epio("logs", "--app", "hello", "--source", "cron", "-n", "50")[1]

        wait_until("the output is in the log", lambda: "boom" in logged(), timeout=15)
        text = logged()
        self.assertIn(f"tick uid={uid} count=1", text)
        self.assertIn(f"cron.{failing}", text)
        _, human, _ = self.node.epio("cron", "--app", "hello")
        self.assertRegex(human, r"tick +\* \* \* \* \* +succeeded +run\.\d+ ")
        self.assertRegex(human, failing + r" +\* \* \* \* \* +failed +run\.\d+ .*\(exit 4\)")
        _, ps, _ = self.node.epio("ps", "--app", "hello")
        self.assertIn(f"cron {failing} FAILED", ps)
        self.assertNotIn("cron tick FAILED", ps)
        runs = [r for r in self.node.runs(history=True) if r["kind"] == "cron"]
        self.assertEqual(sorted(r["user"] for r in runs), ["cron", "cron"])  # once each
