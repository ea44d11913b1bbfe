"""[cron] across the cluster: two api processes' cron runners on one PostgreSQL store.

Real parts: the PostgreSQL store (two connections pools = two nodes), its advisory
lock (``epio.cron``) through LeaderService, the api's RunSessions, the runner's
SessionManager (on a fake process reactor) that audits runs in the store.  Fake:
the cron clock (task.Clock), so ten minutes pass in a second.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, reactor, task
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from epio.api.cron import CronRunner, CronService, CronSettings, describe
from epio.api.run import RunApiSettings, RunSessions
from epio.pipeline import MemoryLogSink
from epio.runner.sessions import RunSettings, SessionManager
from epio.runner.supervisor import Settings
from epio.store import open_store
from epio.store.cron import list_cron
from epio.store.runs import list_runs
from tests.run.test_api_run import RoutedControl, StoreService
from tests.run.test_sessions import DIGEST, FakeLauncher, ProcessClock
from tests.store.pg import pg_url_for_test

APP = "clock"
TICK = 5.0
ENDPOINT = "tcp://r1:7731"


class Node:
    """One api process's cron machinery over its own store connection."""

    def __init__(self, store: Any, control: Any, clock: task.Clock, sink: MemoryLogSink) -> None:
        self.store = store
        sessions = RunSessions(store, control, reactor,
                               RunApiSettings(runner_dead_after=1e12))
        self.runner = CronRunner(store, sessions, clock,
                                 CronSettings(tick=TICK, start_deadline=120.0), log_sink=sink)
        self.service = CronService(self.runner, store, clock, retry_interval=1.0)


class DyingSessions:
    """The api's RunSessions in a process that dies right after the runner started the
    run: ``start`` starts it for real, then never returns (no record_run follows)."""

    def __init__(self, real: RunSessions) -> None:
        self.real = real
        self.started: list[Any] = []

    async def start(self, *args: Any, **kw: Any) -> Any:
        self.started.append((await self.real.start(*args, **kw))[0])
        await defer.Deferred()  # the process is gone

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


