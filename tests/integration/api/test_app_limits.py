"""App UIDs and per-user app limits on a real ``--role=all`` node.

The node is configured with ``runner.uid_min = 47000`` (the value that made every
deploy fail in issue 18) and small per-user limits.  A non-admin user deploys an
app that prints its own UID, through the router; then, over real HTTP to the api,
runs into the app quota and the create/delete rate limit (429 with Retry-After).
"""

from __future__ import annotations

import http.client
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.util import NodeProcess, epio_env, isolated_config, to_toml

UID_MIN, UID_MAX = 47000, 47999
MAX_APPS, CHANGES, WINDOW = 3, 6, 3600.0

UID_APP = '''\
import os


def application(environ, start_response):
    body = ("uid=%d gid=%d\\n" % (os.getuid(), os.getgid())).encode()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]
'''


def wait_until(what: str, check: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = check()
        except OSError as e:  # not listening yet
            last = e
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not true after {timeout:g}s (last: {last!r})")
        time.sleep(0.3)


class AppLimitsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="epio-limits-"))
        os.chmod(self.tmp, 0o711)  # app and build users traverse it
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.addCleanup(_unmount_under, self.tmp)  # after the node is killed (LIFO)
        base = random.randrange(21000, 32000, 100)  # below 32768: not ephemeral
        doc, _ = isolated_config({
            "api": {"reconcile_interval": 0.5, "drain_seconds": 0.5, "stop_grace": 2.0,
                    "rollout_timeout": 60.0, "max_apps_per_user": MAX_APPS,
                    "app_changes_per_window": CHANGES, "app_changes_window": WINDOW},
            "runner": {"uid_min": UID_MIN, "uid_max": UID_MAX, "backoff_initial": 0.2,
                       "port_min": base, "port_max": base + 99},
        })
        self.api_port = int(str(doc["api"]["listen"]).split(":")[1])
        self.lb_port = int(str(doc["lb"]["listen"]).split(":")[1])
        self.node = NodeProcess(["--role=all"], data_dir=self.tmp / "data", config=to_toml(doc))
        self.addCleanup(self.node.cleanup)

    def api(self, method: str, path: str, token: str,
            body: Any = None) -> tuple[int, dict[str, str], Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.api_port, timeout=30)
        try:
            conn.request(method, "/api/v1/" + path,
                         body=None if body is None else json.dumps(body),
                         headers={"Authorization": f"Bearer {token}",
                                  "Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), json.loads(resp.read())
        finally:
            conn.close()

    def deploy(self, app: str, src: Path, token: str) -> None:
        env = epio_env({"EPIO_API": f"http://127.0.0.1:{self.api_port}", "EPIO_TOKEN": token,
                        "EPIO_CONFIG_DIR": str(self.tmp / "cli"), "HOME": str(self.tmp)})
        proc = subprocess.run(
            [sys.executable, "-c", "import sys; from epio.cli.main import main; sys.exit(main())",
             "deploy", str(src), "--app", app, "--poll", "0.5"],
            capture_output=True, text=True, env=env, timeout=240)
        self.assertEqual(proc.returncode, 0,
                         f"{proc.stdout}\n{proc.stderr}\n{self.node.output()[-4000:]}")

    def router(self, host: str) -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.lb_port, timeout=5)
        try:
            conn.request("GET", "/", headers={"Host": host})
            resp = conn.getresponse()
            return resp.status, resp.read().decode("utf-8", "replace")
        finally:
            conn.close()

    def test_uid_range_quota_and_rate(self) -> None:
        """With runner.uid_min = 47000 an app deploys and serves, through the router,
        from a process whose UID and GID are in 47000-47999; the fourth app of a user
        with max_apps_per_user = 3 is 429 app_quota_exceeded with Retry-After (the
        window; with a destroyed app, the time until its purge: it counts until then);
        the creation beyond 6 creations, destructions and purges in the window is 429
        rate_limited with a Retry-After within the window; destroying and purging are
        never refused."""
        self.node.wait_for_log("api ready", timeout=60)
        admin = (self.tmp / "data" / "admin-token").read_text().strip()
        status, _, body = self.api("POST", "users", admin, {"name": "carol"})
        self.assertEqual(status, 201, body)
        carol = body["token"]

        status, _, body = self.api("POST", "apps", carol, {"name": "who"})  # change 1
        self.assertEqual(status, 201, body)
        src = self.tmp / "who"
        src.mkdir()
        (src / "app.py").write_text(UID_APP)
        (src / "epio.ini").write_text("[wsgi]\nentrypoint = app:application\n")
        self.deploy("who", src, carol)
        status, text = wait_until("the app serves through the router",
                                  lambda: (lambda r: r if r[0] == 200 else None)(
                                      self.router("who.localhost")), timeout=30)
        fields = dict(kv.split("=") for kv in text.split())
        uid, gid = int(fields["uid"]), int(fields["gid"])
        self.assertTrue(UID_MIN <= uid <= UID_MAX, text)
        self.assertEqual(gid, uid)

        for name in ("two", "three"):  # changes 2, 3: carol owns 3 apps
            self.assertEqual(self.api("POST", "apps", carol, {"name": name})[0], 201)
        status, headers, body = self.api("POST", "apps", carol, {"name": "four"})
        self.assertEqual((status, body["error"]["code"]), (429, "app_quota_exceeded"), body)
        self.assertEqual(headers.get("Retry-After"), str(int(WINDOW)))
        self.assertEqual(self.api("GET", "apps/four", carol)[0], 404)

        # a destroyed app still counts, until it is purged (Retry-After: that time)
        self.assertEqual(self.api("DELETE", "apps/two", carol)[0], 200)  # change 4
        status, headers, body = self.api("POST", "apps", carol, {"name": "four"})
        self.assertEqual((status, body["error"]["code"]), (429, "app_quota_exceeded"), body)
        self.assertTrue(7 * 86400 - 60 < int(headers["Retry-After"]) <= 7 * 86400, headers)
        self.assertEqual(self.api("DELETE", "destroyed-apps/two", carol)[0], 200)  # 5
        self.assertEqual(self.api("POST", "apps", carol, {"name": "five"})[0], 201)  # 6
        # over the rate now, destroying and purging still work (changes 7, 8)
        self.assertEqual(self.api("DELETE", "apps/five", carol)[0], 200)
        self.assertEqual(self.api("DELETE", "destroyed-apps/five", carol)[0], 200)
        status, headers, body = self.api("POST", "apps", carol, {"name": "six"})  # 2 apps
        self.assertEqual((status, body["error"]["code"]), (429, "rate_limited"), body)
        retry = int(headers["Retry-After"])
        self.assertTrue(0 < retry <= WINDOW, retry)
        # the admin has limits of their own, untouched by carol's
        self.assertEqual(self.api("POST", "apps", admin, {"name": "six"})[0], 201)
        self.assertEqual(self.router("who.localhost")[0], 200)
        self.assertNotIn("Traceback", self.node.output())


def _unmount_under(root: Path) -> None:
    """Lazily unmount what a killed node left mounted under ``root``."""
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
              if line.split()[1].startswith(str(root) + "/")]
    for mount in sorted(mounts, reverse=True):
        subprocess.run(["umount", "-l", mount], capture_output=True, check=False)
