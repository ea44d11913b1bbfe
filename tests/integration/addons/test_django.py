"""The Django example deployed with ``[services] postgres = true``: the shared database is
provisioned before the release, the release phase (``[release] command = python manage.py
migrate``) creates its tables there, and the app serves rows from it; ``createsuperuser``
is answered at its prompts through the real CLI (``epio run``) in a pseudo-terminal.

One node and ONE deploy (a real build of examples/django: the slowest step of the suite)
for the whole class: each test reads and writes its own tables of the app's database
(``notes_note``; ``auth_user``), so neither sees the other's rows."""

from __future__ import annotations

import secrets
import sys
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import psycopg2
from twisted.trial.unittest import SynchronousTestCase

from tests.integration.addons.helpers import AddonNode
from tests.integration.e2e.test_quickstart import http_get, wait_until
from tests.util import CHECKOUT, epio_env


class _ClassCleanups:
    """``addCleanup`` for what a class shares (AddonNode registers its cleanups on it);
    run in reverse order at tearDownClass, every one even when one fails."""

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

    def addCleanup(self, fn: Callable[..., Any], *args: Any) -> None:  # noqa: N802 (trial's name)
        self.calls.append((fn, args))

    def run(self) -> None:
        failed: list[BaseException] = []
        while self.calls:
            fn, args = self.calls.pop()
            try:
                fn(*args)
            except Exception as e:  # noqa: BLE001 -- every cleanup runs; the first error is raised
                failed.append(e)
        if failed:
            raise failed[0]


class DjangoExampleTests(SynchronousTestCase):
    node: AddonNode
    app: str
    deploy_out: str
    cleanups: _ClassCleanups

    @classmethod
    def setUpClass(cls) -> None:
        cls.cleanups = _ClassCleanups()
        try:
            n = cls.node = AddonNode(cls.cleanups)
            n.start()
            cls.app = app = "dj" + secrets.token_hex(3)
            n.create_app(app)
            # the app's databases go with it: destroy keeps them for the grace period,
            # purge drops them (drop_leftovers too, should the purge fail)
            for step in ("purge", "destroy"):  # run in reverse: destroy, then purge
                cls.cleanups.addCleanup(lambda s=step: n.epio("apps", s, app, "--confirm", app,
                                                              check=False))
            # ALLOWED_HOSTS of the generated Django settings come from EPIO_HOSTNAMES,
            # which the platform injects into every process of the app
            code, out, err = n.epio("deploy", str(CHECKOUT / "examples" / "django"), "--app",
                                    app, "--poll", "0.5", check=False, timeout=400)
            if code != 0:
                logs = n.epio("logs", "--app", app, "-n", "300", check=False)[1]
                raise AssertionError(f"deploy failed:\n{out}\n{err}\n--- app log ---\n{logs}")
            cls.deploy_out = out
        except BaseException:
            cls.cleanups.run()
            raise

    @classmethod
    def tearDownClass(cls) -> None:
        cls.cleanups.run()

    def test_django_migrates_and_serves_from_postgres(self) -> None:
        """Deploy examples/django: migrate ran in the release phase against DATABASE_URL,
        and the page lists a row written to (and read from) the app's database."""
        n, app, out = self.node, self.app, self.deploy_out
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

    def test_migrate_on_deploy_and_createsuperuser(self) -> None:
        """Deploying examples/django runs `manage.py migrate` in the release phase;
        `epio run -- python manage.py createsuperuser` prompts for the username,
        email and password twice, and the user exists afterwards."""
        import pexpect

        n, app = self.node, self.app
        self.assertIn("Release phase succeeded", self.deploy_out)
        self.assertIn("Applying notes.0001_initial... OK", self.deploy_out)
        env = epio_env({"EPIO_CONFIG_DIR": str(n.tmp / "cli"), "HOME": str(n.tmp),
                        "TERM": "xterm"})
        child = pexpect.spawn(
            sys.executable, ["-c", "import sys; from epio.cli.main import main; sys.exit(main())",
                             "run", "--app", app, "--", "python", "manage.py",
                             "createsuperuser"],
            env=env, cwd=str(n.work), dimensions=(24, 80), timeout=30)
        self.addCleanup(lambda: child.terminate(force=True))
        child.expect("Username")
        child.send("boss\r")
        child.expect("Email address")
        child.send("boss@example.com\r")
        child.expect("Password")
        child.send("s3cret-Pass-123\r")
        child.expect(r"Password \(again\)")
        child.send("s3cret-Pass-123\r")
        child.expect("Superuser created successfully")
        child.expect(pexpect.EOF)
        child.close()
        self.assertEqual(child.exitstatus, 0)
        _, out, _ = n.epio(
            "run", "--app", app, "-q", "--", "python", "manage.py", "shell", "-c",
            "from django.contrib.auth.models import User; "
            "print(list(User.objects.filter(is_superuser=True).values_list('username')))")
        self.assertEqual(out.strip().splitlines()[-1], "[('boss',)]")
        # `epio psql` (epio.cli.addons) is an epio run session too
        _, out, _ = n.epio("psql", "--app", app, "-T", "-q", "--", "-At", "-c",
                           "select username from auth_user")
        self.assertEqual(out.strip(), "boss")
