"""[cron] for real: a deployed app's entries run at their minute, in the sandbox.

One node (``--role=all``), a real build of an app whose epio.ini has two
``* * * * *`` entries: one appends to the app's data directory and prints a line,
one exits non-zero.  At the next minute both run once, as the app's UID; their
output is in ``epio logs --source cron``; ``epio cron`` and ``epio ps`` show the
failure.
"""

from __future__ import annotations

import json
import time

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
"""

SERVER = """\
import http.server, os
http.server.HTTPServer(("", int(os.environ["PORT"])), http.server.SimpleHTTPRequestHandler
                       ).serve_forever()
"""


class CronTests(SynchronousTestCase):
    def setUp(self) -> None:
        if skip_reason():
            self.skipTest(skip_reason() or "")
        self.node = RunNode(cron={"tick": 1.0})
        self.addCleanup(self.node.close)
        self.node.start(seed=False)

    def test_entries_run_at_their_minute_in_the_sandbox(self) -> None:
        """Deployed entries run once at the next minute as the app's UID; the output is
        in the log under source cron.NAME; a failing entry is FAILED in epio ps and
        'failed' (exit 4) in epio cron."""
        app_dir = self.node.tmp / "app"
        app_dir.mkdir()
        for name, text in {"tick.py": TICK, "server.py": SERVER, "epio.ini": INI,
                           "Procfile": "web: python server.py\n",
                           "requirements.txt": ""}.items():
            (app_dir / name).write_text(text)
        code, out, err = self.node.epio("deploy", str(app_dir), "--app", "hello", "--poll",
                                        "0.5", check=False, timeout=180)
        self.assertEqual(code, 0, out + err)
        deployed = time.time()
        entries = json.loads(self.node.epio("cron", "--app", "hello", "--json")[1])
        self.assertEqual([(e["name"], e["schedule"], e["status"]) for e in entries][0],
                         ("tick", "* * * * *", "never"))
        failing = entries[1]["name"]
        self.assertTrue(failing.startswith("cron-"), failing)

        def ran() -> bool:
            got = json.loads(self.node.epio("cron", "--app", "hello", "--json")[1])
            return all(e["status"] in ("succeeded", "failed") for e in got)

        wait_until("both entries ran", ran, timeout=60 - deployed % 60 + 30)
        entries = json.loads(self.node.epio("cron", "--app", "hello", "--json")[1])
        self.assertEqual([e["status"] for e in entries], ["succeeded", "failed"])
        self.assertEqual(entries[1]["last_run"]["exit_status"], 4)
        slot = entries[0]["last_slot"]
        self.assertEqual(slot % 60, 0)
        self.assertGreater(slot, deployed - 1)  # the first minute after the deploy

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
        _, ps, _ = self.node.epio("ps", "--app", "hello")
        self.assertIn(f"cron {failing} FAILED", ps)
        self.assertNotIn("cron tick FAILED", ps)
        runs = [r for r in self.node.runs(history=True) if r["kind"] == "cron"]
        self.assertEqual(sorted(r["user"] for r in runs), ["cron", "cron"])  # once each
