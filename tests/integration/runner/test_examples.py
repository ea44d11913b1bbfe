"""Real apps from examples/: built through ``runner.build``, run under the sandbox.

The build uses the build engineer's Builder (a real virtualenv, gunicorn from the
package index or the warm wheel cache); the runner then runs the image's ``web``
and ``worker`` processes as the app's UID and the web one answers HTTP.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from attrs import frozen
from twisted.internet import reactor
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

from epio.appdir import make_tarball
from epio.config import validate
from epio.runner.build import Builder
from epio.runner.cgroups import CgroupSupport
from epio.runner.service import RunnerService
from epio.runner.state import mounted_under
from tests.integration.build.helpers import shared_cache

from .helpers import RealRunner, skip_reason, wait_for

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
SKIP = skip_reason() or (None if (EXAMPLES / "wsgi").is_dir() else "examples/ not present")


@frozen
class Env:
    type: str
    body: dict[str, Any]


class ExampleTests(TestCase):
    skip = SKIP
    timeout = 240

    def setUp(self) -> None:
        self.runner = RealRunner(reactor)
        self.addCleanup(self._close)
        r = self.runner
        # the build tests' session-wide wheel cache (removed at exit)
        (r.data_dir / "cache").symlink_to(shared_cache())
        builder = Builder(reactor, r.data_dir, validate({}).settings.build, r.sink)
        self.svc = RunnerService(
            reactor=reactor, supervisor=r.sup, isolation=r.isolation,
            cgroups=CgroupSupport({}, {}), images=r.images, data_dir=r.data_dir,
            node_id="test", boot_id="b", builder=builder,
        )

    async def _close(self) -> None:
        await self.runner.close()

    async def build(self, app: str) -> dict[str, Any]:
        tarball = make_tarball(EXAMPLES / app, Path(self.mktemp() + ".tar.gz"))
        t, built = await self.svc.handle(Env("runner.build", {
            "build_id": "b-" + app, "app": app, "tarball": tarball.read_bytes(), "env": {}}))
        self.assertEqual(t, "runner.built")
        return built

    async def test_wsgi_and_worker_examples_build_and_run(self) -> None:
        """examples/wsgi builds via runner.build and its gunicorn web process becomes healthy
        under the sandbox and answers HTTP; examples/worker's worker process runs and logs."""
        r = self.runner
        built = await self.build("wsgi")
        web = built["manifest"]["processes"]["web"]
        self.assertIn("gunicorn", web)
        reply = r.start("wsgi-web-1", "wsgi", 20301, built["digest"], web, boot_timeout=60)
        self.assertTrue(await wait_for(reactor, lambda: r.state("wsgi-web-1") == "healthy", 60),
                        r.texts("wsgi")[-20:])
        agent = Agent(reactor, connectTimeout=2)
        response = await agent.request(b"GET", f"http://127.0.0.1:{reply['port']}/".encode())
        self.assertEqual(response.code, 200)
        self.assertTrue(await readBody(response))

        built = await self.build("worker")
        cmd = built["manifest"]["processes"]["worker"]
        r.start("worker-w-1", "worker", 20302, built["digest"], cmd, process_type="worker",
                env={"TICK_SECONDS": "1"})
        self.assertTrue(await wait_for(reactor, lambda: r.state("worker-w-1") == "healthy", 30),
                        r.texts("worker")[-20:])
        self.assertTrue(await wait_for(reactor, lambda: bool(r.texts("worker", "worker.1")), 15),
                        r.texts("worker")[-20:])
        ticks = r.data_dir / "appdata" / "worker" / "ticks"
        self.assertTrue(await wait_for(reactor, ticks.exists, 5), r.texts("worker")[-5:])
        self.assertEqual(ticks.stat().st_uid, 20302)
        # stopping releases the image mounts (SquashFS where the host allows it)
        await r.sup.stop("wsgi-web-1", grace=2)
        await r.sup.stop("worker-w-1", grace=2)
        mounts = r.data_dir / "mounts"
        self.assertTrue(await wait_for(reactor, lambda: not mounted_under(mounts), 10),
                        mounted_under(mounts))

    async def test_django_example_runs_from_its_build_facts(self) -> None:
        """examples/django (settings module and working directory from the image's build
        facts, not from the start message) serves its health check under the sandbox.

        Opt-in (EPIO_SLOW_TESTS=1): a cold build downloads Django (~20 s), which would
        push this area past its time budget; the build tests cover the build itself."""
        if not os.environ.get("EPIO_SLOW_TESTS"):
            raise SkipTest("slow (cold Django build): set EPIO_SLOW_TESTS=1")
        r = self.runner
        built = await self.build("django")
        web = built["manifest"]["processes"]["web"]
        reply = r.start("dj-web-1", "django", 20303, built["digest"], web,
                        health_check="/health/", boot_timeout=60,
                        env={"DATABASE_URL": "postgres://postgres@127.0.0.1:5432/test",
                             "EPIO_HOSTNAMES": "django.localhost"})
        self.assertTrue(await wait_for(reactor, lambda: r.state("dj-web-1") == "healthy", 60),
                        r.texts("django")[-30:])
        agent = Agent(reactor, connectTimeout=2)
        response = await agent.request(
            b"GET", f"http://127.0.0.1:{reply['port']}/health/".encode(),
            Headers({b"host": [b"django.localhost"]}))
        self.assertEqual((response.code, await readBody(response)), (200, b"ok\n"))
