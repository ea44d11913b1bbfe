"""Counters of what the bus did and dropped, readable for status and metrics.

Nothing is lost silently (DESIGN): every rejected message, every send dropped
at the high-water mark, every late reply shows up here and in the log.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from epio.bus.errors import Reason

# Counter names other than the rejection reasons (which are counted as
# "rejected.<reason>").
SENT = "sent"
RECEIVED = "received"
DROPPED_HWM = "dropped.hwm"  # a send found the queue full (zmq.Again)
DROPPED_NOT_RUNNING = "dropped.not_running"  # publish/send on a stopped service
LATE_REPLIES = "late_replies"  # a reply came after its request timed out
TIMEOUTS = "timeouts"  # requests that expired
HANDLER_ERRORS = "handler_errors"  # a handler raised (a bug: logged as failure)
ERROR_REPLIES = "error_replies"  # bus.error replies sent by a router


class BusCounters:
    """Named monotonically increasing counts.

    A service's counters have the bus's counters as parent: every increment
    is added to both, so ``bus.counters`` is the node-wide total and
    ``service.counters`` that one socket's share.
    """

    def __init__(self, parent: BusCounters | None = None) -> None:
        self._counts: Counter[str] = Counter()
        self._parent = parent

    def incr(self, name: str, n: int = 1) -> None:
        self._counts[name] += n
        if self._parent is not None:
            self._parent.incr(name, n)

    def rejected(self, reason: Reason) -> None:
        self.incr("rejected." + reason.value)

    def __getitem__(self, name: str) -> int:
        return self._counts[name]

    def get_rejected(self, reason: Reason | str) -> int:
        return self._counts["rejected." + Reason(reason).value]

    @property
    def rejected_total(self) -> int:
        return sum(v for k, v in self._counts.items() if k.startswith("rejected."))

    def snapshot(self) -> dict[str, int]:
        """A copy of every non-zero count, e.g. ``{"sent": 3, "rejected.stale": 1}``."""
        return dict(self._counts)


class RateLimitedLog:
    """Logs one line per key per ``interval`` seconds and says how many were hidden."""

    log = Logger()

    def __init__(self, clock: IReactorTime, interval: float = 10.0) -> None:
        self._clock = clock
        self._interval = interval
        self._next: dict[str, float] = {}
        self._hidden: Counter[str] = Counter()

    def warn(self, key: str, fmt: str, **kw: Any) -> None:
        now = self._clock.seconds()
        if now < self._next.get(key, 0.0):
            self._hidden[key] += 1
            return
        self._next[key] = now + self._interval
        hidden = self._hidden.pop(key, 0)
        if hidden:
            self.log.warn(fmt + " ({hidden} similar not logged)", hidden=hidden, **kw)
        else:
            self.log.warn(fmt, hidden=0, **kw)
