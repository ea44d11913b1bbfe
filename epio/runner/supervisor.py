"""Supervision of app instances: one explicit state machine per instance.

::

                 +-----------------------------------------------+
                 |                                               v
    start --> STARTING --healthy--> HEALTHY --drain/stop--> DRAINING --exit--> STOPPED
               |  |  ^                |                        ^
               |  |  |                | exit / unhealthy       |
               |  |  +--backoff--- CRASHED <-------------------+ (stop while waiting)
               |  +----exit------------^
               +--boot timeout (never healthy yet) / image error--> FAILED --stop--> STOPPED

    HEALTHY --no connection for idle_sleep--> ASLEEP --wake--> STARTING (fast probe)
                                                 +--stop/drain--> (DRAINING) --> STOPPED

* A process that exits unasked is CRASHED and restarted after a backoff of
  ``1 s * 2**n`` capped at 5 min; ``n`` resets when the process had been healthy
  for 10 min.  There is no tight loop: every restart waits.
* A web instance must answer its health check within ``boot_timeout``; if it
  never has been healthy since ``runner.start`` it is FAILED (killed, not
  restarted: the scheduler decides), otherwise a boot timeout counts as a crash.
* While it runs, ``health_failures`` failed checks in a row make it CRASHED
  (it leaves the route table at once) and it is killed and restarted.
* Stop = SIGTERM to the whole process group, ``grace`` seconds, then SIGKILL
  of the group and of everything left in its cgroups.
* Sleep (``web`` only, ``idle_sleep`` of the spec, else ``runner.idle_sleep``): a
  HEALTHY instance whose port had no established TCP connection for ``idle_sleep``
  seconds (:meth:`Supervisor.check_idle`, fed the busy ports at every heartbeat
  tick by :func:`busy_ports`) is ASLEEP: stopped like a stop, but its port and
  place are kept and it is not restarted.  :meth:`Supervisor.wake` launches it again
  (once, however many ask) and probes its health every ``runner.wake_probe_interval``.

The launch mechanics (sandbox, cgroups, images) are behind :class:`ILauncher`
and health probes behind :class:`~epio.runner.health.IHealthProbe`, so this
module is unit-tested with ``task.Clock`` and a fake ``IReactorProcess``.
"""

from __future__ import annotations

import re
import signal
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from attrs import define, field, frozen
from twisted.internet import defer
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface

from epio import domain
from epio.addons.services import SERVICE_PROCESS_TYPES
from epio.config.schema import DEFAULT_UIDS
from epio.config.settings import RunnerSettings
from epio.runner.cgroups import Limits
from epio.runner.ports import NoFreePort, PortAllocator
from epio.runner.sandbox import sandboxed_pid
from epio.runner.users import UserError, app_user

if TYPE_CHECKING:
    from epio.node import INodeReactor
    from epio.pipeline import ILogSink
    from epio.runner.health import IHealthProbe

#: lines of an instance's output kept for a failed deploy's report, and their length cap
TAIL_LINES = 20
TAIL_LINE_MAX = 500
MAX_IDLE_SLEEP = 30 * 86400.0
INSTANCE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
PROCESS_TYPE = domain.PROCESS_TYPE
DIGEST = re.compile(r"^(sha256:)?[0-9a-f]{64}$")


State = domain.RunnerState  # the instance lifecycle drawn above (epio.domain holds the names)

TRANSITIONS: dict[State, frozenset[State]] = {
    State.STARTING: frozenset({State.HEALTHY, State.CRASHED, State.FAILED, State.DRAINING,
                               State.STOPPED}),
    State.HEALTHY: frozenset({State.CRASHED, State.DRAINING, State.ASLEEP}),
    State.DRAINING: frozenset({State.STOPPED}),
    State.CRASHED: frozenset({State.STARTING, State.STOPPED}),
    State.FAILED: frozenset({State.STOPPED}),
    State.STOPPED: frozenset(),
    State.ASLEEP: frozenset({State.STARTING, State.DRAINING, State.STOPPED}),
}
# states a router may send requests to
ROUTABLE = frozenset({State.HEALTHY})


class InvalidTransition(Exception):
    """A bug: the supervisor tried a transition the state machine does not have."""


class SpecError(ValueError):
    """A ``runner.start`` body the runner refuses (message says why)."""


MAX_ADDON_PORTS = 16  # of one spec (an app has one add-on per kind)


class ShuttingDown(Exception):
    """The runner is stopping: it starts no more processes."""


class UnknownInstance(KeyError):
    """No instance with that id on this runner."""


@frozen
class Settings:
    """Supervisor knobs (from the ``runner`` config section)."""

    advertise_host: str = "127.0.0.1"
    uid_min: int = DEFAULT_UIDS[0]
    uid_max: int = DEFAULT_UIDS[1]
    grace: float = 30.0
    boot_timeout: float = 60.0
    backoff_initial: float = 1.0
    backoff_max: float = 300.0
    backoff_reset: float = 600.0
    health_interval: float = 5.0
    health_boot_interval: float = 0.5
    health_boot_first: float = 0.05
    health_timeout: float = 2.0
    health_failures: int = 3
    drain_delay: float = 3.0
    worker_settle: float = 1.0
    stopped_retention: float = 60.0
    idle_sleep: float = 0.0  # default of a web instance's idle_sleep; 0: never sleeps
    wake_probe_interval: float = 0.02
    max_line: int = 16384
    limits: Limits = Limits(memory_mb=512, cpu_shares=1024, pids=512, nofile=4096)

    @classmethod
    def from_config(cls, c: RunnerSettings) -> Settings:
        return cls(
            advertise_host=c.advertise_host, uid_min=c.uid_min, uid_max=c.uid_max,
            grace=c.grace, boot_timeout=c.boot_timeout,
            backoff_initial=c.backoff_initial, backoff_max=c.backoff_max,
            backoff_reset=c.backoff_reset, health_interval=c.health_interval,
            health_boot_interval=c.health_boot_interval, health_boot_first=c.health_boot_first,
            health_timeout=c.health_timeout, health_failures=c.health_failures,
            drain_delay=c.drain_delay, worker_settle=c.worker_settle,
            stopped_retention=c.stopped_retention, max_line=c.max_log_line,
            idle_sleep=c.idle_sleep, wake_probe_interval=c.wake_probe_interval,
            limits=Limits(memory_mb=c.memory_mb, cpu_shares=c.cpu_shares,
                          pids=c.pids_max, nofile=c.nofile),
        )


