"""The platform's use cases, over the store, the deployer and the scheduler.

HTTP handlers (:mod:`epio.api.web`) call these methods; these call the store
(no SQL here) and raise typed errors (:mod:`epio.api.errors`, or the store's,
mapped by the error layer).  Access rule: an app is visible only to its owner,
its collaborators and admins; to anyone else it does not exist (404).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from epio.api import errors
from epio.api.settings import ApiSettings
from epio.api.spec import HOSTNAME_RULE
from epio.api.state import (
    DEFAULT_SIZE,
    KEEP,
    SERVING_WINDOW,
    SIZES,
    ReleaseState,
    current_release,
    failed_releases,
    kept,
    release_states,
)
from epio.appenv import reserved_reason
from epio.domain import PLATFORM_APP, reserved_app_name_problem
from epio.secretfile import write_secret_file
from epio.store import (
    APP_DESTROYED,
    DEPLOY_FINAL,
    App,
    Change,
    Conflict,
    Deploy,
    Domain,
    HostnameRefused,
    InvalidName,
    Release,
    Store,
    User,
    normalise_hostname,
)
from epio.store import NotFound as StoreNotFound

if TYPE_CHECKING:
    from epio.api.addons import Addons
    from epio.cluster import JoinIssuer, NewJoinToken
    from epio.store.cluster import JoinTokenInfo

ADMIN_NAME = "admin"
#: seconds a one-time dashboard sign-in code (``epio login --web``) stays valid
LOGIN_CODE_SECONDS = 120.0
#: facts of one release that a release made from it (rollback, restart) does not copy
RELEASE_ONLY_META = ("rollback_of", "restart_of", KEEP)
ADMIN_TOKEN_FILE = "admin-token"


#: The platform itself as the log and stats endpoints see it (admins only): no app of the
#: store, never owned, never deployed ("App ID 0 is special").
PLATFORM_APP_RECORD = App(name=PLATFORM_APP, owner_id="", uid=0, maintenance=False,
                          created=0.0)


class Platform:
    """Use cases of the API; ``deployer`` and ``scheduler`` may be None in tests."""

    log = Logger()

    def __init__(self, store: Store, settings: ApiSettings, clock: IReactorTime,
                 deployer: Any = None, scheduler: Any = None, *,
                 addons: Addons | None = None, joins: JoinIssuer | None = None) -> None:
        self.store = store
        self.addons = addons
        self.joins = joins  # makes join tokens (epio.cluster); None: this api makes none
        self.settings = settings
        self.clock = clock
        self.deployer = deployer
        self.scheduler = scheduler

    # --- auth -----------------------------------------------------------------

    async def authenticate(self, token: str) -> User:
        user = await self.store.user_for_token(token)
        if user is None:
            raise errors.Unauthorized("the API token is not valid (revoked or mistyped?)")
        return user

    def _require_admin(self, user: User) -> None:
        if not user.is_admin:
            raise errors.Forbidden("only an admin may do this")

    async def _require_owner(self, user: User, app: App) -> None:
        if not (user.is_admin or app.owner_id == user.id):
            raise errors.Forbidden(f"only the owner of {app.name} may do this")

    # --- users and tokens -------------------------------------------------------

    async def list_users(self, user: User) -> list[User]:
        self._require_admin(user)
        return await self.store.list_users()

    async def create_user(self, user: User, name: str, email: str | None,
                          is_admin: bool) -> tuple[User, str]:
        self._require_admin(user)
        new = await self.store.create_user(name, email, is_admin)
        token = await self.store.create_token(new.id, f"first token, created by {user.name}")
        return new, token.token

    # --- cluster ----------------------------------------------------------------

    async def create_join_token(self, user: User, node_id: str | None,
                                ttl: float | None) -> NewJoinToken:
        """A single-use join token for one new host (admins only; epio.cluster)."""
        self._require_admin(user)
        if self.joins is None:
            raise errors.Conflict("this api makes no join tokens: its store is not "
                                  "PostgreSQL (a single-box store cannot be joined)",
                                  code="not_a_cluster")
        new = await self.joins.issue(self.store, node_id, ttl, f"user {user.name}")
        self.log.info("{user} made join token {id} for node {node_id}, valid until {expires}",
                      user=user.name, id=new.info.id, node_id=new.info.node_id,
                      expires=new.info.expires)
        return new

    async def list_join_tokens(self, user: User) -> list[JoinTokenInfo]:
        self._require_admin(user)
        from epio.store.cluster import list_join_tokens

        return await list_join_tokens(self.store)

    async def create_login_code(self, user: User) -> tuple[str, float]:
        """A one-time code that signs the dashboard in as ``user`` (epio.store.logins)."""
        from epio.store.logins import create_login_code

        code, expires = await create_login_code(self.store, user.id, LOGIN_CODE_SECONDS)
        self.log.info("{user} asked for a dashboard sign-in link", user=user.name)
        return code, expires

    async def sign_in_with_code(self, code: str) -> tuple[User, str]:
        """Use up a one-time code: its user and a new API token for the dashboard."""
        from epio.store.logins import redeem_login_code

        user_id = await redeem_login_code(self.store, code)
        user = None
        if user_id is not None:
            try:
                user = await self.store.get_user(user_id)
            except StoreNotFound:
                user = None
        if user is None:
            raise errors.ApiError(
                "this sign-in link does not work: it was used already, it expired (after "
                f"{LOGIN_CODE_SECONDS:g} seconds) or it was cut short; run `epio login "
                "--web` again", code="invalid_login_code", status=400)
        token = await self.store.create_token(user.id, "dashboard sign-in (epio login --web)")
        self.log.info("{user} signed the dashboard in with a one-time link", user=user.name)
        return user, token.token

    async def list_tokens(self, user: User) -> list[Any]:
        return await self.store.list_tokens(user.id)

    async def create_token(self, user: User, description: str) -> Any:
        return await self.store.create_token(user.id, description)

    async def delete_token(self, user: User, token_id: str) -> None:
        await self.store.revoke_token(token_id, user.id)

    # --- apps -------------------------------------------------------------------

    async def get_app(self, user: User, name: str, logs: bool = False) -> App:
        """The app if ``user`` may see it; NotFound otherwise (missing or not theirs).

        With ``logs`` (the log and stats endpoints), an admin may also name the
        platform itself (:data:`PLATFORM_APP`): its router access log and stats."""
        if logs and name == PLATFORM_APP and user.is_admin and self.settings.platform_hostname:
            return PLATFORM_APP_RECORD
        if not await self.store.can_access(name, user.id):
            raise errors.NotFound(f"no app named {name!r}")
        try:
            return await self.store.get_app(name)
        except StoreNotFound:
            raise errors.NotFound(f"no app named {name!r}") from None

    async def list_apps(self, user: User) -> list[App]:
        return await self.store.list_apps(None if user.is_admin else user.id)

    async def create_app(self, user: User, name: str) -> App:
        problem = reserved_app_name_problem(name, self.settings.platform_hostname,
                                            self.settings.domain)
        if problem is not None:
            raise errors.Conflict(problem)
        app = await self.store.create_app(name, user.id, uids=self.settings.uids,
                                          limits=self.settings.app_limits)
        self.log.info("app {app} created by {user}", app=name, user=user.name)
        return app

    async def describe_app(self, app: App) -> dict[str, Any]:
        return (await self.describe_apps([app]))[0]

    async def describe_apps(self, apps: list[App]) -> list[dict[str, Any]]:
        """The App shape of each app (users and instances read once for the list)."""
        if not apps:
            return []
        users = {u.id: u.name for u in await self.store.list_users()}
        instances = await self.store.list_instances(apps[0].name if len(apps) == 1 else None)
        # a few queries for the whole list, not three per app (1,000 apps: docs/apps.md
        # "Density")
        releases, deploys, collaborators = await self.store.recent_by_app(
            [a.name for a in apps], SERVING_WINDOW)
        healthy: dict[str, dict[str, int]] = {}
        for inst in instances:
            if inst.state == "healthy":
                counts = healthy.setdefault(inst.app, {})
                counts[inst.process_type] = counts.get(inst.process_type, 0) + 1
        out = []
        for app in apps:
            states = release_states(releases[app.name], deploys[app.name])
            serving = next((v for v, s in states.items() if s.status == "current"), None)
            out.append({
                "name": app.name, "owner": users.get(app.owner_id, app.owner_id),
                "url": self.settings.url_of(app.name), "created": app.created,
                "maintenance": app.maintenance,
                "release": serving,  # "current" in releases
                "collaborators": [u.name for u in collaborators[app.name]],
                "processes": healthy.get(app.name, {}),
            })
        return out

    async def delete_app(self, user: User, app: App) -> App:
        """Destroy an app: final backups of its add-ons (servers still up), stop its
        instances, then keep everything of it for ``destroyed_grace`` seconds, out of
        sight (no routes, no instances, 404), listed by :meth:`list_destroyed`."""
        await self._require_owner(user, app)
        # first: a build finishing now must not make a release, provision add-ons or
        # run the release command (migrations) after the final backups (the deployer
        # stops at its next step; destroy_app fails any deploy started meanwhile)
        for deploy_id in await self.store.fail_running_deploys(app.name, APP_DESTROYED):
            self.log.info("deploy {id} of {app} failed: app destroyed", id=deploy_id,
                          app=app.name)
        if self.addons is not None:
            await self.addons.app_destroyed(app)
        if self.scheduler is not None:
            await self.scheduler.stop_app(app.name)
        destroyed = await self.store.destroy_app(
            app.name, self.clock.seconds() + self.settings.destroyed_grace, by=user.id)
        self.log.info("app {app} destroyed by {user}; kept until {purge_after}", app=app.name,
                      user=user.name, purge_after=destroyed.purge_after)
        return destroyed

    async def list_destroyed(self, user: User) -> list[App]:
        """Destroyed apps not purged yet: the caller's own (every one for admins)."""
        apps = await self.store.list_apps(None if user.is_admin else user.id, destroyed=True)
        return [a for a in apps if user.is_admin or a.owner_id == user.id]

    async def get_destroyed(self, user: User, name: str) -> App:
        """A destroyed app its owner (or an admin) may restore or purge; 404 otherwise."""
        try:
            app = await self.store.get_app(name, destroyed=True)
        except StoreNotFound:
            app = None
        if app is None or not (user.is_admin or app.owner_id == user.id):
            raise errors.NotFound(f"no destroyed app named {name!r}")
        return app

    async def describe_destroyed(self, apps: list[App]) -> list[dict[str, Any]]:
        users = {u.id: u.name for u in await self.store.list_users()}
        out = []
        for app in apps:
            addons = ([a.kind for a in await self.addons.addons_of(app)]
                      if self.addons is not None else [])
            out.append({"name": app.name, "owner": users.get(app.owner_id, app.owner_id),
                        "created": app.created, "destroyed": app.destroyed,
                        "purge_after": None if app.purging else app.purge_after,
                        "purging": app.purging, "addons": addons})
        return out

    async def restore_app(self, user: User, name: str) -> App:
        """Bring a destroyed app back as it was: the scheduler places its instances,
        the add-ons keeper starts its dedicated servers on their data again."""
        app = await self.get_destroyed(user, name)
        restored = await self.store.restore_app(app.name)
        self.log.info("app {app} restored by {user}", app=app.name, user=user.name)
        self._wake()
        return restored

    async def purge_app(self, user: User | None, app: App) -> None:
        """Delete a destroyed app for good: add-ons dropped, data dirs deleted on the
        runners, every row of it gone; its UID is free again.

        The purge is claimed first (atomically, only while the app is still
        destroyed): a restore that won the race makes this a 404 before anything is
        dropped, and one that comes later is refused (409) -- never a live app's data
        dropped. The final delete again only deletes a destroyed app."""
        try:
            app = await self.store.claim_purge(app.name)
        except StoreNotFound:
            raise errors.NotFound(f"no destroyed app named {app.name!r}") from None
        if self.addons is not None:
            await self.addons.app_purged(app)
        if self.scheduler is not None:
            await self.scheduler.purge_app_data(app)
        await self.store.delete_app(app.name, by=user.id if user is not None else None,
                                    destroyed_only=True)
        self.log.info("app {app} purged by {who}", app=app.name,
                      who=user.name if user is not None else "its grace period's end")

    async def list_collaborators(self, app: App) -> list[str]:
        return [u.name for u in await self.store.list_collaborators(app.name)]

    async def add_collaborator(self, user: User, app: App, name: str) -> None:
        await self._require_owner(user, app)
        other = await self.store.get_user_by_name(name)
        await self.store.add_collaborator(app.name, other.id)

    async def remove_collaborator(self, user: User, app: App, name: str) -> None:
        await self._require_owner(user, app)
        try:
            other = await self.store.get_user_by_name(name)
        except StoreNotFound:
            raise errors.NotFound(f"{name} is not a collaborator of {app.name}") from None
        await self.store.remove_collaborator(app.name, other.id)

    # --- releases -----------------------------------------------------------------

    async def describe_releases(self, app: App) -> list[dict[str, Any]]:
        releases = await self.store.list_releases(app.name)
        states = release_states(releases, await self.store.list_deploys(app.name, limit=200))
        return [_release(r, states[r.version]) for r in releases]

    async def describe_release(self, app: App, version: int) -> dict[str, Any]:
        release = await self.store.get_release(app.name, version)
        releases = await self.store.list_releases(app.name, limit=200)
        if all(r.version != version for r in releases):
            releases.append(release)
        states = release_states(releases, await self.store.list_deploys(app.name, limit=200))
        return _release(release, states[version])

    async def rollback(self, user: User, app: App, version: int | None) -> Release:
        """A new release with an earlier release's image, processes and config vars."""
        current = await current_release(self.store, app.name)
        failed = await failed_releases(self.store, app.name)
        if version is None:
            if current is None:
                raise errors.Conflict(f"{app.name} has no release to roll back from")
            candidates = [r for r in await self.store.list_releases(app.name)
                          if r.version < current.version and r.version not in failed
                          and r.image is not None]
            if not candidates:
                raise errors.Conflict(f"{app.name} has no earlier release to roll back to")
            target = candidates[0]
        else:
            target = await self.store.get_release(app.name, version)
            if target.version in failed:
                raise errors.Conflict(f"v{version} failed to deploy; it cannot be rolled back to")
        if target.image is None:
            raise errors.Conflict(f"v{target.version} has no image (it was never deployed)")
        extra: dict[str, str] = {}
        if self.addons is not None:  # add-on URLs follow the databases, not the release
            extra = await self.addons.config_vars(app)
        release = await self._release_again(
            user, app, target, f"Rollback to v{target.version}",
            {"rollback_of": target.version}, extra)
        await self._roll_out(user, app, release, "rollback")
        return release

    async def restart(self, user: User, app: App, ptype: str | None) -> Release:
        """Restart every instance of the app (or of one process type): a new release
        with the current release's image, processes and config, rolled out like a
        config change -- each type per its rollover (start-first: the new instances
        are healthy, and routed, before the old ones drain; stop-first: the old ones
        exit first).  A restart of one type keeps the other types' instances (the
        release's ``keep``, :func:`epio.api.state.runs`)."""
        current = await current_release(self.store, app.name)
        if current is None or current.image is None:
            raise errors.Conflict(f"{app.name} has nothing to restart yet: deploy it first",
                                  code="nothing_to_restart")
        meta: dict[str, Any] = {"restart_of": current.version}
        if ptype is not None:
            if ptype not in current.processes:
                raise errors.ValidationFailed(no_such_type(app, ptype, current.processes),
                                              code="unknown_process_type")
            before = kept(current.meta)
            meta[KEEP] = {t: before.get(t, current.version)
                          for t in sorted(current.processes) if t != ptype}
        release = await self._release_again(
            user, app, current, "Restart" + (f" {ptype}" if ptype else ""), meta, {})
        self.log.info("{app} restarted by {user}: v{release}{only}", app=app.name,
                      user=user.name, release=release.version,
                      only=f" ({ptype} only)" if ptype else "")
        await self._roll_out(user, app, release, "restart")
        return release

    async def _release_again(self, user: User, app: App, target: Release, description: str,
                             meta: dict[str, Any], extra: dict[str, str]) -> Release:
        """A new release with ``target``'s image, processes, config (plus ``extra``
        vars) and meta (without what only ``target`` was: a rollback's or a restart's
        facts, replaced by ``meta``); the app's config vars become the release's."""
        old = await self.store.get_config(app.name)
        changes: dict[str, str | None] = {k: None for k in old if k not in target.config}
        changes.update(target.config)
        changes.update(extra)
        own = {k: v for k, v in target.meta.items() if k not in RELEASE_ONLY_META}
        # config and release change together or not at all
        _, release = await self.store.set_config_and_release(
            app.name, changes, image=target.image, processes=target.processes,
            description=description, created_by=user.name, meta={**own, **meta})
        return release

    # --- logs -------------------------------------------------------------------

    async def log_sources(self, app: App) -> list[str]:
        """The sources the app's log may have: the platform's, every process type it
        ever had (releases, formation) and its dedicated servers'."""
        from epio.addons.services import SERVICE_PROCESS_TYPES
        from epio.logclient import PLATFORM_SOURCES

        if app is PLATFORM_APP_RECORD:
            return ["router"]  # the platform's log: its routed requests only

        types = set(await self.store.get_formation(app.name))
        for release in await self.store.list_releases(app.name):
            types.update(release.processes)
        return [*PLATFORM_SOURCES, *sorted(types), *SERVICE_PROCESS_TYPES]

    # --- config -----------------------------------------------------------------

    async def get_config(self, app: App) -> dict[str, str]:
        return await self.store.get_config(app.name)

    async def update_config(self, user: User, app: App, changes: dict[str, str | None]
                            ) -> tuple[dict[str, str], Release]:
        for key, value in changes.items():
            why = reserved_reason(key) if value is not None else None
            if why is not None:
                raise errors.ValidationFailed(f"{key} cannot be set as a config var: {why}",
                                              code="reserved_config_var")
        set_keys = sorted(k for k, v in changes.items() if v is not None)
        unset_keys = sorted(k for k, v in changes.items() if v is None)
        words = []
        if set_keys:
            words.append("Set " + ", ".join(set_keys))
        if unset_keys:
            words.append("Unset " + ", ".join(unset_keys))
        current = await current_release(self.store, app.name)
        # config and its release in one transaction: no config change without a release
        config, release = await self.store.set_config_and_release(
            app.name, changes, description="; ".join(words), created_by=user.name,
            image=current.image if current else None,
            processes=current.processes if current else {},
            meta=dict(current.meta) if current else {}, inherit_image=False)
        await self._roll_out(user, app, release, "config")
        return config, release

    async def _roll_out(self, user: User, app: App, release: Release, kind: str) -> None:
        """A release made without a build rolls out like a deploy's (a deploy record
        in state ``deploying``), when it has something to run."""
        if self.deployer is not None and release.image is not None:
            await self.deployer.rollout(app, release, user.name, kind)
        self._wake()

    # --- formation ----------------------------------------------------------------

    async def describe_formation(self, app: App) -> dict[str, Any]:
        formation = await self.store.get_formation(app.name)
        current = await current_release(self.store, app.name)
        commands = dict(current.processes) if current else {}
        out = []
        for ptype in sorted(set(formation) | set(commands)):
            f = formation.get(ptype)
            size = f.size if f else DEFAULT_SIZE
            out.append({"type": ptype, "quantity": f.quantity if f else 0, "size": size,
                        "command": commands.get(ptype),
                        "limits": dict(f.limits) if f and f.limits else SIZES.get(size, {})})
        return {"processes": out, "sizes": SIZES}

    async def scale(self, user: User, app: App, changes: dict[str, dict[str, Any]]) -> None:
        current = await current_release(self.store, app.name)
        formation = await self.store.get_formation(app.name)
        for ptype, change in changes.items():
            if current is not None and current.processes and ptype not in current.processes:
                raise errors.ValidationFailed(no_such_type(app, ptype, current.processes))
            size = change.get("size")
            if size is not None and size not in SIZES:
                raise errors.ValidationFailed(
                    f"unknown size {size!r}; sizes are: {', '.join(SIZES)}")
        for ptype, change in changes.items():
            cur = formation.get(ptype)
            quantity = change.get("quantity", cur.quantity if cur else 0)
            size = change.get("size") or (cur.size if cur else DEFAULT_SIZE)
            await self.store.set_formation(app.name, ptype, quantity, size, SIZES[size])
        self.log.info("{app} scaled by {user}: {changes}", app=app.name, user=user.name,
                      changes=", ".join(f"{t}={c.get('quantity', '-')}" for t, c in
                                        sorted(changes.items())))
        self._wake()

    async def list_instances(self, app: App) -> list[Any]:
        return [i for i in await self.store.list_instances(app.name) if i.state != "stopped"]

    # --- domains ------------------------------------------------------------------

    def builtin_hostname(self, app: App) -> str:
        return f"{app.name}.{self.settings.domain}"

    async def describe_domains(self, app: App) -> list[dict[str, Any]]:
        from epio.api import serialize

        builtin = Domain(self.builtin_hostname(app), app.name, False, app.created)
        return [serialize.domain(builtin, builtin=True)] + [
            serialize.domain(d) for d in await self.store.list_domains(app.name)]

    async def add_domain(self, user: User, app: App, hostname: str) -> Domain:
        """Route ``hostname`` to ``app`` unless :func:`hostname_refused` says no; every
        refusal has the same code and message as a malformed name (``HOSTNAME_RULE``),
        so it does not tell whether, or by whom, a name is claimed."""
        try:
            host, _ = normalise_hostname(hostname)
        except InvalidName:
            raise refuse_hostname() from None
        if host == self.builtin_hostname(app):
            raise errors.Conflict(f"{host} is already the app's built-in hostname")
        platform = self.settings.platform_hostname
        if platform and (_within(platform, _root(host)) or _within(_root(host), platform)):
            # the platform's own hostname (api.hostname) or a name over or under it
            self.log.info("{user} was refused the platform's hostname {host} for {app}",
                          user=user.name, host=host, app=app.name)
            raise refuse_hostname()
        # checked inside the store's transaction, serialised with every other
        # add_domain: two accounts adding overlapping names at once cannot both pass
        try:
            return await self.store.add_domain(
                app.name, host,
                refused=lambda others: hostname_refused(host, app.name,
                                                        self.settings.domain, others))
        except HostnameRefused:
            self.log.info("{user} was refused the hostname {host} for {app}",
                          user=user.name, host=host, app=app.name)
            raise refuse_hostname() from None

    async def remove_domain(self, user: User, app: App, hostname: str) -> None:
        if hostname.lower() == self.builtin_hostname(app):
            raise errors.Conflict("the app's built-in hostname cannot be removed")
        await self.store.remove_domain(app.name, hostname)

    # --- deploys ------------------------------------------------------------------

    async def start_deploy(self, user: User, app: App, tarball: bytes) -> Deploy:
        if self.deployer is None:
            raise errors.Unavailable("this api process cannot deploy (no deployer)")
        deploy: Deploy = await self.deployer.start(app, user, tarball)
        return deploy

    async def list_deploys(self, app: App, limit: int) -> list[Deploy]:
        return await self.store.list_deploys(app.name, limit)

    async def get_deploy(self, app: App, deploy_id: str) -> Deploy:
        try:
            deploy = await self.store.get_deploy(deploy_id)
        except StoreNotFound:
            deploy = None
        if deploy is None or deploy.app != app.name:
            raise errors.NotFound(f"{app.name} has no deploy {deploy_id!r}")
        return deploy

    async def watch_deploy(self, app: App, deploy_id: str, log_offset: int,
                           wait: float) -> Deploy:
        """The deploy once its log has more than ``log_offset`` characters or it ended,
        waiting at most ``wait`` seconds for that (the store's ``deploy`` change
        notifications wake it): ``epio deploy`` sees "Deployed" the moment it is
        written instead of at its next poll."""
        deploy = await self.get_deploy(app, deploy_id)
        if wait <= 0 or len(deploy.log) > log_offset or deploy.status in DEPLOY_FINAL:
            return deploy
        woken: Deferred[None] = Deferred()

        def on_change(change: Change) -> None:
            if not woken.called and (change.kind == "resync" or (
                    change.kind == "deploy" and change.id in (deploy.id, None))):
                woken.callback(None)

        def give_up() -> None:
            if not woken.called:
                woken.callback(None)

        timer = self.clock.callLater(wait, give_up)
        listening = ensureDeferred(self.store.subscribe(on_change))
        # a store whose listener is reconnecting: never wait past ``wait`` for it
        listening.addTimeout(max(wait - 0.01, 0.01), self.clock)
        unsubscribe: Any = None
        try:
            try:
                unsubscribe = await listening
            except DeferredTimeout:
                return await self.get_deploy(app, deploy_id)
            deploy = await self.get_deploy(app, deploy_id)  # changed before we listened?
            if len(deploy.log) > log_offset or deploy.status in DEPLOY_FINAL:
                return deploy
            await woken
        finally:
            if timer.active():
                timer.cancel()
            if unsubscribe is not None:
                unsubscribe()
        return await self.get_deploy(app, deploy_id)

    def describe_deploy(self, app: App, d: Deploy, log_offset: int | None) -> dict[str, Any]:
        log = "" if log_offset is None else d.log[log_offset:]
        return {"id": d.id, "app": d.app, "status": d.status, "image": d.image,
                "release": d.release, "reason": d.reason, "created": d.created,
                "finished": d.finished, "log": log, "log_offset": len(d.log),
                "url": self.settings.url_of(app.name)}

    # --- nodes --------------------------------------------------------------------

    async def describe_nodes(self, user: User) -> list[dict[str, Any]]:
        """Every node: control endpoints and isolation facts, for admins only."""
        self._require_admin(user)
        now = self.clock.seconds()
        return [{"id": n.id, "roles": list(n.roles), "control": n.control_endpoint,
                 "boot_id": n.boot_id, "last_seen": n.last_seen,
                 "alive": now - n.last_seen < self.settings.runner_dead_after,
                 "status": dict(n.status)} for n in await self.store.list_nodes()]

    def _wake(self) -> None:
        if self.scheduler is not None:
            self.scheduler.wake()


