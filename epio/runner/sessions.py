"""``epio run`` on the runner: management commands in the app's sandbox, in a PTY.

A *session* runs one command for an app exactly like the app's processes run
(the runner's :class:`~epio.runner.launcher.SandboxLauncher`: the release's
image at /app, the app's UID, its data dir, its environment, its cgroup
limits), either

* in a **PTY** (the client has a terminal): the runner opens the PTY itself,
  sizes it before the spawn and gives its slave to the command as fds 0-2; a
  tiny helper in the sandbox makes it the command's *controlling terminal*, so
  Ctrl-C (the byte 0x03 in raw mode) and SIGWINCH reach the command's process
  group and not bubblewrap (whose ``--new-session`` would otherwise leave the
  command without one);
* with **pipes** (no terminal on the client): stdin, stdout and stderr
  separately, bytes preserved;
* **detached** (``epio run --detach`` and the release-phase command): stdin
  closed, every output line to the app's log (source ``run.N``/``release``).

Transport (api DEALER -> this runner's control ROUTER; the api always asks):

* output is addressed by byte offsets.  The attached api long-polls
  ``run.poll {ack, max, wait}``; ``ack`` frees output up to that offset.  The
  runner keeps at most ``run.window_kb`` of unacknowledged output: past it, it
  stops reading the PTY/pipes (``pauseProducing``) until the api acknowledges,
  so a command writing faster than the client reads blocks on its own write.
  A lost reply is simply polled again from the same ``ack``.
* input is a sequence of events (``run.input {seq, data|eof|rows,cols|signal}``)
  applied exactly once in ``seq`` order; the ack waits until the PTY/pipe took
  the data (bounded input buffer).
* every request from the attached api renews a lease (``run.lease``); a client
  that detaches (or whose api vanished) leaves an interactive session running
  for ``run.detached_idle_timeout``, then it is stopped (SIGTERM, SIGKILL after
  ``run.kill_grace``) and audited.  A session without a PTY is stopped when its
  client goes.  ``run.max_lifetime`` bounds every session.

Audit: the end of each session (time, exit status/signal, reason) is written
to the store (:mod:`epio.store.runs`) and both start and end are ``platform``
lines in the app's log.

A session's lifecycle (:data:`SESSION_TRANSITIONS`; any other move raises
:class:`~epio.runner.supervisor.InvalidTransition`)::

    run.start --> STARTING --spawned--> RUNNING --process and output ended--> EXITED
                      |                                                       ^
                      +--------------- cannot start (prepare/spawn failed) ---+
"""

from __future__ import annotations

import enum
import errno
import fcntl
import os
import re
import shlex
import signal as signals
import struct
import termios
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from attrs import define, field, frozen
from twisted.application.service import Service
from twisted.internet import abstract, defer, fdesc, main
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from epio.config.settings import RunSettings as RunSection
from epio.runner.fence import FenceError
from epio.runner.sandbox import sandboxed_pid
from epio.runner.supervisor import InstanceSpec, InvalidTransition, SpecError, exit_status

if TYPE_CHECKING:
    from epio.node import INodeReactor
    from epio.pipeline import ILogSink
    from epio.runner.supervisor import ILauncher, Settings
    from epio.store import StoreService

SESSION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
MAX_COMMAND = 16 * 1024
TAIL_LINES = 20
PTY_READ = 65536
EXIT_EOF_WAIT = 2.0  # seconds to wait for the PTY's last bytes after the process ended
FORGET_AFTER = 60.0  # an ended session's record is kept this long for a late client
TIOCGSID = getattr(termios, "TIOCGSID", 0x5429)  # the session id of a terminal (Linux)

# Run inside the sandbox, as the app's user, just before the command: the process
# is already a session leader without a terminal (bubblewrap --new-session, or
# setsid without a sandbox); make the PTY on fd 0 its controlling terminal.
CTTY_HELPER = (
    "import os,sys,fcntl,termios,signal\n"
    # Python ignores SIGPIPE and SIGXFSZ; an ignored signal stays ignored across exec
    "for n in ('SIGPIPE','SIGXFSZ','SIGINT','SIGQUIT','SIGTSTP','SIGTTIN','SIGTTOU'):\n"
    " signal.signal(getattr(signal,n),signal.SIG_DFL)\n"
    "try:\n os.setsid()\nexcept OSError:\n pass\n"
    "try:\n fcntl.ioctl(0, termios.TIOCSCTTY, 0)\nexcept OSError:\n pass\n"
    "os.execvp(sys.argv[1], sys.argv[1:])\n"
)
CTTY_SHIM = 'exec "$VIRTUAL_ENV/bin/python" -I -S -c "$0" "$@"'


