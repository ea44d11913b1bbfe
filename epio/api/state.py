"""Facts derived from the store that the domain, deployer and scheduler share.

* The **current release** of an app is its newest release that no failed
  deploy produced: a deploy whose rollout failed leaves the previous release
  serving, and the scheduler converges on whatever is current.
* The **serving release** is what ``epio releases`` calls ``current``: the newest
  release whose rollout succeeded (or that has no rollout record).  While a newer
  release rolls out, the scheduler already converges on it, but it is shown as
  ``deploying``, and only becomes ``current`` once its instances are healthy.
* :func:`rollout_verdict` is the one rule that decides a rollout from what the
  instances report (the deployer watching its rollout and the scheduler leader
  finishing one whose api process died both use it).
* **Sizes** name the resource limits of a process type (``epio scale
  web=2:large``); the runner enforces them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from attrs import frozen
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from epio import domain
from epio.basicauth import DEFAULT_REALM
from epio.store import DEPLOY_FINAL, Deploy, Instance, Release, Store

_log = Logger()

SIZES: dict[str, dict[str, int]] = {
    "small": {"memory_mb": 256, "cpu_shares": 512, "pids": 128, "nofile": 1024},
    "standard": {"memory_mb": 512, "cpu_shares": 1024, "pids": 256, "nofile": 4096},
    "large": {"memory_mb": 1024, "cpu_shares": 2048, "pids": 512, "nofile": 8192},
}
DEFAULT_SIZE = "standard"



async def failed_releases(store: Store, app: str, deploys: list[Deploy] | None = None
                          ) -> set[int]:
    """Versions made by deploys that failed (they must never serve)."""
    if deploys is None:
        deploys = await store.list_deploys(app, limit=200)
    return {d.release for d in deploys if d.status == "failed" and d.release is not None}


async def current_release(store: Store, app: str, deploys: list[Deploy] | None = None
                          ) -> Release | None:
    """The release the app should run: the newest one not made by a failed deploy.

    ``deploys``: the app's recent deploys when the caller has them already.
    """
    failed = await failed_releases(store, app, deploys)
    return pick_current(await store.list_releases(app, limit=len(failed) + 1), failed)


def pick_current(releases: list[Release], failed: set[int]) -> Release | None:
    """The newest of ``releases`` (newest first) not made by a failed deploy: the rule
    of :func:`current_release` for a caller that read the releases already."""
    for release in releases[:len(failed) + 1]:
        if release.version not in failed:
            return release
    return None


#: an instance of the rolling-out release that crashed this often before becoming
#: healthy fails the rollout
MAX_CRASH_RESTARTS = 3


@frozen
class ReleaseState:
    """What ``epio releases`` shows of one release."""

    status: str  # current | deploying | failed | superseded
    kept: int | None = None  # failed: the release that kept running
    deploy: Deploy | None = None  # the rollout that made it current (or not)


def release_states(releases: list[Release], deploys: list[Deploy]) -> dict[int, ReleaseState]:
    """The state of each release from the rollouts (``deploys``) that made them.

    ``failed``: its rollout failed, it never served; ``deploying``: its rollout runs;
    ``current``: the newest release whose rollout succeeded (or that has no rollout
    record); ``superseded``: any other (older, or replaced during its rollout).
    """
    newest: dict[int, Deploy] = {}
    for dep in sorted(deploys, key=lambda d: d.created, reverse=True):
        if dep.release is not None:
            newest.setdefault(dep.release, dep)
    serving = None
    for r in sorted(releases, key=lambda r: r.version, reverse=True):
        d = newest.get(r.version)
        if d is None or d.status == "succeeded":
            serving = r.version
            break
    out = {}
    for r in releases:
        d = newest.get(r.version)
        if d is not None and d.status == "failed":
            kept = d.meta.get("kept")
            out[r.version] = ReleaseState("failed", kept if isinstance(kept, int) else None, d)
        elif d is not None and d.status not in DEPLOY_FINAL:
            out[r.version] = ReleaseState("deploying", None, d)
        elif r.version == serving:
            out[r.version] = ReleaseState("current", None, d)
        else:
            out[r.version] = ReleaseState("superseded", None, d)
    return out


#: the newest releases and deploys of an app that decide which release serves
SERVING_WINDOW = 200


async def serving_release(store: Store, app: str) -> int | None:
    """The version that serves (``current`` in ``epio releases``), if any."""
    releases = await store.list_releases(app, limit=SERVING_WINDOW)
    states = release_states(releases, await store.list_deploys(app, limit=SERVING_WINDOW))
    return next((v for v, s in states.items() if s.status == "current"), None)


@frozen
class Verdict:
    """A rollout's outcome from its instances: ``done`` (all wanted healthy) or
    ``failure`` (the reason), or neither yet."""

    done: bool
    failure: str | None
    healthy: dict[str, int]
    culprit: Instance | None = None  # the instance that failed it


#: release meta key of a restart of some process types (``epio restart web``): the
#: other types' instances are not replaced; ``{type: version}`` says which older
#: release's instances of that type run the new release unchanged (same image, config
#: and command, as a restart copies them)
KEEP = "keep"


def kept(meta: Mapping[str, Any] | None) -> dict[str, int]:
    """The ``keep`` of a release's meta: {process type: version of the instances it keeps}."""
    raw = (meta or {}).get(KEEP)
    if not isinstance(raw, Mapping):
        return {}
    return {str(t): v for t, v in raw.items() if isinstance(v, int)}


