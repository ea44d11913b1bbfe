"""The ``epio`` CLI as a user runs it: a real subprocess against a real api
(Klein over TCP on 127.0.0.1:0, SQLite store, fake runners).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase, TestCase

from epio.api.service import make_site
from tests.api.support import Harness
from tests.util import epio_env


class CliBase(TestCase):
    """A real api on a TCP port and the CLI as a subprocess against it."""

    timeout = 60

    async def _setup(self) -> None:
        self.h = Harness()
        await self.h.start()
        self.port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            make_site(self.h.api, 1 << 20))
        self.url = f"http://127.0.0.1:{self.port.getHost().port}"
        self.home = Path(tempfile.mkdtemp(prefix="epio-cli-test-"))
        self.cwd = self.home / "work"
        self.cwd.mkdir()

    async def _teardown(self) -> None:
        await self.port.stopListening()
        await self.h.stop()
        shutil.rmtree(self.home, ignore_errors=True)

    def setUp(self) -> Any:
        self.addCleanup(lambda: ensureDeferred(self._teardown()))
        return ensureDeferred(self._setup())

    async def epio(self, *args: str, stdin: str | None = None,
                   cwd: Path | None = None) -> tuple[int, str, str]:
        env = epio_env({"EPIO_CONFIG_DIR": str(self.home / "config"), "HOME": str(self.home)})
        env.pop("EPIO_API", None)
        env.pop("EPIO_TOKEN", None)
        argv = ["-c", "import sys; from epio.cli.main import main; sys.exit(main())", *args]
        if stdin is not None:
            argv = ["-c", "import sys, io; sys.stdin = io.StringIO(" + repr(stdin) + "); "
                    "from epio.cli.main import main; sys.exit(main())", *args]
        out, err, code = await getProcessOutputAndValue(
            sys.executable, argv, env=env, path=str(cwd or self.cwd))
        return code, out.decode(), err.decode()

    async def login(self, token: str | None = None) -> None:
        code, out, err = await self.epio("login", "--api", self.url,
                                         stdin=(token or self.h.alice_token) + "\n")
        self.assertEqual(code, 0, err)


class CliTests(CliBase):
    async def test_login_from_stdin(self) -> None:
        """login reads the token from stdin, checks it, stores it 0600; a bad one fails."""
        code, out, err = await self.epio("login", "--api", self.url, stdin="epio_wrong\n")
        self.assertEqual(code, 1)
        self.assertIn("not valid", err)
        self.assertNotIn("Traceback", err)
        await self.login()
        path = self.home / "config" / "config.json"
        self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)
        self.assertEqual(json.loads(path.read_text())["token"], self.h.alice_token)
        code, out, _ = await self.epio("whoami")
        self.assertEqual(out.strip(), "alice")

    async def test_not_logged_in(self) -> None:
        """Without a login every command says what to do, in one sentence."""
        code, out, err = await self.epio("apps", "list")
        self.assertEqual(code, 1)
        self.assertEqual(err.strip(), "epio: not logged in: run `epio login --api URL` first")

    async def test_unreachable_api(self) -> None:
        """An API that does not answer is one clear sentence, no traceback."""
        code, out, err = await self.epio("login", "--api", "http://127.0.0.1:1",
                                         "--token", "x")
        self.assertEqual(code, 1)
        self.assertIn("cannot reach the epio API", err)
        self.assertEqual(len(err.strip().splitlines()), 1)

    async def test_apps_and_app_file(self) -> None:
        """apps create writes .epio-app; later commands in that dir use it."""
        await self.login()
        code, out, err = await self.epio("apps", "create", "hello")
        self.assertEqual(code, 0, err)
        self.assertIn("http://hello.localhost:8080/", out)
        self.assertEqual((self.cwd / ".epio-app").read_text().strip(), "hello")
        sub = self.cwd / "deeper"
        sub.mkdir()
        code, out, err = await self.epio("apps", "info", cwd=sub)
        self.assertEqual(code, 0, err)
        self.assertIn("=== hello", out)
        code, out, err = await self.epio("apps", "list", "--json")
        self.assertEqual([a["name"] for a in json.loads(out)], ["hello"])
        code, out, err = await self.epio("apps", "info", "--app", "nope")
        self.assertEqual((code, err.strip()), (1, "epio: no app named 'nope'"))
        code, out, err = await self.epio("apps", "destroy", "hello")
        self.assertEqual(code, 1)
        self.assertIn("--confirm hello", err)
        code, out, err = await self.epio("apps", "destroy", "hello", "--confirm", "hello")
        self.assertEqual(code, 0, err)

    async def test_config_scale_domains_releases(self) -> None:
        """config set/unset/list, scale, domains and releases round-trip through the API."""
        await self.login()
        await self.epio("apps", "create", "cfg")
        code, out, err = await self.epio("config", "set", "A=1", "B=two words")
        self.assertEqual(code, 0, err)
        code, out, err = await self.epio("config", "unset", "A")
        self.assertEqual(code, 0, err)
        code, out, err = await self.epio("config")
        self.assertEqual(out.strip(), "B=two words")
        code, out, err = await self.epio("config", "get", "B", "--json")
        self.assertEqual(json.loads(out), {"B": "two words"})
        code, out, err = await self.epio("releases")
        self.assertIn("Unset A", out)
        self.assertIn("v2 *", out)
        code, out, err = await self.epio("scale", "web=2:large")
        self.assertEqual(code, 0, err)
        self.assertIn("large", out)
        code, out, err = await self.epio("scale", "web=two")
        self.assertEqual((code, err.strip()), (2, "epio: web: the quantity must be a whole "
                                                  "number like web=2, not 'two'"))
        code, out, err = await self.epio("domains", "add", "www.example.com")
        self.assertEqual(code, 0, err)
        code, out, err = await self.epio("domains")
        self.assertEqual(out.split(), ["cfg.localhost", "(built", "in)", "www.example.com"])
        code, out, err = await self.epio("domains", "remove", "www.example.com")
        self.assertEqual(code, 0, err)
        code, out, err = await self.epio("domains", "add", "*.example.org")
        self.assertEqual(code, 0, err)
        code, out, err = await self.epio("domains", "remove", "*.example.org")
        self.assertEqual(code, 0, err)
        code, out, err = await self.epio("domains", "--json")
        self.assertEqual([d["hostname"] for d in json.loads(out)], ["cfg.localhost"])

    async def test_deploy_follows_and_prints_url(self) -> None:
        """deploy packs the dir (honouring .epioignore), uploads, follows the log to the URL."""
        await self.h.add_runner("r1")
        self.h.scheduler.become_leader()
        self.addCleanup(self.h.scheduler.lose_leadership)
        await self.login()
        await self.epio("apps", "create", "hello", "--no-remember")
        app = self.cwd / "app"
        app.mkdir()
        (app / "app.py").write_text("def app(e, s): pass\n")
        (app / "Procfile").write_text("web: gunicorn app:app\n")
        (app / "secret.txt").write_text("nope\n")
        (app / ".epioignore").write_text("secret.txt\n")
        code, out, err = await self.epio("deploy", "app", "--app", "hello", "--poll", "0.1")
        self.assertEqual(code, 0, out + err)
        self.assertIn("Release v1", out)
        self.assertTrue(out.strip().endswith("hello is live at http://hello.localhost:8080/"))
        code, out, err = await self.epio("ps", "--app", "hello", "--json")
        self.assertEqual([(p["name"], p["state"]) for p in json.loads(out)],
                         [("web.1", "healthy")])

    async def test_release_commands_wait_for_the_rollout(self) -> None:
        """config set, rollback and scale wait until the change serves and exit 0; a
        config change whose release does not become healthy exits 1 saying which
        release keeps running, and `epio releases` shows it "failed (kept v1)";
        --no-wait returns at once with the release still deploying."""
        await self.h.add_runner("r1")
        self.h.scheduler.become_leader()
        self.addCleanup(self.h.scheduler.lose_leadership)
        await self.login()
        await self.epio("apps", "create", "hello", "--no-remember")
        (self.cwd / "Procfile").write_text("web: gunicorn app:app\n")
        code, out, err = await self.epio("deploy", "--app", "hello", "--poll", "0.1")
        self.assertEqual(code, 0, out + err)
        code, out, err = await self.epio("config", "set", "A=1", "--app", "hello",
                                         "--poll", "0.1")
        self.assertEqual(code, 0, out + err)
        self.assertIn("v2 is current", out)
        self.h.runners.fail_health.add(3)
        code, out, err = await self.epio("config", "set", "A=2", "--app", "hello",
                                         "--poll", "0.1")
        self.assertEqual(code, 1, out + err)
        self.assertIn("v3 did not become healthy: web.1 of v3 failed before becoming "
                      "healthy (see `epio logs`); v3 gets no traffic; v2 keeps running", err)
        code, out, err = await self.epio("releases", "--app", "hello")
        self.assertEqual([ln.split()[:4] for ln in out.splitlines()[1:4]],
                         [["v3", "failed", "(kept", "v2)"], ["v2", "*", "current", "a" * 12],
                          ["v1", "superseded", "a" * 12, "Deploy"]])
        code, out, err = await self.epio("rollback", "v1", "--app", "hello", "--poll", "0.1")
        self.assertEqual(code, 0, out + err)
        self.assertIn("v4 is current", out)
        code, out, err = await self.epio("scale", "web=2", "--app", "hello", "--poll", "0.1")
        self.assertEqual(code, 0, out + err)
        self.assertIn("hello: web=2 running", out)
        code, out, err = await self.epio("config", "set", "B=1", "--app", "hello",
                                         "--no-wait", "--json")
        self.assertEqual(code, 0, out + err)
        self.assertEqual(json.loads(out)["release"]["status"], "deploying")

    async def test_ps_hints_only_at_commands_that_work(self) -> None:
        """With nothing running, `epio ps` says why with a command that would help: deploy
        a new app; after a failed first deploy, fix and deploy again (not `scale`, which
        could not help); with everything scaled to 0, scale a type the app has."""
        await self.h.add_runner("r1")
        self.h.scheduler.become_leader()
        self.addCleanup(self.h.scheduler.lose_leadership)
        await self.login()
        await self.epio("apps", "create", "hello", "--no-remember")
        code, out, err = await self.epio("ps", "--app", "hello")
        self.assertEqual(out.strip(), "hello runs no processes: it has not been deployed "
                                      "yet (epio deploy)")
        (self.cwd / "Procfile").write_text("worker: python w.py\n")
        self.h.runners.manifest = {"processes": {"worker": "python w.py"}}
        self.h.runners.fail_health.add(1)
        code, out, err = await self.epio("deploy", "--app", "hello", "--poll", "0.1")
        self.assertEqual(code, 1, out + err)
        code, out, err = await self.epio("ps", "--app", "hello")
        self.assertIn("hello runs no processes: no release of it works (v1 failed: "
                      "worker.1 of v1 failed before becoming healthy", out)
        self.assertIn("fix it and `epio deploy` again", out)
        self.assertNotIn("scale", out)
        self.h.runners.fail_health.clear()
        code, out, err = await self.epio("deploy", "--app", "hello", "--poll", "0.1")
        self.assertEqual(code, 0, out + err)
        self.assertIn("hello v2 is running (it has no web process)", out)
        code, out, err = await self.epio("scale", "worker=0", "--app", "hello", "--poll", "0.1")
        self.assertEqual(code, 0, out + err)
        code, out, err = await self.epio("ps", "--app", "hello")
        self.assertEqual(out.strip(), "hello runs no processes: every process type is scaled "
                                      "to 0 (epio scale worker=1)")

    async def test_deploy_progress_bar_on_a_tty(self) -> None:
        """On a terminal, deploy shows an upload progress bar, then follows to the URL."""
        import pexpect
        from twisted.internet.threads import deferToThread

        await self.h.add_runner("r1")
        self.h.scheduler.become_leader()
        self.addCleanup(self.h.scheduler.lose_leadership)
        await self.login()
        await self.epio("apps", "create", "tty", "--no-remember")
        (self.cwd / "Procfile").write_text("web: gunicorn app:app\n")
        (self.cwd / "big.bin").write_bytes(os.urandom(50_000))
        env = epio_env({"EPIO_CONFIG_DIR": str(self.home / "config"), "HOME": str(self.home)})

        def run() -> tuple[int, str]:
            child = pexpect.spawn(
                sys.executable, ["-c", "import sys; from epio.cli.main import main; "
                                 "sys.exit(main())", "deploy", "--app", "tty", "--poll", "0.1"],
                cwd=str(self.cwd), env=env, timeout=30, encoding="utf-8")
            child.expect(pexpect.EOF)
            child.close()
            return child.exitstatus, child.before

        code, out = await deferToThread(run)
        self.assertEqual(code, 0, out)
        self.assertIn("Uploading [##############################]", out)
        self.assertIn("tty is live at http://tty.localhost:8080/", out)

    async def test_deploy_failure_exit_status(self) -> None:
        """A failed build makes deploy exit 1 with the reason."""
        await self.h.add_runner("r1")
        self.h.runners.build_error = "requirements.txt: no such package"
        await self.login()
        await self.epio("apps", "create", "bad", "--no-remember")
        (self.cwd / "Procfile").write_text("web: x\n")
        code, out, err = await self.epio("deploy", "--app", "bad", "--poll", "0.1")
        self.assertEqual(code, 1)
        self.assertIn("deploy failed: build failed: requirements.txt: no such package", err)

    async def test_deploy_bad_manifest_uploads_nothing(self) -> None:
        """A manifest with several errors is reported whole, with file and line, and
        nothing is uploaded (no deploy exists afterwards)."""
        await self.h.add_runner("r1")
        await self.login()
        await self.epio("apps", "create", "broken", "--no-remember")
        (self.cwd / "epio.ini").write_text("[wsgi]\n[http]\nhealth_check = nope\n[bogus]\nx = 1\n")
        (self.cwd / "Procfile").write_text("web: run\nweb: again\n")
        code, out, err = await self.epio("deploy", "--app", "broken")
        self.assertEqual(code, 1, err)
        self.assertIn("its manifest has errors", err)
        self.assertIn("epio.ini:3:", err)
        self.assertIn("Procfile:2:", err)
        self.assertNotIn("Traceback", err)
        self.assertEqual(await self.h.store.list_deploys("broken"), [])

    async def test_deploy_refuses_a_process_type_the_runner_refuses(self) -> None:
        """A Procfile `Worker:` line (which the runner would refuse at placement) stops
        `epio deploy` before the upload, naming the file, the line and the rule."""
        await self.h.add_runner("r1")
        await self.login()
        await self.epio("apps", "create", "upper", "--no-remember")
        (self.cwd / "Procfile").write_text("web: run\nWorker: python w.py\n")
        code, out, err = await self.epio("deploy", "--app", "upper")
        self.assertEqual(code, 1, err)
        self.assertIn("Procfile:2: process name 'Worker': not a valid process type: use 1-30 "
                      "lowercase letters, digits, '_' and '-', starting with a letter "
                      "(like worker)", err)
        self.assertEqual(await self.h.store.list_deploys("upper"), [])

    async def test_ipv6_api(self) -> None:
        """The CLI talks to an api listening on IPv6 loopback ([::1])."""
        from twisted.internet.endpoints import TCP6ServerEndpoint

        port = await TCP6ServerEndpoint(reactor, 0, interface="::1").listen(
            make_site(self.h.api, 1 << 20))
        self.addCleanup(port.stopListening)
        url = f"http://[::1]:{port.getHost().port}"
        code, out, err = await self.epio("login", "--api", url, "--token", self.h.bob_token)
        self.assertEqual(code, 0, err)
        self.assertIn("as bob", out)
        code, out, err = await self.epio("apps", "create", "six", "--no-remember")
        self.assertEqual(code, 0, err)

    async def test_help(self) -> None:
        """epio --help lists the commands; each command has its own --help."""
        code, out, err = await self.epio("--help")
        for name in ("login", "apps", "deploy", "ps", "scale", "config", "releases",
                     "rollback", "domains", "open"):
            self.assertIn(name, out)
        code, out, err = await self.epio("deploy", "--help")
        self.assertEqual(code, 0)
        self.assertIn(".epioignore", out)

    async def test_upload_is_deploy(self) -> None:
        """ep.io's `epio upload` is `epio deploy`: it packs, uploads and follows the
        deploy to the app's URL."""
        await self.h.add_runner("r1")
        self.h.scheduler.become_leader()
        self.addCleanup(self.h.scheduler.lose_leadership)
        await self.login()
        await self.epio("apps", "create", "hello", "--no-remember")
        app = self.cwd / "app"
        app.mkdir()
        (app / "Procfile").write_text("web: gunicorn app:app\n")
        code, out, err = await self.epio("upload", "app", "--app", "hello", "--poll", "0.1")
        self.assertEqual(code, 0, out + err)
        self.assertTrue(out.strip().endswith("hello is live at http://hello.localhost:8080/"))
        self.assertEqual(len(await self.h.store.list_releases("hello")), 1)

    async def test_django_runs_manage_py(self) -> None:
        """ep.io's `epio django CMD ARGS` runs `python manage.py CMD ARGS` in the app (here
        detached: the runner is asked for exactly that argv); without a command it says
        what it wants and exits 1."""
        from epio.api.run import RunApiSettings, RunSessions
        from epio.pipeline import MemoryLogSink
        from epio.runner.sessions import RunSettings, SessionManager
        from epio.runner.supervisor import Settings
        from tests.run.test_api_run import RoutedControl, StoreService
        from tests.run.test_sessions import DIGEST, FakeLauncher, ProcessClock

        endpoint = await self.h.add_runner("r1")
        manager = SessionManager(ProcessClock(), FakeLauncher(), MemoryLogSink(), RunSettings(),
                                 Settings(uid_min=1000, uid_max=65000), node_id="r1",
                                 store_service=StoreService(self.h.store))
        control = RoutedControl(manager, endpoint)
        self.h.api.run = RunSessions(self.h.store, control, reactor,
                                     RunApiSettings(runner_dead_after=1e12))
        await self.login()
        await self.epio("apps", "create", "hello", "--no-remember")
        await self.h.store.create_release("hello", DIGEST, processes={"web": "serve"})
        code, out, err = await self.epio("django", "--app", "hello", "--detach", "migrate",
                                         "--noinput")
        self.assertEqual(code, 0, out + err)
        self.assertIn("Running `python manage.py migrate --noinput` detached as run.1", out)
        [start] = [b for t, b in control.requests if t == "run.start"]
        self.assertEqual(start["command"], ["python", "manage.py", "migrate", "--noinput"])
        code, out, err = await self.epio("django", "--app", "hello")
        self.assertEqual(code, 1)
        self.assertIn("which manage.py command? epio django", err)