class SessionError(Exception):
    """A request about a session the runner refuses; ``code`` is the bus error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@frozen
class RunSettings:
    """The ``run`` config section, as the runner uses it."""

    max_sessions_per_app: int = 5
    max_lifetime: float = 86400.0
    detached_idle_timeout: float = 3600.0
    lease: float = 30.0
    poll_wait: float = 15.0
    window: int = 1024 * 1024
    chunk: int = 256 * 1024
    input_buffer: int = 256 * 1024
    kill_grace: float = 10.0

    @classmethod
    def from_config(cls, c: RunSection) -> RunSettings:
        return cls(
            max_sessions_per_app=c.max_sessions_per_app, max_lifetime=c.max_lifetime,
            detached_idle_timeout=c.detached_idle_timeout, lease=c.lease,
            poll_wait=c.poll_wait, window=c.window_kb * 1024, chunk=c.chunk_kb * 1024,
            input_buffer=c.input_buffer_kb * 1024, kill_grace=c.kill_grace,
        )


BRIEF_SCRIPT = 120
"""A ``sh -c SCRIPT NAME ARGS...`` session whose script is longer than this many
characters (``epio psql``'s, ``epio redis-cli``'s) shows in the app's log as
``NAME ARGS... (a N-character sh script)``; its audit record keeps the whole command."""


def log_text(command: str) -> str:
    """How a session's command shows in the app's log lines (see :data:`BRIEF_SCRIPT`)."""
    try:
        argv = shlex.split(command)
    except ValueError:
        return command
    if (len(argv) >= 4 and argv[0] in ("sh", "/bin/sh") and argv[1] == "-c"
            and len(argv[2]) > BRIEF_SCRIPT):
        return f"{shlex.join(argv[3:])} (a {len(argv[2])}-character sh script)"
    return command


def command_text(argv: list[str]) -> str:
    """The shell command a session runs: one item is a shell string as typed
    (``epio run -- 'yes | head'``); several are an argv, quoted exactly."""
    if len(argv) == 1:
        return argv[0]
    return shlex.join(argv)


def set_window_size(fd: int, rows: int, cols: int) -> None:
    """TIOCSWINSZ on a PTY (master or slave); the foreground group gets SIGWINCH."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _signal_number(name: str) -> int:
    n = name.upper()
    if not n.startswith("SIG"):
        n = "SIG" + n
    if n not in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGKILL", "SIGUSR1", "SIGUSR2",
                 "SIGWINCH", "SIGTSTP", "SIGCONT"):
        raise SessionError("bad_request", f"signal {name!r} cannot be sent to a session")
    return int(getattr(signals, n))


def _signal_name(sig: int | None) -> str | None:
    if sig is None:
        return None
    try:
        return signals.Signals(sig).name
    except ValueError:
        return str(sig)


# --------------------------------------------------------------------------- buffers


class OutputWindow:
    """Output not yet acknowledged by the client, addressed by byte offset.

    ``start`` is the offset of the first kept byte, ``end`` the offset after the
    last.  ``full`` once ``window`` bytes are kept: the producer must pause.
    """

    def __init__(self, window: int) -> None:
        self.window = window
        self.chunks: deque[tuple[int, bytes]] = deque()  # (fd, data)
        self.start = 0
        self.end = 0

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def full(self) -> bool:
        return self.size >= self.window

    def append(self, fd: int, data: bytes) -> None:
        if not data:
            return
        if self.chunks and self.chunks[-1][0] == fd and len(self.chunks[-1][1]) < 16384:
            last_fd, last = self.chunks.pop()
            self.chunks.append((fd, last + data))
        else:
            self.chunks.append((fd, data))
        self.end += len(data)

    def ack(self, offset: int) -> None:
        """Forget everything before ``offset`` (an old or too-new ack is clamped)."""
        offset = max(self.start, min(offset, self.end))
        drop = offset - self.start
        while drop > 0 and self.chunks:
            fd, data = self.chunks[0]
            if len(data) <= drop:
                self.chunks.popleft()
                drop -= len(data)
                self.start += len(data)
            else:
                self.chunks[0] = (fd, data[drop:])
                self.start += drop
                drop = 0

    def read(self, offset: int, limit: int) -> tuple[int, list[list[Any]]]:
        """Up to ``limit`` bytes from ``offset`` (at least ``start``): (offset, chunks)."""
        offset = max(self.start, min(offset, self.end))
        skip = offset - self.start
        out: list[list[Any]] = []
        left = limit
        for fd, data in self.chunks:
            if left <= 0:
                break
            if skip >= len(data):
                skip -= len(data)
                continue
            part = data[skip: skip + left]
            skip = 0
            out.append([fd, part])
            left -= len(part)
        return offset, out


@implementer(IPushProducer)
class InputGate:
    """Registered as the producer on a PTY/pipe writer: knows when its buffer is full."""

    def __init__(self) -> None:
        self.paused = False
        self._waiters: list[defer.Deferred[None]] = []

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)

    def stopProducing(self) -> None:
        self.resumeProducing()

    def wait(self) -> defer.Deferred[None]:
        if not self.paused:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._waiters.append(d)
        return d


