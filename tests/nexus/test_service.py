"""The nexus role and the router feed wired to an in-memory bus on a fake clock.

A runner's heartbeat goes through a real (in-memory, signed) bus to two
NexusServices reading a fake store, their deltas and snapshots go to a
NexusRouteSource filling a real RouteTable: the whole path, no sockets.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from epio.bus.errors import RemoteError
from epio.bus.testing import MemoryBus, MemoryNetwork
from epio.config import validate
from epio.config.settings import NexusSettings
from epio.nexus.service import NexusService
from epio.routefeed import NexusRouteSource
from epio.routing import RouteTable
from epio.store.errors import NotFound
from epio.store.records import App, Instance, Release

from .helpers import AUTH, heartbeat, instance


class FakeStore:
    """The reads the nexus makes, from lists the test edits."""

    def __init__(self) -> None:
        self.apps: list[App] = [App("hello", "u", 10001, False, 0.0)]
        self.hostnames: dict[str, str] = {"www.hello.org": "hello"}
        self.instances: list[Instance] = []
        self.fail = False
        self.reads = 0
        # the releases the runners run (a runner runs only releases the store holds)
        self.release_meta: dict[tuple[str, int], dict[str, Any]] = {("hello", 1): {}}
        self.release_reads = 0

    async def list_apps(self, for_user: str | None = None) -> list[App]:
        self.reads += 1
        if self.fail:
            raise ConnectionError("store down")
        return list(self.apps)

    async def all_hostnames(self) -> dict[str, str]:
        return dict(self.hostnames)

    async def list_instances(self, app: str | None = None,
                             node: str | None = None) -> list[Instance]:
        return list(self.instances)

    async def get_release(self, app: str, version: int) -> Release:
        self.release_reads += 1
        meta = self.release_meta.get((app, version))
        if meta is None:
            raise NotFound(f"app {app!r} has no release v{version}")
        return Release(app, version, None, {}, {"web": "run"}, "", 0.0, None, meta)

    async def latest_release(self, app: str) -> Release | None:
        versions = [v for (a, v) in self.release_meta if a == app]
        return await self.get_release(app, max(versions)) if versions else None


def settings(i: int) -> NexusSettings:
    return validate({
        "nexus": {"heartbeat_bind": f"tcp://127.0.0.1:{7711 + 10 * i}",
                  "router_bind": f"tcp://127.0.0.1:{7712 + 10 * i}",
                  "publish_bind": f"tcp://127.0.0.1:{7713 + 10 * i}"},
    }).settings.nexus


class ServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.net = MemoryNetwork()
        self.store = FakeStore()
        self.nexuses = [self.make_nexus(i) for i in range(2)]
        self.runner = MemoryBus(self.clock, "runner-1", network=self.net)
        self.pub = self.runner.publisher(
            connect=[n.heartbeats.binds[0] for n in self.nexuses])
        self.pub.startService()
        self.seq = 0
        router_bus = MemoryBus(self.clock, "router-1", network=self.net)
        self.source = NexusRouteSource(router_bus, [
            {"router": n.router.binds[0], "publish": n.publisher.binds[0]} for n in self.nexuses
        ], feed_timeout=2.0, snapshot_timeout=1.0, snapshot_retry=0.5)
        self.table = RouteTable("localhost")
        self.asker = MemoryBus(self.clock, "api-1", network=self.net).dealer(
            [self.nexuses[0].router.binds[0]])
        self.asker.startService()

    def tearDown(self) -> None:
        self.source.stop()
        for n in self.nexuses:
            if n.running:
                n.stopService()
        self.pub.stopService()
        self.asker.stopService()

    def make_nexus(self, i: int) -> NexusService:
        bus = MemoryBus(self.clock, f"nexus-{i}", network=self.net)
        svc = NexusService(self.clock, bus, settings(i), lambda: succeed(self.store),
                           domain="localhost", nexus_id=f"nx{i}")
        svc.startService()
        return svc

    def beat(self, *insts: dict[str, Any]) -> None:
        self.seq += 1
        self.pub.publish("runner.heartbeat",
                         heartbeat("runner-1", seq=self.seq, instances=list(insts)), topic=b"hb")

    def run_for(self, seconds: float, *insts: dict[str, Any]) -> None:
        """Heartbeat every second (as a runner does) while time passes in small steps."""
        end = self.clock.seconds() + seconds
        while self.clock.seconds() < end - 1e-9:
            if insts and self.clock.seconds() % 1.0 < 0.05:
                self.beat(*insts)
            self.clock.advance(0.05)

    def ask(self, type: str, body: dict[str, Any]) -> Any:
        d = Deferred.fromCoroutine(self.asker.request(type, body, timeout=1.0))
        out: list[Any] = []
        d.addBoth(out.append)
        for _ in range(3):
            self.clock.advance(0)
        self.assertEqual(len(out), 1, "no reply")
        return out[0]

    def ports(self, host: str = "hello.localhost") -> list[int]:
        route = self.table.lookup(host)
        return sorted(b.port for b in route.live) if route is not None else []

    def test_heartbeat_to_router_table(self) -> None:
        """A heartbeat's healthy instance reaches the router table under every hostname."""
        self.source.start(self.table)
        web = instance("i1", port=8001)
        self.run_for(2.0, web)
        self.assertEqual(self.ports(), [8001])
        self.assertEqual(self.ports("www.hello.org"), [8001])
        self.assertEqual(self.source.status()["state"], "live")
        self.assertEqual(self.source.status()["alive"], 2)
        # a change propagates within the same clock instant (no timer on the way)
        self.beat(web, instance("i2", port=8002))
        for _ in range(6):
            self.clock.advance(0)
        self.assertEqual(self.ports(), [8001, 8002])

    def test_snapshot_refused_while_warming_up(self) -> None:
        """A just-started nexus answers snapshot requests with warming_up."""
        f = self.ask("nexus.snapshot_request", {})
        self.assertIsInstance(f, Failure)
        f.trap(RemoteError)
        self.assertEqual(f.value.code, "warming_up")
        self.run_for(2.0)
        env = self.ask("nexus.snapshot_request", {})
        self.assertEqual(env.body["nexus_id"], "nx0")

    def test_where_queries(self) -> None:
        """nexus.where answers for an app and a node; errors have stable codes."""
        self.run_for(2.0, instance("i1", port=8001))
        env = self.ask("nexus.where", {"app": "hello"})
        self.assertEqual(env.type, "nexus.location")
        self.assertEqual(env.body["instances"][0]["port"], 8001)
        self.assertLess(env.body["age"], 1.1)
        env = self.ask("nexus.where", {"node": "runner-1"})
        self.assertEqual(env.body["instances"][0]["instance_id"], "i1")
        self.assertEqual(self.ask("nexus.where", {"app": "nope"}).value.code, "not_found")
        self.assertEqual(self.ask("nexus.where", {}).value.code, "invalid")
        self.assertEqual(self.ask("nexus.where", {"app": "a", "node": "b"}).value.code, "invalid")

    def test_store_hint_triggers_early_refresh(self) -> None:
        """An app created after the last store read is routed before the next periodic read."""
        self.source.start(self.table)
        self.run_for(2.2)
        self.store.apps.append(App("late", "u", 10002, False, 0.0))
        self.store.release_meta[("late", 1)] = {}
        reads = self.store.reads
        self.beat(instance("l1", "late", port=9001))
        self.clock.advance(0)
        self.clock.advance(0)
        self.clock.advance(0.25)  # store_refresh_min
        self.clock.advance(0)
        self.assertGreater(self.store.reads, reads)
        self.assertEqual(self.ports("late.localhost"), [9001])

    def test_first_deploy_routed_early_and_protected(self) -> None:
        """A first deploy whose healthy heartbeat arrives before the store read that
        lists its release is routed at the early read (store_refresh_min after the
        last read, not the next periodic one), with its basic_auth: the router never
        holds a backend of it without the password."""
        self.source.start(self.table)
        self.store.apps.append(App("shop", "u", 10002, False, 0.0))
        self.run_for(2.2)  # periodic reads at 0 and 2.0; the next one at 4.0
        self.store.release_meta[("shop", 1)] = {"basic_auth": AUTH}
        self.store.instances.append(
            Instance("s1", "shop", 1, "web", 1, "runner-1", "127.0.0.1", 9001, "pending", 0.0))
        seen: list[tuple[float, list[int], Any]] = []
        start = self.clock.seconds()
        shop = instance("s1", "shop", release=1, port=9001)
        while self.clock.seconds() - start < 1.0:
            if not seen:
                self.beat(shop)
            self.clock.advance(0.01)
            route = self.table.lookup("shop.localhost")
            assert route is not None
            seen.append((self.clock.seconds() - start, self.ports("shop.localhost"),
                         route.basic_auth))
        routed = [(t, auth) for t, ports, auth in seen if ports]
        self.assertTrue(routed, "never routed")
        self.assertLessEqual(routed[0][0], 0.25 + 0.011)  # store_refresh_min
        self.assertTrue(all(auth is not None for _, auth in routed))

    def test_live_releases_from_store(self) -> None:
        """During a rollover the store's active instances say which releases serve."""
        self.source.start(self.table)
        self.store.instances = [
            Instance("i1", "hello", 1, "web", 1, "runner-1", "127.0.0.1", 8001, "healthy", 0.0),
            Instance("i2", "hello", 2, "web", 1, "runner-1", "127.0.0.1", 8002, "starting", 0.0),
        ]
        old, new = instance("i1", port=8001, release=1), instance("i2", port=8002, release=2)
        self.run_for(2.5, old, new)
        self.assertEqual(self.ports(), [8001, 8002])
        # the old instance is marked draining in the store: release 1 no longer serves
        self.store.instances[0] = Instance("i1", "hello", 1, "web", 1, "runner-1", "127.0.0.1",
                                           8001, "draining", 0.0)
        self.run_for(2.5, old, new)
        self.assertEqual(self.ports(), [8002])

    def test_route_options_from_release_meta(self) -> None:
        """The newest live release's [http] limits reach the router as route overrides."""
        self.source.start(self.table)
        self.store.instances = [
            Instance("i1", "hello", 3, "web", 1, "runner-1", "127.0.0.1", 8001, "healthy", 0.0)]
        self.store.release_meta[("hello", 3)] = {"timeout": 12, "idle_timeout": 40.5,
                                                 "max_body_size": 1024, "env": {}}
        self.run_for(2.5, instance("i1", port=8001, release=3))
        route = self.table.lookup("hello.localhost")
        assert route is not None
        self.assertEqual((route.first_byte_timeout, route.idle_timeout, route.max_body_size),
                         (12, 40.5, 1024))
        reads = self.store.release_reads
        self.run_for(4.5, instance("i1", port=8001, release=3))
        self.assertEqual(self.store.release_reads, reads)  # immutable: read once per nexus

    def test_store_failure_keeps_last_view(self) -> None:
        """A store that stops answering leaves the table as it was (logged, counted)."""
        self.source.start(self.table)
        self.run_for(2.5, instance("i1", port=8001))
        self.store.fail = True
        self.run_for(4.5, instance("i1", port=8001))
        self.assertEqual(self.ports(), [8001])
        self.assertGreater(self.nexuses[0].nexus.counters["store_errors"], 0)

    def test_one_nexus_stopped_table_unchanged(self) -> None:
        """Stopping one nexus service changes nothing in the router's table."""
        self.source.start(self.table)
        web = instance("i1", port=8001)
        self.run_for(2.0, web)
        self.nexuses[0].stopService()
        self.run_for(3.0, web)
        self.assertEqual(self.ports(), [8001])
        status = self.source.status()
        self.assertFalse(status["stale"])
        self.assertEqual(status["alive"], 1)

    def test_stop_leaves_no_timers(self) -> None:
        """Stopping the services and the feed leaves nothing scheduled on the clock."""
        self.source.start(self.table)
        self.run_for(2.0, instance("i1", port=8001))
        self.source.stop()
        for n in self.nexuses:
            n.stopService()
        self.pub.stopService()
        self.asker.stopService()
        self.clock.advance(0)
        self.assertEqual([c for c in self.clock.getDelayedCalls() if c.active()], [])


class FailingStoreTests(SynchronousTestCase):
    def test_unreadable_store_never_ready(self) -> None:
        """A nexus whose store never answers stays warming up instead of serving an empty table."""
        clock = Clock()
        bus = MemoryBus(clock, "nexus", network=MemoryNetwork())
        svc = NexusService(clock, bus, settings(0), lambda: fail(ConnectionError("no store")),
                           domain="localhost")
        svc.startService()
        clock.advance(5)
        self.assertFalse(svc.nexus.ready)
        self.assertGreaterEqual(svc.nexus.counters["store_errors"], 2)
        svc.stopService()
