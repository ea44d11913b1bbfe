"""Running one build step: a child process under the build's limits.

Every step is started through ``reactor.spawnProcess`` (never a blocking call on
the reactor thread) as::

    setsid /bin/sh -c 'echo $$ > CGROUP/cgroup.procs; exec "$@"' sh \
        setpriv --reuid U --regid G --clear-groups -- prlimit --as=N --fsize=M -- CMD...

so that the step leads its own process group (a timeout kills the whole group),
enters the build's memory cgroup before its first instruction (every child it
forks is inside), drops to the build user, and carries rlimits (address space
only when no memory cgroup is available; file size always).  Output is split
into lines and handed to a callback as it arrives.
"""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attrs import frozen
from twisted.internet import defer, error, protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from epio.node import INodeReactor

_SHIM = 'if [ -n "$0" ]; then echo $$ > "$0/cgroup.procs" || exit 125; fi; exec "$@"'
MAX_LINE = 8192
_log = Logger()


@frozen
class StepResult:
    """How a step ended: exit code or signal, and whether we killed it for time."""

    exit_code: int | None
    signal: int | None
    timed_out: bool

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out


class MemoryCgroup:
    """A cgroup v1 memory group for one build, nested under our own memory cgroup."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(
        cls,
        name: str,
        limit_bytes: int,
        root: Path = Path("/sys/fs/cgroup/memory"),
        proc_self_cgroup: Path = Path("/proc/self/cgroup"),
    ) -> MemoryCgroup | None:
        """Create the group with its limit, or return None when cgroups are unusable."""
        own = "/"
        try:
            for line in proc_self_cgroup.read_text().splitlines():
                parts = line.split(":", 2)
                if len(parts) == 3 and "memory" in parts[1].split(","):
                    own = parts[2]
        except OSError:
            return None
        if not (root / "memory.limit_in_bytes").exists():
            return None
        path = root / own.lstrip("/") / "epio-build" / name
        try:
            path.mkdir(parents=True, exist_ok=True)
            (path / "memory.limit_in_bytes").write_text(str(limit_bytes))
            sw = path / "memory.memsw.limit_in_bytes"
            if sw.exists():
                try:
                    sw.write_text(str(limit_bytes))
                except OSError:
                    pass
        except OSError:
            try:
                path.rmdir()
            except OSError:
                pass
            return None
        return cls(path)

    def _read_int(self, name: str) -> int:
        try:
            return int((self.path / name).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return 0

    def oom_kills(self) -> int:
        """How many processes the kernel OOM-killed in this group so far."""
        try:
            for line in (self.path / "memory.oom_control").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def hit_limit(self) -> bool:
        """Whether the group's usage ever reached its limit (reclaim may have coped)."""
        return self._read_int("memory.failcnt") > 0

    def kill_all(self) -> None:
        try:
            pids = (self.path / "cgroup.procs").read_text().split()
        except OSError:
            return
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass

    async def remove(self, reactor: IReactorTime) -> None:
        """Kill what is left in the group and remove it (retrying while the kernel reaps)."""
        from twisted.internet.task import deferLater

        for _ in range(100):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError as e:
                if e.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                    return
                self.kill_all()
                await deferLater(reactor, 0.02, lambda: None)


class _StepProtocol(protocol.ProcessProtocol):
    def __init__(self, on_line: Callable[[str], None], done: defer.Deferred[Any]) -> None:
        self.on_line = on_line
        self.done = done
        self.buffers: dict[int, bytes] = {1: b"", 2: b""}

    def childDataReceived(self, fd: int, data: bytes) -> None:
        buf = self.buffers.get(fd, b"") + data
        *lines, rest = buf.split(b"\n")
        for line in lines:
            self._line(line)
        while len(rest) > MAX_LINE:
            self._line(rest[:MAX_LINE])
            rest = rest[MAX_LINE:]
        self.buffers[fd] = rest

    def _line(self, raw: bytes) -> None:
        text = raw.rstrip(b"\r").decode("utf-8", "replace")
        if "\r" in text:  # progress output: keep the last state
            text = text.rsplit("\r", 1)[-1]
        self.on_line(text)

    def processEnded(self, reason: Failure) -> None:
        for fd in (1, 2):
            if self.buffers[fd]:
                self._line(self.buffers[fd])
                self.buffers[fd] = b""
        self.done.callback(reason.value)


async def run_step(
    reactor: INodeReactor,
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: str | Path,
    on_line: Callable[[str], None],
    timeout: float,
    uid: int | None = None,
    gid: int | None = None,
    cgroup: MemoryCgroup | None = None,
    rlimit_as: int | None = None,
    rlimit_fsize: int | None = None,
    rlimit_nproc: int | None = None,
) -> StepResult:
    """Run ``argv`` under the limits; kill its whole process group after ``timeout``."""
    inner: list[str] = []
    if uid is not None and gid is not None:
        inner += ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--"]
    limits = []
    if rlimit_as is not None:
        limits.append(f"--as={rlimit_as}")
    if rlimit_fsize is not None:
        limits.append(f"--fsize={rlimit_fsize}")
    if rlimit_nproc is not None:
        limits.append(f"--nproc={rlimit_nproc}")
    if limits:
        inner += ["prlimit", *limits, "--"]
    inner += list(argv)
    full = ["setsid", "/bin/sh", "-c", _SHIM, str(cgroup.path) if cgroup else "", *inner]
    done: defer.Deferred[Any] = defer.Deferred()
    proto = _StepProtocol(on_line, done)
    transport = reactor.spawnProcess(
        proto,
        "/usr/bin/setsid" if os.path.exists("/usr/bin/setsid") else "setsid",
        full,
        env=dict(env),
        path=str(cwd),
    )
    # None when the step exited so fast that spawnProcess reaped it already
    # (Twisted reaps at registration); its cgroup is still swept below.
    pid: int | None = transport.pid
    timed_out = False

    def kill_step() -> None:
        """SIGKILL the step's process group and everything left in its cgroup."""
        if pid is not None:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if cgroup is not None:
            cgroup.kill_all()

    def expire() -> None:
        nonlocal timed_out
        timed_out = True
        _log.info("build step {argv} timed out; killing its process group", argv=argv[0])
        kill_step()

    timer = reactor.callLater(max(timeout, 0.001), expire)
    reason = await done
    if timer.active():
        timer.cancel()
    kill_step()  # nothing of the step survives it: stray children of the group go too
    if isinstance(reason, error.ProcessDone):
        return StepResult(0, None, timed_out)
    if isinstance(reason, error.ProcessTerminated):
        return StepResult(reason.exitCode, reason.signal, timed_out)
    return StepResult(None, None, timed_out)
