"""Requirements the build adds to an app that needs them (epio.runner.build.builder)."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from epio.manifest import parse_manifest
from epio.runner.build.builder import names_gunicorn, platform_requirements

G, PG = "gunicorn==23.0.0", "psycopg2-binary==2.9.13"


def added(ini: str | None, procfile: str | None, names: set[str]) -> list[str]:
    m = parse_manifest(ini, procfile)
    return [req for req, _ in platform_requirements(m, names, G, PG)]


class PlatformRequirementsTests(SynchronousTestCase):
    def test_gunicorn_for_every_command_that_runs_it(self) -> None:
        """gunicorn is added for [wsgi], and for a Procfile command naming it in any
        shell form; not when the app lists it, nor for commands that do not run it."""
        for cmd in ("gunicorn app:app", "exec gunicorn -b 0.0.0.0:$PORT app:app",
                    "newrelic-admin run-program gunicorn app:app",
                    "python -m gunicorn app:app", "/app/venv/bin/gunicorn app:app",
                    "FOO=1 gunicorn 'app:create()'"):
            self.assertTrue(names_gunicorn(cmd), cmd)
            self.assertEqual(added(None, f"web: {cmd}\n", set()), [G], cmd)
        for cmd in ("python app.py", "uvicorn app:app", "echo gunicorns", "celery -A t worker"):
            self.assertFalse(names_gunicorn(cmd), cmd)
        self.assertEqual(added("[wsgi]\nentrypoint = app:app\n", None, set()), [G])
        self.assertEqual(added(None, "web: gunicorn app:app\n", {"gunicorn"}), [])

    def test_postgres_driver_unless_the_app_pins_one(self) -> None:
        """[services] postgres (shared or dedicated) gets the driver unless the app lists
        any PostgreSQL driver of its own; no postgres, no driver."""
        proc = "worker: python w.py\n"
        self.assertEqual(added("[services]\npostgres = true\n", proc, set()), [PG])
        self.assertEqual(added("[services]\npostgres = dedicated\n", proc, set()), [PG])
        for own in ("psycopg", "psycopg2", "psycopg2-binary", "psycopg-binary", "pg8000",
                    "asyncpg"):
            self.assertEqual(added("[services]\npostgres = true\n", proc, {own}), [], own)
        self.assertEqual(added("[services]\nredis = true\n", proc, set()), [])
        self.assertEqual(added("[services]\npostgres = false\n", proc, set()), [])
        m = parse_manifest("[services]\npostgres = true\n", "web: gunicorn a:b\n")
        self.assertEqual(platform_requirements(m, set(), "", ""), [])  # operator: none
