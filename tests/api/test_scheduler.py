"""Scheduler and deployer over a real SQLite store and fake runners (IRunnerControl).

The fake runners answer like PROTOCOL.md's runner control: started instances
report ``healthy`` on the next ``runner.status`` (or ``failed`` for releases
listed in ``fail_health``).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from epio.api.control import IRunnerControl
from tests.api.support import DIGEST, DIGEST2, Harness, settle


class SteppedTime:
    """The reactor's time plus an offset a test moves: a runner is past
    runner_dead_after only when the test says (10 ms of real time also expired other
    runners whenever a pass ran slow)."""

    offset = 0.0

    def seconds(self) -> float:
        from twisted.internet import reactor

        return float(reactor.seconds()) + self.offset

    def callLater(self, delay: float, f: Any, *a: Any, **kw: Any) -> Any:
        from twisted.internet import reactor

        return reactor.callLater(delay, f, *a, **kw)

class SchedulerTests(TestCase):
    timeout = 30

    def setUp(self) -> Any:
        self.h = Harness()
        self.addCleanup(lambda: ensureDeferred(self.h.stop()))
        return ensureDeferred(self.h.start())

    async def app_with_release(self, name: str = "web1", quantity: int = 1) -> None:
        alice = await self.h.store.get_user_by_name("alice")
        await self.h.store.create_app(name, alice.id)
        await self.h.store.create_release(name, DIGEST, processes={"web": "run web",
                                                                  "worker": "run worker"})
        await self.h.store.set_formation(name, "web", quantity)

    async def passes(self, n: int = 3) -> None:
        for _ in range(n):
            await self.h.scheduler.reconcile()

    def test_fake_implements_interface(self) -> None:
        """The fake runners provide the interface the real bus control provides."""
        self.assertTrue(verifyObject(IRunnerControl, self.h.runners))

    async def test_places_and_spreads(self) -> None:
        """Scaling web to 4 over two runners puts two on each, all healthy in the store."""
        await self.h.add_runner("r1")
        await self.h.add_runner("r2")
        await self.app_with_release(quantity=4)
        await self.passes()
        nodes = sorted(i.node for i in await self.h.store.list_instances("web1"))
        self.assertEqual(nodes, ["r1", "r1", "r2", "r2"])
        states = {i.state for i in await self.h.store.list_instances("web1")}
        self.assertEqual(states, {"healthy"})
        self.assertEqual(len(self.h.runners.running("web1")), 4)

    async def test_prefers_less_loaded_runner(self) -> None:
        """With equal instance counts, the runner reporting less memory load gets it."""
        await self.h.add_runner("r1")
        await self.h.add_runner("r2")
        self.h.runners.load["tcp://r1:7731"] = {"mem": 0.9, "cpu": 0.5}
        self.h.runners.load["tcp://r2:7731"] = {"mem": 0.2, "cpu": 0.5}
        await self.app_with_release(quantity=1)
        await self.passes()
        self.assertEqual([i.node for i in await self.h.store.list_instances("web1")], ["r2"])

    async def test_scale_down_and_up(self) -> None:
        """Scaling down drains and stops extras; scaling up starts new ones."""
        await self.h.add_runner("r1")
        await self.app_with_release(quantity=3)
        await self.passes()
        await self.h.store.set_formation("web1", "web", 1)
        await self.passes()
        self.assertEqual(len(self.h.runners.running("web1")), 1)
        insts = await self.h.store.list_instances("web1")
        self.assertEqual([(i.number, i.state) for i in insts], [(1, "healthy")])

    async def test_placed_only_where_the_uid_is_accepted(self) -> None:
        """A runner whose registered runner.uid_min/uid_max excludes the app's UID is
        never chosen; with no runner accepting it, the app's log says so once (not at
        every pass) and nothing is started."""
        from zope.interface import implementer

        from epio.pipeline import ILogSink

        @implementer(ILogSink)
        class Lines:
            def __init__(self) -> None:
                self.lines: list[tuple[str, str]] = []

            def emit(self, app: str, source: str, text: str,
                     timestamp: float | None = None) -> None:
                self.lines.append((app, text))

        sink = Lines()
        self.h.scheduler.log_sink = sink
        for node, uids in [("r1", [47000, 47999]), ("r2", [20000, 20999])]:
            self.h.runners.add(f"tcp://{node}:7731")
            await self.h.store.upsert_node(node, ["runner"], f"tcp://{node}:7731", "boot",
                                           status={"uids": uids})
        await self.app_with_release(quantity=2)  # UID 20000
        await self.passes()
        self.assertEqual({i.node for i in await self.h.store.list_instances("web1")}, {"r2"})
        self.assertEqual(len(self.h.runners.running("web1")), 2)
        await self.h.store.set_formation("web1", "web", 0)
        await self.passes()
        await self.h.store.delete_node("r2")
        await self.h.store.set_formation("web1", "web", 1)
        await self.passes(4)
        self.assertEqual(self.h.runners.running("web1"), [])
        said = [t for a, t in sink.lines if "no runner accepts" in t]
        self.assertEqual(said, ["web.1: no runner accepts the app's UID 20000 (outside "
                                "runner.uid_min/uid_max of r1)"])

    async def test_dead_runner_replaced(self) -> None:
        """Instances of a runner that stops answering are placed on another runner."""
        # The scheduler reads liveness from its clock: give it the reactor's time plus an
        # offset the test moves, so r1 is past runner_dead_after only when the test says
        # (10 ms of real time, as before, also expired r2 whenever a pass ran slow).
        time = SteppedTime()
        self.h.scheduler.clock = time
        self.h.settings = self.h.scheduler.settings = self.h.settings.__class__(
            runner_dead_after=30.0, drain_seconds=0.0)
        await self.h.add_runner("r1")
        await self.app_with_release(quantity=1)
        await self.passes(2)
        self.assertEqual([i.node for i in await self.h.store.list_instances("web1")], ["r1"])
        await self.h.add_runner("r2")
        self.h.runners.down.add("tcp://r1:7731")
        await self.passes(1)  # r1 fails its poll, but is not dead yet
        self.assertEqual([i.node for i in await self.h.store.list_instances("web1")], ["r1"])
        time.offset += 31.0  # r2 answers every pass; r1 has not for 31 s
        await self.passes(2)
        insts = await self.h.store.list_instances("web1")
        self.assertEqual([(i.node, i.state) for i in insts], [("r2", "healthy")])

    async def test_silent_runner_judged_after_its_poll_timed_out(self) -> None:
        """A silent runner's poll takes its whole status_timeout: its liveness is judged
        when the poll is over, so a runner that expires during the poll is replaced in
        that same pass, not one or two passes (several seconds) later."""

        from epio.bus import RequestTimeout

        time = SteppedTime()
        self.h.scheduler.clock = time
        self.h.settings = self.h.scheduler.settings = self.h.settings.__class__(
            runner_dead_after=30.0, drain_seconds=0.0)
        await self.h.add_runner("r1")
        await self.app_with_release(quantity=1)
        await self.passes(2)
        await self.h.add_runner("r2")
        runners = self.h.runners
        answer = runners.request

        async def slow_when_down(endpoint: str, type: str, body: dict[str, Any],
                                 timeout: float | None = None) -> dict[str, Any]:
            if endpoint in runners.down:  # the wait for an answer that never comes
                time.offset += timeout or 3.0
                raise RequestTimeout(type, endpoint, timeout or 3.0)
            return await answer(endpoint, type, body, timeout)

        runners.request = slow_when_down  # type: ignore[method-assign]
        runners.down.add("tcp://r1:7731")
        time.offset += 29.0  # r1 last answered 29 s ago: alive when the pass starts
        await self.passes(1)  # its poll waits status_timeout: 29 + 3 > 30 when it ends
        insts = await self.h.store.list_instances("web1")
        self.assertEqual([(i.node, i.state) for i in insts if i.state != "stopped"],
                         [("r2", "starting")])  # placed on r2 in that pass

    async def test_silent_runner_does_not_hold_the_pass_and_is_judged_at_expiry(
            self) -> None:
        """Once a runner's poll failed, the next passes do not wait for its polls (one
        stays in flight; here it never answers) and a pass is woken at its expiry (last
        answer + runner_dead_after), where it is declared gone, logged with the expiry,
        and its instance placed on another runner."""
        from twisted.internet import reactor

        time = SteppedTime()
        self.h.scheduler.clock = time
        self.h.settings = self.h.scheduler.settings = self.h.settings.__class__(
            runner_dead_after=30.0, drain_seconds=0.0)
        await self.h.add_runner("r1")
        await self.app_with_release(quantity=1)
        await self.passes(2)
        await self.h.add_runner("r2")
        runners = self.h.runners
        runners.down.add("tcp://r1:7731")
        self.h.scheduler.leader = True  # so a pass is woken at the expiry
        self.addCleanup(self.h.scheduler.lose_leadership)
        await self.passes(1)  # r1 fails its poll: silent, not dead yet
        view = self.h.scheduler.views["r1"]
        self.assertTrue(view.silent)
        wake = view.expiry_call
        self.assertIsNotNone(wake)
        expiry = view.expiry(30.0)
        self.assertLess(abs((wake.getTime() - float(reactor.seconds()))
                            - (expiry - time.seconds())), 0.5)
        answer, never = runners.request, Deferred()  # type: ignore[var-annotated]
        asked: list[str] = []

        async def hang(endpoint: str, type: str, body: dict[str, Any],
                       timeout: float | None = None) -> dict[str, Any]:
            if endpoint == "tcp://r1:7731":
                asked.append(type)
                return await never  # type: ignore[no-any-return]
            return await answer(endpoint, type, body, timeout)

        runners.request = hang  # type: ignore[method-assign]
        await self.passes(2)  # neither pass waits for r1's poll; one poll in flight
        self.assertEqual(asked, ["runner.status"])
        self.assertEqual([i.node for i in await self.h.store.list_instances("web1")], ["r1"])
        time.offset += 30.0  # the expiry
        lines: list[str] = []
        from twisted.logger import formatEvent, globalLogPublisher

        def observe(event: dict[str, Any]) -> None:
            lines.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        await self.passes(1)
        insts = await self.h.store.list_instances("web1")
        self.assertEqual([(i.node, i.state) for i in insts if i.state != "stopped"],
                         [("r2", "starting")])
        gone = [ln for ln in lines if ln.startswith("runner r1 is gone")]
        self.assertEqual(len(gone), 1, lines)
        self.assertIn("api.runner_dead_after 30s", gone[0])

    async def test_store_change_wakes_the_leader(self) -> None:
        """A formation change reconciles at once, not at the next (here: hourly) tick."""
        from epio.api.settings import ApiSettings

        self.h.scheduler.settings = ApiSettings(reconcile_interval=3600.0, drain_seconds=0.0,
                                                route_settle=0.0)
        await self.h.add_runner("r1")
        await self.app_with_release(quantity=0)
        self.h.scheduler.become_leader()
        self.addCleanup(self.h.scheduler.lose_leadership)
        for _ in range(100):  # the first pass and the subscription
            if self.h.scheduler.passes and self.h.scheduler._unsubscribe is not None:
                break
            await settle(ensureDeferred(self.h.store.list_apps()))
        await self.h.store.set_formation("web1", "web", 1)
        for _ in range(200):
            if self.h.runners.running("web1"):
                break
            await settle(ensureDeferred(self.h.store.list_apps()))
        self.assertEqual(len(self.h.runners.running("web1")), 1)

    async def test_orphans_stopped(self) -> None:
        """An instance a runner runs that the store does not know is stopped."""
        await self.h.add_runner("r1")
        self.h.runners.instances["tcp://r1:7731"]["ghost"] = {
            "instance_id": "ghost", "app": "gone", "release": 1, "process_type": "web",
            "state": "healthy", "host": "h", "port": 1, "since": 0, "restarts": 0}
        await self.passes(1)
        self.assertEqual(self.h.runners.running(), [])

    async def test_new_release_rolls_over(self) -> None:
        """A new release starts new instances, and old ones are stopped only after."""
        await self.h.add_runner("r1")
        await self.app_with_release(quantity=2)
        await self.passes()
        await self.h.store.create_release("web1", DIGEST2)
        await self.h.scheduler.reconcile()
        releases = sorted(i["release"] for i in self.h.runners.running("web1"))
        # new ones were started while the old ones still run
        self.assertEqual(releases, [1, 1, 2, 2])
        await self.passes()
        releases = sorted(i["release"] for i in self.h.runners.running("web1"))
        self.assertEqual(releases, [2, 2])
        stops = [b for _, t, b in self.h.runners.requests if t == "runner.drain"]
        self.assertEqual(len(stops), 2)

    async def test_worker_rolls_over_on_every_release(self) -> None:
        """A worker is replaced on every release (deploy, config set, rollback): after
        each rollover exactly the scaled number run, all of the new release; a worker
        is never drained through the routers (none routes to it) but stopped, only once
        its replacement is healthy -- even with a nexus that never lists workers."""
        from attrs import evolve

        self.h.scheduler.settings = evolve(self.h.scheduler.settings,
                                           nexus_endpoints=("nexus",))
        await self.h.add_runner("r1")
        await self.h.add_runner("r2")
        await self.app_with_release(quantity=0)
        await self.h.store.set_formation("web1", "worker", 2)
        await self.passes()
        for n, make in enumerate([
            lambda: self.h.store.create_release("web1", DIGEST2),
            lambda: self.h.store.set_config_and_release(
                "web1", {"A": "1"}, description="set A", image=DIGEST2, processes={"worker": "run worker"}),
            lambda: self.h.store.set_config_and_release(
                "web1", {"A": "2"}, description="set A", image=DIGEST2, processes={"worker": "run worker"}),
            lambda: self.h.store.create_release("web1", DIGEST),
        ], start=2):
            await make()
            await self.h.scheduler.reconcile()
            # the new ones start first, the old ones still run (start-first)
            self.assertEqual(sorted(i["release"] for i in self.h.runners.running("web1")),
                             [n - 1, n - 1, n, n])
            await self.passes()
            self.assertEqual(sorted(i["release"] for i in self.h.runners.running("web1")),
                             [n, n], f"after release v{n}")
            self.assertEqual(sorted(i.state for i in await self.h.store.list_instances("web1")),
                             ["healthy", "healthy"])
        self.assertEqual([t for _, t, _ in self.h.runners.requests if t == "runner.drain"], [])
        self.assertEqual(len([t for _, t, _ in self.h.runners.requests if t == "runner.stop"]),
                         8)

    async def test_stop_first_never_runs_two(self) -> None:
        """[process:worker] rollover = stop-first: on every release the old worker is
        stopped (confirmed by its runner) before the new one starts, so never more than
        the scaled quantity run; while the old one's runner does not answer, no new one
        starts."""
        stop_first = {"rollover": {"worker": "stop-first"}}
        runners = self.h.runners
        at_start: list[int] = []
        real = runners.request

        async def request(endpoint: str, type: str, body: dict[str, Any],
                          timeout: float | None = None) -> dict[str, Any]:
            if type == "runner.start" and body["process_type"] == "worker":
                at_start.append(len([i for i in runners.running("web1")
                                     if i["process_type"] == "worker"]))
            return await real(endpoint, type, body, timeout)

        runners.request = request  # type: ignore[method-assign]
        await self.h.add_runner("r1")
        await self.h.add_runner("r2")
        alice = await self.h.store.get_user_by_name("alice")
        await self.h.store.create_app("web1", alice.id)
        await self.h.store.create_release("web1", DIGEST, processes={"worker": "w"},
                                          meta=stop_first)
        await self.h.store.set_formation("web1", "worker", 1)
        await self.passes()
        for n in (2, 3, 4):
            await self.h.store.set_config_and_release(
                "web1", {"N": str(n)}, description="n", image=DIGEST, processes={"worker": "w"}, meta=stop_first)
            await self.passes()
            self.assertEqual([i["release"] for i in runners.running("web1")], [n])
        self.assertEqual(at_start, [0, 0, 0, 0])
        # the old worker's runner does not answer: nothing new starts (it may still run)
        old = runners.running("web1")[0]
        endpoint = next(e for e, m in runners.instances.items() if old["instance_id"] in m)
        runners.down.add(endpoint)
        await self.h.store.set_config_and_release(
            "web1", {"N": "5"}, description="n", image=DIGEST, processes={"worker": "w"}, meta=stop_first)
        await self.passes()
        self.assertEqual([i["release"] for i in runners.running("web1")], [4])
        runners.down.discard(endpoint)
        await self.passes()
        self.assertEqual([i["release"] for i in runners.running("web1")], [5])
        self.assertEqual(at_start, [0, 0, 0, 0, 0])

    async def test_pass_cost_does_not_grow_per_app(self) -> None:
        """docs/apps.md "Density": a steady pass (every app placed and healthy) issues
        the same store statements with 10 apps as with 100 (a few per pass, none per
        app), reads no release's JSON (an app's current release is kept, parsed, from
        pass to pass), and compares instances a number of times that grows with the
        apps, not with their square (a list of every instance scanned per app did:
        ~5,000 ``Instance.__eq__`` calls a pass at 100 apps)."""
        from epio.store import Instance

        await self.h.add_runner("r1")
        conn = self.h.store.backend._conn  # type: ignore[attr-defined]
        statements: list[str] = []
        compared = [0]
        real_eq = Instance.__eq__

        def counting_eq(a: Any, b: Any) -> Any:
            compared[0] += 1
            return real_eq(a, b)

        async def steady_pass(apps: int) -> tuple[int, int, list[str]]:
            for n in range(len(await self.h.store.list_apps()), apps):
                await self.app_with_release(f"app{n}")
            await self.passes(3)  # placed, then healthy
            self.assertEqual(len(self.h.runners.running()), apps)
            del statements[:]
            compared[0] = 0
            conn.set_trace_callback(statements.append)
            Instance.__eq__ = counting_eq  # type: ignore[method-assign,assignment]
            try:
                await self.h.scheduler.reconcile()
            finally:
                Instance.__eq__ = real_eq  # type: ignore[method-assign]
                conn.set_trace_callback(None)
            return len(statements), compared[0], list(statements)

        few, few_eq, _ = await steady_pass(10)
        many, many_eq, sql = await steady_pass(100)
        self.assertEqual(many, few, sql)
        self.assertLessEqual(many_eq, 10 * few_eq + 10)
        self.assertLessEqual(many_eq, 2 * 100)
        self.assertEqual([s for s in sql if "FROM releases WHERE" in s and "version =" in s],
                         [])

    async def test_current_release_cache_follows_a_recreated_app(self) -> None:
        """The pass keeps each app's current release parsed; a new release, and a new
        app of a deleted one's name (its v1 again, another UID), are read afresh."""
        await self.h.add_runner("r1")
        await self.app_with_release("again")
        await self.passes()

        def commands() -> list[str]:
            return [b["command"] for _, t, b in self.h.runners.requests
                    if t == "runner.start" and b["app"] == "again"]

        self.assertEqual(commands(), ["run web"])
        await self.h.store.create_release("again", DIGEST, processes={"web": "run v2"})
        await self.passes()
        self.assertEqual(commands(), ["run web", "run v2"])
        await self.h.store.delete_app("again")
        alice = await self.h.store.get_user_by_name("alice")
        await self.h.store.create_app("again", alice.id)
        await self.h.store.create_release("again", DIGEST, processes={"web": "run v1"})
        # its v2, as the deleted app's current release was: told apart by the UID
        await self.h.store.create_release("again", DIGEST, processes={"web": "run new app"})
        await self.h.store.set_formation("again", "web", 1)
        await self.passes()
        self.assertEqual(commands(), ["run web", "run v2", "run new app"])
        self.assertEqual([(i.release, i.state) for i in
                          await self.h.store.list_instances("again")], [(2, "healthy")])

    async def test_app_deleted_during_a_pass(self) -> None:
        """An app deleted while a pass places, starts or reports its instances is not a
        bug: no traceback is logged (trial fails a test that logs one), the pass goes on
        with the other apps, and the deleted app's instance is stopped as an orphan."""
        await self.h.add_runner("r1")
        await self.app_with_release("doomed")
        await self.app_with_release("other")
        runners = self.h.runners
        real = runners.request
        deleted: list[str] = []

        async def request(endpoint: str, type: str, body: dict[str, Any],
                          timeout: float | None = None) -> dict[str, Any]:
            reply = await real(endpoint, type, body, timeout)
            if type == "runner.start" and body["app"] == "doomed" and not deleted:
                deleted.append(body["instance_id"])
                await self.h.store.delete_app("doomed")
            return reply

        runners.request = request  # type: ignore[method-assign]
        await self.passes(3)
        self.assertEqual(len(deleted), 1)
        self.assertEqual([i["app"] for i in runners.running()], ["other"])
        self.assertEqual([i.app for i in await self.h.store.list_instances()], ["other"])

    async def test_old_release_drained_only_once_routers_see_the_new(self) -> None:
        """Healthy new instances do not retire the old ones until the nexus lists them
        in the app's route (routers learn from heartbeats, later than the scheduler);
        with no nexus answering, they must have been healthy for route_settle."""
        from attrs import evolve

        self.h.scheduler.settings = evolve(self.h.scheduler.settings,
                                           nexus_endpoints=("nexus",))
        await self.h.add_runner("r1")
        await self.app_with_release(quantity=1)
        await self.passes()
        await self.h.store.create_release("web1", DIGEST2)
        await self.passes()
        releases = sorted(i["release"] for i in self.h.runners.running("web1"))
        self.assertEqual(releases, [1, 2])  # new healthy, old still serving
        self.assertEqual([t for _, t, _ in self.h.runners.requests if t == "runner.drain"], [])
        self.h.runners.routed["web1"] = {
            i["instance_id"] for i in self.h.runners.running("web1") if i["release"] == 2}
        await self.passes()
        self.assertEqual([i["release"] for i in self.h.runners.running("web1")], [2])

        # no nexus answers: the time since the new instance became healthy decides
        self.h.runners.down.add("nexus")
        self.h.scheduler.settings = evolve(self.h.scheduler.settings, route_settle=1e9)
        await self.h.store.create_release("web1", DIGEST)
        await self.passes()
        self.assertEqual(sorted(i["release"] for i in self.h.runners.running("web1")), [2, 3])
        self.h.scheduler.settings = evolve(self.h.scheduler.settings, route_settle=0.0)
        await self.passes()
        self.assertEqual([i["release"] for i in self.h.runners.running("web1")], [3])

    async def test_env_carries_config(self) -> None:
        """runner.start gets the release's config vars as environment."""
        await self.h.add_runner("r1")
        await self.app_with_release()
        await self.h.store.set_config("web1", {"GREETING": "hey"})
        await self.h.store.create_release("web1")
        await self.passes()
        (inst,) = self.h.runners.running("web1")
        self.assertEqual(inst["env"]["GREETING"], "hey")

    async def test_env_carries_hostnames_and_app_secret(self) -> None:
        """Every process learns its app's hostnames (Django's ALLOWED_HOSTS) and a stable
        per-app secret key that differs between apps; an app's own SECRET_KEY is kept."""
        await self.h.add_runner("r1")
        await self.app_with_release("web1")
        await self.app_with_release("web2")
        await self.h.store.add_domain("web1", "www.example.org")
        await self.h.store.set_config("web2", {"SECRET_KEY": "mine"})
        await self.h.store.create_release("web2")
        await self.passes()
        (one,) = self.h.runners.running("web1")
        (two,) = self.h.runners.running("web2")
        self.assertEqual(one["env"]["EPIO_HOSTNAMES"], "web1.localhost,www.example.org")
        self.assertEqual(len(one["env"]["EPIO_SECRET_KEY"]), 64)
        self.assertNotEqual(one["env"]["EPIO_SECRET_KEY"], two["env"]["EPIO_SECRET_KEY"])
        self.assertEqual(two["env"]["SECRET_KEY"], "mine")

    async def test_start_names_the_shared_addon_ports(self) -> None:
        """runner.start carries addon_ports: the ports of the app's shared add-on
        servers (for the runner's network fence), not its dedicated ones', and none
        for an app without add-ons."""
        from epio.store.addons import Addon, put_addon

        await self.h.add_runner("r1")
        await self.app_with_release("web1")
        await self.app_with_release("web2")
        await put_addon(self.h.store, Addon("web1", "postgres", "shared", "ready", 1.0, 1.0,
                                            "127.0.0.1", 5432))
        await put_addon(self.h.store, Addon("web1", "redis", "dedicated", "ready", 1.0, 1.0,
                                            "127.0.0.1", 21007))
        await self.passes()
        (one,) = self.h.runners.running("web1")
        (two,) = self.h.runners.running("web2")
        self.assertEqual((one["addon_ports"], two["addon_ports"]), ([5432], []))


