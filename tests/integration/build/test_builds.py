"""Real builds of the example apps and of broken or hostile uploads.

These run pip, mksquashfs and mount for real.  The wheel cache is shared by
the whole session: only the first build of a requirement set downloads.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from twisted.internet import defer, protocol, reactor
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web import resource, server

from epio.appdir import make_tarball
from epio.manifest import Manifest
from epio.runner.build import Builder, BuildFailed, BuildResult, ImageStore
from epio.runner.build.builder import BuildCache
from tests.util import free_port, wait_for_port

from .helpers import EXAMPLES, PostgresDatabase, Sink, build_cgroups, config, data_dir, write_app

ROOT = os.geteuid() == 0


def _tarball(test: TestCase, app_dir: Path) -> Path:
    fd, name = tempfile.mkstemp(suffix=".tar.gz")
    os.close(fd)
    test.addCleanup(os.unlink, name)
    return make_tarball(app_dir, name)


class _Base(TestCase):
    timeout = 240

    def builder(self, **cfg: object) -> tuple[Builder, Sink]:
        self.data = data_dir(self)
        sink = Sink()
        return Builder(reactor, self.data, config(**cfg).settings.build, sink), sink

    def assert_nothing_left(self, images_before: set[str]) -> None:
        builds = self.data / "builds"
        self.assertEqual(list(builds.iterdir()) if builds.exists() else [], [])
        self.assertEqual(ImageStore(self.data).digests(), images_before)
        self.assertEqual(build_cgroups(), [])

    async def fails(self, builder: Builder, tarball: Path, needle: str) -> BuildFailed:
        try:
            await builder.build("bad", tarball, {})
        except BuildFailed as e:
            self.assertIn(needle, e.reason)
            self.assertTrue(e.log_tail)
            self.assert_nothing_left(set())
            return e
        self.fail("the build did not fail")


class ExampleBuildTests(_Base):
    async def _build_example(self, name: str, app_created: float | None = None,
                             **cfg: object) -> tuple[BuildResult, Builder, Sink]:
        b, sink = self.builder(**cfg)
        result = await b.build(name, _tarball(self, EXAMPLES / name), {},
                               app_created=app_created)
        self.assertTrue(ImageStore(self.data).has(result.digest))
        self.assertTrue(all(r.source == "build" and r.app == name for r in sink.lines))
        self.assertTrue(all(r.timestamp is not None for r in sink.lines))
        self.assertIn(result.digest, sink.text())
        return result, b, sink

    async def test_wsgi_example(self) -> None:
        """The minimal WSGI app builds; gunicorn was added; the image holds the layout."""
        result, b, _ = await self._build_example("wsgi")
        self.assertIn("gunicorn", result.manifest.processes["web"])
        self.assertEqual(result.facts["workdir"], "app")
        if b.image_format() == "squashfs":
            listing = subprocess.run(
                ["unsquashfs", "-l", str(b.images.path(result.digest))],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            for p in ("app/app.py", "venv/bin/gunicorn", "epio/manifest.json"):
                self.assertIn(p, listing)

    async def test_flask_example_warm_rebuild_is_offline(self) -> None:
        """A rebuild with unchanged requirements runs no pip at all: it copies what the
        app's previous build installed (kept per app) and gives the same digest, even
        with the package index unreachable.  Another app with the same requirements
        does not get that copy: it installs from the wheel cache with --no-index, to
        the same digest again."""
        first, _, _ = await self._build_example("flask", app_created=1.0)
        # the index is now a closed port: any download would fail the build
        second, _, sink = await self._build_example("flask", app_created=1.0,
                                                    index_url="http://127.0.0.1:9/simple")
        self.assertEqual(second.digest, first.digest)
        self.assertIn("Requirements unchanged: installing what the app's previous build "
                      "installed", sink.text())
        self.assertNotIn("pip", sink.text().split("Requirements unchanged")[1])
        # and with it the bytecode of the first build: only the platform's own files
        # written after pip (bundle_config, ...) are compiled again, not the packages
        import re

        m = re.search(r"site-packages kept its bytecode \((\d+) file\(s\) without it",
                      sink.text())
        self.assertIsNotNone(m, sink.text())
        assert m is not None
        self.assertLessEqual(int(m.group(1)), 3)
        self.assertNotIn("Resolving requirements", sink.text())
        self.assertNotIn("Downloading", sink.text())
        self.assertEqual(second.facts["static"], {"/static": "app/static"})
        b, sink = self.builder(index_url="http://127.0.0.1:9/simple")
        other = await b.build("flask-other", _tarball(self, EXAMPLES / "flask"), {},
                              app_created=5.0)
        self.assertIn("from the wheel cache (offline)", sink.text())
        self.assertNotIn("Requirements unchanged", sink.text())
        self.assertEqual(other.digest, first.digest)
        # the app is purged: its kept install goes with it (a later app named flask
        # installs from the wheel cache again); flask-other keeps its own
        from epio.runner.build.builder import app_build_caches
        from epio.runner.launcher import purge_app_data

        kept, other_kept = (app_build_caches(self.data, a)[0] for a in ("flask", "flask-other"))
        self.assertTrue(any(kept.iterdir()))
        self.assertTrue(purge_app_data(self.data, "flask", 20000, uid_switch=False))
        self.assertFalse(any(c.exists() for c in app_build_caches(self.data, "flask")))
        self.assertTrue(any(other_kept.iterdir()))
        # a runner that missed flask-other's purge: the next build of a new app of that
        # name (another creation time) deletes the old one's caches before it installs;
        # a build of the same app keeps them
        await b._thread(b._own_caches, "flask-other", 5.0)
        self.assertTrue(any(other_kept.iterdir()))
        await b._thread(b._own_caches, "flask-other", 6.0)
        self.assertFalse(other_kept.exists())
        self.assertEqual((self.data / "cache" / "app-owners" / "flask-other").read_text(),
                         "6.0")

    async def test_worker_example(self) -> None:
        """The Procfile app builds with both its processes."""
        result, _, _ = await self._build_example("worker")
        self.assertEqual(set(result.manifest.processes), {"web", "worker"})

    async def test_squashfs_mounts_read_only_and_imports_app(self) -> None:
        """The image mounts read-only (once, refcounted) and its venv imports the app
        as an unprivileged user, from any directory."""
        if not ROOT:
            raise SkipTest("loop mounts need root")
        result, b, _ = await self._build_example("wsgi")
        store = ImageStore(self.data, reactor)
        mp = await store.mount(result.digest)
        self.addCleanup(
            lambda: defer.Deferred.fromCoroutine(store.unmount(result.digest, force=True))
        )
        again = await store.mount(result.digest)
        self.assertEqual(mp, again)
        out = subprocess.run(
            [
                "runuser",
                "-u",
                "nobody",
                "--",
                str(mp / "venv/bin/python"),
                "-c",
                "import app, sys; print(app.__file__); print(sys.prefix)",
            ],
            capture_output=True,
            text=True,
            cwd="/",
            timeout=30,
        )
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(out.stdout.split(), [str(mp / "app/app.py"), str(mp / "venv")])
        with self.assertRaises(OSError):
            (mp / "app" / "new").write_text("x")
        doc = json.loads((mp / "epio/manifest.json").read_text())
        self.assertEqual(Manifest.from_dict(doc["manifest"]), result.manifest)
        self.assertTrue(store.verify(result.digest))
        await store.unmount(result.digest)
        self.assertTrue(store.is_mounted(result.digest))
        await store.unmount(result.digest)
        self.assertFalse(store.is_mounted(result.digest))

    async def test_dir_image(self) -> None:
        """With image_format = dir the image is a read-only tree that verifies,
        and the reduced isolation is said in the build log."""
        result, b, _ = await self._build_example("wsgi", image_format="dir")
        p = b.images.path(result.digest)
        self.assertTrue(p.is_dir())
        self.assertTrue(b.images.verify(result.digest))
        self.assertEqual((p / "app").stat().st_mode & 0o222, 0)
        out = subprocess.run(
            [str(p / "venv/bin/python"), "-c", "import app"], cwd="/", capture_output=True
        )
        self.assertEqual(out.returncode, 0, out.stderr)


class HostileUploadTests(_Base):
    def _tar(
        self,
        members: list[tuple[str, bytes | None, bytes]],
        ini: bytes | None = b"[process]\nw = python w.py\n",
    ) -> Path:
        fd, name = tempfile.mkstemp(suffix=".tar.gz")
        os.close(fd)
        self.addCleanup(os.unlink, name)
        head = [("epio.ini", ini, tarfile.REGTYPE)] if ini is not None else []
        with tarfile.open(name, "w:gz") as t:
            for n, data, kind in [*head, *members]:
                info = tarfile.TarInfo(n)
                info.type = kind
                if kind == tarfile.SYMTYPE:
                    info.linkname = (data or b"").decode()
                    t.addfile(info)
                else:
                    info.size = len(data or b"")
                    t.addfile(info, io.BytesIO(data or b""))
        return Path(name)

    async def _path_traversal(self) -> None:
        b, _ = self.builder()
        await self.fails(
            b, self._tar([("../../../tmp/epio-pwned", b"x", tarfile.REGTYPE)]), "path traversal"
        )
        self.assertFalse(Path("/tmp/epio-pwned").exists())

    def test_path_traversal(self) -> defer.Deferred[None]:
        """A tarball escaping with '..' fails clearly; nothing is written or left."""
        return defer.Deferred.fromCoroutine(self._path_traversal())

    def test_symlink_escape(self) -> defer.Deferred[BuildFailed]:
        """A symlink pointing out of the app fails the build."""
        b, _ = self.builder()
        return defer.Deferred.fromCoroutine(
            self.fails(
                b,
                self._tar([("etc", b"../../../../etc", tarfile.SYMTYPE)]),
                "points outside the app",
            )
        )

    async def test_symlink_chain_to_the_data_dir(self) -> None:
        """The reviewer's reproduction: links that each look inside but chain up to the
        node's DATA_DIR, and a Procfile through them to the cluster secret.  The upload
        is refused at unpack; the secret appears nowhere (reason, log)."""
        b, sink = self.builder()
        secret = "s3cr3t-cluster-key-" + os.urandom(8).hex()
        (self.data / "cluster-secret").write_text(secret + "\n")
        tb = self._tar(
            [
                ("d1/d2/d3/up", b"../../..", tarfile.SYMTYPE),
                ("m", b"d1/d2/d3/up/../../..", tarfile.SYMTYPE),
                ("Procfile", b"m/cluster-secret", tarfile.SYMTYPE),
            ],
            ini=None,
        )
        e = await self.fails(b, tb, "points outside the app")
        self.assertNotIn(secret, e.reason)
        self.assertNotIn(secret, sink.text())

    async def test_symlinked_manifest_files(self) -> None:
        """A Procfile, an epio.ini or a requirements.txt that is a symlink (even to a file
        inside the app) fails the build naming the file; what it points to is never read."""
        b, sink = self.builder()
        secret = b"not-for-the-log-" + os.urandom(8).hex().encode()
        cases = [
            ([("Procfile", b"notes.txt", tarfile.SYMTYPE)], None, "Procfile:0: is a symlink"),
            ([("epio.ini", b"notes.txt", tarfile.SYMTYPE)], None, "epio.ini:0: is a symlink"),
            (
                [("requirements.txt", b"notes.txt", tarfile.SYMTYPE)],
                b"[process]\nw = python w.py\n",
                "requirements.txt:0: is a symlink",
            ),
        ]
        for members, ini, needle in cases:
            tb = self._tar([("notes.txt", secret, tarfile.REGTYPE), *members], ini=ini)
            e = await self.fails(b, tb, needle)
            self.assertNotIn(secret.decode(), e.reason)
        self.assertNotIn(secret.decode(), sink.text())
        self.assertNotIn("virtualenv", sink.text())  # refused before any build work

    async def test_symlinked_requirements_include(self) -> None:
        """A ``-r`` include of the requirements file that is a symlink is refused (the
        node reads includes as root to key the wheel cache)."""
        b, _ = self.builder()
        tb = self._tar(
            [
                ("requirements.txt", b"-r more.txt\n", tarfile.REGTYPE),
                ("real.txt", b"flask\n", tarfile.REGTYPE),
                ("more.txt", b"real.txt", tarfile.SYMTYPE),
            ]
        )
        await self.fails(b, tb, "requirements.txt: more.txt is not a regular file in the app")

    async def test_symlinks_section_redirecting_an_upload_link(self) -> None:
        """``a -> d/../x`` stays inside while ``d`` does not exist; ``[symlinks] d = .``
        (inside on its own) makes ``a`` lead out of the app: the build fails."""
        b, _ = self.builder()
        tb = self._tar(
            [("a", b"d/../x", tarfile.SYMTYPE)],
            ini=b"[process]\nw = python w.py\n[symlinks]\nd = .\n",
        )
        await self.fails(b, tb, "the symlink 'a' -> 'd/../x' leads outside the app")

    async def test_symlinks_section_target_outside(self) -> None:
        """A [symlinks] target on the host (not under %(data_directory)s) is a manifest error."""
        b, _ = self.builder()
        tb = self._tar([], ini=b"[process]\nw = python w.py\n[symlinks]\netc = /etc\n")
        await self.fails(b, tb, "[symlinks] etc: target '/etc' must be under")

    def test_device_file(self) -> defer.Deferred[BuildFailed]:
        """A device node in the upload fails the build."""
        b, _ = self.builder()
        return defer.Deferred.fromCoroutine(
            self.fails(b, self._tar([("null", None, tarfile.CHRTYPE)]), "device file")
        )

    def test_oversize_upload(self) -> defer.Deferred[BuildFailed]:
        """An upload over build.max_upload_mb is refused before unpacking."""
        b, _ = self.builder(max_upload_mb=1)
        big = self._tar([("blob", os.urandom(1536 * 1024), tarfile.REGTYPE)])
        return defer.Deferred.fromCoroutine(self.fails(b, big, "over the limit of 1 MB"))

    def test_oversize_unpacked(self) -> defer.Deferred[BuildFailed]:
        """A small upload that unpacks beyond build.max_unpacked_mb is refused."""
        b, _ = self.builder(max_unpacked_mb=1)
        bomb = self._tar([("zeros", b"\0" * (3 * 1024 * 1024), tarfile.REGTYPE)])
        return defer.Deferred.fromCoroutine(self.fails(b, bomb, "unpacks to more than 1 MB"))

    async def _bad_manifest(self) -> None:
        b, sink = self.builder()
        app = write_app(
            Path(tempfile.mkdtemp()),
            {
                "epio.ini": "[wsgi]\nentrypoint = app:application\n[http]\ntimeout = never\n[services]\nmysql = true\n",
                "Procfile": "web: a\nweb: b\n",
            },
        )
        self.addCleanup(shutil.rmtree, app)
        e = await self.fails(b, _tarball(self, app), "the app manifest has 3 errors")
        for where in ("epio.ini:4:", "epio.ini:6:", "Procfile:2:"):
            self.assertIn(where, e.reason)
            self.assertIn(where, sink.text())
        self.assertNotIn("virtualenv", sink.text())  # no build work started

    def test_bad_manifest(self) -> defer.Deferred[None]:
        """A manifest with several errors reports all of them, with lines, before any work."""
        return defer.Deferred.fromCoroutine(self._bad_manifest())


class FailingBuildTests(_Base):
    def app(self, files: dict[str, str]) -> Path:
        d = write_app(Path(tempfile.mkdtemp()), files)
        self.addCleanup(shutil.rmtree, d)
        return _tarball(self, d)

    async def _missing_requirement(self) -> None:
        b, sink = self.builder()
        tb = self.app(
            {
                "epio.ini": "[wsgi]\nentrypoint = app:application\n",
                "app.py": "application = None\n",
                "requirements.txt": "epio-no-such-package-q7x3==1.0\n",
            }
        )
        await self.fails(b, tb, "pip wheel failed")
        self.assertIn("epio-no-such-package-q7x3", sink.text())

    def test_missing_requirement(self) -> defer.Deferred[None]:
        """A requirement that does not exist fails the build with pip's message in the log."""
        return defer.Deferred.fromCoroutine(self._missing_requirement())

    async def _timeout(self) -> None:
        # an index that accepts connections and never answers
        factory = protocol.Factory.forProtocol(protocol.Protocol)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        url = f"http://127.0.0.1:{port.getHost().port}/simple"
        b, _ = self.builder(timeout=4.0, index_url=url)
        tb = self.app(
            {"Procfile": "w: python w.py\n", "requirements.txt": "epio-hangs-forever==1.0\n"}
        )
        start = reactor.seconds()
        await self.fails(b, tb, "time limit of 4 s")
        self.assertLess(reactor.seconds() - start, 15)

    async def test_index_credentials_stay_out_of_argv(self) -> None:
        """build.index_url (with credentials) reaches pip through its environment: pip
        authenticates to the index with them, yet no process's command line carries
        them (ps shows every argv to every user) and the build log does not either."""
        token = "tok3n" + os.urandom(6).hex()
        auth: list[str] = []
        leaks: list[bytes] = []

        class Index(resource.Resource):
            isLeaf = True

            def render_GET(self, request: server.Request) -> bytes:
                auth.append(request.getHeader("authorization") or "")
                for cmd in Path("/proc").glob("[0-9]*/cmdline"):
                    try:
                        data = cmd.read_bytes()
                    except OSError:
                        continue
                    if token.encode() in data:
                        leaks.append(data)
                request.setResponseCode(404)
                return b"no such project"

        port = reactor.listenTCP(0, server.Site(Index()), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        b, sink = self.builder(
            index_url=f"http://epio:{token}@127.0.0.1:{port.getHost().port}/simple"
        )
        tb = self.app(
            {"Procfile": "w: python w.py\n", "requirements.txt": "epio-private-pkg-q7x3==1.0\n"}
        )
        await self.fails(b, tb, "pip wheel failed")
        expected = "Basic " + base64.b64encode(f"epio:{token}".encode()).decode()
        self.assertIn(expected, auth)
        self.assertEqual(leaks, [])
        self.assertNotIn(token, sink.text())

    def test_timeout(self) -> defer.Deferred[None]:
        """A build over build.timeout is killed (its whole process group) and fails clearly."""
        return defer.Deferred.fromCoroutine(self._timeout())

    async def _memory(self) -> None:
        if not Path("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists():
            raise SkipTest("needs the cgroup v1 memory controller")
        b, _ = self.builder(memory_mb=200)
        # a package whose .pth grabs 1 GB at every interpreter start of the build
        d = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, d)
        hog = b"import sys; _ = b'x' * (1 << 30)\n"
        _fake_wheel(d / "wheels", "epio_hog", "1.0", {"epio_hog.pth": hog})
        write_app(
            d,
            {
                "Procfile": "w: python w.py\n",
                "requirements.txt": "--find-links ./wheels\nepio-hog==1.0\n",
            },
        )
        await self.fails(b, _tarball(self, d), "memory limit of 200 MB")

    def test_memory(self) -> defer.Deferred[None]:
        """A build exceeding build.memory_mb is killed and reported as over its memory limit."""
        if not ROOT:
            raise SkipTest("memory cgroups need root")
        return defer.Deferred.fromCoroutine(self._memory())


class DjangoImageRunsTests(_Base):
    """The Django example's image works at run time with the platform settings."""

    async def test_django_example_builds_migrates_and_serves(self) -> None:
        """The Django example builds (platform settings, collectstatic into the image);
        then from the mounted image, as an unprivileged user, `manage.py migrate` runs
        against DATABASE_URL and gunicorn serves a page read from PostgreSQL to a hostname
        in EPIO_HOSTNAMES, refusing a host that is not the app's."""
        b, sink = self.builder()
        result = await b.build("notes", _tarball(self, EXAMPLES / "django"), {})
        self.assertEqual(result.facts["env"], {"DJANGO_SETTINGS_MODULE": "epio_settings"})
        self.assertEqual(result.facts["static"]["/static"], "epio/static")
        self.assertIn("static file", sink.text())
        self.assertEqual(result.manifest.release_command, "python manage.py migrate --noinput")
        if not ROOT:
            raise SkipTest("built; running it from a loop mount needs root")
        listing = subprocess.run(
            ["unsquashfs", "-l", str(b.images.path(result.digest))],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        self.assertIn("epio/static/notes/style.css", listing)
        self.assertIn("site-packages/epio_settings.py", listing)
        try:
            db = PostgresDatabase().create()
        except Exception as e:  # noqa: BLE001
            raise SkipTest(f"built; no PostgreSQL at 127.0.0.1:5432 to run it: {e}") from None
        self.addCleanup(db.drop)
        store = ImageStore(self.data, reactor)
        mp = await store.mount(result.digest)
        self.addCleanup(
            lambda: defer.Deferred.fromCoroutine(store.unmount(result.digest, force=True))
        )
        env = {
            "PATH": f"{mp}/venv/bin:/usr/bin:/bin",
            "HOME": "/tmp",
            "DATABASE_URL": db.url,
            "EPIO_HOSTNAMES": "notes.example.test",
            "SECRET_KEY": "test-secret",
            **result.facts["env"],
        }
        workdir = mp / result.facts["workdir"]
        user = ["/usr/sbin/runuser", "-u", "nobody", "--"]
        migrate = subprocess.run(
            [*user, str(mp / "venv/bin/python"), "manage.py", "migrate", "--noinput"],
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual(migrate.returncode, 0, migrate.stdout + migrate.stderr)
        self.assertIn("notes.0001_initial", migrate.stdout)
        port = free_port()
        command = (
            result.manifest.processes["web"]
            .replace("$PORT", str(port))
            .replace("0.0.0.0", "127.0.0.1")
        )
        web = subprocess.Popen(
            [*user, "/bin/sh", "-c", "exec " + command],
            cwd=workdir,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.addCleanup(lambda: (os.killpg(web.pid, 9), web.wait()))
        wait_for_port("127.0.0.1", port, timeout=30)
        import http.client

        def get(host: str) -> tuple[int, str]:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            c.request("GET", "/", headers={"Host": host})
            r = c.getresponse()
            return r.status, r.read().decode()

        status, body = get("notes.example.test")
        self.assertEqual(status, 200, body)
        self.assertIn("Hello from Django on epio", body)
        self.assertIn("/static/notes/style.css", body)
        self.assertEqual(get("evil.example.test")[0], 400)


class CompatBuildTests(_Base):
    async def test_epio_style_app_with_pyproject(self) -> None:
        """An ep.io-style app builds: [checkout] puts it in app/NAME (importable by that
        name), [symlinks] are made, data-directory static paths pass through, ep.io's
        bundle_config is importable, and pyproject.toml dependencies are installed."""
        d = write_app(
            Path(tempfile.mkdtemp()),
            {
                "epio.ini": (
                    "[wsgi]\nentrypoint = mysite.web:application\n"
                    "[checkout]\ndirectory_name = mysite\n"
                    "[symlinks]\nmedia = %(data_directory)s/media\n"
                    "[static]\n/static = %(data_directory)s/static/\n/css = css\n"
                ),
                "pyproject.toml": '[project]\nname = "mysite"\nversion = "1"\ndependencies = ["gunicorn==23.0.0"]\n',
                "web.py": "def application(environ, start_response):\n    return []\n",
                "css/site.css": "body {}\n",
            },
        )
        self.addCleanup(shutil.rmtree, d)
        b, sink = self.builder(image_format="dir")
        result = await b.build("compat", _tarball(self, d), {})
        self.assertTrue(result.manifest.pyproject)
        self.assertEqual(result.facts["workdir"], "app/mysite")
        self.assertEqual(
            result.facts["static"], {"/static": "/data/static", "/css": "app/mysite/css"}
        )
        root = b.images.path(result.digest)
        self.assertEqual(os.readlink(root / "app/mysite/media"), "/data/media")
        out = subprocess.run(
            [
                str(root / "venv/bin/python"),
                "-c",
                "import mysite.web, web, gunicorn, bundle_config; print(bundle_config.config['core']['data_directory'])",
            ],
            cwd="/",
            capture_output=True,
            text=True,
        )
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(out.stdout.strip(), "/data")
        self.assertNotIn("adding gunicorn", sink.text())


class ConcurrentBuildTests(_Base):
    async def test_two_builds_at_once(self) -> None:
        """Two builds on one node at the same time (first use of the node included) both
        succeed and give the same digests as when built alone."""
        b, _ = self.builder(max_concurrent=2)
        d1 = defer.Deferred.fromCoroutine(b.build("one", _tarball(self, EXAMPLES / "wsgi"), {}))
        d2 = defer.Deferred.fromCoroutine(b.build("two", _tarball(self, EXAMPLES / "worker"), {}))
        r1, r2 = await defer.gatherResults([d1, d2], consumeErrors=True)
        again = await b.build("one", _tarball(self, EXAMPLES / "wsgi"), {})
        self.assertEqual(again.digest, r1.digest)
        self.assertNotEqual(r1.digest, r2.digest)
        self.assert_nothing_left({r1.digest, r2.digest})


def _fake_wheel(
    directory: Path, name: str, version: str, extra: dict[str, bytes] | None = None
) -> Path:
    """A minimal valid wheel whose module says which app shipped it (plus ``extra``
    files, e.g. a ``.pth`` that runs code at every interpreter start)."""
    import base64
    import hashlib
    import zipfile

    directory.mkdir(parents=True, exist_ok=True)
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": b"SHIPPED_BY = 'app A'\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        **(extra or {}),
    }
    record = []
    for path, data in files.items():
        h = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={h},{len(data)}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = ("\n".join(record) + "\n").encode()
    whl = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        for path, data in files.items():
            z.writestr(path, data)
    return whl


class WheelCacheTrustTests(_Base):
    async def test_app_supplied_wheels_stay_with_the_app(self) -> None:
        """A wheel an app brings through its own pip options (--find-links) is cached for
        that app only: another app asking for the same name and version does not get it."""
        b, sink = self.builder()
        a = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, a)
        _fake_wheel(a / "wheels", "epio_trust_probe", "1.0")
        write_app(
            a,
            {
                "Procfile": "w: python -c 'import epio_trust_probe'\n",
                "requirements.txt": "--find-links ./wheels\nepio-trust-probe==1.0\n",
            },
        )
        built = await b.build("appa", _tarball(self, a), {})
        self.assertFalse(list((self.data / "cache" / "wheels").glob("epio_trust_probe*")))
        self.assertTrue(
            list((self.data / "cache" / "wheels-app" / "appa").glob("epio_trust_probe*"))
        )
        self.assertTrue(ImageStore(self.data).has(built.digest))
        # app A rebuilds offline from its own cache (with a config var, so that this is
        # not the identical build the build cache would answer at once)
        again = await b.build("appa", _tarball(self, a), {"REBUILD": "1"})
        self.assertEqual(again.digest, built.digest)
        self.assertIn("from the wheel cache (offline)", sink.text())
        # app B names the same package without bringing it: it must come from the index
        bdir = write_app(
            Path(tempfile.mkdtemp()),
            {
                "Procfile": "w: python w.py\n",
                "requirements.txt": "epio-trust-probe==1.0\n",
            },
        )
        self.addCleanup(shutil.rmtree, bdir)
        try:
            await b.build("appb", _tarball(self, bdir), {})
        except BuildFailed as e:
            self.assertIn("pip wheel failed", e.reason)
        else:
            self.fail("app B was given app A's wheel")


class BuildCacheTests(_Base):
    async def test_identical_builds_are_done_once(self) -> None:
        """A build with the same files, config and platform as an earlier one (any app)
        reuses its image without running a step; other config, other files, an app with
        wheels of its own, or a garbage-collected image make a real build."""
        b, sink = self.builder()
        src = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, src)
        shutil.copytree(EXAMPLES / "wsgi", src / "app")
        tag = os.urandom(4).hex()  # the wheel cache (and its app dirs) is the session's

        def steps(app: str) -> str:
            return "\n".join(r.text for r in sink.lines if r.app == app)

        first = await b.build(f"one-{tag}", _tarball(self, src / "app"), {"A": "1"})
        self.assertIn("Creating virtualenv", steps(f"one-{tag}"))
        (src / "app" / "app.py").touch()  # another mtime: another tarball, the same files
        second = await b.build(f"two-{tag}", _tarball(self, src / "app"), {"A": "1"})
        self.assertEqual((second.digest, second.facts), (first.digest, first.facts))
        self.assertEqual(second.manifest, first.manifest)
        self.assertIn(f"Image {first.digest} reused", steps(f"two-{tag}"))
        for step in ("Creating virtualenv", "Installing", "Finishing image", "Writing"):
            self.assertNotIn(step, steps(f"two-{tag}"))
        self.assertLess(second.duration, first.duration)

        # other config vars (add-on URLs and secrets among them): another key
        node = {"python": "/usr/bin/python3"}
        self.assertNotEqual(BuildCache.key("f" * 64, {"A": "1"}, node, None),
                            BuildCache.key("f" * 64, {"A": "2"}, node, None))
        self.assertNotEqual(BuildCache.key("f" * 64, {"A": "1"}, node, None),
                            BuildCache.key("f" * 64, {"A": "1"}, node, "app"))

        own = self.data / "cache" / "wheels-app" / f"four-{tag}"
        own.mkdir(parents=True)
        self.addCleanup(shutil.rmtree, own)
        (own / "private-1.0-py3-none-any.whl").write_bytes(b"")
        await b.build(f"four-{tag}", _tarball(self, src / "app"), {"A": "1"})
        self.assertIn("Creating virtualenv", steps(f"four-{tag}"))

        (src / "app" / "app.py").write_text((src / "app" / "app.py").read_text() + "# v2\n")
        changed = await b.build(f"five-{tag}", _tarball(self, src / "app"), {"A": "1"})
        self.assertIn("Creating virtualenv", steps(f"five-{tag}"))
        self.assertNotEqual(changed.digest, first.digest)

        b.images.path(changed.digest).unlink()  # garbage-collected
        again = await b.build(f"six-{tag}", _tarball(self, src / "app"), {"A": "1"})
        self.assertIn("Creating virtualenv", steps(f"six-{tag}"))
        self.assertEqual(again.digest, changed.digest)
        self.assertTrue(b.images.has(again.digest))
        entries = list((self.data / "cache" / "builds").iterdir())
        self.assertTrue(entries)
        self.assertTrue(all(e.stat().st_mode & 0o077 == 0 for e in entries))
        self.assert_nothing_left(b.images.digests())


class DiskLimitTests(_Base):
    async def test_disk_limit(self) -> None:
        """A build whose tree outgrows build.max_disk_mb fails clearly and leaves nothing."""
        b, _ = self.builder(max_disk_mb=1)
        await self.fails(b, _tarball(self, EXAMPLES / "wsgi"), "over its limit of 1 MB")


class TamperTests(_Base):
    async def test_planted_symlinks_are_not_followed(self) -> None:
        """Package code that runs during the build (a .pth file, at the next interpreter
        start) and replaces parts of the build tree with symlinks to the host cannot
        make the node write outside the tree: the build fails, the host dir is untouched."""
        if not ROOT:
            raise SkipTest("needs root (the build user)")
        victim = Path(tempfile.mkdtemp(prefix="epio-victim-"))
        self.addCleanup(shutil.rmtree, victim)
        os.chmod(victim, 0o777)
        plant = (
            "import os, sys; root = os.path.dirname(sys.prefix); "
            f"os.path.lexists(os.path.join(root, 'epio')) or os.symlink({str(victim)!r}, os.path.join(root, 'epio'))\n"
        ).encode()
        d = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, d)
        _fake_wheel(d / "wheels", "epio_plant", "1.0", {"epio_plant.pth": plant})
        write_app(
            d,
            {
                "Procfile": "w: python w.py\n",
                "requirements.txt": "--find-links ./wheels\nepio-plant==1.0\n",
            },
        )
        b, _ = self.builder()
        await self.fails(b, _tarball(self, d), "tampered with: root/epio is not a directory")
        self.assertEqual(list(victim.iterdir()), [])

    async def test_planted_static_dir_symlink_fails_the_build(self) -> None:
        """Package code that replaces the app's static directory with a symlink to a
        host directory (which the runner's static server would then serve) fails the
        build at the check after the last build-user step."""
        if not ROOT:
            raise SkipTest("needs root (the build user)")
        victim = Path(tempfile.mkdtemp(prefix="epio-victim-"))
        self.addCleanup(shutil.rmtree, victim)
        (victim / "secret.txt").write_text("host file\n")
        plant = (
            "import os, shutil, sys; p = os.path.join(os.path.dirname(sys.prefix), 'app', 'static'); "
            f"os.path.islink(p) or (shutil.rmtree(p, True), os.symlink({str(victim)!r}, p))\n"
        ).encode()
        d = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, d)
        _fake_wheel(d / "wheels", "epio_static_plant", "1.0", {"epio_static_plant.pth": plant})
        write_app(
            d,
            {
                "epio.ini": "[process]\nw = python w.py\n[static]\n/static = static\n",
                "static/site.css": "body {}\n",
                "requirements.txt": "--find-links ./wheels\nepio-static-plant==1.0\n",
            },
        )
        b, _ = self.builder()
        await self.fails(
            b,
            _tarball(self, d),
            "tampered with: static directory app/static (/static) leads outside",
        )
        self.assertEqual(sorted(p.name for p in victim.iterdir()), ["secret.txt"])

    async def test_planted_app_symlink_fails_the_build(self) -> None:
        """Package code that plants a symlink to the host anywhere in the app tree fails
        the build: every symlink of an image's app/ resolves inside it or under /data."""
        if not ROOT:
            raise SkipTest("needs root (the build user)")
        plant = (
            b"import os, sys; p = os.path.join(os.path.dirname(sys.prefix), 'app', 'hostdata'); "
            b"os.path.lexists(p) or os.symlink('../../..', p)\n"
        )
        d = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, d)
        _fake_wheel(d / "wheels", "epio_link_plant", "1.0", {"epio_link_plant.pth": plant})
        write_app(
            d,
            {
                "Procfile": "w: python w.py\n",
                "requirements.txt": "--find-links ./wheels\nepio-link-plant==1.0\n",
            },
        )
        b, _ = self.builder()
        await self.fails(
            b,
            _tarball(self, d),
            "tampered with: the symlink 'hostdata' -> '../../..' leads outside",
        )