TCP_ESTABLISHED = "01"
#: each health check of a booting web instance waits this many times longer than the
#: one before (from runner.health_boot_first up to runner.health_boot_interval)
HEALTH_BOOT_BACKOFF = 1.5


def busy_ports(ports: set[int], tables: Sequence[str] = ("/proc/net/tcp", "/proc/net/tcp6")
               ) -> set[int]:
    """Which of ``ports`` have an established TCP connection on this host (the apps
    share the host's network): the activity signal of sleeping (every router's
    connections, pooled ones included, whatever the number of routers)."""
    if not ports:
        return set()
    busy: set[int] = set()
    for table in tables:
        try:
            with open(table, encoding="ascii") as f:
                next(f, None)  # the header
                for line in f:
                    fields = line.split(None, 4)
                    if len(fields) < 4 or fields[3] != TCP_ESTABLISHED:
                        continue
                    port = int(fields[1].rpartition(":")[2], 16)
                    if port in ports:
                        busy.add(port)
        except FileNotFoundError:
            continue  # no IPv6
    return busy


def backoff_delay(attempt: int, initial: float = 1.0, cap: float = 300.0) -> float:
    """Seconds to wait before restart number ``attempt + 1`` (0-based)."""
    if attempt >= 64:
        return cap
    return float(min(initial * (2**attempt), cap))