def runs(inst: Instance, version: int, keep: Mapping[str, int]) -> bool:
    """Whether ``inst`` is an instance of release ``version``: started for it, or of a
    type the release keeps (a restart of other types) from the release it kept."""
    return inst.release == version or keep.get(inst.process_type) == inst.release


def rollout_verdict(instances: list[Instance], version: int, want: Mapping[str, int],
                    keep: Mapping[str, int] | None = None) -> Verdict:
    """Decide a rollout of ``version`` from its instances: failed as soon as one of
    them ``failed`` or crashed :data:`MAX_CRASH_RESTARTS` times before being healthy;
    done when every wanted process type has its quantity healthy (counting the
    instances of the types it ``keep``s, see :func:`runs`)."""
    mine = [i for i in instances if runs(i, version, keep or {})]
    for i in mine:
        if i.release != version:
            continue  # kept from an earlier release: healthy once already
        if i.state == "failed" or (i.state not in domain.SERVING_STATES
                                   and i.restarts >= MAX_CRASH_RESTARTS):
            what = "failed" if i.state == "failed" else f"crashed {i.restarts} times"
            return Verdict(False, f"{i.process_type}.{i.number} of v{version} {what} before "
                                  "becoming healthy", {}, i)
    # an asleep instance was healthy, then slept without a request (idle_sleep)
    healthy = {t: sum(1 for i in mine
                      if i.process_type == t and i.state in domain.SERVING_STATES)
               for t in want}
    return Verdict(all(healthy[t] >= n for t, n in want.items()), None, healthy)


async def routers_have(control: Any, settings: Any, clock: IReactorTime, app: str,
                       healthy: list[Instance], asleep: list[Instance] | None = None) -> bool:
    """Do routers send traffic to these (healthy, new) instances yet?

    The runner tells the api an instance is healthy at once, but routers learn it
    from the next heartbeat through the nexus.  Every nexus that answers
    ``nexus.where`` must list them in the app's route; when none answers, they must
    have been healthy for ``api.route_settle`` seconds.

    ``asleep``: new instances of an asleep app (booted, healthy once, asleep again:
    docs/apps.md).  When none of the new ones is healthy, every nexus must name them in
    the route's ``asleep`` entry instead -- the route a router wakes them by -- before
    the old ones may go: until then a nexus that has not read the new release routes
    neither, and the router would answer 503 rather than hold the request.
    """
    wanted = {i.id for i in healthy}
    sleeping = set() if wanted else {i.id for i in asleep or ()}
    answered = False
    for endpoint in settings.nexus_endpoints:
        try:
            reply = await control.request(endpoint, "nexus.where", {"app": app},
                                          timeout=settings.status_timeout)
        except Exception:
            continue
        answered = True
        route = reply.get("route") or {}
        routed = {b.get("instance_id") for b in route.get("backends") or []}
        if not wanted <= routed:
            return False
        if sleeping:
            entry = route.get("asleep")
            held = set(entry.get("instances") or ()) if isinstance(entry, dict) else set()
            if not sleeping <= held:
                return False
    if answered:
        return True
    now = clock.seconds()  # after the polls, not before
    return all(now - i.since >= settings.route_settle
               for i in (healthy if wanted else asleep or ()))


