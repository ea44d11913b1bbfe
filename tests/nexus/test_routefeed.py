"""The router-side feed on a fake clock: snapshots, deltas, gaps, two-nexus merge, staleness.

Real :class:`epio.nexus.core.Nexus` objects stand in for the nexus processes;
what they publish is handed to the feed (or dropped, to make gaps), and the
feed's snapshot requests are answered by their ``snapshot()``.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from epio.bus.errors import RemoteError
from epio.nexus.core import Nexus, NotReady
from epio.routefeed import (
    BadRoute,
    NexusLink,
    NexusRouteSource,
    RouteFeed,
    TableSink,
    merge_routes,
    route_from_wire,
)
from epio.routing import IRouteSource, LazyRoute, RouteTable

from .helpers import heartbeat, instance, view


class FakeNexus:
    """A Nexus core whose publications go to the feed unless ``dropping``."""

    def __init__(self, clock: Clock, nexus_id: str, apps: tuple[str, ...]) -> None:
        self.clock = clock
        self.feed: RouteFeed | None = None
        self.link: NexusLink | None = None
        self.dropping = False
        self.down = False
        self.snapshot_requests = 0
        self.hold: list[Deferred] | None = None  # when a list: snapshot replies wait here
        self.core = Nexus(clock, nexus_id, self.publish, warmup=0.5)
        self.core.start()
        self.core.set_view(view(*apps))
        self.seq: dict[str, int] = {}

    def publish(self, type: str, body: dict[str, Any]) -> None:
        if self.dropping or self.down or self.feed is None or self.link is None:
            return
        self.feed.on_message(self.link, type, body)

    def snapshot(self) -> Deferred:
        self.snapshot_requests += 1
        if self.down:
            return fail(RemoteError("timeout", "no reply"))
        try:
            body = self.core.snapshot()
        except NotReady as e:
            return fail(RemoteError("warming_up", str(e)))
        if self.hold is not None:
            d: Deferred = Deferred()
            self.hold.append(d)
            d.addCallback(lambda _: body)
            return d
        return succeed(body)

    def beat(self, node: str, *insts: dict[str, Any], boot: str = "b") -> None:
        self.seq[node] = self.seq.get(node, 0) + 1
        self.core.heartbeat(heartbeat(node, boot=boot, seq=self.seq[node], instances=list(insts)))


class FeedTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.nx = [FakeNexus(self.clock, "A", ("hello", "other")),
                   FakeNexus(self.clock, "B", ("hello", "other"))]
        links = [NexusLink(f"nexus[{i}]", f"tcp://r{i}:1", f"tcp://p{i}:1") for i in range(2)]
        for n, link in zip(self.nx, links, strict=True):
            n.link = link
        self.feed = RouteFeed(self.clock, links,
                              lambda link: self.nx[links.index(link)].snapshot(),
                              feed_timeout=2.0, snapshot_retry=0.5)
        for n in self.nx:
            n.feed = self.feed
        self.table = RouteTable("localhost")

    def start(self) -> None:
        self.clock.advance(0.5)  # nexuses warm
        self.feed.start(TableSink(self.table, self.feed.counters))

    def beat_all(self, node: str, *insts: dict[str, Any], boot: str = "b") -> None:
        for n in self.nx:
            if not n.down:
                n.beat(node, *insts, boot=boot)

    def ports(self, host: str = "hello.localhost") -> list[int]:
        route = self.table.lookup(host)
        return sorted(b.port for b in route.live) if route is not None else []

    def tick(self, seconds: float = 0.0, keepalive: bool = True) -> None:
        """Advance time in 0.25 s steps, keepalives from every nexus that is up."""
        steps = max(1, int(seconds / 0.25 + 0.5))
        for _ in range(steps):
            self.clock.advance(seconds / steps)
            if keepalive:
                for n in self.nx:
                    if not n.down:
                        n.core.keepalive()

    def test_source_implements_interface(self) -> None:
        """The bus-backed source provides IRouteSource for the lb role."""
        bus = type("B", (), {"reactor": self.clock})()
        verifyObject(IRouteSource, NexusRouteSource(bus, [{"router": "tcp://a:1",
                                                           "publish": "tcp://a:2"}]))

    def test_snapshot_on_start_then_deltas(self) -> None:
        """The feed takes a snapshot of each nexus at start and follows their deltas."""
        self.beat_all("n1", instance("i1", port=1))
        self.start()
        self.assertEqual(self.ports(), [1])
        self.assertEqual([n.snapshot_requests for n in self.nx], [1, 1])
        self.beat_all("n1", instance("i1", port=1), instance("i2", port=2))
        self.clock.advance(0)
        self.assertEqual(self.ports(), [1, 2])
        self.assertEqual([n.snapshot_requests for n in self.nx], [1, 1])
        self.assertEqual(self.feed.status()["state"], "live")

    def test_two_nexus_merge_is_union(self) -> None:
        """Backends known to either nexus are routed (a heartbeat lost on the way to one)."""
        self.start()
        self.nx[0].beat("n1", instance("i1", port=1))
        self.nx[1].beat("n2", instance("i2", port=2))
        self.clock.advance(0)
        self.assertEqual(self.ports(), [1, 2])

    def test_losing_one_nexus_changes_nothing(self) -> None:
        """With one nexus dead the table is the same and keeps following the other."""
        self.start()
        self.beat_all("n1", instance("i1", port=1))
        self.clock.advance(0)
        self.nx[0].down = True
        self.tick(2.5)  # past feed_timeout, within node_timeout
        self.assertFalse(self.feed.links[0].alive)
        self.assertFalse(self.feed.stale)
        self.assertEqual(self.ports(), [1])
        self.beat_all("n1", instance("i1", port=1), instance("i3", port=3))
        self.clock.advance(0)
        self.assertEqual(self.ports(), [1, 3])

    def test_dead_nexus_leaves_merge_so_removals_apply(self) -> None:
        """A silent nexus's stale backends do not linger in the union."""
        self.start()
        self.beat_all("n1", instance("i1", port=1), instance("i2", port=2))
        self.clock.advance(0)
        self.nx[0].down = True
        self.tick(2.5)
        self.beat_all("n1", instance("i1", port=1))  # i2 went away; only B hears it
        self.clock.advance(0)
        self.assertEqual(self.ports(), [1])

    def test_a_nexus_joins_and_leaves_the_list(self) -> None:
        """A nexus added to the list (it joined the cluster) enters the merge with its
        first snapshot; one removed leaves it at once, and its backends with it; what a
        removed nexus sends or answers afterwards is ignored."""
        a, b = self.nx
        assert a.link is not None and b.link is not None
        feed = RouteFeed(self.clock, [a.link], lambda link: (a if link is a.link
                                                              else b).snapshot(),
                         feed_timeout=2.0, snapshot_retry=0.5)
        a.feed = b.feed = feed
        self.clock.advance(0.5)
        feed.start(TableSink(self.table, feed.counters))
        a.beat("n1", instance("i1", port=1))
        b.beat("n2", instance("i2", port=2))  # not followed yet: ignored
        self.clock.advance(0)
        self.assertEqual(self.ports(), [1])
        feed.add_link(b.link)
        self.assertEqual(self.ports(), [1, 2])
        self.assertEqual(b.snapshot_requests, 1)
        feed.remove_link(a.link)
        self.assertEqual(self.ports(), [2])
        self.assertEqual(len(feed.links), 1)
        a.beat("n1", instance("i1", port=1), instance("i3", port=3))
        self.clock.advance(0)
        self.assertEqual(self.ports(), [2])
        a.link = NexusLink("nexus[again]", "tcp://r0:1", "tcp://p0:1")
        a.hold = []
        feed.add_link(a.link)
        feed.remove_link(a.link)  # left before it answered
        a.hold[0].callback(None)
        self.tick(1.0)
        self.assertEqual(self.ports(), [2])
        self.assertEqual([link.name for link in feed.links], ["nexus[1]"])

    def test_gap_triggers_snapshot(self) -> None:
        """A lost delta is noticed at the next delta and repaired by a snapshot."""
        self.start()
        self.nx[1].down = True  # one nexus only, to see the gap alone
        self.tick(2.5)
        self.nx[0].dropping = True
        self.nx[0].beat("n1", instance("i1", port=1))
        self.clock.advance(0)
        self.assertEqual(self.ports(), [])
        self.nx[0].dropping = False
        before = self.nx[0].snapshot_requests
        self.nx[0].beat("n1", instance("i1", port=1), instance("i2", port=2))
        self.clock.advance(0)
        self.assertEqual(self.nx[0].snapshot_requests, before + 1)
        self.assertEqual(self.feed.links[0].counters["gaps"], 1)
        self.assertEqual(self.ports(), [1, 2])

    def test_lost_last_delta_found_by_keepalive(self) -> None:
        """When the last delta is lost, the next keepalive's version reveals the gap."""
        self.start()
        self.nx[0].dropping = True
        self.nx[0].beat("n1", instance("i1", port=1))
        self.clock.advance(0)
        self.nx[0].dropping = False
        self.nx[1].down = True
        self.nx[0].core.keepalive()
        self.assertEqual(self.feed.links[0].counters["gaps"], 1)
        self.assertEqual(self.ports(), [1])

    def test_deltas_during_snapshot_are_buffered(self) -> None:
        """Deltas that arrive while a snapshot is on its way are applied after it."""
        self.nx[0].hold = []
        self.nx[1].down = True
        self.start()
        self.nx[0].beat("n1", instance("i1", port=1))
        self.clock.advance(0)  # delta v1 arrives while the snapshot (v0) is pending
        self.nx[0].hold.pop().callback(None)
        self.assertEqual(self.ports(), [1])
        self.assertEqual(self.feed.links[0].version, self.nx[0].core.book.version)

    def test_nexus_restart_new_id_takes_snapshot(self) -> None:
        """A nexus that restarted (new nexus_id, version from 0) is re-snapshotted."""
        self.start()
        self.nx[0].beat("n1", instance("i1", port=1))
        self.clock.advance(0)
        old = self.nx[0]
        new = FakeNexus(self.clock, "A2", ("hello", "other"))
        new.feed, new.link = self.feed, old.link
        old.down = True
        self.nx[0] = new
        self.clock.advance(0.5)  # A2 warms up
        new.beat("n1", instance("i1", port=1), instance("i5", port=5))
        self.clock.advance(0)
        new.core.keepalive()
        self.assertEqual(self.feed.links[0].nexus_id, "A2")
        self.assertEqual(self.feed.links[0].counters["restarts"], 1)
        self.assertEqual(self.ports(), [1, 5])

    def test_all_nexuses_silent_keeps_last_table_and_says_stale(self) -> None:
        """With every nexus gone the last table stays, marked stale with a since time."""
        self.start()
        self.beat_all("n1", instance("i1", port=1))
        self.clock.advance(0)
        self.tick(1.0)
        last_heard = self.clock.seconds()
        for n in self.nx:
            n.down = True
        self.tick(5.0)
        status = self.feed.status()
        self.assertTrue(status["stale"])
        self.assertEqual(status["state"], "stale")
        self.assertEqual(status["since"], last_heard)
        self.assertEqual(self.ports(), [1])
        self.assertEqual(self.flushLoggedErrors(), [])  # nothing logged as an error

    def test_stale_is_logged_and_repeated(self) -> None:
        """Going stale is logged at once and recalled while it lasts."""
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.start()
        for n in self.nx:
            n.down = True
        self.tick(3.0, keepalive=False)
        texts = [formatEvent(e) for e in events]
        self.assertEqual(sum("every nexus is silent" in t for t in texts), 1)
        self.tick(40.0, keepalive=False)
        texts = [formatEvent(e) for e in events]
        self.assertGreaterEqual(sum("every nexus is still silent" in t for t in texts), 1)
        self.assertLessEqual(sum("every nexus is still silent" in t for t in texts), 2)

    def test_restart_after_all_gone_gives_fresh_table(self) -> None:
        """The first nexus back after an outage replaces the stale table with its fresh one."""
        self.start()
        self.beat_all("n1", instance("i1", port=1))
        self.clock.advance(0)
        for n in self.nx:
            n.down = True
        self.tick(5.0)
        fresh = FakeNexus(self.clock, "A2", ("hello", "other"))
        fresh.feed, fresh.link = self.feed, self.nx[0].link
        self.nx[0] = fresh
        fresh.beat("n9", instance("i9", port=9))  # the old backend is gone, a new one came
        self.tick(0.5)  # warm-up over: keepalive -> snapshot
        self.assertFalse(self.feed.stale)
        self.assertEqual(self.ports(), [9])

    def test_warming_nexus_is_retried(self) -> None:
        """A nexus that refuses snapshots while warming up is asked again until it answers."""
        self.nx[1].down = True
        self.feed.start(TableSink(self.table, self.feed.counters))  # before warm-up is over
        self.nx[0].beat("n1", instance("i1", port=1))
        self.assertEqual(self.ports(), [])
        self.tick(1.0)
        self.assertEqual(self.ports(), [1])
        self.assertGreaterEqual(self.nx[0].snapshot_requests, 2)

    def test_stop_cancels_timers(self) -> None:
        """stop() leaves no timer of the feed on the clock."""
        self.start()
        for n in self.nx:
            n.core.stop()
        self.feed.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class MergeTests(SynchronousTestCase):
    def test_merge_unions_and_maintenance_wins(self) -> None:
        """Merging two routes unions hostnames and backends; maintenance if any says so."""
        a = {"app": "x", "hostnames": ["x.localhost"], "maintenance": False, "options": {},
             "backends": [{"instance_id": "1", "host": "h", "port": 1, "state": "healthy"}]}
        b = {"app": "x", "hostnames": ["x.localhost", "x.org"], "maintenance": True,
             "options": {"idle_timeout": 5},
             "backends": [{"instance_id": "1", "host": "h", "port": 1, "state": "healthy"},
                          {"instance_id": "2", "host": "h", "port": 2, "state": "healthy"}]}
        m = merge_routes([a, b])
        self.assertEqual(m["hostnames"], ["x.localhost", "x.org"])
        self.assertEqual([b["port"] for b in m["backends"]], [1, 2])
        self.assertTrue(m["maintenance"])
        self.assertEqual(m["options"], {"idle_timeout": 5})

    def test_route_from_wire(self) -> None:
        """A wire route becomes a routing.Route with its options; bad ones are refused."""
        r = route_from_wire({"app": "x", "hostnames": ["X.Example.com"], "maintenance": False,
                             "options": {"idle_timeout": 5, "bogus": 1},
                             "backends": [{"instance_id": "i", "host": "::1", "port": 80,
                                           "state": "healthy", "release": 3}]})
        self.assertEqual(r.hostnames, ("x.example.com",))
        self.assertEqual(r.idle_timeout, 5)
        self.assertEqual(r.live[0].release, "3")
        from epio.routefeed import BadRoute

        self.assertRaises(BadRoute, route_from_wire, {"app": "x", "backends": [{"host": "h"}]})


