"""The ``backup`` role: scheduled, verified, pull-only backups of app databases.

One backup node at a time runs the schedule (a store lock, ``backup-scheduler``);
any backup node answers ``backup.list/create/restore`` on its ROUTER.  Backups
live in ``backup.dir`` (0700): database servers and app processes hold no
credentials to it and cannot read it.  A backup counts only once verified.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from attrs import fields as attrs_fields
from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from epio.addons.postgres import SharedPostgres
from epio.backup import checks
from epio.backup.archive import (
    ArchiveFailed,
    ArchiveNotFetched,
    Archiver,
    load_key,
    object_name,
    s3_client,
)
from epio.backup.catalog import BackupNotFound, BackupRecord, Catalog, sha256_file
from epio.backup.postgres import BackupFailed, NotReady, PostgresBackups
from epio.backup.redis import RedisBackups
from epio.backup.targets import Target, dedicated_postgres_url, targets_for
from epio.bus import Bus, Envelope, RemoteError
from epio.config.settings import AddonsSettings, BackupSettings
from epio.retention import Candidate, RetentionPolicy, to_keep
from epio.store.store import Store

if TYPE_CHECKING:
    from epio.node import INodeReactor, Node

_T = TypeVar("_T")
_SAFE_ID = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$")  # as the catalog's: no path tricks


class BackupManager:
    """Runs backups, verification, pruning and restores against one catalog."""

    log = Logger()

    def __init__(self, reactor: Any, catalog: Catalog, policy: RetentionPolicy,
                 shared: SharedPostgres | None, postgres: PostgresBackups | None,
                 step_timeout: float = 3600.0, redis: RedisBackups | None = None,
                 archiver: Archiver | None = None,
                 archive_policy: RetentionPolicy | None = None) -> None:
        self.reactor = reactor
        self.catalog = catalog
        self.policy = policy
        self.shared = shared
        self.postgres = postgres
        self.redis = redis if redis is not None else RedisBackups(reactor)
        self.step_timeout = step_timeout
        self.archiver = archiver
        self.archive_policy = archive_policy if archive_policy is not None else policy
        self.counters = {"ok": 0, "failed": 0, "pruned": 0, "flagged": 0, "start_retries": 0}

    def _new_id(self) -> str:
        t = self.reactor.seconds()
        return f"{int(t):010d}-{secrets.token_hex(3)}"

    async def _timed(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """One step under ``backup.step_timeout``: on expiry the step is cancelled (its
        child processes' groups are killed, see :mod:`epio.backup.proc`) and fails."""
        d = Deferred.fromCoroutine(coro)
        d.addTimeout(self.step_timeout, self.reactor)
        try:
            return await d
        except (TimeoutError, DeferredTimeout):
            raise BackupFailed(f"timed out after {self.step_timeout:g}s "
                               "(backup.step_timeout)") from None

    async def _sha256(self, path: Path) -> str:
        """The file's sha256, computed in a thread (dumps are large: never on the reactor)."""
        digest: str = await deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                              sha256_file, path)
        return digest

    async def backup_postgres(self, app: str) -> BackupRecord:
        """Dump, checksum, verify and record one app database; never raises."""
        from epio.addons import db_identifier

        not_ready = await self._wait_accepting(
            Target(app, "postgres", "shared", database=db_identifier(app)))
        record = BackupRecord(id=self._new_id(), app=app, kind="postgres",
                              created=self.reactor.seconds(), source=db_identifier(app))
        path = self.catalog.create(record)
        try:
            if not_ready:
                raise BackupFailed(not_ready)
            if self.postgres is None:
                raise BackupFailed("the postgres add-on is not configured on this node")
            record.counts = await self._timed(self.postgres.dump(record.source, path))
            record.size = path.stat().st_size
            record.sha256 = await self._sha256(path)
            await self._timed(self.postgres.verify(path, record.counts))
            if await self._sha256(path) != record.sha256:
                raise BackupFailed("the archive changed during verification")
            record.status = "verified"
            self.counters["ok"] += 1
            self.log.info("backup {id} of {app} verified ({size} bytes)", id=record.id,
                          app=app, size=record.size)
            self._flag(record)
        except CancelledError:
            self._drop_cancelled(record)
            raise
        except Exception as e:
            record.status = "failed"
            record.error = str(e) if isinstance(e, BackupFailed) else f"{type(e).__name__}"
            self.counters["failed"] += 1
            self.log.error("backup {id} of {app} FAILED: {error}", id=record.id, app=app,
                           error=record.error)
        record.finished = self.reactor.seconds()
        self.catalog.save(record)
        await self._archive(record)
        return record

    def _postgres_for(self, target: Target) -> PostgresBackups:
        if target.plan == "dedicated":
            return PostgresBackups(self.reactor, dedicated_postgres_url(target))
        if self.postgres is None:
            raise BackupFailed("the postgres add-on is not configured on this node")
        return self.postgres

    async def backup(self, target: Target) -> BackupRecord:
        """Back up one add-on (shared/dedicated PostgreSQL or Redis); never raises.

        The record is ``verified`` only after the copy was restored/loaded and
        checked; anything else leaves it ``failed`` with the reason.
        """
        if target.kind == "postgres" and target.plan == "shared":
            return await self.backup_postgres(target.app)
        not_ready = await self._wait_accepting(target)
        record = BackupRecord(id=self._new_id(), app=target.app, kind=target.kind,
                              created=self.reactor.seconds(), source=target.describe())
        path = self.catalog.create(record)
        try:
            if not_ready:
                raise BackupFailed(not_ready)
            if target.kind == "postgres":
                tool = self._postgres_for(target)
                record.counts = await self._timed(tool.dump(str(target.database), path))
                record.size = path.stat().st_size
                record.sha256 = await self._sha256(path)
                await self._timed(tool.verify(path, record.counts))
            else:
                assert target.host is not None and target.port is not None
                record.counts = await self._timed(
                    self.redis.dump(target.host, target.port, target.password, path))
                record.size = path.stat().st_size
                record.sha256 = await self._sha256(path)
                await self._timed(self.redis.verify(path, record.counts))
            if await self._sha256(path) != record.sha256:
                raise BackupFailed("the file changed during verification")
            record.status = "verified"
            self.counters["ok"] += 1
            self.log.info("backup {id} of {app} ({kind}) verified ({size} bytes)", id=record.id,
                          app=target.app, kind=target.kind, size=record.size)
            self._flag(record)
        except CancelledError:
            self._drop_cancelled(record)
            raise
        except Exception as e:
            record.status = "failed"
            record.error = str(e) if isinstance(e, BackupFailed) else f"{type(e).__name__}"
            self.counters["failed"] += 1
            self.log.error("backup {id} of {app} ({kind}) FAILED: {error}", id=record.id,
                           app=target.app, kind=target.kind, error=record.error)
        record.finished = self.reactor.seconds()
        self.catalog.save(record)
        await self._archive(record)
        return record

    async def _archive(self, record: BackupRecord) -> None:
        """Copy a verified backup offsite (to each archive target configured) and record
        how that went; a failed archive leaves the backup verified."""
        if self.archiver is None or not record.good:
            return
        await self.archiver.archive(record, self.catalog.data_path(record),
                                    self.catalog.dir_for(record))
        self.catalog.save(record)

    async def archive_history(self, app: str, kind: str) -> int:
        """Archive the verified backups of ``app``/``kind`` still here that a configured
        archive target does not hold -- taken before the target was configured (the
        history is archived too), or whose archive failed -- oldest first.  Stops at the
        first that fails (the offsite store is still down: the next round tries again).
        Returns how many were archived."""
        if self.archiver is None:
            return 0
        targets = set(self.archiver.targets)
        waiting = [r for r in self.catalog.list(app, kind)
                   if r.good and r.local and not targets <= set(r.held_by())]
        done = 0
        for record in reversed(waiting):
            await self._archive(record)
            if record.archive != "archived":
                break
            done += 1
        return done

    async def restorable(self, app: str, backup_id: str) -> BackupRecord:
        """The record of backup ``backup_id`` with its data on disk: fetched from its
        archive when the local copy was pruned, or the catalog lost it (a wiped disk)."""
        try:
            record = self.catalog.get(backup_id, app)
        except BackupNotFound:
            if self.archiver is None:
                raise
            return await self._from_archive(app, backup_id, None)
        if (record.good and record.offsite and self.archiver is not None
                and not self.catalog.data_path(record).exists()):
            return await self._from_archive(app, backup_id, record)
        return record

    async def _from_archive(self, app: str, backup_id: str,
                            known: BackupRecord | None) -> BackupRecord:
        assert self.archiver is not None
        if not _SAFE_ID.match(app) or not _SAFE_ID.match(backup_id):
            raise BackupNotFound(f"no backup {backup_id}")
        spool = self.catalog.root / ".fetch"
        self.catalog.ensure()
        spool.mkdir(mode=0o700, exist_ok=True)
        tmp = spool / f"{app}-{backup_id}-{secrets.token_hex(4)}"  # fetches may overlap
        try:
            fetched = await self._timed(self.archiver.fetch(app, backup_id, tmp, known,
                                                            retry=known is not None))
        except ArchiveNotFetched as e:
            if known is None:
                raise BackupNotFound(f"no backup {backup_id} here nor in the archive "
                                     f"({e})") from None
            raise BackupFailed(str(e)) from None
        except ArchiveFailed as e:
            raise BackupFailed(str(e)) from None
        if known is not None:
            record = known
        else:
            names = {f.name for f in attrs_fields(BackupRecord)}
            record = BackupRecord(**{k: v for k, v in fetched.record.items() if k in names})
            name = object_name(app, backup_id)
            record.archive, record.archive_name = "archived", name
            record.archive_sha256 = fetched.sha256
            record.copies = {fetched.target: {
                "state": "archived", "where": self.archiver.where(fetched.target, name),
                "error": "", "tries": 0, "sha256": fetched.sha256, "at": record.archived}}
        record.local = True
        path = self.catalog.adopt(record)
        os.replace(tmp, path)
        self.catalog.save(record)
        self.log.info("backup {id} of {app} fetched from its archive", id=backup_id, app=app)
        return record

    def _drop_cancelled(self, record: BackupRecord) -> None:
        """A backup cancelled by a clean stop of the node is not a backup: no record."""
        self.catalog.delete(record)
        self.log.info("backup {id} of {app} ({kind}) cancelled by the node's stop; not "
                      "recorded", id=record.id, app=record.app, kind=record.kind)

    def _flag(self, record: BackupRecord) -> None:
        """Flag a verified backup that is suspicious next to the last good one."""
        last_good = next((r for r in self.catalog.list(record.app, record.kind)
                          if r.id != record.id and r.counts_in_history), None)
        record.suspicious = checks.suspicion(record.kind, record.counts, record.size, last_good)
        if record.suspicious:
            self.counters["flagged"] += 1
            self.log.warn("backup {id} of {app} ({kind}) is FLAGGED, kept apart from the "
                          "history: {why}", id=record.id, app=record.app, kind=record.kind,
                          why=record.suspicious)

    async def _probe(self, target: Target) -> None:
        """Return once ``target`` accepts connections (raises BackupFailed if not)."""
        if target.kind == "redis":
            assert target.host is not None and target.port is not None
            await self.redis.key_count(target.host, target.port, target.password)
            return
        if target.plan == "dedicated":
            await self._postgres_for(target).ping(str(target.database))
        elif self.postgres is not None:
            await self.postgres.ping(str(target.database))

    async def _wait_accepting(self, target: Target) -> str:
        """Wait until the database accepts connections: while it is not ready yet
        (:class:`NotReady`, or a probe unanswered for ``checks.START_PROBE_TIMEOUT``)
        probes again with a backoff from ``checks.START_RETRY_INITIAL`` s, doubling,
        capped at ``START_RETRY_MAX``, for at most ``START_TIMEOUT`` s.  "" when it
        accepts; otherwise why the backup cannot start (at once for any other failure:
        no such database, a refused password), then recorded once as failed."""
        start = self.reactor.seconds()
        delay = checks.START_RETRY_INITIAL
        while True:
            try:
                d = Deferred.fromCoroutine(self._probe(target))
                d.addTimeout(checks.START_PROBE_TIMEOUT, self.reactor)
                await d
                return ""
            except CancelledError:
                raise
            except (TimeoutError, DeferredTimeout):
                why = f"no answer within {checks.START_PROBE_TIMEOUT:g}s"
            except NotReady as e:
                why = str(e)
            except BackupFailed as e:
                return str(e)  # no such database, a refused password: waiting won't help
            waited = self.reactor.seconds() - start
            if waited + delay > checks.START_TIMEOUT:
                return (f"{target.describe()} did not accept connections within "
                        f"{checks.START_TIMEOUT:g}s: {why}")
            if waited == 0:
                self.log.info("backup of {app} ({kind}) waits until {where} accepts "
                              "connections: {why}", app=target.app, kind=target.kind,
                              where=target.describe(), why=why)
            self.counters["start_retries"] += 1
            await deferLater(self.reactor, delay, lambda: None)
            delay = min(delay * 2, checks.START_RETRY_MAX)

    def recover_interrupted(self) -> int:
        """Mark backups left ``running`` by a previous process as failed (interrupted).

        Called when the node starts: nothing of this catalog runs yet, so any
        ``running`` record is one whose process died mid-backup.
        """
        n = 0
        for r in self.catalog.list():
            if r.status == "running":
                r.status, r.error, r.finished = "failed", "interrupted", self.reactor.seconds()
                self.catalog.save(r)
                n += 1
        return n

    def prune(self, app: str, kind: str) -> int:
        """Apply the local retention: a backup it drops is deleted, but one that is
        archived keeps its record (``local`` False) for the archive retention
        (:meth:`prune_archives`) and can still be restored from the archive."""
        records = [r for r in self.catalog.list(app, kind) if r.local]
        keep = to_keep(
            [Candidate(r.id, r.created, r.counts_in_history, r.good, bool(r.pinned))
             for r in records if r.status != "running"],
            self.reactor.seconds(), self.policy,
        )
        gone = 0
        for r in records:
            if r.status != "running" and r.id not in keep:
                if r.offsite:
                    self.catalog.drop_data(r)
                else:
                    self.catalog.delete(r)
                gone += 1
        self.counters["pruned"] += gone
        return gone

    async def prune_archives(self, app: str, kind: str) -> int:
        """Apply the archive retention (``backup.archive_*``) to archived backups whose
        local copy is gone: each one it drops is deleted from every target holding it
        (``backup.archive_delete_command``; the S3 object), then forgotten here."""
        if self.archiver is None:
            return 0
        archived = [r for r in self.catalog.list(app, kind) if r.offsite]
        keep = to_keep(
            [Candidate(r.id, r.created, r.counts_in_history, r.good, bool(r.pinned))
             for r in archived],
            self.reactor.seconds(), self.archive_policy,
        )
        gone = 0
        for r in archived:
            if (not r.local and r.id not in keep
                    and await self.archiver.delete(r.app, r.id, r)):
                self.catalog.delete(r)
                gone += 1
        return gone

    async def restore(self, app: str, backup_id: str, to_app: str | None = None,
                      target: Target | None = None) -> str:
        """Restore a verified backup into the app's (or ``to_app``'s) live add-on.

        ``target`` is where to restore (from the store's add-ons); None means the
        shared PostgreSQL database of ``to_app or app``.  PostgreSQL: returns the
        name the previous live database was kept under.  Redis: the key count.
        """
        from epio.addons import db_identifier

        record = await self.restorable(app, backup_id)
        if not record.good:
            raise BackupFailed(f"backup {backup_id} is not verified ({record.status}); refusing")
        path = self.catalog.data_path(record)
        if await self._sha256(path) != record.sha256:
            raise BackupFailed("checksum mismatch: the backup file was altered; refusing")
        if target is not None and target.kind != record.kind:
            raise BackupFailed(f"backup {backup_id} is a {record.kind} backup; the target "
                               f"is {target.kind}")
        stamp = f"{int(self.reactor.seconds())}"
        if record.kind == "redis":
            if target is None or target.host is None or target.port is None:
                raise BackupFailed(f"{to_app or app} has no redis add-on to restore into")
            # the previous data is kept -- as a PostgreSQL restore keeps <db>_pre_<stamp>:
            # a verified backup of the live server first, pinned for backup.failed_ttl
            before = await self.backup(target)
            if not before.good:
                raise BackupFailed(f"the live data of {target.app} could not be backed up "
                                   f"before the restore ({before.error}); nothing was changed")
            before.pinned = f"the data before restoring backup {backup_id}"
            self.catalog.save(before)
            keys = await self._timed(self.redis.restore(path, target.host, target.port,
                                                        target.password))
            self.log.info("restored redis backup {id} into {app} ({keys} keys); the previous "
                          "data is backup {before}", id=backup_id, app=target.app, keys=keys,
                          before=before.id)
            return f"backup {before.id} ({keys} keys restored)"
        if target is not None and target.plan == "dedicated":
            tool = self._postgres_for(target)
            assert target.database is not None and target.user is not None
            return await self._timed(tool.restore(path, target.database, target.user, stamp))
        if self.postgres is None:
            raise BackupFailed("the postgres add-on is not configured on this node")
        name = db_identifier(to_app or app)
        return await self._timed(self.postgres.restore(path, name, name, stamp))

    def read_chunk(self, app: str, backup_id: str, offset: int, size: int) -> dict[str, Any]:
        """One chunk of a backup's file (for downloads), with its recorded checksum."""
        record = self.catalog.get(backup_id, app)
        if record.status == "running":
            raise BackupFailed(f"backup {backup_id} is still running")
        path = self.catalog.data_path(record)
        try:
            total = path.stat().st_size
            with open(path, "rb") as f:
                f.seek(max(0, offset))
                data = f.read(size)
        except OSError:
            raise BackupNotFound(f"backup {backup_id} has no data file") from None
        return {"id": backup_id, "offset": offset, "size": total, "data": data,
                "eof": offset + len(data) >= total, "sha256": record.sha256,
                "status": record.status}


