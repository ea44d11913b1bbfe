"""The run-session audit in the store (epio.store.runs), on SQLite and PostgreSQL."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from epio.store import InvalidValue, NotFound, Store, open_store
from epio.store.runs import (
    LimitReached,
    create_run,
    get_run,
    get_run_by_id,
    list_runs,
    update_run,
)
from tests.store import pg


class RunAuditMixin:
    store: Store

    def url(self) -> str:
        raise NotImplementedError

    async def setUp(self) -> None:  # type: ignore[override]
        self.store = await open_store(self.url(), reactor)
        self.addCleanup(self.store.close)  # type: ignore[attr-defined]
        user = await self.store.create_user("alice")
        await self.store.create_app("hello", user.id)
        await self.store.create_app("other", user.id)

    async def new(self, sid: str, app: str = "hello", **kw: object) -> object:
        args: dict[str, object] = dict(user="alice", command="python manage.py shell",
                                       kind="interactive", tty=True, node="n1", release=3)
        args.update(kw)
        return await create_run(self.store, sid, app, **args)  # type: ignore[arg-type]

    async def test_numbers_and_records(self) -> None:
        """Sessions are numbered 1, 2, ... per app and keep who, what, where, when."""
        a = await self.new("s1")
        b = await self.new("s2", kind="detached", tty=False)
        c = await self.new("s3", app="other")
        self.assertEqual([a.number, b.number, c.number], [1, 2, 1])  # type: ignore[attr-defined]
        rec = await get_run(self.store, "hello", 2)
        self.assertEqual((rec.id, rec.user, rec.kind, rec.tty, rec.node, rec.release,
                          rec.state), ("s2", "alice", "detached", False, "n1", 3, "starting"))
        self.assertEqual((await get_run_by_id(self.store, "s3")).app, "other")
        with self.assertRaises(NotFound):
            await get_run(self.store, "hello", 9)

    async def test_end_is_recorded_once(self) -> None:
        """The first final state wins: its time, exit status, signal and reason stay."""
        await self.new("s1")
        await update_run(self.store, "s1", state="running")
        done = await update_run(self.store, "s1", state="exited", ended=100.0, exit_status=0,
                                reason="done")
        self.assertEqual((done.state, done.ended, done.exit_status, done.reason),
                         ("exited", 100.0, 0, "done"))
        again = await update_run(self.store, "s1", state="lost", reason="late")
        self.assertEqual((again.state, again.reason), ("exited", "done"))
        with self.assertRaises(InvalidValue):
            await update_run(self.store, "s1", state="bogus")

    async def test_live_limit_and_listing(self) -> None:
        """max_live counts the app's live sessions only; lists are newest first."""
        await self.new("s1", max_live=2)
        await self.new("s2", max_live=2)
        with self.assertRaises(LimitReached):
            await self.new("s3", max_live=2)
        await self.new("o1", app="other", max_live=2)
        await update_run(self.store, "s1", state="exited", exit_status=1)
        await self.new("s4", max_live=2)
        self.assertEqual([r.id for r in await list_runs(self.store, "hello")],
                         ["s4", "s2", "s1"])
        self.assertEqual([r.id for r in await list_runs(self.store, "hello", live_only=True)],
                         ["s4", "s2"])

    async def test_rows_go_with_the_app(self) -> None:
        """Deleting the app deletes its audit rows."""
        await self.new("s1")
        await self.store.delete_app("hello")
        with self.assertRaises(NotFound):
            await get_run_by_id(self.store, "s1")


class SqliteRunAuditTests(RunAuditMixin, TestCase):
    def url(self) -> str:
        return f"sqlite:///{self.mktemp()}/store.sqlite3"


class PostgresRunAuditTests(RunAuditMixin, TestCase):
    def url(self) -> str:
        return pg.pg_url_for_test(self)
