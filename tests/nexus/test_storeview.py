"""The nexus's store reads: against a real (SQLite) store (hostnames, live releases,
options) and on a fake one (options that fail closed)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from epio.nexus.storeview import ReleaseOptions, load_view
from epio.store import Instance, open_store


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
