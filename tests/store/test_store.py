"""The store suite: the same tests against SQLite and PostgreSQL."""

from __future__ import annotations

import sqlite3
import urllib.parse
from typing import Any

from attrs import evolve
from twisted.internet import reactor
from twisted.internet.defer import DeferredList, ensureDeferred
from twisted.trial.unittest import TestCase

from epio.store import (
    AppLimits,
    AppQuotaExceeded,
    Conflict,
    HostnameRefused,
    Instance,
    InvalidName,
    InvalidTransition,
    InvalidValue,
    LastAdminToken,
    NotFound,
    RateLimited,
    Store,
    UidsExhausted,
    hash_token,
    open_store,
)
from epio.store.cron import claim_slot
from epio.store.migrations import MIGRATIONS, current_version, migrate
from epio.store.runs import create_run
from tests.store import pg

DIGEST = "a" * 64
DIGEST2 = "b" * 64


class StoreTestsMixin:
    """Behaviour both backends must share.  Subclasses provide ``url()``."""

    store: Store

    def url(self) -> str:
        raise NotImplementedError

    async def raw(self, sql: str) -> list[tuple[Any, ...]]:
        """Rows of ``sql`` read straight from the database (bypassing the domain API)."""

        async def q(tx: Any) -> list[tuple[Any, ...]]:
            return (await tx.execute(sql)).rows

        return await self.store.backend.transaction(q)

    async def raw_write(self, sql: str) -> None:
        """Run one statement straight on the database."""

        async def q(tx: Any) -> None:
            await tx.execute(sql)

        await self.store.backend.transaction(q)

    async def open(self) -> Store:
        store = await open_store(self.store_url, reactor)
        self.addCleanup(store.close)  # type: ignore[attr-defined]
        return store

    async def setUp(self) -> None:  # type: ignore[override]
        self.store_url = self.url()
        self.store = await self.open()
        self.alice = await self.store.create_user("alice", "alice@example.com")
        self.bob = await self.store.create_user("bob")

    # ------------------------------------------------------------ migrations

    async def test_migrations_idempotent(self) -> None:
        """Migrating an up-to-date store applies nothing and keeps the data."""
        self.assertEqual(await current_version(self.store.backend), len(MIGRATIONS))
        await self.store.create_app("keep", self.alice.id)
        self.assertEqual(await migrate(self.store.backend, reactor.seconds), [])
        again = await self.open()
        self.assertEqual((await again.get_app("keep")).name, "keep")
        rows = await self.raw("SELECT version FROM schema_version ORDER BY version")
        self.assertEqual([r[0] for r in rows], [m.version for m in MIGRATIONS])

    async def test_upgrade_from_older_schema(self) -> None:
        """A store at an older schema version is brought up to date on open, keeping
        its data (only the missing migrations run)."""
        from epio.store.service import make_backend

        url = self.url()
        backend = make_backend(url, reactor)
        await backend.open()
        self.assertEqual(await migrate(backend, reactor.seconds, MIGRATIONS[:1]), [1])

        async def q(tx: Any) -> None:
            await tx.execute("INSERT INTO users (id, name, is_admin, created) "
                             "VALUES ('old', 'olduser', ?, 0)", (False,))

        await backend.transaction(q)
        await backend.close()
        store = await open_store(url, reactor)
        self.addCleanup(store.close)
        self.assertEqual(await current_version(store.backend), len(MIGRATIONS))
        self.assertEqual((await store.get_user("old")).name, "olduser")

    async def test_releases_immutable(self) -> None:
        """The database itself refuses to change a release (migration 2)."""
        await self.store.create_app("imm", self.alice.id)
        await self.store.create_release("imm", DIGEST)
        with self.assertRaises(Exception) as cm:
            await self.raw_write("UPDATE releases SET image = NULL WHERE app = 'imm'")
        self.assertIn("immutable", str(cm.exception))
        self.assertEqual((await self.store.get_release("imm", 1)).image, DIGEST)
        await self.store.delete_app("imm")  # deleting with the app still works

    async def test_newer_schema_refused(self) -> None:
        """A database migrated by a newer epio is refused with a clear error."""
        from epio.store import MigrationError

        async def q(tx: Any) -> None:
            await tx.execute("INSERT INTO schema_version (version, name, applied) "
                             "VALUES (999, 'future', 0)")

        await self.store.backend.transaction(q)
        with self.assertRaises(MigrationError) as cm:  # type: ignore[attr-defined]
            await migrate(self.store.backend, reactor.seconds)
        self.assertIn("999", str(cm.exception))

    # ----------------------------------------------------------------- users

    async def test_users(self) -> None:
        """Users are created, found by id and name, listed; names are unique; deleting a
        user removes their tokens and collaborations."""
        self.assertEqual(await self.store.get_user(self.alice.id), self.alice)
        self.assertEqual(await self.store.get_user_by_name("bob"), self.bob)
        self.assertEqual([u.name for u in await self.store.list_users()], ["alice", "bob"])
        self.assertFalse(self.alice.is_admin)
        admin = await self.store.create_user("root", is_admin=True)
        self.assertTrue((await self.store.get_user(admin.id)).is_admin)
        with self.assertRaises(Conflict):
            await self.store.create_user("alice")
        with self.assertRaises(InvalidName):
            await self.store.create_user("bad name")
        with self.assertRaises(NotFound):
            await self.store.get_user("nope")
        await self.store.create_app("a", self.alice.id)
        await self.store.add_collaborator("a", self.bob.id)
        tok = await self.store.create_token(self.bob.id)
        await self.store.delete_user(self.bob.id)
        with self.assertRaises(NotFound):
            await self.store.get_user_by_name("bob")
        self.assertIsNone(await self.store.user_for_token(tok.token))
        self.assertEqual(await self.store.list_collaborators("a"), [])
        self.assertEqual(await self.raw("SELECT * FROM api_tokens"), [])
        with self.assertRaises(NotFound):
            await self.store.delete_user(self.bob.id)

    async def test_delete_user_owning_apps_conflicts(self) -> None:
        """A user who owns apps cannot be deleted (their apps would be orphaned)."""
        await self.store.create_app("mine", self.alice.id)
        with self.assertRaises(Conflict):
            await self.store.delete_user(self.alice.id)

    async def test_tokens_hashed(self) -> None:
        """A token authenticates its user; only its sha256 and a prefix are stored."""
        new = await self.store.create_token(self.alice.id, "laptop")
        self.assertTrue(new.token.startswith("epio_"))
        self.assertGreaterEqual(len(new.token), 40)
        self.assertEqual(await self.store.user_for_token(new.token), self.alice)
        rows = await self.raw("SELECT * FROM api_tokens")
        self.assertEqual(len(rows), 1)
        flat = " ".join(str(v) for v in rows[0])
        self.assertNotIn(new.token, flat)
        self.assertNotIn(new.token[len(new.info.prefix):], flat)
        self.assertIn(hash_token(new.token), flat)
        self.assertEqual(new.info.prefix, new.token[:12])
        self.assertNotIn(new.token, repr(new))
        infos = await self.store.list_tokens(self.alice.id)
        self.assertEqual([i.id for i in infos], [new.info.id])
        self.assertIsNotNone(infos[0].last_used)

    async def test_token_rejects(self) -> None:
        """Wrong, malformed and revoked tokens authenticate nobody."""
        new = await self.store.create_token(self.alice.id)
        for bad in ["", "epio_x", new.token + "x", new.token[:-1], "x" * 10000]:
            self.assertIsNone(await self.store.user_for_token(bad))
        with self.assertRaises(NotFound):
            await self.store.revoke_token(new.info.id, user_id=self.bob.id)
        await self.store.revoke_token(new.info.id, user_id=self.alice.id)
        self.assertIsNone(await self.store.user_for_token(new.token))
        with self.assertRaises(NotFound):
            await self.store.revoke_token(new.info.id)
        with self.assertRaises(NotFound):
            await self.store.create_token("no-such-user")

    async def test_last_admin_token_kept(self) -> None:
        """The last token of any admin cannot be revoked (LastAdminToken, a Conflict);
        an admin's token can be while another admin token exists, and a non-admin's
        last token always can."""
        root = await self.store.create_user("root", is_admin=True)
        first = await self.store.create_token(root.id, "first")
        with self.assertRaises(LastAdminToken) as cm:
            await self.store.revoke_token(first.info.id, user_id=root.id)
        self.assertIsInstance(cm.exception, Conflict)
        self.assertEqual(cm.exception.code, "last_admin_token")
        self.assertEqual(await self.store.user_for_token(first.token), root)
        other = await self.store.create_user("ops", is_admin=True)
        second = await self.store.create_token(other.id, "ops")
        await self.store.revoke_token(first.info.id, user_id=root.id)  # ops still has one
        self.assertIsNone(await self.store.user_for_token(first.token))
        with self.assertRaises(LastAdminToken):
            await self.store.revoke_token(second.info.id)
        mine = await self.store.create_token(self.alice.id)
        await self.store.revoke_token(mine.info.id, user_id=self.alice.id)

    # ------------------------------------------------------------------ apps

    async def test_apps(self) -> None:
        """Apps get unique, increasing UIDs from 20000; names are unique and validated."""
        a = await self.store.create_app("hello", self.alice.id)
        b = await self.store.create_app("world-2", self.bob.id)
        self.assertEqual(a.uid, 20000)
        self.assertEqual(b.uid, 20001)
        self.assertFalse(a.maintenance)
        self.assertEqual(await self.store.get_app("hello"), a)
        with self.assertRaises(Conflict):
            await self.store.create_app("hello", self.bob.id)
        for bad in ["Hello", "-x", "x-", "a_b", "", "a" * 31, "1abc", "a.b"]:
            with self.assertRaises(InvalidName):
                await self.store.create_app(bad, self.alice.id)
        with self.assertRaises(NotFound):
            await self.store.create_app("orphan", "no-such-user")
        self.assertEqual([x.name for x in await self.store.list_apps()], ["hello", "world-2"])
        self.assertEqual([x.name for x in await self.store.list_apps(self.alice.id)], ["hello"])
        m = await self.store.set_maintenance("hello", True)
        self.assertTrue(m.maintenance)
        self.assertTrue((await self.store.get_app("hello")).maintenance)

    async def test_uid_range_and_reuse(self) -> None:
        """UIDs come from the given range, lowest free first; a deleted app's UID is
        taken by the next app of another name, never by an app of the same name; a full
        range is UidsExhausted and creates nothing."""
        uids = (47000, 47002)
        a = await self.store.create_app("one", self.alice.id, uids=uids)
        b = await self.store.create_app("two", self.alice.id, uids=uids)
        c = await self.store.create_app("three", self.bob.id, uids=uids)
        self.assertEqual([a.uid, b.uid, c.uid], [47000, 47001, 47002])
        with self.assertRaises(UidsExhausted) as cm:
            await self.store.create_app("four", self.bob.id, uids=uids)
        self.assertIn("47000 to 47002", str(cm.exception))
        with self.assertRaises(NotFound):
            await self.store.get_app("four")
        await self.store.delete_app("two")
        with self.assertRaises(UidsExhausted):  # "two" never gets 47001 again
            await self.store.create_app("two", self.bob.id, uids=uids)
        d = await self.store.create_app("four", self.bob.id, uids=uids)
        self.assertEqual(d.uid, 47001)
        await self.store.delete_app("one")
        await self.store.delete_app("four")
        again = await self.store.create_app("one", self.alice.id, uids=uids)
        self.assertEqual(again.uid, 47001)  # 47000 was "one"'s: the next free
        # an app outside the range (the range was moved) neither blocks nor is reused
        e = await self.store.create_app("five", self.bob.id, uids=(46999, 47003))
        self.assertEqual(e.uid, 46999)

    async def test_destroyed_apps(self) -> None:
        """A destroyed app leaves get_app/list_apps/can_access (so routing, scheduling
        and the API) but keeps its rows, name and UID; it is listed as destroyed, due
        for purging at purge_after; restoring brings it back; deleting it frees the UID."""
        app = await self.store.create_app("gone", self.alice.id)
        await self.store.create_release("gone", DIGEST)
        await self.store.upsert_instance(Instance("i1", "gone", 1, "web", 1, "n1", None, None,
                                                  "healthy", 1.0, 0))
        t = await self.store.destroy_app("gone", purge_after=5000.0, by=self.alice.id)
        self.assertEqual((t.uid, t.purge_after), (app.uid, 5000.0))
        self.assertIsNotNone(t.destroyed)
        with self.assertRaises(NotFound):
            await self.store.get_app("gone")
        self.assertEqual(await self.store.list_apps(), [])
        self.assertEqual(await self.store.list_apps(self.alice.id), [])
        self.assertEqual([a.name for a in await self.store.list_apps(self.alice.id,
                                                                     destroyed=True)], ["gone"])
        self.assertFalse(await self.store.can_access("gone", self.alice.id))
        self.assertEqual(await self.store.list_instances("gone"), [])
        self.assertEqual([r.version for r in await self.store.list_releases("gone")], [1])
        with self.assertRaises(Conflict):
            await self.store.create_app("gone", self.bob.id)
        with self.assertRaises(NotFound):  # already destroyed
            await self.store.destroy_app("gone", purge_after=1.0)
        self.assertEqual(await self.store.purge_due(4999.0), [])
        self.assertEqual([a.name for a in await self.store.purge_due(5000.0)], ["gone"])
        back = await self.store.restore_app("gone")
        self.assertEqual((back.destroyed, back.purge_after, back.uid), (None, None, app.uid))
        self.assertEqual((await self.store.get_app("gone")).uid, app.uid)
        with self.assertRaises(NotFound):
            await self.store.restore_app("gone")
        await self.store.destroy_app("gone", purge_after=1.0)
        await self.store.delete_app("gone")
        self.assertEqual(await self.store.list_apps(destroyed=True), [])
        self.assertEqual((await self.store.create_app("next", self.bob.id)).uid, app.uid)

    async def test_purge_racing_restore(self) -> None:
        """A purge claims the destroyed app first: a restore that came before the claim
        makes the claim and the final delete NotFound (the live app and its rows stay);
        a restore after the claim is a Conflict saying it is being purged, and the purge
        completes. The steps are called in the racing order."""
        await self.store.create_app("race", self.alice.id)
        await self.store.create_release("race", "sha256:" + "a" * 64)
        # 1. purge decided (app read destroyed), then a restore wins
        await self.store.destroy_app("race", purge_after=1.0)
        await self.store.restore_app("race")
        with self.assertRaises(NotFound):
            await self.store.claim_purge("race")
        with self.assertRaises(NotFound):
            await self.store.delete_app("race", destroyed_only=True)
        self.assertIsNone((await self.store.get_app("race")).destroyed)
        self.assertEqual(len(await self.store.list_releases("race")), 1)
        # 2. the purge claims first, the restore comes in the middle of it
        await self.store.destroy_app("race", purge_after=1.0)
        claimed = await self.store.claim_purge("race")
        self.assertTrue(claimed.purging)
        self.assertEqual([a.name for a in await self.store.purge_due(0.0)], ["race"])
        with self.assertRaises(Conflict) as cm:
            await self.store.restore_app("race")
        self.assertIn("being purged", str(cm.exception))
        self.assertTrue((await self.store.claim_purge("race")).purging)  # resumable
        await self.store.delete_app("race", destroyed_only=True)
        with self.assertRaises(NotFound):
            await self.store.get_app("race", destroyed=True)

    async def test_destroyed_app_refuses_writes(self) -> None:
        """Destroying an app fails its unfinished deploys ("app destroyed") in the same
        transaction; a destroyed app refuses new releases, deploys, config, formation,
        domains, collaborators, run sessions and cron records (NotFound), and accepts
        them again once restored."""
        await self.store.create_app("dead", self.alice.id)
        await self.store.create_release("dead", "sha256:" + "a" * 64,
                                        processes={"web": "run"})
        running = await self.store.create_deploy("dead")
        await self.store.update_deploy(running.id, status="building")
        done = await self.store.create_deploy("dead", "pending")
        await self.store.update_deploy(done.id, status="failed", reason="earlier")
        await self.store.destroy_app("dead", purge_after=1e12)
        failed = await self.store.get_deploy(running.id)
        self.assertEqual((failed.status, failed.reason), ("failed", "app destroyed"))
        self.assertIsNotNone(failed.finished)
        self.assertEqual((await self.store.get_deploy(done.id)).reason, "earlier")
        with self.assertRaises(InvalidTransition):
            await self.store.update_deploy(running.id, status="built")
        refused = [
            lambda: self.store.create_release("dead", "sha256:" + "b" * 64),
            lambda: self.store.create_deploy("dead"),
            lambda: self.store.set_config("dead", {"A": "1"}),
            lambda: self.store.set_config_and_release("dead", {"A": "1"}, description="x"),
            lambda: self.store.set_formation("dead", "web", 2),
            lambda: self.store.add_domain("dead", "dead.example.com"),
            lambda: self.store.add_collaborator("dead", self.bob.id),
            lambda: create_run(self.store, "s1", "dead", user=None, command="sh", kind="detached",
                               tty=False, node=None, release=None),
            lambda: claim_slot(self.store, "dead", "job", 60.0),
        ]
        for call in refused:
            with self.assertRaises(NotFound):
                await call()
        self.assertEqual(len(await self.store.list_releases("dead")), 1)
        await self.store.restore_app("dead")
        await self.store.create_release("dead", "sha256:" + "b" * 64)
        self.assertEqual(await self.store.fail_running_deploys("dead", "x"), [])
        live = await self.store.create_deploy("dead")
        self.assertEqual(await self.store.fail_running_deploys("dead", "x"), [live.id])

    async def test_overlapping_hostnames_added_at_once(self) -> None:
        """Two accounts adding overlapping hostnames at the same time (``example.com``
        and ``www.example.com``): the overlap check runs inside add_domain's
        transaction, serialised, so exactly one gets it and the other is
        HostnameRefused, every time; the same owner's overlapping names both pass."""
        from epio.api.domain import hostname_refused

        await self.store.create_app("ours", self.alice.id)
        await self.store.create_app("ours2", self.alice.id)
        await self.store.create_app("theirs", self.bob.id)

        def check(host: str, app: str) -> Any:
            return lambda others: hostname_refused(host, app, "epio.test", others)

        for n in range(5):
            a, b = f"ex{n}.com", f"www.ex{n}.com"
            results = await DeferredList([
                ensureDeferred(self.store.add_domain("ours", a, refused=check(a, "ours"))),
                ensureDeferred(self.store.add_domain("theirs", b,
                                                     refused=check(b, "theirs"))),
            ], consumeErrors=True)
            ok = [r for good, r in results if good]
            bad = [r.value for good, r in results if not good]
            self.assertEqual((len(ok), len(bad)), (1, 1), results)
            self.assertIsInstance(bad[0], HostnameRefused)
            held = {d.hostname: d.app for d in await self.store.list_domains()}
            self.assertEqual(len([h for h in held if h in (a, b)]), 1, held)
        await self.store.add_domain("ours", "mine.org", refused=check("mine.org", "ours"))
        await self.store.add_domain("ours2", "www.mine.org",
                                    refused=check("www.mine.org", "ours2"))

    async def test_app_quota(self) -> None:
        """A user with max_apps apps gets AppQuotaExceeded (with a retry time) and no app;
        after deleting one they may create again; other users are not affected."""
        limits = AppLimits(max_apps=2, changes=0, window=600.0)
        await self.store.create_app("q1", self.alice.id, limits=limits)
        await self.store.create_app("q2", self.alice.id, limits=limits)
        with self.assertRaises(AppQuotaExceeded) as cm:
            await self.store.create_app("q3", self.alice.id, limits=limits)
        self.assertEqual(cm.exception.retry_after, 600.0)
        self.assertIn("(2)", str(cm.exception))
        await self.store.create_app("b1", self.bob.id, limits=limits)
        await self.store.delete_app("q1", by=self.alice.id)
        await self.store.create_app("q3", self.alice.id, limits=limits)

    async def test_app_change_rate(self) -> None:
        """Creations and deletions count in a sliding window: the creation beyond the
        limit is RateLimited with the time until the oldest counted change leaves the
        window; a deletion is never refused; once the window has passed, creating works."""
        limits = AppLimits(max_apps=0, changes=3, window=3600.0)
        await self.store.create_app("r1", self.alice.id, limits=limits)
        await self.store.delete_app("r1", by=self.alice.id)
        await self.store.create_app("r2", self.alice.id, limits=limits)
        with self.assertRaises(RateLimited) as cm:
            await self.store.create_app("r3", self.alice.id, limits=limits)
        self.assertGreater(cm.exception.retry_after, 3500.0)
        self.assertLessEqual(cm.exception.retry_after, 3600.0)
        await self.store.delete_app("r2", by=self.alice.id)  # counted, not refused
        await self.store.create_app("b1", self.bob.id, limits=limits)  # bob has his own
        await self.raw_write("UPDATE app_changes SET at = at - 3600")  # an hour later
        await self.store.create_app("r3", self.alice.id, limits=limits)

    async def test_collaborators_and_access(self) -> None:
        """Owner, collaborators and admins can access an app; others cannot."""
        await self.store.create_app("shared", self.alice.id)
        carol = await self.store.create_user("carol")
        admin = await self.store.create_user("root", is_admin=True)
        self.assertTrue(await self.store.can_access("shared", self.alice.id))
        self.assertFalse(await self.store.can_access("shared", self.bob.id))
        self.assertTrue(await self.store.can_access("shared", admin.id))
        self.assertFalse(await self.store.can_access("nope", admin.id))
        await self.store.add_collaborator("shared", self.bob.id)
        await self.store.add_collaborator("shared", self.bob.id)  # idempotent
        self.assertTrue(await self.store.can_access("shared", self.bob.id))
        self.assertFalse(await self.store.can_access("shared", carol.id))
        self.assertEqual([u.name for u in await self.store.list_collaborators("shared")], ["bob"])
        self.assertEqual([a.name for a in await self.store.list_apps(self.bob.id)], ["shared"])
        await self.store.remove_collaborator("shared", self.bob.id)
        self.assertFalse(await self.store.can_access("shared", self.bob.id))
        with self.assertRaises(NotFound):
            await self.store.remove_collaborator("shared", self.bob.id)
        with self.assertRaises(NotFound):
            await self.store.add_collaborator("nope", self.bob.id)

    async def test_delete_app_cascades(self) -> None:
        """Deleting an app removes its releases, config, formation, instances,
        domains, collaborators and deploys -- and nothing of other apps."""
        for name in ("gone", "stays"):
            await self.store.create_app(name, self.alice.id)
            await self.store.set_config(name, {"A": "1"})
            await self.store.create_release(name, DIGEST, processes={"web": "gunicorn"})
            await self.store.set_formation(name, "web", 2)
            await self.store.upsert_instance(Instance(f"{name}-i1", name, 1, "web", 1, "n1",
                                                      "127.0.0.1", 5000, "healthy", 1.0))
            await self.store.add_domain(name, f"{name}.example.com")
            await self.store.add_collaborator(name, self.bob.id)
            await self.store.create_deploy(name)
        await self.store.delete_app("gone")
        with self.assertRaises(NotFound):
            await self.store.get_app("gone")
        for table in ("releases", "config_vars", "formation", "instances", "domains",
                      "app_collaborators", "deploys"):
            rows = await self.raw(f"SELECT app FROM {table}")
            self.assertEqual({r[0] for r in rows}, {"stays"}, table)
        with self.assertRaises(NotFound):
            await self.store.delete_app("gone")

    # -------------------------------------------------------------- releases

    async def test_releases(self) -> None:
        """Versions count from 1 per app; unset fields inherit; newest first."""
        await self.store.create_app("rel", self.alice.id)
        await self.store.create_app("other", self.alice.id)
        self.assertIsNone(await self.store.latest_release("rel"))
        await self.store.set_config("rel", {"A": "1"})
        r1 = await self.store.create_release("rel", DIGEST, processes={"web": "gunicorn app"},
                                             description="deploy", created_by=self.alice.id)
        self.assertEqual((r1.version, r1.image, r1.config), (1, DIGEST, {"A": "1"}))
        await self.store.set_config("rel", {"B": "2"})
        r2 = await self.store.create_release("rel", description="config")
        self.assertEqual(r2.version, 2)
        self.assertEqual(r2.image, DIGEST)
        self.assertEqual(r2.processes, {"web": "gunicorn app"})
        self.assertEqual(r2.config, {"A": "1", "B": "2"})
        o1 = await self.store.create_release("other", DIGEST2)
        self.assertEqual(o1.version, 1)
        self.assertEqual(o1.processes, {})
        rb = await self.store.create_release("rel", r1.image, config=r1.config,
                                             processes=r1.processes, description="rollback to v1",
                                             meta={"rollback_of": 1})
        self.assertEqual(rb.version, 3)
        self.assertEqual(rb.config, {"A": "1"})
        self.assertEqual(await self.store.get_release("rel", 1), r1)
        self.assertEqual([r.version for r in await self.store.list_releases("rel")], [3, 2, 1])
        self.assertEqual([r.version for r in await self.store.list_releases("rel", 2)], [3, 2])
        self.assertEqual(await self.store.latest_release("rel"), rb)
        with self.assertRaises(NotFound):
            await self.store.get_release("rel", 9)
        with self.assertRaises(NotFound):
            await self.store.get_release("rel", 2**70)
        for bad in ["1", True, 1.0]:
            with self.assertRaises(InvalidValue):
                await self.store.get_release("rel", bad)  # type: ignore[arg-type]
        with self.assertRaises(NotFound):
            await self.store.create_release("nope", DIGEST)
        with self.assertRaises(InvalidValue):
            await self.store.create_release("rel", "not-a-digest")

    async def test_recent_by_app(self) -> None:
        """``recent_by_app`` gives each listed app what list_releases, list_deploys and
        list_collaborators give it alone (newest first, at most ``limit``; deploys
        without their log), in a few queries however many apps there are."""
        for name in ("one", "two", "idle"):
            await self.store.create_app(name, self.alice.id)
        for _ in range(3):
            await self.store.create_release("one", DIGEST)
        await self.store.create_release("two", DIGEST2)
        d1 = await self.store.create_deploy("one", status="deploying")
        await self.store.update_deploy(d1.id, status="succeeded", release=3, append_log="x")
        await self.store.create_deploy("two")
        await self.store.add_collaborator("two", self.bob.id)
        releases, deploys, collaborators = await self.store.recent_by_app(
            ["one", "two", "idle"], 2)
        self.assertEqual([r.version for r in releases["one"]], [3, 2])
        self.assertEqual(releases["one"], await self.store.list_releases("one", 2))
        self.assertEqual(releases["two"], await self.store.list_releases("two"))
        self.assertEqual(releases["idle"], [])
        self.assertEqual([(d.id, d.status, d.release, d.log) for d in deploys["one"]],
                         [(d1.id, "succeeded", 3, "")])
        self.assertEqual([d.id for d in deploys["two"]],
                         [d.id for d in await self.store.list_deploys("two")])
        self.assertEqual([u.name for u in collaborators["two"]], ["bob"])
        self.assertEqual(collaborators["one"], [])
        r, d, c = await self.store.recent_by_app(["two"], 200)
        self.assertEqual((list(r), list(d), list(c)), (["two"], ["two"], ["two"]))

    async def test_pass_inputs_by_app(self) -> None:
        """``pass_inputs_by_app`` gives each listed app the versions of its newest
        ``window + 1`` releases (no release JSON) and, of its newest ``window`` deploys,
        the failed and unfinished ones without their log; ``releases_by_version`` reads
        the releases asked for that exist, whole."""
        for name in ("one", "two", "idle"):
            await self.store.create_app(name, self.alice.id)
        for _ in range(4):
            await self.store.create_release("one", DIGEST)
        await self.store.create_release("two", DIGEST2, processes={"web": "run"})
        ok = await self.store.create_deploy("one", status="deploying")
        await self.store.update_deploy(ok.id, status="succeeded", release=2)
        bad = await self.store.create_deploy("one", status="deploying")
        await self.store.update_deploy(bad.id, status="failed", release=3, append_log="x")
        running = await self.store.create_deploy("one", status="deploying")
        await self.store.update_deploy(running.id, release=4)
        gone = await self.store.create_deploy("two", status="deploying")
        await self.store.update_deploy(gone.id, status="cancelled")
        versions, deploys = await self.store.pass_inputs_by_app(["one", "two", "idle"], 2)
        self.assertEqual(versions, {"one": [4, 3, 2], "two": [1], "idle": []})
        # of "one"'s newest two deploys (the running one, the failed one): both
        self.assertEqual([(d.id, d.status, d.release, d.log) for d in deploys["one"]],
                         [(running.id, "deploying", 4, ""), (bad.id, "failed", 3, "")])
        self.assertEqual(deploys["two"], [])
        _, deploys = await self.store.pass_inputs_by_app(["one"], 1)
        self.assertEqual([d.id for d in deploys["one"]], [running.id])
        got = await self.store.releases_by_version([("one", 3), ("two", 1), ("two", 9)])
        self.assertEqual(got, {("one", 3): await self.store.get_release("one", 3),
                               ("two", 1): await self.store.get_release("two", 1)})
        self.assertEqual(await self.store.releases_by_version([]), {})

    async def test_concurrent_releases_get_distinct_versions(self) -> None:
        """Releases created at the same time get distinct, consecutive versions."""
        from twisted.internet.defer import gatherResults

        await self.store.create_app("race", self.alice.id)
        other = await self.open()
        ds = [Store.create_release(s, "race", DIGEST) for s in [self.store, other] * 5]
        from twisted.internet.defer import Deferred

        rels = await gatherResults([Deferred.fromCoroutine(d) for d in ds])
        self.assertEqual(sorted(r.version for r in rels), list(range(1, 11)))

    # ---------------------------------------------------------------- config

    async def test_config(self) -> None:
        """Config vars are set, replaced, unset; names and values are validated."""
        await self.store.create_app("cfg", self.alice.id)
        self.assertEqual(await self.store.get_config("cfg"), {})
        self.assertEqual(await self.store.set_config("cfg", {"A": "1", "B": "x=y"}),
                         {"A": "1", "B": "x=y"})
        self.assertEqual(await self.store.set_config("cfg", {"A": "2", "B": None}), {"A": "2"})
        self.assertEqual(await self.store.unset_config("cfg", ["A", "MISSING"]), {})
        with self.assertRaises(InvalidName):
            await self.store.set_config("cfg", {"1BAD": "x"})
        with self.assertRaises(InvalidValue):
            await self.store.set_config("cfg", {"A": 1})  # type: ignore[dict-item]
        with self.assertRaises(NotFound):
            await self.store.get_config("nope")

    async def test_set_config_and_release_atomic(self) -> None:
        """Config change and its release happen together -- or not at all."""
        await self.store.create_app("atom", self.alice.id)
        await self.store.create_release("atom", DIGEST, processes={"web": "w"})
        cfg, rel = await self.store.set_config_and_release(
            "atom", {"A": "1"}, description="Set A", created_by="alice")
        self.assertEqual(cfg, {"A": "1"})
        self.assertEqual((rel.version, rel.config, rel.image, rel.processes),
                         (2, {"A": "1"}, DIGEST, {"web": "w"}))
        # make the release insert fail inside the transaction: v3 already exists
        await self.raw_write("INSERT INTO releases (app, version, image, config, processes,"
                             " description, created) VALUES ('atom', 3, NULL, '{}', '{}', 'x', 0)")
        with self.assertRaises(Conflict):
            await self.store.set_config_and_release("atom", {"A": "2", "B": "3"},
                                                    description="Set A, B")
        self.assertEqual(await self.store.get_config("atom"), {"A": "1"})
        with self.assertRaises(NotFound):
            await self.store.set_config_and_release("nope", {"A": "1"}, description="x")

    # ------------------------------------------------------------- formation

    async def test_formation(self) -> None:
        """Formation per process type is set, updated (keeping size/limits) and listed."""
        await self.store.create_app("form", self.alice.id)
        f = await self.store.set_formation("form", "web", 2, size="large", limits={"memory": 512})
        self.assertEqual((f.quantity, f.size, f.limits), (2, "large", {"memory": 512}))
        f2 = await self.store.set_formation("form", "web", 3)
        self.assertEqual((f2.quantity, f2.size, f2.limits), (3, "large", {"memory": 512}))
        await self.store.set_formation("form", "worker", 1)
        got = await self.store.get_formation("form")
        self.assertEqual(sorted(got), ["web", "worker"])
        self.assertEqual(got["web"], f2)
        self.assertEqual(got["worker"].size, "standard")
        await self.store.delete_formation("form", "worker")
        self.assertEqual(sorted(await self.store.get_formation("form")), ["web"])
        for bad in [-1, 1001, "2", True]:
            with self.assertRaises(InvalidValue):
                await self.store.set_formation("form", "web", bad)  # type: ignore[arg-type]
        with self.assertRaises(NotFound):
            await self.store.set_formation("nope", "web", 1)

    # ------------------------------------------------------------- instances

    async def test_instances(self) -> None:
        """Instances are upserted by id, listed by app/node, and deleted."""
        await self.store.create_app("inst", self.alice.id)
        i1 = Instance("i1", "inst", 1, "web", 1, "n1", "127.0.0.1", 5001, "starting", 10.0)
        i2 = Instance("i2", "inst", 1, "web", 2, "n2", "::1", 5002, "healthy", 11.0)
        await self.store.upsert_instance(i1)
        await self.store.upsert_instance(i2)
        i1b = Instance("i1", "inst", 1, "web", 1, "n1", "127.0.0.1", 5001, "healthy", 12.0, 1)
        await self.store.upsert_instance(i1b)
        self.assertEqual(await self.store.get_instance("i1"), i1b)
        self.assertEqual(await self.store.list_instances("inst"), [i1b, i2])
        self.assertEqual(await self.store.list_instances(node="n2"), [i2])
        i3 = Instance("i3", "inst", 2, "worker", 1, "n2", None, None, "pending", 13.0)
        await self.store.upsert_instances([i3, evolve(i2, state="draining")])
        self.assertEqual(await self.store.list_instances(node="n2"),
                         [evolve(i2, state="draining"), i3])
        self.assertTrue(await self.store.delete_instance("i3"))
        self.assertTrue(await self.store.delete_instance("i2"))
        self.assertFalse(await self.store.delete_instance("i2"))
        with self.assertRaises(InvalidValue):
            await self.store.upsert_instance(Instance("i3", "inst", 1, "web", 1, None, None,
                                                      None, "bogus", 0.0))
        with self.assertRaises(NotFound):
            await self.store.upsert_instance(Instance("i3", "nope", 1, "web", 1, None, None,
                                                      None, "pending", 0.0))

    # --------------------------------------------------------------- domains

    async def test_domains(self) -> None:
        """Hostnames are normalised, unique across apps (Conflict) and removable."""
        await self.store.create_app("dom", self.alice.id)
        await self.store.create_app("dom2", self.bob.id)
        d = await self.store.add_domain("dom", "WWW.Example.COM.")
        self.assertEqual((d.hostname, d.wildcard), ("www.example.com", False))
        w = await self.store.add_domain("dom", "*.apps.example.com")
        self.assertTrue(w.wildcard)
        with self.assertRaises(Conflict):
            await self.store.add_domain("dom2", "www.example.com")
        with self.assertRaises(Conflict):
            await self.store.add_domain("dom", "www.example.com")
        for bad in ["", "-a.com", "a..com", "*.com", "a.*.com", "x" * 64 + ".com", "a b.com"]:
            with self.assertRaises(InvalidName):
                await self.store.add_domain("dom", bad)
        self.assertEqual([x.hostname for x in await self.store.list_domains("dom")],
                         ["*.apps.example.com", "www.example.com"])
        self.assertEqual(await self.store.all_hostnames(),
                         {"*.apps.example.com": "dom", "www.example.com": "dom"})
        with self.assertRaises(NotFound):
            await self.store.remove_domain("dom2", "www.example.com")
        await self.store.remove_domain("dom", "www.example.com")
        await self.store.add_domain("dom2", "www.example.com")
        self.assertEqual(len(await self.store.list_domains()), 2)
        with self.assertRaises(NotFound):
            await self.store.add_domain("nope", "x.example.com")

    # ----------------------------------------------------------------- nodes

    async def test_nodes(self) -> None:
        """Node heartbeat facts are upserted and listed (optionally by role)."""
        n = await self.store.upsert_node("n1", ["runner", "lb"], "tcp://127.0.0.1:7731",
                                         "boot1", {"load": 0.5}, last_seen=100.0)
        self.assertEqual(n.roles, ("lb", "runner"))
        await self.store.upsert_node("n2", ["api"], boot_id="b2")
        n1b = await self.store.upsert_node("n1", ["runner"], "tcp://[::1]:7731", "boot2",
                                           {"load": 1.5}, last_seen=200.0)
        self.assertEqual(await self.store.get_node("n1"), n1b)
        self.assertEqual([x.id for x in await self.store.list_nodes()], ["n1", "n2"])
        self.assertEqual([x.id for x in await self.store.list_nodes(role="api")], ["n2"])
        self.assertTrue(await self.store.delete_node("n2"))
        with self.assertRaises(NotFound):
            await self.store.get_node("n2")

    # --------------------------------------------------------------- deploys

    async def test_deploys(self) -> None:
        """Deploys are created, updated (log appended, finished on final status), listed."""
        await self.store.create_app("dep", self.alice.id)
        d = await self.store.create_deploy("dep", created_by=self.alice.id, meta={"size": 10})
        self.assertEqual((d.status, d.finished, d.log), ("pending", None, ""))
        d = await self.store.update_deploy(d.id, status="building", append_log="line 1\n")
        d = await self.store.update_deploy(d.id, append_log="line 2\n", meta={"x": 1})
        self.assertEqual(d.log, "line 1\nline 2\n")
        self.assertEqual(d.meta, {"size": 10, "x": 1})
        self.assertIsNone(d.finished)
        d = await self.store.update_deploy(d.id, status="built", image=DIGEST)
        d = await self.store.update_deploy(d.id, status="deploying", release=1)
        d = await self.store.update_deploy(d.id, status="succeeded")
        self.assertIsNotNone(d.finished)
        self.assertEqual(await self.store.get_deploy(d.id), d)
        d2 = await self.store.create_deploy("dep")
        self.assertEqual({x.id for x in await self.store.list_deploys("dep")}, {d.id, d2.id})
        self.assertEqual(len(await self.store.list_deploys("dep", limit=1)), 1)
        with self.assertRaises(InvalidValue):
            await self.store.update_deploy(d.id, status="bogus")
        with self.assertRaises(NotFound):
            await self.store.update_deploy("nope", status="failed")
        with self.assertRaises(NotFound):
            await self.store.create_deploy("nope")

    async def test_deploy_state_machine(self) -> None:
        """A deploy moves only along DEPLOY_TRANSITIONS: it starts pending (an upload) or
        deploying (a config change, a rollback), never skips a step, and a final state
        never changes (a late writer that lost a race gets InvalidTransition)."""
        from epio.store import DEPLOY_FINAL, DEPLOY_STATES, DEPLOY_TRANSITIONS, InvalidTransition

        await self.store.create_app("sm", self.alice.id)
        self.assertEqual(set(DEPLOY_TRANSITIONS), set(DEPLOY_STATES))
        for final in DEPLOY_FINAL:
            self.assertEqual(DEPLOY_TRANSITIONS[final], frozenset())
        with self.assertRaises(InvalidTransition):
            await self.store.create_deploy("sm", "building")
        d = await self.store.create_deploy("sm")
        with self.assertRaises(InvalidTransition):
            await self.store.update_deploy(d.id, status="deploying")
        d = await self.store.update_deploy(d.id, status="building")
        d = await self.store.update_deploy(d.id, status="building", append_log="x\n")
        d = await self.store.update_deploy(d.id, status="failed", reason="r")
        for status in DEPLOY_STATES:
            if status != "failed":
                with self.assertRaises(InvalidTransition):
                    await self.store.update_deploy(d.id, status=status)
        self.assertEqual((await self.store.get_deploy(d.id)).status, "failed")
        r = await self.store.create_deploy("sm", "deploying")
        r = await self.store.update_deploy(r.id, status="cancelled")
        self.assertIsNotNone(r.finished)

    # ----------------------------------------------------------------- locks

    async def test_lock_contention(self) -> None:
        """Only one holder of a named lock at a time; release lets the other take it."""
        a = self.store.lock("scheduler-" + self.id())
        b = (await self.open()).lock("scheduler-" + self.id())
        self.addCleanup(a.release)  # type: ignore[attr-defined]
        self.addCleanup(b.release)  # type: ignore[attr-defined]
        self.assertTrue(await a.acquire())
        self.assertTrue(a.held)
        self.assertTrue(await a.acquire())  # already held
        self.assertFalse(await b.acquire())
        self.assertFalse(b.held)
        self.assertFalse(await b.acquire(block=True, timeout=0.3))
        self.assertTrue(await a.check())
        other = self.store.lock("cron-" + self.id())
        self.assertTrue(await other.acquire())  # a different name is independent
        await other.release()
        waiting = Deferred_from(b.acquire(block=True, timeout=10))
        await a.release()
        self.assertFalse(a.held)
        self.assertTrue(await waiting)
        self.assertTrue(b.held)
        self.assertFalse(await a.acquire())


