"""Add-ons and backups in the API: provisioning, env injection, forwarding to backup nodes.

Endpoints (declared here with :func:`epio.api.web.operation`, so they are in
the one OpenAPI document and behind the same auth, app-scoped 404 rule and
error layer):

* ``GET/POST /apps/{app}/addons``, ``GET/DELETE /apps/{app}/addons/{kind}``;
* ``GET/POST /apps/{app}/backups``, ``POST /apps/{app}/backups/{backup_id}/restore``,
  ``GET /apps/{app}/backups/{backup_id}/download`` (streamed from the backup node
  in ``backup.fetch`` chunks).

:class:`Addons` is the domain: it provisions shared PostgreSQL databases
(:class:`epio.addons.postgres.SharedPostgres`), starts dedicated Redis and
PostgreSQL servers on runners (:mod:`epio.addons.services`), records every
add-on in the store (:mod:`epio.store.addons`) and sets the app's
``DATABASE_URL``/``REDIS_URL`` config vars, which every release carries into the
app's environment.  Backup requests go over the bus to the backup nodes of
``backup.endpoints``.  Credentials are never logged and never answered except as
the app's own config var values (``GET /apps/{app}/config``, app members only).
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from attrs import evolve, frozen
from twisted.internet.defer import DeferredList, ensureDeferred
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from epio.addons import AddonError, db_identifier
from epio.addons.redis import DEFAULT_MEMORY_MB, DEFAULT_POLICY, RedisSpecError
from epio.addons.services import (
    POSTGRES_DIR,
    REDIS_DIR,
    data_dir_name,
    postgres_bin,
    postgres_start_body,
    redis_start_body,
)
from epio.api import errors
from epio.api.control import IRunnerControl
from epio.api.jsonschema import SchemaError, validate
from epio.api.operations import operation
from epio.api.spec import (
    BOOL,
    INT,
    NULLABLE_INT,
    NULLABLE_NUM,
    NULLABLE_STR,
    NUM,
    SCHEMAS,
    STR,
    array,
    obj,
    ref,
)
from epio.api.state import platform_line
from epio.config import Config
from epio.domain import POSTGRES_PROCESS_TYPE as POSTGRES_TYPE
from epio.domain import REDIS_PROCESS_TYPE as REDIS_TYPE
from epio.store import NotFound as StoreNotFound
from epio.store.addons import Addon, delete_addon, find_addon, list_addons, put_addon

if TYPE_CHECKING:
    from twisted.web import server

    from epio.store.records import App, User

CONFIG_VAR = {"postgres": "DATABASE_URL", "redis": "REDIS_URL"}
KINDS = ("postgres", "redis")
BACKUP_STATUSES = ("running", "verified", "failed")
#: seconds a failover's stop of the old primary waits for a runner that is not alive (it
#: is sent in the background: the fence in the add-on record already keeps that server
#: from starting again, and the failover does not wait on a dead host)
DEAD_PRIMARY_STOP_TIMEOUT = 5.0

SCHEMAS.update({
    "Addon": obj({
        "kind": {"type": "string", "enum": list(KINDS)},
        "plan": {"type": "string", "enum": ["shared", "dedicated"]},
        "state": STR, "config_var": STR, "host": NULLABLE_STR, "port": NULLABLE_INT,
        "database": NULLABLE_STR, "node": NULLABLE_STR, "memory_mb": NULLABLE_INT,
        "created": NUM,
        "epoch": {"type": "integer",
                  "description": "goes up at every failover; servers of an older epoch are "
                                 "fenced (their runner refuses to start them)"},
        "standby": {"oneOf": [ref("Standby"), {"type": "null"}],
                    "description": "null: the add-on has no standby"},
    }),
    "Standby": obj({
        "state": {"type": "string",
                  "description": "`ready` (following the primary), `starting`, `failed` "
                                 "(why in `error`), or `none` (being built again)"},
        "node": NULLABLE_STR, "host": NULLABLE_STR, "port": NULLABLE_INT, "error": STR,
        "replication": {"type": "string",
                        "description": "what the primary says of it: `streaming`/`online`, "
                                       "`disconnected`, or `unknown` (the primary did not "
                                       "answer)"},
        "lag_bytes": {"type": ["integer", "null"],
                      "description": "WAL bytes (PostgreSQL) or replication offset bytes "
                                     "(Redis) the standby has not applied yet"},
        "lag_seconds": NULLABLE_NUM,
        "last_failover": {"type": ["object", "null"]},
    }),
    "Failover": obj({"kind": STR, "epoch": INT, "from_node": NULLABLE_STR,
                     "to_node": NULLABLE_STR, "host": NULLABLE_STR, "port": NULLABLE_INT,
                     "standby": {"oneOf": [ref("Standby"), {"type": "null"}]}}),
    # what the server accepts, and nothing else: postgres shared or dedicated; redis
    # dedicated, with its memory (Addons.create validates with this very schema)
    "NewAddon": {
        "oneOf": [
            obj({"kind": {"const": "postgres"},
                 "plan": {"type": "string", "enum": ["shared", "dedicated"]}},
                required=["kind"]),
            obj({"kind": {"const": "postgres"}, "plan": {"const": "dedicated"},
                 "standby": {"type": "boolean"}}, required=["kind", "plan", "standby"]),
            obj({"kind": {"const": "redis"}, "plan": {"const": "dedicated"},
                 "memory_mb": {"type": "integer", "minimum": 1, "maximum": 65536},
                 "standby": {"type": "boolean"}},
                required=["kind"]),
        ],
        "x-error": "must be {kind: postgres, plan: shared or dedicated} or {kind: redis, "
                   "plan: dedicated, memory_mb: 1-65536} (memory_mb applies to redis add-ons "
                   "only; standby: true to dedicated servers only)",
    },
    "AddonDeleted": obj({"deleted": STR, "final_backup": {"oneOf": [ref("Backup"),
                                                                    {"type": "null"}]}}),
    "Backup": obj({
        "id": STR, "app": STR, "kind": STR,
        "status": {"type": "string", "enum": list(BACKUP_STATUSES),
                   "description": "only `verified` backups were restored and checked; "
                                  "`failed` ones say why in `error`"},
        "created": NUM, "finished": NULLABLE_NUM, "size": INT, "sha256": STR,
        "source": STR, "counts": {"type": "object", "additionalProperties": INT},
        "error": STR, "verified": BOOL,
        "suspicious": {"type": "string",
                       "description": "why a verified backup is flagged (empty where the "
                                      "last good one had data, or a size collapse), or \"\": "
                                      "a flagged backup is restorable but does not count "
                                      "towards the retention history"},
        "pinned": {"type": "string",
                   "description": "why the backup is kept for backup.failed_ttl whatever "
                                  "the history (the live data a Redis restore backed up "
                                  "first), or \"\""},
        "archive": {"type": "string", "enum": ["", "archived", "failed"],
                    "description": "the offsite copy (backup.archive_command): \"\" none, "
                                   "`archived`, or `failed` (why in `archive_error`)"},
        "archive_error": STR,
        "archive_name": {"type": "string", "description": "the archive's object name"},
        "local": {"type": "boolean",
                  "description": "false: pruned on the backup node, kept in the archive "
                                 "(a restore fetches it)"},
        "copies": {"type": "array", "description": "each archive target's copy",
                   "items": obj({
                       "target": {"type": "string", "enum": ["command", "s3"],
                                  "description": "`command` (backup.archive_command) or "
                                                 "`s3` (backup.archive_s3_*)"},
                       "state": {"type": "string", "enum": ["archived", "failed"]},
                       "where": {"type": "string",
                                 "description": "where the copy is (s3://BUCKET/KEY)"},
                       "error": STR})},
    }),
    "Snapshot": obj({"id": STR, "kind": STR, "created": NUM}),
    "SnapshotRestored": obj({"kind": STR, "id": STR, "kept_as": STR}),
    "NewBackup": obj({"kind": {"type": "string", "enum": list(KINDS)}}, required=[]),
    "Restore": obj({"to_app": {"type": "string", "minLength": 1}}, required=[]),
    "Restored": obj({"app": STR, "id": STR, "into": STR, "kept_as": NULLABLE_STR}),
})


@frozen
class AddonSettings:
    """The ``addons`` and ``backup`` config the api uses (seconds, bytes)."""

    postgres_admin_url: str = ""
    postgres_host: str = ""
    postgres_port: int = 0
    postgres_bin: str = ""
    service_boot_timeout: float = 60.0
    redis_snapshot_interval: float = 900.0
    backup_endpoints: tuple[str, ...] = ()
    backup_timeout: float = 1800.0
    reach_timeout: float = 5.0
    keeper_interval: float = 10.0
    postgres_memory_mb: int = 512
    service_stop_timeout: float = 30.0
    failover_after: float = 60.0
    standby_same_runner: bool = False

    @classmethod
    def from_config(cls, config: Config) -> AddonSettings:
        a, b = config.settings.addons, config.settings.backup
        return cls(a.postgres_admin_url, a.postgres_host, a.postgres_port, a.postgres_bin,
                   a.service_boot_timeout, a.redis_snapshot_interval, tuple(b.endpoints),
                   b.api_timeout, b.reach_timeout, a.keeper_interval, a.postgres_memory_mb,
                   a.service_stop_timeout, a.failover_after, a.standby_same_runner)


def describe_addon(a: Addon, lag: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What the API shows of an add-on: never the password.  ``lag``: the replication
    as measured (:meth:`Addons.replication`)."""
    memory = a.options.get("memory_mb")
    o = a.options
    standby = None
    if o.get("standby"):
        lag = lag or {}
        standby = {"state": str(o.get("standby_state") or "none"),
                   "node": o.get("standby_node"), "host": o.get("standby_host"),
                   "port": o.get("standby_port"), "error": str(o.get("standby_error") or ""),
                   "replication": str(lag.get("state") or "unknown"),
                   "lag_bytes": lag.get("lag_bytes"), "lag_seconds": lag.get("lag_seconds"),
                   "last_failover": o.get("last_failover")}
    return {"kind": a.kind, "plan": a.plan, "state": a.state, "config_var": CONFIG_VAR[a.kind],
            "host": a.host, "port": a.port, "database": a.database, "node": a.node,
            "memory_mb": int(memory) if isinstance(memory, int) else None,
            "created": a.created, "epoch": int(o.get("epoch") or 0), "standby": standby}


