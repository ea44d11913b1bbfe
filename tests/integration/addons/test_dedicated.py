"""Dedicated Redis and PostgreSQL servers started by a runner for a deployed app
(``[services] redis = true``, ``postgres = dedicated``): they run under the app's UID as
supervised instances, answer with the injected URLs' passwords and limits, refuse
wrong passwords, are backed up (verified), survive the app's destruction for its grace
period (final backups, restored on their data), and go away when it is purged."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import psycopg2
from twisted.trial.unittest import SynchronousTestCase

from tests.integration.addons.helpers import ADMIN_URL, AddonNode
from tests.integration.e2e.test_quickstart import http_get, wait_until
from tests.util import CHECKOUT

APP_PY = '''
import json, os

def application(environ, start_response):
    body = json.dumps({k: os.environ.get(k) for k in ("DATABASE_URL", "REDIS_URL")}).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]
'''


def redis_cli(url: str, *args: str) -> str:
    u = urlsplit(url)
    return subprocess.run(
        ["redis-cli", "-h", str(u.hostname), "-p", str(u.port), *args], capture_output=True,
        text=True, timeout=10, env={**os.environ, "REDISCLI_AUTH": u.password or ""},
    ).stdout.strip()


def owner_uid(port: int) -> int | None:
    """The UID of the process listening on 127.0.0.1:``port`` (from /proc/net/tcp)."""
    needle = f":{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if f[1].endswith(needle) and f[3] == "0A":
            return int(f[7])
    return None


class DedicatedServicesTests(SynchronousTestCase):
    def test_dedicated_redis_and_postgres(self) -> None:
        """A deploy with [services] redis/postgres = dedicated gets both servers on the
        runner, REDIS_URL/DATABASE_URL in its environment, backups verified; destroying
        the app takes verified final backups and keeps the data, restoring it brings the
        servers back on their data, purging deletes it."""
        n = AddonNode(self, {"addons": {"postgres_admin_url": ADMIN_URL,
                                        "keeper_interval": 1.0}})
        n.start()
        app = "dd" + secrets.token_hex(3)
        n.create_app(app)
        src = n.tmp / "src"
        shutil.copytree(CHECKOUT / "examples" / "wsgi", src)
        (src / "app.py").write_text(APP_PY)
        (src / "epio.ini").write_text(
            "[wsgi]\nentrypoint = app:application\n\n[services]\nredis = true\n"
            "postgres = dedicated\n\n[redis]\nmemory = 8\n")
        code, out, err = n.epio("deploy", str(src), "--app", app, "--poll", "0.5", check=False)
        if code != 0:
            logs = n.epio("logs", "--app", app, "-n", "300", check=False)[1]
            self.fail(f"deploy failed:\n{out}\n{err}\n--- app log ---\n{logs}")
        self.assertIn("is live", out)

        config = n.config(app)
        redis_url, db_url = config["REDIS_URL"], config["DATABASE_URL"]
        status, body = wait_until("the app serves", lambda: (lambda r: r if r[0] == 200 else None)(
            http_get(n.lb_port, f"{app}.localhost")), timeout=30)
        self.assertEqual(json.loads(body), {"DATABASE_URL": db_url, "REDIS_URL": redis_url})
        self.assertNotIn(urlsplit(redis_url).password, n.node.output())
        self.assertNotIn(urlsplit(db_url).password, n.node.output())

        # supervised by the runner, as the app's UID
        ps = {i["type"]: i for i in n.json("ps", "--app", app)}
        self.assertEqual(ps["epio-redis"]["state"], "healthy")
        self.assertEqual(ps["epio-postgres"]["state"], "healthy")
        uid = owner_uid(urlsplit(redis_url).port or 0)
        self.assertIsNotNone(uid)
        self.assertGreaterEqual(uid, 20000)
        self.assertEqual(owner_uid(urlsplit(db_url).port or 0), uid)

        # redis: the password and maxmemory from [redis] memory
        self.assertEqual(redis_cli(redis_url, "PING"), "PONG")
        self.assertIn(str(8 * 1024 * 1024),
                      redis_cli(redis_url, "INFO", "memory").split("maxmemory:")[1].split()[0])
        wrong = redis_url.replace(urlsplit(redis_url).password or "", "nope")
        self.assertNotEqual(redis_cli(wrong, "PING"), "PONG")
        for i in range(50):
            redis_cli(redis_url, "SET", f"k{i}", "v")
        # epio redis-cli: an epio run session with redis-cli on the app's REDIS_URL
        # quiet tools: only the tool's own output, nothing of epio's on stderr
        _, out, err = n.epio("redis-cli", "--app", app, "-T", "--", "GET", "k7")
        self.assertEqual((out.strip(), err), ("v", ""))
        _, out, err = n.epio("psql", "--app", app, "-T", "--", "-At", "-c", "select 40 + 2")
        self.assertEqual((out.strip(), err), ("42", ""))
        # platform scripts never reach the app's log: neither the servers' start scripts
        # nor the tools' connection scripts
        log = n.epio("logs", "--app", app, "-n", "1000")[1]
        self.assertIn("epio-redis.1: starting release 0: the dedicated redis server", log)
        self.assertIn("epio-postgres.1: starting release 0: the dedicated postgres server",
                      log)
        self.assertRegex(log, r"started by \S+ on \S+: redis-cli GET k7 \(a \d+-character "
                              r"sh script\)")
        for script_text in ("EPIO_SERVICE_CONFIG", "printf", "PGPASSWORD", "REDISCLI_AUTH"):
            self.assertNotIn(script_text, log)

        # postgres: the app's role and database, scram password auth
        u = urlsplit(db_url)
        kw = dict(host=u.hostname, port=u.port, user=u.username, dbname=u.path.lstrip("/"))
        with psycopg2.connect(password=u.password, **kw) as conn, conn.cursor() as cur:
            cur.execute("CREATE TABLE t AS SELECT generate_series(1, 30) AS n")
        with self.assertRaises(psycopg2.OperationalError) as cm:
            psycopg2.connect(password="wrong", **kw)
        self.assertIn("password authentication failed", str(cm.exception))

        # both are backed up and verified
        made = n.json("backups", "create", "--app", app)
        got = {b["kind"]: b for b in made}
        self.assertEqual(got["redis"]["status"], "verified", made)
        self.assertEqual(got["redis"]["counts"]["keys_min"], 50)
        self.assertEqual(got["postgres"]["status"], "verified", made)
        self.assertEqual(got["postgres"]["counts"], {"public.t": 30})

        # restores: Redis keys and the dedicated database come back from their backups
        redis_cli(redis_url, "SET", "k1", "changed")
        redis_cli(redis_url, "DEL", "k2")
        n.epio("backups", "restore", got["redis"]["id"], "--app", app, "--confirm", app)
        self.assertEqual((redis_cli(redis_url, "GET", "k1"), redis_cli(redis_url, "GET", "k2")),
                         ("v", "v"))
        with psycopg2.connect(password=u.password, **kw) as conn, conn.cursor() as cur:
            cur.execute("DROP TABLE t")
        n.epio("backups", "restore", got["postgres"]["id"], "--app", app, "--confirm", app)
        with psycopg2.connect(password=u.password, **kw) as conn, conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM t")
            self.assertEqual(cur.fetchone(), (30,))

        # destroying the app takes final backups and stops both servers; their data is
        # kept: the destroyed app is listed, and restoring it starts them on it again
        before = {b["id"] for b in n.json("backups", "--app", app)}
        n.epio("apps", "destroy", app, "--confirm", app)
        wait_until("the servers are gone", lambda: owner_uid(u.port or 0) is None
                   and owner_uid(urlsplit(redis_url).port or 0) is None, timeout=30)
        [listed] = [a for a in n.json("apps", "destroyed") if a["name"] == app]
        self.assertEqual(listed["addons"], ["postgres", "redis"])
        n.epio("apps", "restore", app)
        finals = [b for b in n.json("backups", "--app", app) if b["id"] not in before]
        self.assertEqual(sorted((b["kind"], b["status"]) for b in finals),
                         [("postgres", "verified"), ("redis", "verified")])

        def db_answers() -> bool:
            url = urlsplit(n.config(app)["DATABASE_URL"])
            try:
                with psycopg2.connect(password=url.password, host=url.hostname,
                                      port=url.port, user=url.username,
                                      dbname=url.path.lstrip("/"), connect_timeout=2) as c:
                    with c.cursor() as cur:
                        cur.execute("SELECT count(*) FROM t")
                        return cur.fetchone() == (30,)
            except psycopg2.OperationalError:
                return False

        wait_until("the restored app's database has its rows", db_answers, timeout=60)
        wait_until("the restored app's redis answers", lambda: redis_cli(
            n.config(app)["REDIS_URL"], "PING") == "PONG", timeout=30)
        appdata = n.tmp / "data" / "appdata" / app
        self.assertTrue(any(appdata.glob(".epio-postgres*")))

        # purged: servers stopped, databases and data dir gone, nothing to restore
        u = urlsplit(n.config(app)["DATABASE_URL"])
        redis_url = n.config(app)["REDIS_URL"]
        n.epio("apps", "destroy", app, "--confirm", app)
        n.epio("apps", "purge", app, "--confirm", app)
        wait_until("the servers are gone", lambda: owner_uid(u.port or 0) is None
                   and owner_uid(urlsplit(redis_url).port or 0) is None, timeout=30)
        self.assertFalse(appdata.exists())
        code, _, err = n.epio("apps", "restore", app, check=False)
        self.assertIn("no destroyed app", err)
