"""A real node process: starts every role, stops cleanly, refuses bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from epio.tap import ROLES
from tests.util import TWISTD, NodeProcess, child_processes, epio_env, isolated_config, to_toml


class NodeProcessTests(SynchronousTestCase):
    def test_all_roles_start_and_stop_cleanly(self) -> None:
        """`twistd -n epio --role=all` starts every role's service with no external
        service, creates data dir, secret and store, and exits 0 on SIGTERM."""
        doc, _ = isolated_config()
        node = NodeProcess(["--role=all"], config=to_toml(doc))
        self.addCleanup(node.cleanup)
        node.wait_for_log("service backup started", timeout=60)
        # services start before the reactor runs and installs its SIGTERM handler; the
        # router listening (once the in-process nexus gave it a table) shows the
        # reactor running
        node.wait_for_log("router listening on", timeout=60)
        # one router process beside the nexus: it follows the nexuses inline, no route
        # feed process (lb.route_feed = "auto"); an idle node on SQLite, without
        # acme.directory and with no live tail open, loads neither psycopg2, nor
        # requests (the ACME client's), nor autobahn's websocket code: each shows by a
        # compiled library of its own (docs/router.md "Memory of an idle node")
        self.assertEqual(child_processes(node.proc.pid, "epio.lb.feed"), [])
        maps = Path(f"/proc/{node.proc.pid}/maps").read_text()
        self.assertIn("python", maps)
        for lib in ("_psycopg", "charset_normalizer", "_nvx_utf8validator"):
            self.assertNotIn(lib, maps)
        out = node.output()
        for role in [*ROLES, "store"]:
            self.assertIn(f"service {role} started", out)
        self.assertTrue((node.data_dir / "cluster-secret").exists())
        self.assertEqual((node.data_dir / "cluster-secret").stat().st_mode & 0o777, 0o600)
        self.assertTrue((node.data_dir / "store.sqlite3").exists())
        code = node.stop(timeout=40)
        out = node.output()
        # twistd shuts down cleanly, then re-raises SIGTERM so the exit status says
        # what stopped it (systemd counts that as a clean stop).
        self.assertIn(code, (0, -signal.SIGTERM), out)
        self.assertIn("Server Shut Down", out)
        self.assertNotIn("Traceback", out)

    def test_route_feed_process_carries_no_tls(self) -> None:
        """With ``lb.route_feed = "process"`` a --role=all node runs one route feed
        process, which serves the table the router waits for and loads neither
        pyOpenSSL/cryptography nor the ssl module (docs/router.md "Memory")."""
        doc, _ = isolated_config({"lb": {"route_feed": "process"}})
        node = NodeProcess(["--role=all"], config=to_toml(doc))
        self.addCleanup(node.cleanup)
        node.wait_for_log("router listening on", timeout=60)
        feeds = child_processes(node.proc.pid, "epio.lb.feed")
        self.assertEqual(len(feeds), 1)
        maps = Path(f"/proc/{feeds[0]}/maps").read_text()
        self.assertIn("python", maps)
        for lib in ("cryptography", "/OpenSSL/", "_ssl."):
            self.assertNotIn(lib, maps)
        code = node.stop(timeout=40)
        self.assertIn(code, (0, -signal.SIGTERM), node.output())

    def test_bogus_role(self) -> None:
        """`twistd epio --role=bogus` exits non-zero naming the valid roles."""
        with tempfile.TemporaryDirectory() as tmp:
            proc = subprocess.run(
                [*TWISTD, "-n", "--pidfile=", "epio", "--role=bogus", "--data-dir", tmp],
                env=epio_env(), capture_output=True, text=True, timeout=60, cwd=tmp,
            )
        self.assertNotEqual(proc.returncode, 0)
        message = proc.stdout + proc.stderr
        self.assertIn("bogus", message)
        for role in [*ROLES, "all"]:
            self.assertIn(role, message)
        self.assertNotIn("Traceback", message)

    def test_bad_config_lists_every_error(self) -> None:
        """A config file with several errors makes twistd exit non-zero listing each."""
        with tempfile.TemporaryDirectory() as tmp:
            cfg = Path(tmp) / "epio.toml"
            cfg.write_text('[lb]\nlisten = 1\n[api]\nnope = "x"\n')
            proc = subprocess.run(
                [*TWISTD, "-n", "--pidfile=", "epio", "--config", str(cfg), "--data-dir", tmp],
                env=epio_env(), capture_output=True, text=True, timeout=60, cwd=tmp,
            )
        message = proc.stdout + proc.stderr
        self.assertNotEqual(proc.returncode, 0)
        self.assertIn("lb.listen", message)
        self.assertIn("api.nope", message)


class InstalledPackageTests(SynchronousTestCase):
    def test_installed_plugin_and_cli(self) -> None:
        """When epio is installed (as `.ci/run` does), twistd finds the plugin and the
        `epio` console script answers --version, without the checkout on the path."""
        with tempfile.TemporaryDirectory() as tmp:
            env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
            probe = subprocess.run(
                [sys.executable, "-c", "import epio, sys; print(epio.__file__)"],
                env=env, capture_output=True, text=True, cwd=tmp, timeout=60,
            )
            if probe.returncode != 0:
                raise self.skipTest("epio is not installed in this interpreter (checkout-only run)")
            bindir = Path(sys.executable).parent
            helptext = subprocess.run(
                [str(bindir / "twistd"), "--help"], env=env, capture_output=True, text=True,
                cwd=tmp, timeout=60,
            )
            self.assertIn("epio", helptext.stdout)
            version = subprocess.run(
                [str(bindir / "epio"), "--version"], env=env, capture_output=True, text=True,
                cwd=tmp, timeout=60,
            )
            self.assertEqual(version.returncode, 0, version.stderr)
            self.assertRegex(version.stdout, r"^epio \d+\.\d+")