class DeployTests(TestCase):
    timeout = 30

    def setUp(self) -> Any:
        self.h = Harness()
        self.addCleanup(lambda: ensureDeferred(self.h.stop()))
        return ensureDeferred(self.h.start())

    async def deploy(self, app: str = "hello") -> dict[str, Any]:
        status, body, _ = await self.h.call("POST", f"apps/{app}/deploys",
                                            token=self.h.alice_token, raw=b"tarball-bytes",
                                            content_type="application/gzip")
        self.assertEqual(status, 202, body)
        self.h.scheduler.become_leader()
        await settle(ensureDeferred(self.h.deployer.wait(body["id"])), timeout=20)
        self.h.scheduler.lose_leadership()
        _, body, _ = await self.h.call("GET", f"apps/{app}/deploys/{body['id']}",
                                       token=self.h.alice_token)
        return body

    async def test_deploy_succeeds(self) -> None:
        """Upload -> build -> release v1 with web=1 -> healthy -> succeeded, log kept."""
        await self.h.add_runner("r1")
        await self.h.call("POST", "apps", token=self.h.alice_token, body={"name": "hello"})
        d = await self.deploy()
        self.assertEqual(d["status"], "succeeded", d["log"])
        self.assertEqual(d["release"], 1)
        self.assertIn("Deployed v1: http://hello.localhost:8080/", d["log"])
        _, ps, _ = await self.h.call("GET", "apps/hello/ps", token=self.h.alice_token)
        self.assertEqual([(p["name"], p["state"]) for p in ps], [("web.1", "healthy")])
        # the build request says which app "hello" this is (a runner's build caches of
        # an earlier, purged app of the same name are not used: docs/builds.md)
        from epio.bus.messages import REGISTRY

        [build] = [b for _, t, b in self.h.runners.requests if t == "runner.build"]
        self.assertEqual(build["app_created"], (await self.h.store.get_app("hello")).created)
        self.assertIsNone(REGISTRY.get("runner.build").check_body(build))

    async def test_succeeds_once_routers_route_the_new_instance(self) -> None:
        """Once the new web instance is healthy the deploy succeeds as soon as the nexus
        lists it in the app's route (what routers follow), not after a fixed wait; a
        nexus that never lists it holds the deploy at most api.drain_seconds."""
        from attrs import evolve
        from twisted.internet import reactor
        from twisted.internet.task import deferLater

        self.h.deployer.settings = evolve(self.h.deployer.settings,
                                          nexus_endpoints=("nexus",), drain_seconds=60.0)
        await self.h.add_runner("r1")
        await self.h.call("POST", "apps", token=self.h.alice_token, body={"name": "hello"})
        _, body, _ = await self.h.call("POST", "apps/hello/deploys", token=self.h.alice_token,
                                       raw=b"tar", content_type="application/gzip")
        self.h.scheduler.become_leader()

        def asked() -> int:
            return sum(1 for e, t, _ in self.h.runners.requests if t == "nexus.where")

        for _ in range(200):  # until the deploy asks the nexus (its instance is healthy)
            if asked() >= 2:
                break
            await deferLater(reactor, 0.05, lambda: None)
        self.assertGreaterEqual(asked(), 2)
        self.assertEqual((await self.h.store.get_deploy(body["id"])).status, "deploying")
        self.h.runners.routed["hello"] = {i["instance_id"]
                                          for i in self.h.runners.running("hello")}
        started = reactor.seconds()
        await settle(ensureDeferred(self.h.deployer.wait(body["id"])), timeout=10)
        self.assertLess(reactor.seconds() - started, 5.0)  # not drain_seconds (60)
        self.assertEqual((await self.h.store.get_deploy(body["id"])).status, "succeeded")

        # a nexus that never routes the new instance: the deploy succeeds after the bound
        self.h.deployer.settings = evolve(self.h.deployer.settings, drain_seconds=0.5)
        before = asked()
        started = reactor.seconds()
        _, body, _ = await self.h.call("POST", "apps/hello/deploys", token=self.h.alice_token,
                                       raw=b"tar", content_type="application/gzip")
        await settle(ensureDeferred(self.h.deployer.wait(body["id"])), timeout=10)
        self.h.scheduler.lose_leadership()
        self.assertEqual((await self.h.store.get_deploy(body["id"])).status, "succeeded")
        self.assertGreaterEqual(reactor.seconds() - started, 0.5)
        self.assertGreaterEqual(asked() - before, 2)

    async def test_healthy_on_its_runner_is_folded_at_once(self) -> None:
        """The store learns instance states at the leader's passes (here every 30 s):
        a deploy that sees, through the nexus, its new instance healthy on its runner
        while the store still says starting wakes the leader (a "reported" store
        notification), whose pass folds it at once: the deploy succeeds in well under
        a pass interval, and the verdict still comes from the store."""
        from attrs import evolve
        from twisted.internet import reactor
        from twisted.internet.task import deferLater

        from epio.store import Change

        slow = evolve(self.h.settings, reconcile_interval=30.0, nexus_endpoints=("nexus",))
        self.h.deployer.settings = self.h.scheduler.settings = slow
        changes: list[Change] = []
        unsubscribe = await self.h.store.subscribe(changes.append)
        self.addCleanup(unsubscribe)
        await self.h.add_runner("r1")
        await self.h.call("POST", "apps", token=self.h.alice_token, body={"name": "hello"})
        self.h.scheduler.become_leader()
        await settle(ensureDeferred(self.h.scheduler.reconcile()))  # the first tick's pass
        self.h.runners.booting = True
        _, body, _ = await self.h.call("POST", "apps/hello/deploys", token=self.h.alice_token,
                                       raw=b"tar", content_type="application/gzip")
        for _ in range(200):  # placed, the passes the deploy woke are over, still booting
            if self.h.runners.running("hello") and not self.h.scheduler._busy:
                break
            await deferLater(reactor, 0.02, lambda: None)
        await deferLater(reactor, 0.3, lambda: None)
        self.assertEqual([i.state for i in await self.h.store.list_instances("hello")],
                         ["starting"])
        self.assertEqual(changes and [c.app for c in changes if c.kind == "reported"], [])
        self.h.runners.booting = False  # healthy on its runner now; the nexus hears it
        started = reactor.seconds()
        await settle(ensureDeferred(self.h.deployer.wait(body["id"])), timeout=10)
        self.h.scheduler.lose_leadership()
        d = await self.h.store.get_deploy(body["id"])
        self.assertEqual(d.status, "succeeded", d.log)
        self.assertLess(reactor.seconds() - started, 5.0)  # not the 30 s tick
        self.assertEqual([c.app for c in changes if c.kind == "reported"], ["hello"])
        self.assertEqual([i.state for i in await self.h.store.list_instances("hello")],
                         ["healthy"])

    async def test_get_deploy_waits_for_its_next_line(self) -> None:
        """``GET .../deploys/{id}?log_offset=N&wait=S`` (what ``epio deploy`` asks once
        the build is over) answers as soon as the deploy's log grows past N, neither at
        once nor after S; a finished deploy answers at once; a wait over 10 s is
        refused."""
        from twisted.internet import reactor
        from twisted.internet.task import deferLater

        await self.h.add_runner("r1")
        await self.h.call("POST", "apps", token=self.h.alice_token, body={"name": "hello"})
        gate: Deferred[None] = Deferred()
        self.h.runners.build_gate = gate
        _, body, _ = await self.h.call("POST", "apps/hello/deploys", token=self.h.alice_token,
                                       raw=b"tar", content_type="application/gzip")
        url = f"apps/hello/deploys/{body['id']}"
        for _ in range(200):
            _, d, _ = await self.h.call("GET", url + "?log_offset=0", token=self.h.alice_token)
            if d["status"] == "building":
                break
            await deferLater(reactor, 0.02, lambda: None)
        self.assertEqual(d["status"], "building")
        started = reactor.seconds()
        waiting = ensureDeferred(self.h.call(
            "GET", url + f"?log_offset={d['log_offset']}&wait=10", token=self.h.alice_token))
        await deferLater(reactor, 0.3, lambda: None)
        self.assertFalse(waiting.called)  # nothing new yet: the answer waits
        gate.callback(None)  # the build ends: "Built image ..." is the deploy's next line
        _, d, _ = await waiting
        self.assertLess(reactor.seconds() - started, 5.0)
        self.assertTrue(d["log"].startswith("Built image "), d["log"])
        self.h.scheduler.become_leader()
        await settle(ensureDeferred(self.h.deployer.wait(body["id"])), timeout=20)
        self.h.scheduler.lose_leadership()
        started = reactor.seconds()
        _, d, _ = await self.h.call("GET", url + f"?log_offset={d['log_offset']}&wait=10",
                                    token=self.h.alice_token)
        self.assertEqual(d["status"], "succeeded")
        self.assertLess(reactor.seconds() - started, 2.0)
        status, err, _ = await self.h.call("GET", url + "?wait=11", token=self.h.alice_token)
        self.assertEqual((status, err["error"]["code"]), (400, "bad_request"), err)

    async def test_asleep_app_keeps_its_old_release_until_the_nexus_wakes_the_new(
            self) -> None:
        """A deploy to an asleep app: the new release boots and sleeps at once; the old
        asleep instance is retired, and the deploy succeeds, only once the nexus names
        the new one in the route's asleep entry -- before, a request would find neither
        release routed (503 instead of a wake)."""
        from attrs import evolve
        from twisted.internet import reactor
        from twisted.internet.task import deferLater

        self.h.deployer.settings = evolve(self.h.deployer.settings,
                                          nexus_endpoints=("nexus",), drain_seconds=60.0)
        self.h.scheduler.settings = evolve(self.h.scheduler.settings,
                                           nexus_endpoints=("nexus",))
        await self.h.add_runner("r1")
        await self.h.call("POST", "apps", token=self.h.alice_token, body={"name": "hello"})
        self.h.scheduler.become_leader()
        _, body, _ = await self.h.call("POST", "apps/hello/deploys", token=self.h.alice_token,
                                       raw=b"tar", content_type="application/gzip")
        for _ in range(200):
            if self.h.runners.running("hello"):
                break
            await deferLater(reactor, 0.05, lambda: None)
        (v1,) = self.h.runners.running("hello")
        self.h.runners.routed["hello"] = {v1["instance_id"]}
        await settle(ensureDeferred(self.h.deployer.wait(body["id"])), timeout=10)
        v1["state"] = "asleep"  # idle_sleep: the runner stopped it
        self.h.runners.routed["hello"] = set()
        self.h.runners.routed_asleep["hello"] = {v1["instance_id"]}

        async def states() -> list[tuple[int, str]]:
            return sorted((i.release, i.state)
                          for i in await self.h.store.list_instances("hello"))

        for _ in range(200):
            if await states() == [(1, "asleep")]:
                break
            await deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(await states(), [(1, "asleep")])

        _, body, _ = await self.h.call("POST", "apps/hello/deploys", token=self.h.alice_token,
                                       raw=b"tar", content_type="application/gzip")
        for _ in range(200):
            if (2, "asleep") in await states():
                break
            await deferLater(reactor, 0.05, lambda: None)
        (v2,) = [i for i in self.h.runners.running("hello") if i["release"] == 2]
        self.assertTrue(v2["asleep_after_boot"])
        await deferLater(reactor, 0.5, lambda: None)  # ten scheduler passes
        self.assertEqual(await states(), [(1, "asleep"), (2, "asleep")])
        self.assertEqual((await self.h.store.get_deploy(body["id"])).status, "deploying")

        self.h.runners.routed_asleep["hello"] = {v1["instance_id"], v2["instance_id"]}
        await settle(ensureDeferred(self.h.deployer.wait(body["id"])), timeout=10)
        self.assertEqual((await self.h.store.get_deploy(body["id"])).status, "succeeded")
        for _ in range(200):  # the scheduler's next pass retires v1
            if await states() == [(2, "asleep")]:
                break
            await deferLater(reactor, 0.05, lambda: None)
        self.h.scheduler.lose_leadership()
        self.assertEqual(await states(), [(2, "asleep")])

    async def test_first_deploy_starts_one_of_every_process_type(self) -> None:
        """A first deploy scales every declared process type to 1 (a worker-only app
        too) and says so; a later deploy keeps the formation the user chose and gives
        a type seen for the first time one instance."""
        await self.h.add_runner("r1")
        await self.h.call("POST", "apps", token=self.h.alice_token, body={"name": "hello"})
        self.h.runners.manifest = {"processes": {"web": "gunicorn a:b", "worker": "w",
                                                 "clock": "c"}}
        d = await self.deploy()
        self.assertEqual(d["status"], "succeeded", d["log"])
        self.assertIn("rolling out clock=1, web=1, worker=1 (new process types start with "
                      "1: clock, web, worker; change it with `epio scale`)", d["log"])
        _, ps, _ = await self.h.call("GET", "apps/hello/ps", token=self.h.alice_token)
        self.assertEqual(sorted(p["name"] for p in ps), ["clock.1", "web.1", "worker.1"])
        await self.h.store.set_formation("hello", "clock", 0)
        self.h.runners.manifest = {"processes": {"web": "gunicorn a:b", "worker": "w",
                                                 "clock": "c", "mailer": "m"}}
        d = await self.deploy()
        self.assertEqual(d["status"], "succeeded", d["log"])
        self.assertIn("rolling out clock=0, mailer=1, web=1, worker=1 (new process types "
                      "start with 1: mailer;", d["log"])
        for _ in range(3):  # the old release's instances are retired after the rollout
            await self.h.scheduler.reconcile()
        _, ps, _ = await self.h.call("GET", "apps/hello/ps", token=self.h.alice_token)
        # v2's web and worker took numbers v1's (still running during the rollout) did not
        # have: names are unique across releases
        self.assertEqual(sorted(p["name"] for p in ps), ["mailer.1", "web.2", "worker.2"])

        await self.h.call("POST", "apps", token=self.h.alice_token, body={"name": "solo"})
        self.h.runners.manifest = {"processes": {"worker": "w"}}
        d = await self.deploy("solo")
        self.assertEqual(d["status"], "succeeded", d["log"])
        _, ps, _ = await self.h.call("GET", "apps/solo/ps", token=self.h.alice_token)
        self.assertEqual([(p["name"], p["state"]) for p in ps], [("worker.1", "healthy")])

    async def test_failed_health_keeps_previous(self) -> None:
        """A release whose instances fail leaves the previous release serving; the new
        release's instance is web.2 while v1's web.1 runs (names unique across
        releases, so their log lines can be told apart)."""
        await self.h.add_runner("r1")
        await self.h.call("POST", "apps", token=self.h.alice_token, body={"name": "hello"})
        self.assertEqual((await self.deploy())["status"], "succeeded")
        self.h.runners.fail_health.add(2)
        d = await self.deploy()
        self.assertEqual(d["status"], "failed")
        self.assertIn("v2", d["reason"])
        _, full, _ = await self.h.call("GET", f"apps/hello/deploys/{d['id']}?log_offset=0",
                                       token=self.h.alice_token)
        self.assertIn("web.2 (v2) is failed on r1: health check /health failed 3 times",
                      full["log"])
        _, ps, _ = await self.h.call("GET", "apps/hello/ps", token=self.h.alice_token)
        names = [(p["name"], p["release"]) for p in ps]
        self.assertIn(("web.1", 1), names)
        self.assertEqual(len({n for n, _ in names}), len(names), names)
        self.h.scheduler.become_leader()
        for _ in range(3):
            await self.h.scheduler.reconcile()
        self.h.scheduler.lose_leadership()
        self.assertEqual([i["release"] for i in self.h.runners.running("hello")], [1])
        _, app, _ = await self.h.call("GET", "apps/hello", token=self.h.alice_token)
        self.assertEqual(app["release"], 1)
        _, rels, _ = await self.h.call("GET", "apps/hello/releases", token=self.h.alice_token)
        self.assertEqual([(r["version"], r["status"]) for r in rels],
                         [(2, "failed"), (1, "current")])

    async def test_failed_rollout_shows_the_instance_output(self) -> None:
        """When an instance of the new release fails, the deploy's log shows the last 20
        lines of its output (from runner.status), before the failure line."""
        await self.h.add_runner("r1")
        await self.h.call("POST", "apps", token=self.h.alice_token, body={"name": "hello"})
        self.assertEqual((await self.deploy())["status"], "succeeded")
        self.h.runners.fail_health.add(2)
        self.h.runners.tails[2] = [f"Traceback line {n}" for n in range(25)]
        d = await self.deploy()
        self.assertEqual(d["status"], "failed")
        _, full, _ = await self.h.call("GET", f"apps/hello/deploys/{d['id']}?log_offset=0",
                                       token=self.h.alice_token)
        # v2's instance is web.2: v1's web.1 still runs (names unique across releases)
        shown = "  last 20 lines of web.2's output:\n" + "\n".join(
            f"  | Traceback line {n}" for n in range(5, 25)) + "\nDeploy failed: web.2 of v2"
        self.assertIn(shown, full["log"])

    async def test_newer_deploy_supersedes(self) -> None:
        """A deploy whose release is replaced during its rollout is cancelled; the newer
        one succeeds."""
        await self.h.add_runner("r1")
        await self.h.call("POST", "apps", token=self.h.alice_token, body={"name": "hello"})
        ids = []
        for _ in range(2):
            status, body, _ = await self.h.call("POST", "apps/hello/deploys",
                                                token=self.h.alice_token, raw=b"tar",
                                                content_type="application/gzip")
            ids.append(body["id"])
            for _ in range(50):  # until its release exists (no leader yet: no rollout)
                d = await self.h.store.get_deploy(body["id"])
                if d.release is not None or d.finished is not None:
                    break
                await settle(ensureDeferred(self.h.store.list_apps()))
        self.h.scheduler.become_leader()
        for deploy_id in ids:
            await settle(ensureDeferred(self.h.deployer.wait(deploy_id)), timeout=20)
        self.h.scheduler.lose_leadership()
        first, second = [await self.h.store.get_deploy(i) for i in ids]
        self.assertEqual((first.status, second.status), ("cancelled", "succeeded"))
        self.assertIn("v2 replaced v1", first.reason)

    async def test_stopping_leaves_the_rollout_to_the_leader(self) -> None:
        """When the api stops mid-rollout, the deploy stays `deploying` (nothing failed
        it); once that api process is gone (its node restarted with a new boot id),
        the leader finishes the rollout from what the instances report."""
        await self.h.add_runner("r1")
        await self.h.call("POST", "apps", token=self.h.alice_token, body={"name": "hello"})
        _, body, _ = await self.h.call("POST", "apps/hello/deploys", token=self.h.alice_token,
                                       raw=b"tar", content_type="application/gzip")
        for _ in range(100):  # until it waits for a rollout that never comes (no leader)
            if (await self.h.store.get_deploy(body["id"])).status == "deploying":
                break
            await settle(ensureDeferred(self.h.store.list_apps()))
        await settle(ensureDeferred(self.h.deployer.stop()))
        self.assertEqual((await self.h.store.get_deploy(body["id"])).status, "deploying")
        await self.h.scheduler.reconcile()  # its api process is still registered
        self.assertEqual((await self.h.store.get_deploy(body["id"])).status, "deploying")
        await self.h.store.upsert_node("api1", ["api"], None, "boot-2")
        for _ in range(3):
            await self.h.scheduler.reconcile()
        d = await self.h.store.get_deploy(body["id"])
        self.assertEqual(d.status, "succeeded", d.log)
        self.assertIn("rollout finished after a node restart", d.log)

    async def test_stopping_marks_running_builds_failed(self) -> None:
        """When the api stops, a build it was running is marked failed, saying why."""
        await self.h.add_runner("r1")
        await self.h.call("POST", "apps", token=self.h.alice_token, body={"name": "hello"})
        hold: Deferred[None] = Deferred()
        real = self.h.runners.request

        async def slow_build(endpoint: str, type: str, body: dict[str, Any],
                             timeout: float | None = None) -> dict[str, Any]:
            if type == "runner.build":
                await hold
            return await real(endpoint, type, body, timeout)

        self.h.runners.request = slow_build  # type: ignore[method-assign]
        _, body, _ = await self.h.call("POST", "apps/hello/deploys", token=self.h.alice_token,
                                       raw=b"tar", content_type="application/gzip")
        for _ in range(100):
            if (await self.h.store.get_deploy(body["id"])).status == "building":
                break
            await settle(ensureDeferred(self.h.store.list_apps()))
        await settle(ensureDeferred(self.h.deployer.stop()))
        hold.callback(None)
        d = await self.h.store.get_deploy(body["id"])
        self.assertEqual(d.status, "failed")
        self.assertIn("the api process running it stopped", d.reason)

    async def test_build_failure(self) -> None:
        """A build error fails the deploy with the runner's reason; no release is made."""
        await self.h.add_runner("r1")
        self.h.runners.build_error = "pip install failed: no such package"
        await self.h.call("POST", "apps", token=self.h.alice_token, body={"name": "hello"})
        d = await self.deploy()
        self.assertEqual(d["status"], "failed")
        self.assertIn("no such package", d["reason"])
        _, rels, _ = await self.h.call("GET", "apps/hello/releases", token=self.h.alice_token)
        self.assertEqual(rels, [])

    async def test_no_runner(self) -> None:
        """Without any runner the deploy fails saying so."""
        await self.h.call("POST", "apps", token=self.h.alice_token, body={"name": "hello"})
        d = await self.deploy()
        self.assertEqual(d["status"], "failed")
        self.assertIn("no runner", d["reason"])

    async def test_rollback_and_delete(self) -> None:
        """Rollback makes a new release on the old image; delete stops everything."""
        await self.h.add_runner("r1")
        await self.h.call("POST", "apps", token=self.h.alice_token, body={"name": "hello"})
        await self.deploy()
        await self.deploy()
        status, rel, _ = await self.h.call("POST", "apps/hello/rollback",
                                           token=self.h.alice_token, body={})
        self.assertEqual(status, 201)
        self.assertEqual((rel["version"], rel["image"]), (3, DIGEST))
        self.h.scheduler.become_leader()
        for _ in range(3):
            await self.h.scheduler.reconcile()
        self.h.scheduler.lose_leadership()
        self.assertEqual([i["release"] for i in self.h.runners.running("hello")], [3])
        status, _, _ = await self.h.call("DELETE", "apps/hello", token=self.h.alice_token)
        self.assertEqual(status, 200)
        self.assertEqual(self.h.runners.running("hello"), [])


    async def restart(self, body: dict[str, Any], app: str = "hello") -> dict[str, Any]:
        """POST .../restart as alice; wait for its rollout with the scheduler leading."""
        status, rel, _ = await self.h.call("POST", f"apps/{app}/restart",
                                           token=self.h.alice_token, body=body)
        self.assertEqual(status, 201, rel)
        self.h.scheduler.become_leader()
        await settle(ensureDeferred(self.h.deployer.wait(rel["deploy"])), timeout=20)
        for _ in range(3):  # the old instances are retired after the rollout's last pass
            await self.h.scheduler.reconcile()
        self.h.scheduler.lose_leadership()
        return rel

    async def test_restart_rolls_every_instance_start_first(self) -> None:
        """POST /apps/{app}/restart makes a release with the current one's image,
        processes and config ("Restart") and replaces every instance start-first: the
        new web instances start while the old ones still serve, then the old ones are
        drained; the restart's deploy succeeds.  A user who cannot see the app gets
        404; an app with nothing deployed, 409; an unknown type, 400."""
        await self.h.add_runner("r1")
        self.h.runners.manifest = {"processes": {"web": "w", "worker": "k"}}
        await self.h.call("POST", "apps", token=self.h.alice_token, body={"name": "hello"})
        status, body, _ = await self.h.call("POST", "apps/hello/restart",
                                            token=self.h.alice_token, body={})
        self.assertEqual((status, body["error"]["code"]), (409, "nothing_to_restart"))
        await self.h.call("PATCH", "apps/hello/config", token=self.h.alice_token,
                          body={"A": "1"})
        await self.deploy()
        await self.h.call("PATCH", "apps/hello/formation", token=self.h.alice_token,
                          body={"processes": {"web": {"quantity": 2}}})
        self.h.scheduler.become_leader()
        for _ in range(3):
            await self.h.scheduler.reconcile()
        self.h.scheduler.lose_leadership()
        before = {i["instance_id"] for i in self.h.runners.running("hello")}
        self.assertEqual(len(before), 3)
        status, body, _ = await self.h.call("POST", "apps/hello/restart",
                                            token=self.h.bob_token, body={})
        self.assertEqual((status, body["error"]["code"]), (404, "not_found"))
        status, body, _ = await self.h.call("POST", "apps/hello/restart",
                                            token=self.h.alice_token, body={"type": "clock"})
        self.assertEqual((status, body["error"]["code"]), (400, "unknown_process_type"))
        self.assertIn("it has: web, worker", body["error"]["message"])
        asked_before = len(self.h.runners.requests)
        rel = await self.restart({})
        self.assertEqual((rel["version"], rel["description"], rel["image"], rel["config_keys"]),
                         (3, "Restart", DIGEST, ["A"]))
        self.assertEqual(rel["processes"], {"web": "w", "worker": "k"})
        d = await self.h.store.get_deploy(rel["deploy"])
        self.assertEqual(d.status, "succeeded", d.log)
        running = self.h.runners.running("hello")
        self.assertEqual(sorted((i["process_type"], i["release"]) for i in running),
                         [("web", 3), ("web", 3), ("worker", 3)])
        self.assertFalse(before & {i["instance_id"] for i in running})
        # start-first: both new web instances were started before any old one drained
        order = [(t, b["instance_id"]) for _, t, b in self.h.runners.requests[asked_before:]
                 if t in ("runner.start", "runner.drain")]
        drains = [n for n, (t, _) in enumerate(order) if t == "runner.drain"]
        web_starts = [n for n, (t, iid) in enumerate(order)
                      if t == "runner.start" and "-web-" in iid]
        self.assertEqual(len(drains), 2)
        self.assertEqual(len(web_starts), 2)
        self.assertLess(max(web_starts), min(drains))
        _, rels, _ = await self.h.call("GET", "apps/hello/releases", token=self.h.alice_token)
        self.assertEqual([(r["version"], r["status"]) for r in rels][:1], [(3, "current")])

    async def test_restart_one_type_keeps_the_others(self) -> None:
        """{"type": "web"} replaces only the web instances: the worker instance keeps
        running, untouched, through two web restarts (its release kept by each), and
        a full restart then replaces it too."""
        await self.h.add_runner("r1")
        self.h.runners.manifest = {"processes": {"web": "w", "worker": "k"}}
        await self.h.call("POST", "apps", token=self.h.alice_token, body={"name": "hello"})
        await self.deploy()

        def ids(ptype: str) -> set[str]:
            return {i["instance_id"] for i in self.h.runners.running("hello")
                    if i["process_type"] == ptype}

        worker, web = ids("worker"), ids("web")
        self.assertEqual((len(worker), len(web)), (1, 1))
        for version in (2, 3):
            rel = await self.restart({"type": "web"})
            self.assertEqual((rel["version"], rel["description"]), (version, "Restart web"))
            d = await self.h.store.get_deploy(rel["deploy"])
            self.assertEqual(d.status, "succeeded", d.log)
            self.assertEqual(ids("worker"), worker)
            self.assertEqual(len(ids("web")), 1)
            self.assertFalse(ids("web") & web)
            web = ids("web")
            release = await self.h.store.get_release("hello", version)
            self.assertEqual(release.meta["keep"], {"worker": 1})
        rel = await self.restart({})
        self.assertEqual(len(ids("worker")), 1)
        self.assertFalse(ids("worker") & worker)
        self.assertEqual({i["release"] for i in self.h.runners.running("hello")}, {4})


    async def test_restart_follows_stop_first(self) -> None:
        """A restart copies the release's facts (its rollover among them): a stop-first
        worker is stopped, confirmed, before its replacement starts, and never two run."""
        await self.h.add_runner("r1")
        alice = await self.h.store.get_user_by_name("alice")
        await self.h.store.create_app("hello", alice.id)
        await self.h.store.create_release("hello", DIGEST, processes={"worker": "w"},
                                          meta={"rollover": {"worker": "stop-first"}})
        await self.h.store.set_formation("hello", "worker", 1)
        self.h.scheduler.become_leader()
        for _ in range(3):
            await self.h.scheduler.reconcile()
        self.h.scheduler.lose_leadership()
        [old] = self.h.runners.running("hello")
        asked_before = len(self.h.runners.requests)
        rel = await self.restart({"type": "worker"})
        release = await self.h.store.get_release("hello", rel["version"])
        self.assertEqual(release.meta["rollover"], {"worker": "stop-first"})
        self.assertEqual(release.meta["restart_of"], 1)
        order = [(t, b["instance_id"]) for _, t, b in self.h.runners.requests[asked_before:]
                 if t in ("runner.start", "runner.stop")]
        self.assertEqual([t for t, _ in order], ["runner.stop", "runner.start"])
        self.assertEqual(order[0][1], old["instance_id"])
        self.assertEqual([i["release"] for i in self.h.runners.running("hello")], [2])