class BackupService(MultiService):
    """The backup role's service tree: scheduler (when leader) and ROUTER.

    Built by :func:`make_service` from the node's ``[backup]`` and ``[addons]``
    settings.  The scheduler's lifecycle is two facts, each held in one place:
    leader or not (``_timer``: the round timer exists only while this node holds
    the ``backup-scheduler`` lock) and a round running or not (``_round``)::

                    elected (timer started)
        follower  ------------------------->  leader, idle
           ^                                  |    ^
           | lost (timer stopped; a running   |    | round done
           | round goes on to its end)        v    |
           +--------------------------  leader, round running
                                              |
        stop (from any state): the running round is cancelled; its backup is
        dropped, not recorded failed (the next leader's round takes it)

    A timer tick while a round runs (a leader lost and elected again before its
    round ended) starts no second round.
    """

    log = Logger()

    def __init__(self, reactor: INodeReactor, settings: BackupSettings,
                 addons: AddonsSettings, data_dir: Path, bus: Bus,
                 get_store: Callable[[], Awaitable[Store]],
                 archiver: Archiver | None = None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        self.reactor = reactor
        self._get_store = get_store
        root = Path(settings.dir or data_dir / "backups")
        shared = postgres = None
        if addons.postgres_admin_url:
            shared = SharedPostgres(reactor, addons.postgres_admin_url,
                                    addons.postgres_host or None,
                                    addons.postgres_port or None)
            postgres = PostgresBackups(reactor, addons.postgres_admin_url)
        policy = RetentionPolicy(settings.hourly, settings.daily, settings.weekly,
                                 settings.monthly, settings.failed_ttl)
        archive_policy = RetentionPolicy(settings.archive_hourly, settings.archive_daily,
                                         settings.archive_weekly, settings.archive_monthly,
                                         settings.failed_ttl)
        self.manager = BackupManager(reactor, Catalog(root), policy, shared, postgres,
                                     settings.step_timeout, archiver=archiver,
                                     archive_policy=archive_policy)
        self.interval = settings.interval
        self.chunk = settings.chunk_kb * 1024
        self._timer: TimerService | None = None
        self._round: Deferred[list[BackupRecord]] | None = None
        router = bus.router(settings.control_bind, self.handle)
        router.setServiceParent(self)  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated

    def startService(self) -> None:
        self.manager.catalog.ensure()
        # archives half-fetched when the last process stopped
        shutil.rmtree(self.manager.catalog.root / ".fetch", ignore_errors=True)
        interrupted = self.manager.recover_interrupted()
        if interrupted:
            self.log.warn("backup: {n} backups were interrupted by the last stop; marked failed",
                          n=interrupted)
        if self.manager.shared is None:
            self.log.warn("backup: addons.postgres_admin_url is empty; only dedicated "
                          "databases and Redis are backed up")
        super().startService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        ensureDeferred(self._start_leader()).addErrback(
            lambda f: self.log.failure("backup scheduler did not start", f))

    async def _start_leader(self) -> None:
        from epio.store.locks import LeaderService

        store = await self._get_store()
        leader = LeaderService(store, "backup-scheduler", self._elected, self._lost,
                               clock=self.reactor)
        leader.setServiceParent(self)  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated

    def _elected(self) -> None:
        self._timer = TimerService(self.interval, self._round_now)
        self._timer.clock = self.reactor
        self._timer.startService()

    def _lost(self) -> Deferred[None] | None:
        if self._timer is not None:
            timer, self._timer = self._timer, None
            stopped: Deferred[None] | None = timer.stopService()
            return stopped
        return None

    def _round_now(self) -> Deferred[Any]:
        if self._round is not None:
            return succeed(None)  # the round of an earlier leadership is still running
        d = self._round = ensureDeferred(self.run_round())

        def done(result: Any) -> Any:
            if self._round is d:
                self._round = None
            return result

        d.addBoth(done)
        d.addErrback(lambda f: f.trap(CancelledError))
        d.addErrback(lambda f: self.log.failure("backup round failed", f))
        return d

    def stopService(self) -> Deferred[None]:
        """A clean stop cancels the running round: its current backup (its tools are
        killed) is dropped, not recorded as failed; the next leader's round takes it."""
        if self._round is not None:
            self._round.cancel()
        stopped: Deferred[None] = super().stopService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        archiver = self.manager.archiver
        if archiver is not None and archiver.s3 is not None:
            s3 = archiver.s3
            stopped.addBoth(lambda result: s3.close().addCallback(lambda _: result))
        return stopped

    async def run_round(self) -> list[BackupRecord]:
        """Back up every add-on database of every app, then prune."""
        done = []
        pruned = 0
        store = await self._get_store()
        for app in await store.list_apps():
            try:
                targets = await targets_for(store, app.name, shared=self.manager.shared,
                                            down_too=True)
            except Exception as e:
                self.log.error("backup: cannot list the databases of {app}: {error}",
                               app=app.name, error=str(e) or type(e).__name__)
                continue
            for target in targets:
                made = await self.manager.backup(target)
                done.append(made)
                if made.offsite:  # an offsite store answers: catch up
                    await self.manager.archive_history(app.name, target.kind)
                pruned += self.manager.prune(app.name, target.kind)
                pruned += await self.manager.prune_archives(app.name, target.kind)
        self.log.info("backup round done: {made} backed up, {pruned} pruned",
                      made=len(done), pruned=pruned)
        return done

    async def handle(self, env: Envelope) -> tuple[str, dict[str, Any]]:
        try:
            return await self._handle(env)
        except (BackupFailed, BackupNotFound) as e:
            raise RemoteError(e.code, str(e)) from None

    async def _handle(self, env: Envelope) -> tuple[str, dict[str, Any]]:
        body = env.body
        app = body["app"]
        if env.type == "backup.list":
            records = self.manager.catalog.list(app, body.get("kind"))
            return "backup.listing", {"backups": [r.to_json() for r in records]}
        if env.type == "backup.create":
            store = await self._get_store()
            targets = await targets_for(store, app, body.get("kind"), shared=self.manager.shared)
            if not targets:
                raise BackupNotFound(f"app {app} has no database to back up")
            made = []
            for target in targets:
                made.append(await self.manager.backup(target))
                self.manager.prune(app, target.kind)
                await self.manager.prune_archives(app, target.kind)
            return "backup.created", {"backups": [r.to_json() for r in made]}
        if env.type == "backup.restore":
            record = await self.manager.restorable(app, body["id"])
            store = await self._get_store()
            into = body.get("to_app") or app
            found = await targets_for(store, into, record.kind, shared=self.manager.shared)
            if not found:
                raise BackupFailed(f"{into} has no {record.kind} database to restore into")
            kept = await self.manager.restore(app, body["id"], body.get("to_app"), found[0])
            return "backup.restored", {"app": app, "id": body["id"], "kept_as": kept}
        if env.type == "backup.adopt":
            return "backup.adopted", {"backup": (await self.manager.restorable(
                app, body["id"])).to_json()}
        if env.type == "backup.fetch":
            if int(body["offset"]) == 0:  # a download of an archived-only backup fetches it
                await self.manager.restorable(app, body["id"])
            return "backup.chunk", self.manager.read_chunk(app, body["id"],
                                                           int(body["offset"]), self.chunk)
        raise ValueError(f"unexpected message {env.type}")


def make_service(node: Node) -> BackupService:
    """The backup role of ``node``: its composition root."""
    store_service = node.store_service

    async def get_store() -> Store:
        if store_service is None:
            raise RuntimeError("this node has no store service")
        return await store_service.whenReady()

    settings = node.settings.backup
    archiver = None
    if settings.archive_command or settings.archive_s3_endpoint:
        try:
            key = load_key(Path(settings.archive_key_file))
            s3 = s3_client(node.reactor, settings) if settings.archive_s3_endpoint else None
        except OSError as e:
            raise SystemExit(f"epio: cannot read {e.filename}: {e.strerror}") from None
        except ArchiveFailed as e:
            raise SystemExit(f"epio: {e}") from None
        archiver = Archiver(node.reactor, key,
                            settings.archive_command, settings.fetch_command,
                            settings.archive_delete_command, settings.archive_retries,
                            settings.archive_retry_initial, settings.archive_retry_max,
                            settings.step_timeout, s3=s3)
    return BackupService(node.reactor, settings, node.settings.addons, node.data_dir,
                         node.bus, get_store, archiver)
