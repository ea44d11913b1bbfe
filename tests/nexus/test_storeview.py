"""The nexus's store reads: against a real (SQLite) store (hostnames, live releases,
options) and on a fake one (options that fail closed)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from epio.nexus.heartbeats import InstanceInfo
from epio.nexus.storeview import ReleaseOptions, load_view
from epio.nexus.table import StoreView, build_route
from epio.store import Instance, open_store
from epio.store.records import App

from .helpers import AUTH, FlakyStore


class LoadViewTests(TestCase):
    async def test_view_from_real_store(self) -> None:
        """Apps, custom and wildcard domains, maintenance, live releases and options are read."""
        tmp = tempfile.TemporaryDirectory(prefix="epio-nexus-store-")
        self.addCleanup(tmp.cleanup)
        store = await open_store(f"sqlite:///{Path(tmp.name) / 'store.db'}", reactor)
        self.addCleanup(store.close)
        user = await store.create_user("owner")
        for name in ("hello", "quiet", "shop"):
            await store.create_app(name, user.id)
        await store.add_domain("hello", "www.hello.org")
        await store.add_domain("shop", "*.shop.example")
        await store.set_maintenance("quiet", True)
        await store.create_release("hello", meta={"timeout": 12, "max_body_size": 4096})
        await store.create_release("hello", meta={"idle_timeout": 30})
        await store.create_release("quiet", meta={"basic_auth": AUTH})
        await store.create_release("quiet", meta={"http": {"gzip": True}})
        for iid, rel, state in [("a", 1, "draining"), ("b", 2, "healthy"), ("c", 2, "pending")]:
            await store.upsert_instance(Instance(iid, "hello", rel, "web", 1, "n1", "127.0.0.1",
                                                 8000, state, 0.0))
        options = ReleaseOptions(reactor, 1.0)
        view = await load_view(store, "Example.COM.", reactor.seconds(), options)
        self.assertEqual(set(view.apps), {"hello", "quiet", "shop"})
        hello = view.apps["hello"]
        self.assertEqual(hello.hostnames, ("hello.example.com", "www.hello.org"))
        self.assertEqual(hello.live_releases, frozenset({2}))
        self.assertEqual(dict(hello.releases), {2: {"idle_timeout": 30}})
        self.assertEqual(view.apps["shop"].hostnames, ("shop.example.com", "*.shop.example"))
        self.assertIsNone(view.apps["shop"].live_releases)
        self.assertEqual(dict(view.apps["shop"].releases), {})  # no release: nothing serves
        # no instance record: the newest release's options, under its own version
        self.assertIsNone(view.apps["quiet"].live_releases)
        self.assertEqual(dict(view.apps["quiet"].releases), {2: {"gzip": True}})
        self.assertTrue(view.apps["quiet"].maintenance)


def info(iid: str, app: str, release: int, port: int = 8000) -> InstanceInfo:
    return InstanceInfo("n1", iid, app, release, "web", "127.0.0.1", port, "healthy", 0.0)


WEB = frozenset({"web"})


class OptionsFailClosedTests(SynchronousTestCase):
    """A route never goes out without its ``basic_auth`` because it was not read."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.store = FlakyStore(self.clock)
        self.store.meta[("hello", 2)] = {"basic_auth": AUTH, "https_redirect": True}
        self.store.meta[("idle", 1)] = {"basic_auth": AUTH}
        self.options = ReleaseOptions(self.clock, 1.0)

    def load(self, previous: StoreView | None) -> StoreView:
        return self.successResultOf(Deferred.fromCoroutine(
            load_view(self.store, "example.com", 0.0, self.options, previous)))

    def test_failed_read_routes_nothing_then_protected(self) -> None:
        """A release read that fails leaves its instances out of the route (the router
        answers 503), never published without basic_auth; the next read publishes
        them with the options."""
        self.store.failing = {("hello", 2)}
        first = self.load(None)
        self.assertEqual(dict(first.apps["hello"].releases), {})
        route = build_route(first.apps["hello"], [info("b", "hello", 2)], WEB)
        self.assertEqual((route["backends"], route["options"]), ([], {}))
        self.store.failing = set()
        second = self.load(first)
        route = build_route(second.apps["hello"], [info("b", "hello", 2)], WEB)
        self.assertEqual([b["instance_id"] for b in route["backends"]], ["b"])
        self.assertEqual(route["options"]["basic_auth"]["realm"], "staff")
        self.assertIs(route["options"]["https_redirect"], True)

    def test_new_release_not_read_never_takes_the_old_options(self) -> None:
        """A new release whose read fails (or runs out of budget) is not routed under
        the options of the release before it; that one keeps serving under its own
        (as read before), and the new one is routed, alone, once read."""
        self.store.meta[("hello", 3)] = {"gzip": True}
        first = self.load(None)
        self.store.instances.append(Instance("c", "hello", 3, "web", 1, "n1", "127.0.0.1",
                                             8001, "healthy", 0.0))
        self.store.failing = {("hello", 3)}
        second = self.load(first)
        self.assertEqual(second.apps["hello"].live_releases, frozenset({2, 3}))
        self.assertEqual(set(second.apps["hello"].releases), {2})
        both = [info("b", "hello", 2), info("c", "hello", 3, 8001)]
        route = build_route(second.apps["hello"], both, WEB)
        self.assertEqual([b["instance_id"] for b in route["backends"]], ["b"])
        self.assertEqual(route["options"]["basic_auth"]["realm"], "staff")
        self.store.failing = set()
        route = build_route(self.load(second).apps["hello"], both, WEB)
        self.assertEqual(([b["instance_id"] for b in route["backends"]], route["options"]),
                         (["c"], {"gzip": True}))

    def test_budget_spent_routes_nothing_not_open(self) -> None:
        """When the time budget runs out before an app's release is read, its instances
        are not routed (no options are not "no options"), and a later read that
        gets them routes them."""
        self.store.cost = 2.0  # the first read spends the whole budget
        self.store.apps.append(App("zeta", "u", 10003, False, 0.0))
        self.store.meta[("zeta", 1)] = {"basic_auth": AUTH}
        self.store.instances.append(Instance("z", "zeta", 1, "web", 1, "n1", "127.0.0.1",
                                             8002, "healthy", 0.0))
        view = self.load(None)
        self.assertIn("basic_auth", view.apps["hello"].releases[2])
        for app, release in (("zeta", 1), ("idle", 1)):
            self.assertEqual(dict(view.apps[app].releases), {})
            self.assertEqual(build_route(view.apps[app], [info("x", app, release)],
                                         WEB)["backends"], [])
        self.store.cost = 0.0
        again = self.load(view)
        route = build_route(again.apps["zeta"], [info("z", "zeta", 1)], WEB)
        self.assertEqual((len(route["backends"]), route["options"]), (1, {"basic_auth": AUTH}))

    def test_app_without_instance_records_reads_its_newest_release(self) -> None:
        """An app with no active instance record has the options of its newest release,
        which alone may serve; one with no release has none (nothing serves); a failed
        read keeps what was read before."""
        self.store.apps.append(App("empty", "u", 10003, False, 0.0))
        view = self.load(None)
        self.assertEqual(dict(view.apps["idle"].releases), {1: {"basic_auth": AUTH}})
        self.assertEqual(dict(view.apps["empty"].releases), {})
        self.assertEqual(build_route(view.apps["empty"], [info("e", "empty", 1)],
                                     WEB)["backends"], [])
        self.store.failing = {"idle"}
        again = self.load(view)
        self.assertEqual(dict(again.apps["idle"].releases), {1: {"basic_auth": AUTH}})
        self.store.failing = set()
        self.store.meta[("idle", 2)] = {}
        newer = self.load(again)
        self.assertEqual(dict(newer.apps["idle"].releases), {2: {}})
        route = build_route(newer.apps["idle"], [info("i1", "idle", 1), info("i2", "idle", 2)],
                            WEB)
        self.assertEqual([b["instance_id"] for b in route["backends"]], ["i2"])
