"""The chunked log store: rolling, compression, index, queries, retention, recovery."""

from __future__ import annotations

import gzip
import json
import re
import tempfile
from pathlib import Path

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from epio.logs.records import LogRecord, decode, split_text
from epio.logs.store import LogStore, Query, StoreConfig


def result(d):  # a Deferred that has already fired
    out = []
    d.addBoth(out.append)
    assert out, "deferred has not fired"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


class StoreTestBase(SynchronousTestCase):
    config = StoreConfig(chunk_max_bytes=10_000, chunk_max_age=600.0, retention_age=3600.0,
                         retention_bytes=1_000_000, block_lines=50, block_bytes=4096)

    def setUp(self) -> None:
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)
        self.root = Path(self.tmp.name) / "logs"
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.store = self.make_store()

    def make_store(self, config: StoreConfig | None = None) -> LogStore:
        s = LogStore(self.root, self.clock, config or self.config)
        s.open()
        return s

    def fill(self, app: str, n: int, source: str = "web.1", step: float = 0.0,
             start: int = 0) -> None:
        for i in range(start, start + n):
            self.store.append(app, self.clock.seconds(), source, f"line {i}", "node1", i + 1)
            if step:
                self.clock.advance(step)

    def query(self, app: str, **kw) -> list[LogRecord]:
        return result(self.store.query(app, Query(**kw))).lines


class RecordTests(SynchronousTestCase):
    def test_roundtrip_escapes(self) -> None:
        """Tabs, newlines, CRs and backslashes in a line survive the file format."""
        r = LogRecord(7, 12.5, "web.1", "a\tb\nc\\n\rd", 0, "n", 3)
        line = r.encode()
        self.assertEqual(line.count("\n"), 1)
        self.assertEqual(decode(line[:-1], 7), r)

    def test_lost_marker_roundtrip(self) -> None:
        """A lost marker keeps its count through the file format."""
        r = LogRecord(1, 1.0, "web.1", "[epio] 5 lines lost", 5, "n", 9)
        self.assertEqual(decode(r.encode()[:-1], 1).lost, 5)

    def test_split_on_character_boundary(self) -> None:
        """Splitting never cuts a multi-byte character and keeps every byte."""
        text = "é" * 7000  # 14,000 bytes
        parts = split_text(text, 10_000)
        self.assertEqual("".join(parts), text)
        self.assertTrue(all(len(p.encode()) <= 10_000 for p in parts))
        self.assertEqual(len(parts), 2)


class RollingTests(StoreTestBase):
    def test_rolls_by_size_and_compresses(self) -> None:
        """Past chunk_max_bytes a new chunk opens; the closed one is gzip and
        still readable, block by block."""
        self.fill("app", 500)
        files = sorted(p.name for p in (self.root / "app").iterdir())
        gz = [f for f in files if f.endswith(".log.gz")]
        plain = [f for f in files if f.endswith(".log")]
        self.assertGreaterEqual(len(gz), 2)
        self.assertEqual(len(plain), 1)  # only the open chunk is plain
        # every closed file is valid (multi-member) gzip holding its lines
        text = gzip.decompress((self.root / "app" / gz[0]).read_bytes()).decode()
        self.assertTrue(text.startswith(f"{self.clock.seconds():.6f}\tweb.1\tnode1\t1\t-\tline 0\n"))
        lines = self.query("app", n=1000)
        self.assertEqual([r.text for r in lines], [f"line {i}" for i in range(500)])
        self.assertEqual([r.lineno for r in lines], list(range(1, 501)))

    def test_rolls_by_time(self) -> None:
        """A chunk open for chunk_max_age closes on maintenance even with no new line."""
        self.fill("app", 3)
        self.clock.advance(599)
        self.store.maintain()
        self.assertEqual([p.name for p in (self.root / "app").glob("*.log.gz")], [])
        self.clock.advance(1)
        self.store.maintain()
        self.assertEqual([p.name for p in (self.root / "app").glob("*.log.gz")], ["00000001.log.gz"])
        self.fill("app", 1, start=3)
        self.assertTrue((self.root / "app" / "00000002.log").exists())
        self.assertEqual([r.text for r in self.query("app", n=10)],
                         ["line 0", "line 1", "line 2", "line 3"])

    def test_rolls_by_time_on_append(self) -> None:
        """A line arriving after chunk_max_age goes to a new chunk."""
        self.fill("app", 2)
        self.clock.advance(601)
        self.fill("app", 1, start=2)
        self.assertTrue((self.root / "app" / "00000001.log.gz").exists())
        self.assertTrue((self.root / "app" / "00000002.log").exists())


