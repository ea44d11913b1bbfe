"""The Django example deployed with ``[services] postgres = true``: the shared database is
provisioned before the release, the release phase (``[release] command = python manage.py
migrate``) creates its tables there, and the app serves rows from it."""

from __future__ import annotations

import secrets
from urllib.parse import urlsplit

import psycopg2
from twisted.trial.unittest import SynchronousTestCase

from tests.integration.addons.helpers import AddonNode
from tests.integration.e2e.test_quickstart import http_get, wait_until
from tests.util import CHECKOUT


class DjangoExampleTests(SynchronousTestCase):
    def test_django_migrates_and_serves_from_postgres(self) -> None:
        """Deploy examples/django: migrate ran in the release phase against DATABASE_URL,
        and the page lists a row written to (and read from) the app's database."""
        n = AddonNode(self)
        n.start()
        app = "dj" + secrets.token_hex(3)
        n.create_app(app)
        # ALLOWED_HOSTS of the generated Django settings come from EPIO_HOSTNAMES, which
        # the platform injects into every process of the app
        code, out, err = n.epio("deploy", str(CHECKOUT / "examples" / "django"), "--app", app,
                                "--poll", "0.5", check=False, timeout=400)
        if code != 0:
            logs = n.epio("logs", "--app", app, "-n", "300", check=False)[1]
            self.fail(f"deploy failed:\n{out}\n{err}\n--- app log ---\n{logs}")
        self.assertIn("Provisioning shared postgres", out)
        self.assertIn("Release phase succeeded", out)

        url = n.config(app)["DATABASE_URL"]
        u = urlsplit(url)
        dsn = dict(host=u.hostname, port=u.port, user=u.username, password=u.password,
                   dbname=u.path.lstrip("/"))
        with psycopg2.connect(**dsn) as conn, conn.cursor() as cur:
            cur.execute("SELECT app, name FROM django_migrations WHERE app = 'notes'")
            self.assertTrue(cur.fetchall(), "the notes migration did not run in the release "
                                            "phase against the app's database")
            cur.execute("INSERT INTO notes_note (text, created) VALUES ('written by the test', now())")

        seen: list[tuple[int, str]] = []

        def page() -> tuple[int, str] | None:
            seen.append(http_get(n.lb_port, f"{app}.localhost"))
            return seen[-1] if seen[-1][0] == 200 else None

        try:
            status, body = wait_until("the page answers", page, timeout=30)
        except AssertionError:
            logs = n.epio("logs", "--app", app, "-n", "60", check=False)[1]
            self.fail(f"no page: {seen[-1:]!r}\n--- app log ---\n{logs}")
        self.assertIn("<li>written by the test</li>", body)
        with psycopg2.connect(**dsn) as conn, conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM notes_note")
            self.assertEqual(cur.fetchone(), (1,))  # served from this database, not sqlite

        # epio psql: an epio run session with psql on the app's own DATABASE_URL
        _, out, _ = n.epio("psql", "--app", app, "-T", "-q", "--", "-At", "-c",
                           "SELECT text FROM notes_note")
        self.assertEqual(out.strip(), "written by the test")