class CronClusterTests(TestCase):
    timeout = 120

    async def setUp(self) -> None:  # type: ignore[override]
        url = pg_url_for_test(self)
        self.stores = [await open_store(url, reactor), await open_store(url, reactor)]
        for s in self.stores:
            self.addCleanup(s.close)
        store = self.stores[0]
        user = await store.create_user("alice")
        await store.create_app(APP, user.id)
        await store.upsert_node("r1", ["runner"], ENDPOINT, "boot")
        await store.create_release(APP, DIGEST, processes={"web": "serve"}, meta={"cron": [
            {"name": "tick", "schedule": "* * * * *", "command": "python tick.py"}]})
        # the cron clock starts one second into the first minute after the release
        self.clock = task.Clock()
        self.clock.advance((int(reactor.seconds()) // 60 + 1) * 60 + 1)
        self.procs = ProcessClock()
        self.manager = SessionManager(self.procs, FakeLauncher(), MemoryLogSink(),
                                      RunSettings(max_sessions_per_app=50),
                                      Settings(uid_min=1000, uid_max=65000), node_id="r1",
                                      store_service=StoreService(store))
        control = RoutedControl(self.manager, ENDPOINT)
        self.sink = MemoryLogSink()
        self.nodes = [Node(s, control, self.clock, self.sink) for s in self.stores]
        self.addCleanup(self.stop_all)

    async def stop_all(self) -> None:
        for n in self.nodes:
            if n.service.running:
                await n.service.stopService()
        await self.settle()

    async def settle(self) -> None:
        """Wait (real time: the store is real) until no leader step or pass is running."""
        quiet = 0
        for _ in range(2000):
            busy = any(n.runner._busy or n.service.leader._busy for n in self.nodes)
            quiet = 0 if busy else quiet + 1
            if quiet >= 5:
                return
            await deferLater(reactor, 0.005, lambda: None)
        raise AssertionError("the cron runners did not settle")

    async def minute(self) -> None:
        """Let one minute of cron time pass, tick by tick; each run then ends (exit 0)."""
        for _ in range(int(60 / TICK)):
            self.clock.advance(TICK)
            await self.settle()
        self.end_runs()

    def end_runs(self, code: int = 0) -> None:
        for p in self.procs.spawned:
            if not getattr(p, "ended", False):
                p.ended = True
                p.end(code)

    async def cron_runs(self) -> list[Any]:
        await self.settle()
        for _ in range(200):  # the runner's audit of an ended run is written async
            runs = [r for r in await list_runs(self.stores[0], APP, limit=None)
                    if r.kind == "cron"]
            if all(r.state not in ("starting", "running") for r in runs):
                return runs
            await deferLater(reactor, 0.01, lambda: None)
        return runs

    def leaders(self) -> list[int]:
        return [i for i, n in enumerate(self.nodes) if n.runner.leader]

    async def last_slot(self) -> float:
        return (await list_cron(self.stores[0], APP))["tick"].last_slot

    async def test_every_minute_runs_once_across_two_nodes(self) -> None:
        """'* * * * *' with two api nodes: one leader, one run per minute (ten minutes,
        ten-plus-one runs, one per slot); when the leader stops the other takes over
        without a double or a lost minute; two passes racing over one slot run it
        once; after five minutes with no leader, one run (not a burst of five) and a
        line in the app's log saying the missed runs are not replayed."""
        for n in self.nodes:
            n.service.startService()
        for _ in range(3):
            self.clock.advance(1.0)
            await self.settle()
        self.assertEqual(len(self.leaders()), 1, "exactly one node leads")
        first = self.clock.seconds() - self.clock.seconds() % 60
        self.end_runs()
        self.assertEqual(len(await self.cron_runs()), 1)
        self.assertEqual(await self.last_slot(), first)

        slots = [first]
        for i in range(10):
            if i == 4:  # the leader's node stops: the other one takes over
                old = self.leaders()[0]
                await self.nodes[old].service.stopService()
            await self.minute()
            slots.append(await self.last_slot())
            self.assertEqual(len(await self.cron_runs()), i + 2, f"minute {i + 1}")
        self.assertEqual(slots, [first + 60 * k for k in range(11)])
        self.assertEqual(len(self.leaders()), 1)
        self.assertNotEqual(self.leaders()[0], old)

        # no leader for a while (both nodes stop); then two passes race over one slot,
        # as an old leader finishing its pass while a new one starts: it runs once
        await self.nodes[self.leaders()[0]].service.stopService()
        await self.settle()
        self.assertEqual(self.leaders(), [])
        self.clock.advance(60)
        for n in self.nodes:
            n.runner.leader = True
        started = await defer.gatherResults([
            defer.ensureDeferred(n.runner.run_pass()) for n in self.nodes])
        self.assertEqual(sorted(started), [0, 1])
        for n in self.nodes:
            n.runner.leader = False
        self.end_runs()
        self.assertEqual(len(await self.cron_runs()), 12)

        # five minutes without any leader, then a node comes back
        for _ in range(5):
            await self.minute()
        self.assertEqual(len(await self.cron_runs()), 12)
        self.nodes[0].service.startService()
        for _ in range(3):
            self.clock.advance(1.0)
            await self.settle()
        self.end_runs()
        self.assertEqual(len(await self.cron_runs()), 13)
        platform = self.sink.texts(APP, "platform")
        self.assertEqual(len([t for t in platform if "were missed" in t]), 1, platform)
        self.assertIn("they are not replayed", platform[-1])

    async def test_failed_run_overlap_and_missed_slot(self) -> None:
        """A run that exits non-zero shows as failed (exit status) in the entry's
        status; a run still going at the next slot makes that slot 'skipped', not a
        second run; a slot nobody started within start_deadline is 'missed'."""
        node = self.nodes[0]
        node.runner.leader = True
        self.assertEqual(await node.runner.run_pass(), 1)
        self.end_runs(code=3)
        await self.cron_runs()
        [entry] = await describe(self.stores[0], APP, self.clock.seconds())
        self.assertEqual((entry["status"], entry["last_run"]["exit_status"]), ("failed", 3))
        self.assertEqual(entry["next_slot"], self.clock.seconds() - 1 + 60)

        self.clock.advance(60)
        self.assertEqual(await node.runner.run_pass(), 1)  # runs, and keeps running
        self.clock.advance(60)
        self.assertEqual(await node.runner.run_pass(), 0)
        [entry] = await describe(self.stores[0], APP, self.clock.seconds())
        self.assertEqual(entry["status"], "skipped")
        self.assertIn("still running", entry["reason"])
        self.assertIn("is still running", self.sink.texts(APP, "platform")[-1])
        self.clock.advance(60)  # and again while it still runs
        self.assertEqual(await node.runner.run_pass(), 0)
        self.end_runs()

        # 45 s into the next minute with a 30 s deadline: that slot is missed, not run
        node.runner.settings = CronSettings(tick=TICK, start_deadline=30.0)
        self.clock.advance(-self.clock.seconds() % 60 + 45)
        self.assertEqual(await node.runner.run_pass(), 0)
        [entry] = await describe(self.stores[0], APP, self.clock.seconds())
        self.assertEqual(entry["status"], "missed")
        self.assertIn("not started within cron.start_deadline (30s)", entry["reason"])
        self.assertIn("was missed", self.sink.texts(APP, "platform")[-1])
        self.assertEqual(len(await self.cron_runs()), 2)

    async def test_no_overlap_after_a_crash_between_claim_and_record(self) -> None:
        """An api process that dies after the runner started its run but before it
        recorded 'started' leaves the run findable (its session id is stored with the
        claim): the next slot, on another api process, is 'skipped' while that run is
        still running, not a second, overlapping run; once it ended the next slot
        runs."""
        dying = DyingSessions(self.nodes[0].runner.sessions)
        first = CronRunner(self.stores[0], dying, self.clock,
                           CronSettings(tick=TICK, start_deadline=120.0), log_sink=self.sink)
        first.leader = True
        defer.ensureDeferred(first.run_pass())  # never finishes: its process died
        for _ in range(500):
            if dying.started:
                break
            await deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(len(self.procs.spawned), 1)
        state = (await list_cron(self.stores[0], APP))["tick"]
        self.assertEqual((state.outcome, state.session_id), ("starting", dying.started[0].id))

        other = self.nodes[1].runner
        other.leader = True
        self.clock.advance(60)
        self.assertEqual(await other.run_pass(), 0)
        self.assertEqual(len(self.procs.spawned), 1, "no second, overlapping run")
        [entry] = await describe(self.stores[0], APP, self.clock.seconds())
        self.assertEqual(entry["status"], "skipped")
        self.assertIn("run.1 was still running", entry["reason"])

        self.end_runs()
        await self.cron_runs()
        self.clock.advance(60)
        self.assertEqual(await other.run_pass(), 1)
        self.end_runs()
        self.assertEqual(len(await self.cron_runs()), 2)


class CronApiTests(TestCase):
    """GET /apps/{app}/cron over the real Klein app (StubTreq) and a SQLite store; every
    response is checked against the OpenAPI document."""

    async def setUp(self) -> None:  # type: ignore[override]
        from tests.api.support import Harness

        self.h = Harness()
        await self.h.start()
        self.addCleanup(lambda: defer.ensureDeferred(self.h.stop()))

    async def test_lists_entries_of_the_current_release_for_its_owner_only(self) -> None:
        """The owner sees each entry (schedule, command, status 'never' before a run,
        the next slot); after a claimed and failed start, 'failed' with the reason;
        another user gets the same 404 as for any app of someone else."""
        from epio.store.cron import claim_slot, record_run

        status, _, _ = await self.h.call("POST", "apps", token=self.h.alice_token,
                                         body={"name": "clock"})
        self.assertEqual(status, 201)
        status, body, _ = await self.h.call("GET", "apps/clock/cron", token=self.h.alice_token)
        self.assertEqual((status, body), (200, []))  # no release yet
        await self.h.store.create_release(APP, DIGEST, processes={"web": "serve"}, meta={
            "cron": [{"name": "nightly", "schedule": "0 3 * * *", "command": "python n.py"}]})
        status, body, _ = await self.h.call("GET", "apps/clock/cron", token=self.h.alice_token)
        self.assertEqual(status, 200)
        [entry] = body
        self.assertEqual((entry["name"], entry["schedule"], entry["command"], entry["status"]),
                         ("nightly", "0 3 * * *", "python n.py", "never"))
        self.assertEqual(entry["next_slot"] % 86400, 3 * 3600)
        await claim_slot(self.h.store, APP, "nightly", 10800.0)
        await record_run(self.h.store, APP, "nightly", 10800.0, outcome="failed",
                         reason="no runner is registered")
        _, [entry], _ = await self.h.call("GET", "apps/clock/cron", token=self.h.alice_token)
        self.assertEqual((entry["status"], entry["reason"], entry["last_slot"]),
                         ("failed", "no runner is registered", 10800.0))
        status, body, _ = await self.h.call("GET", "apps/clock/cron", token=self.h.bob_token)
        self.assertEqual(status, 404)
