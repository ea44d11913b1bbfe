"""The release phase (``[release] command`` in epio.ini) on a real node with real builds.

The command runs once per deploy, in the new image, before any instance of the new
release starts; when it fails, the deploy fails, no release is made and the previous
release keeps serving.
"""

from __future__ import annotations

import http.client
import json
import shutil
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.run.helpers import RunNode, skip_reason, wait_until

SERVER = """\
import http.server, os

class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        path = os.path.join(os.environ["EPIO_DATA_DIR"], "migrations")
        runs = open(path).read().count("ran") if os.path.exists(path) else 0
        body = f"release {os.environ['EPIO_RELEASE']} migrations {runs}\\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

http.server.HTTPServer(("", int(os.environ["PORT"])), H).serve_forever()
"""

MIGRATE = """\
import os, sys
path = os.path.join(os.environ["EPIO_DATA_DIR"], "migrations")
with open(path, "a") as f:
    f.write("ran\\n")
print("migration", open(path).read().count("ran"))
sys.exit(3 if os.path.exists("fail") else 0)
"""


class ReleasePhaseTests(SynchronousTestCase):
    def setUp(self) -> None:
        if skip_reason():
            self.skipTest(skip_reason() or "")
        self.node = RunNode()
        self.addCleanup(self.node.close)
        self.node.start(seed=False)
        self.app_dir = self.node.tmp / "app"
        self.app_dir.mkdir()
        for name, text in {"server.py": SERVER, "migrate.py": MIGRATE,
                           "Procfile": "web: python server.py\n", "requirements.txt": "",
                           "epio.ini": "[release]\ncommand = python migrate.py\n"}.items():
            (self.app_dir / name).write_text(text)

    def deploy(self, path: Path) -> tuple[int, str, str]:
        return self.node.epio("deploy", str(path), "--app", "hello", "--poll", "0.5",
                              check=False, timeout=180)

    def serving(self) -> str:
        ps = json.loads(self.node.epio("ps", "--app", "hello", "--json")[1])
        healthy = [i for i in ps if i["state"] == "healthy"]
        if len(healthy) != 1:
            return ""
        conn = http.client.HTTPConnection(healthy[0]["host"], healthy[0]["port"], timeout=5)
        try:
            conn.request("GET", "/")
            return conn.getresponse().read().decode()
        finally:
            conn.close()

    def releases(self) -> list[dict[str, Any]]:
        return json.loads(self.node.epio("releases", "--app", "hello", "--json")[1])

    def test_release_command_once_per_deploy_and_failure_keeps_old_release(self) -> None:
        """A deploy runs the migration once, before its release serves; a deploy whose
        migration fails (run once too) makes no release and the previous one keeps
        serving.  The same holds for a Procfile `release:` line (Heroku's convention),
        which is not a process type -- and a failed first deploy says that nothing serves
        yet."""
        code, _, err = self.node.epio("run", "--app", "hello", "--", "true", check=False)
        self.assertEqual(code, 1)  # nothing to run in yet: a clear error, no traceback
        self.assertIn("has no release to run commands in yet: deploy it first", err)
        self.assertNotIn("Traceback", err)
        broken = self.node.tmp / "broken"
        shutil.copytree(self.app_dir, broken)
        (broken / "fail").write_text("yes\n")
        # a failed first deploy does not pretend that something keeps serving
        code, out, err = self.deploy(broken)
        self.assertEqual(code, 1, out + err)
        self.assertIn("exited with status 3; no release was made, and the app has none "
                      "serving yet", err)
        self.assertNotIn("keeps serving", out + err)
        self.assertEqual(self.releases(), [])

        code, out, err = self.deploy(self.app_dir)
        self.assertEqual(code, 0, out + err)
        self.assertIn("migration 2", out)
        self.assertLess(out.index("Release phase succeeded"), out.index("rolling out"))
        first = self.releases()[0]["version"]
        wait_until("v1 serves", lambda: self.serving() == f"release {first} migrations 2\n",
                   timeout=30)

        code, out, err = self.deploy(broken)
        self.assertEqual(code, 1, out + err)
        self.assertIn("the release command (python migrate.py) exited with status 3; no "
                      f"release was made; v{first} keeps serving", err)
        self.assertIn("migration 3", out)
        self.assertEqual(self.releases()[0]["version"], first)  # no release was made
        self.assertEqual(self.serving(), f"release {first} migrations 3\n")
        audit = [r for r in self.node.runs(history=True) if r["kind"] == "release"]
        self.assertEqual([r["exit_status"] for r in audit], [3, 0, 3])

        # Heroku's convention: a Procfile `release:` line is the same release phase
        heroku = self.node.tmp / "heroku"
        shutil.copytree(self.app_dir, heroku)
        (heroku / "epio.ini").unlink()
        (heroku / "Procfile").write_text("web: python server.py\nrelease: python migrate.py\n")
        code, out, err = self.deploy(heroku)
        self.assertEqual(code, 0, out + err)
        self.assertIn("migration 4", out)
        self.assertIn("Release v2 (web);", out)  # `release` is no process type
        wait_until("v2 serves", lambda: self.serving() == "release 2 migrations 4\n",
                   timeout=30)
        formation = json.loads(self.node.epio("scale", "--app", "hello", "--json")[1])
        self.assertEqual([p["type"] for p in formation["processes"]], ["web"])
        (heroku / "fail").write_text("yes\n")
        code, out, err = self.deploy(heroku)
        self.assertEqual(code, 1, out + err)
        self.assertIn("the release command (python migrate.py) exited with status 3; no "
                      "release was made; v2 keeps serving", err)
        self.assertEqual(self.releases()[0]["version"], 2)  # no release was made
        self.assertEqual(self.serving(), "release 2 migrations 5\n")
        audit = [r for r in self.node.runs(history=True) if r["kind"] == "release"]
        self.assertEqual([r["exit_status"] for r in audit], [3, 0, 3, 0, 3])
