"""Facts derived from the store that the domain, deployer and scheduler share.

* The **current release** of an app is its newest release that no failed
  deploy produced: a deploy whose rollout failed leaves the previous release
  serving, and the scheduler converges on whatever is current.
* **Sizes** name the resource limits of a process type (``epio scale
  web=2:large``); the runner enforces them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.logger import Logger

from epio.basicauth import DEFAULT_REALM
from epio.store import Deploy, Release, Store

_log = Logger()

SIZES: dict[str, dict[str, int]] = {
    "small": {"memory_mb": 256, "cpu_shares": 512, "pids": 128, "nofile": 1024},
    "standard": {"memory_mb": 512, "cpu_shares": 1024, "pids": 256, "nofile": 4096},
    "large": {"memory_mb": 1024, "cpu_shares": 2048, "pids": 512, "nofile": 8192},
}
DEFAULT_SIZE = "standard"

# instance states (epio.store.INSTANCE_STATES) that count as "running or about to"
LIVE_STATES = ("pending", "starting", "healthy", "crashed")


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
    for release in await store.list_releases(app, limit=len(failed) + 1):
        if release.version not in failed:
            return release
    return None


def release_facts(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """What the scheduler needs from a build's manifest, kept in the release's meta."""
    http = manifest.get("http") or {}
    facts: dict[str, Any] = {}
    if isinstance(http, Mapping):
        if http.get("health_check"):
            facts["health_check"] = str(http["health_check"])
        if isinstance(http.get("boot_timeout"), int | float):
            facts["boot_timeout"] = float(http["boot_timeout"])
        # the router's per-app overrides (the nexus turns these into route options)
        route = {k: http[k] for k in ("timeout", "idle_timeout", "max_body_size")
                 if isinstance(http.get(k), int | float) and not isinstance(http.get(k), bool)}
        if isinstance(http.get("request_buffering"), bool):
            route["request_buffering"] = http["request_buffering"]
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