def Deferred_from(coro: Any) -> Any:
    from twisted.internet.defer import Deferred

    return Deferred.fromCoroutine(coro)


class SqliteStoreTests(StoreTestsMixin, TestCase):
    """The store suite on SQLite (a fresh file in a temp dir)."""

    def url(self) -> str:
        return f"sqlite:///{self.mktemp()}/store.sqlite3"

    async def test_sqlite_pragmas(self) -> None:
        """The SQLite store runs in WAL mode with foreign keys enforced."""
        path = self.store_url[len("sqlite:///"):]
        conn = sqlite3.connect(path)
        self.addCleanup(conn.close)
        self.assertEqual(conn.execute("PRAGMA journal_mode").fetchone()[0], "wal")
        self.assertEqual((await self.raw("PRAGMA foreign_keys"))[0][0], 1)

    async def test_sqlite_files_private(self) -> None:
        """The database (config vars are secrets) and its WAL are readable by the owner only."""
        import os
        import stat

        await self.store.set_config_and_release(
            (await self.store.create_app("p", self.alice.id)).name, {"SECRET": "x"},
            description="x")
        path = self.store_url[len("sqlite:///"):]
        for suffix in ("", "-wal", "-shm"):
            mode = stat.S_IMODE(os.stat(path + suffix).st_mode)
            self.assertEqual(mode & 0o077, 0, f"{suffix or 'db'} mode {mode:o}")


