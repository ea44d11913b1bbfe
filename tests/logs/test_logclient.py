"""epio.logclient.Follower: joining history and live lines by id, filling gaps."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from epio.logclient import BadFilter, Follower, Line, LineFilter, LogsUnavailable


class FakeLogger:
    """The part of LogClient a Follower uses, over an in-memory log; queries
    stay pending until ``answer()`` so tests control interleavings."""

    def __init__(self) -> None:
        self.log: list[Line] = []
        self.pending: list[tuple[Deferred, dict]] = []
        self.detached: list[Follower] = []
        self.fail = False

    def append(self, n: int, source: str = "web.1") -> list[Line]:
        start = len(self.log) + 1
        new = [Line(i, float(i), source, f"line {i}") for i in range(start, start + n)]
        self.log.extend(new)
        return new

    def query(self, app: str, filt: LineFilter, n: int, *, after: int | None = None,
              unfiltered: bool = False) -> Deferred:
        d: Deferred = Deferred()
        self.pending.append((d, {"filt": filt, "n": n, "after": after, "unfiltered": unfiltered}))
        return d

    def answer(self) -> None:
        d, q = self.pending.pop(0)
        if self.fail:
            d.errback(LogsUnavailable("down"))
            return
        ok = q["filt"].matcher() if not q["unfiltered"] else (lambda ln: True)
        lines = [ln for ln in self.log if ok(ln)]
        if q["after"] is not None:
            lines = [ln for ln in lines if ln.id > q["after"]][: q["n"]]
        else:
            lines = lines[-q["n"] :] if q["n"] else []
        d.callback((lines, len(self.log) + 1))

    def _detach(self, f: Follower) -> None:
        self.detached.append(f)


class Sink:
    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def lines(self, lines: list[Line]) -> None:
        self.events.extend(("line", ln.id) for ln in lines)

    def ready(self, next_id: int) -> None:
        self.events.append(("ready", next_id))

    def missed(self, n: int) -> None:
        self.events.append(("missed", n))

    def notice(self, text: str) -> None:
        self.events.append(("notice", text))

    def error(self, code: str, message: str) -> None:
        self.events.append(("error", code))

    def ids(self) -> list[int]:
        return [v for k, v in self.events if k == "line"]


class FollowerTests(SynchronousTestCase):
    def make(self, n: int = 3, filt: LineFilter | None = None, fill_limit: int = 100) -> tuple:
        logger, sink = FakeLogger(), Sink()
        f = Follower(logger, "app", sink, n, filt or LineFilter(), max_pending=1000, fill_limit=fill_limit)  # type: ignore[arg-type]
        return logger, sink, f

    def test_history_then_live_without_overlap(self) -> None:
        """Live lines arriving while history is being read are held, then only the
        ones after history are delivered: no duplicate, no hole."""
        logger, sink, f = self.make(n=3)
        logger.append(10)
        f.start()
        new = logger.append(2)  # published while the history query is in flight
        f.live(new[0].id, new)
        logger.answer()  # history sees lines 1..12 -> last 3 = 10, 11, 12
        self.assertEqual(sink.ids(), [10, 11, 12])
        self.assertIn(("ready", 13), sink.events)
        more = logger.append(2)
        f.live(more[0].id, more)
        self.assertEqual(sink.ids(), [10, 11, 12, 13, 14])

    def test_gap_in_live_is_filled_from_the_store(self) -> None:
        """A batch whose first id skips ahead triggers an after= query; the missing
        lines are delivered before the batch, in order."""
        logger, sink, f = self.make(n=0)
        f.start()
        logger.answer()
        lost = logger.append(5)  # never published to this follower
        batch = logger.append(2)
        f.live(batch[0].id, batch)
        self.assertEqual(sink.ids(), [])
        self.assertEqual(logger.pending[0][1]["after"], lost[0].id - 1)
        logger.answer()
        self.assertEqual(sink.ids(), [1, 2, 3, 4, 5, 6, 7])
        self.assertNotIn("missed", [k for k, _ in sink.events])

    def test_gap_beyond_limit_reported_missed(self) -> None:
        """A gap larger than the fill limit is reported as missed, with its size."""
        logger, sink, f = self.make(n=0, fill_limit=3)
        f.start()
        logger.answer()
        logger.append(10)
        batch = logger.append(1)
        f.live(batch[0].id, batch)
        self.assertEqual(sink.events[-2:], [("missed", 10), ("line", 11)])

    def test_filter_applies_to_live_and_fill(self) -> None:
        """Source and grep filters apply to live lines; lost markers always pass grep."""
        logger, sink, f = self.make(n=0, filt=LineFilter(sources=frozenset({"worker"}), grep="7"))
        f.start()
        logger.answer()
        batch = [Line(1, 1.0, "web.1", "7"), Line(2, 2.0, "worker.1", "17"),
                 Line(3, 3.0, "worker.2", "nope"), Line(4, 4.0, "worker.1", "[epio] lost", 5)]
        f.live(1, batch)
        self.assertEqual(sink.ids(), [2, 4])

    def test_unavailable_is_an_error_and_stops(self) -> None:
        """If no logger answers the history query the sink gets an error and the
        follower detaches."""
        logger, sink, f = self.make()
        logger.fail = True
        f.start()
        logger.answer()
        self.assertEqual(sink.events, [("error", "logs_unavailable")])
        self.assertEqual(logger.detached, [f])

    def test_bad_regex_refused(self) -> None:
        """An invalid or oversized grep is refused when the filter is made."""
        self.assertRaises(BadFilter, LineFilter, grep="(")
        self.assertRaises(BadFilter, LineFilter, grep="a" * 201)