def _num(body: Mapping[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, int | float) or isinstance(v, bool) or not lo <= v <= hi:
        raise SpecError(f"{key} must be a number in {lo:g}..{hi:g}, not {v!r}")
    return float(v)


def _int(limits: Mapping[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    v = limits.get(key)
    if v is None:
        return default
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise SpecError(f"limits.{key} must be an integer in {lo}..{hi}, not {v!r}")
    return v


@frozen
class InstanceSpec:
    """The desired instance, as ``runner.start`` described it (validated)."""

    instance_id: str
    app: str
    uid: int
    release: int
    process_type: str
    index: int
    command: str | tuple[str, ...]
    image_digest: str
    env: dict[str, str]
    limits: Limits
    health_check: str | None
    boot_timeout: float
    grace: float
    # ports of the app's shared add-on servers (from the api): the network fence lets
    # this UID, and no other, connect to them on this host
    addon_ports: tuple[int, ...] = ()
    # seconds without a connection before a web instance sleeps: None = the runner's
    # default (runner.idle_sleep), 0 = never ([http] idle_sleep of epio.ini)
    idle_sleep: float | None = None
    # a new release of an asleep app: sleep as soon as the first health check passed
    asleep_after_boot: bool = False

    @property
    def source(self) -> str:
        """The log source of this instance's output: ``web.1``."""
        return f"{self.process_type}.{self.index}"

    @property
    def is_web(self) -> bool:
        """Gets a port and a health check: web, and the platform's dedicated database
        servers (epio.addons.services), which are never routed to."""
        return self.process_type == "web" or self.process_type in SERVICE_PROCESS_TYPES

    @classmethod
    def from_message(cls, body: Mapping[str, Any], settings: Settings, index: int) -> InstanceSpec:
        iid = body.get("instance_id")
        if not isinstance(iid, str) or not INSTANCE_ID.match(iid):
            raise SpecError(f"invalid instance_id {iid!r}")
        try:
            user = app_user(body.get("app"), body.get("uid"), settings.uid_min,  # type: ignore[arg-type]
                            settings.uid_max)
        except UserError as e:
            raise SpecError(str(e)) from None
        ptype = body.get("process_type", "web")
        if not isinstance(ptype, str) or not PROCESS_TYPE.fullmatch(ptype):
            raise SpecError(f"invalid process_type {ptype!r}")
        command = body.get("command")
        if isinstance(command, list) and command and all(isinstance(a, str) for a in command):
            command = tuple(command)
        elif not isinstance(command, str) or not command.strip():
            raise SpecError("command must be a non-empty string or list of strings")
        digest = body.get("image_digest")
        # a dedicated server started before the app's first build has no image yet: its
        # binaries come from the host, the launcher gives it an empty read-only /app
        imageless = digest == "" and ptype in SERVICE_PROCESS_TYPES
        if not isinstance(digest, str) or not (imageless or DIGEST.match(digest)):
            raise SpecError(f"image_digest must be a sha256 hex digest, not {digest!r}")
        env = body.get("env") or {}
        if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str | int | float) and not isinstance(v, bool)
            and k and "=" not in k and "\0" not in k and "\0" not in str(v)
            for k, v in env.items()
        ):
            raise SpecError("env must map names to string values")
        release = body.get("release", 0)
        if not isinstance(release, int) or isinstance(release, bool) or release < 0:
            raise SpecError(f"release must be a non-negative integer, not {release!r}")
        lim = body.get("limits") or {}
        if not isinstance(lim, dict):
            raise SpecError("limits must be a map")
        d = settings.limits
        limits = Limits(
            memory_mb=_int(lim, "memory_mb", d.memory_mb, 16, 1 << 20),
            cpu_shares=_int(lim, "cpu_shares", d.cpu_shares, 2, 262144),
            pids=_int(lim, "pids", d.pids, 8, 1 << 22),
            nofile=_int(lim, "nofile", d.nofile, 64, 1 << 20),
        )
        hc = body.get("health_check")
        if hc is not None and (not isinstance(hc, str) or not hc.startswith("/")
                               or any(c in hc for c in " \r\n\t")):
            raise SpecError(f"health_check must be a URL path starting with /, not {hc!r}")
        idx = body.get("index", index)
        if not isinstance(idx, int) or isinstance(idx, bool) or idx < 1:
            raise SpecError(f"index must be a positive integer, not {idx!r}")
        addon_ports = body.get("addon_ports") or []
        if not isinstance(addon_ports, list) or len(addon_ports) > MAX_ADDON_PORTS or not all(
                isinstance(p, int) and not isinstance(p, bool) and 0 < p < 65536
                for p in addon_ports):
            raise SpecError(f"addon_ports must be a list of at most {MAX_ADDON_PORTS} ports")
        return cls(
            instance_id=iid, app=user.app, uid=user.uid, release=release, process_type=ptype,
            index=idx, command=command, image_digest=digest.removeprefix("sha256:"),
            env={k: str(v) for k, v in env.items()}, limits=limits, health_check=hc or None,
            boot_timeout=_num(body, "boot_timeout", settings.boot_timeout, 1, 3600),
            grace=_num(body, "grace", settings.grace, 0, 3600),
            addon_ports=tuple(sorted(set(addon_ports))),
            idle_sleep=(None if body.get("idle_sleep") is None
                        else _num(body, "idle_sleep", 0, 0, MAX_IDLE_SLEEP)),
            asleep_after_boot=body.get("asleep_after_boot") is True,
        )

    def to_message(self) -> dict[str, Any]:
        """The ``runner.start`` body that recreates this spec (for the state file)."""
        return {
            "instance_id": self.instance_id, "app": self.app, "uid": self.uid,
            "release": self.release, "process_type": self.process_type, "index": self.index,
            "command": list(self.command) if isinstance(self.command, tuple) else self.command,
            "image_digest": self.image_digest, "env": dict(self.env),
            "limits": {"memory_mb": self.limits.memory_mb, "cpu_shares": self.limits.cpu_shares,
                       "pids": self.limits.pids, "nofile": self.limits.nofile},
            "health_check": self.health_check, "boot_timeout": self.boot_timeout,
            "grace": self.grace, "addon_ports": list(self.addon_ports),
            "idle_sleep": self.idle_sleep, "asleep_after_boot": self.asleep_after_boot,
        }

    def sleeps_after(self, default: float) -> float:
        """Seconds without a connection after which this instance sleeps (0: never):
        only ``web`` sleeps, never a worker or a dedicated database server."""
        if self.process_type != "web":
            return 0.0
        return default if self.idle_sleep is None else self.idle_sleep


@define
class Launch:
    """One prepared launch: what to spawn, and the resources to clean up after."""

    argv: list[str]
    env: dict[str, str]
    cwd: str
    child_fds: dict[int, Any]
    info_fd: int | None = None  # bubblewrap writes its child's pid here
    cgroup: Any = None
    scratch: Any = None
    image: str | None = None
    pid: int | None = None  # the spawned process
    group: int | None = None  # the process group to signal
    start_time: int | None = None


class ILauncher(Interface):
    isolation = Attribute("The Isolation this launcher enforces")

    def prepare(spec: InstanceSpec, port: int | None) -> defer.Deferred[Launch]:
        """Make the image, dirs and cgroups ready; fire the Launch to spawn."""

    def spawned(launch: Launch, pid: int) -> None:
        """The launch's process was spawned with ``pid``."""

    def signal(launch: Launch, sig: int) -> None:
        """Send ``sig`` to the launch's whole process group."""

    def kill_all(launch: Launch) -> None:
        """SIGKILL everything left of the launch (group and cgroups)."""

    def oom_kills(launch: Launch) -> int:
        """How many out-of-memory kills the kernel counted for the launch."""

    def listening_ports(launch: Launch, host: str | None = None) -> list[int]:
        """The TCP ports the launch's processes listen on (to say what is wrong when
        a web process never answers on $PORT); with ``host``, only on sockets that take
        connections to that address (the wildcard or the address itself)."""

    def cleanup(launch: Launch) -> defer.Deferred[None]:
        """Remove what prepare made (after the process is gone)."""


@define(eq=False)
class Instance:
    """One instance's live record."""

    spec: InstanceSpec
    state: State
    since: float
    port: int | None = None
    restarts: int = 0
    attempt: int = 0  # backoff exponent
    generation: int = 0
    launch: Launch | None = None
    transport: Any = None
    ever_healthy: bool = False
    healthy_since: float | None = None
    stopping: bool = False
    boot_failed: bool = False
    reason: str | None = None
    squatted: bool = False  # said once per start: another process holds its port
    health_failures: int = 0
    oom_before: int = 0
    oom_seen: int = 0
    starts: int = 0
    active_at: float = 0.0  # the last time a connection to its port was seen
    waking: bool = False  # launched by a wake: probed every wake_probe_interval
    boot_probes: int = 0  # health checks since this launch (the boot schedule's step)
    wake_wanted: bool = False  # woken while its sleeping process still exits
    calls: dict[str, Any] = field(factory=dict)  # name -> IDelayedCall
    waiters: list[defer.Deferred[None]] = field(factory=list)
    # the last TAIL_LINES lines of output (over restarts): what a failed deploy shows
    tail: deque[str] = field(factory=lambda: deque(maxlen=TAIL_LINES))

    @property
    def running(self) -> bool:
        return self.transport is not None

    def heartbeat(self, host: str, tail: bool = False) -> dict[str, Any]:
        """The instance as heartbeats and ``runner.status`` report it; ``tail``: with its
        last lines of output while it is not healthy (runner.status only)."""
        s = self.spec
        out: dict[str, Any] = {
            "instance_id": s.instance_id, "app": s.app, "release": s.release,
            "process_type": s.process_type, "index": s.index, "host": host, "port": self.port,
            "state": self.state.value, "since": self.since, "restarts": self.restarts,
        }
        if self.reason:
            out["reason"] = self.reason
        if self.waking:  # its route stays asleep (routers hold requests) until healthy
            out["waking"] = True
        if tail and self.state in (State.STARTING, State.CRASHED, State.FAILED) and self.tail:
            out["tail"] = list(self.tail)
        return out


class InstanceProtocol(ProcessProtocol):
    """Lines of stdout/stderr to the log sink; bubblewrap's info on fd 3."""

    def __init__(self, sup: Supervisor, inst: Instance, gen: int, launch: Launch) -> None:
        self.sup = sup
        self.inst = inst
        self.gen = gen
        self.launch = launch
        self.buffers: dict[int, bytes] = {1: b"", 2: b""}
        self.info = b""

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.closeStdin()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == self.launch.info_fd:
            self.info += data
            self._parse_info()
            return
        buf = self.buffers.get(childFD, b"") + data
        max_line = self.sup.settings.max_line
        while True:
            nl = buf.find(b"\n")
            if nl < 0:
                if len(buf) < max_line:
                    break
                line, buf = buf[:max_line], buf[max_line:]
            else:
                line, buf = buf[:nl], buf[nl + 1 :]
            self._line(line)
        self.buffers[childFD] = buf

    def _parse_info(self) -> None:
        if self.launch.group is not None:
            return
        pid = sandboxed_pid(self.info)
        if pid is not None:
            self.launch.group = pid
            self.sup.changed()

    def childConnectionLost(self, childFD: int) -> None:
        if childFD == self.launch.info_fd:
            self._parse_info()

    def _line(self, raw: bytes) -> None:
        text = raw.rstrip(b"\r").decode("utf-8", "replace")
        self.inst.tail.append(text[:TAIL_LINE_MAX])
        self.sup.sink.emit(self.inst.spec.app, self.inst.spec.source, text,
                           self.sup.reactor.seconds())

    def processEnded(self, reason: Failure) -> None:
        for fd, buf in self.buffers.items():
            if buf:
                self._line(buf)
                self.buffers[fd] = b""
        self.sup._process_ended(self.inst, self.gen, *exit_status(reason))


def exit_status(reason: Failure) -> tuple[int | None, int | None]:
    """(exit code, signal) of a process's end, as ``processEnded`` reports it."""
    if isinstance(reason.value, ProcessDone):
        return 0, None
    if isinstance(reason.value, ProcessTerminated):
        return reason.value.exitCode, reason.value.signal
    return None, None


def describe_exit(code: int | None, sig: int | None, oom: bool) -> str:
    if oom:
        return "killed: out of memory"
    if sig is not None:
        return f"killed by signal {_signame(sig)}"
    if code is not None and code > 128 and code - 128 < 65:
        # bubblewrap reports a child killed by signal N as exit status 128 + N
        return f"exited with code {code} (killed by signal {_signame(code - 128)})"
    return f"exited with code {code}"


def _signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return str(sig)


class Supervisor:
    """Runs, restarts, health-checks, drains and stops the instances of one runner."""

    log = Logger()

    def __init__(
        self,
        reactor: INodeReactor,
        launcher: ILauncher,
        probe: IHealthProbe,
        sink: ILogSink,
        ports: PortAllocator,
        settings: Settings,
        observers: Sequence[Callable[[], None]] = (),
        before_spawn: Sequence[Callable[[], defer.Deferred[None] | None]] = (),
    ) -> None:
        self.reactor = reactor
        self.launcher = launcher
        self.probe = probe
        self.sink = sink
        self.ports = ports
        self.settings = settings
        # told (in order) after every change of an instance: the runner's state file
        # and heartbeat, the network fence, the static server (epio.runner.service)
        self.observers = observers
        self.instances: dict[str, Instance] = {}
        self.shutting_down = False
        # awaited (what each returns) before an instance's process is spawned: the
        # network fence opens the instance's ports first (epio.runner.fence)
        self.before_spawn = before_spawn
        # async (spec) -> extra env, asked before every spawn of a dedicated server of an
        # add-on with a standby: its role from the add-on record, or an
        # epio.addons.standby.Fenced refusal (set by epio.runner.service)
        self.service_gate: Callable[[InstanceSpec], Awaitable[dict[str, str]]] | None = None

    # -- queries -----------------------------------------------------------

    def get(self, instance_id: str) -> Instance:
        try:
            return self.instances[instance_id]
        except KeyError:
            raise UnknownInstance(instance_id) from None

    def heartbeat_instances(self, tail: bool = False) -> list[dict[str, Any]]:
        host = self.settings.advertise_host
        return [i.heartbeat(host, tail) for i in self.instances.values()]

    def changed(self) -> None:
        for observer in self.observers:
            try:
                observer()
            except Exception:
                self.log.failure("state change observer failed")

    # -- the state machine -------------------------------------------------

    def _to(self, inst: Instance, new: State, reason: str | None = None) -> None:
        if new is inst.state:
            return
        if new not in TRANSITIONS[inst.state]:
            raise InvalidTransition(f"{inst.spec.instance_id}: {inst.state.value} -> {new.value}")
        self.log.info(
            "instance {instance_id} ({app} {source}) {old} -> {new}{why}",
            instance_id=inst.spec.instance_id, app=inst.spec.app, source=inst.spec.source,
            old=inst.state.value, new=new.value, why=f" ({reason})" if reason else "",
        )
        inst.state = new
        inst.since = self.reactor.seconds()
        if reason is not None:
            inst.reason = reason
        if new is State.STOPPED:
            self._cancel_all(inst)
            self.ports.release(inst.port)
            waiters, inst.waiters = inst.waiters, []
            for w in waiters:
                w.callback(None)
            inst.calls["forget"] = self.reactor.callLater(
                self.settings.stopped_retention, self._forget, inst
            )
        elif new is State.FAILED:
            self.ports.release(inst.port)
        self.changed()

    def _say(self, inst: Instance, text: str) -> None:
        """A ``platform`` line in the app's log, naming the instance (``web.1: ...``)."""
        self.sink.emit(inst.spec.app, "platform", f"{inst.spec.source}: {text}",
                       self.reactor.seconds())

    def _call(self, inst: Instance, name: str, delay: float, f: Callable[..., Any],
              *args: Any) -> None:
        self._cancel(inst, name)
        inst.calls[name] = self.reactor.callLater(delay, f, *args)

    def _cancel(self, inst: Instance, name: str) -> None:
        call: Any = inst.calls.pop(name, None)
        if call is not None and call.active():
            call.cancel()

    def _cancel_all(self, inst: Instance) -> None:
        for name in list(inst.calls):
            self._cancel(inst, name)

    def _forget(self, inst: Instance) -> None:
        if self.instances.get(inst.spec.instance_id) is inst and inst.state is State.STOPPED:
            del self.instances[inst.spec.instance_id]
            self.changed()

    # -- commands ------------------------------------------------------------

    def next_index(self, app: str, process_type: str) -> int:
        taken = {
            i.spec.index for i in self.instances.values()
            if i.spec.app == app and i.spec.process_type == process_type
            and i.state is not State.STOPPED
        }
        n = 1
        while n in taken:
            n += 1
        return n

    def start(self, body: Mapping[str, Any], port: int | None = None) -> dict[str, Any]:
        """Handle ``runner.start``: validate, allocate a port, launch; reply at once.

        ``port`` is a wish (the port an instance had before a runner restart).
        """
        app = body.get("app")
        ptype = body.get("process_type", "web")
        known = self.instances.get(body.get("instance_id"))  # type: ignore[arg-type]
        if known is not None and known.state not in (State.STOPPED, State.FAILED):
            index = known.spec.index
        elif isinstance(app, str) and isinstance(ptype, str):
            index = self.next_index(app, ptype)
        else:
            index = 1
        spec = InstanceSpec.from_message(body, self.settings, index)
        if self.shutting_down:
            raise ShuttingDown("the runner is stopping: it starts no more instances")
        old = self.instances.get(spec.instance_id)
        if old is not None:
            if old.state not in (State.STOPPED, State.FAILED):
                if old.spec != spec:
                    raise SpecError(f"instance {spec.instance_id} already runs another spec")
                return self._started_reply(old)
            self._cancel_all(old)
            self.ports.release(old.port)
        self._check_data_dir_free(spec)
        if not spec.is_web:
            port = None
        elif port is None or not self.ports.claim_if_free(port):
            port = self.ports.allocate()
        inst = Instance(spec=spec, state=State.STARTING, since=self.reactor.seconds(), port=port)
        self.instances[spec.instance_id] = inst
        self.log.info(
            "instance {instance_id} ({app} {source} release {release}) starting on port {port}",
            instance_id=spec.instance_id, app=spec.app, source=spec.source,
            release=spec.release, port=port,
        )
        self.changed()
        self._launch(inst)
        return self._started_reply(inst)

    def _check_data_dir_free(self, spec: InstanceSpec) -> None:
        """One dedicated database server per data directory: two on the same files (a
        server the api starts again while this runner restarted its recorded one after
        a restart the api took for a death) would corrupt them."""
        data_dir = spec.env.get("EPIO_SERVICE_DIR")
        if spec.process_type not in SERVICE_PROCESS_TYPES or not data_dir:
            return
        for other in self.instances.values():
            if (other.spec.instance_id != spec.instance_id and other.spec.app == spec.app
                    and other.spec.env.get("EPIO_SERVICE_DIR") == data_dir
                    and other.state not in (State.STOPPED, State.FAILED)):
                raise SpecError(f"{data_dir} of {spec.app} is in use by instance "
                                f"{other.spec.instance_id} here: one server per data directory")

    def _started_reply(self, inst: Instance) -> dict[str, Any]:
        return {"instance_id": inst.spec.instance_id, "host": self.settings.advertise_host,
                "port": inst.port, "state": inst.state.value}

    def drain(self, instance_id: str) -> dict[str, Any]:
        """Handle ``runner.drain``: leave the routes now, stop after ``drain_delay`` + grace."""
        inst = self.get(instance_id)
        if inst.state in (State.STARTING, State.HEALTHY):
            inst.stopping = True
            self._cancel(inst, "health")
            self._cancel(inst, "boot")
            if inst.running or inst.launch is not None:
                self._to(inst, State.DRAINING, "draining")
                self._call(inst, "drain", self.settings.drain_delay, self._terminate, inst,
                           inst.spec.grace)
            else:
                self._to(inst, State.STOPPED, "drained before it ran")
        elif inst.state is State.CRASHED and inst.running:
            # an unhealthy process is being killed: finish that as a stop
            self.stop(instance_id).addErrback(
                lambda f: self.log.failure("stopping {i} failed", f, i=instance_id))
        elif inst.state is State.ASLEEP and inst.running:
            self.stop(instance_id).addErrback(
                lambda f: self.log.failure("stopping {i} failed", f, i=instance_id))
        elif inst.state in (State.CRASHED, State.FAILED, State.ASLEEP):
            inst.stopping = True
            self._to(inst, State.STOPPED, "drained")
        return {"instance_id": instance_id, "state": inst.state.value}

    def stop(self, instance_id: str, grace: float | None = None) -> defer.Deferred[None]:
        """Handle ``runner.stop``: SIGTERM, grace, SIGKILL; fires once STOPPED."""
        inst = self.get(instance_id)
        grace = inst.spec.grace if grace is None else grace
        inst.stopping = True
        if inst.state is State.STOPPED:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        inst.waiters.append(d)
        self._cancel(inst, "drain")
        self._cancel(inst, "health")
        self._cancel(inst, "boot")
        if inst.running:
            if inst.state is not State.CRASHED:
                self._to(inst, State.DRAINING, "stopping")
            self._terminate(inst, grace)
        elif inst.state in (State.STARTING, State.CRASHED, State.FAILED, State.ASLEEP):
            self._to(inst, State.STOPPED, "stopped")
        return d

    def _terminate(self, inst: Instance, grace: float) -> None:
        if not inst.running or inst.launch is None:
            return
        self._say(inst, f"stopping: SIGTERM, SIGKILL in {grace:g}s")
        self.launcher.signal(inst.launch, signal.SIGTERM)
        self._call(inst, "kill", grace, self._kill, inst, inst.generation)

    def _kill(self, inst: Instance, gen: int) -> None:
        if inst.generation != gen or inst.launch is None or not inst.running:
            return
        self._say(inst, "did not exit in time: SIGKILL")
        self.launcher.signal(inst.launch, signal.SIGKILL)
        self.launcher.kill_all(inst.launch)

    # -- launching -----------------------------------------------------------

    def _launch(self, inst: Instance) -> None:
        d = defer.Deferred.fromCoroutine(self._launch_async(inst))
        d.addErrback(lambda f: self.log.failure("launch of {i} failed", f,
                                                i=inst.spec.instance_id))

    async def _launch_async(self, inst: Instance) -> None:
        inst.generation += 1
        gen = inst.generation
        inst.healthy_since = None
        inst.health_failures = 0
        inst.boot_failed = False
        inst.squatted = False
        self._to(inst, State.STARTING)
        if not self._port_still_free(inst):
            return
        extra = await self._service_role(inst, gen)
        if extra is None:
            return
        launch = await self._prepare_launch(inst)
        if launch is None:
            return
        launch.env.update(extra)
        if not await self._through_gates(inst, gen, launch):
            return
        await self._spawn(inst, gen, launch)

    async def _service_role(self, inst: Instance, gen: int) -> dict[str, str] | None:
        """The extra environment of a dedicated server of an add-on with a standby: its
        role, as the add-on record gives it (:attr:`service_gate`); ``{}`` for any other
        process.  None: it is not started now (failed, stopped, tried again after the
        crash backoff, or a newer launch of it has begun)."""
        if not (inst.spec.process_type in SERVICE_PROCESS_TYPES
                and "EPIO_ADDON_EPOCH" in inst.spec.env):
            return {}
        from epio.addons.standby import Fenced

        if self.service_gate is None:
            # fail closed: without the record's answer a fenced old primary would
            # start (as a primary: the script's default) and accept writes
            why = ("its role cannot be asked (this runner has no store): a server of "
                   "an add-on with a standby is not started")
            self.log.error("instance {i}: {why}", i=inst.spec.instance_id, why=why)
            self._say(inst, why)
            self._to(inst, State.STOPPED if inst.stopping else State.FAILED, why)
            return None
        try:
            extra = await self.service_gate(inst.spec)
        except Fenced as e:
            # never started again: the add-on record names other servers now
            self.log.warn("instance {i}: {why}", i=inst.spec.instance_id, why=str(e))
            self._say(inst, str(e))
            self._to(inst, State.STOPPED if inst.stopping else State.FAILED, str(e))
            return None
        except Exception as e:
            # the store cannot say which role this server has: not started now,
            # asked again after the crash backoff
            why = f"its role is unknown ({type(e).__name__}: {e})"
            self.log.warn("instance {i}: {why}", i=inst.spec.instance_id, why=why)
            if inst.stopping or self.shutting_down:
                self._to(inst, State.STOPPED, why)
                return None
            delay = backoff_delay(inst.attempt, self.settings.backoff_initial,
                                  self.settings.backoff_max)
            inst.attempt += 1
            self._say(inst, f"{why}; trying again in {delay:g}s")
            self._to(inst, State.CRASHED, why)
            self._call(inst, "restart", delay, self._restart, inst)
            return None
        if inst.generation != gen:
            return None
        return extra

    async def _prepare_launch(self, inst: Instance) -> Launch | None:
        """The launcher's preparation of ``inst``; None: it failed, and the instance is
        FAILED (or STOPPED, when it was being stopped)."""
        try:
            return await self.launcher.prepare(inst.spec, inst.port)
        except Exception as e:
            why = f"cannot prepare: {e}"
            self.log.error("instance {i}: {why}", i=inst.spec.instance_id, why=why)
            self._say(inst, why)
            if inst.stopping:
                self._to(inst, State.STOPPED, why)
            else:
                self._to(inst, State.FAILED, why)
            return None

    async def _through_gates(self, inst: Instance, gen: int, launch: Launch) -> bool:
        """Await every spawn gate (:attr:`before_spawn`): True when ``launch`` may be
        spawned now; False when it was cleaned up instead (a gate refused it, or the
        instance was stopped or relaunched meanwhile)."""
        refused: str | None = None
        try:
            for gate in list(self.before_spawn):
                waiting = gate()
                if waiting is not None:
                    await waiting
        except Exception as e:
            # a gate refuses the spawn: the network fence is on but not in place
            refused = f"cannot start: {e}"
        if inst.generation != gen or inst.stopping or self.shutting_down:
            await self.launcher.cleanup(launch)
            if inst.state is State.DRAINING:
                self._to(inst, State.STOPPED, "stopped before it ran")
            return False
        if refused is not None:
            await self.launcher.cleanup(launch)
            self.log.error("instance {i}: {why}", i=inst.spec.instance_id, why=refused)
            self._say(inst, refused)
            self._to(inst, State.FAILED, refused)
            return False
        return True

    async def _spawn(self, inst: Instance, gen: int, launch: Launch) -> None:
        """Spawn the prepared ``launch`` of ``inst``, then start its boot and health
        timers (a web process) or its settle timer (any other)."""
        inst.launch = launch
        inst.oom_before = inst.oom_seen = self.launcher.oom_kills(launch)
        proto = InstanceProtocol(self, inst, gen, launch)
        try:
            inst.transport = self.reactor.spawnProcess(
                proto, launch.argv[0], launch.argv, env=launch.env, path=launch.cwd,
                childFDs=launch.child_fds,
            )
        except Exception as e:
            inst.launch = None
            await self.launcher.cleanup(launch)
            self._to(inst, State.FAILED, f"cannot spawn: {e}")
            return
        inst.starts += 1
        self.launcher.spawned(launch, inst.transport.pid)
        self._say(inst, f"starting release {inst.spec.release}: {self._command(inst)}"
                        + (f" (PORT={inst.port})" if inst.port else ""))
        if inst.spec.is_web:
            self._call(inst, "boot", inst.spec.boot_timeout, self._boot_timeout, inst, gen)
            inst.boot_probes = 0
            self._call(inst, "health", self._boot_interval(inst), self._probe, inst, gen)
        else:
            self._call(inst, "health", self.settings.worker_settle, self._settled, inst, gen)
        self.changed()

    def _port_still_free(self, inst: Instance) -> bool:
        """Before a web process starts again (a restart, a wake), its port must still be
        free: while it was down another process -- another app's, since apps share the
        host's network namespace -- may have bound it.  A web instance then moves to a
        free port (its runner's heartbeat and status carry the new one); a dedicated
        database server keeps its port (the app's URL names it) and its health check
        refuses the squatter (:meth:`_probed`).  False: no port left, the instance failed."""
        port = inst.port
        if port is None or inst.spec.process_type != "web" or self.ports.is_free(port):
            return True
        try:
            new = self.ports.allocate()
        except NoFreePort as e:
            self._to(inst, State.FAILED, f"port {port} is taken by another process: {e}")
            return False
        self.ports.release(port)
        inst.port = new
        self.log.warn("instance {i}: port {port} is taken by another process; it starts on "
                      "port {new}", i=inst.spec.instance_id, port=port, new=new)
        self._say(inst, f"port {port} is taken by another process: starting on port {new}")
        self.changed()
        return True

    def _command(self, inst: Instance) -> str:
        if inst.spec.process_type in SERVICE_PROCESS_TYPES:
            # the platform's wrapper script: dozens of lines that say nothing to the user
            return f"the dedicated {inst.spec.process_type.removeprefix('epio-')} server"
        c = inst.spec.command
        return c if isinstance(c, str) else " ".join(c)

    # -- health --------------------------------------------------------------

    def _settled(self, inst: Instance, gen: int) -> None:
        if inst.generation == gen and inst.state is State.STARTING and inst.running:
            self._healthy(inst)

    def _boot_interval(self, inst: Instance) -> float:
        """Seconds until the next health check of a booting web instance: every
        ``wake_probe_interval`` while it wakes; else ``health_boot_first`` after the
        launch, each next one ``HEALTH_BOOT_BACKOFF`` times longer, at most
        ``health_boot_interval``.  An app that boots in 0.3 s is seen healthy within
        ~0.1 s of it instead of at the first 0.5 s tick, and one that boots slowly is
        probed no more often than before once its boot takes a second."""
        if inst.waking:
            return self.settings.wake_probe_interval
        s = self.settings
        step = min(inst.boot_probes, 64)
        inst.boot_probes += 1
        return min(s.health_boot_interval,
                   max(s.health_boot_first * HEALTH_BOOT_BACKOFF ** step, 0.0))

    def _healthy(self, inst: Instance) -> None:
        self._cancel(inst, "boot")
        if inst.waking:
            self._say(inst, f"awake in {self.reactor.seconds() - inst.since:.3f}s")
        inst.waking = False
        inst.ever_healthy = True
        inst.healthy_since = inst.active_at = self.reactor.seconds()
        inst.reason = None
        self._to(inst, State.HEALTHY)
        self._say(inst, "healthy")

    def _probe(self, inst: Instance, gen: int) -> None:
        inst.calls.pop("health", None)
        if inst.generation != gen or inst.state not in (State.STARTING, State.HEALTHY):
            return
        assert inst.port is not None
        d = self.probe.check(self.settings.advertise_host, inst.port, inst.spec.health_check,
                             self.settings.health_timeout)
        d.addCallback(lambda ok: self._probed(inst, gen, bool(ok)))
        d.addErrback(lambda f: self.log.failure("health probe of {i} failed", f,
                                                i=inst.spec.instance_id))

    def _probed(self, inst: Instance, gen: int, ok: bool) -> None:
        if inst.generation != gen or not inst.running:
            return
        s = self.settings
        if inst.state is State.STARTING:
            if ok and not self._owns_port(inst):
                ok = False  # another process answered on the instance's port
            if ok:
                first = not inst.ever_healthy
                self._healthy(inst)
                if first and inst.spec.asleep_after_boot and inst.spec.is_web:
                    self._sleep(inst, 0, "a new release of an asleep app: healthy, asleep "
                                         "again until a request")
                    return
                self._call(inst, "health", s.health_interval, self._probe, inst, gen)
            else:
                self._call(inst, "health", self._boot_interval(inst), self._probe, inst, gen)
        elif inst.state is State.HEALTHY:
            if ok:
                inst.health_failures = 0
            else:
                inst.health_failures += 1
                self.log.warn("instance {i}: health check failed ({n}/{max})",
                              i=inst.spec.instance_id, n=inst.health_failures,
                              max=s.health_failures)
                if inst.health_failures >= s.health_failures:
                    why = f"unhealthy: {inst.health_failures} failed health checks"
                    self._say(inst, why + ", restarting")
                    self._to(inst, State.CRASHED, why)
                    self._terminate(inst, min(inst.spec.grace, 5.0))
                    return
            self._call(inst, "health", s.health_interval, self._probe, inst, gen)

    def _owns_port(self, inst: Instance) -> bool:
        """Whether the instance's own processes hold the listening socket on its port.
        A health check that passes is not enough before the first routed request: apps
        share the host's network namespace, and a process of another app that bound
        the port while this one was down would answer it -- and get this app's
        traffic.  Checked once per start, before the instance is first healthy."""
        if inst.port is None or inst.launch is None:
            return True
        # on a socket that takes the health check's (and the routers') connections: one
        # on 127.0.0.1:P leaves advertise_host:P to whoever binds it
        if inst.port in self.launcher.listening_ports(inst.launch,
                                                      self.settings.advertise_host):
            return True
        if not inst.squatted:
            inst.squatted = True
            self.log.warn("instance {i}: port {port} answers, but not from the instance's "
                          "own processes: not healthy", i=inst.spec.instance_id, port=inst.port)
            self._say(inst, f"port {inst.port} answers, but not from this instance's own "
                            "processes (another process holds it): not healthy")
        return False

    def _boot_timeout(self, inst: Instance, gen: int) -> None:
        inst.calls.pop("boot", None)
        if inst.generation != gen or inst.state is not State.STARTING or not inst.running:
            return
        assert inst.launch is not None
        why = self._boot_failure(inst, self.launcher.listening_ports(inst.launch))
        inst.boot_failed = True
        inst.reason = why
        self._say(inst, why + ": killed")
        self.launcher.signal(inst.launch, signal.SIGKILL)
        self.launcher.kill_all(inst.launch)

    def _boot_failure(self, inst: Instance, listening: list[int]) -> str:
        """Why a web instance never became healthy, naming $PORT and, when it listens
        somewhere else, where."""
        s, port = inst.spec, inst.port
        within = f"within the boot timeout of {s.boot_timeout:g}s"
        if port is not None and port in listening:
            check = f"its health check GET {s.health_check}" if s.health_check else \
                "a TCP connect"
            return (f"not healthy {within}: it listens on $PORT ({port}) but {check} "
                    "never succeeded")
        if listening:
            ports = ", ".join(str(p) for p in listening)
            return (f"{s.process_type} listens on {ports}; it must listen on $PORT ({port}) "
                    f"(not healthy {within})")
        return f"not healthy {within}: nothing listens on $PORT ({port})"

    # -- exits ---------------------------------------------------------------

    def _process_ended(self, inst: Instance, gen: int, code: int | None, sig: int | None) -> None:
        if inst.generation != gen:
            return
        launch = inst.launch
        inst.transport = None
        inst.launch = None
        for name in ("boot", "health", "kill", "drain"):
            self._cancel(inst, name)
        oom = launch is not None and self.launcher.oom_kills(launch) > inst.oom_before
        how = describe_exit(code, sig, oom)
        if launch is not None:
            self.launcher.kill_all(launch)  # leftovers of the group: no orphans
            d = self.launcher.cleanup(launch)
            d.addErrback(lambda f: self.log.failure("cleanup of {i} failed", f,
                                                    i=inst.spec.instance_id))
        if self.shutting_down:
            self._say(inst, f"process {how} (runner shutting down)")
            waiters, inst.waiters = inst.waiters, []
            for w in waiters:
                w.callback(None)
            return
        if inst.state is State.ASLEEP and not inst.stopping:
            self._say(inst, f"asleep (process {how})")
            if inst.wake_wanted:
                inst.wake_wanted = False
                self._wake(inst)
            return
        if inst.stopping:
            self._say(inst, f"process {how}")
            if inst.state is State.CRASHED:
                self._to(inst, State.STOPPED, f"stopped ({how})")
            else:
                if inst.state is State.STARTING:
                    self._to(inst, State.DRAINING)
                self._to(inst, State.STOPPED, f"stopped ({how})")
            return
        if inst.boot_failed and not inst.ever_healthy:
            self._say(inst, f"process {how}; failed: {inst.reason}")
            self._to(inst, State.FAILED, inst.reason)
            return
        if oom:
            self.log.warn("instance {i} ({app} {source}) killed: out of memory",
                          i=inst.spec.instance_id, app=inst.spec.app, source=inst.spec.source)
        now = self.reactor.seconds()
        if inst.healthy_since is not None and now - inst.healthy_since >= self.settings.backoff_reset:
            inst.attempt = 0
        delay = backoff_delay(inst.attempt, self.settings.backoff_initial,
                              self.settings.backoff_max)
        inst.attempt += 1
        why = inst.reason if inst.boot_failed else how
        if inst.state is State.CRASHED and inst.reason and inst.reason.startswith("unhealthy"):
            why = f"{inst.reason}; {how}"
        self._say(inst, f"process {how}; restarting in {delay:g}s")
        self._to(inst, State.CRASHED, why)
        self._call(inst, "restart", delay, self._restart, inst)

    def _restart(self, inst: Instance) -> None:
        inst.calls.pop("restart", None)
        if inst.state is not State.CRASHED or inst.stopping or self.shutting_down:
            return
        inst.restarts += 1
        self._launch(inst)

    # -- sleep and wake --------------------------------------------------------

    def check_idle(self, busy_ports: set[int]) -> None:
        """Put to sleep each HEALTHY web instance with an ``idle_sleep`` whose port had no
        established connection (not in ``busy_ports``) for that long."""
        now = self.reactor.seconds()
        for inst in list(self.instances.values()):
            if inst.state is not State.HEALTHY or inst.stopping or inst.port is None:
                continue
            after = inst.spec.sleeps_after(self.settings.idle_sleep)
            if after <= 0:
                continue
            if inst.port in busy_ports:
                inst.active_at = now
            elif now - inst.active_at >= after:
                self._sleep(inst, after)

    def watched_ports(self) -> set[int]:
        """The ports :meth:`check_idle` needs to know about (instances that may sleep)."""
        return {i.port for i in self.instances.values()
                if i.state is State.HEALTHY and i.port is not None
                and i.spec.sleeps_after(self.settings.idle_sleep) > 0}

    def _sleep(self, inst: Instance, after: float, why: str = "") -> None:
        why = why or f"no request for {after:g}s"
        self._cancel(inst, "health")
        self._cancel(inst, "boot")
        self._to(inst, State.ASLEEP, why)
        self._say(inst, f"going to sleep: {why}")
        self._terminate(inst, inst.spec.grace)

    def wake(self, app: str) -> list[dict[str, Any]]:
        """Handle ``runner.wake``: launch every ASLEEP web instance of ``app`` again.
        Asking again while one wakes starts nothing more: the reply names each web
        instance of the app with its state."""
        out = []
        for inst in list(self.instances.values()):
            if inst.spec.app != app or inst.spec.process_type != "web":
                continue
            if inst.state is State.ASLEEP and not inst.stopping and not self.shutting_down:
                if inst.running:
                    inst.wake_wanted = True  # its sleeping process still exits: then
                else:
                    self._wake(inst)
            out.append({"instance_id": inst.spec.instance_id, "state": inst.state.value,
                        "host": self.settings.advertise_host, "port": inst.port})
        return out

    def _wake(self, inst: Instance) -> None:
        self.log.info("instance {i} ({app} {source}) waking up", i=inst.spec.instance_id,
                      app=inst.spec.app, source=inst.spec.source)
        inst.waking = True
        inst.attempt = 0
        self._launch(inst)

    def poll_oom(self) -> None:
        """Report OOM kills of processes other than the main one (it keeps running)."""
        for inst in self.instances.values():
            launch = inst.launch
            if launch is None or not inst.running:
                continue
            n = self.launcher.oom_kills(launch)
            if n > inst.oom_seen:
                inst.oom_seen = n
                self.log.warn("instance {i} ({app} {source}): a process was killed: out of "
                              "memory", i=inst.spec.instance_id, app=inst.spec.app,
                              source=inst.spec.source)
                self._say(inst, "a process was killed: out of memory")

    # -- shutdown ------------------------------------------------------------

    def cancel_timers(self) -> None:
        """Cancel every pending timer (restarts, health checks, forgetting)."""
        for inst in self.instances.values():
            self._cancel_all(inst)

    def shutdown(self, grace: float) -> defer.Deferred[None]:
        """Stop every process (SIGTERM, ``grace``, SIGKILL) without changing desired state.

        A dedicated database server gets its own grace when that is longer
        (``addons.service_stop_timeout``): its clean stop (SHUTDOWN SAVE, fast
        shutdown) is what keeps its data, and must not be cut short by a node stop."""
        self.shutting_down = True
        waits = []
        for inst in self.instances.values():
            self._cancel_all(inst)
            if inst.running and inst.launch is not None:
                d: defer.Deferred[None] = defer.Deferred()
                inst.waiters.append(d)
                waits.append(d)
                self.launcher.signal(inst.launch, signal.SIGTERM)
                wait = grace
                if inst.spec.process_type in SERVICE_PROCESS_TYPES:
                    wait = max(grace, inst.spec.grace)
                self._call(inst, "kill", wait, self._kill, inst, inst.generation)
        return defer.DeferredList(waits).addCallback(lambda _: None)
