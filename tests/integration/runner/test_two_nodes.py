"""Two ``--role=all`` nodes on one host: each node's network fence fences only the
UIDs its own runner runs, so neither refuses the other's apps (issue 20).

Before, each runner's table matched its whole ``runner.uid_min``-``uid_max``
range, and every test node used the default range: the apps of node B got
"Connection refused" from node A's table for what only B's table allows.
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
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.util import NodeProcess, epio_env, isolated_config, to_toml

PROBE_APP = '''\
import json
import os
import socket


def reach(port):
    s = socket.socket()
    s.settimeout(3)
    try:
        s.connect(("127.0.0.1", port))
        return "ok"
    except ConnectionRefusedError:
        return "ECONNREFUSED"
    except OSError as e:
        return type(e).__name__
    finally:
        s.close()


def application(environ, start_response):
    body = json.dumps({"uid": os.getuid(),
                       "postgres": reach(5432), "redis": reach(6379)}).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
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


def _unmount_under(root: Path) -> None:
    """Lazily unmount what a killed node left mounted under ``root``."""
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
              if line.split()[1].startswith(str(root) + "/")]
    for mount in sorted(mounts, reverse=True):
        subprocess.run(["umount", "-l", mount], capture_output=True, check=False)


class Node:
    """One ``--role=all`` node with its own data dir, ports and ranges."""

    def __init__(self, test: SynchronousTestCase, tmp: Path, name: str,
                 runner: dict[str, object]) -> None:
        self.tmp = tmp / name
        self.tmp.mkdir()
        doc, _ = isolated_config({
            "api": {"reconcile_interval": 0.5, "drain_seconds": 0.5, "stop_grace": 2.0,
                    "rollout_timeout": 120.0},
            "runner": {"backoff_initial": 0.2, **runner},
        })
        self.api_port = int(str(doc["api"]["listen"]).split(":")[1])
        self.lb_port = int(str(doc["lb"]["listen"]).split(":")[1])
        self.node = NodeProcess(["--role=all"], data_dir=self.tmp / "data",
                                config=to_toml(doc))
        test.addCleanup(self.node.cleanup)

    def deploy(self, app: str, src: Path) -> subprocess.CompletedProcess[str]:
        token = (self.tmp / "data" / "admin-token").read_text().strip()
        env = epio_env({"EPIO_API": f"http://127.0.0.1:{self.api_port}", "EPIO_TOKEN": token,
                        "EPIO_CONFIG_DIR": str(self.tmp / "cli"), "HOME": str(self.tmp)})
        cli = [sys.executable, "-c",
               "import sys; from epio.cli.main import main; sys.exit(main())"]
        created = subprocess.run([*cli, "apps", "create", app, "--no-remember"],
                                 capture_output=True, text=True, env=env, timeout=60)
        if created.returncode != 0:
            return created
        return subprocess.run([*cli, "deploy", str(src), "--app", app, "--poll", "0.5"],
                              capture_output=True, text=True, env=env, timeout=300)

    def get(self, host: str) -> dict[str, Any] | None:
        conn = http.client.HTTPConnection("127.0.0.1", self.lb_port, timeout=10)
        try:
            conn.request("GET", "/", headers={"Host": host})
            resp = conn.getresponse()
            body = resp.read()
            return json.loads(body) if resp.status == 200 else None
        finally:
            conn.close()


class TwoNodesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="epio-two-nodes-"))
        os.chmod(self.tmp, 0o711)  # app and build users traverse it
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.addCleanup(_unmount_under, self.tmp)  # after the nodes are killed (LIFO)

    def test_each_nodes_apps_reach_what_their_own_fence_allows(self) -> None:
        """Node A (UIDs 40000-49999, its first app gets 40000; fence_allow_ports 6379)
        and node B (UIDs 45000-45099: inside A's configured range, as every test node
        shared the default range -- two clusters, each with its own store, so no
        store sees the other; fence_allow_ports 5432), disjoint instance port ranges,
        each deploy an app whose web process connects to 127.0.0.1:5432 (PostgreSQL)
        and :6379 (Redis) and reports it through its router: A's app reaches Redis and
        B's app reaches PostgreSQL (before, A's table also matched B's UID and refused
        it) while each is still refused what its own fence does not allow (deny by
        default for a runner's own apps)."""
        base = random.randrange(21000, 31000, 200)  # below 32768: not ephemeral
        a = Node(self, self.tmp, "a", {"uid_min": 40000, "uid_max": 49999,
                                       "port_min": base, "port_max": base + 99,
                                       "fence_allow_ports": [6379]})
        b = Node(self, self.tmp, "b", {"uid_min": 45000, "uid_max": 45099,
                                       "port_min": base + 100, "port_max": base + 199,
                                       "fence_allow_ports": [5432]})
        for n in (a, b):
            n.node.wait_for_log("api ready", timeout=90)
        src = self.tmp / "probe"
        src.mkdir()
        (src / "app.py").write_text(PROBE_APP)
        (src / "epio.ini").write_text("[wsgi]\nentrypoint = app:application\n")
        results: dict[str, subprocess.CompletedProcess[str]] = {}
        threads = [threading.Thread(target=lambda n=n, k=k: results.__setitem__(
            k, n.deploy("probe", src))) for k, n in (("a", a), ("b", b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(360)
        for k, n in (("a", a), ("b", b)):
            r = results[k]
            self.assertEqual(r.returncode, 0,
                             f"node {k}: {r.stdout}\n{r.stderr}\n{n.node.output()[-4000:]}")
        got_a = wait_until("A's app serves", lambda: a.get("probe.localhost"), 60)
        got_b = wait_until("B's app serves", lambda: b.get("probe.localhost"), 60)
        self.assertEqual(got_a, {"uid": 40000, "postgres": "ECONNREFUSED", "redis": "ok"})
        self.assertEqual(got_b, {"uid": 45000, "postgres": "ok", "redis": "ECONNREFUSED"})
        for n in (a, b):
            self.assertIn(n.node.stop(timeout=60), (0, -15), n.node.output()[-3000:])
