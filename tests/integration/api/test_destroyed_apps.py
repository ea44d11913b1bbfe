"""Destroyed apps on a real ``--role=all`` node, with the real ``epio`` CLI and HTTP
through the real router: destroy -> listed -> restore -> the app serves the data it
had; destroy -> purge -> its data dir (and what its builds kept on the node) is gone
from the runner and nothing is left to restore."""

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

NOTE_APP = '''\
import os

NOTE = os.path.join(os.environ["EPIO_DATA_DIR"], "note")


def application(environ, start_response):
    if environ["REQUEST_METHOD"] == "POST":
        size = int(environ.get("CONTENT_LENGTH") or 0)
        with open(NOTE, "wb") as f:
            f.write(environ["wsgi.input"].read(size))
    try:
        with open(NOTE, "rb") as f:
            body = f.read()
    except FileNotFoundError:
        body = b"no note"
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
        except OSError as e:
            last = e
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not true after {timeout:g}s (last: {last!r})")
        time.sleep(0.3)


class DestroyedAppsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="epio-destroyed-"))
        os.chmod(self.tmp, 0o711)  # app and build users traverse it
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.addCleanup(_unmount_under, self.tmp)  # after the node is killed (LIFO)
        base = random.randrange(21000, 32000, 100)  # below 32768: not ephemeral
        doc, _ = isolated_config({
            "api": {"reconcile_interval": 0.5, "drain_seconds": 0.5, "stop_grace": 2.0,
                    "rollout_timeout": 60.0},
            "runner": {"backoff_initial": 0.2, "port_min": base, "port_max": base + 99},
        })
        self.api_port = int(str(doc["api"]["listen"]).split(":")[1])
        self.lb_port = int(str(doc["lb"]["listen"]).split(":")[1])
        self.node = NodeProcess(["--role=all"], data_dir=self.tmp / "data", config=to_toml(doc))
        self.addCleanup(self.node.cleanup)

    def epio(self, *args: str, check: bool = True) -> tuple[int, str, str]:
        env = epio_env({"EPIO_API": f"http://127.0.0.1:{self.api_port}", "EPIO_TOKEN":
                        (self.tmp / "data" / "admin-token").read_text().strip(),
                        "EPIO_CONFIG_DIR": str(self.tmp / "cli"), "HOME": str(self.tmp)})
        proc = subprocess.run(
            [sys.executable, "-c", "import sys; from epio.cli.main import main; sys.exit(main())",
             *args], capture_output=True, text=True, env=env, timeout=240, cwd=self.tmp)
        if check:
            self.assertEqual(proc.returncode, 0, f"epio {' '.join(args)}:\n{proc.stdout}\n"
                             f"{proc.stderr}\n{self.node.output()[-4000:]}")
        return proc.returncode, proc.stdout, proc.stderr

    def router(self, method: str = "GET", body: bytes | None = None) -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.lb_port, timeout=5)
        try:
            conn.request(method, "/", body=body, headers={"Host": "notes.localhost"})
            resp = conn.getresponse()
            return resp.status, resp.read().decode("utf-8", "replace")
        finally:
            conn.close()

    def serves(self, text: str) -> Callable[[], bool]:
        return lambda: self.router() == (200, text)

    def test_destroy_restore_purge(self) -> None:
        """The app's data survives destroy + restore and is served again through the
        router; while destroyed it is not served and `epio apps destroyed` lists it;
        after `epio apps purge` the runner has no data dir of it, nor the kept install
        of its requirements, and restore fails."""
        self.node.wait_for_log("api ready", timeout=60)
        self.epio("apps", "create", "notes", "--no-remember")
        src = self.tmp / "notes"
        src.mkdir()
        (src / "app.py").write_text(NOTE_APP)
        (src / "epio.ini").write_text("[wsgi]\nentrypoint = app:application\n")
        self.epio("deploy", str(src), "--app", "notes", "--poll", "0.5")
        wait_until("the app serves", self.serves("no note"), timeout=30)
        self.assertEqual(self.router("POST", b"old data"), (200, "old data"))
        appdata = self.tmp / "data" / "appdata" / "notes"
        self.assertEqual((appdata / "note").read_text(), "old data")

        _, out, _ = self.epio("apps", "destroy", "notes", "--confirm", "notes")
        self.assertIn("Destroyed notes", out)
        wait_until("the router stops serving it", lambda: self.router()[0] == 404, timeout=30)
        _, out, _ = self.epio("apps", "destroyed", "--json")
        [listed] = json.loads(out)
        self.assertEqual((listed["name"], listed["owner"]), ("notes", "admin"))
        self.assertTrue(6.9 * 86400 < listed["purge_after"] - listed["destroyed"] <= 7 * 86400)
        _, out, _ = self.epio("apps", "--json")
        self.assertEqual(json.loads(out), [])
        self.assertEqual((appdata / "note").read_text(), "old data")  # kept

        _, out, _ = self.epio("apps", "restore", "notes")
        self.assertIn("Restored notes", out)
        wait_until("the restored app serves its old data", self.serves("old data"), timeout=60)
        self.assertEqual(json.loads(self.epio("apps", "destroyed", "--json")[1]), [])

        self.epio("apps", "destroy", "notes", "--confirm", "notes")
        wait_until("the router stops serving it", lambda: self.router()[0] == 404, timeout=30)
        # what a build with requirements keeps of the app (docs/builds.md), as the
        # builder leaves it: the purge deletes it too, so a later app named notes
        # never installs it
        kept = self.tmp / "data" / "cache" / "installed" / "notes" / "0123abcd"
        (kept / "site-packages" / "oldpkg").mkdir(parents=True)
        (kept / "site-packages" / "oldpkg" / "__init__.py").write_text("OLD = 1\n")
        other = self.tmp / "data" / "cache" / "installed" / "notes2" / "0123abcd"
        (other / "site-packages").mkdir(parents=True)
        _, out, _ = self.epio("apps", "purge", "notes", "--confirm", "notes")
        self.assertIn("Purged notes", out)
        self.assertFalse(appdata.exists())
        self.assertFalse(kept.parent.exists())
        self.assertTrue((other / "site-packages").is_dir())  # another app's: kept
        self.assertFalse(any((self.tmp / "data" / "appdata").glob(".retired/notes*")))
        self.assertEqual(json.loads(self.epio("apps", "destroyed", "--json")[1]), [])
        code, _, err = self.epio("apps", "restore", "notes", check=False)
        self.assertEqual(code, 1)
        self.assertIn("no destroyed app named 'notes'", err)
        self.assertIn("data dir of purged app notes", self.node.output())
        self.assertNotIn("Traceback", self.node.output())


def _unmount_under(root: Path) -> None:
    """Lazily unmount what a killed node left mounted under ``root``."""
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
              if line.split()[1].startswith(str(root) + "/")]
    for mount in sorted(mounts, reverse=True):
        subprocess.run(["umount", "-l", mount], capture_output=True, check=False)
