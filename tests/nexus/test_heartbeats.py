"""Heartbeat intake: sequence numbers, boot ids and expiry on a fake clock."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from epio.nexus import heartbeats as H
from epio.nexus.heartbeats import NodeTracker

from .helpers import heartbeat, instance


class TrackerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.changes: list[set[str]] = []
        self.tracker = NodeTracker(self.clock, 3.0, self.changes.append)

    def keys(self, app: str) -> set[tuple[str, str]]:
        return set(self.tracker.by_app.get(app, {}))

    def test_new_node_instances_indexed_by_app(self) -> None:
        """A first heartbeat makes the node known and its instances findable by app."""
        out = self.tracker.receive(heartbeat(instances=[instance("i1"), instance("i2", "other")]))
        self.assertEqual(out, H.NEW_NODE)
        self.assertEqual(self.keys("hello"), {("n1", "i1")})
        self.assertEqual(self.keys("other"), {("n1", "i2")})
        self.assertEqual(self.changes, [{"hello", "other"}])

    def test_duplicate_and_out_of_order_ignored_and_counted(self) -> None:
        """A repeated or older seq of the same boot changes nothing and is counted."""
        self.tracker.receive(heartbeat(seq=5, instances=[instance("i1")]))
        self.assertEqual(self.tracker.receive(heartbeat(seq=5, instances=[])), H.DUPLICATE)
        self.assertEqual(self.tracker.receive(heartbeat(seq=3, instances=[])), H.OUT_OF_ORDER)
        self.assertEqual(self.keys("hello"), {("n1", "i1")})
        self.assertEqual(self.tracker.counters[H.DUPLICATE], 1)
        self.assertEqual(self.tracker.counters[H.OUT_OF_ORDER], 1)
        self.assertEqual(len(self.changes), 1)

    def test_missed_heartbeats_counted(self) -> None:
        """A jump in seq counts the heartbeats that never arrived."""
        self.tracker.receive(heartbeat(seq=1, instances=[instance("i1")]))
        self.tracker.receive(heartbeat(seq=5, instances=[instance("i1")]))
        self.assertEqual(self.tracker.counters[H.MISSED], 3)
        self.assertEqual(self.tracker.nodes["n1"].seq, 5)

    def test_unchanged_heartbeat_reports_no_change(self) -> None:
        """A heartbeat identical in instances refreshes liveness without a change."""
        self.tracker.receive(heartbeat(seq=1, instances=[instance("i1")]))
        self.assertEqual(self.tracker.receive(heartbeat(seq=2, instances=[instance("i1")])),
                         H.ACCEPTED)
        self.assertEqual(len(self.changes), 1)

    def test_state_change_reported(self) -> None:
        """An instance going healthy -> draining is a change of its app."""
        self.tracker.receive(heartbeat(seq=1, instances=[instance("i1")]))
        self.tracker.receive(heartbeat(seq=2, instances=[instance("i1", state="draining")]))
        self.assertEqual(self.changes[-1], {"hello"})
        self.assertEqual(self.tracker.by_app["hello"][("n1", "i1")].state, "draining")

    def test_asleep_and_waking_are_changes(self) -> None:
        """healthy -> asleep -> starting with waking -> healthy: each a change of its app;
        the instance says asleep, then waking."""
        self.tracker.receive(heartbeat(seq=1, instances=[instance("i1")]))
        self.tracker.receive(heartbeat(seq=2, instances=[instance("i1", state="asleep")]))
        self.assertEqual(self.tracker.by_app["hello"][("n1", "i1")].state, "asleep")
        self.assertFalse(self.tracker.by_app["hello"][("n1", "i1")].waking)
        self.tracker.receive(heartbeat(seq=3, instances=[
            {**instance("i1", state="starting"), "waking": True}]))
        self.assertTrue(self.tracker.by_app["hello"][("n1", "i1")].waking)
        self.tracker.receive(heartbeat(seq=4, instances=[instance("i1")]))
        self.assertFalse(self.tracker.by_app["hello"][("n1", "i1")].waking)
        self.assertEqual(len(self.changes), 4)

    def test_new_boot_replaces_old_entries(self) -> None:
        """A new boot id drops every old instance of the node instead of merging."""
        self.tracker.receive(heartbeat(boot="a", seq=40, instances=[instance("i1"),
                                                                    instance("i2", "other")]))
        out = self.tracker.receive(heartbeat(boot="b", seq=1, instances=[instance("i9")]))
        self.assertEqual(out, H.REPLACED)
        self.assertEqual(self.keys("hello"), {("n1", "i9")})
        self.assertNotIn("other", self.tracker.by_app)
        self.assertEqual(self.changes[-1], {"hello", "other"})
        self.assertEqual(self.tracker.nodes["n1"].seq, 1)

    def test_late_heartbeat_of_old_boot_ignored(self) -> None:
        """After a restart, a delayed heartbeat of the previous boot is ignored."""
        self.tracker.receive(heartbeat(boot="a", seq=40, instances=[instance("i1")]))
        self.tracker.receive(heartbeat(boot="b", seq=1, instances=[instance("i9")]))
        out = self.tracker.receive(heartbeat(boot="a", seq=41, instances=[instance("i1")]))
        self.assertEqual(out, H.STALE_BOOT)
        self.assertEqual(self.keys("hello"), {("n1", "i9")})

    def test_silent_node_expires(self) -> None:
        """A node silent for node_timeout is gone and its instances leave."""
        self.tracker.receive(heartbeat(seq=1, instances=[instance("i1")]))
        self.clock.advance(2.9)
        self.assertIn("n1", self.tracker.nodes)
        self.clock.advance(0.2)
        self.assertNotIn("n1", self.tracker.nodes)
        self.assertEqual(self.keys("hello"), set())
        self.assertEqual(self.changes[-1], {"hello"})
        self.assertEqual(self.tracker.counters[H.EXPIRED], 1)

    def test_heartbeats_keep_node_alive(self) -> None:
        """Regular heartbeats push the expiry forward."""
        for seq in range(1, 11):
            self.tracker.receive(heartbeat(seq=seq, instances=[instance("i1")]))
            self.clock.advance(1.0)
        self.assertIn("n1", self.tracker.nodes)
        self.clock.advance(2.1)
        self.assertNotIn("n1", self.tracker.nodes)

    def test_slow_heartbeat_interval_stretches_timeout(self) -> None:
        """A node announcing a 2 s interval is given 3 intervals (6 s), not 3 s."""
        self.tracker.receive(heartbeat(seq=1, interval=2.0, instances=[instance("i1")]))
        self.clock.advance(5.0)
        self.assertIn("n1", self.tracker.nodes)
        self.clock.advance(1.1)
        self.assertNotIn("n1", self.tracker.nodes)

    def test_expired_node_can_come_back(self) -> None:
        """A node that was declared gone is taken back by its next heartbeat."""
        self.tracker.receive(heartbeat(seq=1, instances=[instance("i1")]))
        self.clock.advance(10)
        self.assertEqual(self.tracker.receive(heartbeat(seq=2, instances=[instance("i1")])),
                         H.NEW_NODE)
        self.assertEqual(self.keys("hello"), {("n1", "i1")})

    def test_invalid_heartbeat_counted(self) -> None:
        """A heartbeat without a usable node id or seq is rejected and counted."""
        self.assertEqual(self.tracker.receive({"node_id": "", "boot_id": "b", "seq": 1,
                                               "instances": []}), H.INVALID)
        self.assertEqual(self.tracker.receive({"node_id": "n", "boot_id": "b", "seq": "1",
                                               "instances": []}), H.INVALID)
        self.assertEqual(self.tracker.counters[H.INVALID], 2)
        self.assertEqual(self.tracker.nodes, {})

    def test_only_changed_entries_are_parsed_again(self) -> None:
        """A heartbeat in which one instance of many changed parses that one entry
        again (the others keep their parsed form: work per change, not per instance);
        a changed advertised host re-parses every entry, and a bad entry is counted
        every time it comes."""
        many = [instance(f"i{n}", f"app{n}", state="asleep", host="0.0.0.0")
                for n in range(50)]
        self.tracker.receive(heartbeat(seq=1, advertise_host="10.0.0.1", instances=many))
        before = dict(self.tracker.nodes["n1"].instances)
        changed = [*many[:7], instance("i7", "app7"), *many[8:], {"x": 1}]
        self.tracker.receive(heartbeat(seq=2, advertise_host="10.0.0.1", instances=changed))
        after = self.tracker.nodes["n1"].instances
        self.assertEqual(self.changes[-1], {"app7"})
        self.assertEqual(after["i7"].state, "healthy")
        self.assertTrue(all(after[i] is before[i] for i in before if i != "i7"))
        self.assertEqual(self.tracker.counters[H.BAD_INSTANCES], 1)
        self.tracker.receive(heartbeat(seq=3, advertise_host="10.0.0.1",
                                       instances=[*changed, {"y": 2}]))
        self.assertEqual(self.tracker.counters[H.BAD_INSTANCES], 3)
        self.assertEqual(after["i1"].host, "10.0.0.1")
        self.tracker.receive(heartbeat(seq=4, advertise_host="10.0.0.2", instances=changed))
        self.assertEqual(self.tracker.by_app["app1"][("n1", "i1")].host, "10.0.0.2")

    def test_bad_instance_skipped_others_kept(self) -> None:
        """One malformed instance entry is skipped and counted; the rest are used."""
        bad = instance("bad", state="exploded")
        self.tracker.receive(heartbeat(instances=[bad, instance("i1"), {"x": 1}]))
        self.assertEqual(self.keys("hello"), {("n1", "i1")})
        self.assertEqual(self.tracker.counters[H.BAD_INSTANCES], 2)

    def test_unspecified_host_uses_advertise_host(self) -> None:
        """An instance bound to 0.0.0.0 is reached at the node's advertised host."""
        self.tracker.receive(heartbeat(advertise_host="10.1.2.3",
                                       instances=[instance("i1", host="0.0.0.0")]))
        self.assertEqual(self.tracker.by_app["hello"][("n1", "i1")].host, "10.1.2.3")

    def test_stop_cancels_timers(self) -> None:
        """After stop() no expiry timer is left on the clock."""
        self.tracker.receive(heartbeat(instances=[instance("i1")]))
        self.tracker.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
