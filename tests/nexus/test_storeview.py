"""The nexus's store reads: against a real (SQLite) store (hostnames, live releases,
options) and on a fake one (options that fail closed)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from epio.basicauth import hash_password
from epio.nexus.heartbeats import InstanceInfo
from epio.nexus.storeview import ReleaseOptions, load_view
from epio.nexus.table import StoreView, build_route
from epio.store import Instance, open_store
from epio.store.records import App, Release


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
        for iid, rel, state in [("a", 1, "draining"), ("b", 2, "healthy"), ("c", 2, "pending")]:
            await store.upsert_instance(Instance(iid, "hello", rel, "web", 1, "n1", "127.0.0.1",
                                                 8000, state, 0.0))
        options = ReleaseOptions(reactor, 1.0)
        view = await load_view(store, "Example.COM.", reactor.seconds(), options)
        self.assertEqual(set(view.apps), {"hello", "quiet", "shop"})
        hello = view.apps["hello"]
        self.assertEqual(hello.hostnames, ("hello.example.com", "www.hello.org"))
        self.assertEqual(hello.live_releases, frozenset({2}))
        self.assertEqual(dict(hello.options), {"idle_timeout": 30})
        self.assertEqual(view.apps["shop"].hostnames, ("shop.example.com", "*.shop.example"))
        self.assertIsNone(view.apps["shop"].live_releases)
        self.assertTrue(view.apps["quiet"].maintenance)


AUTH = {"realm": "staff", "users": {"alice": hash_password("s3cret", salt=b"0" * 16)}}


class FlakyStore:
    """The nexus's reads from lists; ``get_release``/``latest_release`` fail while
    ``failing`` holds the key, and each read may cost ``cost`` seconds of the clock."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.apps = [App("hello", "u", 10001, False, 0.0), App("idle", "u", 10002, False, 0.0)]
        self.instances = [Instance("b", "hello", 2, "web", 1, "n1", "127.0.0.1", 8000,
                                   "healthy", 0.0)]
        self.meta: dict[tuple[str, int], dict[str, Any]] = {}
        self.failing: set[Any] = set()
        self.cost = 0.0

    async def list_apps(self, for_user: str | None = None) -> list[App]:
        return list(self.apps)

    async def all_hostnames(self) -> dict[str, str]:
        return {}

    async def list_instances(self, app: str | None = None,
                             node: str | None = None) -> list[Instance]:
        return list(self.instances)

    def _release(self, app: str, version: int) -> Release:
        return Release(app, version, None, {}, {"web": "run"}, "", 0.0, None,
                       self.meta[(app, version)])

    async def get_release(self, app: str, version: int) -> Release:
        self.clock.advance(self.cost)
        if (app, version) in self.failing:
            raise ConnectionError("store connection lost")
        return self._release(app, version)

    async def latest_release(self, app: str) -> Release | None:
        self.clock.advance(self.cost)
        if app in self.failing:
            raise ConnectionError("store connection lost")
        versions = [v for (a, v) in self.meta if a == app]
        return self._release(app, max(versions)) if versions else None


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

    def test_failed_read_is_pending_then_protected(self) -> None:
        """A release read that fails leaves the app pending (its route has no backends,
        the router answers 503), never published without basic_auth; the next read
        publishes the options."""
        self.store.failing = {("hello", 2)}
        first = self.load(None)
        self.assertTrue(first.apps["hello"].pending)
        route = build_route(first.apps["hello"],
                            [InstanceInfo("n1", "b", "hello", 2, "web", "127.0.0.1", 8000,
                                          "healthy", 0.0)],
                            frozenset({"web"}))
        self.assertEqual(route["backends"], [])
        self.store.failing = set()
        second = self.load(first)
        self.assertFalse(second.apps["hello"].pending)
        self.assertEqual(second.apps["hello"].options["basic_auth"]["realm"], "staff")
        self.assertTrue(second.apps["hello"].options["https_redirect"])

    def test_not_read_keeps_previous_options(self) -> None:
        """A new release whose read fails (or runs out of budget) keeps the options
        the app had in the previous view."""
        first = self.load(None)
        self.assertIn("basic_auth", first.apps["hello"].options)
        self.store.meta[("hello", 3)] = {"basic_auth": AUTH}
        self.store.instances.append(Instance("c", "hello", 3, "web", 1, "n1", "127.0.0.1",
                                             8001, "healthy", 0.0))
        self.store.failing = {("hello", 3)}
        second = self.load(first)
        self.assertFalse(second.apps["hello"].pending)
        self.assertEqual(dict(second.apps["hello"].options), dict(first.apps["hello"].options))

    def test_budget_spent_is_pending_not_open(self) -> None:
        """When the time budget runs out before an app's release is read, the app is
        pending, not published with no options."""
        self.store.cost = 2.0  # the first read spends the whole budget
        self.store.apps.append(App("zeta", "u", 10003, False, 0.0))
        self.store.meta[("zeta", 1)] = {"basic_auth": AUTH}
        self.store.instances.append(Instance("z", "zeta", 1, "web", 1, "n1", "127.0.0.1",
                                             8002, "healthy", 0.0))
        view = self.load(None)
        self.assertIn("basic_auth", view.apps["hello"].options)
        self.assertTrue(view.apps["zeta"].pending)
        self.assertTrue(view.apps["idle"].pending)

    def test_app_without_instance_records_reads_its_newest_release(self) -> None:
        """An app with no active instance record gets the options of its newest
        release; an app with no release at all has none and is not pending."""
        self.store.apps.append(App("empty", "u", 10003, False, 0.0))
        view = self.load(None)
        self.assertIn("basic_auth", view.apps["idle"].options)
        self.assertFalse(view.apps["empty"].pending)
        self.assertEqual(dict(view.apps["empty"].options), {})
        self.store.failing = {"idle"}
        again = self.load(view)
        self.assertIn("basic_auth", again.apps["idle"].options)
