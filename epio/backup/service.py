"""The ``backup`` role: scheduled, verified, pull-only backups of app databases.

One backup node at a time runs the schedule (a store lock, ``backup-scheduler``);
any backup node answers ``backup.list/create/restore`` on its ROUTER.  Backups
live in ``backup.dir`` (0700): database servers and app processes hold no
credentials to it and cannot read it.  A backup counts only once verified.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger

from epio.addons.postgres import SharedPostgres
from epio.backup.catalog import BackupNotFound, BackupRecord, Catalog
from epio.backup.postgres import BackupFailed, PostgresBackups
from epio.backup.retention import Candidate, RetentionPolicy, to_keep


class BackupManager:
    """Runs backups, verification, pruning and restores against one catalog."""

    log = Logger()

    def __init__(self, reactor: Any, catalog: Catalog, policy: RetentionPolicy,
                 shared: SharedPostgres | None, postgres: PostgresBackups | None,
                 step_timeout: float = 3600.0) -> None:
        self.reactor = reactor
        self.catalog = catalog
        self.policy = policy
        self.shared = shared
        self.postgres = postgres
        self.step_timeout = step_timeout
        self.counters = {"ok": 0, "failed": 0, "pruned": 0}

    def _new_id(self) -> str:
        t = self.reactor.seconds()
        return f"{int(t):010d}-{secrets.token_hex(3)}"

    async def _timed(self, coro: Any) -> Any:
        d = Deferred.fromCoroutine(coro)
        d.addTimeout(self.step_timeout, self.reactor)
        return await d

    async def backup_postgres(self, app: str) -> BackupRecord:
        """Dump, checksum, verify and record one app database; never raises."""
        from epio.addons import db_identifier
        from epio.backup.catalog import sha256_file

        record = BackupRecord(id=self._new_id(), app=app, kind="postgres",
                              created=self.reactor.seconds(), source=db_identifier(app))
        path = self.catalog.create(record)
        try:
            if self.postgres is None:
                raise BackupFailed("the postgres add-on is not configured on this node")
            record.counts = await self._timed(self.postgres.dump(record.source, path))
            record.size = path.stat().st_size
            record.sha256 = sha256_file(path)
            await self._timed(self.postgres.verify(path, record.counts))
            if sha256_file(path) != record.sha256:
                raise BackupFailed("the archive changed during verification")
            record.status = "verified"
            self.counters["ok"] += 1
            self.log.info("backup {id} of {app} verified ({size} bytes)", id=record.id,
                          app=app, size=record.size)
        except Exception as e:
            record.status = "failed"
            record.error = str(e) if isinstance(e, BackupFailed) else f"{type(e).__name__}"
            self.counters["failed"] += 1
            self.log.error("backup {id} of {app} FAILED: {error}", id=record.id, app=app,
                           error=record.error)
        record.finished = self.reactor.seconds()
        self.catalog.save(record)
        return record

    async def verify_again(self, record: BackupRecord) -> BackupRecord:
        """Re-check an existing backup's checksum and restorability."""
        from epio.backup.catalog import sha256_file

        path = self.catalog.data_path(record)
        try:
            if sha256_file(path) != record.sha256:
                raise BackupFailed("checksum mismatch: the backup file was altered")
            assert self.postgres is not None
            await self._timed(self.postgres.verify(path, record.counts))
            record.status = "verified"
        except Exception as e:
            record.status = "failed"
            record.error = str(e) if isinstance(e, BackupFailed) else type(e).__name__
        self.catalog.save(record)
        return record

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
        records = self.catalog.list(app, kind)
        keep = to_keep(
            [Candidate(r.id, r.created, r.good) for r in records if r.status != "running"],
            self.reactor.seconds(), self.policy,
        )
        gone = 0
        for r in records:
            if r.status != "running" and r.id not in keep:
                self.catalog.delete(r)
                gone += 1
        self.counters["pruned"] += gone
        return gone

    async def restore(self, app: str, backup_id: str, to_app: str | None = None) -> str:
        from epio.addons import db_identifier
        from epio.backup.catalog import sha256_file

        record = self.catalog.get(backup_id, app)
        if not record.good:
            raise BackupFailed(f"backup {backup_id} is not verified ({record.status}); refusing")
        path = self.catalog.data_path(record)
        if sha256_file(path) != record.sha256:
            raise BackupFailed("checksum mismatch: the backup file was altered; refusing")
        if self.postgres is None:
            raise BackupFailed("the postgres add-on is not configured on this node")
        target = db_identifier(to_app or app)
        stamp = f"{int(self.reactor.seconds())}"
        return await self._timed(self.postgres.restore(path, target, target, stamp))