class PostgresStoreTests(StoreTestsMixin, TestCase):
    """The store suite on PostgreSQL (a fresh schema in this run's fresh database)."""

    def url(self) -> str:
        return pg.pg_url_for_test(self)

    async def test_server_side_keepalives_keep_the_url_options(self) -> None:
        """Every store session asks the server for its own TCP keepalives and user
        timeout (a host that vanishes must not keep its sessions, and its advisory
        locks, for the kernel's two hours), and options the URL gives (here the test's
        search_path) still apply."""
        rows = await self.raw("SELECT current_setting('tcp_keepalives_idle'), "
                              "current_setting('tcp_keepalives_count'), "
                              "current_setting('tcp_user_timeout'), current_schema()")
        idle, count, user_timeout, schema = rows[0]
        self.assertEqual((idle, count, user_timeout), ("5", "3", "15000"))  # ms
        self.assertIn(f"search_path={schema}", urllib.parse.unquote(self.store_url))

    async def test_concurrent_first_start(self) -> None:
        """Several nodes migrating one empty database at once: each migration is
        applied exactly once and every node ends up with a working store."""
        from twisted.internet.defer import Deferred, gatherResults

        url = pg.pg_url_for_test(self)
        stores = await gatherResults(
            [Deferred.fromCoroutine(open_store(url, reactor)) for _ in range(4)])
        for s in stores:
            self.addCleanup(s.close)
        rows = await stores[0].backend.transaction(
            lambda tx: tx.execute("SELECT version FROM schema_version ORDER BY version"))
        self.assertEqual([r[0] for r in rows.rows], [m.version for m in MIGRATIONS])
        u = await stores[1].create_user("x")
        self.assertEqual((await stores[3].get_user(u.id)).name, "x")

    async def test_deadlock_retried(self) -> None:
        """Two transactions that deadlock: PostgreSQL aborts one, the backend runs it
        again, and both complete."""
        from twisted.internet.defer import Deferred, gatherResults

        other = await self.open()
        await self.store.create_app("d1", self.alice.id)
        await self.store.create_app("d2", self.alice.id)
        first_locked: list[Deferred[None]] = [Deferred(), Deferred()]
        committed: list[Deferred[None]] = [Deferred(), Deferred()]
        runs = [0, 0]

        def body(me: int, order: tuple[str, str]) -> Any:
            async def fn(tx: Any) -> None:
                runs[me] += 1
                if runs[me] > 1:
                    # the run again waits for the survivor's commit: left to race, it
                    # can deadlock with the survivor a second time, and PostgreSQL
                    # may then abort the survivor (both retried: a valid outcome,
                    # but not the one this test is about)
                    await committed[1 - me]
                await tx.execute("UPDATE apps SET release_seq = release_seq + 1 WHERE name = ?",
                                 (order[0],))
                if runs[me] == 1:
                    first_locked[me].callback(None)
                    await first_locked[1 - me]
                await tx.execute("UPDATE apps SET release_seq = release_seq + 1 WHERE name = ?",
                                 (order[1],))

            return fn

        def run(me: int, store: Store, order: tuple[str, str]) -> Deferred[None]:
            d = Deferred.fromCoroutine(store.backend.transaction(body(me, order)))
            d.addCallback(lambda _: committed[me].callback(None))
            return d

        await gatherResults([run(0, self.store, ("d1", "d2")), run(1, other, ("d2", "d1"))])
        self.assertEqual(sorted(runs), [1, 2])
        rows = await self.raw("SELECT release_seq FROM apps WHERE name IN ('d1', 'd2')")
        self.assertEqual([r[0] for r in rows], [2, 2])

    async def test_pool_recovers_after_connections_killed(self) -> None:
        """When the server drops every pooled connection (a PostgreSQL restart), the
        next calls work on fresh connections without an error."""
        import psycopg2

        for _ in range(3):
            await self.store.list_users()
        conn = psycopg2.connect(pg.run_database())
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE application_name = 'epio' AND datname = current_database() "
                        "AND pid <> pg_backend_pid()")
            killed = len(cur.fetchall())
        conn.close()
        self.assertGreaterEqual(killed, 1)
        from twisted.internet.task import deferLater

        await deferLater(reactor, 0.1, lambda: None)
        self.assertEqual([u.name for u in await self.store.list_users()], ["alice", "bob"])
        await self.store.create_app("after", self.alice.id)