def no_such_type(app: App, ptype: str, processes: Iterable[str]) -> str:
    """The sentence for a process type the app's release does not have."""
    known = ", ".join(sorted(processes)) or "none"
    return f"{app.name} has no process type {ptype!r} (it has: {known})"


# --- hostnames -----------------------------------------------------------------------

def refuse_hostname() -> errors.ValidationFailed:
    """The one answer for every hostname that cannot be added (malformed or refused)."""
    return errors.ValidationFailed(f"body.hostname {HOSTNAME_RULE}")


def _root(host: str) -> str:
    """The name a claim covers with everything under it: ``x`` for ``x`` and ``*.x``."""
    return host[2:] if host.startswith("*.") else host


def _within(name: str, root: str) -> bool:
    return name == root or name.endswith("." + root)


def hostname_refused(host: str, app: str, platform: str, others: Iterable[str]) -> bool:
    """Whether app ``app`` may not claim the normalised ``host``.

    Refused: IP literals (IPv4 dotted or all-numeric last label, anything with a
    colon), single-label names, ``localhost`` and names under it (RFC 6761); the
    platform domain, names under it other than under the app's own ``app.platform``,
    and wildcards above it; and names that overlap a claim of another account
    (``others``): equal to it, under it, or covering it.  A claim covers its root and
    everything under it (``x`` and ``*.x`` both cover ``x`` and ``*.x``'s names), so
    ``example.com`` of one account keeps ``www.example.com`` and ``*.example.com``
    from everyone else, and ``*.shop.example`` keeps ``a.shop.example`` and
    ``shop.example``; siblings (``a.example.com`` and ``b.example.com``) do not
    overlap.
    """
    root = _root(host)
    labels = root.split(".")
    if ":" in host or len(labels) < 2 or labels[-1].isdigit():
        return True
    try:
        ipaddress.ip_address(root)
        return True
    except ValueError:
        pass
    platform = platform.lower().rstrip(".")
    if not host.endswith(f".{app}.{platform}"):  # the app's own subtree is its own
        if _within(root, "localhost") or _within(root, platform):
            return True
        if _within(platform, root) and host.startswith("*."):
            return True
    for other in others:
        theirs = _root(other)
        if _within(root, theirs) or _within(theirs, root):
            return True
    return False


