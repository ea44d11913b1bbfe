"""Standby servers of dedicated PostgreSQL and Redis add-ons across two real runners.

Runner A is a ``--role=all`` node (api, scheduler, nexus, runner) on this host; runner
B is a ``--role=runner`` node in a network namespace of its own (a host of its own: the
same app UIDs, its own ports and fence), joined to this host by a veth pair, sharing the
SQLite store file and the cluster secret.  The add-ons' primaries land on B, their
standbys on A.  Then: a manual PostgreSQL failover (every committed row is on the new
primary, which takes writes; the URL changes in a release; a new standby is built on B);
B's whole host is killed while Redis is written: after ``addons.failover_after`` the
leader promotes A's replica, every write acknowledged before the kill is there; B comes
back and its runner refuses to start the fenced old primary, which never answers again.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg2
from twisted.trial.unittest import SynchronousTestCase

from tests.integration.addons.helpers import AddonNode
from tests.integration.e2e.test_quickstart import wait_until
from tests.util import TWISTD, epio_env, free_port, to_toml

FAILOVER_AFTER = 6.0
REGISTER_INTERVAL = 1.0  # runner.register_interval: how old the runner's node row can be


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(argv), capture_output=True, text=True, timeout=60)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {r.returncode}: {r.stdout}{r.stderr}")
    return r


def unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "nsenter", "redis-server", "redis-cli"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    if not list(Path("/usr/lib/postgresql").glob("*/bin/pg_basebackup")):
        return "needs PostgreSQL server binaries"
    return None


class OtherHost:
    """A network namespace joined to this host by a veth pair: ``here`` is this host's
    address on the link, ``addr`` the namespace's."""

    def __init__(self, test: SynchronousTestCase) -> None:
        tag = secrets.token_hex(3)
        self.ns, self.veth = f"epsb-{tag}", f"epsb{tag}"
        octet = int(tag[:2], 16) % 200 + 20
        self.here, self.addr = f"10.233.{octet}.1", f"10.233.{octet}.2"
        sh("ip", "netns", "add", self.ns)
        test.addCleanup(self.remove)
        sh("ip", "link", "add", self.veth, "type", "veth", "peer", "name", "eth0",
           "netns", self.ns)
        sh("ip", "addr", "add", f"{self.here}/30", "dev", self.veth)
        sh("ip", "link", "set", self.veth, "up")
        inside = ["ip", "netns", "exec", self.ns]
        sh(*inside, "ip", "addr", "add", f"{self.addr}/30", "dev", "eth0")
        sh(*inside, "ip", "link", "set", "eth0", "up")
        sh(*inside, "ip", "link", "set", "lo", "up")

    def pids(self) -> list[int]:
        r = sh("ip", "netns", "pids", self.ns, check=False)
        return [int(p) for p in r.stdout.split()] if r.returncode == 0 else []

    def kill(self) -> None:
        """The host dies: every process in it is SIGKILLed (servers included)."""
        for _ in range(50):
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)

    def remove(self) -> None:
        self.kill()
        sh("ip", "link", "del", self.veth, check=False)
        sh("ip", "netns", "del", self.ns, check=False)