class PtyMaster(abstract.FileDescriptor):
    """The master side of a session's PTY as a reactor-driven transport."""

    def __init__(self, fd: int, reactor: INodeReactor, on_data: Callable[[bytes], None],
                 on_lost: Callable[[], None]) -> None:
        super().__init__(reactor)
        fdesc.setNonBlocking(fd)
        self.fd = fd
        self.on_data = on_data
        self.on_lost = on_lost
        self.connected = 1

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "pty"

    def doRead(self) -> Any:
        try:
            data = os.read(self.fd, PTY_READ)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EINTR):
                return None
            return main.CONNECTION_DONE  # EIO: every slave fd is closed
        if not data:
            return main.CONNECTION_DONE
        self.on_data(data)
        return None

    def writeSomeData(self, data: bytes) -> Any:
        try:
            return os.write(self.fd, data)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EINTR):
                return 0
            return main.CONNECTION_LOST

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)  # type: ignore[no-untyped-call]  # Twisted leaves it untyped
        fd, self.fd = self.fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass
        self.on_lost()


# --------------------------------------------------------------------------- sessions


class SessionState(enum.StrEnum):
    """Where a session is in its lifecycle (the module docstring draws it); the value
    is what replies and the api show."""

    STARTING = "starting"
    RUNNING = "running"
    EXITED = "exited"


SESSION_TRANSITIONS: dict[SessionState, frozenset[SessionState]] = {
    SessionState.STARTING: frozenset({SessionState.RUNNING, SessionState.EXITED}),
    SessionState.RUNNING: frozenset({SessionState.EXITED}),
    SessionState.EXITED: frozenset(),
}


@define(eq=False)
class Session:
    """One session's live record."""

    id: str
    app: str
    number: int
    user: str
    command: str
    tty: bool
    detach: bool
    kind: str
    source: str
    started: float
    out: OutputWindow
    rows: int = 24
    cols: int = 80
    state: SessionState = SessionState.STARTING  # moved only by SessionManager._move
    client: str | None = None
    attached: bool = False
    last_contact: float = 0.0
    next_seq: int = 0
    launch: Any = None
    transport: Any = None
    pty: PtyMaster | None = None
    gate: InputGate = field(factory=InputGate)
    paused: bool = False
    process_done: bool = False
    output_done: bool = False
    exit_status: int | None = None
    exit_signal: str | None = None
    reason: str | None = None
    ended: float | None = None
    stopping: bool = False
    discard: bool = False  # no client will read the output any more
    exit_sent: bool = False
    line_buffers: dict[int, bytes] = field(factory=dict)
    tail: deque[str] = field(factory=lambda: deque(maxlen=TAIL_LINES))
    poller: defer.Deferred[None] | None = None
    waiters: list[defer.Deferred[None]] = field(factory=list)
    calls: dict[str, Any] = field(factory=dict)
    uid: int = 0
    addon_ports: tuple[int, ...] = ()  # the spec's: its UID may reach them (the fence)

    @property
    def live(self) -> bool:
        return self.state is not SessionState.EXITED

    def summary(self) -> dict[str, Any]:
        return {
            "session_id": self.id, "app": self.app, "number": self.number, "user": self.user,
            "command": self.command, "tty": self.tty, "detach": self.detach, "kind": self.kind,
            "state": self.state, "attached": self.attached, "started": self.started,
            "ended": self.ended, "exit_status": self.exit_status,
            "exit_signal": self.exit_signal, "buffered": self.out.size,
        }


class SessionProtocol(ProcessProtocol):
    """A session's process: pipes (no PTY), bubblewrap's info fd, the exit."""

    def __init__(self, manager: SessionManager, session: Session) -> None:
        self.manager = manager
        self.session = session
        self.info = b""

    def connectionMade(self) -> None:
        s = self.session
        if s.detach:
            transport: Any = self.transport
            transport.closeStdin()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        s = self.session
        launch = s.launch
        if launch is not None and childFD == launch.info_fd:
            self.info += data
            self._parse_info()
            return
        self.manager._output(s, childFD, data)

    def _parse_info(self) -> None:
        launch = self.session.launch
        if launch is None or launch.group is not None:
            return
        pid = sandboxed_pid(self.info)
        if pid is not None:
            launch.group = pid

    def childConnectionLost(self, childFD: int) -> None:
        launch = self.session.launch
        if launch is not None and childFD == launch.info_fd:
            self._parse_info()

    def processEnded(self, reason: Failure) -> None:
        self.manager._process_ended(self.session, *exit_status(reason))


