"""An app whose web instances sleep has an asleep route naming the runners to wake."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from epio.nexus.heartbeats import InstanceInfo
from epio.nexus.table import AppFacts, build_route

WEB = frozenset({"web"})
CONTROL = {"n1": "tcp://10.0.0.1:7000", "n2": "tcp://10.0.0.2:7000"}


def inst(iid: str, state: str, node: str = "n1", ptype: str = "web", release: int = 1,
         waking: bool = False, since: float = 10.0) -> InstanceInfo:
    return InstanceInfo(node=node, instance_id=iid, app="a", release=release,
                        process_type=ptype, host="10.0.0.1", port=9000, state=state,
                        since=since, waking=waking)


class AsleepRouteTests(SynchronousTestCase):
    facts = AppFacts("a", ("a.example.com",), releases={1: {}})

    def route(self, *instances: InstanceInfo) -> dict[str, object]:
        return build_route(self.facts, instances, WEB, None, CONTROL.get)

    def test_asleep_and_waking_instances_make_an_asleep_route(self) -> None:
        """Asleep web instances (and those waking: started by runner.wake, not yet
        healthy) make the route asleep, with their runners' control endpoints (sorted,
        once each) and the earliest since; a worker does not count."""
        r = self.route(inst("w1", "asleep", "n2", since=12.0),
                       inst("w2", "starting", "n1", waking=True, since=15.0),
                       inst("k1", "healthy", "n1", ptype="worker"))
        self.assertEqual(r["backends"], [])
        self.assertEqual(r["asleep"], {"since": 12.0, "wake": [CONTROL["n1"], CONTROL["n2"]],
                                       "instances": ["w1", "w2"]})

    def test_a_backend_means_awake(self) -> None:
        """With one healthy web instance the route has it as backend and is not asleep."""
        r = self.route(inst("w1", "asleep"), inst("w2", "healthy", "n2"))
        self.assertEqual(len(r["backends"]), 1)  # type: ignore[arg-type]
        self.assertNotIn("asleep", r)

    def test_not_asleep_without_a_sleeping_instance(self) -> None:
        """A starting (not waking) or crashed instance, one of a release that may not
        serve, or one on a runner with no control endpoint: no asleep route (503)."""
        self.assertNotIn("asleep", self.route(inst("w1", "starting")))
        self.assertNotIn("asleep", self.route(inst("w1", "crashed")))
        self.assertNotIn("asleep", self.route(inst("w1", "asleep", release=2)))
        self.assertNotIn("asleep", self.route(inst("w1", "asleep", "n3")))
