"""Route options are per release: the nexus publishes a backend only under the options
of its own release, read from the store -- never before (a first deploy whose heartbeat
beats the store read), never under another release's (a rollover that changes them).

The real :class:`~epio.nexus.core.Nexus` on a ``Clock`` takes heartbeats and the views
:func:`~epio.nexus.storeview.load_view` reads from a store the test edits; every delta
it publishes is checked, so a route that went out unprotected for one turn is caught.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from epio.nexus.core import Nexus
from epio.nexus.storeview import ReleaseOptions, load_view
from epio.store.records import App, Instance

from .helpers import AUTH, FlakyStore, heartbeat, instance

OTHER_AUTH = {"realm": "ops", "users": dict(AUTH["users"])}


class ReleaseOptionsRoutingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.store = FlakyStore(self.clock)
        self.store.apps = [App("shop", "u", 10001, False, 0.0)]
        self.store.instances = []
        self.options = ReleaseOptions(self.clock, 1.0)
        self.published: list[dict[str, Any]] = []
        self.hints = 0
        self.nexus = Nexus(self.clock, "nx1", self.publish, warmup=0.0,
                           on_store_hint=self.hint)
        self.nexus.start()
        self.addCleanup(self.nexus.stop)
        self.seq = 0

    def publish(self, type: str, body: dict[str, Any]) -> None:
        if type == "nexus.delta":
            self.published.extend(c["route"] for c in body["changes"] if c["op"] == "set")

    def hint(self) -> None:
        self.hints += 1

    def refresh(self) -> None:
        """One store read installed, as the service does."""
        view = self.successResultOf(Deferred.fromCoroutine(load_view(
            self.store, "example.com", self.clock.seconds(), self.options, self.nexus.view)))
        self.nexus.set_view(view)
        self.clock.advance(0)

    def beat(self, *insts: dict[str, Any]) -> None:
        self.seq += 1
        self.nexus.heartbeat(heartbeat(seq=self.seq, instances=list(insts)))
        self.clock.advance(0)

    def record(self, iid: str, release: int, port: int, state: str = "healthy") -> None:
        self.store.instances = [i for i in self.store.instances if i.id != iid]
        self.store.instances.append(Instance(iid, "shop", release, "web", 1, "n1",
                                             "127.0.0.1", port, state, 0.0))

    def route(self) -> dict[str, Any]:
        return self.nexus.book.routes["shop"]

    def served(self) -> list[tuple[str, int]]:
        return [(b["instance_id"], b["release"]) for b in self.route()["backends"]]

    def assert_every_route_carried(self, expected: dict[int, dict[str, Any]]) -> None:
        """Every route published with a backend of release R carried R's options."""
        self.assertTrue(self.published)
        for route in self.published:
            for b in route["backends"]:
                self.assertEqual(route["options"], expected[b["release"]], route)

    def test_first_deploy_heartbeat_before_the_store_read(self) -> None:
        """A new app's first healthy instance, heard before the store view lists its
        release, is not routed (no route without [basic_auth] for a moment); a store
        read is asked at once, and the read that lists the release publishes the
        backend with the release's basic_auth and https_redirect."""
        self.refresh()
        self.assertEqual(self.served(), [])
        # the deploy: release 1 made, its instance started and healthy; the runner's
        # heartbeat reaches the nexus before its next store read
        self.store.meta[("shop", 1)] = {"basic_auth": AUTH, "https_redirect": True}
        self.record("w1", 1, 8001)
        self.beat(instance("w1", "shop", release=1, port=8001))
        self.assertEqual(self.served(), [])
        self.assertEqual(self.hints, 1)
        self.assertEqual(self.nexus.where_app("shop")["instances"][0]["routable"], False)
        self.refresh()
        self.assertEqual(self.served(), [("w1", 1)])
        self.assertEqual(self.route()["options"]["basic_auth"]["realm"], "staff")
        self.assertIs(self.route()["options"]["https_redirect"], True)
        self.assertEqual(self.nexus.where_app("shop")["instances"][0]["routable"], True)
        self.assert_every_route_carried({1: {"basic_auth": AUTH, "https_redirect": True}})

    def test_first_deploy_before_any_instance_record(self) -> None:
        """Before the scheduler records any instance, the store view knows the app's
        newest release: an instance of it is routed with its options; an instance of
        a release the view has not read (newer or older) is not."""
        self.store.meta[("shop", 1)] = {"basic_auth": AUTH}
        self.refresh()
        self.beat(instance("w1", "shop", release=1, port=8001),
                  instance("w2", "shop", release=2, port=8002))
        self.assertEqual(self.served(), [("w1", 1)])
        self.assertEqual(self.route()["options"], {"basic_auth": AUTH})
        self.store.meta[("shop", 2)] = {"basic_auth": OTHER_AUTH}
        self.store.meta[("shop", 3)] = {}
        self.refresh()  # newest is 3 now: neither 1 nor 2 is known for this read
        self.assert_every_route_carried({1: {"basic_auth": AUTH}})

    def test_rollover_new_release_options_not_read(self) -> None:
        """During a rollover the new release's instances are not routed while its
        options are unread (a failed read), even once the store lists the release:
        the old release's options are never applied to them."""
        self.store.meta[("shop", 1)] = {}
        self.store.meta[("shop", 2)] = {"basic_auth": AUTH}
        self.record("w1", 1, 8001)
        self.refresh()
        old, new = instance("w1", "shop", release=1, port=8001), instance(
            "w2", "shop", release=2, port=8002)
        self.beat(old)
        self.assertEqual(self.served(), [("w1", 1)])
        self.store.failing = {("shop", 2)}
        self.record("w2", 2, 8002)
        self.beat(old, new)  # before the store view lists release 2
        self.assertEqual(self.served(), [("w1", 1)])
        self.refresh()  # lists release 2, cannot read it
        self.assertEqual(self.served(), [("w1", 1)])
        self.assertEqual(self.route()["options"], {})
        self.store.failing = set()
        self.refresh()
        self.assertEqual(self.served(), [("w2", 2)])
        self.assertEqual(self.route()["options"], {"basic_auth": AUTH})
        self.assert_every_route_carried({1: {}, 2: {"basic_auth": AUTH}})

    def test_rollover_that_removes_basic_auth(self) -> None:
        """A release that drops [basic_auth] does not take the old release's instances
        with it: from the moment the new one is routed, only it serves; before, only
        the old one, protected."""
        self.store.meta[("shop", 1)] = {"basic_auth": AUTH}
        self.store.meta[("shop", 2)] = {"gzip": True}
        self.record("w1", 1, 8001)
        self.refresh()
        old, new = instance("w1", "shop", release=1, port=8001), instance(
            "w2", "shop", release=2, port=8002, state="starting")
        self.beat(old)
        self.record("w2", 2, 8002, "starting")
        self.refresh()
        self.beat(old, new)
        self.assertEqual(self.served(), [("w1", 1)])
        self.assertEqual(self.route()["options"], {"basic_auth": AUTH})
        self.beat(old, instance("w2", "shop", release=2, port=8002))
        self.assertEqual(self.served(), [("w2", 2)])
        self.assertEqual(self.route()["options"], {"gzip": True})
        # the new one crashes: the old one serves again, under its own options
        self.beat(old, instance("w2", "shop", release=2, port=8002, state="crashed"))
        self.assertEqual(self.served(), [("w1", 1)])
        self.assert_every_route_carried({1: {"basic_auth": AUTH}, 2: {"gzip": True}})

    def test_rollover_with_the_same_options_serves_both(self) -> None:
        """Releases with the same options share the route during a rollover (the
        old release keeps serving until it is drained), under those options."""
        self.store.meta[("shop", 1)] = {"basic_auth": AUTH}
        self.store.meta[("shop", 2)] = {"basic_auth": AUTH}
        self.record("w1", 1, 8001)
        self.record("w2", 2, 8002)
        self.refresh()
        self.beat(instance("w1", "shop", release=1, port=8001),
                  instance("w2", "shop", release=2, port=8002))
        self.assertEqual(self.served(), [("w1", 1), ("w2", 2)])
        self.record("w1", 1, 8001, "draining")
        self.refresh()
        self.assertEqual(self.served(), [("w2", 2)])
        self.assert_every_route_carried({1: {"basic_auth": AUTH}, 2: {"basic_auth": AUTH}})
