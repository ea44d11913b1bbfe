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


class PythonChoiceTests(SynchronousTestCase):
    def test_pick_and_request(self) -> None:
        """An exact version wins, else the newest of the same minor; none of that minor is
        None. [python] version comes before runtime.txt, which comes before
        .python-version; a file asking for something else is refused with its name."""
        import shutil
        import tempfile
        from pathlib import Path

        from epio.runner.build.builder import BuildFailed, pick_python, requested_python

        have = {"3.11.2": Path("/a"), "3.12.1": Path("/b"), "3.12.9": Path("/c")}
        self.assertEqual(pick_python("3.12.1", have), ("3.12.1", Path("/b")))
        self.assertEqual(pick_python("3.12", have), ("3.12.9", Path("/c")))
        self.assertEqual(pick_python("3.12.4", have), ("3.12.9", Path("/c")))
        self.assertIsNone(pick_python("3.9", have))
        d = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, d)
        m = parse_manifest(None, "web: python app.py\n")
        self.assertIsNone(requested_python(m, d))
        (d / ".python-version").write_text("# pyenv\n3.12\n")
        self.assertEqual(requested_python(m, d), ("3.12", ".python-version"))
        (d / "runtime.txt").write_text("python-3.11.2\n")
        self.assertEqual(requested_python(m, d), ("3.11.2", "runtime.txt"))
        m = parse_manifest("[python]\nversion = 3.13\n", "web: python app.py\n")
        self.assertEqual(requested_python(m, d), ("3.13", "epio.ini [python] version"))
        (d / "runtime.txt").write_text("pypy-7.3\n")
        with self.assertRaises(BuildFailed) as cm:
            requested_python(parse_manifest(None, "web: x\n"), d)
        self.assertIn("runtime.txt:1: 'pypy-7.3' is not a Python version", cm.exception.reason)
