"""Fakes for the run-session tests: a launcher that runs commands without a sandbox.

:class:`PlainLauncher` implements :class:`~epio.runner.supervisor.ILauncher` the way
the real :class:`~epio.runner.launcher.SandboxLauncher` does with isolation off (a
new session via ``setsid``, the runner's own user), so the session manager's PTY,
pipes, signals and teardown run against real processes in unit tests.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile

from twisted.internet import defer
from zope.interface import implementer

from epio.runner.launcher import signal_group
from epio.runner.supervisor import ILauncher, InstanceSpec, Launch


@implementer(ILauncher)
class PlainLauncher:
    """Runs ``spec.command`` with ``setsid`` in a temp dir, as this user."""

    isolation = None

    def __init__(self) -> None:
        self.prepared: list[InstanceSpec] = []
        self.cleaned: list[Launch] = []
        self.signals: list[int] = []
        self.fail: Exception | None = None

    def prepare(self, spec: InstanceSpec, port: int | None) -> defer.Deferred[Launch]:
        if self.fail is not None:
            return defer.fail(self.fail)
        self.prepared.append(spec)
        scratch = tempfile.mkdtemp(prefix="epio-run-test-")
        cmd = list(spec.command) if isinstance(spec.command, tuple) else [
            "/bin/bash", "-c", spec.command]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": scratch,
               "VIRTUAL_ENV": os.path.dirname(os.path.dirname(sys.executable)),
               "LANG": "C.UTF-8", **spec.env}
        argv = [shutil.which("setsid") or "/usr/bin/setsid", *cmd]
        return defer.succeed(Launch(argv=argv, env=env, cwd=scratch,
                                    child_fds={0: "w", 1: "r", 2: "r"}, scratch=scratch))

    def spawned(self, launch: Launch, pid: int) -> None:
        launch.pid = pid
        launch.group = pid

    def signal(self, launch: Launch, sig: int) -> None:
        self.signals.append(sig)
        if not signal_group(launch.group, sig) and launch.pid:
            try:
                os.kill(launch.pid, sig)
            except ProcessLookupError:
                pass

    def kill_all(self, launch: Launch) -> None:
        signal_group(launch.group, signal.SIGKILL)

    def oom_kills(self, launch: Launch) -> int:
        return 0

    def listening_ports(self, launch: Launch, host: str | None = None) -> list[int]:
        from epio.runner.ports import listening_ports, process_tree

        return listening_ports(process_tree([launch.pid]), host=host) if launch.pid else []

    def cleanup(self, launch: Launch) -> defer.Deferred[None]:
        self.cleaned.append(launch)
        if launch.scratch:
            shutil.rmtree(launch.scratch, ignore_errors=True)
        return defer.succeed(None)
