"""examples/epio-django, an app written for ep.io, deployed unchanged on one node: its
settings read ``bundle_config['postgres']`` and ``['redis']`` at import, so the build's
collectstatic only works when the add-ons exist before the build.  The Redis add-on is
created with ``epio addons create`` before the first deploy (its server runs on the
runner's empty image); the PostgreSQL one comes from ``[services]``.  One deploy, then
several checks through the router."""

from __future__ import annotations

import base64
import gzip
import http.client
import re
import secrets
from urllib.parse import urlsplit

import psycopg2
from twisted.trial.unittest import SynchronousTestCase

from tests.integration.addons.helpers import AddonNode
from tests.integration.addons.test_dedicated import redis_cli
from tests.integration.e2e.test_quickstart import wait_until
from tests.util import CHECKOUT

AUTH = "Basic " + base64.b64encode(b"editor:quill-and-ink").decode()


def get(port: int, host: str, path: str = "/", auth: str | None = AUTH, **extra: str
        ) -> tuple[int, dict[str, str], str]:
    status, headers, raw = get_raw(port, host, path, auth, **extra)
    return status, headers, raw.decode("utf-8", "replace")


def get_raw(port: int, host: str, path: str = "/", auth: str | None = AUTH, **extra: str
            ) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Host": host, **{k.replace("_", "-"): v for k, v in extra.items()}}
    if auth:
        headers["Authorization"] = auth
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        return (resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


class EpioEraDjangoTests(SynchronousTestCase):
    def test_epio_app_deploys_unchanged(self) -> None:
        """Add-ons exist before the build: the build and release phase see the same
        DATABASE_URL/REDIS_URL as the running app; the page reads the database named by
        bundle_config and counts visits in the Redis add-on; basic auth guards it; static
        files are collected into the data directory, served from there, and a file the
        app writes there at run time (an asset compressor) is served too; the app's cache
        keeps its KEY_PREFIX; a 500 hidden by DEBUG = False is in epio logs; psycopg2 came
        from the platform (the app lists no driver); [http] gzip compresses the dynamic
        page for a client that accepts gzip, and only for it."""
        n = AddonNode(self)
        n.start()
        app = "gb" + secrets.token_hex(3)
        n.create_app(app)
        # a dedicated Redis before the app was ever deployed (ep.io: add-ons first)
        n.epio("addons", "create", "redis", "--app", app)
        redis_url = n.config(app)["REDIS_URL"]
        self.assertEqual(redis_cli(redis_url, "PING"), "PONG")

        code, out, err = n.epio("deploy", str(CHECKOUT / "examples" / "epio-django"),
                                "--app", app, "--poll", "0.5", check=False, timeout=400)
        if code != 0:
            logs = n.epio("logs", "--app", app, "-n", "300", check=False)[1]
            self.fail(f"deploy failed:\n{out}\n{err}\n--- app log ---\n{logs}")
        # [services] postgres was provisioned before the build started; Redis kept
        self.assertLess(out.index("Provisioning shared postgres"), out.index("Building on"))
        self.assertNotIn("Provisioning dedicated redis", out)
        self.assertIn("Release phase succeeded", out)
        # ep.io's base environment had a PostgreSQL driver; the app lists none
        self.assertIn("(adding psycopg2-binary==2.9.13 for [services] postgres", out)
        config = n.config(app)
        self.assertEqual(config["REDIS_URL"], redis_url)  # the same server all along

        # the release phase migrated the database bundle_config names
        u = urlsplit(config["DATABASE_URL"])
        dsn = dict(host=u.hostname, port=u.port, user=u.username, password=u.password,
                   dbname=u.path.lstrip("/"))
        with psycopg2.connect(**dsn) as conn, conn.cursor() as cur:
            cur.execute("SELECT name FROM django_migrations WHERE app = 'entries'")
            self.assertEqual(cur.fetchall(), [("0001_initial",)])

        host = f"{app}.localhost"
        status, headers, _ = get(n.lb_port, host, auth=None)
        self.assertEqual(status, 401)
        self.assertTrue(headers["www-authenticate"].startswith(
            'Basic realm="Guestbook staging"'), headers)

        seen: list[tuple[int, dict[str, str], str]] = []

        def page() -> tuple[int, dict[str, str], str] | None:
            seen.append(get(n.lb_port, host))
            return seen[-1] if seen[-1][0] == 200 else None

        try:
            status, headers, body = wait_until("the page answers", page, timeout=30)
        except AssertionError:
            logs = n.epio("logs", "--app", app, "-n", "80", check=False)[1]
            self.fail(f"no page: {seen[-1:]!r}\n--- app log ---\n{logs}")
        self.assertIn("<h1>Welcome to the guestbook</h1>", body)  # [env]
        self.assertIn(f"database: {dsn['dbname']}", body)
        self.assertIn(f"app: {app}", body)
        visits = int(re.search(r"visits: (\d+)", body).group(1))  # type: ignore[union-attr]
        # the visit counter lives in the Redis add-on (the platform's cache location)
        status, _, _ = get(n.lb_port, host, "/sign/?name=ada&text=lovely+weather")
        self.assertEqual(status, 302)
        _, _, body = get(n.lb_port, host)
        self.assertIn("<strong>ada</strong>: lovely weather", body)
        self.assertEqual(int(re.search(r"visits: (\d+)", body).group(1)),  # type: ignore[union-attr]
                         visits + 1)
        keys = redis_cli(redis_url, "--scan", "--pattern", "*visits*")
        # in the Redis add-on, under the app's own KEY_PREFIX (CACHES merged, not replaced)
        self.assertEqual(keys, "guestbook:1:visits")

        # [http] gzip: the dynamic page is gzipped by the router for a gzip client
        status, headers, raw = get_raw(n.lb_port, host, Accept_Encoding="gzip")
        self.assertEqual((status, headers.get("content-encoding")), (200, "gzip"), headers)
        self.assertIn("Accept-Encoding", headers["vary"])
        self.assertIn(b"<strong>ada</strong>: lovely weather", gzip.decompress(raw))
        status, headers, raw = get_raw(n.lb_port, host, Accept_Encoding="identity")
        self.assertNotIn("content-encoding", headers)
        self.assertIn(b"<h1>Welcome to the guestbook</h1>", raw)

        # a 500 with DEBUG off: the traceback reaches epio logs (Django's error logging
        # goes to stderr), the client gets no traceback
        status, _, body = get(n.lb_port, host, "/report/")
        self.assertEqual(status, 500)
        self.assertNotIn("ZeroDivisionError", body)
        wait_until("the 500 in epio logs", lambda: "ZeroDivisionError: division by zero" in
                   n.epio("logs", "--app", app, "-n", "200", check=False)[1], timeout=20)

        # static files: STATIC_ROOT and [static] say the data directory, so collectstatic's
        # output is there (served by the router), and writable at run time
        self.assertIn("static files: /data/static", out)
        status, _, css = get(n.lb_port, host, "/static/entries/style.css")
        self.assertEqual(status, 200)
        self.assertIn("font-family: Georgia", css)
        status, _, made = get(n.lb_port, host, "/compress/")
        self.assertEqual(status, 200, made)
        self.assertRegex(made, r"^/static/CACHE/site\.[0-9a-f]{12}\.css$")
        status, _, combined = get(n.lb_port, host, made)
        self.assertEqual((status, combined.startswith("body { font-family")), (200, True))
