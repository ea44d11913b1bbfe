"""Deploys: tarball -> build on a runner -> release -> rollout, recorded in the store.

A deploy is a small state machine kept in the store's ``deploys`` row (the
transition table is ``epio.store.DEPLOY_TRANSITIONS``, drawn in docs/deploys.md)::

    pending -> building -> built -> deploying -> succeeded
        \\________\\__________\\___________\\-> failed (reason) / cancelled

A config change or a rollback makes its release at once: :meth:`Deployer.rollout`
records a deploy that starts ``deploying``.  The deploy records the api process
running it (``meta.owner``); when that process is gone the scheduler leader
decides it (epio.api.scheduler ``_recover_deploys``).

* **build**: ``runner.build`` to the least loaded reachable runner (the build
  output goes to the app's log stream, source ``build``; the runner answers
  ``runner.built`` {digest, manifest} or an error ``build_failed``);
* **release**: a new release on the built image with the manifest's process
  types and the app's config vars; every process type the app's formation
  does not have yet (all of them on a first deploy) is scaled to 1 -- a
  Procfile ``release:`` line is the release phase, not a process type;
* **rollout**: the scheduler (leader) starts instances of the new release; the
  deploy waits until every wanted instance is ``healthy`` (as folded into the
  store from ``runner.status``), then until every nexus lists the new web
  instances in the app's route (routers follow the nexuses; checked every
  ``ROUTED_POLL`` s, at most ``api.drain_seconds``), and succeeds.  An instance of the new release that ``failed`` or
  crashed again and again, or no health within ``api.rollout_timeout``, fails
  the deploy: its release becomes "failed", the current release stays the
  previous one and the scheduler stops the new instances.

Progress lines are appended to the deploy's log (``GET .../deploys/{id}``,
polled with ``log_offset`` by ``epio deploy``) and sent to the app's log.
"""

from __future__ import annotations

from collections.abc import Coroutine, Mapping
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from epio.api.control import IRunnerControl
from epio.api.settings import ApiSettings
from epio.api.state import (
    DEFAULT_SIZE,
    SIZES,
    current_release,
    kept,
    platform_line,
    processes_of,
    release_facts,
    rollout_verdict,
    routers_have,
    runs,
    serving_release,
)
from epio.store import (
    DEPLOY_FINAL,
    App,
    Change,
    Deploy,
    Instance,
    InvalidTransition,
    NotFound,
    Release,
    Store,
    User,
)

if TYPE_CHECKING:
    from epio.api.addons import Addons
    from epio.api.run import RunSessions


def formation_text(formation: Mapping[str, Any], processes: Mapping[str, str],
                   new_types: list[str]) -> str:
    """``web=1, worker=1 (started: worker)``: the formation a release rolls out."""
    parts = [f"{t}={formation[t].quantity}" if t in formation else f"{t}=0"
             for t in sorted(processes)]
    text = ", ".join(parts) or "nothing"
    if new_types:
        text += f" (new process types start with 1: {', '.join(new_types)}; "\
                "change it with `epio scale`)"
    return text


class DeployFailed(Exception):
    """The deploy cannot go on; the message is the reason shown to the user."""

    status = "failed"


class DeployInterrupted(Exception):
    """The api process is stopping: the deploy ends where it is (see Deployer.stop)."""


STOPPED = "the api process running it stopped; deploy again"
#: lines of a failing instance's output a deploy's log shows (runner.status ``tail``
#: carries at most as many, docs/messages.md)
TAIL_LINES = 20
#: seconds between two looks at the store while a rollout waits for healthy instances
#: (at most ``api.reconcile_interval``): a few small queries, and what the deploy adds
#: after its instance is healthy
ROLLOUT_POLL = 0.2
#: seconds between two ``nexus.where`` asks while the deploy waits for routers to route
#: the new instances
ROUTED_POLL = 0.1


class DeploySuperseded(DeployFailed):
    """A newer release became current while this deploy rolled out."""

    status = "cancelled"