class RoutedDefaultTests(CliBase):
    """An api whose platform route (api.hostname) names a URL where no router answers
    (a closed port): the real router path is in tests/integration/e2e/
    test_platform_route.py."""

    async def _setup(self) -> None:
        from epio.api.settings import ApiSettings
        from tests.util import free_port

        self.closed = f"http://127.0.0.1:{free_port()}"
        self.settings = ApiSettings(drain_seconds=0.0, route_settle=0.0, domain="example.com",
                                    app_url=self.closed.replace("127.0.0.1", "{app}.{domain}")
                                    + "/", platform_hostname="127.0.0.1")
        self.h = Harness(self.settings)
        await self.h.start()
        self.port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            make_site(self.h.api, 1 << 20))
        self.url = f"http://127.0.0.1:{self.port.getHost().port}"
        self.home = Path(tempfile.mkdtemp(prefix="epio-cli-test-"))
        self.cwd = self.home / "work"
        self.cwd.mkdir()

    async def test_login_keeps_the_given_url_when_the_routed_one_does_not_answer(self) -> None:
        """/status names the routed URL and says the request was not routed; login at an
        api node's own listener tries the routed URL, and as it does not answer keeps the
        given one, saying why; --direct does not try; a later login without --api uses
        the stored URL."""
        _, status, _ = await self.h.call("GET", "status")
        self.assertEqual((status["api_url"], status["routed"]), (self.closed, False))
        code, out, err = await self.epio("login", "--api", self.url,
                                         "--token", self.h.alice_token)
        self.assertEqual(code, 0, err)
        self.assertIn(f"Logged in to {self.url} as alice", out)
        self.assertIn(f"the platform's routed URL {self.closed} did not answer", out)
        config = self.home / "config" / "config.json"
        self.assertEqual(json.loads(config.read_text())["api"], self.url)
        code, out, err = await self.epio("login", "--api", self.url, "--direct",
                                         "--token", self.h.alice_token, "--json")
        self.assertEqual((code, json.loads(out)["note"]), (0, ""), err)
        code, out, err = await self.epio("login", "--token", self.h.bob_token)
        self.assertEqual(code, 0, err)
        self.assertIn(f"Logged in to {self.url} as bob", out)