def describe_backup(r: Mapping[str, Any]) -> dict[str, Any]:
    status = str(r.get("status") or "failed")
    if status not in BACKUP_STATUSES:
        status = "failed"
    return {
        "id": str(r.get("id")), "app": str(r.get("app")), "kind": str(r.get("kind")),
        "status": status, "created": float(r.get("created") or 0),
        "finished": r.get("finished"), "size": int(r.get("size") or 0),
        "sha256": str(r.get("sha256") or ""), "source": str(r.get("source") or ""),
        "counts": {str(k): int(v) for k, v in (r.get("counts") or {}).items()},
        "error": str(r.get("error") or ""), "verified": status == "verified",
        "suspicious": str(r.get("suspicious") or "") if status == "verified" else "",
        "pinned": str(r.get("pinned") or ""),
        "archive": str(r.get("archive") or ""), "archive_error": str(r.get("archive_error") or ""),
        "archive_name": str(r.get("archive_name") or ""),
        "local": bool(r.get("local", True)),
        "copies": _copies(r),
    }


def _copies(r: Mapping[str, Any]) -> list[dict[str, str]]:
    """Each archive target's copy; a record from before copies were kept per target was
    archived (or not) by archive_command."""
    copies = r.get("copies") or {}
    if not copies and r.get("archive") in ("archived", "failed"):
        copies = {"command": {"state": r.get("archive"), "error": r.get("archive_error"),
                              "where": f"archive_command ({r.get('archive_name') or ''})"}}
    return [{"target": str(t), "state": "archived" if c.get("state") == "archived"
             else "failed", "where": str(c.get("where") or ""),
             "error": str(c.get("error") or "")}
            for t, c in copies.items() if t in ("command", "s3") and isinstance(c, dict)]


