"""Destroyed apps: kept for a grace period, listed, restorable, purged (by hand or by
the leader's periodic job on a fake clock).  Real SQLite store, fake runners, every
response checked against the OpenAPI document."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import TestCase

from epio.api.domain import Platform
from epio.api.errors import NotFound as ApiNotFound
from epio.api.purge import AppPurger, PurgeService
from epio.api.settings import ApiSettings
from epio.store import NotFound
from tests.api.support import DIGEST, Harness

GRACE = 3600.0


class DestroyedAppsTests(TestCase):
    timeout = 30

    def setUp(self) -> Any:
        self.h = Harness(ApiSettings(drain_seconds=0.0, reconcile_interval=0.05,
                                     route_settle=0.0, destroyed_grace=GRACE))
        self.addCleanup(lambda: ensureDeferred(self.h.stop()))
        return ensureDeferred(self.h.start())

    async def app(self, name: str = "keep", quantity: int = 1) -> None:
        status, _, _ = await self.h.call("POST", "apps", token=self.h.alice_token,
                                         body={"name": name})
        self.assertEqual(status, 201)
        await self.h.store.create_release(name, DIGEST, processes={"web": "run web"})
        await self.h.store.set_formation(name, "web", quantity)
        for _ in range(3):
            await self.h.scheduler.reconcile()

    async def test_destroy_list_restore(self) -> None:
        """DELETE /apps/X stops its instances and answers when it will be purged; X is
        then a 404 everywhere, listed by GET /destroyed-apps to its owner only, its
        name not reusable; restoring brings it back with its releases and config and
        the scheduler runs it again."""
        await self.h.add_runner("r1")
        await self.app()
        await self.h.store.set_config_and_release("keep", {"MOTTO": "old data"},
                                                  description="set MOTTO")
        self.assertEqual(len(self.h.runners.running("keep")), 1)
        status, body, _ = await self.h.call("DELETE", "apps/keep", token=self.h.alice_token)
        self.assertEqual(status, 200, body)
        self.assertTrue(abs(body["purge_after"] - body["destroyed"] - GRACE) < 5, body)
        self.assertEqual(self.h.runners.running("keep"), [])
        self.assertEqual(await self.h.store.list_instances("keep"), [])
        for _ in range(2):
            await self.h.scheduler.reconcile()
        self.assertEqual(self.h.runners.running("keep"), [])  # not placed again
        status, _, _ = await self.h.call("GET", "apps/keep", token=self.h.alice_token)
        self.assertEqual(status, 404)
        status, apps, _ = await self.h.call("GET", "apps", token=self.h.alice_token)
        self.assertEqual(apps, [])
        status, listed, _ = await self.h.call("GET", "destroyed-apps", token=self.h.alice_token)
        self.assertEqual([(a["name"], a["owner"]) for a in listed], [("keep", "alice")])
        self.assertEqual(listed[0]["purge_after"], body["purge_after"])
        status, listed, _ = await self.h.call("GET", "destroyed-apps", token=self.h.bob_token)
        self.assertEqual(listed, [])
        status, err, _ = await self.h.call("POST", "destroyed-apps/keep/restore",
                                           token=self.h.bob_token)
        self.assertEqual((status, err["error"]["code"]), (404, "not_found"))
        status, err, _ = await self.h.call("POST", "apps", token=self.h.bob_token,
                                           body={"name": "keep"})
        self.assertEqual((status, err["error"]["code"]), (409, "conflict"))
        self.assertIn("destroyed", err["error"]["message"])

        status, app, _ = await self.h.call("POST", "destroyed-apps/keep/restore",
                                           token=self.h.alice_token)
        self.assertEqual((status, app["name"], app["release"]), (200, "keep", 2))
        self.assertEqual((await self.h.store.get_config("keep"))["MOTTO"], "old data")
        for _ in range(3):
            await self.h.scheduler.reconcile()
        self.assertEqual(len(self.h.runners.running("keep")), 1)
        status, listed, _ = await self.h.call("GET", "destroyed-apps", token=self.h.alice_token)
        self.assertEqual(listed, [])

    async def test_purge_by_hand(self) -> None:
        """DELETE /destroyed-apps/X deletes X for good: every runner is asked to delete
        its data dir, its rows are gone, it cannot be restored, and its UID goes to the
        next app of another name."""
        await self.h.add_runner("r1")
        await self.h.add_runner("r2")
        await self.app()
        uid = (await self.h.store.get_app("keep")).uid
        await self.h.call("DELETE", "apps/keep", token=self.h.alice_token)
        status, err, _ = await self.h.call("DELETE", "destroyed-apps/keep",
                                           token=self.h.bob_token)
        self.assertEqual(status, 404)  # not bob's
        status, body, _ = await self.h.call("DELETE", "destroyed-apps/keep",
                                            token=self.h.alice_token)
        self.assertEqual((status, body), (200, {"deleted": "keep"}))
        self.assertEqual(sorted(self.h.runners.purged),
                         [("tcp://r1:7731", "keep", uid), ("tcp://r2:7731", "keep", uid)])
        with self.assertRaises(NotFound):
            await self.h.store.get_app("keep", destroyed=True)
        with self.assertRaises(NotFound):
            await self.h.store.list_releases("keep")
        status, _, _ = await self.h.call("POST", "destroyed-apps/keep/restore",
                                         token=self.h.alice_token)
        self.assertEqual(status, 404)
        new = await self.h.store.create_app("other", (await self.h.store.get_user_by_name(
            "bob")).id)
        self.assertEqual(new.uid, uid)

    async def test_purge_racing_restore(self) -> None:
        """A purge that read X destroyed, then lost the race to a restore, drops nothing
        (no runner asked, app live with its releases) and is a 404; a restore that comes
        after a purge has claimed X is 409 saying it is being purged, the listing shows
        it purging, and the purge completes."""
        await self.h.add_runner("r1")
        await self.app()
        await self.h.call("DELETE", "apps/keep", token=self.h.alice_token)
        alice = await self.h.store.get_user_by_name("alice")
        stale = await self.h.platform.get_destroyed(alice, "keep")  # the purge decides
        status, _, _ = await self.h.call("POST", "destroyed-apps/keep/restore",
                                         token=self.h.alice_token)
        self.assertEqual(status, 200)
        with self.assertRaises(ApiNotFound):
            await self.h.platform.purge_app(alice, stale)
        self.assertEqual(self.h.runners.purged, [])
        self.assertIsNone((await self.h.store.get_app("keep")).destroyed)
        self.assertEqual(len(await self.h.store.list_releases("keep")), 1)
        # now the purge claims first; the restore arrives while it runs
        await self.h.call("DELETE", "apps/keep", token=self.h.alice_token)
        await self.h.store.claim_purge("keep")
        status, err, _ = await self.h.call("POST", "destroyed-apps/keep/restore",
                                           token=self.h.alice_token)
        self.assertEqual((status, err["error"]["code"]), (409, "conflict"))
        self.assertIn("being purged", err["error"]["message"])
        status, listed, _ = await self.h.call("GET", "destroyed-apps", token=self.h.alice_token)
        self.assertEqual([(a["name"], a["purging"], a["purge_after"]) for a in listed],
                         [("keep", True, None)])
        status, body, _ = await self.h.call("DELETE", "destroyed-apps/keep",
                                            token=self.h.alice_token)
        self.assertEqual((status, body), (200, {"deleted": "keep"}))
        with self.assertRaises(NotFound):
            await self.h.store.get_app("keep", destroyed=True)

    async def test_destroy_stops_a_running_deploy(self) -> None:
        """Destroying an app while its build runs fails the deploy at once ("app
        destroyed"); when the build then finishes no release is made, its release
        command (migrations) never starts, the deploy's log ends with the failure, and
        the app stays destroyed with no instance."""
        await self.h.add_runner("r1")
        await self.app()
        gate: Deferred[None] = Deferred()
        self.h.runners.build_gate = gate
        self.h.runners.manifest = {"processes": {"web": "gunicorn app:app"},
                                   "release_command": "python manage.py migrate"}
        alice = await self.h.store.get_user_by_name("alice")
        app = await self.h.store.get_app("keep")
        deploy = await self.h.deployer.start(app, alice, b"tarball")
        while (await self.h.store.get_deploy(deploy.id)).status != "building":
            await deferLater(reactor, 0.01, lambda: None)
        status, body, _ = await self.h.call("DELETE", "apps/keep", token=self.h.alice_token)
        self.assertEqual(status, 200, body)
        failed = await self.h.store.get_deploy(deploy.id)
        self.assertEqual((failed.status, failed.reason), ("failed", "app destroyed"))
        releases = len(await self.h.store.list_releases("keep"))
        gate.callback(None)
        await self.h.deployer.wait(deploy.id)
        self.assertEqual(len(await self.h.store.list_releases("keep")), releases)
        self.assertEqual([t for _, t, _ in self.h.runners.requests if t == "run.start"], [])
        final = await self.h.store.get_deploy(deploy.id)
        self.assertEqual(final.status, "failed")
        self.assertTrue(final.log.endswith("Deploy failed: app destroyed\n"), final.log)
        self.assertIsNotNone((await self.h.store.get_app("keep", destroyed=True)).destroyed)
        self.assertEqual(self.h.runners.running("keep"), [])


class PeriodicPurgeTests(TestCase):
    timeout = 30

    def setUp(self) -> Any:
        self.h = Harness()
        self.addCleanup(lambda: ensureDeferred(self.h.stop()))
        return ensureDeferred(self.h.start())

    async def until(self, what: str, check: Any, timeout: float = 10.0) -> None:
        """Wait (real time: the store answers from its thread) until ``check()``."""
        deadline = reactor.seconds() + timeout
        while not check():
            if reactor.seconds() > deadline:
                raise AssertionError(f"{what}: not true after {timeout}s")
            await deferLater(reactor, 0.01, lambda: None)

    async def test_purged_after_grace_by_the_leader_only(self) -> None:
        """On a fake clock: of two purge services on one store only one is elected; a
        destroyed app is still kept at a look one second before its grace period ends
        and purged at the first look after it (data on the runners deleted, UID free
        again)."""
        clock = Clock()
        clock.advance(reactor.seconds())
        settings = ApiSettings(destroyed_grace=GRACE, purge_interval=60.0)
        platform = Platform(self.h.store, settings, clock, scheduler=self.h.scheduler)
        await self.h.add_runner("r1")
        alice = await self.h.store.get_user_by_name("alice")
        app = await self.h.store.create_app("old", alice.id)
        await platform.delete_app(alice, app)

        services = [PurgeService(AppPurger(platform, self.h.store, clock), self.h.store,
                                 clock, settings.purge_interval, retry_interval=1.0)
                    for _ in range(2)]
        for svc in services:
            svc.startService()
            self.addCleanup(svc.stopService)
        await self.until("a leader's first look", lambda: any(
            s.purger.looks == 1 for s in services))
        clock.advance(1.0)  # the other retries the lock, and fails
        await deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(sorted(s.leader.is_leader for s in services), [False, True])
        leader = next(s for s in services if s.leader.is_leader)
        other = next(s for s in services if not s.leader.is_leader)

        clock.advance(GRACE - 1 - 1.0)  # at purge_after - 1
        await self.until("the look before the end", lambda: leader.purger.looks == 2)
        self.assertEqual([a.name for a in await self.h.store.list_apps(destroyed=True)],
                         ["old"])
        self.assertEqual(self.h.runners.purged, [])
        clock.advance(60)
        await self.until("the look after the end", lambda: leader.purger.looks == 3)
        self.assertEqual(await self.h.store.list_apps(destroyed=True), [])
        self.assertEqual(self.h.runners.purged, [("tcp://r1:7731", "old", app.uid)])
        self.assertEqual(other.purger.looks, 0)
        self.assertEqual((await self.h.store.create_app("new", alice.id)).uid, app.uid)