class Deployer:
    """Runs deploys in this api process (each is a coroutine kept until it ends)."""

    log = Logger()

    def __init__(self, store: Store, control: IRunnerControl, clock: IReactorTime, settings: ApiSettings,
                 scheduler: Any = None, log_sink: Any = None,
                 owner: Mapping[str, str] | None = None, *, addons: Addons | None = None,
                 run_sessions: RunSessions | None = None) -> None:
        self.store = store
        self.addons = addons  # [services] of a deploy (None in tests without add-ons)
        self.run_sessions = run_sessions  # the [release] command (epio.api.run)
        self.control = control
        self.clock = clock
        self.settings = settings
        self.scheduler = scheduler
        self.log_sink = log_sink
        # which api process runs a deploy ({"node", "boot"}, kept in the deploy's meta):
        # when that process is gone, the scheduler leader decides the deploy at once
        self.owner = dict(owner or {})
        self.running: dict[str, Deferred[None]] = {}
        self.stopping = False

    def _track(self, deploy: Deploy, d: Deferred[None]) -> None:
        if not d.called:
            self.running[deploy.id] = d

            def done(result: Any) -> Any:
                self.running.pop(deploy.id, None)
                return result

            d.addBoth(done)

    async def start(self, app: App, user: User, tarball: bytes) -> Deploy:
        deploy = await self.store.create_deploy(
            app.name, "pending", created_by=user.name,
            meta={"upload_bytes": len(tarball), "kind": "deploy", "owner": self.owner})
        self._track(deploy, ensureDeferred(self._run(app, deploy, self._deploy(app, deploy,
                                                                                tarball))))
        return deploy

    async def rollout(self, app: App, release: Release, created_by: str | None,
                      kind: str) -> Deploy:
        """Roll out a release made without a build (``kind``: ``config``, ``rollback``):
        a deploy record that starts ``deploying`` and ends like a deploy's rollout."""
        deploy = await self.store.create_deploy(app.name, "deploying", created_by=created_by,
                                                meta={"kind": kind, "owner": self.owner})
        deploy = await self.store.update_deploy(
            deploy.id, release=release.version, image=release.image,
            append_log=f"{release.description}: v{release.version}; rolling out\n")
        self._track(deploy, ensureDeferred(self._run(app, deploy, self._finish_rollout(
            app, deploy, release.version, dict(release.processes), kept(release.meta)))))
        return deploy

    async def stop(self) -> None:
        """The api is stopping: mark this process's running builds failed.

        Nothing is cancelled (a store transaction or a build request must not be cut
        in the middle); each running deploy stops at its next step instead.  A
        rollout (``deploying``) is left as it is: the scheduler leader finishes it
        from what the instances report once this process is gone.
        """
        self.stopping = True
        for deploy_id in list(self.running):
            try:
                d = await self.store.get_deploy(deploy_id)
                if d.finished is None and d.status != "deploying":
                    await self.store.update_deploy(
                        deploy_id, status="failed", reason=STOPPED,
                        append_log=f"Deploy failed: {STOPPED}\n")
            except (NotFound, InvalidTransition):
                pass  # deleted with its app, or ended meanwhile
            except Exception:
                self.log.failure("marking deploy {id} failed failed", id=deploy_id)

    async def wait(self, deploy_id: str) -> None:
        """Until the deploy run by this process (if any) ended."""
        d = self.running.get(deploy_id)
        if d is not None:
            waiter: Deferred[None] = Deferred()

            def fire(result: Any) -> Any:
                waiter.callback(None)
                return result

            d.addBoth(fire)
            await waiter

    async def _say(self, deploy: Deploy, text: str, **changes: Any) -> Deploy:
        if self.stopping:
            raise DeployInterrupted()
        platform_line(self.log_sink, deploy.app, text)
        new = await self.store.update_deploy(deploy.id, append_log=text + "\n", **changes)
        if new.finished is not None and changes.get("status") not in DEPLOY_FINAL:
            # decided elsewhere meanwhile (its app destroyed: Store.fail_running_deploys):
            # no further step of it runs
            raise InvalidTransition(f"deploy {deploy.id} already ended: {new.reason}")
        return new

    async def _run(self, app: App, deploy: Deploy, work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        except DeployFailed as e:
            await self._fail(deploy, str(e), e.status)
        except DeployInterrupted:
            pass  # stop() recorded it
        except (NotFound, InvalidTransition) as e:
            # the app was deleted meanwhile (its deploys with it), or someone else
            # decided this deploy (the scheduler leader finishing an orphaned rollout)
            self.log.info("deploy {id} of {app} ended elsewhere: {why}", id=deploy.id,
                          app=app.name, why=str(e))
        except Exception:
            self.log.failure("deploy {id} of {app} failed", id=deploy.id, app=app.name)
            await self._fail(deploy, "internal error (logged on the api node)")

    async def _fail(self, deploy: Deploy, reason: str, status: str = "failed") -> None:
        if self.stopping:
            return  # stop() recorded it
        try:
            what = "cancelled" if status == "cancelled" else "failed"
            # this release is not serving (still deploying): the serving one is kept
            kept = await serving_release(self.store, deploy.app)
            await self._say(deploy, f"Deploy {what}: {reason}"
                            + (f"; v{kept} keeps running" if kept is not None
                               and what == "failed" else ""),
                            status=status, reason=reason, meta={"kept": kept})
        except Exception:
            self.log.failure("recording the failure of deploy {id} failed", id=deploy.id)
        if self.scheduler is not None:
            self.scheduler.wake()

    async def _deploy(self, app: App, deploy: Deploy, tarball: bytes) -> None:
        deploy = await self._say(deploy, f"Received {len(tarball) / 1e3:.1f} kB for {app.name}")
        runner = await self._pick_runner()
        if self.addons is not None:  # [services] first: the build sees DATABASE_URL/REDIS_URL
            await self._addons(self.addons.before_build(app, tarball,
                                                        lambda text: self._say(deploy, text)))
        deploy = await self._say(deploy, f"Building on {runner.id}...", status="building")
        config = await self.store.get_config(app.name)
        try:
            built = await self.control.request(
                runner.control_endpoint, "runner.build",
                {"build_id": deploy.id, "app": app.name, "tarball": tarball, "env": config,
                 "app_created": app.created},
                timeout=self.settings.build_timeout)
        except Exception as e:
            message = getattr(e, "message", None) or str(e) or type(e).__name__
            raise DeployFailed(f"build failed: {message}") from None
        digest = str(built.get("digest") or "")
        manifest = built.get("manifest") or {}
        if not digest:
            raise DeployFailed("the runner's build reply had no image digest")
        duration = built.get("duration")
        deploy = await self._say(
            deploy, f"Built image {digest[:19]}"
            + (f" in {float(duration):.1f}s" if isinstance(duration, int | float) else ""),
            status="built", image=digest)
        processes = processes_of(manifest)
        if not processes:
            raise DeployFailed("the app defines no process: add [wsgi] entrypoint to epio.ini "
                               "or a Procfile")
        if self.addons is not None:  # [services] of the built manifest; dedicated servers up
            await self._addons(self.addons.on_deploy(app, manifest, digest,
                                                     lambda text: self._say(deploy, text)))
        from epio.api.run import release_phase  # [release] command, before any traffic

        deploy = await release_phase(self, app, deploy, runner, digest, manifest)
        release = await self.store.create_release(
            app.name, digest, processes=processes, description=f"Deploy {digest[:12]}",
            created_by=deploy.created_by, meta={"deploy": deploy.id, **release_facts(manifest)},
            inherit_image=False)
        formation = await self.store.get_formation(app.name)
        new_types = sorted(t for t in processes if t not in formation)
        for ptype in new_types:  # first deploy (or a type seen first now): one of each
            await self.store.set_formation(app.name, ptype, 1, DEFAULT_SIZE,
                                           SIZES[DEFAULT_SIZE])
        if new_types:
            formation = await self.store.get_formation(app.name)
        deploy = await self._say(
            deploy, f"Release v{release.version} ({', '.join(sorted(processes))}); rolling out "
            f"{formation_text(formation, processes, new_types)}",
            status="deploying", release=release.version)
        await self._finish_rollout(app, deploy, release.version, processes)

    async def _finish_rollout(self, app: App, deploy: Deploy, version: int,
                              processes: Mapping[str, str],
                              keep: Mapping[str, int] | None = None) -> None:
        """Wait until the release's instances are healthy (then routers switched) and
        record it as current; DeployFailed when they do not become healthy."""
        if self.scheduler is not None:
            self.scheduler.wake()
        formation = await self.store.get_formation(app.name)
        want = {t: f.quantity for t, f in formation.items()
                if t in processes and f.quantity > 0}
        if not await self._wait_healthy(app, version, want, deploy, keep or {}):
            return
        await self._wait_routed(app, version, want, keep or {})
        where = f": {self.settings.url_of(app.name)}" if "web" in want else ""
        await self._say(deploy, f"Deployed v{version}{where}", status="succeeded")

    async def _wait_routed(self, app: App, version: int, want: Mapping[str, int],
                           keep: Mapping[str, int]) -> None:
        """Until routers send traffic to the release's healthy web instances (every
        nexus lists them, :func:`routers_have`), at most ``api.drain_seconds``: the
        CLI says "live" only then.  A release with no web process routes nothing."""
        web = self.settings.web_process_types
        if not any(t in web for t in want):
            return
        deadline = self.clock.seconds() + self.settings.drain_seconds
        while True:
            new = [i for i in await self.store.list_instances(app.name)
                   if runs(i, version, keep) and i.process_type in web]
            healthy = [i for i in new if i.state == "healthy"]
            asleep = [i for i in new if i.state == "asleep"]  # an asleep app's release
            if await routers_have(self.control, self.settings, self.clock, app.name,
                                  healthy, asleep) or self.clock.seconds() >= deadline:
                return
            await deferLater(self.clock, ROUTED_POLL, lambda: None)

    async def _show_tail(self, deploy: Deploy, inst: Instance) -> Deploy:
        """Put the last lines of an instance's output (from its runner's
        ``runner.status``) in the deploy's log: why it did not become healthy."""
        nodes = {n.id: n for n in await self.store.list_nodes(role="runner")}
        node = nodes.get(inst.node or "")
        lines: list[str] = []
        if node is not None and node.control_endpoint:
            try:
                reply = await self.control.request(node.control_endpoint, "runner.status", {},
                                                   timeout=self.settings.status_timeout)
            except Exception as e:
                self.log.info("no output of {id} from {node}: {error}", id=inst.id,
                              node=node.id, error=str(e) or type(e).__name__)
            else:
                for info in reply.get("instances") or []:
                    if isinstance(info, dict) and info.get("instance_id") == inst.id:
                        lines = [str(t) for t in info.get("tail") or []][-TAIL_LINES:]
        name = f"{inst.process_type}.{inst.number}"
        if not lines:
            return await self._say(deploy, f"  {name} wrote no output")
        return await self._say(deploy, f"  last {len(lines)} lines of {name}'s output:\n"
                               + "\n".join(f"  | {t}" for t in lines))

    async def _hint_reports(self, app: str, version: int, instances: list[Instance],
                            hinted: set[tuple[str, str]]) -> None:
        """Wake the scheduler leader (a ``reported`` store notification) when a nexus
        shows an instance of the release in another state than the store does.

        The store learns instance states at the leader's passes (every
        ``api.reconcile_interval``, 2 s), so a release healthy on its runner waited up
        to that long before the deploy saw it; the runner announces a change to the
        nexuses at once.  One ``nexus.where`` each look (``ROLLOUT_POLL``), one hint
        per instance and state; the verdict still comes from the store alone."""
        store_state = {i.id: i.state for i in instances if i.release == version}
        if not store_state or not self.settings.nexus_endpoints:
            return
        for endpoint in self.settings.nexus_endpoints:
            try:
                reply = await self.control.request(endpoint, "nexus.where", {"app": app},
                                                   timeout=self.settings.status_timeout)
            except Exception:
                continue
            new: set[tuple[str, str]] = set()
            for e in reply.get("instances") or []:
                iid, state = (e.get("instance_id"), e.get("state")) if isinstance(e, dict) \
                    else (None, None)
                if isinstance(iid, str) and isinstance(state, str) \
                        and store_state.get(iid, state) != state:
                    new.add((iid, state))
            if new - hinted:
                hinted |= new
                try:
                    await self.store.announce(Change("reported", app))
                except Exception as e:  # a hint: the next pass folds them anyway
                    self.log.info("no hint to the scheduler for {app}: {error}", app=app,
                                  error=str(e) or type(e).__name__)
            return  # one answering nexus is enough for a hint

    async def _addons(self, work: Any) -> None:
        try:
            await work
        except Exception as e:
            if not hasattr(e, "code"):  # AddonError/ApiError: a reason; else a bug
                raise
            raise DeployFailed(getattr(e, "message", None) or str(e)) from None

    async def _pick_runner(self) -> Any:
        now = self.clock.seconds()
        nodes = [n for n in await self.store.list_nodes(role="runner") if n.control_endpoint]
        fresh = [n for n in nodes if now - n.last_seen < self.settings.runner_dead_after]
        if not (fresh or nodes):
            raise DeployFailed("no runner is registered; start a node with the runner role")
        instances = await self.store.list_instances()

        def load(n: Any) -> tuple[int, str]:
            return (sum(1 for i in instances if i.node == n.id), n.id)

        return min(fresh or nodes, key=load)

    async def _wait_healthy(self, app: App, version: int, want: dict[str, int],
                            deploy: Deploy, keep: Mapping[str, int]) -> bool:
        """True once every wanted instance is healthy; False when someone else decided
        the deploy meanwhile; DeployFailed when it fails."""
        deadline = self.clock.seconds() + self.settings.rollout_timeout
        reported: dict[str, str] = {}
        hinted: set[tuple[str, str]] = set()
        while True:
            if self.stopping:
                raise DeployInterrupted()
            # NotFound: the app was deleted (its deploys with it); ends the watch (_run)
            if (await self.store.get_deploy(deploy.id)).status in DEPLOY_FINAL:
                return False  # decided elsewhere; nothing to add
            current = await current_release(self.store, app.name)
            if current is not None and current.version > version:
                raise DeploySuperseded(f"v{current.version} replaced v{version} during its "
                                       "rollout")
            instances = [i for i in await self.store.list_instances(app.name)
                         if runs(i, version, keep)]
            for i in instances:
                name = f"{i.process_type}.{i.number}"
                if i.release == version and reported.get(i.id) != i.state:
                    reported[i.id] = i.state
                    deploy = await self._say(deploy, f"  {name}: {i.state}"
                                             + (f" on {i.node}" if i.node else ""))
            verdict = rollout_verdict(instances, version, want, keep)
            if verdict.failure is not None:
                assert verdict.culprit is not None
                deploy = await self._show_tail(deploy, verdict.culprit)
                raise DeployFailed(f"{verdict.failure} (see `epio logs`); v{version} gets "
                                   "no traffic")
            healthy = verdict.healthy
            if verdict.done:
                return True
            await self._hint_reports(app.name, version, instances, hinted)
            if self.clock.seconds() >= deadline:
                for i in [i for i in instances if i.state != "healthy"][:1]:
                    deploy = await self._show_tail(deploy, i)
                summary = ", ".join(f"{t} {healthy[t]}/{n}" for t, n in sorted(want.items()))
                raise DeployFailed(
                    f"v{version} was not healthy within {self.settings.rollout_timeout:g}s "
                    f"({summary} healthy); it gets no traffic")
            await deferLater(self.clock, min(ROLLOUT_POLL, self.settings.reconcile_interval),
                             lambda: None)