class Addons:
    """Add-on and backup use cases of the api (see the module docstring).

    ``control`` is an :class:`epio.api.control.IRunnerControl` (any bus
    request to an endpoint); ``shared`` a :class:`SharedPostgres` or None.
    """

    log = Logger()

    def __init__(self, store: Any, control: IRunnerControl, clock: Any, settings: AddonSettings,
                 shared: Any = None, scheduler: Any = None, log_sink: Any = None,
                 runner_dead_after: float = 15.0, probe: Any = None) -> None:
        self.store = store
        self.control = control
        self.clock = clock
        self.settings = settings
        self.shared = shared
        self.scheduler = scheduler
        self.log_sink = log_sink
        self.runner_dead_after = runner_dead_after
        # async (addon) -> None: raises until the server accepts the app's credentials
        self.probe = probe or self._probe
        self._kept: dict[tuple[str, str], str] = {}
        # (app, kind) -> the last replication measured on this node (for /metrics)
        self.lags: dict[tuple[str, str], dict[str, Any]] = {}
        self._building: set[tuple[str, str]] = set()  # standbys being built here

    # --- add-ons ------------------------------------------------------------------

    async def addons_of(self, app: App) -> list[Addon]:
        return await list_addons(self.store, app.name)

    async def get(self, app: App, kind: str) -> Addon:
        if kind not in KINDS:
            raise errors.NotFound(f"no add-on kind {kind!r}; kinds are: {', '.join(KINDS)}")
        found = await find_addon(self.store, app.name, kind)
        if found is None:
            raise errors.NotFound(f"{app.name} has no {kind} add-on")
        return found

    async def create(self, user: User, app: App, kind: str, plan: str | None,
                     memory_mb: int | None, standby: bool = False) -> Addon:
        """Provision an add-on now; its config var comes with a new release.  With
        ``standby`` a dedicated server gets a standby on another runner (refused when
        there is none, unless ``addons.standby_same_runner``)."""
        if await find_addon(self.store, app.name, kind) is not None:
            raise errors.Conflict(f"{app.name} already has a {kind} add-on")
        plan = plan or ("shared" if kind == "postgres" else "dedicated")
        wanted: dict[str, Any] = {"kind": kind, "plan": plan}
        if memory_mb is not None:
            wanted["memory_mb"] = memory_mb
        if standby:
            wanted["standby"] = True
        try:  # the rule of the API's NewAddon schema, for every caller
            validate(wanted, SCHEMAS["NewAddon"], {"components": {"schemas": SCHEMAS}})
        except SchemaError as e:
            raise errors.ValidationFailed(f"add-on {e.message}") from None
        image = None
        if plan == "dedicated":
            image = await self._image_or_none(app)
        if standby:
            await self._standby_runner(None)  # refused before anything is made
        addon = await self._provision(app, kind, plan, memory_mb, image, standby)
        await self._set_var(app, kind, addon, f"Add {kind} add-on", user.name)
        if standby:
            addon = await self._build_standby(app, addon)
        return addon

    async def destroy(self, user: User, app: App, kind: str,
                      force: bool = False) -> dict[str, Any] | None:
        """Final backup (when backup nodes are configured), then drop, then unset the var.

        A final backup that FAILED, or that no configured backup node answered for,
        stops the removal (nothing is dropped) unless ``force``.  Returns the final backup record (or None).
        """
        addon = await self.get(app, kind)
        final = await self._final_backup(app.name, kind, force)
        await self._drop(addon)
        await delete_addon(self.store, app.name, kind)
        current = await self.store.get_config(app.name)
        var = CONFIG_VAR[kind]
        if var in current:
            await self.store.set_config_and_release(
                app.name, {var: None}, description=f"Remove {kind} add-on",
                created_by=user.name, **await self._release_kwargs(app))
            self._wake()
        self.log.info("{kind} add-on of {app} removed by {user}", kind=kind, app=app.name,
                      user=user.name)
        return final

    async def config_vars(self, app: App) -> dict[str, str]:
        """The config vars the app's add-ons set now (a rollback keeps them: it rolls the
        code and config back, not the databases)."""
        return {CONFIG_VAR[a.kind]: addon_url(a) for a in await list_addons(self.store, app.name)
                if a.host and a.port}

    async def app_destroyed(self, app: App) -> list[dict[str, Any]]:
        """Before an app is destroyed: a final backup of each add-on while its server
        still runs (409 ``final_backup_failed`` and nothing destroyed when one fails).
        The add-ons and their data stay until the app is purged; a dedicated server
        stops with the app's instances and starts again (:meth:`keep_running`, same
        data dir) if the app is restored."""
        finals = []
        for addon in await list_addons(self.store, app.name):
            final = await self._final_backup(app.name, addon.kind, force=False)
            if final is not None:
                finals.append(final)
        return finals

    async def app_purged(self, app: App) -> None:
        """When a destroyed app is purged: drop every add-on (a shared database is
        dropped; a dedicated server's data goes with the app's data dir)."""
        for addon in await list_addons(self.store, app.name):
            await self._drop(addon)
            await delete_addon(self.store, app.name, addon.kind)

    async def before_build(self, app: App, tarball: bytes, say: Any) -> None:
        """Provision what the upload's ``[services]`` asks for before its build starts,
        so the build and the release phase see the add-ons' config vars.  A dedicated
        server of an app that has no image yet runs on the runner's empty image."""
        from twisted.internet.threads import deferToThreadPool

        from epio.api.upload import manifest_of_upload

        manifest = await deferToThreadPool(self.clock, self.clock.getThreadPool(),
                                           manifest_of_upload, tarball)
        if manifest is None:
            return  # no readable manifest: the build says what is wrong with it
        await self.on_deploy(app, manifest, await self._image_or_none(app), say)

    async def on_deploy(self, app: App, manifest: Mapping[str, Any], image: str,
                        say: Any) -> None:
        """Provision what ``[services]`` asks for (before the release is made, so the
        release carries DATABASE_URL/REDIS_URL); restart dedicated servers that are gone."""
        services = manifest.get("services") or {}
        memory = manifest.get("redis_memory_mb")
        for kind in KINDS:
            plan = services.get(kind) if isinstance(services, Mapping) else None
            existing = await find_addon(self.store, app.name, kind)
            if existing is not None:
                if existing.plan == "dedicated":
                    await self._ensure_running(app, existing, image, say)
                if plan and plan != existing.plan:
                    await say(f"  {kind}: the app has a {existing.plan} add-on; "
                              f"[services] asks for {plan} (unchanged: move the data with "
                              f"epio backups)")
                continue
            if not plan:
                continue
            if kind == "redis":
                plan = "dedicated"
            if kind == "postgres" and plan == "shared" and self.shared is None:
                # a platform without a shared server (the single-box default): say so in
                # the deploy log and go on -- the app runs without DATABASE_URL
                await say("  [services] postgres: this platform has no shared PostgreSQL "
                          "(addons.postgres_admin_url is empty); DATABASE_URL is NOT set. "
                          "`postgres = dedicated` in [services] gives the app a server of "
                          "its own")
                self.log.warn("{app} asks for postgres but addons.postgres_admin_url is "
                              "empty", app=app.name)
                continue
            await say(f"Provisioning {plan} {kind} for {app.name}...")
            try:
                addon = await self._provision(app, kind, plan,
                                              memory if kind == "redis" else None, image)
            except errors.ApiError as e:
                raise AddonError(f"{kind} add-on: {e.message}") from None
            await self._set_var(app, kind, addon, None, None)
            await say(f"  {kind} ready: {CONFIG_VAR[kind]} is set")

    # --- provisioning -------------------------------------------------------------

    async def _provision(self, app: App, kind: str, plan: str, memory_mb: int | None,
                         image: str | None, standby: bool = False) -> Addon:
        now = self.clock.seconds()
        if kind == "postgres" and plan == "shared":
            if self.shared is None:
                raise errors.Unavailable(
                    "this platform has no shared PostgreSQL server (its operator has not "
                    "set addons.postgres_admin_url); a dedicated server of the app's own "
                    "(plan \"dedicated\") works without one", code="no_shared_postgres")
            try:
                creds = await self.shared.provision(app.name)
            except AddonError as e:
                raise errors.Unavailable(str(e), code="addons_unavailable") from None
            addon = Addon(app.name, "postgres", "shared", "ready", now, now, creds.host,
                          creds.port, creds.database, creds.user, creds.password)
            return await put_addon(self.store, addon)
        assert image is not None
        if kind == "redis":
            memory = DEFAULT_MEMORY_MB if memory_mb is None else memory_mb
            if not 1 <= memory <= 65536:
                raise errors.ValidationFailed("[redis] memory must be 1..65536 MB")
            # data_key: the server's own data directory (never a destroyed one's)
            addon = Addon(app.name, "redis", "dedicated", "provisioning", now, now,
                          password=secrets.token_urlsafe(24),
                          options={"memory_mb": memory, "policy": DEFAULT_POLICY,
                                   "data_key": secrets.token_hex(8)})
        else:
            addon = Addon(app.name, "postgres", "dedicated", "provisioning", now, now,
                          database=db_identifier(app.name), username=db_identifier(app.name),
                          password=secrets.token_urlsafe(24),
                          options={"data_key": secrets.token_hex(8)})
        if standby:
            # epoch 1: its servers ask their runner's gate for their role at every start
            # "starting": the create builds it (the keeper leaves it alone meanwhile)
            extra: dict[str, Any] = {"standby": True, "epoch": 1, "standby_state": "starting",
                                     "standby_since": now}
            if kind == "postgres":
                extra["repl_password"] = secrets.token_urlsafe(24)
            addon = evolve(addon, options={**addon.options, **extra})
        addon = await put_addon(self.store, addon)
        return await self._start_server(app, addon, image)

    async def _start_server(self, app: App, addon: Addon, image: str,
                            node_id: str | None = None) -> Addon:
        """Start the dedicated server on a runner (its recorded node if alive) and wait
        until it accepts connections."""
        from epio.store import Instance

        runner = await self._pick_runner(node_id or addon.node)
        host = _host_of(runner.control_endpoint)
        ptype = REDIS_TYPE if addon.kind == "redis" else POSTGRES_TYPE
        iid = f"{app.name}-{ptype}-{uuid.uuid4().hex[:8]}"
        body = self._server_body(app, addon, iid, host, image,
                                 str(addon.options.get("data_key") or ""))
        now = self.clock.seconds()
        # recorded first, so the scheduler never takes it for an orphan
        inst = Instance(iid, app.name, 0, ptype, 1, runner.id, None, None, "pending", now, 0)
        await self.store.upsert_instance(inst)
        if addon.options.get("epoch"):
            # the runner's gate starts only the servers the record names (fencing)
            addon = await put_addon(self.store, evolve(addon, instance=iid, node=runner.id))
        try:
            reply = await self.control.request(runner.control_endpoint, "runner.start", body,
                                               timeout=30.0)
        except Exception as e:
            await self.store.delete_instance(iid)
            await put_addon(self.store, evolve(addon, state="failed"))
            raise errors.Unavailable(
                f"runner {runner.id} could not start the {addon.kind} server: "
                f"{getattr(e, 'message', None) or type(e).__name__}",
                code="addons_unavailable") from None
        port = reply.get("port")
        rhost = str(reply.get("host") or host)
        # still "pending" (for api.start_grace) until its runner reports it: a status poll
        # answered just before the start must not make the scheduler forget it, and then
        # stop it as an orphan
        await self.store.upsert_instance(evolve(inst, host=rhost, port=port, state="pending",
                                                since=self.clock.seconds()))
        addon = evolve(addon, host=rhost, port=int(port) if port else None, node=runner.id,
                       instance=iid, options={**addon.options, "image": image})
        await put_addon(self.store, addon)
        try:
            await self._wait_accepting(addon)
        except Exception as e:
            await put_addon(self.store, evolve(addon, state="failed"))
            raise errors.Unavailable(f"the dedicated {addon.kind} server did not come up: {e}",
                                     code="addons_unavailable") from None
        addon = await put_addon(self.store, evolve(addon, state="ready"))
        self.log.info("dedicated {kind} of {app} runs on {node} port {port}", kind=addon.kind,
                      app=app.name, node=runner.id, port=addon.port)
        return addon

    def _server_body(self, app: Any, addon: Addon, iid: str, host: str, image: str,
                     data_key: str) -> dict[str, Any]:
        s = self.settings
        epoch = int(addon.options.get("epoch") or 0)
        if addon.kind == "redis":
            return redis_start_body(
                app=app.name, uid=app.uid, instance_id=iid, image_digest=image,
                password=str(addon.password), memory_mb=int(addon.options["memory_mb"]),
                policy=str(addon.options.get("policy") or DEFAULT_POLICY), host=host,
                snapshot_interval=s.redis_snapshot_interval, boot_timeout=s.service_boot_timeout,
                grace=s.service_stop_timeout, data_key=data_key, epoch=epoch)
        return postgres_start_body(
            app=app.name, uid=app.uid, instance_id=iid, image_digest=image,
            user=str(addon.username), password=str(addon.password), host=host,
            pg_bin=postgres_bin(s.postgres_bin), boot_timeout=s.service_boot_timeout,
            grace=s.service_stop_timeout, memory_mb=s.postgres_memory_mb, data_key=data_key,
            epoch=epoch, repl_password=str(addon.options.get("repl_password") or ""))

    # --- standby and failover (epio.addons.standby) ---------------------------------

    async def _standby_runner(self, primary_node: str | None) -> Any:
        """A live runner for a standby: never the primary's, unless
        ``addons.standby_same_runner`` (testing); 409 ``no_standby_runner`` otherwise."""
        now = self.clock.seconds()
        nodes = [n for n in await self.store.list_nodes(role="runner") if n.control_endpoint
                 and now - n.last_seen < self.runner_dead_after]
        others = [n for n in nodes if n.id != primary_node]
        if primary_node is None:  # before the primary is placed: two runners needed
            if len(nodes) >= 2 or (nodes and self.settings.standby_same_runner):
                return nodes[0]
        elif others:
            instances = await self.store.list_instances()
            return min(others, key=lambda n: (sum(1 for i in instances if i.node == n.id), n.id))
        elif nodes and self.settings.standby_same_runner:
            return nodes[0]
        raise errors.Conflict(
            "a standby runs on another runner than its primary, and no second runner is "
            f"alive ({len(nodes)} alive); addons.standby_same_runner = true allows one on "
            "the same runner, for testing only", code="no_standby_runner")

    async def _run_sync(self, f: Any, *args: Any) -> Any:
        from twisted.internet.threads import deferToThreadPool

        return await deferToThreadPool(self.clock, self.clock.getThreadPool(), f, *args)

    async def _build_standby(self, app: Any, addon: Addon, node_id: str | None = None,
                             fresh: bool = True) -> Addon:
        """Start the add-on's standby (``fresh``: a new data dir, a copy of the primary),
        wait until it accepts connections.  A failure is recorded (``standby_state``
        ``failed``) and logged; the keeper tries again."""
        key = (app.name, addon.kind)
        if key in self._building:
            return addon
        self._building.add(key)
        try:
            return await self._build_standby_now(app, addon, node_id, fresh)
        finally:
            self._building.discard(key)

    async def _build_standby_now(self, app: Any, addon: Addon, node_id: str | None,
                                 fresh: bool) -> Addon:
        from epio.addons import standby as sb
        from epio.store import Instance

        o = addon.options
        image = str(o.get("image") or "")
        try:
            runner = (await self._pick_runner(node_id) if node_id
                      else await self._standby_runner(addon.node))
        except errors.ApiError as e:
            return await self._standby_failed(addon, e.message)
        key = secrets.token_hex(8) if fresh or not o.get("standby_data_key") \
            else str(o["standby_data_key"])
        host = _host_of(runner.control_endpoint)
        ptype = REDIS_TYPE if addon.kind == "redis" else POSTGRES_TYPE
        iid = f"{app.name}-{ptype}-{uuid.uuid4().hex[:8]}"
        try:
            if addon.kind == "postgres":
                await self._run_sync(sb.pg_prepare_primary, str(addon.host), int(addon.port or 0),
                                     str(addon.username), str(addon.password),
                                     str(o.get("repl_password") or ""), key)
        except Exception as e:
            return await self._standby_failed(addon, f"the primary did not answer: "
                                                     f"{type(e).__name__}")
        now = self.clock.seconds()
        inst = Instance(iid, app.name, 0, ptype, 2, runner.id, None, None, "pending", now, 0)
        await self.store.upsert_instance(inst)
        addon = await put_addon(self.store, evolve(addon, options={
            **addon.options, "standby_instance": iid, "standby_node": runner.id,
            "standby_data_key": key, "standby_state": "starting", "standby_error": "",
            "standby_since": self.clock.seconds(),
            "standby_host": None, "standby_port": None}))
        body = self._server_body(app, addon, iid, host, image, key)
        body["index"] = 2
        try:
            reply = await self.control.request(runner.control_endpoint, "runner.start", body,
                                               timeout=30.0)
        except Exception as e:
            await self.store.delete_instance(iid)
            return await self._standby_failed(
                addon, f"runner {runner.id} could not start it: "
                       f"{getattr(e, 'message', None) or type(e).__name__}")
        port = int(reply.get("port") or 0)
        rhost = str(reply.get("host") or host)
        # still "pending" (for api.start_grace) until its runner reports it: a status poll
        # answered just before the start must not make the scheduler forget it, and then
        # stop it as an orphan
        await self.store.upsert_instance(evolve(inst, host=rhost, port=port, state="pending",
                                                since=self.clock.seconds()))
        addon = await put_addon(self.store, evolve(addon, options={
            **addon.options, "standby_host": rhost, "standby_port": port,
            "standby_of": f"{addon.host}:{addon.port}"}))
        probe = evolve(addon, host=rhost, port=port)
        try:
            await self._wait_accepting(probe, standby=True)
        except Exception as e:
            return await self._standby_failed(addon, f"it did not come up: {e}")
        addon = await put_addon(self.store, evolve(addon, options={
            **addon.options, "standby_state": "ready", "standby_error": ""}))
        if addon.kind == "postgres":
            try:  # slots of standbys gone before (they would keep WAL for ever)
                await self._run_sync(sb.pg_drop_slots, str(addon.host), int(addon.port or 0),
                                     str(addon.username), str(addon.password), key)
            except Exception as e:
                self.log.warn("dropping old replication slots of {app} failed: {error}",
                              app=app.name, error=type(e).__name__)
        self.log.info("standby of {app}'s {kind} runs on {node} port {port}", app=app.name,
                      kind=addon.kind, node=runner.id, port=port)
        self._app_log(app.name, f"standby of the dedicated {addon.kind} runs on {runner.id}")
        return addon

    async def _standby_failed(self, addon: Addon, why: str) -> Addon:
        key = (addon.app, addon.kind + "-standby")
        if self._kept.get(key) != why:
            self._kept[key] = why
            self.log.warn("the standby of {app}'s {kind} is not running: {why}", app=addon.app,
                          kind=addon.kind, why=why)
            self._app_log(addon.app, f"standby of the dedicated {addon.kind} is not running: "
                                     f"{why}")
        return await put_addon(self.store, evolve(addon, options={
            **addon.options, "standby_state": "failed", "standby_error": why}))

    async def _stop_instance(self, iid: str | None, grace: float, timeout: float) -> None:
        """Stop an instance on its runner (when the runner answers) and forget it."""
        if not iid:
            return
        for i in await self.store.list_instances():
            if i.id != iid:
                continue
            try:
                node = await self.store.get_node(i.node or "")
            except StoreNotFound:
                node = None
            if node is not None and node.control_endpoint:
                try:
                    await self.control.request(node.control_endpoint, "runner.stop",
                                               {"instance_id": iid, "grace": grace},
                                               timeout=timeout)
                except Exception as e:
                    self.log.warn("stopping {id} failed: {error}", id=iid,
                                  error=getattr(e, "message", None) or type(e).__name__)
            await self.store.delete_instance(iid)

    async def failover(self, app: Any, kind: str, who: str, why: str = "manual") -> Addon:
        """Fence the primary, promote the standby, switch the app's URL in a new release,
        build a new standby (docs/databases.md, *Standby and failover*)."""
        from epio.addons import standby as sb

        addon = await self.get(app, kind)
        o = addon.options
        if not o.get("standby"):
            raise errors.Conflict(f"the {kind} add-on of {app.name} has no standby "
                                  "(create it with --standby)", code="no_standby")
        if o.get("standby_state") != "ready" or not o.get("standby_port"):
            raise errors.Conflict(
                f"the standby of {app.name}'s {kind} is {o.get('standby_state') or 'none'}"
                + (f" ({o.get('standby_error')})" if o.get("standby_error") else "")
                + ": there is nothing to promote", code="no_standby")
        standby_runner = await self._pick_runner(str(o["standby_node"]))  # 503: not alive
        old = addon
        now = self.clock.seconds()
        primary_alive = False
        try:
            primary_alive = bool(old.node) and (await self._pick_runner(old.node)) is not None
        except errors.ApiError:
            pass
        epoch = int(o.get("epoch") or 1) + 1
        record = {k: v for k, v in o.items() if not k.startswith("standby_")}
        record.update({
            "epoch": epoch, "data_key": o["standby_data_key"], "standby_state": "starting",
            "standby_since": now,
            "last_failover": {"at": now, "from_node": old.node, "to_node": standby_runner.id,
                              "epoch": epoch, "why": why}})
        new = evolve(old, instance=str(o["standby_instance"]), node=standby_runner.id,
                     host=str(o["standby_host"]), port=int(o["standby_port"]), state="ready",
                     options=record)
        # 1. fence: from now on the old primary's runner refuses to start it (the record
        # names the standby); the old primary is stopped when its runner answers -- a
        # clean stop sends its last writes to the standby first
        new = await put_addon(self.store, new)
        self.log.warn("failover ({why}) of {app}'s {kind}: epoch {epoch}, {old} fenced, "
                      "{new} promoted", why=why, app=app.name, kind=kind, epoch=epoch,
                      old=old.node, new=standby_runner.id)
        self._app_log(app.name, f"failover ({why}) of the dedicated {kind}: the server on "
                                f"{old.node} is fenced, the standby on {standby_runner.id} "
                                f"becomes the primary (epoch {epoch})")
        if primary_alive:
            await self._stop_instance(old.instance, self.settings.service_stop_timeout,
                                      self.settings.service_stop_timeout + 10.0)
        else:  # asked anyway (a runner cut off from the nexuses only may still answer)
            ensureDeferred(self._stop_instance(
                old.instance, self.settings.service_stop_timeout, DEAD_PRIMARY_STOP_TIMEOUT,
            )).addErrback(lambda f: self.log.failure("stopping the fenced primary failed", f))
        # 2. promote
        try:
            if kind == "postgres":
                await self._run_sync(sb.pg_promote, str(new.host), int(new.port or 0),
                                     str(new.username), str(new.password))
            else:
                await self._run_sync(sb.redis_promote, str(new.host), int(new.port or 0),
                                     str(new.password))
        except Exception as e:
            reason = str(e) if isinstance(e, AddonError) else type(e).__name__
            await put_addon(self.store, evolve(new, state="failed"))
            raise errors.Unavailable(f"promoting the standby failed: {reason}; the old "
                                     "primary stays fenced", code="failover_failed") from None
        # 3. the app's URL, in a new release
        await self._set_var(app, kind, new, f"Failover of {kind} to {standby_runner.id} "
                                            f"(epoch {epoch})", who)
        # 4. a new standby (the keeper tries again when this fails)
        return await self._build_standby(app, new)

    async def replication(self, addon: Addon) -> dict[str, Any]:
        """The standby's replication as its primary says: state, lag in bytes/seconds."""
        from epio.addons import standby as sb

        o = addon.options
        if not o.get("standby") or not o.get("standby_port") or not addon.port:
            return {"state": "unknown", "lag_bytes": None, "lag_seconds": None}
        try:
            if addon.kind == "postgres":
                lag: dict[str, Any] = await self._run_sync(
                    sb.pg_lag, str(addon.host), int(addon.port), str(addon.username),
                    str(addon.password), str(o.get("standby_data_key") or ""))
            else:
                lag = await self._run_sync(sb.redis_lag, str(addon.host), int(addon.port),
                                           str(addon.password), int(o["standby_port"]))
        except Exception:
            return {"state": "unknown", "lag_bytes": None, "lag_seconds": None}
        self.lags[(addon.app, addon.kind)] = lag
        return lag

    def metric_families(self) -> list[Any]:
        """Replication lag of every add-on standby, as the scheduler's leader last measured
        it (every ``addons.keeper_interval``), for /metrics."""
        from epio.metrics import Family

        lag_bytes = Family("epio_addon_replication_lag_bytes", "gauge",
                           "Bytes of the primary's WAL / replication stream the standby of a "
                           "dedicated add-on has not applied (on the scheduler's leader)")
        lag_seconds = Family("epio_addon_replication_lag_seconds", "gauge",
                             "Replay lag of the standby of a dedicated add-on, seconds")
        up = Family("epio_addon_standby_connected", "gauge",
                    "1 when the primary sees its standby streaming, else 0")
        for (app, kind), lag in sorted(self.lags.items()):
            labels = {"app": app, "kind": kind}
            connected = lag.get("state") in ("streaming", "online")
            up.samples.append(("", labels, 1.0 if connected else 0.0))
            if lag.get("lag_bytes") is not None:
                lag_bytes.samples.append(("", labels, float(lag["lag_bytes"])))
            if lag.get("lag_seconds") is not None:
                lag_seconds.samples.append(("", labels, float(lag["lag_seconds"])))
        return [lag_bytes, lag_seconds, up]

    async def describe(self, addon: Addon) -> dict[str, Any]:
        lag = await self.replication(addon) if addon.options.get("standby") else None
        return describe_addon(addon, lag)

    async def keep_standbys(self) -> None:
        """The leader's round for add-ons with a standby: fail over when the primary's
        runner has been silent past ``addons.failover_after``; start a lost standby again
        (on its runner when alive, else a new one elsewhere); measure the lag."""
        now = self.clock.seconds()
        nodes = {n.id: n for n in await self.store.list_nodes(role="runner")}
        present = {i.id for i in await self.store.list_instances()}
        live = {a.name for a in await self.store.list_apps()}
        addons = await list_addons(self.store)
        with_standby = {(a.app, a.kind) for a in addons if a.options.get("standby")}
        self.lags = {k: v for k, v in self.lags.items() if k in with_standby}
        for addon in addons:
            o = addon.options
            if addon.plan != "dedicated" or not o.get("standby") or addon.app not in live:
                continue
            primary = nodes.get(addon.node or "")
            silent = now - primary.last_seen if primary is not None else float("inf")
            app = await self.store.get_app(addon.app)
            if silent >= self.settings.failover_after and o.get("standby_state") == "ready":
                standby_node = nodes.get(str(o.get("standby_node") or ""))
                if standby_node is not None and now - standby_node.last_seen < \
                        self.runner_dead_after:
                    try:
                        await self.failover(app, addon.kind, "epio",
                                            f"automatic: runner {addon.node} silent for "
                                            f"{silent:.0f}s")
                    except errors.ApiError as e:
                        self.log.error("automatic failover of {app}'s {kind} failed: {error}",
                                       app=addon.app, kind=addon.kind, error=e.message)
                    continue
            moved = o.get("standby_state") == "ready" and \
                o.get("standby_of") != f"{addon.host}:{addon.port}"  # the primary restarted
            # a build that began and never ended (its api died): given up after the
            # boot timeout and a minute
            stuck = o.get("standby_state") == "starting" and now - float(
                o.get("standby_since") or 0) > self.settings.service_boot_timeout + 60.0
            if (addon.app, addon.kind) in self._building:
                continue
            if addon.state == "ready" and addon.instance in present and (
                    o.get("standby_state") in ("none", "failed") or moved or stuck
                    or (o.get("standby_instance") and o.get("standby_instance") not in present
                        and o.get("standby_state") != "starting")):
                sn = nodes.get(str(o.get("standby_node") or ""))
                same = bool(sn is not None and now - sn.last_seen < self.runner_dead_after
                            and o.get("standby_data_key") and o.get("standby_state") == "ready")
                if o.get("standby_instance"):
                    await self._stop_instance(str(o["standby_instance"]), 10.0, 10.0)
                    addon = evolve(addon, options={**addon.options, "standby_instance": None})
                # on its runner, on its data, when that is alive; else a new copy elsewhere
                await self._build_standby(app, addon, node_id=sn.id if same and sn else None,
                                          fresh=not same)
                continue
            if o.get("standby_state") == "ready":
                await self.replication(addon)
    async def _wait_accepting(self, addon: Addon, standby: bool = False) -> None:
        """Until the server answers with the app's credentials (the dedicated database
        is created on first start), or ``addons.service_boot_timeout``."""
        deadline = self.clock.seconds() + self.settings.service_boot_timeout
        last = "no answer"
        while self.clock.seconds() < deadline:
            try:
                if standby:
                    await self._probe_standby(addon)
                else:
                    await self.probe(addon)
                return
            except Exception as e:
                last = type(e).__name__
            await deferLater(self.clock, 0.3, lambda: None)
        raise TimeoutError(f"not accepting connections after "
                           f"{self.settings.service_boot_timeout:g}s ({last})")

    async def _probe_standby(self, addon: Addon) -> None:
        """A standby answers the app's credentials (read-only) and follows a primary."""
        from epio.addons import standby as sb

        if addon.kind == "redis":
            info = sb.redis_info(await self._run_sync(
                sb.redis_call, str(addon.host), int(addon.port or 0), str(addon.password),
                "INFO", "replication"))
            if info.get("master_link_status") != "up":
                raise ConnectionError("the replica is not in sync with its primary yet")
            return
        await self._run_sync(_postgres_in_recovery, addon)

    async def _probe(self, addon: Addon) -> None:
        if addon.kind == "redis":
            await _redis_ping(addon)
        else:
            await _postgres_ensure_db(self.clock, addon)

    async def _ensure_running(self, app: App, addon: Addon, image: str, say: Any) -> None:
        """A dedicated server whose instance is gone (its runner died) is started again
        on the same node when it is back (its data is there), else reported."""
        if addon.instance:
            for i in await self.store.list_instances(app.name):
                if i.id == addon.instance:
                    if addon.state != "ready":  # started, but slow to answer last time
                        try:
                            await self._wait_accepting(addon)
                        except TimeoutError as e:
                            # a reason for the deploy log, not an internal error
                            raise AddonError(
                                f"{addon.kind} add-on: the dedicated {addon.kind} server"
                                + (f" on {addon.node}" if addon.node else "")
                                + f" is {e}; see its output in epio logs") from None
                        await put_addon(self.store, evolve(addon, state="ready"))
                    return
        await say(f"  dedicated {addon.kind} is not running; starting it again"
                  + (f" on {addon.node}" if addon.node else ""))
        try:
            new = await self._start_server(app, addon, image, addon.node)
        except errors.ApiError as e:
            raise AddonError(f"{addon.kind} add-on: {e.message}") from None
        if (new.host, new.port) != (addon.host, addon.port):
            await self._set_var(app, addon.kind, new, None, None)

    async def keep_running(self) -> int:
        """Start again the dedicated servers whose instance is gone (the scheduler forgot
        it: its runner was dead, or came back and had it stopped as an orphan), on their
        own node once it is alive.  Only the scheduler's leader does it.  Returns how many
        were started."""
        if self.scheduler is not None and not self.scheduler.leader:
            return 0
        present = {i.id for i in await self.store.list_instances()}
        live = {a.name for a in await self.store.list_apps()}  # not destroyed ones
        started = 0
        for addon in await list_addons(self.store):
            image = addon.options.get("image")
            if addon.plan != "dedicated" or addon.state not in ("ready", "failed") \
                    or image is None or addon.instance in present or addon.app not in live:
                continue
            try:
                app = await self.store.get_app(addon.app)
                new = await self._start_server(app, addon, str(image), addon.node)
            except errors.ApiError as e:
                key = (addon.app, addon.kind)
                if self._kept.get(key) != e.message:
                    self._kept[key] = e.message
                    self.log.warn("dedicated {kind} of {app} is down: {error}", kind=addon.kind,
                                  app=addon.app, error=e.message)
                continue
            self._kept.pop((addon.app, addon.kind), None)
            started += 1
            self._app_log(addon.app, f"dedicated {addon.kind} started again on {new.node}")
            if (new.host, new.port) != (addon.host, addon.port):
                await self._set_var(app, addon.kind, new,
                                    f"Dedicated {addon.kind} moved to {new.host}:{new.port}",
                                    "epio")
        try:
            await self.keep_standbys()
        except Exception:
            self.log.failure("keeping the standbys failed")
        return started

    def _app_log(self, app: str, text: str) -> None:
        platform_line(self.log_sink, app, text)

    def keeper(self, interval: float) -> Any:
        """A service running :meth:`keep_running` every ``interval`` seconds."""
        from twisted.application.internet import TimerService

        def tick() -> Any:
            return ensureDeferred(self.keep_running()).addErrback(
                lambda f: self.log.failure("keeping dedicated servers running failed", f))

        timer = TimerService(interval, tick)
        timer.clock = self.clock
        timer.setName("addons-keeper")
        return timer

    async def _pick_runner(self, prefer: str | None) -> Any:
        now = self.clock.seconds()
        nodes = [n for n in await self.store.list_nodes(role="runner") if n.control_endpoint]
        fresh = [n for n in nodes if now - n.last_seen < self.runner_dead_after]
        if prefer:
            for n in fresh:
                if n.id == prefer:
                    return n
            raise errors.Unavailable(
                f"the dedicated server's runner {prefer} is not alive (its data is there)",
                code="addons_unavailable")
        if not fresh:
            raise errors.Unavailable("no runner is alive to run a dedicated server",
                                     code="addons_unavailable")
        instances = await self.store.list_instances()
        return min(fresh, key=lambda n: (sum(1 for i in instances if i.node == n.id), n.id))

    async def _image_or_none(self, app: App) -> str:
        """The image a dedicated server's sandbox mounts: the current release's, or ""
        before the app's first deploy (the runner's empty image; the server's binaries
        come from the host either way)."""
        from epio.api.state import current_release

        release = await current_release(self.store, app.name)
        return str(release.image) if release is not None and release.image else ""

    async def _set_var(self, app: App, kind: str, addon: Addon, description: str | None,
                       who: str | None) -> None:
        """Set the app's config var (with a new release when ``description``)."""
        url = addon_url(addon)
        var = CONFIG_VAR[kind]
        if description is None:
            await self.store.set_config(app.name, {var: url})
            return
        await self.store.set_config_and_release(
            app.name, {var: url}, description=description, created_by=who,
            **await self._release_kwargs(app))
        self._wake()

    async def _release_kwargs(self, app: App) -> dict[str, Any]:
        from epio.api.state import current_release

        current = await current_release(self.store, app.name)
        if current is None:
            return {"inherit_image": False}
        return {"image": current.image, "processes": dict(current.processes),
                "meta": dict(current.meta), "inherit_image": False}

    async def _drop(self, addon: Addon) -> None:
        if addon.plan == "shared":
            if self.shared is None:
                raise errors.Unavailable("no shared PostgreSQL is configured; cannot drop "
                                         "the database", code="addons_unavailable")
            try:
                await self.shared.deprovision(addon.app)
            except AddonError as e:
                raise errors.Unavailable(str(e), code="addons_unavailable") from None
            return
        if addon.instance:
            for i in await self.store.list_instances(addon.app):
                if i.id != addon.instance:
                    continue
                node = None
                try:
                    node = await self.store.get_node(i.node or "")
                except StoreNotFound:
                    pass  # the node is gone, and its server with it
                except Exception as e:
                    self.log.warn("cannot look up node {node} of {app}'s {kind} server: "
                                  "{error}", node=i.node, app=addon.app, kind=addon.kind,
                                  error=str(e) or type(e).__name__)
                if node is not None and node.control_endpoint:
                    try:
                        await self.control.request(node.control_endpoint, "runner.stop",
                                                   {"instance_id": i.id, "grace": 10.0},
                                                   timeout=30.0)
                    except Exception as e:
                        self.log.warn("stopping {id} failed: {error}", id=i.id,
                                      error=getattr(e, "message", None) or type(e).__name__)
                await self.store.delete_instance(i.id)
        if addon.options.get("standby_instance"):
            await self._stop_instance(str(addon.options["standby_instance"]), 10.0, 30.0)
        # the data directory (.epio-<kind>-<data_key>) stays on the runner, under the
        # app's data dir, until the app is deleted; the final backup is in the backup
        # store.  A new add-on of the same kind gets a new key, so a directory of its own.

    # --- btrfs snapshots of dedicated data dirs -----------------------------------

    async def _snapshot_target(self, app: App, kind: str) -> tuple[Addon, str, str]:
        """The dedicated add-on, its runner's control endpoint and its data dir name."""
        addon = await self.get(app, kind)
        if addon.plan != "dedicated" or not addon.node:
            raise errors.Conflict(f"the {kind} add-on of {app.name} is not a dedicated server: "
                                  "it has no snapshots", code="no_snapshots")
        runner = await self._pick_runner(addon.node)  # 503 when its node is not alive
        base = REDIS_DIR if kind == "redis" else POSTGRES_DIR
        addon_dir = data_dir_name(base, str(addon.options.get("data_key") or ""))
        return addon, str(runner.control_endpoint), addon_dir

    async def _runner_call(self, endpoint: str, mtype: str, body: dict[str, Any]) -> Any:
        from epio.bus import BusError, RemoteError

        try:
            return await self.control.request(endpoint, mtype, body, timeout=120.0)
        except RemoteError as e:
            if e.code == "snapshot_not_found":
                raise errors.NotFound(e.message, code="snapshot_not_found") from None
            raise errors.Conflict(e.message, code=e.code or "snapshot_failed") from None
        except BusError as e:
            raise errors.Unavailable(f"the runner did not answer: {type(e).__name__}",
                                     code="addons_unavailable") from None

    async def list_snapshots(self, app: App, kind: str) -> list[dict[str, Any]]:
        """The btrfs snapshots of the app's dedicated ``kind`` server, newest first."""
        _, endpoint, addon_dir = await self._snapshot_target(app, kind)
        reply = await self._runner_call(endpoint, "runner.snapshots",
                                        {"app": app.name, "addon_dir": addon_dir})
        return [{"id": str(s["id"]), "kind": kind, "created": float(s["created"])}
                for s in reply.get("snapshots") or []]

    async def restore_snapshot(self, user: User, app: App, kind: str,
                               snapshot_id: str) -> dict[str, Any]:
        """Stop the server, make its data dir the snapshot's (the previous one kept beside
        it), start it again and wait until it accepts connections."""
        addon, endpoint, addon_dir = await self._snapshot_target(app, kind)
        known = {s["id"] for s in await self.list_snapshots(app, kind)}
        if snapshot_id not in known:
            raise errors.NotFound(f"{app.name}'s {kind} has no snapshot {snapshot_id!r}",
                                  code="snapshot_not_found")
        image = str(addon.options.get("image") or await self._image_or_none(app))
        # the stopped instance stays recorded until the new one is: the keeper must not
        # start the server again while its data dir is being switched
        if addon.instance:
            await self._runner_call(endpoint, "runner.stop",
                                    {"instance_id": addon.instance,
                                     "grace": self.settings.service_stop_timeout})
        try:
            reply = await self._runner_call(endpoint, "runner.snapshot_restore",
                                            {"app": app.name, "addon_dir": addon_dir,
                                             "id": snapshot_id})
        finally:
            # started again in any case: on its previous data when the restore failed
            new = await self._start_server(app, addon, image, addon.node)
            if addon.instance:
                await self.store.delete_instance(addon.instance)
            if (new.host, new.port) != (addon.host, addon.port):
                await self._set_var(app, kind, new, None, None)
            if new.options.get("standby"):
                # the standby holds the data before the restore, which the primary's
                # history no longer continues: the keeper builds a fresh copy
                await self._standby_failed(new, "the primary's data was restored from a "
                                                "snapshot; a new standby is being built")
        self.log.info("btrfs snapshot {id} of {app}'s {kind} restored by {user}; the previous "
                      "data is kept as {kept}", id=snapshot_id, app=app.name, kind=kind,
                      user=user.name, kept=reply.get("kept_as"))
        return {"kind": kind, "id": snapshot_id, "kept_as": str(reply.get("kept_as"))}

    def _wake(self) -> None:
        if self.scheduler is not None:
            self.scheduler.wake()

    # --- backups ------------------------------------------------------------------

    async def _ask(self, endpoint: str, type: str, body: dict[str, Any],
                   timeout: float) -> dict[str, Any]:
        reply: dict[str, Any] = await self.control.request(endpoint, type, body, timeout=timeout)
        return reply

    async def _listings(self, app: str, kind: str | None = None
                        ) -> list[tuple[str, list[dict[str, Any]]]]:
        """(endpoint, backups) of every backup node that answers within reach_timeout."""
        body: dict[str, Any] = {"app": app}
        if kind:
            body["kind"] = kind
        eps = list(self.settings.backup_endpoints)
        results = await DeferredList(
            [ensureDeferred(self._ask(ep, "backup.list", body, self.settings.reach_timeout))
             for ep in eps], consumeErrors=True)
        out = []
        for ep, (ok, value) in zip(eps, results, strict=True):
            if ok:
                out.append((ep, list(value.get("backups") or [])))
        return out

    async def list_backups(self, app: App, kind: str | None) -> list[dict[str, Any]]:
        listings = await self._listings(app.name, kind)
        if not listings:
            raise self._no_backup_node()
        seen: dict[str, dict[str, Any]] = {}
        for _, backups in listings:
            for r in backups:
                seen.setdefault(str(r.get("id")), describe_backup(r))
        return sorted(seen.values(), key=lambda r: r["created"], reverse=True)

    def _no_backup_node(self) -> errors.ApiError:
        where = ", ".join(self.settings.backup_endpoints) or "none configured"
        return errors.Unavailable(f"no backup node answers (backup.endpoints: {where})",
                                  code="backups_unavailable")

    async def create_backup(self, app: App, kind: str | None) -> list[dict[str, Any]]:
        listings = await self._listings(app.name)
        if not listings:
            raise self._no_backup_node()
        body: dict[str, Any] = {"app": app.name}
        if kind:
            body["kind"] = kind
        reply = await self._remote(self._ask(listings[0][0], "backup.create", body,
                                             self.settings.backup_timeout))
        return [describe_backup(r) for r in reply.get("backups") or []]

    async def _locate(self, app: str, backup_id: str) -> tuple[str, dict[str, Any]]:
        listings = await self._listings(app)
        if not listings:
            raise self._no_backup_node()
        for ep, backups in listings:
            for r in backups:
                if str(r.get("id")) == backup_id:
                    return ep, r
        # no backup node knows it (its disk was wiped): one fetches it from its offsite
        # archive, if it has one (backup_not_found otherwise)
        ep = listings[0][0]
        reply = await self._remote(self._ask(ep, "backup.adopt", {"app": app, "id": backup_id},
                                             self.settings.backup_timeout))
        return ep, dict(reply.get("backup") or {})

    async def restore_backup(self, user: User, app: App, backup_id: str,
                             to_app: str | None, platform: Any) -> dict[str, Any]:
        into = app
        if to_app and to_app != app.name:
            into = await platform.get_app(user, to_app)  # 404 unless the user may see it
        ep, record = await self._locate(app.name, backup_id)
        if record.get("status") != "verified":
            raise errors.Conflict(f"backup {backup_id} is {record.get('status')}, not "
                                  "verified; it cannot be restored", code="backup_failed")
        if await find_addon(self.store, into.name, str(record.get("kind"))) is None and not (
                record.get("kind") == "postgres" and self.shared is not None
                and await self.shared.exists(into.name)):
            raise errors.Conflict(f"{into.name} has no {record.get('kind')} add-on to restore "
                                  "into", code="no_addon")
        body: dict[str, Any] = {"app": app.name, "id": backup_id}
        if into.name != app.name:
            body["to_app"] = into.name
        reply = await self._remote(self._ask(ep, "backup.restore", body,
                                             self.settings.backup_timeout))
        self.log.info("backup {id} of {app} restored into {into} by {user}", id=backup_id,
                      app=app.name, into=into.name, user=user.name)
        return {"app": app.name, "id": backup_id, "into": into.name,
                "kept_as": reply.get("kept_as")}

    async def download(self, app: App, backup_id: str, write: Any,
                       gone: Any = lambda: False) -> None:
        """Stream the backup's file: ``await write(reply, data)`` per chunk (the first
        reply has the size and checksum); stops early when ``gone()`` (client left)."""
        ep, record = await self._locate(app.name, backup_id)
        offset = 0
        while not gone():
            reply = await self._remote(self._ask(ep, "backup.fetch", {
                "app": app.name, "id": backup_id, "offset": offset}, self.settings.backup_timeout))
            data = reply.get("data") or b""
            await write({**reply, "kind": record.get("kind")}, data)
            offset += len(data)
            if reply.get("eof") or not data:
                return

    async def _remote(self, d: Any) -> dict[str, Any]:
        from epio.bus import BusError, RemoteError

        try:
            result: dict[str, Any] = await d
            return result
        except RemoteError as e:
            if e.code == "backup_not_found":
                raise errors.NotFound(e.message, code="backup_not_found") from None
            raise errors.Conflict(e.message, code=e.code or "backup_failed") from None
        except BusError as e:
            raise errors.Unavailable(f"the backup node did not answer: {type(e).__name__}",
                                     code="backups_unavailable") from None

    async def _final_backup(self, app: str, kind: str, force: bool) -> dict[str, Any] | None:
        """Back the add-on up before it is dropped.

        No backup node configured: nothing to do (None).  Configured but none answers,
        or the backup failed: 409 ``final_backup_failed`` unless ``force``.
        """
        if not self.settings.backup_endpoints:
            self.log.warn("no backup node configured (backup.endpoints): {kind} of {app} is "
                          "dropped without a final backup", kind=kind, app=app)
            return None
        listings = await self._listings(app)
        if not listings:
            # backup nodes are configured but down: dropping now would lose the data for
            # good, so this is a failed final backup (force drops anyway)
            where = ", ".join(self.settings.backup_endpoints)
            if force:
                self.log.warn("no backup node answers ({where}): {kind} of {app} is dropped "
                              "without a final backup (force)", where=where, kind=kind, app=app)
                return None
            raise errors.Conflict(
                f"no final backup of {app}'s {kind}: no backup node answers ({where}); "
                "nothing was dropped (force drops without one)", code="final_backup_failed")
        try:
            reply = await self._remote(self._ask(listings[0][0], "backup.create",
                                                 {"app": app, "kind": kind},
                                                 self.settings.backup_timeout))
        except errors.NotFound:
            return None  # nothing to back up (the database is already gone)
        except errors.ApiError as e:
            if force:
                self.log.warn("final backup of {app} failed ({error}); dropping anyway (force)",
                              app=app, error=e.message)
                return None
            raise errors.Conflict(f"the final backup of {app}'s {kind} failed: {e.message}; "
                                  "nothing was dropped", code="final_backup_failed") from None
        records = [describe_backup(r) for r in reply.get("backups") or []]
        bad = [r for r in records if r["status"] != "verified"]
        if bad and not force:
            raise errors.Conflict(
                f"the final backup of {app}'s {kind} failed: {bad[0]['error'] or 'unverified'}; "
                "nothing was dropped", code="final_backup_failed")
        return records[0] if records else None