class DjangoOwnSettingsStaticTests(_Base):
    """append_settings = false with the app's own STATIC_ROOT in the data directory."""

    async def test_own_static_root_in_the_data_directory(self) -> None:
        """An ep.io app with append_settings = false and STATIC_ROOT = '/data/static'
        (written out, as many were) builds: collectstatic goes to the image's staging copy
        of the data directory, the facts seed /data/static from it and serve /static from
        /data/static; the image holds the collected file."""
        b, sink = self.builder(image_format="dir")
        d = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, d)
        write_app(d, {
            "epio.ini": "[django]\nbase = .\nappend_settings = false\n",
            "requirements.txt": "Django==5.2.19\n",
            "manage.py": "import os, sys\nos.environ.setdefault('DJANGO_SETTINGS_MODULE', "
                         "'settings')\nfrom django.core.management import "
                         "execute_from_command_line\nexecute_from_command_line(sys.argv)\n",
            "settings.py": "SECRET_KEY = 'x'\nINSTALLED_APPS = ['django.contrib.staticfiles', "
                           "'site_assets']\nSTATIC_URL = '/static/'\n"
                           "STATIC_ROOT = '/data/static'\nROOT_URLCONF = 'settings'\n"
                           "urlpatterns = []\n",
            "site_assets/__init__.py": "",
            "site_assets/static/site/app.css": "body { color: teal }\n",
        })
        result = await b.build("ownstatic", _tarball(self, d), {})
        self.assertEqual(result.facts["env"], {"DJANGO_SETTINGS_MODULE": "settings"})
        self.assertEqual(result.facts["static"], {"/static": "/data/static"})
        self.assertEqual(result.facts["data_seed"], ["static"])
        self.assertIn("static files: /data/static", sink.text())
        self.assertNotIn("epio overrides", sink.text())  # the app's own choice stands
        image = b.images.path(result.digest)
        self.assertEqual((image / "epio/data/static/site/app.css").read_text(),
                         "body { color: teal }\n")


