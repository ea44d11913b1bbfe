"""``[cron]``: each entry of an app runs once per slot of its schedule, cluster-wide.

ONE api process runs the entries: the holder of the store lock ``epio.cron``
(:class:`~epio.store.LeaderService`, a PostgreSQL advisory lock -- a file lock
on SQLite), as the scheduler and the backup scheduler do.  Every ``cron.tick``
seconds the leader checks whether a new minute began; if so it makes one pass
(:meth:`CronRunner.run_pass`) over every app whose current release declares
entries (the release's ``meta["cron"]``, from the manifest):

* the entry's due slot is the latest minute at or before now that matches its
  schedule (UTC, :mod:`epio.cronspec`);
* a slot is run only within ``cron.start_deadline`` seconds of its time.  A slot
  older than that -- no api held the lock then, or the leader was down -- is
  recorded ``missed`` with a line in the app's log, and never replayed: after an
  outage an entry runs at its next slot, not once per slot missed;
* a slot is claimed in the store before anything runs (:func:`claim_slot`,
  one statement that moves ``last_slot`` forward): an old leader finishing a
  pass while a new one starts cannot run a slot twice;
* runs never overlap: while the entry's previous run is still running the slot
  is ``skipped`` (and said in the log);
* a new entry (first seen in a release) runs from its first slot after that
  release was made.

A run is a detached ``epio run`` session (:class:`epio.api.run.RunSessions`): the
release's image, the app's UID, sandbox, limits and config vars, stdin closed,
its output in the app's log with source ``cron.NAME`` (``epio logs --source
cron``), audited in ``run_sessions`` with kind ``cron``.  ``GET
/apps/{app}/cron`` (``epio cron``) lists the entries with their last run;
``epio ps`` shows the entries whose last run failed.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import TYPE_CHECKING, Any

from attrs import frozen
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from epio.api import errors
from epio.api.operations import operation
from epio.api.spec import INT, NULLABLE_NUM, NULLABLE_STR, SCHEMAS, STR, array, obj, ref
from epio.api.state import current_release, platform_line
from epio.config import Config
from epio.cronspec import CronError, CronSpec, parse_schedule
from epio.services import attach
from epio.store import LeaderService, NotFound, Store
from epio.store.cron import CronState, claim_slot, list_cron, record_run
from epio.store.runs import new_session_id

if TYPE_CHECKING:
    from epio.store.records import App, User

LOCK_NAME = "epio.cron"
#: What ``epio cron`` shows as an entry's status.
STATUSES = ("never", "running", "succeeded", "failed", "skipped", "missed")

SCHEMAS["CronEntry"] = obj({
    "name": STR, "schedule": STR, "command": STR,
    "status": {"type": "string", "enum": list(STATUSES)},
    "reason": NULLABLE_STR, "last_slot": NULLABLE_NUM, "next_slot": NULLABLE_NUM,
    "last_run": {"type": ["object", "null"], "properties": {
        "number": INT, "state": STR, "started": {"type": "number"}, "ended": NULLABLE_NUM,
        "exit_status": {"type": ["integer", "null"]}, "exit_signal": NULLABLE_STR}},
}, required=["name", "schedule", "command", "status"])


@frozen
class CronSettings:
    """The ``cron`` config section (seconds)."""

    tick: float = 5.0
    start_deadline: float = 120.0

    @classmethod
    def from_config(cls, config: Config) -> CronSettings:
        c = config.settings.cron
        return cls(tick=c.tick, start_deadline=c.start_deadline)


@frozen
class Entry:
    """One ``[cron]`` entry of a release."""

    name: str
    schedule: str
    command: str
    spec: CronSpec


def entries_of(release: Any) -> list[Entry]:
    """The release's cron entries (a schedule that no longer parses is left out)."""
    out = []
    for raw in (release.meta or {}).get("cron") or []:
        try:
            out.append(Entry(str(raw["name"]), str(raw["schedule"]), str(raw["command"]),
                             parse_schedule(str(raw["schedule"]))))
        except (CronError, KeyError, TypeError):
            continue
    return out


