"""The receiving side of the log pipeline: sequence gaps, duplicates, splits, counters."""

from __future__ import annotations

import tempfile
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from epio.logs.receiver import LogCounters, LogReceiver
from epio.logs.store import LogStore, Query
from epio.metrics import MetricsRegistry


class ReceiverTests(SynchronousTestCase):
    def setUp(self) -> None:
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.root = Path(tmp.name)
        self.clock = Clock()
        self.clock.advance(1000)
        self.registry = MetricsRegistry()
        self.records: list = []
        self.store = LogStore(self.root, self.clock)
        self.store.open()
        self.counters = LogCounters(self.registry)
        self.rx = LogReceiver(self.store, self.clock, self.counters, max_line_bytes=100,
                              on_record=lambda app, r: self.records.append(r))

    def send(self, seq: int, text: str = "", source: str = "web.1", app: str = "app",
             node: str = "n1", **extra) -> int:
        body = {"app": app, "source": source, "text": text or f"line {seq}",
                "timestamp": self.clock.seconds(), "seq": seq, "node": node, **extra}
        return self.rx.line(node, body)

    def stored(self, app: str = "app") -> list:
        out = []
        self.store.query(app, Query(n=10_000)).addCallback(lambda r: out.extend(r.lines))
        return out

    def test_in_order_lines_are_stored(self) -> None:
        """Consecutive sequence numbers are stored and counted as received and written."""
        for i in range(1, 6):
            self.send(i)
        self.assertEqual([r.text for r in self.stored()], [f"line {i}" for i in range(1, 6)])
        self.assertEqual(self.counters.received.value("app", "web.1"), 5)
        self.assertEqual(self.counters.written.value("app", "web.1"), 5)
        self.assertEqual(len(self.records), 5)

    def test_counters_summed_over_apps_unless_per_app(self) -> None:
        """docs/logs.md: by default (``logger.metrics_per_app`` off) the logger's
        counters and store size render a few series however many apps log -- 200
        apps' lines make the same families as one app's -- and their sums are the
        per-app counts; with ``per_app`` they carry ``app`` and ``source``."""
        def scrape(per_app: bool, apps: int) -> tuple[int, dict[str, list]]:
            reg = MetricsRegistry()
            rx = LogReceiver(self.store, self.clock, LogCounters(reg, per_app=per_app),
                             max_line_bytes=100)
            for n in range(apps):
                for seq, source in [(1, "web.1"), (1, "platform"), (2, "web.1")]:
                    rx.line("n1", {"app": f"a{n}", "source": source, "text": "x",
                                   "timestamp": self.clock.seconds(), "seq": seq,
                                   "node": f"n{per_app}"})
            rx.line("n1", {"app": "a0", "source": "web.1", "text": "x", "seq": 2,
                           "timestamp": self.clock.seconds(), "node": f"n{per_app}"})
            text = reg.render().decode()
            fams = {f.name: [(s.labels, s.value) for s in f.samples
                             if not s.name.endswith("_created")]
                    for f in text_string_to_metric_families(text)}
            return len(text.splitlines()), fams

        one, _ = scrape(False, 1)
        lines, fams = scrape(False, 200)
        self.assertEqual(lines, one)
        self.assertEqual(fams["epio_log_lines_received"], [({}, 601.0)])
        self.assertEqual(fams["epio_log_lines_written"], [({}, 600.0)])
        self.assertEqual(fams["epio_log_lines_dropped"], [({"reason": "duplicate"}, 1.0)])
        lines, fams = scrape(True, 200)
        self.assertGreater(lines, 600)
        self.assertEqual(len(fams["epio_log_lines_written"]), 400)
        self.assertIn(({"app": "a7", "source": "web.1"}, 2.0), fams["epio_log_lines_written"])

    def test_gap_is_recorded_and_counted(self) -> None:
        """A jump in seq stores one lost marker with the exact number missing."""
        self.send(1)
        self.send(2)
        self.send(7)
        lines = self.stored()
        self.assertEqual([r.lost for r in lines], [0, 0, 4, 0])
        self.assertIn("4 lines", lines[2].text)
        self.assertEqual(self.counters.lost.value("app", "web.1"), 4)

    def test_streams_are_per_sender_and_source(self) -> None:
        """Sequence numbers of different senders and sources do not interfere."""
        self.send(1, node="a")
        self.send(1, node="b")
        self.send(1, source="worker.1", node="a")
        self.send(2, node="a")
        self.assertEqual(self.counters.lost.value("app", "web.1"), 0)
        self.assertEqual(len(self.stored()), 4)

    def test_duplicate_is_dropped_and_counted(self) -> None:
        """A seq already stored is dropped with reason duplicate."""
        self.send(1)
        self.send(2)
        self.assertEqual(self.send(2), 0)
        self.assertEqual(len(self.stored()), 2)
        self.assertEqual(self.counters.dropped.value("app", "web.1", "duplicate"), 1)

    def test_sender_restart(self) -> None:
        """seq 1 after a higher seq is a restarted sender, not a duplicate or gap."""
        self.send(1)
        self.send(2)
        self.send(1)
        self.send(2)
        self.assertEqual(len(self.stored()), 4)
        self.assertEqual(self.counters.lost.value("app", "web.1"), 0)

    def test_boot_field_separates_incarnations(self) -> None:
        """With a boot id, each incarnation of a sender is its own stream."""
        self.send(1, boot="x")
        self.send(2, boot="x")
        self.send(2, boot="y")  # the new incarnation's line 1 is missing
        self.assertEqual(self.counters.lost.value("app", "web.1"), 1)

    def test_first_seen_after_start_counts_lost(self) -> None:
        """A stream first seen at seq 5 records 4 lines this logger never got."""
        self.send(5)
        self.assertEqual([r.lost for r in self.stored()], [4, 0])

    def test_long_lines_split_on_receive(self) -> None:
        """A line over max_line_bytes is stored in parts, counted as split."""
        self.send(1, text="x" * 250)
        lines = self.stored()
        self.assertEqual(["".join(r.text for r in lines)], ["x" * 250])
        self.assertEqual([len(r.text) for r in lines], [100, 100, 50])
        self.assertEqual(self.counters.split.value("app", "web.1"), 1)

    def test_invalid_names_dropped(self) -> None:
        """App names that are not safe directory names, and bad sources, are dropped and counted."""
        self.assertEqual(self.send(1, app="../etc"), 0)
        self.assertEqual(self.send(1, source="web 1"), 0)
        self.assertEqual(self.counters.dropped.value("-", "-", "invalid_app"), 1)
        self.assertEqual(self.counters.dropped.value("app", "-", "invalid_source"), 1)
        self.assertEqual(list(self.root.iterdir()), [])  # nothing created on disk

    def test_restart_knows_what_was_stored(self) -> None:
        """After a logger restart the next seq continues without a false gap,
        and a real gap is counted exactly."""
        for i in range(1, 11):
            self.send(i)
        self.store.close()
        self.store = LogStore(self.root, self.clock)
        self.store.open()
        self.rx.store = self.store
        self.send(11)
        self.send(15)
        self.assertEqual(self.counters.lost.value("app", "web.1"), 3)
        self.assertEqual(len(self.stored()), 13)

    def test_batch(self) -> None:
        """A log.batch body stores each item as log.line would, gap detection
        included; a malformed item is dropped and counted, the rest kept."""
        body = {"node": "n1", "lines": [
            ["app", "web.1", "a", self.clock.seconds(), 1],
            ["app", "web.1", "b", self.clock.seconds(), 2],
            ["app", "web.1"],
            ["app", "web.1", "d", self.clock.seconds(), 5],
        ]}
        self.assertEqual(self.rx.batch("n1", body), 4)  # 3 lines + 1 lost marker
        self.assertEqual([(r.text, r.lost) for r in self.stored()],
                         [("a", 0), ("b", 0), (self.stored()[2].text, 2), ("d", 0)])
        self.assertEqual(self.counters.dropped.value("-", "-", "invalid_body"), 1)
