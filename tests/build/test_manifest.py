"""The app contract: epio.ini (ep.io semantics) and Procfile parsing."""

from __future__ import annotations

import shutil
import tarfile
import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from epio.appdir import IgnoreRules, make_tarball
from epio.manifest import (
    DATA_DIRECTORY,
    DJANGO_WSGI,
    QUOTE_MAX,
    AppFileError,
    Manifest,
    ManifestError,
    load_manifest,
    parse_manifest,
    parse_procfile,
    read_app_file,
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
        # only a salted hash of the password is kept (epio.basicauth)
        self.assertEqual(list(m.basic_auth), ["admin"])
        from epio.basicauth import BasicAuth

        auth = BasicAuth.from_wire({"realm": "R", "users": dict(m.basic_auth)})
        assert auth is not None
        self.assertTrue(auth.allows(b"Basic YWRtaW46czNjcmV0"))  # admin:s3cret
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

    def test_wsgi_workers(self) -> None:
        """[wsgi] workers = N adds --workers N to the generated gunicorn command; a value
        that is not a positive integer is refused with its line."""
        m = parse_manifest("[wsgi]\nentrypoint = app:app\nworkers = 3\n", None,
                           ["requirements.txt"])
        self.assertIn("--workers 3", m.processes["web"])
        with self.assertRaises(ManifestError) as cm:
            parse_manifest("[wsgi]\nentrypoint = app:app\nworkers = many\n", None,
                           ["requirements.txt"])
        self.assertIn("epio.ini:3:", cm.exception.errors[0])

    def test_examples_parse(self) -> None:
        """Every example app's manifest is valid."""
        for name in ("wsgi", "flask", "django", "worker", "epio-django", "celery-worker",
                     "django-https"):
            m = load_manifest(EXAMPLES / name)
            self.assertIn("web", m.processes, name)
        self.assertIn("worker", load_manifest(EXAMPLES / "worker").processes)


class BasicAuthPasswordTests(SynchronousTestCase):
    def test_password_is_literal(self) -> None:
        """A [basic_auth] password is taken as written: '%' is not interpolation, and
        the hash checks the literal password."""
        from base64 import b64encode

        from epio.basicauth import BasicAuth

        password = "Xy7%kQ9#mZ2!pL4@wR8%(data_directory)s%%"
        m = parse_manifest(f"[wsgi]\nentrypoint = app:app\n[basic_auth]\nalice = {password}\n",
                           None, [])
        auth = BasicAuth.from_wire({"realm": "R", "users": dict(m.basic_auth)})
        assert auth is not None
        self.assertTrue(auth.allows(b"Basic " + b64encode(f"alice:{password}".encode())))

    def test_no_password_in_errors(self) -> None:
        """No error about a [basic_auth] line repeats the password, even a line that
        is not 'user = password'."""
        ini = ("[wsgi]\nentrypoint = not a module\n[basic_auth]\n"
               "alice = Xy7%kQ9#mZ2!pL4@wR8\nbob Hq3%zz9secret\n")
        with self.assertRaises(ManifestError) as ctx:
            parse_manifest(ini, None, [])
        text = str(ctx.exception)
        self.assertIn("epio.ini:5:", text)
        for fragment in ("kQ9", "Xy7", "Hq3", "zz9secret"):
            self.assertNotIn(fragment, text)


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

    def test_names_the_runner_would_refuse(self) -> None:
        """A process name the store or the runner would refuse (upper case, not starting
        with a letter, longer than 30 characters) is refused here, with file:line and
        the rule, in the Procfile and in epio.ini alike: it never reaches placement.  So
        is a name of the platform's own add-on servers (epio-*), which the scheduler
        leaves to the add-ons code (it would place such a process again and again)."""
        long = "w" * 31
        with self.assertRaises(ManifestError) as cm:
            parse_manifest(
                f"[process]\nClock = python c.py\n{long} = x\n[process:Worker]\n"
                "rollover = stop-first\n",
                "web: python s.py\nWorker: python w.py\n1st: x\n_private: x\nepio-redis: x\n",
            )
        rule = ("not a valid process type: use 1-30 lowercase letters, digits, '_' and '-', "
                "starting with a letter (like worker)")
        reserved = ("reserved: process types starting with 'epio-' are the platform's own "
                    "(its add-on servers)")
        self.assertEqual(cm.exception.errors, [
            f"Procfile:2: process name 'Worker': {rule}",
            f"Procfile:3: process name '1st': {rule}",
            f"Procfile:4: process name '_private': {rule}",
            f"Procfile:5: process name 'epio-redis': {reserved}",
            f"epio.ini:2: [process] 'Clock': {rule}",
            f"epio.ini:3: [process] {long!r}: {rule}",
            f"epio.ini:4: [process:Worker]: {rule}",
        ])
        with self.assertRaises(ManifestError) as cm:
            parse_manifest("[process]\nepio-postgres = x\n", "web: x\n")
        self.assertEqual(cm.exception.errors, [f"epio.ini:2: [process] 'epio-postgres': {reserved}"])

    def test_names_the_runner_accepts(self) -> None:
        """Every name the manifest accepts is one the store and the runner accept:
        lowercase, a letter first, '_' and '-' inside, up to 30 characters."""
        from epio.domain import PROCESS_TYPE
        from epio.runner.supervisor import PROCESS_TYPE as RUNNER_RULE
        from epio.store.store import PROCESS_TYPE as STORE_RULE

        names = ["web", "worker_2", "clock-x", "w" * 30]
        m = parse_manifest(None, "".join(f"{n}: run {n}\n" for n in names))
        self.assertEqual(sorted(m.processes), sorted(names))
        for n in names:
            for rule in (PROCESS_TYPE, RUNNER_RULE, STORE_RULE):
                self.assertIsNotNone(rule.fullmatch(n), n)

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


SECRET = "s3cr3t-cluster-key-0123456789"


class HostileTreeTests(SynchronousTestCase):
    """load_manifest runs as root on an upload: it never reads through a symlink and
    never quotes much of what it read."""

    def setUp(self) -> None:
        self.tmp = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.tmp)
        self.app = self.tmp / "app"
        self.app.mkdir()
        # what a link could reach: a secret outside the app, and a file inside it
        (self.tmp / "cluster-secret").write_text(SECRET + "\n")
        (self.app / "notes.txt").write_text(SECRET + "\n")

    def refused(self, needle: str) -> ManifestError:
        with self.assertRaises(ManifestError) as cm:
            load_manifest(self.app)
        text = str(cm.exception)
        self.assertIn(needle, text)
        self.assertNotIn(SECRET, text)
        return cm.exception

    def test_symlinked_procfile(self) -> None:
        """A Procfile that is a symlink (inside or outside the app) is refused by name
        and its content is not read."""
        for target in ("notes.txt", str(self.tmp / "cluster-secret")):
            (self.app / "Procfile").unlink(missing_ok=True)
            (self.app / "Procfile").symlink_to(target)
            e = self.refused("Procfile:0: is a symlink")
            self.assertEqual(
                e.errors, ["Procfile:0: is a symlink; it must be a regular file of the app"]
            )

    def test_symlinked_epio_ini(self) -> None:
        """An epio.ini that is a symlink is refused by name, even next to a good Procfile."""
        (self.app / "Procfile").write_text("web: python app.py\n")
        (self.app / "epio.ini").symlink_to("notes.txt")
        self.refused("epio.ini:0: is a symlink")

    def test_symlinked_requirements(self) -> None:
        """requirements.txt (found or named in [wsgi]) and pyproject.toml may not be
        symlinks; nor may a directory on the requirements file's path lead out of the app."""
        (self.app / "Procfile").write_text("web: python app.py\n")
        (self.app / "requirements.txt").symlink_to("notes.txt")
        self.refused("requirements.txt:0: is a symlink")
        (self.app / "requirements.txt").unlink()
        (self.app / "other").symlink_to("notes.txt")
        (self.app / "pyproject.toml").symlink_to(self.tmp / "cluster-secret")
        self.refused("pyproject.toml:0: is a symlink")
        (self.app / "pyproject.toml").unlink()
        (self.tmp / "reqs").mkdir()
        (self.tmp / "reqs" / "prod.txt").write_text(SECRET + "\n")
        (self.app / "reqs").symlink_to(self.tmp / "reqs")
        (self.app / "epio.ini").write_text("[wsgi]\nrequirements = reqs/prod.txt\n")
        self.refused("file 'reqs/prod.txt' is not in the app")
        with self.assertRaises(AppFileError) as cm:
            read_app_file(self.app, "reqs/prod.txt")
        self.assertEqual(
            str(cm.exception),
            "reqs/prod.txt: is not inside the app (a directory on its path is a symlink out of it)",
        )
        with self.assertRaises(AppFileError) as cm:
            read_app_file(self.app, "other")
        self.assertIn("other: is a symlink", str(cm.exception))
        self.assertEqual(read_app_file(self.app, "notes.txt"), (SECRET + "\n").encode())

    def test_regular_files_still_load(self) -> None:
        """Regular manifest and requirements files load as before; symlinks elsewhere in
        the app (not read by the platform) are no problem."""
        (self.app / "Procfile").write_text("web: python app.py\n")
        (self.app / "requirements.txt").write_text("flask\n")
        (self.app / "other").symlink_to("notes.txt")
        m = load_manifest(self.app)
        self.assertEqual(m.requirements, "requirements.txt")
        self.assertEqual(dict(m.processes), {"web": "python app.py"})

    def test_long_lines_are_not_echoed(self) -> None:
        """An error quotes at most QUOTE_MAX characters of the bad line or value."""
        long = "x" * 5000
        (self.app / "Procfile").write_text(long + "\n")
        (self.app / "epio.ini").write_text(
            f"[http]\ntimeout = {long}\n[{long}]\n{long}\n[process]\n{long}! = run\n"
        )
        with self.assertRaises(ManifestError) as cm:
            load_manifest(self.app)
        self.assertEqual(len(cm.exception.errors), 5)
        for err in cm.exception.errors:
            self.assertLess(len(err), 400, err)
            self.assertNotIn("x" * (QUOTE_MAX + 1), err)
            self.assertRegex(err, r"\.\.\. \(500[01] characters\)")

    def test_symlinks_section_targets(self) -> None:
        """[symlinks] targets must be under %(data_directory)s or relative and inside the
        app: an absolute host path or a relative path leading out is an error."""
        ok = parse_manifest(
            "[process]\nw = run\n[symlinks]\nmedia = %(data_directory)s/media\n"
            "a/b/conf = ../shared/conf\nlatest = releases/3\n",
            None,
        )
        self.assertEqual(
            dict(ok.symlinks),
            {"media": "/data/media", "a/b/conf": "../shared/conf", "latest": "releases/3"},
        )
        for target in ("/etc/shadow", "/data/../etc", "../outside", "a/../../x", "/", "/dataX"):
            with self.assertRaises(ManifestError) as cm:
                parse_manifest(f"[process]\nw = run\n[symlinks]\nlink = {target}\n", None)
            self.assertIn("[symlinks] link: target", str(cm.exception))

    def test_process_rollover(self) -> None:
        """[process:NAME] rollover = start-first|stop-first is kept per process type and
        survives the JSON round trip; an unknown value, key or process type, and a bad
        process name, are refused with file:line."""
        m = parse_manifest(
            "[process]\nworker = python w.py\n[process:worker]\nrollover = stop-first\n"
            "[process:web-2]\nrollover = start-first\n",
            "web-2: python s.py\n",
        )
        self.assertEqual(dict(m.rollover), {"worker": "stop-first", "web-2": "start-first"})
        self.assertEqual(Manifest.from_json(m.to_json()).rollover, m.rollover)
        self.assertEqual(dict(parse_manifest(None, "web: x\n").rollover), {})
        with self.assertRaises(ManifestError) as cm:
            parse_manifest(
                "[process:worker]\nrollover = sometimes\n[process:nope]\nrollover = stop-first\n"
                "[process:web]\ncolour = red\n[process:a b]\nrollover = stop-first\n",
                "web: x\nworker: y\n",
            )
        self.assertEqual(cm.exception.errors, [
            "epio.ini:2: [process:worker] rollover: must be start-first or stop-first, "
            "not 'sometimes'",
            "epio.ini:4: [process:nope] there is no process 'nope' (processes: web, worker)",
            "epio.ini:6: [process:web] unknown key 'colour' (known: rollover)",
            "epio.ini:7: [process:a b]: not a valid process type: use 1-30 lowercase "
            "letters, digits, '_' and '-', starting with a letter (like worker)",
        ])

    def test_procfile_release_is_the_release_phase(self) -> None:
        """A Procfile `release:` line is the release phase (Heroku's convention), not a
        process type; [release] command in epio.ini wins over it, with a warning; a
        [process] named release is refused."""
        m = parse_manifest(None, "web: python s.py\nrelease: python migrate.py\n")
        self.assertEqual(dict(m.processes), {"web": "python s.py"})
        self.assertEqual(m.release_command, "python migrate.py")
        both = parse_manifest("[release]\ncommand = ./migrate\n",
                              "web: python s.py\nrelease: python migrate.py\n")
        self.assertEqual(both.release_command, "./migrate")
        self.assertEqual(list(both.warnings), [
            "Procfile:2: release: is replaced by [release] command in epio.ini"])
        with self.assertRaises(ManifestError) as cm:
            parse_manifest("[process]\nrelease = python migrate.py\n", "web: x\n")
        self.assertEqual(cm.exception.errors, [
            "epio.ini:2: [process] 'release' is the release phase, not a process: "
            "use [release] command"])