def addon_url(a: Addon) -> str:
    """DATABASE_URL / REDIS_URL of an add-on (holds the password: never log it)."""
    from urllib.parse import quote

    host = f"[{a.host}]" if a.host and ":" in a.host else str(a.host)
    if a.kind == "redis":
        return f"redis://:{quote(str(a.password), safe='')}@{host}:{a.port}/0"
    return (f"postgresql://{quote(str(a.username), safe='')}:{quote(str(a.password), safe='')}"
            f"@{host}:{a.port}/{quote(str(a.database), safe='')}")


def _host_of(endpoint: str | None) -> str:
    host = urlsplit(endpoint or "").hostname or ""
    return "127.0.0.1" if host in ("", "*", "0.0.0.0", "::", "localhost") else host


async def _redis_ping(addon: Addon) -> None:
    import txredisapi

    conn = await txredisapi.Connection(str(addon.host), int(addon.port or 0),
                                       password=addon.password, reconnect=False)
    try:
        await conn.ping()
    finally:
        await conn.disconnect()


async def _postgres_ensure_db(clock: Any, addon: Addon) -> None:
    """Connect as the app's role; create its database on the first start.

    psycopg2 in a thread: a refused connection while the server boots is a plain
    exception here (txpostgres leaves a dead reader behind on refused connects).
    """
    from twisted.internet.threads import deferToThreadPool

    def work() -> None:
        import psycopg2

        conn = psycopg2.connect(host=addon.host, port=addon.port, user=addon.username,
                                password=addon.password, dbname="postgres", connect_timeout=3)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (addon.database,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{addon.database}"')
        finally:
            conn.close()

    await deferToThreadPool(clock, clock.getThreadPool(), work)


def _postgres_in_recovery(addon: Addon) -> None:
    """The standby accepts the app's role and is in recovery (following its primary)."""
    import psycopg2

    conn = psycopg2.connect(host=addon.host, port=addon.port, user=addon.username,
                            password=addon.password, dbname="postgres", connect_timeout=3)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_is_in_recovery()")
            row = cur.fetchone()
            if not row or not row[0]:
                raise ConnectionError("the standby is not in recovery")
    finally:
        conn.close()


def make_addons(reactor: Any, config: Config, store: Any, control: Any,
                scheduler: Any = None, log_sink: Any = None) -> Addons:
    """The api's :class:`Addons` from the node's settings (add ``addons.keeper(...)``
    to the service tree)."""
    from epio.addons.postgres import SharedPostgres

    settings = AddonSettings.from_config(config)
    shared = None
    if settings.postgres_admin_url:
        shared = SharedPostgres(reactor, settings.postgres_admin_url,
                                settings.postgres_host or None, settings.postgres_port or None)
    return Addons(store, control, reactor, settings, shared, scheduler, log_sink,
                  runner_dead_after=config.settings.api.runner_dead_after)


# --- HTTP routes (bound to epio.api.web.Api; ``api.addons`` is the domain) -------------


def _domain(api: AddonRoutes) -> Addons:
    domain = api.addons
    if domain is None:
        raise errors.Unavailable("add-ons are not available on this api process",
                                 code="addons_unavailable")
    return domain


def _kind(request: IRequest) -> str | None:
    values = request.args.get(b"kind")
    if not values:
        return None
    kind: str = values[0].decode("utf-8", "replace")
    if kind not in KINDS:
        raise errors.BadRequest(f"kind must be one of {', '.join(KINDS)}")
    return kind


class AddonRoutes:
    """The add-on and backup endpoints of :class:`epio.api.web.Api`."""

    addons: Addons | None  # None: no add-ons on this api process (503)
    platform: Any  # epio.api.domain.Platform

    @operation("GET", "/apps/{app}/addons", "listAddons", "The app's add-on databases",
               response=array(ref("Addon")), tag="addons")
    async def list_addons_route(self, request: IRequest, user: User, app: App) -> Any:
        domain = _domain(self)
        return [await domain.describe(a) for a in await domain.addons_of(app)]

    @operation("POST", "/apps/{app}/addons", "createAddon",
               "Provision a database (postgres: shared or dedicated; redis: dedicated) and set "
               "DATABASE_URL / REDIS_URL in a new release", request=ref("NewAddon"),
               response=ref("Addon"), status=201, tag="addons")
    async def create_addon_route(self, request: IRequest, user: User, app: App,
                                 body: dict[str, Any]) -> Any:
        try:
            addon = await _domain(self).create(user, app, body["kind"], body.get("plan"),
                                               body.get("memory_mb"),
                                               bool(body.get("standby")))
        except RedisSpecError as e:
            raise errors.ValidationFailed(str(e)) from None
        return await _domain(self).describe(addon)

    @operation("GET", "/apps/{app}/addons/{kind}", "getAddon",
               "One add-on (its address; the credentials are only in the app's config var)",
               response=ref("Addon"), tag="addons")
    async def get_addon_route(self, request: IRequest, user: User, app: App, kind: str) -> Any:
        domain = _domain(self)
        return await domain.describe(await domain.get(app, kind))

    @operation("POST", "/apps/{app}/addons/{kind}/failover", "failoverAddon",
               "Fence the dedicated server's primary (stopped, and never started again), "
               "promote its standby, set DATABASE_URL / REDIS_URL to it in a new release, "
               "then build a new standby", response=ref("Failover"), tag="addons")
    async def failover_addon_route(self, request: IRequest, user: User, app: App, kind: str) -> Any:
        domain = _domain(self)
        old = await domain.get(app, kind)
        new = await domain.failover(app, kind, user.name)
        described = await domain.describe(new)
        return {"kind": kind, "epoch": described["epoch"], "from_node": old.node,
                "to_node": new.node, "host": new.host, "port": new.port,
                "standby": described["standby"]}

    @operation("DELETE", "/apps/{app}/addons/{kind}", "deleteAddon",
               "Take a final backup (when backup nodes are configured), then drop the database "
               "and unset its config var; a failed final backup, or no backup node answering, "
               "drops nothing (409 final_backup_failed) unless force=true",
               response=ref("AddonDeleted"), tag="addons", query={"force": {"type": "boolean"}})
    async def delete_addon_route(self, request: IRequest, user: User, app: App, kind: str) -> Any:
        force = (request.args.get(b"force") or [b""])[0].lower() in (b"1", b"true", b"yes")
        final = await _domain(self).destroy(user, app, kind, force=force)
        return {"deleted": kind, "final_backup": final}

    @operation("GET", "/apps/{app}/addons/{kind}/snapshots", "listSnapshots",
               "The btrfs snapshots of a dedicated server's data dir on its runner, newest first",
               response=array(ref("Snapshot")), tag="addons")
    async def list_snapshots_route(self, request: IRequest, user: User, app: App, kind: str) -> Any:
        return await _domain(self).list_snapshots(app, kind)

    @operation("POST", "/apps/{app}/addons/{kind}/snapshots/{snapshot_id}/restore",
               "restoreSnapshot",
               "Stop the dedicated server, make its data dir the snapshot's (the previous data dir "
               "is kept beside it on the runner), start it again", response=ref("SnapshotRestored"),
               tag="addons")
    async def restore_snapshot_route(self, request: IRequest, user: User, app: App, kind: str,
                                     snapshot_id: str) -> Any:
        return await _domain(self).restore_snapshot(user, app, kind, snapshot_id)

    @operation("GET", "/apps/{app}/backups", "listBackups",
               "The app's backups on every backup node, newest first (failed ones included, "
               "marked failed)", response=array(ref("Backup")), tag="backups",
               query={"kind": {"type": "string", "enum": list(KINDS)}})
    async def list_backups_route(self, request: IRequest, user: User, app: App) -> Any:
        return await _domain(self).list_backups(app, _kind(request))

    @operation("POST", "/apps/{app}/backups", "createBackup",
               "Back the app's databases up now; answers when each backup is verified or failed",
               request=ref("NewBackup"), response=array(ref("Backup")), status=201, tag="backups")
    async def create_backup_route(self, request: IRequest, user: User, app: App,
                                  body: dict[str, Any]) -> Any:
        return await _domain(self).create_backup(app, body.get("kind"))

    @operation("POST", "/apps/{app}/backups/{backup_id}/restore", "restoreBackup",
               "Restore a verified backup into the app's (or to_app's) database: a new database "
               "first, then a switch; the previous data is kept", request=ref("Restore"),
               response=ref("Restored"), tag="backups")
    async def restore_backup_route(self, request: IRequest, user: User, app: App, backup_id: str,
                                   body: dict[str, Any]) -> Any:
        return await _domain(self).restore_backup(user, app, backup_id, body.get("to_app"),
                                                  self.platform)

    @operation("GET", "/apps/{app}/backups/{backup_id}/download", "downloadBackup",
               "The backup file (pg_dump custom format or Redis RDB), streamed; X-Backup-Sha256 "
               "and X-Backup-Status headers", response={"type": "string", "format": "binary"},
               response_type="application/octet-stream", tag="backups", raw=True)
    async def download_backup_route(self, request: server.Request, user: User, app: App,
                                    backup_id: str) -> Any:
        started = False

        async def write(reply: dict[str, Any], data: bytes) -> None:
            nonlocal started
            if not started:
                started = True
                request.setResponseCode(200)
                request.setHeader(b"Content-Type", b"application/octet-stream")
                request.setHeader(b"Content-Length", str(int(reply.get("size") or 0)).encode())
                request.setHeader(b"X-Backup-Sha256", str(reply.get("sha256") or "").encode())
                request.setHeader(b"X-Backup-Status", str(reply.get("status") or "").encode())
                ext = "rdb" if reply.get("kind") == "redis" else "dump"
                request.setHeader(b"Content-Disposition",
                                  f'attachment; filename="{app.name}-{backup_id}.{ext}"'.encode())
            if data:
                request.write(data)

        finished: list[bool] = []
        request.notifyFinish().addBoth(lambda _: finished.append(True))
        await _domain(self).download(app, backup_id, write, gone=lambda: bool(finished))
        return b""
