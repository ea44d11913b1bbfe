"""The platform's shared vocabulary, each rule written once.

Shared floor, like :mod:`epio.store` and :mod:`epio.config`: the manifest parser, the
store, the runner, the api, the logger, the add-on servers and the CLI import these
names instead of restating them, so a name one layer accepts is never refused by a later
one (a Procfile ``Worker:`` used to pass the manifest and the store, then the runner
refused it at placement).  Nothing here does I/O or imports another part of epio.

Each name rule is a compiled pattern matched whole (``fullmatch``: ``$`` alone would
let a trailing newline through) plus, where users meet it, the sentence that says it
(:data:`APP_NAME_RULE`, :data:`PROCESS_TYPE_RULE`); the API's OpenAPI schemas use the
same patterns (``epio.api.spec``).

States (instance, deploy, release) are the strings the store keeps and the API shows.
The instance lifecycle the runner drives is :class:`RunnerState` (its transition table
lives with the supervisor, ``epio.runner.supervisor.TRANSITIONS``); the deploy state
machine is :data:`DEPLOY_TRANSITIONS`, drawn in docs/deploys.md.
"""

from __future__ import annotations

import enum
import re

__all__ = [
    "APP_NAME",
    "APP_NAME_MAX",
    "APP_NAME_RULE",
    "CRON_NAME_MAX",
    "DEPLOY_FINAL",
    "DEPLOY_INITIAL",
    "DEPLOY_STATES",
    "DEPLOY_TRANSITIONS",
    "HOSTNAME",
    "HOSTNAME_LABEL",
    "HOSTNAME_MAX",
    "INSTANCE_STATES",
    "SERVING_STATES",
    "LIVE_STATES",
    "LOG_SOURCE",
    "LOG_SOURCE_NAME",
    "MAX_CONFIG_VALUE",
    "MAX_EMAIL",
    "PLATFORM_APP",
    "PLATFORM_RELEASE",
    "PROCESS_TYPE",
    "PROCESS_TYPE_MAX",
    "PROCESS_TYPE_RULE",
    "POSTGRES_PROCESS_TYPE",
    "REDIS_PROCESS_TYPE",
    "RESERVED_APP_NAMES",
    "RESERVED_PROCESS_PREFIX",
    "SERVICE_PROCESS_TYPES",
    "RELEASE_STATES",
    "RUN_KINDS",
    "RUN_LIVE",
    "RUN_STATES",
    "RUNNER_STATES",
    "UPLOAD_MAX_MEMBERS",
    "RunnerState",
    "app_name_problem",
    "platform_hostname",
    "reserved_app_name_problem",
    "process_type_problem",
]

# ------------------------------------------------------------------ names

#: An app name is a DNS label (it is the app's hostname under the platform domain, its
#: Unix user's name and a directory name on every node): 1-30 characters.
APP_NAME_MAX = 30
APP_NAME = re.compile(r"^[a-z](?:[a-z0-9-]{0,28}[a-z0-9])?$")
APP_NAME_RULE = ("use 1-30 lowercase letters, digits and '-', starting with a letter and "
                 "not ending with '-' (like my-app)")

#: A process type (``web``, ``worker``, ``clock``; ``redis``/``postgres`` for dedicated
#: add-on servers) names a Procfile line, a formation entry, an instance (``web.1``)
#: and a log source: 1-30 characters, lowercase so that ``Worker`` and ``worker`` are
#: never two types.
PROCESS_TYPE_MAX = 30
PROCESS_TYPE = re.compile(r"^[a-z][a-z0-9_-]{0,29}$")
PROCESS_TYPE_RULE = ("use 1-30 lowercase letters, digits, '_' and '-', starting with a "
                     "letter (like worker)")
RESERVED_PROCESS_RULE = ("process types starting with 'epio-' are the platform's own "
                         "(its add-on servers)")


#: The platform's own process types: the dedicated add-on servers it runs for an app
#: (``epio.addons.services``).  The scheduler leaves them to the add-ons code, so an
#: app's own process may not take a name starting with :data:`RESERVED_PROCESS_PREFIX`.
RESERVED_PROCESS_PREFIX = "epio-"
REDIS_PROCESS_TYPE = "epio-redis"
POSTGRES_PROCESS_TYPE = "epio-postgres"
SERVICE_PROCESS_TYPES = (REDIS_PROCESS_TYPE, POSTGRES_PROCESS_TYPE)

#: The source of a log line (``web.1``, ``run.3``, ``cron.NAME``, ``router``): at most
#: 64 characters.  LOG_SOURCE_NAME is the unanchored form (the API's source lists).
LOG_SOURCE_NAME = r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}"
LOG_SOURCE = re.compile(rf"^{LOG_SOURCE_NAME}$")
#: A ``[cron]`` job's name is the end of its runs' log source ``cron.NAME``.
CRON_NAME_MAX = 64 - len("cron.")


def app_name_problem(name: object) -> str | None:
    """Why ``name`` is not an app name (the user-facing sentence), or None if it is one."""
    if isinstance(name, str) and APP_NAME.fullmatch(name):
        return None
    return f"{name!r} is not a valid app name: {APP_NAME_RULE}"


#: "App ID 0 is special": the platform's own control plane (the api and dashboard of
#: every api node) is routed like an app under this name -- its route, access log lines
#: and stats carry it -- but it is no app of the store: no user can create, see or own
#: it (:data:`RESERVED_APP_NAMES`).  Its backends are the api nodes, release
#: :data:`PLATFORM_RELEASE`.  docs/router.md "The platform's own route".
PLATFORM_APP = "epio"
PLATFORM_RELEASE = 0
#: The ``Via`` header the routers add to every request they pass on (and drop from what
#: clients send): the api tells a routed request from one to its own listener by it
#: (``/status``'s ``routed``; the CLI's default URL, docs/cli.md).  epio/lb/proxy.py's
#: ``via`` is the same value.
ROUTER_VIA = "1.1 epio"
#: App names no user may take: the platform's own, and names users would mistake for it.
RESERVED_APP_NAMES = frozenset({PLATFORM_APP, "api", "www", "dashboard", "admin"})