def _release(r: Release, state: ReleaseState) -> dict[str, Any]:
    d = state.deploy
    return {"version": r.version, "image": r.image, "processes": dict(r.processes),
            "config_keys": sorted(r.config), "description": r.description,
            "created": r.created, "created_by": r.created_by,
            "current": state.status == "current", "status": state.status,
            "kept": state.kept, "deploy": d.id if d is not None else None,
            "reason": d.reason if d is not None and state.status == "failed" else None}


async def ensure_admin(store: Store, data_dir: Path) -> Path | None:
    """On a store without users: create the admin and write its token (0600).

    Returns the token file's path when it was written now, None otherwise.
    """
    if await store.list_users():
        return None
    try:
        admin = await store.create_user(ADMIN_NAME, None, is_admin=True)
    except Conflict:
        return None  # another api process got there first
    token = await store.create_token(admin.id, "admin token created on first start")
    return write_token_file(data_dir, token.token)


def write_token_file(data_dir: Path, token: str) -> Path:
    """Write ``token`` to ``data_dir/admin-token`` (0600, atomically); return the path.

    The file gets the data dir's owner, so a token written by root for a node
    that runs as its own user stays readable by that user (and nobody else).
    """
    path = data_dir / ADMIN_TOKEN_FILE
    st = data_dir.stat()
    owner = None
    if os.geteuid() == 0 and (st.st_uid, st.st_gid) != (0, 0):
        owner = (st.st_uid, st.st_gid)
    # Never opens, chmods or chowns anything planted in the data dir (its owner
    # is not root): see epio.secretfile.
    write_secret_file(path, token + "\n", 0o600, owner)
    return path
