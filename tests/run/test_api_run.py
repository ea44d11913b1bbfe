"""The api's run endpoints over its real Klein app (StubTreq), a real SQLite store and
an in-memory runner (the real SessionManager on a fake process reactor): placement,
the runner.start body, audit rows, limits, stop, reconciliation, errors."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from epio.api.run import RunApiSettings, RunSessions
from epio.api.settings import derive_app_secret
from epio.pipeline import MemoryLogSink
from epio.runner.sessions import RunSettings, SessionManager
from epio.runner.supervisor import Settings
from tests.api.support import Harness
from tests.run.test_bridge import MemoryControl
from tests.run.test_sessions import DIGEST, FakeLauncher, ProcessClock


class StoreService:
    def __init__(self, store: Any) -> None:
        self.store = store

    def whenReady(self) -> defer.Deferred[Any]:
        return defer.succeed(self.store)


class RoutedControl(MemoryControl):
    """Only the registered runner's endpoint answers (others time out)."""

    def __init__(self, manager: SessionManager, endpoint: str) -> None:
        super().__init__(manager)
        self.endpoint = endpoint

    async def request(self, endpoint: str, type: str, body: dict[str, Any],
                      timeout: float | None = None) -> dict[str, Any]:
        if endpoint != self.endpoint:
            from epio.bus import RequestTimeout

            raise RequestTimeout(type, endpoint, timeout or 0)
        return await super().request(endpoint, type, body, timeout)


class RunApiTests(TestCase):
    async def setUp(self) -> None:  # type: ignore[override]
        self.h = Harness()
        await self.h.start()
        self.addCleanup(lambda: defer.ensureDeferred(self.h.stop()))
        endpoint = await self.h.add_runner("r1")
        self.clock = ProcessClock()
        self.launcher = FakeLauncher()
        self.manager = SessionManager(self.clock, self.launcher, MemoryLogSink(),
                                      RunSettings(), Settings(uid_min=1000, uid_max=65000),
                                      node_id="r1", store_service=StoreService(self.h.store))
        self.control = RoutedControl(self.manager, endpoint)
        # the api's clock is the store's (real) one; runner_timeout is the grace a new
        # session gets before a runner that does not list it makes it "lost"
        self.h.api.run = RunSessions(self.h.store, self.control, reactor,
                                     RunApiSettings(max_sessions_per_app=2, runner_timeout=0.01,
                                                    runner_dead_after=1e12),
                                     platform_env=self.h.scheduler.platform_env)
        await self.h.call("POST", "apps", token=self.h.alice_token, body={"name": "hello"})

    async def release(self) -> None:
        await self.h.store.set_config("hello", {"GREETING": "hi"})
        await self.h.store.create_release("hello", DIGEST, processes={"web": "serve"},
                                          meta={"env": {"FROM_INI": "1"}})

    async def run_detached(self, *command: str, token: str | None = None) -> tuple[int, Any]:
        status, body, _ = await self.h.call("POST", "apps/hello/runs",
                                            token=token or self.h.alice_token,
                                            body={"command": list(command), "detach": True})
        return status, body

    async def test_detached_run_is_placed_recorded_and_stopped(self) -> None:
        """POST runs the command on the runner with the app's uid, image, config and
        limits; the audit row says who and where; DELETE stops it with SIGTERM and the
        runner records the end."""
        await self.release()
        status, body = await self.run_detached("python", "manage.py", "clearsessions")
        self.assertEqual(status, 201, body)
        self.assertEqual((body["number"], body["kind"], body["state"], body["user"],
                          body["node"], body["command"]),
                         (1, "detached", "running", "alice", "r1",
                          "python manage.py clearsessions"))
        start = next(b for t, b in self.control.requests if t == "run.start")
        app = await self.h.store.get_app("hello")
        self.assertEqual((start["uid"], start["image_digest"], start["detach"]),
                         (app.uid, DIGEST, True))
        # the same platform facts as the app's processes (hostnames, derived secret)
        self.assertEqual(start["env"], {"GREETING": "hi", "FROM_INI": "1",
                                        "EPIO_HOSTNAMES": "hello.localhost",
                                        "EPIO_SECRET_KEY": derive_app_secret(
                                            b"s" * 32, f"hello:{app.uid}")})
        self.assertEqual(start["limits"]["memory_mb"], 512)  # the default size
        status, listed, _ = await self.h.call("GET", "apps/hello/runs",
                                              token=self.h.alice_token)
        self.assertEqual([r["number"] for r in listed], [1])
        status, stopped, _ = await self.h.call("DELETE", "apps/hello/runs/run.1",
                                               token=self.h.alice_token)
        self.assertEqual(status, 200)
        self.assertEqual(self.launcher.signals, [15])
        self.clock.spawned[-1].end(143)
        for _ in range(20):
            _, got, _ = await self.h.call("GET", "apps/hello/runs/1", token=self.h.alice_token)
            if got["state"] == "exited":
                break
        self.assertEqual((got["state"], got["exit_status"]), ("exited", 143))
        self.assertIn("stopped by alice", got["reason"])
        _, live, _ = await self.h.call("GET", "apps/hello/runs", token=self.h.alice_token)
        self.assertEqual(live, [])
        _, history, _ = await self.h.call("GET", "apps/hello/runs?history=true",
                                          token=self.h.alice_token)
        self.assertEqual([r["number"] for r in history], [1])

    async def test_limit_per_app(self) -> None:
        """A third live session of the app is refused with 409 session_limit."""
        await self.release()
        for _ in range(2):
            self.assertEqual((await self.run_detached("sleep 60"))[0], 201)
        status, body = await self.run_detached("sleep 60")
        self.assertEqual((status, body["error"]["code"]), (409, "session_limit"))

    async def test_lost_sessions_are_reconciled(self) -> None:
        """A session its runner no longer has (it restarted) is marked lost when the api
        looks, and no longer counts against the limit."""
        await self.release()
        await self.run_detached("sleep 60")
        await self.run_detached("sleep 60")
        self.manager.sessions.clear()  # the runner restarted
        await deferLater(reactor, 0.05, lambda: None)
        _, history, _ = await self.h.call("GET", "apps/hello/runs?history=true",
                                          token=self.h.alice_token)
        self.assertEqual({r["state"] for r in history}, {"lost"})
        self.assertEqual((await self.run_detached("true"))[0], 201)

    async def test_errors(self) -> None:
        """No release yet: 409 no_release; a bad command: 400; the websocket endpoints
        without an upgrade: 400; another user: 404; an unknown session: 404."""
        status, body = await self.run_detached("true")
        self.assertEqual((status, body["error"]["code"]), (409, "no_release"))
        await self.release()
        status, body, _ = await self.h.call("POST", "apps/hello/runs", token=self.h.alice_token,
                                            body={"command": []})
        self.assertEqual((status, body["error"]["code"]), (400, "validation_failed"))
        status, body, _ = await self.h.call("GET", "apps/hello/run", token=self.h.alice_token,
                                            check=False)
        self.assertEqual((status, body["error"]["code"]), (400, "bad_request"))
        status, body = await self.run_detached("true", token=self.h.bob_token)
        self.assertEqual((status, body["error"]["code"]), (404, "not_found"))
        status, body, _ = await self.h.call("GET", "apps/hello/runs/7", token=self.h.alice_token)
        self.assertEqual((status, body["error"]["code"]), (404, "not_found"))
        self.assertEqual([t for t, _ in self.control.requests if t == "run.start"], [])
