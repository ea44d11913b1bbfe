"""The log/stats pipeline: interfaces, splitting, sequence numbers, fan-out to loggers."""

from __future__ import annotations

from typing import Any

from twisted.internet import task
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from epio.bus import Bus, bus_settings
from epio.bus.testing import TEST_REGISTRY, MemoryBus
from epio.pipeline import (
    BusLogSink,
    ILogSink,
    IStatsSink,
    LocalLogSink,
    MemoryLogSink,
    split_text,
)
from tests.bus.contract import BusLogSinkContract

SECRET = b"k" * 32


class SplitTests(SynchronousTestCase):
    def test_short_line_untouched(self) -> None:
        """A line within the limit is one part, unchanged."""
        self.assertEqual(split_text("hello", 10), ["hello"])

    def test_split_on_character_boundaries(self) -> None:
        """Parts are within the byte limit, never cut a character, and join back."""
        text = "aé€😀" * 1001
        parts = split_text(text, 10_000)
        self.assertGreater(len(parts), 1)
        self.assertEqual("".join(parts), text)
        for p in parts:
            self.assertLessEqual(len(p.encode()), 10_000)

    def test_tiny_limit_still_progresses(self) -> None:
        """A limit smaller than a character still terminates, one character a part."""
        self.assertEqual(split_text("😀😀", 2), ["😀", "😀"])


class SinkInterfaceTests(SynchronousTestCase):
    def test_memory_sink(self) -> None:
        """MemoryLogSink implements both interfaces and records what was emitted."""
        sink = MemoryLogSink()
        verifyObject(ILogSink, sink)
        verifyObject(IStatsSink, sink)
        sink.emit("app", "web.1", "hi", 5.0)
        sink.emit("other", "web.1", "no")
        sink.emit_stats("app", "http", {"requests": 3})
        self.assertEqual(sink.texts("app"), ["hi"])
        self.assertEqual(sink.lines[0].timestamp, 5.0)
        self.assertEqual(sink.stats[0].values, {"requests": 3})

    def test_local_sink_logs(self) -> None:
        """LocalLogSink writes each line to the node's log with app and source."""
        sink = LocalLogSink()
        verifyObject(ILogSink, sink)
        verifyObject(IStatsSink, sink)
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        sink.emit("app", "web.1", "hello there")
        mine = [e for e in events if e.get("app") == "app"]
        self.assertEqual(mine[0]["text"], "hello there")
        self.assertEqual(mine[0]["source"], "web.1")


class MemoryBusLogSinkTests(BusLogSinkContract, TestCase):
    """The sink contract on the in-memory bus with a fake clock."""

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.clock.advance(1_800_000_000)

    def make_bus(self, **settings: Any) -> Bus:
        return MemoryBus(self.clock, "node-x", bus_settings(**settings), secret=SECRET, registry=TEST_REGISTRY)

    async def wait_for(self, cond: Any) -> None:
        for _ in range(100):
            self.clock.advance(0)
            if cond():
                return


class BusLogSinkTests(TestCase):
    def test_emit_when_stopped_never_raises(self) -> None:
        """Emitting on a sink that is not started drops and counts, without raising."""
        bus = MemoryBus(task.Clock(), "node-x", secret=SECRET, registry=TEST_REGISTRY)
        sink = BusLogSink(bus, ["tcp://127.0.0.1:9"])
        sink.emit("app", "web.1", "lost")
        self.assertEqual(sink.counters["dropped"], 1)
        self.assertEqual(bus.counters["dropped.not_running"], 1)

    def test_no_logger_falls_back_to_node_log(self) -> None:
        """With no logger endpoint configured, lines go to the node's log (not nowhere)."""
        bus = MemoryBus(task.Clock(), "node-x", secret=SECRET, registry=TEST_REGISTRY)
        sink = BusLogSink(bus, [])
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        sink.startService()
        self.addCleanup(sink.stopService)
        sink.emit("app9", "web.1", "kept")
        self.assertIn("kept", [e.get("text") for e in events if e.get("app") == "app9"])
        self.assertEqual(sink.counters["dropped"], 0)
