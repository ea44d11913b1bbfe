"""The app contract: epio.ini (ep.io semantics) and Procfile parsing."""

from __future__ import annotations

import tarfile
import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from epio.appdir import IgnoreRules, make_tarball
from epio.manifest import (
    DATA_DIRECTORY,
    DJANGO_WSGI,
    Manifest,
    ManifestError,
    load_manifest,
    parse_manifest,
    parse_procfile,
)

EXAMPLES = Path(__file__).resolve().parent.parent.parent / "examples"

# An epio.ini as ep.io users wrote it (DESIGN.md's compatibility list).
EPIO_COMPAT = """\
[wsgi]
requirements = requirements.txt

[django]
base = mysite
append_settings = true

[static]
/static = %(data_directory)s/static/
/media = media

[services]
postgres = true
redis = true

[redis]
memory = 16

[env]
DEBUG = false

[http]
gzip = true
expires-/static = 3600

[symlinks]
mysite/media = %(data_directory)s/media

[basic_auth]
admin = s3cret
_realm = Staging area

[checkout]
directory_name = mysite
"""


class EpioCompatTests(SynchronousTestCase):
    def test_epio_example_parses(self) -> None:
        """An ep.io manifest with every compatibility key parses, with interpolation."""
        m = parse_manifest(EPIO_COMPAT, None, ["requirements.txt", "mysite/manage.py"])
        self.assertEqual(m.requirements, "requirements.txt")
        self.assertEqual(m.django.base, "mysite")
        self.assertTrue(m.django.append_settings)
        self.assertEqual(dict(m.static), {"/static": f"{DATA_DIRECTORY}/static", "/media": "media"})
        self.assertEqual(dict(m.services), {"postgres": "shared", "redis": "dedicated"})
        self.assertEqual(m.redis_memory_mb, 16)
        self.assertEqual(dict(m.env), {"DEBUG": "false"})
        self.assertTrue(m.http.gzip)
        self.assertEqual(dict(m.http.expires), {"/static": 3600})
        self.assertEqual(dict(m.symlinks), {"mysite/media": f"{DATA_DIRECTORY}/media"})
        self.assertEqual(dict(m.basic_auth), {"admin": "s3cret"})
        self.assertEqual(m.basic_auth_realm, "Staging area")
        self.assertEqual(m.checkout_directory, "mysite")
        # ep.io ran a [django] app without an entrypoint through Django's handler
        self.assertEqual(m.wsgi_entrypoint, DJANGO_WSGI)
        self.assertIn("gunicorn", m.processes["web"])
        self.assertIn("$PORT", m.processes["web"])
        self.assertTrue(m.needs_gunicorn)

    def test_json_round_trip(self) -> None:
        """to_json/from_json give back an equal Manifest."""
        m = parse_manifest(
            EPIO_COMPAT + "\n[cron]\nnightly = 0 3 * * * python x.py\n",
            "worker: python w.py\n",
            ["requirements.txt"],
        )
        again = Manifest.from_json(m.to_json())
        self.assertEqual(again, m)
        self.assertEqual(again.cron[0].schedule, "0 3 * * *")

    def test_examples_parse(self) -> None:
        """Every example app's manifest is valid."""
        for name in ("wsgi", "flask", "django", "worker"):
            m = load_manifest(EXAMPLES / name)
            self.assertIn("web", m.processes, name)
        self.assertIn("worker", load_manifest(EXAMPLES / "worker").processes)


class ErrorTests(SynchronousTestCase):
    def test_all_errors_at_once_with_lines(self) -> None:
        """Every problem in both files is reported together as file:line: message."""
        ini = (
            "[wsgi]\n"  # 1
            "entrypoint = not a module\n"  # 2
            "[bogus]\n"  # 3
            "x = 1\n"  # 4
            "[http]\n"  # 5
            "timeout = soon\n"  # 6
            "max_body_size = huge\n"  # 7
            "[services]\n"  # 8
            "postgres = maybe\n"  # 9
            "[static]\n"  # 10
            "/s = ../outside\n"  # 11
        )
        procfile = "web: ok\nbad line\nweb: again\n"
        with self.assertRaises(ManifestError) as cm:
            parse_manifest(ini, procfile, [])
        errors = cm.exception.errors
        for expected in (
            "epio.ini:2:",
            "epio.ini:3:",
            "epio.ini:6:",
            "epio.ini:7:",
            "epio.ini:9:",
            "epio.ini:11:",
            "Procfile:2:",
            "Procfile:3:",
        ):
            self.assertTrue(any(e.startswith(expected) for e in errors), (expected, errors))
        self.assertNotIn("x = 1", "".join(errors))  # keys of an unknown section: one error only
        self.assertIn("Procfile:3: process 'web' already defined on line 1", errors)
        self.assertEqual(
            errors, sorted(errors, key=lambda e: (e.split(":")[0], int(e.split(":")[1])))
        )

    def test_duplicate_keys_and_sections(self) -> None:
        """A key or section set twice is an error naming the first line."""
        with self.assertRaises(ManifestError) as cm:
            parse_manifest("[env]\nA = 1\nA = 2\n[env]\n", "web: x\n", [])
        self.assertEqual(
            cm.exception.errors,
            [
                "epio.ini:3: [env] A: already set on line 2",
                "epio.ini:4: section [env] already defined on line 1",
            ],
        )

    def test_no_manifest(self) -> None:
        """An app with neither file is refused."""
        self.assertRaises(ManifestError, parse_manifest, None, None, [])

    def test_missing_requirements_file(self) -> None:
        """[wsgi] requirements must name a file of the app."""
        with self.assertRaises(ManifestError) as cm:
            parse_manifest(
                "[wsgi]\nentrypoint = app:application\nrequirements = reqs/prod.txt\n",
                None,
                ["app.py"],
            )
        self.assertIn("epio.ini:3:", cm.exception.errors[0])

    def test_bad_interpolation(self) -> None:
        """Only %(data_directory)s interpolates; anything else is an error."""
        with self.assertRaises(ManifestError) as cm:
            parse_manifest("[env]\nX = %(home)s/x\n[process]\nw = run\n", None, [])
        self.assertIn("epio.ini:2:", cm.exception.errors[0])
        m = parse_manifest("[env]\nX = 100%%\n[process]\nw = run\n", None, [])
        self.assertEqual(m.env["X"], "100%")