class PlatformRequirementsBuildTests(_Base):
    """gunicorn and a PostgreSQL driver reach an app that needs them but lists neither."""

    async def test_procfile_gunicorn_and_postgres_driver(self) -> None:
        """A Procfile app (no requirements file) whose web command runs gunicorn through
        `exec` and which asks for [services] postgres: the image's Python imports both
        gunicorn and psycopg2, and the build log says why each was added."""
        b, sink = self.builder(image_format="dir")
        d = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, d)
        write_app(d, {
            "Procfile": "web: exec gunicorn --bind 0.0.0.0:$PORT app:application\n",
            "epio.ini": "[services]\npostgres = true\n",
            "app.py": "import psycopg2\n\ndef application(environ, start_response):\n"
                      "    start_response('200 OK', [])\n    return [b'ok']\n",
        })
        result = await b.build("drivers", _tarball(self, d), {})
        text = sink.text()
        self.assertIn("(adding gunicorn==23.0.0 for the process that runs gunicorn)", text)
        self.assertIn("(adding psycopg2-binary==2.9.13 for [services] postgres", text)
        image = b.images.path(result.digest)
        out = subprocess.run(
            [str(image / "venv/bin/python"), "-c",
             "import gunicorn, psycopg2, app; print(psycopg2.__version__.split()[0])"],
            cwd=image / "app", capture_output=True, text=True, timeout=60)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(out.stdout.strip(), "2.9.13")


