"""OrderedMultiService: children stop one at a time, in reverse start order."""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from epio.services import OrderedMultiService


class Child(Service):
    """Records its start and stop in a shared list; its stop waits for ``gone``."""

    def __init__(self, name: str, events: list[str], fail: bool = False) -> None:
        self.setName(name)
        self.events = events
        self.fail = fail
        self.gone: defer.Deferred[None] = defer.Deferred()

    def startService(self) -> None:
        super().startService()
        self.events.append(f"start {self.name}")

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        self.events.append(f"stop {self.name}")
        if self.fail:
            raise RuntimeError("boom")
        return self.gone


class OrderedStopTests(SynchronousTestCase):
    def test_reverse_order_each_after_the_previous(self) -> None:
        """Children start in the order they were added and stop in reverse order; a
        child's stop begins only once the previous child's stop Deferred fired; the
        parent's stop fires after the last one."""
        events: list[str] = []
        parent = OrderedMultiService()
        a, b, c = (Child(n, events) for n in "abc")
        for child in (a, b, c):
            child.setServiceParent(parent)
        parent.startService()
        self.assertEqual(events, ["start a", "start b", "start c"])
        events.clear()
        stopped = parent.stopService()
        self.assertFalse(parent.running)
        self.assertEqual(events, ["stop c"])
        self.assertTrue(b.running and a.running)  # not until c is done
        c.gone.callback(None)
        self.assertEqual(events, ["stop c", "stop b"])
        self.assertTrue(a.running)
        b.gone.callback(None)
        self.assertEqual(events, ["stop c", "stop b", "stop a"])
        self.assertNoResult(stopped)
        a.gone.callback(None)
        self.assertEqual(events, ["stop c", "stop b", "stop a"])
        self.assertIsNone(self.successResultOf(stopped))

    def test_a_failing_child_does_not_keep_the_others_running(self) -> None:
        """A child whose stop raises (or fails) is logged; the next one still stops
        and the parent's stop fires."""
        events: list[str] = []
        parent = OrderedMultiService()
        first, broken, last = Child("first", events), Child("broken", events, fail=True), \
            Child("last", events)
        for child in (first, broken, last):
            child.setServiceParent(parent)
        parent.startService()
        events.clear()
        stopped = parent.stopService()
        last.gone.errback(RuntimeError("late failure"))
        first.gone.callback(None)
        self.assertEqual(events, ["stop last", "stop broken", "stop first"])
        self.assertIsNone(self.successResultOf(stopped))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)