def release_facts(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """What the scheduler needs from a build's manifest, kept in the release's meta."""
    http = manifest.get("http") or {}
    facts: dict[str, Any] = {}
    if isinstance(http, Mapping):
        if http.get("health_check"):
            facts["health_check"] = str(http["health_check"])
        if isinstance(http.get("boot_timeout"), int | float):
            facts["boot_timeout"] = float(http["boot_timeout"])
        idle = http.get("idle_sleep")
        if isinstance(idle, int | float) and not isinstance(idle, bool):
            facts["idle_sleep"] = float(idle)  # the runner's, for web (docs/apps.md)
        # the router's per-app overrides (the nexus turns these into route options)
        route = {k: http[k] for k in ("timeout", "idle_timeout", "max_body_size")
                 if isinstance(http.get(k), int | float) and not isinstance(http.get(k), bool)}
        if isinstance(http.get("request_buffering"), bool):
            route["request_buffering"] = http["request_buffering"]
        if http.get("https_redirect") is True:
            route["https_redirect"] = True
        hsts = http.get("hsts_max_age")
        if isinstance(hsts, int) and not isinstance(hsts, bool) and hsts > 0:
            route["hsts_max_age"] = hsts
        if http.get("gzip") is True:  # dynamic responses gzipped (docs/router.md)
            route["gzip"] = True
        if route:
            facts["http"] = route
    rollover = manifest.get("rollover")
    if isinstance(rollover, Mapping) and rollover:
        # process type -> "stop-first" (epio.manifest.ROLLOVER_MODES); others start first
        facts["rollover"] = {str(k): str(v) for k, v in rollover.items()}
    env = manifest.get("env")
    if isinstance(env, Mapping):
        facts["env"] = {str(k): str(v) for k, v in env.items()}
    # [basic_auth]: the passwords arrive hashed from the manifest (epio.basicauth)
    users = manifest.get("basic_auth")
    if isinstance(users, Mapping) and users:
        facts["basic_auth"] = {"realm": str(manifest.get("basic_auth_realm") or DEFAULT_REALM),
                               "users": {str(k): str(v) for k, v in users.items()}}
    # [cron] entries (epio.api.cron runs them from the current release)
    cron = manifest.get("cron")
    if isinstance(cron, list | tuple):
        entries = [{k: str(c[k]) for k in ("name", "schedule", "command")} for c in cron
                   if isinstance(c, Mapping) and all(c.get(k) for k in ("name", "schedule",
                                                                          "command"))]
        if entries:
            facts["cron"] = entries
    return facts


def processes_of(manifest: Mapping[str, Any]) -> dict[str, str]:
    procs = manifest.get("processes") or {}
    if not isinstance(procs, Mapping):
        return {}
    return {str(k): str(v) for k, v in procs.items()}


def platform_line(sink: Any, app: str, text: str) -> None:
    """Put a ``platform`` line (deploys, scaling, add-ons) in the app's log.

    A failing sink is logged, never raised: the log is a side channel of the
    operation it reports.
    """
    if sink is None:
        return
    try:
        sink.emit(app, "platform", text)
    except Exception:
        _log.failure("log sink failed")