class SessionManager(Service):
    """Every session of one runner; ``handle(env)`` answers the ``run.*`` requests."""

    log = Logger()
    name = "run-sessions"

    def __init__(self, reactor: INodeReactor, launcher: ILauncher, sink: ILogSink,
                 settings: RunSettings, runner_settings: Settings, *, node_id: str = "",
                 store_service: StoreService | None = None,
                 observers: Sequence[Callable[[], defer.Deferred[None] | None]] = ()) -> None:
        self.reactor = reactor
        self.launcher = launcher
        self.sink = sink
        self.settings = settings
        self.runner_settings = runner_settings
        self.node_id = node_id
        self.store_service = store_service
        self.sessions: dict[str, Session] = {}
        self.stopping = False  # set by stopService: no more sessions start
        # called when the live sessions change; a Deferred returned is awaited before a
        # session's process starts (the network fence: its add-on ports are open first)
        self.observers = observers

    # -- service -----------------------------------------------------------------

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]  # Twisted leaves it untyped
        self.stopping = True
        waits = []
        for s in list(self.sessions.values()):
            if s.live:
                d: defer.Deferred[None] = defer.Deferred()
                s.waiters.append(d)
                waits.append(d)
                self.stop(s, "the runner is stopping", grace=min(self.settings.kill_grace, 3.0))
        for s in self.sessions.values():
            self._cancel_all(s)
        return defer.DeferredList(waits).addCallback(lambda _: None)

    # -- bus ---------------------------------------------------------------------

    async def handle(self, env: Any) -> tuple[str, dict[str, Any]]:
        """Answer one ``run.*`` request (raises epio.bus.RemoteError on refusal)."""
        from epio.bus import RemoteError

        body = env.body
        t = env.type
        try:
            if t == "run.start":
                return "run.started", await self.start(body)
            if t == "run.poll":
                return "run.output", await self.poll(body)
            if t == "run.input":
                return "run.ack", await self.input(body)
            if t == "run.attach":
                return "run.attached", self.attach(body)
            if t == "run.detach":
                return "run.ack", self.detach_client(body)
            if t == "run.kill":
                s = self._get(body["session_id"])
                sig = _signal_number(body["signal"]) if body.get("signal") else None
                if sig is None or sig in (signals.SIGTERM, signals.SIGKILL):
                    self.stop(s, body.get("reason") or "stopped on request",
                              force=sig == signals.SIGKILL)
                else:
                    self._signal(s, sig)
                return "run.ack", {"session_id": s.id, "state": s.state}
            if t == "run.wait":
                return "run.exited", await self.wait(body)
            if t == "run.list":
                app = body.get("app")
                return "run.sessions", {"sessions": [
                    s.summary() for s in self.sessions.values() if app in (None, s.app)]}
        except SessionError as e:
            raise RemoteError(e.code, e.message) from None
        except SpecError as e:
            raise RemoteError("bad_request", str(e)) from None
        raise RemoteError("bad_request", f"the runner does not handle {t}")

    # -- start ---------------------------------------------------------------------

    def _get(self, session_id: Any) -> Session:
        s = self.sessions.get(session_id) if isinstance(session_id, str) else None
        if s is None:
            raise SessionError("unknown_session", f"no session {session_id!r} on this runner "
                               "(it ended, or the runner restarted)")
        return s

    async def start(self, body: Mapping[str, Any]) -> dict[str, Any]:
        sid = body["session_id"]
        if not SESSION_ID.match(sid):
            raise SessionError("bad_request", f"invalid session_id {sid!r}")
        if self.stopping:
            # a session started now could outlive the runner's fence
            raise SessionError("unavailable", "the runner is stopping: it starts no more "
                               "sessions")
        if sid in self.sessions:
            s = self.sessions[sid]
            return {"session_id": sid, "state": s.state, "node": self.node_id}
        argv = body["command"]
        if not argv or not all(isinstance(a, str) for a in argv):
            raise SessionError("bad_request", "command must be a non-empty list of strings")
        text = command_text(list(argv))
        if not text.strip() or len(text) > MAX_COMMAND or "\0" in text:
            raise SessionError("bad_request", "the command is empty, has NUL or is too long")
        app = body["app"]
        live = sum(1 for s in self.sessions.values() if s.app == app and s.live)
        if live >= self.settings.max_sessions_per_app:
            raise SessionError("session_limit", f"{app} already runs {live} sessions here "
                               f"(run.max_sessions_per_app = "
                               f"{self.settings.max_sessions_per_app})")
        tty = bool(body["tty"]) and not body["detach"]
        rows, cols = int(body.get("rows", 24)), int(body.get("cols", 80))
        if not (0 < rows < 10000 and 0 < cols < 10000):
            raise SessionError("bad_request", "rows and cols must be between 1 and 9999")
        number = int(body["number"])
        command: str | tuple[str, ...] = text
        if tty:
            command = ("/bin/sh", "-c", CTTY_SHIM, CTTY_HELPER, "/bin/bash", "-c", text)
        spec = InstanceSpec.from_message({
            "instance_id": f"run-{sid}", "app": app, "uid": body["uid"],
            "release": body.get("release", 0), "process_type": "run", "index": max(1, number),
            "command": list(command) if isinstance(command, tuple) else command,
            "image_digest": body["image_digest"], "env": body.get("env") or {},
            "limits": body.get("limits") or {}, "addon_ports": body.get("addon_ports") or [],
        }, self.runner_settings, max(1, number))
        kind = str(body.get("kind") or ("detached" if body["detach"] else "interactive"))
        source = str(body.get("source") or f"run.{number}")
        now = self.reactor.seconds()
        s = Session(id=sid, app=app, number=number, user=str(body.get("user") or "?"),
                    command=text, tty=tty, detach=bool(body["detach"]), kind=kind,
                    source=source, started=now, out=OutputWindow(self.settings.window),
                    rows=rows, cols=cols, client=body.get("client"),
                    attached=bool(body.get("client")) and not body["detach"],
                    last_contact=now, uid=spec.uid, addon_ports=spec.addon_ports)
        self.sessions[sid] = s
        self._call(s, "lifetime", self.settings.max_lifetime, self.stop, s,
                   f"the session ran longer than run.max_lifetime "
                   f"({self.settings.max_lifetime:g}s)")
        if s.attached:
            self._renew(s)
        elif not s.detach:
            self._detached(s)
        try:
            await self._changed()
            await self._spawn(s, spec, str(body.get("term") or "xterm"))
        except Exception as e:
            why = f"cannot start: {e}"
            self.log.error("session {id} of {app}: {why}", id=sid, app=app, why=why)
            self._ended(s, None, None, why, failed=True)
            raise SessionError("start_failed", why) from None
        self._say(s, f"{s.source} started by {s.user} on {self.node_id}: {log_text(s.command)}"
                  + (" (detached)" if s.detach else ""))
        return {"session_id": sid, "state": s.state, "node": self.node_id}

    async def _spawn(self, s: Session, spec: InstanceSpec, term: str) -> None:
        launch = await self.launcher.prepare(spec, None)
        if s.stopping:
            await self.launcher.cleanup(launch)
            raise SessionError("stopped", "stopped before it started")
        env = dict(launch.env)
        env["EPIO_RUN"] = str(s.number)
        master = slave = -1
        child_fds: dict[int, Any]
        if s.tty:
            env["TERM"] = term if re.match(r"^[A-Za-z0-9._+-]{1,64}$", term) else "xterm"
            master, slave = os.openpty()
            set_window_size(slave, s.rows, s.cols)
            child_fds = {0: slave, 1: slave, 2: slave}
        else:
            child_fds = {0: "w", 1: "r", 2: "r"}
        if launch.info_fd is not None:
            child_fds[launch.info_fd] = "r"
        s.launch = launch
        proto = SessionProtocol(self, s)
        try:
            s.transport = self.reactor.spawnProcess(proto, launch.argv[0], launch.argv,
                                                    env=env, path=launch.cwd,
                                                    childFDs=child_fds)
        except Exception:
            s.launch = None
            if master >= 0:
                os.close(master)
                os.close(slave)
            await self.launcher.cleanup(launch)
            raise
        self.launcher.spawned(launch, s.transport.pid)
        if s.tty:
            os.close(slave)
            s.pty = PtyMaster(master, self.reactor, lambda data: self._output(s, 1, data),
                              lambda: self._output_ended(s))
            s.pty.registerProducer(s.gate, True)
            s.pty.startReading()  # type: ignore[no-untyped-call]  # Twisted leaves it untyped
        else:
            if not s.detach:
                s.transport.registerProducer(s.gate, True)
            s.output_done = True  # pipes: processEnded comes after every pipe closed
        self._move(s, SessionState.RUNNING)

    # -- output ----------------------------------------------------------------------

    def _output(self, s: Session, fd: int, data: bytes) -> None:
        if s.detach:
            self._lines(s, fd, data)
            return
        if s.discard:
            return
        s.out.append(fd, data)
        if s.out.full and not s.paused:
            s.paused = True
            self._pause(s)
        self._wake(s)

    def _pause(self, s: Session) -> None:
        if s.pty is not None:
            s.pty.pauseProducing()  # type: ignore[no-untyped-call]  # Twisted leaves it untyped
        elif s.transport is not None:
            s.transport.pauseProducing()

    def _resume(self, s: Session) -> None:
        if s.pty is not None:
            s.pty.resumeProducing()  # type: ignore[no-untyped-call]  # Twisted leaves it untyped
        elif s.transport is not None:
            s.transport.resumeProducing()

    def _lines(self, s: Session, fd: int, data: bytes, final: bool = False) -> None:
        buf = s.line_buffers.get(fd, b"") + data
        max_line = 16384
        while True:
            nl = buf.find(b"\n")
            if nl < 0:
                if len(buf) < max_line and not (final and buf):
                    break
                line, buf = buf[:max_line], buf[max_line:]
            else:
                line, buf = buf[:nl], buf[nl + 1:]
            text = line.rstrip(b"\r").decode("utf-8", "replace")
            s.tail.append(text)
            self.sink.emit(s.app, s.source, text, self.reactor.seconds())
            if not buf and final:
                break
        s.line_buffers[fd] = buf

    def _output_ended(self, s: Session) -> None:
        s.output_done = True
        s.pty = None
        self._cancel(s, "eof")
        self._maybe_exited(s)

    def _wake(self, s: Session) -> None:
        d, s.poller = s.poller, None
        if d is not None and not d.called:
            d.callback(None)

    # -- exit ------------------------------------------------------------------------

    def _process_ended(self, s: Session, code: int | None, sig: int | None) -> None:
        launch, s.launch = s.launch, None
        s.transport = None
        s.process_done = True
        if launch is not None:
            self.launcher.kill_all(launch)  # leftovers of the group: nothing outlives it
            d = self.launcher.cleanup(launch)
            d.addErrback(lambda f: self.log.failure("cleanup of session {id} failed", f,
                                                    id=s.id))
        s.exit_status = code
        s.exit_signal = _signal_name(sig)
        if s.detach:
            for fd in list(s.line_buffers):
                self._lines(s, fd, b"", final=True)
        if not s.output_done:
            # the PTY gives its last bytes, then EIO; do not wait forever for it
            self._call(s, "eof", EXIT_EOF_WAIT, self._force_eof, s)
        self._maybe_exited(s)

    def _force_eof(self, s: Session) -> None:
        if s.paused and s.attached:
            # the client still reads: the PTY's last bytes come once the window opens
            self._call(s, "eof", EXIT_EOF_WAIT, self._force_eof, s)
            return
        if s.pty is not None:
            s.pty.connectionLost(Failure(main.CONNECTION_DONE))
        else:
            self._output_ended(s)

    @staticmethod
    def _move(s: Session, new: SessionState) -> None:
        if new not in SESSION_TRANSITIONS[s.state]:
            raise InvalidTransition(f"session {s.id}: {s.state.value} -> {new.value}")
        s.state = new

    def _maybe_exited(self, s: Session) -> None:
        if not (s.process_done and s.output_done) or s.state is SessionState.EXITED:
            return
        self._ended(s, s.exit_status, s.exit_signal, s.reason)

    def _ended(self, s: Session, code: int | None, sig: str | None, reason: str | None,
               failed: bool = False) -> None:
        self._move(s, SessionState.EXITED)
        s.ended = self.reactor.seconds()
        s.exit_status, s.exit_signal = code, sig
        for name in ("lifetime", "idle", "lease", "kill", "eof"):
            self._cancel(s, name)
        how = (f"failed: {reason}" if failed else
               f"killed by {sig}" if sig else f"exited with status {code}")
        if reason and not failed:
            how += f" ({reason})"
        self._say(s, f"{s.source} ({log_text(s.command)}) of {s.user} {how} after "
                     f"{s.ended - s.started:.1f}s")
        self.log.info("session {id} ({app} {source}) {how}", id=s.id, app=s.app,
                      source=s.source, how=how)
        self._audit(s, "failed" if failed else "exited", reason)
        self._wake(s)
        waiters, s.waiters = s.waiters, []
        for w in waiters:
            w.callback(None)
        self._call(s, "forget", FORGET_AFTER, self._forget, s)
        defer.Deferred.fromCoroutine(self._changed()).addErrback(self._observer_failed)

    def _observer_failed(self, f: Failure) -> None:
        # the fence is not in place: it reports that itself
        if f.check(FenceError):
            self.log.warn("after a session ended: {error}", error=f.getErrorMessage())
        else:
            self.log.failure("a session observer failed", f)

    async def _changed(self) -> None:
        """Tell the observers the live sessions changed; wait for what they return."""
        waits = [d for d in (o() for o in list(self.observers)) if d is not None]
        if waits:
            try:
                await defer.gatherResults(waits, consumeErrors=True)
            except defer.FirstError as e:  # an observer refused (the fence is not in place)
                e.subFailure.raiseException()

    def reach(self) -> list[tuple[int, int]]:
        """(uid, port) of the add-on ports of live sessions (for the network fence)."""
        return [(s.uid, p) for s in self.sessions.values() if s.live for p in s.addon_ports]

    def uids(self) -> set[int]:
        """The UIDs of live sessions (for the network fence: fenced while they live)."""
        return {s.uid for s in self.sessions.values() if s.live}

    def _forget(self, s: Session) -> None:
        if self.sessions.get(s.id) is s and s.state is SessionState.EXITED:
            self._cancel_all(s)
            del self.sessions[s.id]

    def _audit(self, s: Session, state: str, reason: str | None) -> None:
        store_service = self.store_service
        if store_service is None:
            return

        async def write() -> None:
            from epio.store.runs import update_run

            store = await store_service.whenReady()
            await update_run(store, s.id, state=state, ended=s.ended,
                             exit_status=s.exit_status, exit_signal=s.exit_signal,
                             reason=reason)

        d = defer.Deferred.fromCoroutine(write())
        d.addErrback(lambda f: self.log.warn("cannot record the end of session {id}: {error}",
                                             id=s.id, error=f.getErrorMessage()))

    # -- stopping ------------------------------------------------------------------

    def stop(self, s: Session, reason: str, grace: float | None = None,
             force: bool = False) -> None:
        """SIGTERM the session's processes, SIGKILL after ``grace``."""
        if not s.live:
            return
        if s.reason is None:
            s.reason = reason
        s.stopping = True
        if s.launch is None:
            return  # still preparing: _spawn sees ``stopping``
        grace = self.settings.kill_grace if grace is None else grace
        if force or grace <= 0:
            self._kill(s)
            return
        self._say(s, f"{s.source}: {reason}: SIGTERM, SIGKILL in {grace:g}s")
        self.launcher.signal(s.launch, signals.SIGTERM)
        # in a PTY the command leads its own session (its controlling terminal is
        # ours), not bubblewrap's process group: signal it there, plus a hang-up as a
        # closing terminal would give (it unblocks a command reading the PTY)
        for sig in (signals.SIGTERM, signals.SIGHUP, signals.SIGCONT):
            self._signal_terminal(s, sig)
        self._call(s, "kill", grace, self._kill, s)

    def _terminal_groups(self, s: Session) -> set[int]:
        """The PTY's session group and foreground group (host pids), if any."""
        groups: set[int] = set()
        if s.pty is None or s.pty.fd < 0:
            return groups
        try:
            groups.add(os.tcgetpgrp(s.pty.fd))
        except OSError:
            pass
        try:
            raw = fcntl.ioctl(s.pty.fd, TIOCGSID, struct.pack("i", 0))
            groups.add(struct.unpack("i", raw)[0])
        except OSError:
            pass
        return {g for g in groups if g > 1}

    def _signal_terminal(self, s: Session, sig: int) -> None:
        for group in self._terminal_groups(s):
            try:
                os.killpg(group, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def _kill(self, s: Session) -> None:
        if s.launch is not None:
            self._signal_terminal(s, signals.SIGKILL)
            self.launcher.signal(s.launch, signals.SIGKILL)
            self.launcher.kill_all(s.launch)

    def _signal(self, s: Session, sig: int) -> None:
        if s.pty is not None:
            self._signal_terminal(s, sig)  # the command's own session (see stop)
        elif s.launch is not None:
            self.launcher.signal(s.launch, sig)

    # -- attachment ------------------------------------------------------------------

    def _check_client(self, s: Session, client: str) -> None:
        if s.client != client:
            raise SessionError("taken_over", "another client attached to this session")

    def _renew(self, s: Session) -> None:
        s.last_contact = self.reactor.seconds()
        if not s.attached:
            s.attached = True
            self._cancel(s, "idle")
        self._call(s, "lease", self.settings.lease, self._lease_expired, s)

    def _lease_expired(self, s: Session) -> None:
        s.calls.pop("lease", None)
        if s.attached and s.live:
            self.log.info("session {id}: no word from the attached client for {lease:g}s: "
                          "detached", id=s.id, lease=self.settings.lease)
            self._detached(s)

    def _detached(self, s: Session) -> None:
        s.attached = False
        self._cancel(s, "lease")
        self._wake(s)
        if not s.live or s.detach:
            return
        if not s.tty:
            # nobody can reattach to pipes: drop the output so the process can end
            s.discard = True
            s.out.ack(s.out.end)
            if s.paused:
                s.paused = False
                self._resume(s)
            self.stop(s, "its client went away")
            return
        self._call(s, "idle", self.settings.detached_idle_timeout, self.stop, s,
                   f"no client attached for run.detached_idle_timeout "
                   f"({self.settings.detached_idle_timeout:g}s)")

    def attach(self, body: Mapping[str, Any]) -> dict[str, Any]:
        s = self._get(body["session_id"])
        if s.detach:
            raise SessionError("not_attachable", f"{s.source} runs detached: its output is "
                               "in the app's log")
        if not s.tty and s.client is not None and s.client != body["client"]:
            raise SessionError("not_attachable", "a session without a terminal cannot be "
                               "reattached")
        old = s.client
        s.client = body["client"]
        if old is not None and old != s.client:
            self._wake(s)  # the old client's poll learns it was taken over
        self._renew(s)
        rows, cols = body.get("rows"), body.get("cols")
        if rows and cols:
            self._resize(s, int(rows), int(cols))
        return {"session_id": s.id, "offset": s.out.start, "seq": s.next_seq, "tty": s.tty,
                "state": s.state, "number": s.number, "command": s.command}

    def detach_client(self, body: Mapping[str, Any]) -> dict[str, Any]:
        s = self._get(body["session_id"])
        if s.client == body["client"] and s.attached:
            self._detached(s)
        return {"session_id": s.id, "state": s.state}

    # -- poll and input ----------------------------------------------------------------

    async def poll(self, body: Mapping[str, Any]) -> dict[str, Any]:
        s = self._get(body["session_id"])
        client = body["client"]
        self._check_client(s, client)
        self._renew(s)
        s.out.ack(int(body["ack"]))
        if s.paused and not s.out.full:
            s.paused = False
            self._resume(s)
        limit = max(0, min(int(body.get("max", self.settings.chunk)), self.settings.chunk))
        wait = max(0.0, min(float(body.get("wait", 0.0)), self.settings.poll_wait))
        ack = max(s.out.start, min(int(body["ack"]), s.out.end))
        if limit > 0 and wait > 0 and ack >= s.out.end and s.live:
            d: defer.Deferred[None] = defer.Deferred()
            self._wake(s)  # at most one waiting poll per session
            s.poller = d
            timer = self.reactor.callLater(wait, self._wake, s)
            try:
                await d
            finally:
                if timer.active():
                    timer.cancel()
            self._check_client(s, client)
            if s.attached:
                self._renew(s)
        offset, chunks = s.out.read(ack, limit)
        sent = offset + sum(len(c[1]) for c in chunks)
        exited = not s.live and sent >= s.out.end
        reply: dict[str, Any] = {"session_id": s.id, "offset": offset, "chunks": chunks,
                                 "exited": exited}
        if exited:
            reply.update(status=s.exit_status, signal=s.exit_signal)
            if s.reason:
                reply["reason"] = s.reason
            if s.exit_sent and ack >= s.out.end:
                self._call(s, "forget", 0, self._forget, s)  # the client has it all
            s.exit_sent = True
        return reply

    async def input(self, body: Mapping[str, Any]) -> dict[str, Any]:
        s = self._get(body["session_id"])
        self._check_client(s, body["client"])
        self._renew(s)
        seq = int(body["seq"])
        if seq < s.next_seq:
            return {"session_id": s.id, "seq": seq, "state": s.state}  # a retry: done already
        if seq > s.next_seq:
            raise SessionError("out_of_order", f"input {seq} came before {s.next_seq}")
        s.next_seq += 1
        if s.live:
            data = body.get("data")
            if data:
                if s.pty is not None:
                    s.pty.write(data)
                elif s.transport is not None:
                    s.transport.writeToChild(0, data)
            if body.get("rows") and body.get("cols"):
                self._resize(s, int(body["rows"]), int(body["cols"]))
            if body.get("signal"):
                self._signal(s, _signal_number(str(body["signal"])))
            if body.get("eof"):
                if s.pty is not None:
                    s.pty.write(b"\x04")  # ^D: end of input for a program reading the PTY
                elif s.transport is not None:
                    s.transport.closeStdin()
            await s.gate.wait()
        return {"session_id": s.id, "seq": seq, "state": s.state}

    def _resize(self, s: Session, rows: int, cols: int) -> None:
        if not (0 < rows < 10000 and 0 < cols < 10000):
            raise SessionError("bad_request", "rows and cols must be between 1 and 9999")
        s.rows, s.cols = rows, cols
        if s.pty is not None and s.pty.fd >= 0:
            try:
                set_window_size(s.pty.fd, rows, cols)
            except OSError as e:
                self.log.warn("session {id}: resize failed: {error}", id=s.id,
                              error=e.strerror)

    async def wait(self, body: Mapping[str, Any]) -> dict[str, Any]:
        s = self._get(body["session_id"])
        timeout = float(body.get("timeout") or 0)
        if s.live and timeout > 0:
            d: defer.Deferred[None] = defer.Deferred()
            s.waiters.append(d)
            def expire() -> None:
                if not d.called:
                    d.callback(None)

            timer = self.reactor.callLater(timeout, expire)
            await d
            if timer.active():
                timer.cancel()
        reply: dict[str, Any] = {"session_id": s.id, "state": s.state}
        if not s.live:
            reply.update(status=s.exit_status, signal=s.exit_signal, tail=list(s.tail))
            if s.reason:
                reply["reason"] = s.reason
        return reply

    # -- helpers ---------------------------------------------------------------------

    def _say(self, s: Session, text: str) -> None:
        try:
            self.sink.emit(s.app, "platform", text, self.reactor.seconds())
        except Exception:
            self.log.failure("log sink failed")

    def _call(self, s: Session, name: str, delay: float, f: Callable[..., Any],
              *args: Any) -> None:
        self._cancel(s, name)

        def run() -> None:
            s.calls.pop(name, None)
            f(*args)

        s.calls[name] = self.reactor.callLater(delay, run)

    def _cancel(self, s: Session, name: str) -> None:
        call = s.calls.pop(name, None)
        if call is not None and call.active():
            call.cancel()

    def _cancel_all(self, s: Session) -> None:
        for name in list(s.calls):
            self._cancel(s, name)
