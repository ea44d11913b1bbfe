"""Add-on data survives every stop (issue 17): a deployed app's dedicated Redis and
PostgreSQL, with data written, on one node that is (a) stopped with SIGTERM and started
again (three times: the backup round at each start waits for the servers, so
``epio backups`` lists no failed backup), (b) killed with SIGKILL and started again, then
(c) whose add-on server processes are killed with SIGKILL (the runner restarts them).
Then a Redis restore through the CLI (restore, then switch; the previous data kept as
a pinned backup, itself restorable).  Last (the node runs on a btrfs loop file where
the machine allows), the runner's btrfs snapshots of both data dirs are listed and
restored through the CLI.  After each, every Redis write
acknowledged more than a second before the stop and every committed PostgreSQL row is
there.  A clean stop is a clean stop: Redis' SHUTDOWN SAVE and PostgreSQL's fast
shutdown are in the app's log."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg2
from twisted.trial.unittest import SynchronousTestCase

from epio.addons import btrfs
from tests.integration.addons.helpers import AddonNode
from tests.integration.addons.test_dedicated import redis_cli
from tests.integration.e2e.test_quickstart import wait_until
from tests.util import CHECKOUT

# after an acknowledged write, how long before a kill it must have been made
# (appendfsync everysec) -- with a margin for a loaded machine
AOF_FSYNC_MARGIN = 1.5


class AddonDurabilityTests(SynchronousTestCase):
    def test_data_survives_stops_and_crashes(self) -> None:
        """(a) node SIGTERM + start, (b) node SIGKILL + start, (c) SIGKILL of redis-server
        and of the postmaster: after each, every acknowledged write is there."""
        root = btrfs_loop(self)  # the node on btrfs: its data dirs get snapshots
        # api.runner_dead_after well above a node restart on a loaded machine: this test
        # is about the data of a node that comes back, not about failing over a dead one
        # (a restart slower than it has the keeper start the servers a second time)
        # a port window of its own (below the kernel's ephemeral range): the servers get
        # their ports back after a restart even while other nodes run on this machine --
        # a port taken meanwhile would move a server, and nothing carries a move made by a
        # runner restart to the app's config vars (see docs/databases.md)
        base = 30000 + (os.getpid() % 20) * 100
        n = AddonNode(self, {"runner": {"backoff_initial": 0.2, "shutdown_grace": 10.0,
                                        "register_interval": 2.0, "port_min": base,
                                        "port_max": base + 99},
                             "api": {"reconcile_interval": 0.5, "drain_seconds": 0.5,
                                     "stop_grace": 3.0, "runner_dead_after": 60.0,
                                     "rollout_timeout": 60.0}},
                      root=root)
        n.start()
        app = "du" + secrets.token_hex(3)
        n.create_app(app)
        src = n.tmp / "src"
        shutil.copytree(CHECKOUT / "examples" / "wsgi", src)
        (src / "epio.ini").write_text(
            "[wsgi]\nentrypoint = app:application\n\n[services]\nredis = true\n"
            "postgres = dedicated\n\n[redis]\nmemory = 8\n")
        code, out, err = n.epio("deploy", str(src), "--app", app, "--poll", "0.5", check=False)
        if code != 0:
            logs = n.epio("logs", "--app", app, "-n", "300", check=False)[1]
            self.fail(f"deploy failed:\n{out}\n{err}\n--- app log ---\n{logs}")
        at: dict[str, Any] = {}

        def refresh() -> None:
            """The servers' current addresses (a server started again elsewhere, or on
            another port, is carried to the app's config vars)."""
            config = n.config(app)
            u = urlsplit(config["DATABASE_URL"])
            at["redis"] = config["REDIS_URL"]
            at["pg"] = dict(host=u.hostname, port=u.port, user=u.username,
                            password=u.password, dbname=u.path.lstrip("/"), connect_timeout=3)

        def write(step: str, rows: int) -> None:
            # one redis-cli for all: it sends each SET after the reply to the one before
            u = urlsplit(at["redis"])
            replies = subprocess.run(
                ["redis-cli", "-h", str(u.hostname), "-p", str(u.port)],
                input="".join(f"SET {step}:{i} v{i}\n" for i in range(rows)),
                capture_output=True, text=True, timeout=60,
                env={**os.environ, "REDISCLI_AUTH": u.password or ""}).stdout.split()
            self.assertEqual(replies, ["OK"] * rows)
            with psycopg2.connect(**at["pg"]) as conn, conn.cursor() as cur:
                cur.execute(f"CREATE TABLE {step} AS SELECT generate_series(1, %s) AS n",
                            (rows,))
            conn.close()
            time.sleep(AOF_FSYNC_MARGIN)

        def serving() -> bool:
            refresh()
            if redis_cli(at["redis"], "PING") != "PONG":
                return False
            try:
                psycopg2.connect(**at["pg"]).close()
            except psycopg2.OperationalError:
                return False
            return True

        def check(steps: dict[str, int], after: str) -> None:
            try:
                wait_until(f"both servers answer after {after}", serving, timeout=90)
            except AssertionError as e:
                ps = n.epio("ps", "--app", app, check=False)[1]
                logs = n.epio("logs", "--app", app, "-n", "60", check=False)[1]
                raise AssertionError(f"{e}\n--- ps ---\n{ps}\n--- app log ---\n{logs}\n"
                                     f"--- node log ---\n{n.node.output()[-6000:]}") from None
            for step, rows in steps.items():
                keys = redis_cli(at["redis"], "EVAL",
                                 "return #redis.call('KEYS', ARGV[1])", "0", f"{step}:*")
                self.assertEqual(keys, str(rows), f"redis keys of {step} after {after}")
                with psycopg2.connect(**at["pg"]) as conn, conn.cursor() as cur:
                    cur.execute(f"SELECT count(*) FROM {step}")
                    self.assertEqual(cur.fetchone(), (rows,), f"{step} after {after}")
                conn.close()

        refresh()
        def newest_backups() -> dict[str, dict]:
            found: dict[str, dict] = {}
            for b in n.json("backups", "--app", app):
                if b["kind"] not in found or b["created"] > found[b["kind"]]["created"]:
                    found[b["kind"]] = b
            return found

        def backed_up_since(before: dict[str, dict]) -> bool:
            now = newest_backups()
            return all(k in now and now[k]["id"] != before.get(k, {}).get("id")
                       and now[k]["status"] != "running" for k in ("postgres", "redis"))

        steps = {"a": 100}
        write("a", 100)
        made = n.json("backups", "create", "--app", app)
        self.assertEqual(sorted((b["kind"], b["status"]) for b in made),
                         [("postgres", "verified"), ("redis", "verified")])
        # (a) a clean node stop: the servers stop cleanly, then everything is back
        before = newest_backups()
        self.assertIn(n.node.stop(timeout=60), (0, -signal.SIGTERM))  # not the SIGKILL
        n.restart()
        check(steps, "a node SIGTERM and start")
        # Redis' SHUTDOWN SAVE wrote the RDB (scheduled snapshots are 15 min apart)
        [dump] = (n.node.data_dir / "appdata" / app).glob(".epio-redis-*/dump.rdb")
        self.assertGreater(dump.stat().st_size, 0)
        logs = n.epio("logs", "--app", app, "-n", "2000")[1]
        # PostgreSQL's fast shutdown completed: the next start finds a clean cluster
        starts = [line for line in logs.splitlines() if "LOG:  database system was" in line]
        self.assertEqual(len(starts), 2, starts)  # the first start (after initdb), this one
        self.assertIn("database system was shut down at", starts[-1])
        self.assertNotIn("did not exit in time: SIGKILL", logs)
        self.assertNotIn("EPIO_SERVICE_CONFIG", logs)  # the wrapper is not in the log

        # restarts x3: the backup round at each start waits until the servers accept
        # connections -- no failed backup; all verified, none flagged
        for i in range(3):
            try:
                wait_until(f"the backup round after start {i + 1}",
                           lambda b=before: backed_up_since(b), timeout=120)
            except AssertionError as e:
                raise AssertionError(
                    f"{e}\nbefore: {before}\nnow: {newest_backups()}\n--- node log ---\n"
                    f"{n.node.output()[-8000:]}") from None
            if i < 2:
                before = newest_backups()
                self.assertIn(n.node.stop(timeout=60), (0, -signal.SIGTERM))
                n.restart()
        listed = n.json("backups", "--app", app)
        self.assertEqual({(b["status"], b["suspicious"]) for b in listed}, {("verified", "")},
                         listed)
        _, table, _ = n.epio("backups", "--app", app)
        self.assertNotIn("FAILED", table)
        self.assertNotIn("FLAGGED:", table)
        check(steps, "three node restarts")

        # (b) the node is killed: the servers die with it (sandbox --die-with-parent)
        steps["b"] = 50
        write("b", 50)
        os.kill(n.node.proc.pid, signal.SIGKILL)
        n.node.proc.wait(10)
        n.restart()
        check(steps, "a node SIGKILL and start")

        # (c) the servers themselves are killed: the runner restarts them
        steps["c"] = 20
        write("c", 20)
        rport, pport = urlsplit(at["redis"]).port, at["pg"]["port"]
        patterns = [f"redis-server .*:{rport}", f"postgres -D .* -p {pport} "]
        pids = [pid_of(p) for p in patterns]
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        wait_until("both servers were started again (new processes)",
                   lambda: all(pid_of(p) != old for p, old in zip(patterns, pids, strict=True)),
                   timeout=60)
        check(steps, "a SIGKILL of redis-server and of the postmaster")

        # Redis restore through the CLI: restore-then-switch, the previous data kept as
        # a pinned backup that can itself be restored
        [first] = n.json("backups", "create", "--app", app, "--kind", "redis")
        self.assertEqual((first["status"], first["counts"]["keys_max"]), ("verified", 170))
        redis_url = at["redis"]
        redis_cli(redis_url, "SET", "a:0", "changed")
        redis_cli(redis_url, "SET", "extra", "x")
        _, out, _ = n.epio("backups", "restore", first["id"], "--app", app, "--confirm", app)
        self.assertRegex(out, r"the previous data is kept as backup \S+ \(170 keys restored\)")
        self.assertEqual(redis_cli(redis_url, "DBSIZE"), "170")
        self.assertEqual(redis_cli(redis_url, "GET", "a:0"), "v0")
        before = out.split("kept as backup ")[1].split()[0]
        [kept] = [b for b in n.json("backups", "--app", app) if b["id"] == before]
        self.assertEqual((kept["status"], kept["counts"]["keys_max"], kept["pinned"]),
                         ("verified", 171, f"the data before restoring backup {first['id']}"))
        n.epio("backups", "restore", before, "--app", app, "--confirm", app)
        self.assertEqual((redis_cli(redis_url, "DBSIZE"), redis_cli(redis_url, "GET", "a:0")),
                         ("171", "changed"))
        self.assertEqual(redis_cli(redis_url, "-n", "15", "DBSIZE"), "0")

        if root is None:
            return  # no btrfs here: the snapshot steps are tested where it is
        # btrfs snapshots through the CLI: the runner snapshotted both data dirs when it
        # started after (b) (one a hour is kept); restoring them brings back a and b, not c
        for kind in ("redis", "postgres"):
            snaps = n.json("addons", "snapshots", kind, "--app", app)
            self.assertTrue(snaps, f"no {kind} snapshot")
            _, out, _ = n.epio("addons", "snapshot-restore", kind, snaps[0]["id"], "--app", app,
                               "--confirm", app)
            self.assertIn(f"Restored snapshot {snaps[0]['id']}", out)
            self.assertRegex(out, r"kept on its runner as \.epio-" + kind + r"-\w+\.pre-\d")
        del steps["c"]
        check(steps, "restoring the btrfs snapshots")
        self.assertEqual(redis_cli(at["redis"], "EXISTS", "c:0", "extra"), "0")
        with psycopg2.connect(**at["pg"]) as conn, conn.cursor() as cur:
            cur.execute("SELECT to_regclass('c')")
            self.assertEqual(cur.fetchone(), (None,))
        conn.close()
        code, out, err = n.epio("addons", "snapshot-restore", "redis", "20000101T000000Z",
                                "--app", app, "--confirm", app, check=False)
        self.assertNotEqual(code, 0)
        self.assertIn("has no snapshot", out + err)


