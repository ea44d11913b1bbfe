"""The scheduler: places process instances on runners and keeps them there.

Desired state lives in the store: the app's *current release* (see
:mod:`epio.api.state`) and its *formation* (quantity and size per process
type).  ONE api process is the leader (``LeaderService`` on the store lock
``epio.scheduler``: a PostgreSQL advisory lock, a file lock on SQLite); only
the leader reconciles.

Runner state: every reconcile pass asks each registered runner for
``runner.status`` over the bus (DEALER ``request_to`` its control endpoint,
from the store's ``nodes`` table).  Polling was chosen over subscribing to
heartbeats because runners CONNECT their PUB sockets to the nexus only; a poll
also tells at once whether a runner is reachable.  A runner that has not
answered for ``api.runner_dead_after`` seconds is dead: its instances are
forgotten and placed on other runners.

One pass (:meth:`Scheduler.reconcile`), for every app:

1. fold the runners' reports into the store's ``instances`` (state, host,
   port, since, restarts); an instance a runner runs that the store does not
   know (a deleted app, a forgotten placement) is stopped; one the store
   knows but its (reachable) runner does not is forgotten after
   ``api.start_grace``;
2. start missing instances of the current release (spread: the runner with
   the fewest instances of that app and type, then the fewest instances);
   stop extras (draining first);
3. rollover of every process type: an instance of an older release is
   retired only once the current release has as many healthy instances of its
   type as wanted (or when it is not healthy itself); a routed (web) one is
   drained -- stopped ``api.drain_seconds`` later, after routers dropped it --,
   any other is stopped at once.  A type with ``rollover = stop-first`` (the
   release's meta) has its older instances stopped, confirmed, before any new
   one starts.  A restart of some types (``keep`` in the release's meta,
   :func:`epio.api.state.runs`) leaves the other types' instances running;
4. deploys whose api process is gone (a node restart, a lost node) are
   decided at once: builds failed, rollouts finished from what the instances
   report (docs/deploys.md).

Every pass catches and logs its own errors (STYLE 15).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from attrs import define, evolve, field
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from epio import domain
from epio.addons.services import SERVICE_PROCESS_TYPES
from epio.api.control import IRunnerControl
from epio.api.settings import ApiSettings
from epio.api.state import (
    DEFAULT_SIZE,
    SERVING_WINDOW,
    SIZES,
    kept,
    platform_line,
    rollout_verdict,
    routers_have,
    runs,
    serving_release,
)
from epio.services import attach
from epio.store import (
    DEPLOY_FINAL,
    Deploy,
    Formation,
    Instance,
    InvalidTransition,
    LeaderService,
    NodeInfo,
    NotFound,
    Release,
    Store,
)
from epio.store.addons import addon_ports

if TYPE_CHECKING:
    from epio.store.records import App

LOCK_NAME = "epio.scheduler"
DEFAULT_BOOT_TIMEOUT = 60.0
# store changes that alter desired state (instance changes are the leader's own writes),
# and "reported": a deploy saw, through a nexus, instance states its runner reports that
# the store lacks (Deployer._hint_reports): the pass folds them now
WAKE_ON = ("release", "formation", "app", "node", "reported", "resync")
# a deploy's api node whose store row was not refreshed for this many times
# api.runner_dead_after is gone (a restarted node is recognised at once by its boot id)
OWNER_LOST_AFTER = 3


@define
class RunnerView:
    """What the leader knows of one runner."""

    node_id: str
    endpoint: str | None
    first_seen: float
    last_ok: float | None = None
    boot_id: str | None = None
    reachable: bool = False
    instances: dict[str, dict[str, Any]] = field(factory=dict)
    load: dict[str, Any] = field(factory=dict)
    # the app UIDs it accepts (runner.uid_min/uid_max, from its node row); None: unknown
    uids: tuple[int, int] | None = None
    # its last poll failed: the next passes do not wait for its polls (one at a time,
    # in flight across passes) and a pass is woken when it expires
    silent: bool = False
    expiry_call: Any = None  # the IDelayedCall waking a pass at its expiry
    polling: Any = None  # its poll in flight (a Deferred), if any
    gone: bool = False  # declared gone (logged once)

    def expiry(self, dead_after: float) -> float:
        """When it is (was) dead unless it answers before."""
        return (self.last_ok if self.last_ok is not None else self.first_seen) + dead_after

    def accepts(self, uid: int) -> bool:
        return self.uids is None or self.uids[0] <= uid <= self.uids[1]

    def alive(self, now: float, dead_after: float) -> bool:
        """Answered within ``dead_after`` (a runner never heard from gets that long
        from when this leader first saw it in the store)."""
        return now < self.expiry(dead_after)


def _uid_range(value: Any) -> tuple[int, int] | None:
    """A runner's ``[uid_min, uid_max]`` from its node status (None if absent/bad)."""
    if (isinstance(value, list) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        return int(value[0]), int(value[1])
    return None


class Fleet:
    """Every instance a pass knows, by id: membership, removal and replacement in
    O(1) (a list's are a scan comparing every instance with attrs' ``__eq__``: per app,
    O(apps²) a pass at 1,000 apps -- docs/apps.md "Density").  ``inst in fleet`` is a
    list's test: an instance equal to ``inst`` is there (ids are unique, so it is the
    one of its id)."""

    def __init__(self, instances: list[Instance]) -> None:
        self._by_id: dict[str, Instance] = {i.id: i for i in instances}

    def __contains__(self, inst: object) -> bool:
        if not isinstance(inst, Instance):
            return False
        cur = self._by_id.get(inst.id)
        return cur is inst or (cur is not None and cur == inst)

    def __iter__(self) -> Iterator[Instance]:
        return iter(self._by_id.values())

    def __len__(self) -> int:
        return len(self._by_id)

    def add(self, inst: Instance) -> None:
        self._by_id[inst.id] = inst

    def replace(self, old: Instance, new: Instance) -> None:
        """``new`` (the same id) in place of ``old``."""
        if old not in self:
            raise ValueError(f"{old.id} is not in the fleet")
        self._by_id[old.id] = new

    def remove(self, inst: Instance) -> None:
        if inst not in self:
            raise ValueError(f"{inst.id} is not in the fleet")
        del self._by_id[inst.id]


def _wall(t: float) -> str:
    """``t`` (the clock's seconds: the epoch in production) as HH:MM:SS.mmm UTC."""
    return time.strftime("%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}"


class Scheduler:
    """Reconciles the store's desired state with what runners run."""

    log = Logger()

    def __init__(self, store: Store, control: IRunnerControl, clock: IReactorTime, settings: ApiSettings,
                 log_sink: Any = None, app_secret: Callable[[str], str] | None = None) -> None:
        self.store = store
        # a stable per-app secret for frameworks that need one (Django's SECRET_KEY)
        # when the app sets none itself; derived from "<name>:<uid>", so nothing more
        # is stored
        self.app_secret = app_secret
        self.control = control
        self.clock = clock
        self.settings = settings
        self.log_sink = log_sink
        self.views: dict[str, RunnerView] = {}
        self._uid_refused: set[str] = set()  # apps told no runner accepts their UID
        self._nodes: dict[str, NodeInfo] = {}  # every node, as of this pass
        # each app's current release, parsed: {app: ((uid, version), release)}
        self._releases: dict[str, tuple[tuple[int, int], Release]] = {}
        self.leader = False
        self.passes = 0
        self._loop: LoopingCall | None = None
        self._busy = False
        self._again = False
        self._unsubscribe: Any = None

    # --- lifecycle (driven by leadership) -----------------------------------------

    def become_leader(self) -> None:
        self.leader = True
        self.views = {}
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self.clock
        self._loop.start(self.settings.reconcile_interval, now=True).addErrback(
            lambda f: self.log.failure("scheduler loop died", f))
        ensureDeferred(self._listen()).addErrback(
            lambda f: self.log.failure("listening to store changes failed", f))

    async def _listen(self) -> None:
        """Reconcile at once when desired state changes in any api process (the store's
        change notifications; PostgreSQL: every node's, SQLite: this process's)."""
        subscribe = getattr(self.store, "subscribe", None)
        if subscribe is None:
            return
        unsubscribe = await subscribe(self._changed)
        if self.leader:
            self._unsubscribe = unsubscribe
        else:
            unsubscribe()

    def _changed(self, change: Any) -> None:
        if change.kind in WAKE_ON:
            self.wake()

    def lose_leadership(self) -> None:
        self.leader = False
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        unsubscribe, self._unsubscribe = self._unsubscribe, None
        if unsubscribe is not None:
            unsubscribe()
        for view in self.views.values():
            self._cancel_expiry(view)

    def wake(self) -> None:
        """Reconcile soon (after a scale, release, ...) instead of at the next tick."""
        if self.leader:
            self.clock.callLater(0, self._tick)

    def _tick(self) -> Deferred[None] | None:
        if not self.leader:
            return None
        if self._busy:
            self._again = True
            return None
        self._busy = True
        d = ensureDeferred(self.reconcile())
        d.addErrback(lambda f: self.log.failure("scheduler pass failed", f))

        def done(_: Any) -> None:
            self._busy = False
            if self._again and self.leader:
                self._again = False
                self.clock.callLater(0, self._tick)

        d.addBoth(done)
        return None

    # --- one pass -----------------------------------------------------------------

    async def reconcile(self) -> None:
        """One full pass over every runner and app."""
        now = self.clock.seconds()
        self._nodes = {n.id: n for n in await self.store.list_nodes()}
        nodes = [n for n in self._nodes.values() if "runner" in n.roles]
        for n in nodes:
            view = self.views.get(n.id)
            if view is None:
                view = self.views[n.id] = RunnerView(n.id, n.control_endpoint, now)
            view.endpoint = n.control_endpoint
            view.uids = _uid_range(n.status.get("uids"))
        for gone in set(self.views) - {n.id for n in nodes}:
            self._cancel_expiry(self.views.pop(gone))
        # The pass waits for the polls of the runners that answered last time (fresh
        # state).  A runner whose last poll failed does not hold the pass: its poll
        # (one at a time) stays in flight across passes, and a pass is woken at its
        # expiry -- so it is declared gone at runner_dead_after, not up to a
        # status_timeout (a silent poll's whole wait) and a pass later.
        waits = [self._poll_once(self.views[n.id]) for n in nodes]
        await DeferredList([d for d in waits if d is not None], consumeErrors=True)
        # liveness is judged after the polls: a silent runner's poll waits its whole
        # status_timeout, and judging with the pass's start time would declare it gone
        # one or two passes (several seconds) after runner_dead_after expired
        now = self.clock.seconds()
        dead_after = self.settings.runner_dead_after
        alive = {v.node_id for v in self.views.values() if v.alive(now, dead_after)}
        for v in self.views.values():
            if v.node_id not in alive and not v.gone:
                v.gone = True
                self.log.warn(
                    "runner {node} is gone: no answer since {last} (expired {expiry}, "
                    "api.runner_dead_after {dead_after:g}s; declared {late:.2f}s after)",
                    node=v.node_id, last=_wall(v.expiry(dead_after) - dead_after),
                    expiry=_wall(v.expiry(dead_after)), dead_after=dead_after,
                    late=now - v.expiry(dead_after))
        instances = await self._fold_reports(now, alive)
        apps = await self.store.list_apps()
        # what each app's turn reads, read for every app at once: a few queries a pass,
        # not four per app (1,000 apps: docs/apps.md "Density")
        names = [a.name for a in apps]
        versions, deploys = await self.store.pass_inputs_by_app(names, SERVING_WINDOW)
        current = await self._current_releases(apps, versions, deploys)
        formations = await self.store.formations_by_app(names)
        by_app: dict[str, list[Instance]] = {}
        for inst in instances:
            by_app.setdefault(inst.app, []).append(inst)
        everyone = Fleet(instances)
        for app in apps:
            try:
                await self._reconcile_app(app, by_app.get(app.name, []), everyone, now,
                                          deploys[app.name], current.get(app.name),
                                          formations[app.name])
            except NotFound:
                failure = Failure()
                if await self._deleted(app.name):
                    # deleted while this pass worked on it: its instances are orphans now,
                    # stopped by the next pass
                    self.log.info("app {app} was deleted during the pass", app=app.name)
                else:
                    self.log.failure("reconciling app {app} failed", failure, app=app.name)
            except Exception:
                self.log.failure("reconciling app {app} failed", app=app.name)
        self.passes += 1

    async def _current_releases(self, apps: list[App], versions: dict[str, list[int]],
                                deploys: dict[str, list[Deploy]]) -> dict[str, Release]:
        """Each app's current release (:func:`pick_current` over its newest versions),
        parsed once: releases are immutable, so the one of (app, UID, version) -- a
        new app of a deleted one's name has another UID -- is kept from pass to pass
        (one per app) and only a new one is read."""
        chosen: dict[str, tuple[int, int]] = {}
        for app in apps:
            failed = {d.release for d in deploys[app.name]
                      if d.status == "failed" and d.release is not None}
            version = next((v for v in versions[app.name][:len(failed) + 1]
                            if v not in failed), None)
            if version is not None:
                chosen[app.name] = (app.uid, version)
        cache = {name: hit for name, hit in self._releases.items()
                 if chosen.get(name) == hit[0]}
        missing = [(name, key[1]) for name, key in chosen.items() if name not in cache]
        if missing:
            for (name, _), release in (await self.store.releases_by_version(missing)).items():
                cache[name] = (chosen[name], release)
        self._releases = cache
        return {name: hit[1] for name, hit in cache.items()}

    async def _deleted(self, app: str) -> bool:
        try:
            await self.store.get_app(app)
        except NotFound:
            return True
        return False

    def _poll_once(self, view: RunnerView) -> Deferred[None] | None:
        """Start ``view``'s poll unless one is in flight; the Deferred to wait for, or
        None when the pass does not wait (its last poll failed)."""
        poll: Deferred[None] | None = view.polling
        if poll is None:
            poll = view.polling = ensureDeferred(self._poll(view))

            def done(result: Any) -> Any:
                view.polling = None
                return result

            poll.addBoth(done)
        if view.silent:
            return None
        waited: Deferred[None] = Deferred()

        def release(result: Any) -> Any:
            waited.callback(None)
            return result

        poll.addBoth(release)
        return waited

    def _cancel_expiry(self, view: RunnerView) -> None:
        call, view.expiry_call = view.expiry_call, None
        if call is not None and call.active():
            call.cancel()

    def _wake_at_expiry(self, view: RunnerView) -> None:
        """A silent runner: a pass at its expiry (declared gone then, not at the next
        tick after it)."""
        if view.expiry_call is not None or view.gone or not self.leader:
            return
        delay = view.expiry(self.settings.runner_dead_after) - self.clock.seconds()

        def fire() -> None:
            view.expiry_call = None
            self.wake()

        view.expiry_call = self.clock.callLater(max(0.0, delay) + 0.01, fire)

    async def _poll(self, view: RunnerView) -> None:
        if not view.endpoint:
            view.reachable = False
            view.silent = True
            self._wake_at_expiry(view)
            return
        try:
            reply = await self.control.request(view.endpoint, "runner.status", {},
                                               timeout=self.settings.status_timeout)
        except Exception as e:
            if view.reachable or view.last_ok is None:
                self.log.warn("runner {node} at {endpoint} does not answer runner.status: "
                              "{error}", node=view.node_id, endpoint=view.endpoint,
                              error=str(e) or type(e).__name__)
            view.reachable = False
            view.silent = True
            self._wake_at_expiry(view)
            return
        view.reachable = True
        view.silent = view.gone = False
        self._cancel_expiry(view)
        view.last_ok = self.clock.seconds()
        view.boot_id = reply.get("boot_id")
        load = reply.get("load")
        view.load = dict(load) if isinstance(load, dict) else {}
        view.instances = {str(i["instance_id"]): i for i in reply.get("instances", [])
                          if isinstance(i, dict) and "instance_id" in i}

    async def _fold_reports(self, now: float, alive: set[str]) -> list[Instance]:
        """Bring the store's instances in line with the runners' reports."""
        known = {i.id: i for i in await self.store.list_instances()}
        reported: dict[str, tuple[RunnerView, dict[str, Any]]] = {}
        for view in self.views.values():
            if view.reachable:
                for iid, info in view.instances.items():
                    reported[iid] = (view, info)
        for iid, (view, info) in reported.items():
            inst = known.get(iid)
            state = info.get("state")
            if inst is None:
                if state != "stopped":
                    self.log.info("stopping orphan instance {id} on {node}", id=iid,
                                  node=view.node_id)
                    await self._send_stop(view, iid)
                continue
            if state == "stopped" or state not in domain.RUNNER_STATES:
                await self.store.delete_instance(iid)
                del known[iid]
                continue
            if inst.state == "draining":
                state = "draining"
            new = evolve(inst, node=view.node_id, host=info.get("host") or inst.host,
                         port=info.get("port") or inst.port, state=state,
                         since=float(info.get("since") or inst.since),
                         restarts=int(info.get("restarts") or 0))
            if inst.state == "draining":
                new = evolve(new, since=inst.since)
            if new != inst:
                try:
                    await self.store.upsert_instance(new)
                except NotFound:  # its app was deleted since list_instances
                    del known[iid]
                    continue
                known[iid] = new
                if new.state != inst.state:
                    reason = info.get("reason")
                    text = (f"{new.process_type}.{new.number} (v{new.release}) is {new.state} "
                            f"on {new.node}" + (f": {reason}" if reason else ""))
                    self._app_log(new.app, text)
                    if reason and new.state in ("crashed", "failed"):
                        await self._note_deploy(new.app, new.release, text)
        for iid, inst in list(known.items()):
            if iid in reported:
                continue
            where = self.views.get(inst.node or "")
            if where is None or inst.node not in alive:
                self.log.warn("instance {id} of {app} was on {node}, which is gone: "
                              "placing it elsewhere", id=iid, app=inst.app, node=inst.node)
                self._app_log(inst.app, f"{inst.process_type}.{inst.number}: runner "
                                        f"{inst.node} is gone; replacing it")
            elif not where.reachable:
                continue  # not dead yet: wait
            elif inst.state == "pending" and now - inst.since < self.settings.start_grace:
                continue  # its start request may still be on the way
            await self.store.delete_instance(iid)
            del known[iid]
        return list(known.values())

    async def _reconcile_app(self, app: App, mine: list[Instance], everyone: Fleet,
                             now: float, deploys: list[Deploy], release: Release | None,
                             formation: dict[str, Formation]) -> None:
        """Converge one app: ``deploys`` are its newest failed and unfinished ones
        (newest first, without their log), ``release`` its current one
        (:func:`pick_current`), ``formation`` its formation, as the pass read them."""
        # dedicated database servers are run by the add-ons code (epio.api.addons)
        mine = [i for i in mine if i.process_type not in SERVICE_PROCESS_TYPES]
        await self._recover_deploys(app.name, now, deploys, release, mine)
        want: dict[str, int] = {}
        if release is not None and release.image:
            for ptype, f in formation.items():
                if ptype in release.processes and f.quantity > 0:
                    want[ptype] = f.quantity
        for inst in [i for i in mine if i.state == "draining"]:
            if now - inst.since >= self.settings.drain_seconds:
                await self._stop(inst)
                everyone.remove(inst)
        types = set(want) | {i.process_type for i in mine}
        rollover = dict((release.meta or {}).get("rollover") or {}) if release else {}
        keep = kept(release.meta) if release else {}
        for ptype in sorted(types):
            quantity = want.get(ptype, 0)
            of_type = [i for i in mine if i.process_type == ptype and i.state != "draining"
                       and i in everyone]
            current = [i for i in of_type
                       if release is not None and runs(i, release.version, keep)]
            old = [i for i in of_type if i not in current]
            # a failed instance stays visible (ps, a deploy watching it) for start_grace,
            # then it is replaced
            for inst in [i for i in current if i.state == "failed"
                         and now - i.since >= self.settings.start_grace]:
                await self._stop(inst)
                everyone.remove(inst)
                current.remove(inst)
            if rollover.get(ptype) == "stop-first":
                # a consumer that must never run twice: every older instance (draining
                # ones too) has exited before an instance of the new release starts
                older = old + [i for i in mine if i.process_type == ptype
                               and i.state == "draining" and i in everyone]
                if not await self._stop_all_confirmed(older, everyone):
                    continue  # a runner did not confirm: try again next pass
                old = []
            missing = quantity - len(current)
            # a release of an asleep app (a deploy, a config change): its instances boot,
            # pass their health check, and go back to sleep (docs/apps.md)
            asleep_before = bool(old) and all(i.state == "asleep" for i in old)
            if missing > 0:
                assert release is not None
                # numbers unique among the type's instances of every release (the old
                # release's, draining ones too): during a rollout v8's instances are not
                # a second web.1, so ps and log lines tell them apart
                used = {i.number for i in mine if i.process_type == ptype}
                for _ in range(missing):
                    number = next(n for n in range(1, quantity + len(used) + 2) if n not in used)
                    used.add(number)
                    placed = await self._start(app, release, ptype, number,
                                               formation.get(ptype), everyone, now,
                                               asleep_after_boot=asleep_before)
                    if placed is None:
                        break
                    everyone.add(placed)
                    current.append(placed)
            elif missing < 0:
                extras = sorted(current, key=lambda i: (i.state == "healthy", -i.number))
                for inst in extras[:-missing]:
                    await self._retire(inst, everyone, now)
            healthy = [i for i in current if i.state == "healthy"]
            # asleep: healthy once, then slept without a request; a router wakes it
            asleep = [i for i in current if i.state == "asleep"]
            switched: bool | None = None  # asked once per pass, only when it matters
            for inst in old:
                # an asleep one stays (and wakes on a request) until the new ones serve
                if inst.state not in domain.SERVING_STATES:
                    await self._retire(inst, everyone, now)
                elif len(healthy) + len(asleep) >= quantity:
                    if ptype not in self.settings.web_process_types:
                        switched = True  # no router sends it work: the new ones took over
                    elif switched is None:
                        # asleep new ones: once every nexus routes them asleep (a router
                        # then holds a request and wakes them), not before
                        switched = await self._routed(app.name, healthy, asleep)
                    if switched:
                        await self._retire(inst, everyone, now)

    async def _stop_all_confirmed(self, insts: list[Instance], everyone: Fleet) -> bool:
        """Stop these instances and wait for their runners to confirm they exited
        (``runner.stop`` answers once the process is gone, after at most the grace
        period).  An instance whose runner does not confirm stays in the store, so
        the next pass tries again; returns whether every one is gone."""
        done = True
        for inst in insts:
            view = self.views.get(inst.node or "")
            if view is None or not await self._send_stop(view, inst.id):
                done = False
                continue
            await self.store.delete_instance(inst.id)
            everyone.remove(inst)
            self._app_log(inst.app, f"stopped {inst.process_type}.{inst.number} "
                                    f"(v{inst.release}) before starting its replacement")
        return done

    async def _routed(self, app: str, healthy: list[Instance],
                      asleep: list[Instance]) -> bool:
        """Do routers send traffic to these new instances (or wake the asleep ones) yet?
        (Zero-downtime rollover drains the old ones only then; see :func:`routers_have`.)"""
        return await routers_have(self.control, self.settings, self.clock, app, healthy,
                                  asleep)

    async def _note_deploy(self, app: str, release: int, text: str) -> None:
        """Add a runner's reason to the log of the deploy rolling ``release`` out."""
        for d in await self.store.list_deploys(app, limit=5):
            if d.release == release and d.status == "deploying":
                await self.store.update_deploy(d.id, append_log=f"  {text}\n")

    async def _recover_deploys(self, app: str, now: float, deploys: list[Deploy],
                               release: Release | None, mine: list[Instance]) -> None:
        """Decide at once the deploys whose api process is gone (a node restart, a
        dead api node): a build is failed (nothing resumes it); a rollout is finished
        from what its instances report (:func:`rollout_verdict`) -- never by a timer."""
        for d in deploys:
            if d.status in DEPLOY_FINAL:
                continue
            why = self._orphaned(d, now)
            if why is None:
                continue
            try:
                if d.status != "deploying":
                    self.log.warn("deploy {id} of {app} was {status} when {why}: failing it",
                                  id=d.id, app=app, status=d.status, why=why)
                    await self.store.update_deploy(
                        d.id, status="failed", reason=f"interrupted by {why}; deploy again",
                        append_log=f"Deploy failed: interrupted by {why}\n")
                elif d.release is not None:
                    await self._finish_rollout(app, d, why, release, mine)
            except InvalidTransition:
                pass  # its own api process (or another leader) decided it meanwhile

    def _orphaned(self, d: Deploy, now: float) -> str | None:
        """Why nobody runs this deploy any more (None: its api process is alive)."""
        owner = d.meta.get("owner") if isinstance(d.meta, dict) else None
        if not isinstance(owner, dict) or not owner.get("node"):
            return "an api process that recorded no owner"
        node = self._nodes.get(str(owner["node"]))
        if node is None:
            return f"the loss of node {owner['node']}"
        if node.boot_id != owner.get("boot"):
            return "a node restart"
        if now - node.last_seen >= OWNER_LOST_AFTER * self.settings.runner_dead_after:
            # rows are refreshed every runner.register_interval (10 s) or
            # api.runner_dead_after / 3: a margin over both
            return f"the loss of node {owner['node']}"
        return None

    async def _finish_rollout(self, app: str, d: Deploy, why: str, release: Release | None,
                              mine: list[Instance]) -> None:
        assert d.release is not None
        if release is not None and release.version > d.release:
            await self.store.update_deploy(
                d.id, status="cancelled", reason=f"v{release.version} replaced v{d.release}",
                append_log=f"Deploy cancelled: v{release.version} replaced v{d.release} "
                           f"(rollout taken over after {why})\n")
            return
        rel = await self.store.get_release(app, d.release)
        formation = await self.store.get_formation(app)
        want = {t: f.quantity for t, f in formation.items()
                if t in rel.processes and f.quantity > 0}
        verdict = rollout_verdict(mine, d.release, want, kept(rel.meta))
        if verdict.failure is not None:
            serving = await serving_release(self.store, app)
            self.log.warn("rollout {id} of {app} (v{release}) failed after {why}: {reason}",
                          id=d.id, app=app, release=d.release, why=why, reason=verdict.failure)
            await self.store.update_deploy(
                d.id, status="failed", reason=verdict.failure, meta={"kept": serving},
                append_log=f"Deploy failed (rollout taken over after {why}): "
                           f"{verdict.failure}\n")
        elif verdict.done:
            self.log.info("rollout {id} of {app} (v{release}) finished after {why}", id=d.id,
                          app=app, release=d.release, why=why)
            await self.store.update_deploy(
                d.id, status="succeeded",
                append_log=f"Deployed v{d.release} (rollout finished after {why})\n")

    # --- actions ------------------------------------------------------------------

    def _place(self, app: str, ptype: str, everyone: Fleet,
               avoid: set[str], uid: int | None = None) -> RunnerView | None:
        now = self.clock.seconds()
        candidates = [v for v in self.views.values()
                      if v.reachable and v.endpoint and v.node_id not in avoid
                      and v.alive(now, self.settings.runner_dead_after)
                      and (uid is None or v.accepts(uid))]
        if not candidates:
            return None

        def score(v: RunnerView) -> tuple[int, int, float, float, str]:
            # spread an app's type first, then fewest instances, then the runner's own
            # memory and CPU load (runner.status "load"), then a stable order
            on = [i for i in everyone if i.node == v.node_id and i.state in domain.LIVE_STATES]
            same = sum(1 for i in on if i.app == app and i.process_type == ptype)
            mem = v.load.get("mem")
            cpu = v.load.get("cpu")
            return (same, len(on), float(mem) if isinstance(mem, int | float) else 0.0,
                    float(cpu) if isinstance(cpu, int | float) else 0.0, v.node_id)

        return min(candidates, key=score)

    async def platform_env(self, app: str) -> dict[str, str]:
        """What the platform tells every process of an app: its hostnames (Django's
        ALLOWED_HOSTS) and, unless the app's config sets SECRET_KEY, a derived key."""
        hosts = [f"{app}.{self.settings.domain}"]
        hosts += [d.hostname for d in await self.store.list_domains(app)]
        env = {"EPIO_HOSTNAMES": ",".join(hosts)}
        if self.app_secret is not None:
            # keyed by name and UID: a new app reusing a deleted app's name gets a new key
            uid = (await self.store.get_app(app)).uid
            env["EPIO_SECRET_KEY"] = self.app_secret(f"{app}:{uid}")
        return env

    async def _start(self, app: App, release: Any, ptype: str, number: int, formation: Any,
                     everyone: Fleet, now: float, asleep_after_boot: bool = False,
                     ) -> Instance | None:
        avoid: set[str] = set()
        size = formation.size if formation is not None else DEFAULT_SIZE
        limits = dict(formation.limits) if formation is not None and formation.limits else {}
        limits = {**SIZES.get(size, SIZES[DEFAULT_SIZE]), **limits}
        meta = dict(release.meta or {})
        env = {**(meta.get("env") or {}), **await self.platform_env(app.name),
               **release.config}
        ports: list[int] | None = None
        while True:
            view = self._place(app.name, ptype, everyone, avoid, app.uid)
            if view is None:
                self.log.warn("no runner can take {app} {ptype}.{number}", app=app.name,
                              ptype=ptype, number=number)
                refusing = sorted(v.node_id for v in self.views.values()
                                  if not v.accepts(app.uid))
                if refusing and app.name not in self._uid_refused:
                    self._uid_refused.add(app.name)  # said once, until it is placed
                    self._app_log(app.name, f"{ptype}.{number}: no runner accepts the app's "
                                            f"UID {app.uid} (outside runner.uid_min/uid_max "
                                            f"of {', '.join(refusing)})")
                return None
            self._uid_refused.discard(app.name)
            if ports is None:  # after placing: the runners' liveness is judged first
                ports = await addon_ports(self.store, app.name)
            iid = f"{app.name}-{ptype}-{number}-{uuid.uuid4().hex[:8]}"
            inst = Instance(iid, app.name, release.version, ptype, number, view.node_id,
                            None, None, "pending", now, 0)
            await self.store.upsert_instance(inst)
            body = {
                "instance_id": iid, "app": app.name, "uid": app.uid,
                "release": release.version, "process_type": ptype, "index": number,
                "command": release.processes[ptype], "image_digest": release.image,
                "env": env, "limits": limits,
                "health_check": meta.get("health_check") if ptype == "web" else None,
                "boot_timeout": float(meta.get("boot_timeout") or DEFAULT_BOOT_TIMEOUT),
                # None: the runner's default (runner.idle_sleep); only web sleeps
                "idle_sleep": meta.get("idle_sleep") if ptype == "web" else None,
                "asleep_after_boot": asleep_after_boot,
                "grace": self.settings.stop_grace,
                "addon_ports": ports,  # its shared database: the runner's fence opens it
            }
            assert view.endpoint is not None
            try:
                reply = await self.control.request(view.endpoint, "runner.start", body,
                                                   timeout=self.settings.status_timeout * 2)
            except Exception as e:
                self.log.warn("runner {node} refused to start {id}: {error}", node=view.node_id,
                              id=iid, error=str(e) or type(e).__name__)
                self._app_log(app.name, f"{ptype}.{number}: runner {view.node_id} refused to "
                                        f"start it: {str(e) or type(e).__name__}")
                await self.store.delete_instance(iid)
                avoid.add(view.node_id)
                continue
            inst = evolve(inst, host=reply.get("host"), port=reply.get("port"),
                          state="starting")
            await self.store.upsert_instance(inst)
            self.log.info("started {app} {ptype}.{number} v{release} on {node} ({id})",
                          app=app.name, ptype=ptype, number=number, release=release.version,
                          node=view.node_id, id=iid)
            self._app_log(app.name, f"starting {ptype}.{number} (v{release.version}) "
                                    f"on {view.node_id}")
            return inst

    async def _retire(self, inst: Instance, everyone: Fleet, now: float) -> None:
        """Drain a healthy instance of a routed type (stopped later, once routers
        dropped it); stop any other at once (SIGTERM, then SIGKILL after the grace)."""
        view = self.views.get(inst.node or "")
        if (inst.state == "healthy" and inst.process_type in self.settings.web_process_types
                and view is not None and view.reachable and view.endpoint):
            try:
                await self.control.request(view.endpoint, "runner.drain",
                                           {"instance_id": inst.id},
                                           timeout=self.settings.status_timeout)
            except Exception as e:
                self.log.warn("draining {id} failed: {error}; stopping it", id=inst.id,
                              error=str(e) or type(e).__name__)
            else:
                drained = evolve(inst, state="draining", since=now)
                await self.store.upsert_instance(drained)
                everyone.replace(inst, drained)
                self._app_log(inst.app, f"draining {inst.process_type}.{inst.number} "
                                        f"(v{inst.release})")
                return
        await self._stop(inst)
        everyone.remove(inst)

    async def _stop(self, inst: Instance) -> None:
        view = self.views.get(inst.node or "")
        if view is not None:
            await self._send_stop(view, inst.id)
        await self.store.delete_instance(inst.id)
        self._app_log(inst.app, f"stopped {inst.process_type}.{inst.number} (v{inst.release})")

    async def _send_stop(self, view: RunnerView, iid: str) -> bool:
        if not view.endpoint:
            return False
        try:
            await self.control.request(view.endpoint, "runner.stop",
                                       {"instance_id": iid, "grace": self.settings.stop_grace},
                                       timeout=self.settings.status_timeout
                                       + self.settings.stop_grace)
        except Exception as e:
            self.log.warn("stopping {id} on {node} failed: {error}", id=iid, node=view.node_id,
                          error=str(e) or type(e).__name__)
            return False
        return True

    async def stop_app(self, app: str) -> None:
        """Stop every instance of ``app`` now (used when an app is deleted).

        Any api process may call this, leader or not: it sends ``runner.stop``
        straight to the runners recorded in the store.  The leader stops any
        instance it later finds without an app (orphans) anyway.
        """
        nodes = {n.id: n for n in await self.store.list_nodes()}
        ds = []
        for inst in await self.store.list_instances(app):
            node = nodes.get(inst.node or "")
            if node is None or not node.control_endpoint:
                continue
            view = RunnerView(node.id, node.control_endpoint, self.clock.seconds())
            ds.append(ensureDeferred(self._send_stop(view, inst.id)))
        if ds:
            await DeferredList(ds, consumeErrors=True)

    async def purge_app_data(self, app: App) -> list[str]:
        """Ask every registered runner to delete a purged app's data dir; return the
        runners that did not answer or refused (they keep it: a later holder of the
        UID still never sees it, see epio.runner.launcher)."""
        failed: list[str] = []
        for node in await self.store.list_nodes("runner"):
            if not node.control_endpoint:
                continue
            try:
                await self.control.request(node.control_endpoint, "runner.purge_app",
                                           {"app": app.name, "uid": app.uid},
                                           timeout=self.settings.purge_timeout)
            except Exception as e:
                self.log.warn("runner {node} did not delete the data of purged app {app}: "
                              "{error}", node=node.id, app=app.name,
                              error=str(e) or type(e).__name__)
                failed.append(node.id)
        return failed

    def _app_log(self, app: str, text: str) -> None:
        platform_line(self.log_sink, app, text)


class SchedulerService(MultiService):
    """Runs the scheduler while this process holds the scheduler lock."""

    def __init__(self, scheduler: Scheduler, store: Store, clock: IReactorTime,
                 retry_interval: float) -> None:
        MultiService.__init__(self)
        self.scheduler = scheduler
        self.leader = LeaderService(store, LOCK_NAME, scheduler.become_leader,
                                    scheduler.lose_leadership, clock=clock,
                                    retry_interval=retry_interval)
        attach(self.leader, self)
