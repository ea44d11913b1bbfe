"""Fakes for the runner's unit tests: a process reactor on a Clock, a launcher, a probe.

Each implements the real interface (checked with ``verifyObject`` in the tests).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, error, task
from twisted.internet.interfaces import IProcessTransport, IReactorProcess
from twisted.python.failure import Failure
from zope.interface import implementer

from epio.runner.health import IHealthProbe
from epio.runner.sandbox import Isolation
from epio.runner.supervisor import ILauncher, InstanceSpec, Launch


@implementer(IProcessTransport)
class FakeProcess:
    """A spawned process that ends when the test says so."""

    def __init__(self, reactor: FakeProcessReactor, proto: Any, argv: list[str],
                 env: dict[str, str], pid: int) -> None:
        self.reactor = reactor
        self.proto = proto
        self.argv = argv
        self.env = env
        self.pid: int | None = pid
        self.spawned_at = reactor.seconds()
        self.signals: list[str] = []
        self.stdin_closed = False

    def exit(self, code: int = 0, signal: int | None = None) -> None:
        """End the process: processEnded with ProcessDone or ProcessTerminated."""
        self.pid = None
        if code == 0 and signal is None:
            reason = Failure(error.ProcessDone(0))
        else:
            reason = Failure(error.ProcessTerminated(code if signal is None else None, signal))
        self.proto.processEnded(reason)

    def output(self, data: bytes, fd: int = 1) -> None:
        self.proto.childDataReceived(fd, data)

    # IProcessTransport
    def closeStdin(self) -> None:
        self.stdin_closed = True

    def closeStdout(self) -> None:
        pass

    def closeStderr(self) -> None:
        pass

    def closeChildFD(self, descriptor: int) -> None:
        pass

    def writeToChild(self, childFD: int, data: bytes) -> None:
        pass

    def loseConnection(self) -> None:
        pass

    def signalProcess(self, signalID: str | int) -> None:
        self.signals.append(str(signalID))

    def write(self, data: bytes) -> None:
        pass

    def writeSequence(self, data: Any) -> None:
        pass

    def getPeer(self) -> Any:
        return None

    def getHost(self) -> Any:
        return None


@implementer(IReactorProcess)
class FakeProcessReactor(task.Clock):
    """``task.Clock`` plus ``spawnProcess`` that records FakeProcesses."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[FakeProcess] = []
        self.next_pid = 1000

    def spawnProcess(self, processProtocol: Any, executable: Any, args: Any = (), env: Any = None,
                     path: Any = None, uid: Any = None, gid: Any = None, usePTY: bool = False,
                     childFDs: Any = None) -> FakeProcess:
        self.next_pid += 1
        p = FakeProcess(self, processProtocol, list(args), dict(env or {}), self.next_pid)
        self.spawned.append(p)
        processProtocol.makeConnection(p)
        return p


@implementer(ILauncher)
class FakeLauncher:
    """Records what the supervisor asks; ``oom`` makes the next exit an OOM kill."""

    def __init__(self, isolation: Isolation | None = None) -> None:
        self.isolation = isolation or Isolation("none", False, (), (), True, {})
        self.prepared: list[tuple[str, int | None]] = []
        self.signals: list[tuple[int | None, int]] = []
        self.killed: list[int | None] = []
        self.cleaned = 0
        self.ooms = 0
        self.fail_prepare: Exception | None = None
        self.pending: defer.Deferred[Any] | None = None
        self.hold = False
        # what listening_ports reports; None: the launch's own $PORT (the app listens
        # where it was told, as a well-behaved process does)
        self.listening: list[int] | None = None

    def prepare(self, spec: InstanceSpec, port: int | None) -> defer.Deferred[Launch]:
        self.prepared.append((spec.instance_id, port))
        if self.fail_prepare is not None:
            return defer.fail(self.fail_prepare)
        launch = Launch(argv=["/bin/app", spec.instance_id], env={"PORT": str(port)}, cwd="/",
                        child_fds={0: "w", 1: "r", 2: "r"})
        if self.hold:
            self.pending = defer.Deferred()
            return self.pending.addCallback(lambda _: launch)
        return defer.succeed(launch)

    def spawned(self, launch: Launch, pid: int) -> None:
        launch.pid = launch.group = pid

    def signal(self, launch: Launch, sig: int) -> None:
        self.signals.append((launch.group, sig))

    def kill_all(self, launch: Launch) -> None:
        self.killed.append(launch.group)

    def oom_kills(self, launch: Launch) -> int:
        return self.ooms

    def listening_ports(self, launch: Launch, host: str | None = None) -> list[int]:
        if self.listening is None:
            port = launch.env.get("PORT")
            return [int(port)] if port and port != "None" else []
        return list(self.listening)

    def cleanup(self, launch: Launch) -> defer.Deferred[None]:
        self.cleaned += 1
        return defer.succeed(None)


@implementer(IHealthProbe)
class FakeProbe:
    """Answers health checks from ``healthy`` (a set of ports); records every check."""

    def __init__(self) -> None:
        self.healthy: set[int] = set()
        self.checks: list[tuple[str, int, str | None]] = []

    def check(self, host: str, port: int, path: str | None, timeout: float) -> defer.Deferred[bool]:
        self.checks.append((host, port, path))
        return defer.succeed(port in self.healthy)