class RoutedRefusedTests(SynchronousTestCase):
    def test_the_routed_url_never_downgrades_the_token_to_plain_http(self) -> None:
        """The routed URL an api's /status names (a hostile network can forge it on a
        plain-http login) is taken only as an http(s) URL, and never http for a login
        made over https: the token would go in clear to it for every later command."""
        from epio.cli.commands import routed_refused

        self.assertEqual(routed_refused("http://10.0.0.5:8000", "https://api.example.com"), "")
        self.assertEqual(routed_refused("http://10.0.0.5:8000", "http://api.example.com"), "")
        self.assertEqual(routed_refused("https://10.0.0.5", "https://api.example.com"), "")
        self.assertIn("not https like https://10.0.0.5",
                      routed_refused("https://10.0.0.5", "http://api.example.com"))
        for junk in ("file:///etc/passwd", "api.example.com", "https://"):
            self.assertIn("is not an http(s) URL", routed_refused("http://h:1", junk))


class CliMessageTests(CliBase):
    """Each refusal a user meets is a sentence that says the rule (and what to do)."""

    async def test_validation_errors_are_sentences(self) -> None:
        """A bad app name, config var name, platform config var or hostname is refused
        with the rule in words, never a regex or a schema path; nothing is changed."""
        await self.login()
        code, out, err = await self.epio("apps", "create", "Bad_Name!")
        self.assertEqual((code, err.strip()), (1, (
            "epio: 'Bad_Name!' is not a valid app name: use 1-30 lowercase letters, digits "
            "and '-', starting with a letter and not ending with '-' (like my-app)")))
        code, out, err = await self.epio("apps", "create", "trailing-")
        self.assertEqual(code, 1)
        self.assertIn("'trailing-' is not a valid app name: use 1-30", err)
        await self.epio("apps", "create", "msgs")
        code, out, err = await self.epio("config", "set", "1BAD=x")
        self.assertEqual((code, err.strip()), (1, (
            "epio: '1BAD' is not a valid config var name: use letters, digits and '_', not "
            "starting with a digit, at most 255 characters (like SECRET_KEY)")))
        code, out, err = await self.epio("config", "set", "PORT=1234")
        self.assertEqual((code, err.strip()), (1, (
            "epio: PORT cannot be set as a config var: the platform sets PORT itself (the "
            "port the platform gives the web process to listen on)")))
        code, out, err = await self.epio("config", "set", "OK=1", "EPIO_APP=other")
        self.assertEqual((code, err.strip()), (1, (
            "epio: EPIO_APP cannot be set as a config var: names starting with EPIO_ belong "
            "to the platform")))
        code, out, err = await self.epio("config", "--json")
        self.assertEqual(json.loads(out)["vars"], {})  # OK=1 was not set either
        code, out, err = await self.epio("config", "unset", "PORT")  # unsetting is harmless
        self.assertEqual(code, 0, err)
        code, out, err = await self.epio("domains", "add", "bad..example.com")
        self.assertEqual(code, 1)
        # one sentence for every refused hostname (it must not tell whether another
        # account has it: docs/api.md)
        self.assertTrue(err.startswith(
            "epio: body.hostname must be a DNS name of two or more labels"), err)
        self.assertNotIn("^", err)

    async def test_usage_errors_exit_2(self) -> None:
        """Malformed arguments are usage errors: exit status 2 (docs/cli.md)."""
        await self.login()
        await self.epio("apps", "create", "usage")
        for argv, text in [(("scale", "web"), "scale takes TYPE=N[:SIZE] (like web=2)"),
                           (("config", "set", "NOVALUE"), "config set takes KEY=VALUE"),
                           (("rollback", "three"), "rollback takes a release like v3")]:
            code, out, err = await self.epio(*argv)
            self.assertEqual(code, 2, (argv, err))
            self.assertIn(text, err)

    async def test_second_apps_create_says_which_app_is_remembered(self) -> None:
        """A second `apps create` in a directory keeps .epio-app as it is and says so,
        with the app commands here still act on and how to switch."""
        await self.login()
        code, out, err = await self.epio("apps", "create", "first")
        self.assertIn("Deploy it with: epio deploy\n", out)
        code, out, err = await self.epio("apps", "create", "second")
        self.assertEqual(code, 0, err)
        self.assertIn(f"Not remembered: {self.cwd / '.epio-app'} already names first, and "
                      "commands run here still act on first. Pass --app second, or make it "
                      "the default here with: echo second > .epio-app", out)
        self.assertIn("Deploy it with: epio deploy DIR --app second", out)
        self.assertEqual((self.cwd / ".epio-app").read_text().strip(), "first")
        code, out, err = await self.epio("apps", "info")
        self.assertIn("=== first", out)

    async def test_rollback_names_the_target_and_the_new_release(self) -> None:
        """rollback says which release it went back to and which new release that is."""
        await self.h.add_runner("r1")
        self.h.scheduler.become_leader()
        self.addCleanup(self.h.scheduler.lose_leadership)
        await self.login()
        await self.epio("apps", "create", "back")
        (self.cwd / "Procfile").write_text("web: gunicorn app:app\n")
        code, out, err = await self.epio("deploy", "--poll", "0.1")
        self.assertEqual(code, 0, out + err)
        code, out, err = await self.epio("config", "set", "A=1")
        self.assertEqual(code, 0, err)
        code, out, err = await self.epio("rollback", "v1")
        self.assertEqual(code, 0, out + err)
        lines = out.strip().splitlines()
        self.assertEqual(lines[0], "Rolled back back to v1: the new release v3 runs v1's "
                                   "code and config")
        self.assertEqual(lines[-1], "v3 is current")

    async def test_upload_too_large_names_epioignore_and_the_biggest_parts(self) -> None:
        """An upload over the limit is refused in MiB with how to shrink it (.epioignore)
        and the largest parts of the upload; no deploy starts."""
        await self.h.add_runner("r1")
        await self.login()
        await self.epio("apps", "create", "big")
        (self.cwd / "Procfile").write_text("web: gunicorn app:app\n")
        (self.cwd / "media").mkdir()
        (self.cwd / "media" / "video.bin").write_bytes(os.urandom(150_000))
        code, out, err = await self.epio("deploy")
        self.assertEqual(code, 1, out + err)
        lines = err.strip().splitlines()
        self.assertRegex(lines[0], (
            r"^epio: the upload is 14\d KiB; the limit is 64 KiB\. Leave out what the app "
            r"does not need to run \(a virtualenv, \.git, media or data files\) with a "
            r"\.epioignore file in the app directory \(gitignore syntax\)$"))
        self.assertTrue(lines[1].startswith(
            "hint: the largest parts of the upload are media/ (150.0 KB), "), lines[1])
        self.assertTrue(lines[1].endswith("; list what the app does not need in .epioignore"))
        self.assertEqual(await self.h.store.list_deploys("big"), [])

    async def test_postgres_without_a_shared_server_suggests_dedicated(self) -> None:
        """`addons create postgres` on a platform without a shared server says so and
        suggests --dedicated."""
        from epio.api.addons import Addons, AddonSettings

        addons = Addons(self.h.store, self.h.runners, reactor, AddonSettings(), shared=None,
                        scheduler=self.h.scheduler)
        self.h.api.addons = self.h.platform.addons = addons
        await self.login()
        await self.epio("apps", "create", "db")
        code, out, err = await self.epio("addons", "create", "postgres")
        self.assertEqual(code, 1)
        self.assertEqual(err.strip().splitlines(), [
            "epio: this platform has no shared PostgreSQL server (its operator has not set "
            "addons.postgres_admin_url); a dedicated server of the app's own (plan "
            '"dedicated") works without one',
            "hint: `epio addons create postgres --dedicated` runs a PostgreSQL server of the "
            "app's own"])