PYENV_312 = Path("/root/.pyenv/versions/3.12.1")


class PythonVersionTests(_Base):
    """runtime.txt, .python-version and [python] version pick among the node's Pythons."""

    def expose_312(self) -> Path:
        """This machine's pyenv CPython 3.12 made runnable by the build user, as an operator
        would install it: a hard-linked copy of the install under a world-searchable
        directory, and its libpython where the dynamic loader looks (/usr/lib; the pyenv
        binary's RUNPATH is under /root, which the build user cannot search)."""
        if not ROOT:
            raise SkipTest("exposing an interpreter to the build user needs root")
        if not (PYENV_312 / "bin" / "python3.12").exists():
            raise SkipTest(f"no {PYENV_312} on this machine")
        base = Path(tempfile.mkdtemp(prefix="epio-py312-"))
        os.chmod(base, 0o755)
        self.addCleanup(shutil.rmtree, base, True)
        subprocess.run(["cp", "-al", str(PYENV_312), str(base / "3.12.1")], check=True)
        lib = Path("/usr/lib/libpython3.12.so.1.0")
        if not lib.exists():
            os.link(PYENV_312 / "lib" / "libpython3.12.so.1.0", lib)
            self.addCleanup(lib.unlink)
        return base / "3.12.1" / "bin" / "python3.12"

    async def test_two_versions_and_an_unavailable_one(self) -> None:
        """runtime.txt 'python-3.12.1' builds on the 3.12 the operator listed in
        build.pythons (the image's Python is 3.12); .python-version '3.11' builds on the
        default 3.11; [python] version 3.9 fails at once, naming both available versions
        and creating no virtualenv."""
        py312 = self.expose_312()
        b, sink = self.builder(image_format="dir", pythons=[str(py312)])
        d = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, d)
        probe = "import sys; print('%d.%d' % sys.version_info[:2])"
        write_app(d, {"Procfile": "web: python app.py\n", "app.py": "print('hi')\n",
                      "runtime.txt": "python-3.12.1\n"})
        result = await b.build("py312", _tarball(self, d), {})
        self.assertEqual(result.facts["python_version"], "3.12.1")
        image = b.images.path(result.digest)
        out = subprocess.run([str(image / "venv/bin/python"), "-c", probe],
                             capture_output=True, text=True, timeout=30)
        self.assertEqual(out.stdout.strip(), "3.12", out.stderr)
        self.assertIn("Python 3.12.1 asked by runtime.txt", sink.text())

        (d / "runtime.txt").unlink()
        (d / ".python-version").write_text("3.11\n")
        result = await b.build("py311", _tarball(self, d), {})
        self.assertTrue(result.facts["python_version"].startswith("3.11."))
        out = subprocess.run([str(b.images.path(result.digest) / "venv/bin/python"), "-c",
                              probe], capture_output=True, text=True, timeout=30)
        self.assertEqual(out.stdout.strip(), "3.11", out.stderr)

        (d / "epio.ini").write_text("[python]\nversion = 3.9\n")
        with self.assertRaises(BuildFailed) as cm:
            await b.build("py39", _tarball(self, d), {})
        reason = cm.exception.reason
        self.assertIn("Python 3.9 (epio.ini [python] version) is not available on this "
                      "platform; available: ", reason)
        self.assertIn("3.12.1", reason)
        self.assertRegex(reason, r"3\.11\.\d+ \(default\)")
        self.assertNotIn("Creating virtualenv", "\n".join(cm.exception.log_tail))