def wire(app: str, *ports: int, hostnames: Any = None) -> dict[str, Any]:
    return {"app": app, "hostnames": [f"{app}.example.com"] if hostnames is None else hostnames,
            "maintenance": False, "options": {}, "backends": [
                {"instance_id": f"{app}-{p}", "host": "127.0.0.1", "port": p, "release": 1,
                 "state": "healthy"} for p in ports]}


class LazySinkTests(SynchronousTestCase):
    """TableSink(lazy=True): the route feed process's routers build a Route on first use."""

    def setUp(self) -> None:
        self.table = RouteTable("localhost")
        self.sink = TableSink(self.table, lazy=True)

    def stored(self, app: str) -> Any:
        return self.table._index.apps.get(app)

    def test_built_on_first_use_keeping_backends(self) -> None:
        self.sink.apply([wire("hello", 8001, 8002)], [])
        self.assertIsInstance(self.stored("hello"), LazyRoute)
        first = self.table.lookup("hello.example.com")
        assert first is not None
        self.assertEqual(sorted(b.port for b in first.backends), [8001, 8002])
        self.assertIs(self.stored("hello"), first)
        # two versions arrive before the next request: only the last is ever built,
        # and the backend that stayed is the same object (its pool, its state)
        self.sink.apply([wire("hello", 8001, 8003)], [])
        self.sink.apply([wire("hello", 8001, 8004)], [])
        second = self.table.lookup("hello.example.com")
        assert second is not None
        self.assertEqual(sorted(b.port for b in second.backends), [8001, 8004])
        self.assertIs(second.backends[0], first.backends[0])

    def test_unhashable_backend_value_is_a_bad_route(self) -> None:
        """A backend value that is a list is a bad route, not an exception in a lookup."""
        self.sink.apply([wire("hello", 8001)], [])
        self.table.lookup("hello.example.com")
        route = wire("hello", 8002)
        route["backends"][0]["instance_id"] = ["x"]
        self.sink.apply([route], [])
        self.assertIsNone(self.table.lookup("hello.example.com"))
        self.assertEqual(self.sink.counters["bad_routes"], 1)
        with self.assertRaises(BadRoute):
            route_from_wire(route)

    def test_bad_routes(self) -> None:
        """Bad names are refused at once (the last route stays); bad backends show when
        the route is built, and the app leaves the table."""
        self.sink.apply([wire("hello", 8001)], [])
        self.sink.apply([wire("hello", 8002, hostnames="nope")], [])
        self.assertEqual(self.sink.counters["bad_routes"], 1)
        self.assertEqual([b.port for b in self.table.lookup("hello.example.com").backends],  # type: ignore[union-attr]
                         [8001])
        self.sink.apply([wire("hello", 0)], [])
        self.assertEqual(self.sink.counters["bad_routes"], 1)  # not built yet
        self.assertIsNone(self.table.lookup("hello.example.com"))
        self.assertEqual(self.sink.counters["bad_routes"], 2)
        self.assertIsNone(self.table.get("hello"))

    def test_a_whole_table_lazily(self) -> None:
        self.sink.apply([wire("a", 8001), wire("b", 8002)], [])
        a = self.table.lookup("a.example.com")
        assert a is not None
        build = self.sink.building()
        build.add(wire("a", 8001, 8005))
        build.add(wire("c", 8003))
        build.commit()
        self.assertIsNone(self.table.get("b"))
        self.assertIsInstance(self.stored("c"), LazyRoute)
        new_a = self.table.lookup("a.example.com")
        assert new_a is not None
        self.assertIn(a.backends[0], new_a.backends)  # kept across the new table
        self.assertEqual([b.port for b in self.table.get("c").backends], [8003])  # type: ignore[union-attr]