def _utc(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


@frozen
class _CronUser:
    """Who the audit says started a cron run."""

    name: str = "cron"


class CronRunner:
    """Runs the ``[cron]`` entries of every app while this process is the leader."""

    log = Logger()

    def __init__(self, store: Store, sessions: Any, clock: IReactorTime, settings: CronSettings,
                 log_sink: Any = None) -> None:
        self.store = store
        self.sessions = sessions  # epio.api.run.RunSessions
        self.clock = clock
        self.settings = settings
        self.log_sink = log_sink
        self.leader = False
        self.passes = 0
        self._loop: LoopingCall | None = None
        self._busy = False
        self._done_minute: int | None = None

    # --- leadership -------------------------------------------------------------------

    def become_leader(self) -> None:
        self.leader = True
        self._done_minute = None
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self.clock
        self._loop.start(self.settings.tick, now=True).addErrback(
            lambda f: self.log.failure("cron loop died", f))

    def lose_leadership(self) -> None:
        self.leader = False
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def _tick(self) -> Deferred[None] | None:
        minute = math.floor(self.clock.seconds() / 60)
        if not self.leader or self._busy or minute == self._done_minute:
            return None
        self._busy = True
        d = ensureDeferred(self.run_pass())

        def ok(_: Any) -> None:
            self._done_minute = minute

        d.addCallback(ok)
        d.addErrback(lambda f: self.log.failure("cron pass failed", f))

        def done(_: Any) -> None:
            self._busy = False

        d.addBoth(done)
        return None

    # --- one pass -----------------------------------------------------------------------

    async def run_pass(self) -> int:
        """Start every entry due now; returns how many runs were started."""
        started = 0
        for app in await self.store.list_apps():
            try:
                started += await self._app_pass(app)
            except NotFound:
                continue  # deleted during the pass
            except Exception:
                self.log.failure("cron pass over {app} failed", app=app.name)
        self.passes += 1
        return started

    async def _app_pass(self, app: App) -> int:
        release = await current_release(self.store, app.name)
        if release is None or not release.image:
            return 0
        entries = entries_of(release)
        if not entries:
            return 0
        states = await list_cron(self.store, app.name)
        started = 0
        for entry in entries:
            if self.leader and await self._entry(app, release, entry, states.get(entry.name)):
                started += 1
        return started

    async def _entry(self, app: App, release: Any, entry: Entry,
                     state: CronState | None) -> bool:
        now = self.clock.seconds()
        slot = entry.spec.latest(now)
        if slot is None or (state is not None and state.last_slot >= slot):
            return False
        if state is None and slot < release.created:
            return False  # a new entry runs from its first slot after it was deployed
        if now - slot > self.settings.start_deadline:
            if state is not None and await claim_slot(
                    self.store, app.name, entry.name, slot, "missed",
                    reason=f"not started within cron.start_deadline "
                           f"({self.settings.start_deadline:g}s)"):
                self._say(app.name, f"cron {entry.name}: the run due at {_utc(slot)} was "
                                    "missed (no scheduler ran in time); it is not replayed")
            return False
        if state is not None:
            earlier = entry.spec.latest(slot - 1)
            if earlier is not None and earlier > state.last_slot:
                self._say(app.name, f"cron {entry.name}: runs due since {_utc(earlier)} "
                                    "were missed (no scheduler ran); they are not replayed")
            previous = await self._previous_live(app.name, state)
            if previous is not None:
                if await claim_slot(self.store, app.name, entry.name, slot, "skipped",
                                    reason=f"run.{previous} was still running"):
                    self._say(app.name, f"cron {entry.name}: skipped the run due at "
                                        f"{_utc(slot)}: run.{previous} is still running")
                return False
        # the run's session id goes with the claim: should this process die after the
        # runner started the run but before record_run, the next slot still finds it
        # (_previous_live) and is skipped instead of overlapping it
        sid = new_session_id()
        if not await claim_slot(self.store, app.name, entry.name, slot, session_id=sid):
            return False  # another api process dealt with this slot
        try:
            rec, _ = await self.sessions.start(app, _CronUser(), [entry.command], tty=False,
                                               detach=True, kind="cron",
                                               source=f"cron.{entry.name}", session_id=sid)
        except errors.ApiError as e:
            await record_run(self.store, app.name, entry.name, slot, outcome="failed",
                             reason=e.message)
            self._say(app.name, f"cron {entry.name}: the run due at {_utc(slot)} could not "
                                f"start: {e.message}")
            self.log.warn("cron {app} {name}: could not start: {error}", app=app.name,
                          name=entry.name, error=e.message)
            return False
        await record_run(self.store, app.name, entry.name, slot, outcome="started",
                         session_id=rec.id)
        self.log.info("cron {app} {name}: started run.{number}", app=app.name,
                      name=entry.name, number=rec.number)
        return True

    async def _previous_live(self, app: str, state: CronState) -> int | None:
        """The number of the entry's last run if it is still running (a skipped or
        missed slot keeps the id of the last run, which may still be going)."""
        from epio.store.runs import LIVE, get_run_by_id

        if state.session_id is None:
            return None
        try:
            rec = await get_run_by_id(self.store, state.session_id)
        except NotFound:
            return None
        if rec.state not in LIVE:
            return None
        await self.sessions.reconcile(app)  # a run whose runner died is "lost", not live
        rec = await get_run_by_id(self.store, state.session_id)
        return rec.number if rec.state in LIVE else None

    def _say(self, app: str, text: str) -> None:
        platform_line(self.log_sink, app, text)


async def describe(store: Store, app: str, now: float) -> list[dict[str, Any]]:
    """The app's entries (of its current release) with their last run and status."""
    from epio.store.runs import get_run_by_id

    release = await current_release(store, app)
    if release is None:
        return []
    states = await list_cron(store, app)
    out = []
    for entry in entries_of(release):
        state = states.get(entry.name)
        item: dict[str, Any] = {
            "name": entry.name, "schedule": entry.schedule, "command": entry.command,
            "status": "never", "reason": None, "last_run": None,
            "last_slot": state.last_slot if state else None,
            "next_slot": entry.spec.next_after(now),
        }
        if state is not None:
            item["reason"] = state.reason
            if state.outcome in ("skipped", "missed", "failed"):
                item["status"] = state.outcome
            elif state.outcome == "starting":
                item["status"] = "running"
        if state is not None and state.session_id is not None:
            try:
                rec = await get_run_by_id(store, state.session_id)
            except NotFound:
                rec = None
            if rec is not None:
                item["last_run"] = {k: getattr(rec, k) for k in (
                    "number", "state", "started", "ended", "exit_status", "exit_signal")}
                if state.outcome == "started":
                    item["status"] = _run_status(rec)
                    if item["status"] == "failed" and rec.reason:
                        item["reason"] = rec.reason
        out.append(item)
    return out


def _run_status(rec: Any) -> str:
    if rec.state in ("starting", "running"):
        return "running"
    if rec.state == "exited" and rec.exit_status == 0 and not rec.exit_signal:
        return "succeeded"
    return "failed"


class CronService(MultiService):
    """Runs the cron runner while this process holds the ``epio.cron`` lock."""

    def __init__(self, runner: CronRunner, store: Store, clock: IReactorTime,
                 retry_interval: float) -> None:
        MultiService.__init__(self)
        self.runner = runner
        self.leader = LeaderService(store, LOCK_NAME, runner.become_leader,
                                    runner.lose_leadership, clock=clock,
                                    retry_interval=retry_interval)
        attach(self.leader, self)


class CronRoutes:
    """The ``[cron]`` endpoints of :class:`epio.api.web.Api`."""

    platform: Any  # epio.api.domain.Platform

    @operation("GET", "/apps/{app}/cron", "listCron",
               "The app's [cron] entries with their last run, status and next slot (UTC)",
               response=array(ref("CronEntry")), tag="run")
    async def list_cron_entries(self, request: IRequest, user: User, app: App) -> Any:
        platform = self.platform
        return await describe(platform.store, app.name, platform.clock.seconds())


__all__ = ["CronRunner", "CronService", "CronSettings", "describe", "entries_of"]