class CronManifestTests(SynchronousTestCase):
    WEB = "[wsgi]\nentrypoint = app:application\n"

    def test_both_forms(self) -> None:
        """[cron] takes 'name = SCHEDULE command' (a macro too) and the crontab-like
        'SCHEDULE = command', whose name is stable across deploys and differs by
        command."""
        text = (self.WEB + "[cron]\nnightly = 0 3 * * * python manage.py clearsessions\n"
                "hourly = @hourly  python -c 'print(\"a  b\")'\n"
                "*/5 * * * * = python poll.py\n@daily = python report.py\n")
        m = parse_manifest(text, None, ["requirements.txt"])
        got = {c.name: (c.schedule, c.command) for c in m.cron}
        self.assertEqual(got["nightly"], ("0 3 * * *", "python manage.py clearsessions"))
        self.assertEqual(got["hourly"], ("@hourly", "python -c 'print(\"a  b\")'"))  # as written
        keyed = [c for c in m.cron if c.name.startswith("cron-")]
        self.assertEqual(sorted((c.schedule, c.command) for c in keyed),
                         [("*/5 * * * *", "python poll.py"), ("@daily", "python report.py")])
        again = parse_manifest(text, None, ["requirements.txt"])
        self.assertEqual([c.name for c in again.cron], [c.name for c in m.cron])
        self.assertEqual(len({c.name for c in m.cron}), 4)

    def test_refused_with_file_line_and_why(self) -> None:
        """A bad schedule, a missing command, @reboot or a key that is neither a name
        nor a schedule is refused with epio.ini:LINE and the reason."""
        text = (self.WEB + "[cron]\n"
                "a = 61 * * * * python x.py\n"      # line 4
                "b = * * * * *\n"                    # line 5
                "c = @reboot python x.py\n"          # line 6
                "bad/name = * * * * * x\n"           # line 7
                "0 0 31 2 * = python x.py\n")        # line 8
        with self.assertRaises(ManifestError) as cm:
            parse_manifest(text, None, ["requirements.txt"])
        errs = cm.exception.errors
        self.assertEqual(len(errs), 5, errs)
        self.assertIn("epio.ini:4: [cron] a: bad schedule: minute: 61 is out of range", errs[0])
        self.assertIn("epio.ini:5: [cron] b: must be 'name = MIN HOUR", errs[1])
        self.assertIn("epio.ini:6: [cron] c: bad schedule: unknown macro '@reboot'", errs[2])
        self.assertIn("epio.ini:7: [cron] 'bad/name': must be", errs[3])
        self.assertIn("epio.ini:8: [cron] cron-", errs[4])
        self.assertIn("never runs", errs[4])

    def test_name_fits_the_log_source(self) -> None:
        """A job's runs log with source cron.NAME, which the logger accepts up to 64
        characters: a 59-character name is taken, a 60-character one is refused with
        epio.ini:LINE (its output would otherwise be dropped by the logger)."""
        from epio.logs.records import SOURCE_RE

        ok, long = "n" * 59, "n" * 60
        m = parse_manifest(self.WEB + f"[cron]\n{ok} = @daily x\n", None, ["requirements.txt"])
        self.assertEqual([c.name for c in m.cron], [ok])
        self.assertIsNotNone(SOURCE_RE.fullmatch(f"cron.{ok}"))
        self.assertIsNone(SOURCE_RE.fullmatch(f"cron.{long}"))
        with self.assertRaises(ManifestError) as cm:
            parse_manifest(self.WEB + f"[cron]\n{long} = @daily x\n", None, ["requirements.txt"])
        self.assertEqual(cm.exception.errors, [
            f"epio.ini:4: [cron] {long}: a job name has at most 59 characters"])
