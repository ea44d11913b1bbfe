"""The wrapper a runner runs for a dedicated PostgreSQL (epio.addons.services), with the
host's real initdb and postgres under an unprivileged UID: a server created after a
destroyed one starts on a cluster of its own, with its own password; a stop is a fast
shutdown the wrapper waits for."""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg2
from twisted.trial.unittest import SynchronousTestCase

from epio.addons.services import postgres_bin, postgres_start_body
from tests.util import free_port

USER = "app_w"


class PostgresWrapperTests(SynchronousTestCase):
    def setUp(self) -> None:
        try:
            self.uid = pwd.getpwnam("nobody").pw_uid  # initdb needs a passwd entry
        except KeyError:
            raise self.skipTest("no 'nobody' user") from None
        if not Path(postgres_bin(), "initdb").exists():
            raise self.skipTest("no initdb")
        self.root = Path(tempfile.mkdtemp(prefix="epio-pgwrap-"))  # reachable by the UID
        os.chmod(self.root, 0o711)
        self.addCleanup(shutil.rmtree, self.root, True)
        self.data = self.root / "data"
        self.data.mkdir()
        os.chown(self.data, self.uid, self.uid)

    def start(self, data_key: str, password: str) -> int:
        port = free_port()
        body = postgres_start_body(app="w", uid=self.uid, instance_id="w-1",
                                   image_digest="a" * 64, user=USER, password=password,
                                   host="127.0.0.1", pg_bin=postgres_bin(), boot_timeout=30,
                                   data_key=data_key)
        self.assertNotIn(password, " ".join(body["command"]))
        tmp = self.root / f"tmp-{port}"
        tmp.mkdir()
        os.chown(tmp, self.uid, self.uid)
        out = self.root / f"out-{port}.txt"
        env = {**body["env"], "EPIO_DATA_DIR": str(self.data), "PORT": str(port),
               "TMPDIR": str(tmp), "PATH": "/usr/bin:/bin"}
        proc = subprocess.Popen(
            ["setpriv", f"--reuid={self.uid}", f"--regid={self.uid}", "--clear-groups", "--",
             *body["command"]], env=env, stdout=open(out, "wb"), stderr=subprocess.STDOUT,
            start_new_session=True)

        def stop() -> None:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(20)

        self.addCleanup(stop)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                psycopg2.connect(host="127.0.0.1", port=port, user=USER, password=password,
                                 dbname="postgres", connect_timeout=3).close()
                self.stop, self.proc, self.out = stop, proc, out
                return port
            except psycopg2.OperationalError as e:
                if "password authentication failed" in str(e):
                    raise AssertionError(f"the server refuses its own password: {e}") from None
            if proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError("postgres did not start: " + out.read_text())

    def test_recreated_server_gets_a_fresh_cluster(self) -> None:
        """Add-on 1 writes data and is stopped (destroyed); add-on 2 (another data key,
        another password) starts on a new cluster: its password works, the old one is
        refused, the old data is not there; the old directory is left as it was."""
        pw1, pw2 = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
        port = self.start("aa01", pw1)
        with psycopg2.connect(host="127.0.0.1", port=port, user=USER, password=pw1,
                              dbname="postgres") as conn:
            conn.cursor().execute("CREATE TABLE old_data (x int)")
        conn.close()
        self.stop()
        port = self.start("bb02", pw2)
        with self.assertRaises(psycopg2.OperationalError) as cm:
            psycopg2.connect(host="127.0.0.1", port=port, user=USER, password=pw1,
                             dbname="postgres", connect_timeout=3)
        self.assertIn("password authentication failed", str(cm.exception))
        with psycopg2.connect(host="127.0.0.1", port=port, user=USER, password=pw2,
                              dbname="postgres") as conn, conn.cursor() as cur:
            cur.execute("SELECT to_regclass('old_data')")
            self.assertEqual(cur.fetchone(), (None,))
        conn.close()
        self.assertEqual(sorted(p.name for p in self.data.iterdir()),
                         [".epio-postgres-aa01", ".epio-postgres-bb02"])
        self.assertTrue((self.data / ".epio-postgres-aa01" / "PG_VERSION").exists())

    def test_stop_is_a_fast_shutdown_waited_for(self) -> None:
        """SIGTERM to the wrapper's group (the runner's stop) while a client holds a
        session open: the server does a fast shutdown (the session is ended, a shutdown
        checkpoint written) instead of waiting for the client, the wrapper exits only once
        the server is gone, and the next start needs no crash recovery."""
        pw = secrets.token_urlsafe(16)
        port = self.start("cc03", pw)
        client = psycopg2.connect(host="127.0.0.1", port=port, user=USER, password=pw,
                                  dbname="postgres")
        client.autocommit = True
        client.cursor().execute("CREATE TABLE kept AS SELECT generate_series(1, 100) AS n")
        self.addCleanup(client.close)
        proc, out = self.proc, self.out
        started = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)
        self.assertEqual(proc.wait(20), 0, out.read_text())
        self.assertLess(time.monotonic() - started, 10)
        log = out.read_text()
        self.assertIn("fast shutdown", log)
        self.assertIn("database system is shut down", log)
        port = self.start("cc03", pw)
        self.assertNotIn("not properly shut down", self.out.read_text())
        with psycopg2.connect(host="127.0.0.1", port=port, user=USER, password=pw,
                              dbname="postgres") as conn, conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM kept")
            self.assertEqual(cur.fetchone(), (100,))
        conn.close()