class ProcfileTests(SynchronousTestCase):
    def test_heroku_rules(self) -> None:
        """name: command, names [A-Za-z0-9_-]+, comments and blanks ignored."""
        got = parse_procfile(
            "# comment\n\nweb: gunicorn app:app --bind :$PORT\nclock_1-x:python clock.py\n"
        )
        self.assertEqual(got["web"][0], "gunicorn app:app --bind :$PORT")
        self.assertEqual(got["clock_1-x"], ("python clock.py", 4))

    def test_bad_names_and_duplicates(self) -> None:
        """A bad name, an empty command and a later duplicate are errors."""
        with self.assertRaises(ManifestError) as cm:
            parse_procfile("we.b: x\nworker:\nweb: a\nweb: b\n")
        self.assertEqual(len(cm.exception.errors), 3)
        self.assertIn("Procfile:4: process 'web' already defined on line 3", cm.exception.errors)

    def test_precedence(self) -> None:
        """[wsgi] web < Procfile < epio.ini [process], each override warned about."""
        m = parse_manifest(
            "[wsgi]\nentrypoint = app:application\n[process]\nworker = python ini_worker.py\n",
            "web: python myweb.py\nworker: python proc_worker.py\n",
            [],
        )
        self.assertEqual(m.processes["web"], "python myweb.py")
        self.assertEqual(m.processes["worker"], "python ini_worker.py")
        self.assertEqual(len(m.warnings), 2)
        self.assertFalse(m.needs_gunicorn)


class IgnoreTests(SynchronousTestCase):
    def test_gitignore_semantics(self) -> None:
        """Patterns, negation, dir-only, anchoring and ** behave as in git."""
        r = IgnoreRules(["*.log", "!keep.log", "build/", "/top.txt", "docs/**/*.md", "\\#hash"])
        self.assertTrue(r.ignored("a/b/x.log"))
        self.assertFalse(r.ignored("a/keep.log"))
        self.assertTrue(r.ignored("src/build", is_dir=True))
        self.assertFalse(r.ignored("build", is_dir=False))
        self.assertTrue(r.ignored("top.txt"))
        self.assertFalse(r.ignored("sub/top.txt"))
        self.assertTrue(r.ignored("docs/a/b/c.md"))
        self.assertTrue(r.ignored("docs/c.md"))
        self.assertTrue(r.ignored("#hash"))

    def test_tarball_honours_epioignore(self) -> None:
        """make_tarball leaves out ignored files and whole ignored directories."""
        d = Path(tempfile.mkdtemp())
        self.addCleanup(__import__("shutil").rmtree, d)
        (d / "epio.ini").write_text("[process]\nw = python w.py\n")
        (d / ".epioignore").write_text("secrets/\n*.tmp\n!important.tmp\n")
        for p in (
            "w.py",
            "secrets/key",
            "a.tmp",
            "important.tmp",
            ".git/HEAD",
            "pkg/__pycache__/x.pyc",
            "pkg/m.py",
        ):
            (d / p).parent.mkdir(parents=True, exist_ok=True)
            (d / p).write_text("x")
        out = make_tarball(d, d.parent / (d.name + ".tgz"))
        self.addCleanup(out.unlink)
        with tarfile.open(out) as t:
            names = sorted(m.name for m in t.getmembers() if m.isfile())
            self.assertEqual({m.uid for m in t.getmembers()}, {0})
        self.assertEqual(names, [".epioignore", "epio.ini", "important.tmp", "pkg/m.py", "w.py"])
