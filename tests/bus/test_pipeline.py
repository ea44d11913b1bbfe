"""The log/stats pipeline: interfaces, splitting, sequence numbers, fan-out to loggers."""

from __future__ import annotations

from twisted.internet import reactor, task
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from epio.bus import Bus
from epio.pipeline import (
    BusLogSink,
    ILogSink,
    IStatsSink,
    LocalLogSink,
    MemoryLogSink,
    split_text,
)

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


class BusLogSinkTests(TestCase):
    """Against real PULL sockets in-process (inproc://, no ports)."""

    timeout = 10

    def setup_loggers(self, **settings: object) -> tuple[Bus, dict[str, list]]:
        bus = Bus(reactor, SECRET, "node-x", {"bus": settings})
        got: dict[str, list] = {"a": [], "b": []}
        for k in "ab":
            p = bus.pull(f"inproc://logger-{k}", got[k].append)
            p.startService()
            self.addCleanup(p.stopService)
        return bus, got

    def lines_of(self, envs: list) -> list[dict]:
        """Every line, from log.line and log.batch messages, as log.line bodies."""
        out = []
        for e in envs:
            if e.type == "log.line":
                out.append(e.body)
            elif e.type == "log.batch":
                for app, source, text, ts, seq in e.body["lines"]:
                    out.append({"app": app, "source": source, "text": text, "timestamp": ts,
                                "seq": seq, "boot": e.body["boot"]})
        return out

    async def wait_for(self, cond) -> None:
        for _ in range(300):
            if cond():
                return
            await task.deferLater(reactor, 0.01)

    async def test_fan_out_sequence_and_split(self) -> None:
        """Every logger gets every line; seq counts per (app, source); long lines come
        in parts with consecutive seq; stats carry their own sequence; one boot id."""
        bus, got = self.setup_loggers(log_line_max_bytes=100)
        sink = BusLogSink(bus, ["inproc://logger-a", "inproc://logger-b"])
        verifyObject(ILogSink, sink)
        verifyObject(IStatsSink, sink)
        sink.startService()
        self.addCleanup(sink.stopService)
        sink.emit("app1", "web.1", "one")
        sink.emit("app1", "web.1", "x" * 250)
        sink.emit("app1", "web.2", "other stream")
        sink.emit_stats("app1", "http", {"requests": 7})
        await self.wait_for(lambda: all(len(self.lines_of(got[k])) == 5 for k in "ab"))
        for k in "ab":
            lines = self.lines_of(got[k])
            web1 = [b for b in lines if b["source"] == "web.1"]
            self.assertEqual([b["seq"] for b in web1], [1, 2, 3, 4])
            self.assertEqual(web1[0]["text"], "one")
            self.assertEqual("".join(b["text"] for b in web1[1:]), "x" * 250)
            self.assertEqual([b.get("part") for b in web1], [None, 0, 1, 2])
            self.assertEqual(web1[1]["parts"], 3)
            web2 = [b for b in lines if b["source"] == "web.2"]
            self.assertEqual(web2[0]["seq"], 1)
            stats = [e for e in got[k] if e.type == "stats.sample"]
            self.assertEqual(stats[0].body["values"], {"requests": 7})
            self.assertEqual(stats[0].sender, "node-x")
            self.assertEqual({b["boot"] for b in lines} | {stats[0].body["boot"]}, {sink.boot})
        self.assertEqual(sink.counters["lines"], 5)
        self.assertEqual(sink.counters["dropped"], 0)

    async def test_one_turn_is_one_batch(self) -> None:
        """Lines emitted in one reactor turn travel as one log.batch, in order; a new
        sink numbers from 1 again under a new boot id."""
        bus, got = self.setup_loggers()
        sink = BusLogSink(bus, ["inproc://logger-a"])
        sink.startService()
        self.addCleanup(sink.stopService)
        for n in range(50):
            sink.emit("app1", "worker.1", f"line {n}", timestamp=100.0 + n)
        await self.wait_for(lambda: got["a"])
        self.assertEqual([e.type for e in got["a"]], ["log.batch"])
        lines = self.lines_of(got["a"])
        self.assertEqual([b["text"] for b in lines], [f"line {n}" for n in range(50)])
        self.assertEqual([b["seq"] for b in lines], list(range(1, 51)))
        self.assertEqual(lines[3]["timestamp"], 103.0)
        other = BusLogSink(bus, ["inproc://logger-a"])
        self.assertNotEqual(other.boot, sink.boot)

    async def test_batches_are_bounded_and_stop_flushes(self) -> None:
        """A burst is cut into batches of at most max_batch_lines; what is still
        batched when the sink stops is sent, not lost."""
        bus, got = self.setup_loggers()
        sink = BusLogSink(bus, ["inproc://logger-a"])
        sink.max_batch_lines = 10
        sink.startService()
        for n in range(25):
            sink.emit("app1", "web.1", f"l{n}")
        sink.stopService()
        await self.wait_for(lambda: len(self.lines_of(got["a"])) == 25)
        self.assertEqual([len(e.body["lines"]) for e in got["a"] if e.type == "log.batch"],
                         [10, 10, 5])
        self.assertEqual(sink.counters["dropped"], 0)

    def test_emit_when_stopped_never_raises(self) -> None:
        """Emitting on a sink that is not started drops and counts, without raising."""
        bus = Bus(reactor, SECRET, "node-x", {"bus": {}})
        sink = BusLogSink(bus, ["tcp://127.0.0.1:9"])
        sink.emit("app", "web.1", "lost")
        self.assertEqual(sink.counters["dropped"], 1)
        self.assertEqual(bus.counters["dropped.not_running"], 1)

    def test_no_logger_falls_back_to_node_log(self) -> None:
        """With no logger endpoint configured, lines go to the node's log (not nowhere)."""
        bus = Bus(reactor, SECRET, "node-x", {"bus": {}})
        sink = BusLogSink(bus, [])
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        sink.startService()
        self.addCleanup(sink.stopService)
        sink.emit("app9", "web.1", "kept")
        self.assertIn("kept", [e.get("text") for e in events if e.get("app") == "app9"])
        self.assertEqual(sink.counters["dropped"], 0)