class DeployLifecycleTests(TestCase):
    timeout = 30

    def setUp(self) -> Any:
        self.h = Harness()
        self.addCleanup(lambda: ensureDeferred(self.h.stop()))
        return ensureDeferred(self.h.start())

    async def passes(self, n: int = 3) -> None:
        for _ in range(n):
            await self.h.scheduler.reconcile()

    async def test_restart_decides_at_once_and_no_timer_reverts_it(self) -> None:
        """Deploys whose api process is gone are decided by the leader's next pass: a
        build is failed ("interrupted by a node restart"), a rollout is finished from
        what its instances report (healthy: succeeded; failed: failed, the previous
        release kept); a deploy of a live api process is left alone.  30 minutes of
        (fake) clock later, nothing has changed: no timer reverts a decision."""
        store, runners = self.h.store, self.h.runners
        await self.h.add_runner("r1")
        alice = await store.get_user_by_name("alice")
        before_restart = {"owner": {"node": "api1", "boot": "boot-0"}}
        for app in ("hello", "crashy"):
            await store.create_app(app, alice.id)
            await store.create_release(app, DIGEST, processes={"web": "w", "worker": "k"})
            await store.set_formation(app, "web", 1)
            await store.set_formation(app, "worker", 1)
        await store.create_release("crashy", DIGEST, processes={"web": "w", "worker": "k"})
        await self.passes(2)
        # interrupted mid-build, and mid-rollout (hello v2 fine, crashy v3 failing)
        build = await store.create_deploy("hello", "pending", meta=before_restart)
        build = await store.update_deploy(build.id, status="building")
        rollouts = {}
        for app in ("hello", "crashy"):
            rel = await store.create_release(app, DIGEST2, processes={"web": "w", "worker": "k"})
            d = await store.create_deploy(app, "deploying", meta=before_restart)
            rollouts[app] = await store.update_deploy(d.id, release=rel.version)
        runners.fail_health.add(3)
        gone = await store.create_deploy("crashy", "pending",
                                         meta={"owner": {"node": "api9", "boot": "x"}})
        alive = await store.create_deploy("crashy", "pending",
                                          meta={"owner": {"node": "api1", "boot": "boot-1"}})

        await self.passes(3)
        build = await store.get_deploy(build.id)
        self.assertEqual((build.status, build.reason),
                         ("failed", "interrupted by a node restart; deploy again"))
        self.assertEqual((await store.get_deploy(gone.id)).reason,
                         "interrupted by the loss of node api9; deploy again")
        self.assertEqual((await store.get_deploy(alive.id)).status, "pending")
        hello = await store.get_deploy(rollouts["hello"].id)
        self.assertEqual(hello.status, "succeeded", hello.log)
        self.assertIn("Deployed v2 (rollout finished after a node restart)", hello.log)
        crashy = await store.get_deploy(rollouts["crashy"].id)
        self.assertEqual((crashy.status, crashy.meta.get("kept")), ("failed", 2), crashy.log)
        self.assertIn("of v3 failed before becoming healthy", crashy.reason)
        await self.passes(2)

        async def picture() -> Any:
            deploys = {d.id: (d.status, d.reason) for app in ("hello", "crashy")
                       for d in await store.list_deploys(app) if d.id != alive.id}
            releases = {app: [(r["version"], r["status"], r["kept"]) for r in
                              await self.h.platform.describe_releases(
                                  await store.get_app(app))] for app in ("hello", "crashy")}
            running = sorted((i["app"], i["process_type"], i["release"])
                             for i in runners.running())
            return deploys, releases, running

        now = await picture()
        self.assertEqual(now[1], {"hello": [(2, "current", None), (1, "superseded", None)],
                                  "crashy": [(3, "failed", 2), (2, "current", None),
                                             (1, "superseded", None)]})
        self.assertEqual(now[2], [("crashy", "web", 2), ("crashy", "worker", 2),
                                  ("hello", "web", 2), ("hello", "worker", 2)])
        self.h.scheduler.clock = FakeNow(self.h.scheduler.clock.seconds() + 30 * 60)
        await self.passes(3)
        self.assertEqual(await picture(), now)


class FakeNow:
    """A clock that only tells a fixed time (the pass awaits the real reactor)."""

    def __init__(self, now: float) -> None:
        self.now = now

    def seconds(self) -> float:
        return self.now