def platform_hostname(configured: str, domain: str) -> str:
    """The hostname the routers serve the platform at: ``api.hostname`` as configured
    (lower case, no trailing dot), or ``epio.<node.domain>`` when it is empty; ``""``
    when it is ``off`` (no platform route)."""
    name = configured.strip().lower().rstrip(".")
    if name == "off":
        return ""
    if name:
        return name
    domain = domain.strip().lower().rstrip(".")
    return f"{PLATFORM_APP}.{domain}" if domain else PLATFORM_APP


def reserved_app_name_problem(name: str, hostname: str = "", domain: str = "") -> str | None:
    """Why no user may create an app called ``name`` (the user-facing sentence), or None:
    a name of :data:`RESERVED_APP_NAMES`, or one whose own hostname ``<name>.<domain>``
    is the platform's ``hostname``."""
    if name in RESERVED_APP_NAMES:
        return f"the app name {name!r} is reserved"
    domain = domain.strip().lower().rstrip(".")
    if hostname and domain and f"{name}.{domain}" == hostname:
        return f"the app name {name!r} is reserved: {hostname} is the platform's own hostname"
    return None


def process_type_problem(name: object) -> str | None:
    """Why an app may not name a process ``name`` (the user-facing reason, to follow the
    name and a colon), or None if it may: the platform's own types are refused too."""
    if not isinstance(name, str) or not PROCESS_TYPE.fullmatch(name):
        return f"not a valid process type: {PROCESS_TYPE_RULE}"
    if name.startswith(RESERVED_PROCESS_PREFIX):
        return f"reserved: {RESERVED_PROCESS_RULE}"
    return None


#: One label of a hostname (a custom domain, a certificate's name): 1-63 characters of
#: lowercase letters, digits and '-', not starting or ending with '-'.
HOSTNAME_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
#: A whole hostname in its normal form (lower case, no trailing dot), or ``*.`` and one.
HOSTNAME = re.compile(
    r"^(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
HOSTNAME_MAX = 253

# ------------------------------------------------------------------ limits

#: The longest e-mail address of a user (the store's only other rule: it has an "@").
MAX_EMAIL = 254
#: The largest value of one config var, in characters.
MAX_CONFIG_VALUE = 32 * 1024
#: The most members an upload's tarball may have (the unpacker refuses more; the api
#: does not read further for its early look at the manifest).
UPLOAD_MAX_MEMBERS = 100_000

# ------------------------------------------------------------------ states


class RunnerState(enum.StrEnum):
    """The states of an instance on its runner (the supervisor's state machine, which a
    runner reports in its heartbeats)."""

    STARTING = "starting"
    HEALTHY = "healthy"
    DRAINING = "draining"
    CRASHED = "crashed"
    FAILED = "failed"
    STOPPED = "stopped"
    #: a web instance stopped after ``[http] idle_sleep`` without a request: its port and
    #: place on the runner are kept, a request wakes it (docs/apps.md "Sleeping apps")
    ASLEEP = "asleep"


#: The states the runners report (heartbeats, ``runner.start`` answers).
RUNNER_STATES = frozenset(RunnerState)

#: Every state the store keeps for an instance: ``pending`` (placed, not yet reported by
#: its runner), then the runner's.
INSTANCE_STATES = ("pending", "starting", "healthy", "draining", "crashed", "stopped", "failed",
                   "asleep")

#: The instance states that count as "running or about to": they hold a place on their
#: runner and are not replaced.
LIVE_STATES = ("pending", "starting", "healthy", "crashed", "asleep")

#: The instance states that have served and will serve again without a new start: a
#: rollout counts an ``asleep`` instance as healthy (it was, then slept).
SERVING_STATES = ("healthy", "asleep")

#: A deploy (the rollout of one release): an upload starts ``pending``; a config change or
#: a rollback makes its release at once and starts ``deploying``.  A final state never
#: changes again.  Drawn in docs/deploys.md.
DEPLOY_STATES = ("pending", "building", "built", "deploying", "succeeded", "failed", "cancelled")
DEPLOY_FINAL = ("succeeded", "failed", "cancelled")
DEPLOY_INITIAL = frozenset({"pending", "deploying"})
DEPLOY_TRANSITIONS: dict[str, frozenset[str]] = {
    "pending": frozenset({"building", "failed"}),
    "building": frozenset({"built", "failed"}),
    "built": frozenset({"deploying", "failed"}),
    "deploying": frozenset({"succeeded", "failed", "cancelled"}),
    "succeeded": frozenset(),
    "failed": frozenset(),
    "cancelled": frozenset(),
}

#: A command session (``epio run``, a detached run, the release phase, a cron run): its
#: kinds, its states and the states in which it still runs.
RUN_KINDS = ("interactive", "detached", "release", "cron")
RUN_STATES = ("starting", "running", "exited", "failed", "lost")
RUN_LIVE = ("starting", "running")

#: What the API says of a release: the one serving, the one being deployed, one whose
#: deploy failed, or an older one.
RELEASE_STATES = ("current", "deploying", "failed", "superseded")

assert set(INSTANCE_STATES) == {"pending", *RUNNER_STATES}
assert set(LIVE_STATES) <= set(INSTANCE_STATES)
assert set(DEPLOY_TRANSITIONS) == set(DEPLOY_STATES)
assert set(RUN_LIVE) <= set(RUN_STATES)