class NsNode:
    """``twistd epio --role=runner`` inside ``host``'s network namespace."""

    def __init__(self, host: OtherHost, data_dir: Path, config: str) -> None:
        self.data_dir = data_dir
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        cfg = data_dir.parent / "runner.toml"
        cfg.write_text(config)
        self.log_path = data_dir.parent / f"runner-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{host.ns}", *TWISTD, "-n", "--pidfile=",
             "--logfile=-", "epio", "--data-dir", str(data_dir), "--config", str(cfg),
             "--role=runner"], stdout=self._log, stderr=subprocess.STDOUT, env=epio_env(None),
            cwd=str(data_dir.parent), start_new_session=True)

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text("utf-8", "replace")

    def wait_for_log(self, text: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not logged:\n{self.output()[-5000:]}")
            time.sleep(0.1)

    def reap(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self._log.close()


def redis_cmd(host: str, port: int, password: str, *args: str) -> str:
    return subprocess.run(["redis-cli", "-h", host, "-p", str(port), *args],
                          capture_output=True, text=True, timeout=10,
                          env={**os.environ, "REDISCLI_AUTH": password}).stdout.strip()


def redis_sets(host: str, port: int, password: str, keys: range) -> list[str]:
    """``SET k{i} i`` for each i, through one redis-cli reading them from stdin: it sends
    each command only after the reply to the one before (one process, not one each);
    the replies, one a line."""
    script = "".join(f"SET k{i} {i}\n" for i in keys)
    return subprocess.run(["redis-cli", "-h", host, "-p", str(port)], input=script,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "REDISCLI_AUTH": password}).stdout.split()


class StandbyTests(SynchronousTestCase):
    def setUp(self) -> None:
        if unavailable():
            self.skipTest(unavailable() or "")
        self.b_host = OtherHost(self)
        tmp = Path(tempfile.mkdtemp(prefix="epio-standby-"))
        os.chmod(tmp, 0o711)
        self.addCleanup(shutil.rmtree, tmp, True)
        secret = tmp / "secret"
        fd = os.open(secret, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, secrets.token_bytes(32).hex().encode() + b"\n")
        os.close(fd)
        here = self.b_host.here
        nexus = {"heartbeat": f"tcp://{here}:{free_port()}", "router": f"tcp://{here}:{free_port()}",
                 "publish": f"tcp://{here}:{free_port()}"}
        pull = f"tcp://{here}:{free_port()}"
        uids = {"uid_min": 52000 + 500 * secrets.randbelow(10)}
        uids["uid_max"] = uids["uid_min"] + 499
        cluster = {"secret_file": str(secret), "nexus": [nexus], "loggers": [pull]}
        self.store_path = tmp / "store.sqlite3"
        store = {"url": f"sqlite:///{self.store_path}"}
        timing = {"runner_dead_after": FAILOVER_AFTER}
        self.metrics_port = free_port()
        self.a = AddonNode(self, {
            "node": {"id": "node-a"}, "store": store, "cluster": cluster,
            "nexus": {"heartbeat_bind": nexus["heartbeat"], "router_bind": nexus["router"],
                      "publish_bind": nexus["publish"]},
            "logger": {"pull_bind": pull},
            "api": {"reconcile_interval": 0.5, "drain_seconds": 0.5, "stop_grace": 3.0,
                    "rollout_timeout": 60.0, **timing},
            "runner": {"backoff_initial": 0.2, "register_interval": REGISTER_INTERVAL,
                       "control_bind": f"tcp://{here}:{free_port()}", "advertise_host": here,
                       "fence_hosts": [self.b_host.addr], **uids},
            "addons": {"keeper_interval": 1.0, "failover_after": FAILOVER_AFTER,
                       "service_boot_timeout": 90.0},
            "metrics": {"listen": f"tcp:{self.metrics_port}:interface=127.0.0.1"},
        }, root=tmp)
        b_doc = {
            "node": {"id": "b-node"}, "store": store, "cluster": cluster,
            "runner": {"backoff_initial": 0.2, "register_interval": REGISTER_INTERVAL,
                       "control_bind": f"tcp://{self.b_host.addr}:{free_port()}",
                       "advertise_host": self.b_host.addr, "fence_hosts": [here],
                       "static_listen": "", **uids},
            "addons": {"keeper_interval": 1.0},
        }
        self.b_config = to_toml(b_doc)
        self.b_data = tmp / "b" / "data"
        self.a.start()
        self.b = self.start_b()

    def start_b(self) -> NsNode:
        b = NsNode(self.b_host, self.b_data, self.b_config)
        self.addCleanup(b.reap)
        b.wait_for_log("runner b-node: sandbox=", timeout=90)
        return b

    def b_registered(self) -> bool | None:
        import sqlite3

        with sqlite3.connect(str(self.store_path), timeout=10) as db:
            row = db.execute("SELECT last_seen FROM nodes WHERE id = 'b-node'").fetchone()
        return True if row and time.time() - float(row[0]) < 5 else None

    def fail_with_logs(self, what: str) -> AssertionError:
        return AssertionError(f"{what}\n--- node a ---\n{self.a.node.output()[-6000:]}\n"
                              f"--- node b ---\n{self.b.output()[-4000:]}")

    def addon(self, app: str, kind: str) -> dict[str, Any]:
        return dict(self.a.json("addons", "info", kind, "--app", app))

    def wait_standby(self, app: str, kind: str, node: str, timeout: float = 120.0
                     ) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            a = self.addon(app, kind)
            s = a.get("standby") or {}
            if s.get("state") == "ready" and s.get("node") == node \
                    and s.get("replication") in ("streaming", "online"):
                return a
            return None

        try:
            return wait_until(f"{kind} standby ready on {node}", ready, timeout=timeout)
        except Exception:
            raise self.fail_with_logs(f"{kind} standby not ready on {node}: "
                                      f"{self.addon(app, kind)}") from None

    def test_automatic_then_manual_failover(self) -> None:
        """Primaries on B, standbys on A with their lag shown; B's host is killed after
        committed rows and acknowledged writes: after addons.failover_after the leader
        promotes both standbys, every write is there; B comes back, its runner refuses
        the fenced old primaries, new standbys are built there; a manual failover of
        both back to B keeps every write, the URLs change in releases."""
        started = time.monotonic()
        n = self.a
        app = "sb" + secrets.token_hex(3)
        n.create_app(app)
        wait_until("runner B registered", self.b_registered, timeout=60)
        for kind in ("postgres", "redis"):
            code, out, err = n.epio("addons", "create", kind, "--standby", "--app", app,
                                    check=False)
            if code != 0:
                raise self.fail_with_logs(f"create {kind} --standby: {out}{err}")
        pg = self.wait_standby(app, "postgres", "node-a")
        rd = self.wait_standby(app, "redis", "node-a")
        # "b-node" sorts before "node-a": with equal load a new primary goes to B
        self.assertEqual((pg["node"], rd["node"]), ("b-node", "b-node"))
        self.assertEqual((pg["epoch"], rd["epoch"]), (1, 1))
        listing = n.epio("addons", "--app", app)[1]
        self.assertIn("STANDBY", listing)
        self.assertIn("node-a streaming, lag", listing)
        self.assertIn("node-a online, lag", listing)
        sys.stderr.write(f"[standby] both standbys streaming after "
                         f"{time.monotonic() - started:.1f}s\n{listing}\n")

        # --- writes: committed rows, acknowledged keys --------------------------------
        db_url = n.config(app)["DATABASE_URL"]
        conn = psycopg2.connect(db_url)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
            for i in range(300):
                cur.execute("INSERT INTO t VALUES (%s, %s)", (i, f"row {i}"))
        conn.close()
        redis_url = urlsplit(n.config(app)["REDIS_URL"])
        host, port, pw = str(redis_url.hostname), int(redis_url.port or 0), \
            str(redis_url.password)
        self.assertEqual(host, self.b_host.addr)
        self.assertEqual(redis_sets(host, port, pw, range(500)), ["OK"] * 500)

        # the lag as /metrics shows it (the leader measures it every keeper_interval)
        def metric() -> str | None:
            body = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                          timeout=10).read().decode()
            line = [x for x in body.splitlines() if x.startswith(
                "epio_addon_replication_lag_bytes{") and f'app="{app}"' in x
                and 'kind="postgres"' in x]
            return line[0] if line else None

        sys.stderr.write(f"[standby] {wait_until('lag in /metrics', metric, timeout=30)}\n")

        # --- B's host dies: automatic failover of both --------------------------------
        killed = time.monotonic()
        self.b_host.kill()
        self.b.reap()

        def switched() -> dict[str, str] | None:
            config = n.config(app)
            moved = all(urlsplit(config.get(var, "")).hostname == self.b_host.here
                        for var in ("DATABASE_URL", "REDIS_URL"))
            return config if moved else None

        try:
            config = wait_until("automatic failover", switched, timeout=120)
        except Exception:
            raise self.fail_with_logs("no automatic failover") from None
        took = time.monotonic() - killed
        sys.stderr.write(f"[standby] automatic failover of both {took:.1f}s after the host "
                         f"died (addons.failover_after = {FAILOVER_AFTER:g}s)\n")
        # the window runs from the runner's last node-row refresh, at most
        # runner.register_interval before the kill: never a failover earlier than that
        self.assertGreaterEqual(took, FAILOVER_AFTER - REGISTER_INTERVAL)
        self.assertRows(config["DATABASE_URL"], 300)
        self.assertKeys(config["REDIS_URL"], 500)
        for kind in ("postgres", "redis"):
            a = self.addon(app, kind)
            self.assertEqual((a["node"], a["epoch"]), ("node-a", 2))
            self.assertIn("automatic", json.dumps(a["standby"]["last_failover"]))
        with self.assertRaises(psycopg2.OperationalError):  # B is gone
            psycopg2.connect(db_url, connect_timeout=2).close()

        # --- B comes back: its runner refuses the fenced old primaries ----------------
        self.b = self.start_b()
        try:
            wait_until("the old primaries refused", lambda: (
                "fenced: the redis add-on" in self.b.output()
                and "fenced: the postgres add-on" in self.b.output()) or None, timeout=60)
        except Exception:
            raise self.fail_with_logs("the fenced primaries were not refused") from None
        self.assertEqual(redis_cmd(host, port, pw, "PING"), "")  # nothing answers there
        with self.assertRaises(psycopg2.OperationalError):
            psycopg2.connect(db_url, connect_timeout=2).close()
        # new standbys on B (the old primaries' data dirs are not reused)
        self.wait_standby(app, "postgres", "b-node")
        self.wait_standby(app, "redis", "b-node")

        # --- a manual failover of both back to B ----------------------------------------
        conn = psycopg2.connect(config["DATABASE_URL"])
        conn.autocommit = True
        with conn.cursor() as cur:
            for i in range(300, 400):
                cur.execute("INSERT INTO t VALUES (%s, %s)", (i, f"row {i}"))
        conn.close()
        rurl = urlsplit(config["REDIS_URL"])
        self.assertEqual(redis_sets(str(rurl.hostname), int(rurl.port or 0), pw,
                                    range(500, 600)), ["OK"] * 100)
        for kind, var in (("postgres", "DATABASE_URL"), ("redis", "REDIS_URL")):
            t0 = time.monotonic()
            code, out, err = n.epio("addons", "failover", kind, "--app", app, "--confirm",
                                    app, check=False)
            if code != 0:
                raise self.fail_with_logs(f"failover {kind}: {out}{err}")
            sys.stderr.write(f"[standby] manual {kind} failover: "
                             f"{time.monotonic() - t0:.1f}s (new standby included)\n")
            self.assertEqual(urlsplit(n.config(app)[var]).hostname, self.b_host.addr)
        config = n.config(app)
        self.assertRows(config["DATABASE_URL"], 400)
        self.assertKeys(config["REDIS_URL"], 600)
        # and new standbys on A, following the new primaries
        self.wait_standby(app, "postgres", "node-a")
        self.wait_standby(app, "redis", "node-a")
        releases = n.epio("releases", "--app", app)[1]
        self.assertIn("Failover of postgres to b-node (epoch 3)", releases)
        self.assertIn("Failover of redis to b-node (epoch 3)", releases)
        self.assertNotIn(pw, n.node.output())
        self.assertNotIn(pw, self.b.output())

    def assertRows(self, url: str, count: int) -> None:
        """Every committed row is there, and the server takes writes."""
        conn = psycopg2.connect(url)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT count(*), min(id), max(id) FROM t")
                self.assertEqual(cur.fetchone(), (count, 0, count - 1))
                cur.execute("INSERT INTO t VALUES (-1, 'writable'); DELETE FROM t WHERE id = -1")
        finally:
            conn.close()

    def assertKeys(self, url: str, count: int) -> None:
        """Every acknowledged key is there, and the server takes writes."""
        u = urlsplit(url)
        h, p, pw = str(u.hostname), int(u.port or 0), str(u.password)
        self.assertEqual(redis_cmd(h, p, pw, "DBSIZE"), str(count))
        values = redis_cmd(h, p, pw, "MGET", *[f"k{i}" for i in range(count)]).split("\n")
        self.assertEqual(values, [str(i) for i in range(count)])
        self.assertEqual(redis_cmd(h, p, pw, "SET", "probe", "1"), "OK")
        self.assertEqual(redis_cmd(h, p, pw, "DEL", "probe"), "1")
