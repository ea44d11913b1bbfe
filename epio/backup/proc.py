"""Child processes of the backup role (pg_dump, pg_restore, redis-cli, redis-check-rdb).

``getProcessOutputAndValue`` has no canceller: a backup step that timed out went on
running and writing.  :func:`run` starts the command through ``setsid`` (as the build
steps of :mod:`epio.runner.build.proc` do), so it leads a process group of its own,
collects its output, and answers a Deferred whose cancellation (a step timeout, a
stopping node) SIGKILLs that whole group.  The Deferred fires with ``(stdout, stderr,
code)``; ``code`` is ``128 + signal`` for a process ended by a signal.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping, Sequence
from typing import Any

from twisted.internet import defer, protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

SETSID = "/usr/bin/setsid" if os.path.exists("/usr/bin/setsid") else "/bin/setsid"
_log = Logger()


def _kill_group(pgid: int | None) -> None:
    if pgid is None:
        return
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class _Collect(protocol.ProcessProtocol):
    def __init__(self, done: defer.Deferred[tuple[bytes, bytes, int]]) -> None:
        self.done = done
        self.out: list[bytes] = []
        self.err: list[bytes] = []
        self.pgid: int | None = None

    def outReceived(self, data: bytes) -> None:
        self.out.append(data)

    def errReceived(self, data: bytes) -> None:
        self.err.append(data)

    def processEnded(self, reason: Failure) -> None:
        _kill_group(self.pgid)  # nothing the command started outlives it
        self.pgid = None
        if self.done.called:  # cancelled: already answered
            return
        value = reason.value
        code = getattr(value, "exitCode", None)
        if code is None:
            code = 128 + int(getattr(value, "signal", None) or 0)
        self.done.callback((b"".join(self.out), b"".join(self.err), int(code)))


def run(reactor: Any, argv: Sequence[str], env: Mapping[str, str],
        path: str | None = None) -> defer.Deferred[tuple[bytes, bytes, int]]:
    """Run ``argv`` in a new session; cancelling the result kills its process group."""
    proto: _Collect

    def cancel(d: defer.Deferred[Any]) -> None:
        _log.info("{command} cancelled (step timeout or stop); killing its process group",
                  command=os.path.basename(argv[0]))
        _kill_group(proto.pgid)

    done: defer.Deferred[tuple[bytes, bytes, int]] = defer.Deferred(cancel)
    proto = _Collect(done)
    # setsid execs in place (the fresh child is no group leader): pid == its pgid
    transport = reactor.spawnProcess(proto, SETSID, [SETSID, *argv], env=dict(env), path=path)
    proto.pgid = transport.pid
    return done