class IndexQueryTests(StoreTestBase):
    def test_index_records_chunks(self) -> None:
        """index.json lists every closed chunk with its time range, line count
        and blocks (offset, length, first line number)."""
        self.fill("app", 800, step=1.0)
        index = json.loads((self.root / "app" / "index.json").read_text())
        chunks = index["chunks"]
        self.assertTrue(chunks)
        first = chunks[0]
        self.assertEqual(first["first"], 1)
        self.assertTrue(first["compressed"])
        self.assertEqual(sum(b["count"] for b in first["blocks"]), first["count"])
        self.assertLessEqual(first["min_ts"], first["max_ts"])
        self.assertEqual(chunks[1]["first"], first["first"] + first["count"])

    def test_last_n_reads_only_needed_blocks(self) -> None:
        """The last N lines come from the newest blocks only."""
        self.fill("app", 2000)
        res = result(self.store.query("app", Query(n=10)))
        self.assertEqual([r.text for r in res.lines], [f"line {i}" for i in range(1990, 2000)])
        self.assertLessEqual(res.scanned_blocks, 2)
        self.assertEqual(res.next_lineno, 2001)

    def test_since_until(self) -> None:
        """since/until select by timestamp, skipping blocks outside the range."""
        t0 = self.clock.seconds()
        self.fill("app", 1000, step=1.0)
        res = result(self.store.query("app", Query(n=10_000, since=t0 + 500, until=t0 + 510)))
        self.assertEqual([r.text for r in res.lines], [f"line {i}" for i in range(500, 510)])
        self.assertLessEqual(res.scanned_blocks, 2)

    def test_source_and_grep_filters(self) -> None:
        """Source 'web' matches web.N but not worker; grep is a regex on the text."""
        for i in range(300):
            src = ["web.1", "web.2", "worker.1"][i % 3]
            self.store.append("app", self.clock.seconds(), src, f"req {i} status={200 if i % 10 else 500}", "n", i // 3 + 1)
        web = self.query("app", n=1000, sources=frozenset({"web"}))
        self.assertEqual(len(web), 200)
        self.assertEqual({r.source for r in web}, {"web.1", "web.2"})
        exact = self.query("app", n=1000, sources=frozenset({"web.2"}))
        self.assertEqual({r.source for r in exact}, {"web.2"})
        errors = self.query("app", n=1000, grep=re.compile(r"status=5\d\d"))
        self.assertEqual(len(errors), 30)
        last2 = self.query("app", n=2, grep=re.compile(r"status=5"))
        self.assertEqual([r.text for r in last2], ["req 280 status=500", "req 290 status=500"])

    def test_after_cursor(self) -> None:
        """after=L returns the first n lines numbered above L."""
        self.fill("app", 300)
        lines = self.query("app", n=5, after=100)
        self.assertEqual([r.lineno for r in lines], [101, 102, 103, 104, 105])

    def test_unknown_app_is_empty(self) -> None:
        """Querying an app with no log gives no lines, not an error."""
        self.assertEqual(self.query("nothing", n=10), [])

    def test_apps_are_separate(self) -> None:
        """Each app has its own directory and numbering."""
        self.fill("one", 3)
        self.fill("two", 2)
        self.assertEqual(len(self.query("one", n=10)), 3)
        self.assertEqual([r.lineno for r in self.query("two", n=10)], [1, 2])


class RetentionTests(StoreTestBase):
    def test_retention_by_age(self) -> None:
        """Closed chunks older than retention_age are deleted; newer ones stay."""
        self.fill("app", 800)  # several chunks closed now
        closed_before = len(list((self.root / "app").glob("*.log.gz")))
        self.assertGreater(closed_before, 1)
        self.clock.advance(3000)
        self.fill("app", 1, start=800)
        self.store.maintain()
        self.assertEqual(len(list((self.root / "app").glob("*.log.gz"))), closed_before + 1)
        self.clock.advance(601)  # the first batch is now 3601 s old
        self.store.maintain()
        remaining = self.query("app", n=10_000)
        self.assertEqual([r.text for r in remaining], ["line 800"])
        self.assertEqual(remaining[0].lineno, 801)  # numbering is kept

    def test_retention_by_size(self) -> None:
        """An app over retention_bytes loses its oldest chunks first, never the newest lines."""
        store = self.make_store(StoreConfig(
            chunk_max_bytes=5_000, chunk_max_age=600, retention_age=1e9, retention_bytes=12_000,
            block_lines=50, block_bytes=4096, compress_level=0))
        self.store = store
        self.fill("app", 2000)
        store.maintain()
        total = sum(p.stat().st_size for p in (self.root / "app").glob("*.log*"))
        self.assertLessEqual(total, 12_000)
        lines = self.query("app", n=100_000)
        self.assertEqual(lines[-1].text, "line 1999")
        self.assertEqual([r.lineno for r in lines], list(range(lines[0].lineno, 2001)))
        self.assertGreater(lines[0].lineno, 1)


class RecoveryTests(StoreTestBase):
    def test_reopen_continues(self) -> None:
        """After a restart the open chunk is appended to, numbering and stream
        positions continue."""
        self.fill("app", 130)
        self.store.flush()
        self.store = self.make_store()
        self.assertEqual(self.store.stream_position("app", "node1", "web.1"), 130)
        self.fill("app", 5, start=130)
        lines = self.query("app", n=1000)
        self.assertEqual([r.lineno for r in lines], list(range(1, 136)))
        self.assertEqual(lines[-1].text, "line 134")

    def test_crash_torn_line_and_unflushed(self) -> None:
        """A crash leaves a torn last line: it is cut, and the stream position is
        exactly the last complete record on disk."""
        self.fill("app", 10)
        self.store.flush()
        open_chunk = sorted((self.root / "app").glob("*.log"))[-1]
        with open(open_chunk, "ab") as f:
            f.write(b"1000000.0\tweb.1\tnode1\t11\t-\tpartial li")
        store = self.make_store()
        self.assertEqual(store.stream_position("app", "node1", "web.1"), 10)
        self.assertTrue(open_chunk.read_bytes().endswith(b"line 9\n"))

    def test_uncompressed_closed_chunk_is_compressed_on_start(self) -> None:
        """A chunk closed but not compressed before a crash is compressed at start."""
        store = LogStore(self.root, self.clock, self.config, run_blocking=lambda f: Deferred())
        store.open()
        self.store = store
        self.fill("app", 300)  # compression never completes
        self.assertFalse(list((self.root / "app").glob("*.log.gz")))
        store.flush()
        store2 = self.make_store()
        self.assertTrue(list((self.root / "app").glob("*.log.gz")))
        lines = result(store2.query("app", Query(n=1000))).lines
        self.assertEqual([r.text for r in lines], [f"line {i}" for i in range(300)])


class RobustnessTests(StoreTestBase):
    def test_query_survives_compression_underneath(self) -> None:
        """A query whose snapshot named a plain chunk that was compressed (and the
        plain file removed) before the query's thread read it is re-run on a fresh
        snapshot: no lines go missing from the answer."""
        jobs: list = []

        def run_later(f):
            d = Deferred()
            jobs.append((f, d))
            return d

        def run(job):
            f, d = job
            d.callback(f())

        store = LogStore(self.root, self.clock, self.config, run_blocking=run_later)
        store.open()
        self.store = store
        self.fill("app", 300)
        compressions = list(jobs)
        jobs.clear()
        out: list = []
        store.query("app", Query(n=1000)).addCallback(out.append)
        query_job = jobs.pop()
        for job in compressions:  # the compressions finish first, plain files go
            run(job)
        self.assertTrue(list((self.root / "app").glob("*.log.gz")))
        run(query_job)  # reads a snapshot naming vanished files: incomplete, so retried
        self.assertEqual(out, [])
        run(jobs.pop())
        self.assertEqual([r.text for r in out[0].lines], [f"line {i}" for i in range(300)])
        self.assertFalse(out[0].incomplete)

    def test_idle_app_releases_its_file(self) -> None:
        """After IDLE_CLOSE seconds without a line the open chunk's file is closed;
        the next line reopens it and nothing is lost."""
        from epio.logs.store import IDLE_CLOSE

        self.fill("app", 3)
        self.clock.advance(IDLE_CLOSE)
        self.store.maintain()
        self.assertIsNone(self.store.apps["app"]._file)
        self.fill("app", 2, start=3)
        self.assertEqual([r.text for r in self.query("app", n=10)],
                         [f"line {i}" for i in range(5)])
