"""examples/epio-django, an app written for ep.io, deployed unchanged on one node: its
settings read ``bundle_config['postgres']`` and ``['redis']`` at import, so the build's
collectstatic only works when the add-ons exist before the build.  The Redis add-on is
created with ``epio addons create`` before the first deploy (its server runs on the
runner's empty image); the PostgreSQL one comes from ``[services]``.  One deploy, then
several checks through the router, one for each key of its epio.ini (docs/apps.md,
"Every key"), and one ``epio config set`` (a release without a build) for
``[process:worker] rollover = stop-first``."""

from __future__ import annotations

import base64
import gzip
import http.client
import json
import re
import secrets
from datetime import UTC, datetime, timedelta
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
        page for a client that accepts gzip, and only for it.  And every other key of its
        epio.ini does its part: [checkout] (the project imports itself as guestbook),
        [python] version, [process] worker with [process:worker] rollover = stop-first,
        [symlinks] media (MEDIA_ROOT in the data directory, served by [static] /media),
        [redis] memory, [http] health_check and expires-/static, [cron] (listed by
        epio cron with its next slot)."""
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
        # [python] version: the interpreter the node offers for 3.11
        self.assertIn("Python 3.11 asked by epio.ini [python] version: ", out)
        # [process] worker: it starts with the first deploy, next to the generated web
        self.assertIn("rolling out web=1, worker=1 (new process types start with 1", out)
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
        # [checkout] directory_name: the app is in app/guestbook/ and ROOT_URLCONF =
        # "guestbook.urls" imports (no page at all otherwise)
        self.assertIn("checkout: guestbook", body)
        self.assertRegex(body, r"python: 3\.11\.\d+")  # [python] version, at run time
        # [http] health_check: the runner's probes reached the app's /health/ view (this
        # test never asks for it) -- the counter it keeps in the cache
        checks = int(re.search(r"health checks: (\d+)", body).group(1))  # type: ignore[union-attr]
        self.assertGreaterEqual(checks, 1, body)
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
        # [redis] memory = 16: the add-on's maxmemory, in bytes (CONFIG is not for apps)
        info = redis_cli(redis_url, "INFO", "memory")
        self.assertEqual(re.findall(r"^maxmemory:(\d+)", info, re.M), [str(16 * 1024 * 1024)])

        # [process] worker: the thankyou worker took the new entry off the queue in Redis
        wait_until("the worker thanks ada", lambda: "<strong>ada</strong>: lovely weather "
                   "<em>(thanked)</em>" in get(n.lb_port, host)[2], timeout=15)
        # [symlinks] media: MEDIA_ROOT is the project's media/, a link into the data
        # directory: the card the view wrote there is on the host under the app's data
        # directory, and [static] /media serves it through the router
        with psycopg2.connect(**dsn) as conn, conn.cursor() as cur:
            cur.execute("SELECT id FROM entries_entry WHERE name = 'ada'")
            [(ada,)] = cur.fetchall()
        [card] = (n.tmp / "data").rglob(f"media/cards/{ada}.txt")
        self.assertEqual(card.read_text(), "Thank you for signing, ada!\n")
        status, headers, text = get(n.lb_port, host, f"/media/cards/{ada}.txt")
        self.assertEqual((status, text), (200, "Thank you for signing, ada!\n"), headers)
        # the default max-age (runner.static_max_age); /static has its own, below
        self.assertEqual(headers["cache-control"], "public, max-age=3600")

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
        status, headers, css = get(n.lb_port, host, "/static/entries/style.css")
        self.assertEqual(status, 200)
        self.assertIn("font-family: Georgia", css)
        # [http] expires-/static = 86400: a day, in both headers
        self.assertEqual(headers["cache-control"], "public, max-age=86400")
        expires = datetime.strptime(headers["expires"], "%a, %d %b %Y %H:%M:%S GMT")
        ahead = expires.replace(tzinfo=UTC) - datetime.now(UTC)
        self.assertLess(abs(ahead - timedelta(days=1)), timedelta(minutes=5), headers)
        status, _, made = get(n.lb_port, host, "/compress/")
        self.assertEqual(status, 200, made)
        self.assertRegex(made, r"^/static/CACHE/site\.[0-9a-f]{12}\.css$")
        status, _, combined = get(n.lb_port, host, made)
        self.assertEqual((status, combined.startswith("body { font-family")), (200, True))
        status, headers, _ = get(n.lb_port, host, made)
        self.assertEqual(headers["cache-control"], "public, max-age=86400")

        # [cron]: epio cron lists the entry of the current release, never run yet, next
        # at 03:00 UTC (a daily job cannot be waited for here; tests/integration/run/
        # test_epio_ini.py proves entries run at their minute)
        now = datetime.now(UTC)
        [entry] = json.loads(n.epio("cron", "--app", app, "--json")[1])
        self.assertEqual((entry["name"], entry["schedule"], entry["command"], entry["status"]),
                         ("cleanup", "0 3 * * *", "python manage.py clearsessions", "never"))
        three = now.replace(hour=3, minute=0, second=0, microsecond=0)
        if three <= now:
            three += timedelta(days=1)
        self.assertEqual(entry["next_slot"], three.timestamp())
        self.assertRegex(n.epio("cron", "--app", app)[1], r"cleanup +0 3 \* \* \* +never")

        # [process:worker] rollover = stop-first: on the next release (a config var: no
        # build) the old worker has exited before the new one starts; the new release's
        # worker serves the queue, and a config var wins over [env]
        n.epio("config", "set", "GREETING=Sign here please", "--app", app, "--poll", "0.5")
        v = int(re.search(r"Release v(\d+) \(web, worker\)", out).group(1))  # type: ignore[union-attr]
        logs = n.epio("logs", "--app", app, "-n", "300")[1]

        def at(pattern: str) -> int:
            found = re.search(pattern, logs)
            self.assertIsNotNone(found, f"{pattern!r} not in the app log:\n{logs}")
            return found.start()  # type: ignore[union-attr]

        # the old worker's process exited, the scheduler said so, then the new one started
        self.assertLess(at(r"platform: worker\.1: process exited"),
                        at(rf"platform: stopped worker\.1 \(v{v}\) before starting its "
                           "replacement"))
        self.assertLess(at(rf"platform: stopped worker\.1 \(v{v}\)"),
                        at(rf"platform: starting worker\.\d+ \(v{v + 1}\)"))
        # (web, start-first, is drained only once its replacement is healthy)
        self.assertLess(at(rf"platform: web\.\d+ \(v{v + 1}\) is healthy"),
                        at(rf"platform: draining web\.1 \(v{v}\)"))
        status, _, _ = get(n.lb_port, host, "/sign/?name=bob&text=second+release")
        if status != 302:
            wait_until("the error in epio logs", lambda: "Error" in
                       n.epio("logs", "--app", app, "-n", "40", check=False)[1], timeout=10)
            self.fail(f"{status} != 302:\n" + n.epio("logs", "--app", app, "-n", "40")[1])

        def thanked_bob() -> str | None:
            page = get(n.lb_port, host)[2]
            return page if "<strong>bob</strong>: second release <em>(thanked)</em>" in page \
                else None

        body = wait_until("the new release's worker thanks bob", thanked_bob, timeout=15)
        self.assertIn("<h1>Sign here please</h1>", body)