class BackupService(MultiService):
    """The backup role's service tree: scheduler (when leader) and ROUTER."""

    log = Logger()

    def __init__(self, node: Any) -> None:
        super().__init__()
        self.node = node
        cfg = node.config["backup"]
        addons = node.config["addons"]
        root = Path(cfg["dir"] or node.data_dir / "backups")
        shared = postgres = None
        if addons["postgres_admin_url"]:
            shared = SharedPostgres(node.reactor, addons["postgres_admin_url"],
                                    addons["postgres_host"] or None,
                                    addons["postgres_port"] or None)
            postgres = PostgresBackups(node.reactor, addons["postgres_admin_url"])
        policy = RetentionPolicy(cfg["hourly"], cfg["daily"], cfg["weekly"], cfg["monthly"],
                                 cfg["failed_ttl"])
        self.manager = BackupManager(node.reactor, Catalog(root), policy, shared, postgres,
                                     cfg["step_timeout"])
        self.interval = cfg["interval"]
        self._timer: TimerService | None = None
        self._running_round = False
        router = node.bus.router(cfg["control_bind"], self.handle)
        router.setServiceParent(self)

    def startService(self) -> None:
        self.manager.catalog.ensure()
        interrupted = self.manager.recover_interrupted()
        if interrupted:
            self.log.warn("backup: {n} backups were interrupted by the last stop; marked failed",
                          n=interrupted)
        if self.manager.shared is None:
            self.log.warn("backup: addons.postgres_admin_url is empty; no database to back up")
        super().startService()
        ensureDeferred(self._start_leader()).addErrback(
            lambda f: self.log.failure("backup scheduler did not start", f))

    async def _start_leader(self) -> None:
        from epio.store.locks import LeaderService

        store = await self.node.store_service.whenReady()
        leader = LeaderService(store, "backup-scheduler", self._elected, self._lost,
                               clock=self.node.reactor)
        leader.setServiceParent(self)

    def _elected(self) -> None:
        self._timer = TimerService(self.interval, self._round_now)
        self._timer.clock = self.node.reactor
        self._timer.startService()

    def _lost(self) -> Any:
        if self._timer is not None:
            timer, self._timer = self._timer, None
            return timer.stopService()
        return None

    def _round_now(self) -> Deferred[None]:
        return ensureDeferred(self.run_round()).addErrback(
            lambda f: self.log.failure("backup round failed", f))

    async def run_round(self) -> list[BackupRecord]:
        """Back up every app that has a shared database, then prune."""
        if self._running_round or self.manager.shared is None:
            return []
        self._running_round = True
        done = []
        try:
            store = await self.node.store_service.whenReady()
            for app in await store.list_apps():
                if await self.manager.shared.exists(app.name):
                    done.append(await self.manager.backup_postgres(app.name))
                    self.manager.prune(app.name, "postgres")
        finally:
            self._running_round = False
        return done

    async def handle(self, env: Any) -> tuple[str, dict]:
        from epio.bus import RemoteError

        try:
            return await self._handle(env)
        except (BackupFailed, BackupNotFound) as e:
            raise RemoteError(e.code, str(e)) from None

    async def _handle(self, env: Any) -> tuple[str, dict]:
        body = env.body
        app = body["app"]
        if env.type == "backup.list":
            records = self.manager.catalog.list(app, body.get("kind"))
            return "backup.listing", {"backups": [r.to_json() for r in records]}
        if env.type == "backup.create":
            if self.manager.shared is None or not await self.manager.shared.exists(app):
                raise BackupNotFound(f"app {app} has no database to back up")
            record = await self.manager.backup_postgres(app)
            self.manager.prune(app, "postgres")
            return "backup.created", {"backups": [record.to_json()]}
        if env.type == "backup.restore":
            kept = await self.manager.restore(app, body["id"], body.get("to_app"))
            return "backup.restored", {"app": app, "id": body["id"], "kept_as": kept}
        raise ValueError(f"unexpected message {env.type}")


def make_service(node: Any) -> BackupService:
    return BackupService(node)
