"""The nexus logic on a fake clock: table contents, deltas, warm-up, snapshots, queries."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from epio.nexus.core import Nexus, NotFound, NotReady

from .helpers import heartbeat, instance, view


class NexusTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.published: list[tuple[str, dict[str, Any]]] = []
        self.hints = 0
        self.nexus = Nexus(self.clock, "nx1", self.publish, node_timeout=3.0, warmup=1.5,
                           on_store_hint=self.hint)
        self.nexus.start()

    def publish(self, type: str, body: dict[str, Any]) -> None:
        self.published.append((type, body))

    def hint(self) -> None:
        self.hints += 1

    def deltas(self) -> list[dict[str, Any]]:
        return [b for t, b in self.published if t == "nexus.delta"]

    def ready(self, *apps: str, **kw: Any) -> None:
        self.nexus.set_view(view(*apps, **kw))
        self.clock.advance(1.5)
        self.assertTrue(self.nexus.ready)

    def backends(self, app: str) -> list[tuple[str, int]]:
        return [(b["host"], b["port"]) for b in self.nexus.book.routes[app]["backends"]]

    def test_warming_up_publishes_nothing_and_refuses_snapshots(self) -> None:
        """Before the store is read and warm-up is over, nothing leaves the nexus."""
        self.nexus.heartbeat(heartbeat(instances=[instance("i1")]))
        self.clock.advance(0)
        self.assertRaises(NotReady, self.nexus.snapshot)
        self.nexus.set_view(view("hello"))
        self.clock.advance(1.0)
        self.assertRaises(NotReady, self.nexus.snapshot)
        self.assertEqual(self.published, [])
        self.clock.advance(0.5)
        snap = self.nexus.snapshot()
        self.assertEqual(snap["nexus_id"], "nx1")
        self.assertEqual([r["app"] for r in snap["routes"]], ["hello"])
        self.assertEqual(snap["routes"][0]["backends"][0]["port"], 8001)
        # becoming ready announces itself at once with a keepalive
        self.assertEqual(self.published[0][0], "nexus.keepalive")
        self.assertEqual(self.published[0][1]["version"], snap["version"])

    def test_no_store_no_ready(self) -> None:
        """A nexus that could not read the store stays warming up."""
        self.clock.advance(10)
        self.assertFalse(self.nexus.ready)
        self.assertRaises(NotReady, self.nexus.snapshot)

    def test_route_holds_only_healthy_web_instances_of_live_releases(self) -> None:
        """Only healthy web instances of the store's live releases become backends."""
        self.ready("hello", live={"hello": {2, 3}})
        self.nexus.heartbeat(heartbeat(instances=[
            instance("ok2", release=2, port=1),
            instance("ok3", release=3, port=2),
            instance("old", release=1, port=3),
            instance("drain", release=3, port=4, state="draining"),
            instance("boot", release=3, port=5, state="starting"),
            instance("crash", release=3, port=6, state="crashed"),
            instance("worker", release=3, port=7, process_type="worker"),
            instance("noport", release=3, port=None),
        ]))
        self.clock.advance(0)
        self.assertEqual(self.backends("hello"), [("127.0.0.1", 1), ("127.0.0.1", 2)])

    def test_every_store_app_has_route_even_without_backends(self) -> None:
        """An app with no running instance still has its hostnames (router answers 503)."""
        self.ready("hello", "quiet", extra_hosts={"quiet": ["www.quiet.org", "*.quiet.net"]})
        route = self.nexus.book.routes["quiet"]
        self.assertEqual(route["hostnames"], ["quiet.localhost", "www.quiet.org", "*.quiet.net"])
        self.assertEqual(route["backends"], [])

    def test_unknown_app_not_routed_and_hints_store(self) -> None:
        """Instances of an app the store does not know get no route; a store read is asked."""
        self.ready("hello")
        self.nexus.heartbeat(heartbeat(instances=[instance("x", "ghost")]))
        self.clock.advance(0)
        self.assertNotIn("ghost", self.nexus.book.routes)
        self.assertEqual(self.hints, 1)
        self.assertEqual(self.nexus.counters["unknown_app"], 1)

    def test_newer_release_than_store_hints_store(self) -> None:
        """A healthy instance of a release newer than the live ones asks for a store read."""
        self.ready("hello", live={"hello": {1}})
        self.nexus.heartbeat(heartbeat(instances=[instance("new", release=2)]))
        self.clock.advance(0)
        self.assertEqual(self.hints, 1)
        self.assertEqual(self.backends("hello"), [])
        self.nexus.set_view(view("hello", live={"hello": {1, 2}}))
        self.clock.advance(0)
        self.assertEqual(self.backends("hello"), [("127.0.0.1", 8001)])

    def test_changes_of_one_turn_coalesce_into_one_delta(self) -> None:
        """Many heartbeats in one reactor turn produce one delta, sent in that same turn."""
        self.ready("a", "b")
        self.published.clear()
        self.nexus.heartbeat(heartbeat("n1", instances=[instance("a1", "a", port=1)]))
        self.nexus.heartbeat(heartbeat("n2", instances=[instance("b1", "b", port=2)]))
        self.assertEqual(self.deltas(), [])
        self.clock.advance(0)
        deltas = self.deltas()
        self.assertEqual(len(deltas), 1)
        d = deltas[0]
        self.assertEqual(d["prev_version"] + 1, d["version"])
        self.assertEqual(sorted(c["app"] for c in d["changes"]), ["a", "b"])
        self.assertTrue(all(c["op"] == "set" for c in d["changes"]))

    def test_versions_chain(self) -> None:
        """Each delta's prev_version is the previous delta's version."""
        self.ready("a")
        self.published.clear()
        for seq, port in enumerate([1, 2, 3], start=1):
            self.nexus.heartbeat(heartbeat(seq=seq, instances=[instance("a1", "a", port=port)]))
            self.clock.advance(0)
        ds = self.deltas()
        self.assertEqual(len(ds), 3)
        for a, b in zip(ds, ds[1:], strict=False):
            self.assertEqual(b["prev_version"], a["version"])

    def test_no_delta_when_route_unchanged(self) -> None:
        """A change that does not move a route (a worker restarting) publishes nothing."""
        self.ready("a")
        self.published.clear()
        self.nexus.heartbeat(heartbeat(seq=1, instances=[instance("w", "a", process_type="worker")]))
        self.nexus.heartbeat(heartbeat(seq=2, instances=[
            instance("w", "a", process_type="worker", state="crashed")]))
        self.clock.advance(0)
        self.assertEqual(self.deltas(), [])

    def test_expiry_removes_backends_with_delta(self) -> None:
        """A node that stops heartbeating loses its backends in a delta after node_timeout."""
        self.ready("a")
        self.nexus.heartbeat(heartbeat("n1", instances=[instance("a1", "a", port=1)]))
        self.nexus.heartbeat(heartbeat("n2", instances=[instance("a2", "a", port=2)]))
        self.clock.advance(0)
        self.published.clear()
        for _ in range(4):
            self.nexus.heartbeat(heartbeat("n2", seq=self.nexus.tracker.nodes["n2"].seq + 1,
                                           instances=[instance("a2", "a", port=2)]))
            self.clock.advance(1.0)
        self.assertEqual(self.backends("a"), [("127.0.0.1", 2)])
        self.assertEqual(len(self.deltas()), 1)

    def test_boot_replacement_moves_backends(self) -> None:
        """A restarted node's new instances replace the old ones in one delta."""
        self.ready("a")
        self.nexus.heartbeat(heartbeat(boot="x", seq=9, instances=[instance("old", "a", port=1)]))
        self.clock.advance(0)
        self.published.clear()
        self.nexus.heartbeat(heartbeat(boot="y", seq=1, instances=[instance("new", "a", port=2)]))
        self.clock.advance(0)
        self.assertEqual(self.backends("a"), [("127.0.0.1", 2)])
        (d,) = self.deltas()
        self.assertEqual(d["changes"][0]["route"]["backends"][0]["instance_id"], "new")

    def test_store_removal_sends_remove(self) -> None:
        """An app deleted from the store is removed from the routers' tables."""
        self.ready("a", "b")
        self.published.clear()
        self.nexus.set_view(view("a"))
        self.clock.advance(0)
        (d,) = self.deltas()
        self.assertEqual(d["changes"], [{"op": "remove", "app": "b"}])

    def test_maintenance_and_hostnames_from_store(self) -> None:
        """Maintenance mode and a new custom domain reach the routers as a set change."""
        self.ready("a")
        self.published.clear()
        self.nexus.set_view(view("a", maintenance={"a"}, extra_hosts={"a": ["a.example.com"]}))
        self.clock.advance(0)
        (d,) = self.deltas()
        route = d["changes"][0]["route"]
        self.assertTrue(route["maintenance"])
        self.assertEqual(route["hostnames"], ["a.localhost", "a.example.com"])

    def test_keepalive_only_when_ready(self) -> None:
        """keepalive() publishes the current version once ready, nothing before."""
        self.nexus.keepalive()
        self.assertEqual(self.published, [])
        self.ready("a")
        self.nexus.keepalive()
        self.assertEqual(self.published[-1],
                         ("nexus.keepalive", {"nexus_id": "nx1", "version": self.nexus.book.version,
                                              "routes": 1, "nodes": 0}))

    def test_snapshot_includes_pending_changes(self) -> None:
        """A snapshot taken in the same turn as a heartbeat already contains it."""
        self.ready("a")
        self.nexus.heartbeat(heartbeat(instances=[instance("a1", "a", port=9)]))
        snap = self.nexus.snapshot()
        self.assertEqual(snap["routes"][0]["backends"][0]["port"], 9)
        self.clock.advance(0)
        self.assertEqual(self.nexus.snapshot()["version"], snap["version"])

    def test_delta_interval_batches_churn_but_not_a_quiet_change(self) -> None:
        """With ``delta_interval`` a lone change still leaves in its own turn; changes
        that follow within the interval wait for it and leave together in one delta."""
        self.nexus.delta_interval = 0.05
        self.ready("a", "b")
        self.published.clear()
        self.nexus.heartbeat(heartbeat("n1", seq=1, instances=[instance("a1", "a", port=1)]))
        self.clock.advance(0)
        self.assertEqual(len(self.deltas()), 1)  # quiet before: at once
        self.clock.advance(0.01)
        self.nexus.heartbeat(heartbeat("n1", seq=2, instances=[instance("a1", "a", port=2)]))
        self.clock.advance(0.02)
        self.nexus.heartbeat(heartbeat("n2", seq=1, instances=[instance("b1", "b", port=3)]))
        self.clock.advance(0.019)
        self.assertEqual(len(self.deltas()), 1)  # 0.049 after the first: still waiting
        self.clock.advance(0.002)
        ds = self.deltas()
        self.assertEqual(len(ds), 2)
        self.assertEqual(ds[1]["prev_version"], ds[0]["version"])
        self.assertEqual(sorted(c["app"] for c in ds[1]["changes"]), ["a", "b"])
        self.assertEqual(self.backends("a"), [("127.0.0.1", 2)])
        # a quiet interval later, the next change goes out in its own turn again
        self.clock.advance(0.2)
        self.nexus.heartbeat(heartbeat("n1", seq=3, instances=[instance("a1", "a", port=4)]))
        self.clock.advance(0)
        self.assertEqual(len(self.deltas()), 3)

    def test_delta_interval_survives_a_clock_set_back(self) -> None:
        """A wall clock set back after a delta delays the next one by at most the interval."""
        self.nexus.delta_interval = 0.05
        self.ready("a")
        self.published.clear()
        self.nexus.heartbeat(heartbeat(seq=1, instances=[instance("a1", "a", port=1)]))
        self.clock.advance(0)
        self.assertEqual(len(self.deltas()), 1)
        self.clock.rightNow -= 3600.0  # NTP steps the clock back an hour
        self.nexus.heartbeat(heartbeat(seq=2, instances=[instance("a1", "a", port=2)]))
        self.clock.advance(0.051)
        self.assertEqual(len(self.deltas()), 2)

    def test_snapshot_inside_delta_interval_publishes_the_waiting_delta(self) -> None:
        """A snapshot never lags: the changes waiting for the interval are published
        (as a delta, so routers following deltas see the same version) and included."""
        self.nexus.delta_interval = 0.05
        self.ready("a")
        self.published.clear()
        self.nexus.heartbeat(heartbeat(seq=1, instances=[instance("a1", "a", port=1)]))
        self.clock.advance(0)
        self.nexus.heartbeat(heartbeat(seq=2, instances=[instance("a1", "a", port=2)]))
        self.clock.advance(0.01)
        self.assertEqual(len(self.deltas()), 1)
        snap = self.nexus.snapshot()
        self.assertEqual(snap["routes"][0]["backends"][0]["port"], 2)
        ds = self.deltas()
        self.assertEqual(len(ds), 2)
        self.assertEqual(ds[1]["version"], snap["version"])
        self.clock.advance(1)
        self.assertEqual(len(self.deltas()), 2)

    def test_where_app_and_node(self) -> None:
        """Queries say where an app runs and how old the answer is."""
        self.ready("a")
        self.nexus.heartbeat(heartbeat("n1", instances=[instance("a1", "a", port=1)]))
        self.clock.advance(0.4)
        where = self.nexus.where_app("a")
        self.assertEqual([i["instance_id"] for i in where["instances"]], ["a1"])
        self.assertTrue(where["instances"][0]["routable"])
        self.assertAlmostEqual(where["age"], 0.4)
        self.assertTrue(where["known"])
        node = self.nexus.where_node("n1")
        self.assertEqual(node["boot_id"], "boot-a")
        self.assertAlmostEqual(node["age"], 0.4)
        self.assertRaises(NotFound, self.nexus.where_app, "nope")
        self.assertRaises(NotFound, self.nexus.where_node, "nope")

    def test_stop_leaves_no_timers(self) -> None:
        """stop() cancels warm-up, flush and expiry timers."""
        self.nexus.heartbeat(heartbeat(instances=[instance("a1", "a")]))
        self.nexus.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