def btrfs_loop(test: SynchronousTestCase) -> Path | None:
    """A 400 MB btrfs on a loop device, mounted for the test (None without root or
    btrfs-progs: the test then runs on the temp dir's filesystem)."""
    if os.geteuid() != 0 or not shutil.which("mkfs.btrfs") or btrfs.btrfs_tool() is None:
        return None
    tmp = Path(tempfile.mkdtemp(prefix="epio-durability-"))
    os.chmod(tmp, 0o711)  # the build user reaches the node's data dir through it
    test.addCleanup(shutil.rmtree, tmp, True)
    image = tmp / "fs.img"
    with open(image, "wb") as f:
        f.truncate(400 * 1024 * 1024)  # sparse
    run = lambda *a: subprocess.run(a, check=True, capture_output=True, text=True,  # noqa: E731
                                    timeout=30).stdout
    run("mkfs.btrfs", "-q", str(image))
    loop = run("losetup", "--find", "--show", str(image)).strip()
    test.addCleanup(subprocess.run, ["losetup", "-d", loop], timeout=30, check=False)
    mnt = tmp / "mnt"
    mnt.mkdir()
    run("mount", loop, str(mnt))
    test.addCleanup(subprocess.run, ["umount", "-l", str(mnt)], timeout=30, check=False)
    os.chmod(mnt, 0o755)
    return mnt


def pid_of(pattern: str) -> int:
    found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True,
                           timeout=10).stdout.split()
    assert len(found) == 1, (pattern, found)
    return int(found[0])
