"""Drains: RFC 5424 formatting and HTTPS retry/backoff accounting (fake clock)."""

from __future__ import annotations

from twisted.internet.defer import fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from epio.logs.drains import DrainConfig, DrainManager, frame, rfc5424
from epio.logs.records import LogRecord
from epio.metrics import MetricsRegistry


def rec(i: int, lost: int = 0) -> LogRecord:
    return LogRecord(i, 1_700_000_000.25, "web.1", f"line {i}\nsecond", lost)


class FormatTests(SynchronousTestCase):
    def test_rfc5424(self) -> None:
        """PRI/VERSION, RFC 3339 UTC timestamp, host, app, procid=source, nil MSGID/SD."""
        msg = rfc5424(rec(1), "hello", "node-1")
        self.assertEqual(msg, b"<14>1 2023-11-14T22:13:20.250000Z node-1 hello web.1 - - line 1 second")
        self.assertTrue(rfc5424(rec(1, lost=3), "hello").startswith(b"<12>1 "))

    def test_octet_counting(self) -> None:
        """Framing is the byte length, a space, the message."""
        self.assertEqual(frame("é".encode()), b"2 \xc3\xa9")


class HTTPDrainTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.calls: list[tuple[str, bytes]] = []
        self.replies: list = []
        self.registry = MetricsRegistry()

        def post(url, body, headers):
            self.calls.append((url, body))
            r = self.replies.pop(0) if self.replies else 200
            return fail(ConnectionError("refused")) if r == "error" else succeed(r)

        self.mgr = DrainManager(self.clock, DrainConfig(buffer_lines=5, max_attempts=3,
                                                       backoff_initial=1.0, backoff_max=10.0,
                                                       batch_lines=2),
                                registry=self.registry, http_post=post)

    def counts(self) -> tuple[float, float]:
        d = self.registry.counter("epio_log_drain_delivered_total", "", ["drain", "app"])
        u = self.registry.counter("epio_log_drain_undelivered_total", "", ["drain", "app", "reason"])
        return d.value("d1", "app"), sum(c.value for c in u._children.values())

    def test_delivers_in_batches(self) -> None:
        """Lines of the drain's app go out as logplex batches; other apps' do not."""
        self.mgr.add("d1", "app", "https://example.invalid/logs")
        for i in range(3):
            self.mgr.on_record("app", rec(i))
        self.mgr.on_record("other", rec(9))
        self.assertEqual(self.counts(), (3, 0))
        self.assertEqual(self.calls[0][1].count(b"<14>1"), 1)  # first line went alone

    def test_retry_with_backoff_then_undelivered(self) -> None:
        """A failing endpoint is retried after 1 s, 2 s; after max_attempts the batch
        is counted undelivered and the next one is tried."""
        self.mgr.add("d1", "app", "https://example.invalid/logs")
        self.replies = ["error", 503, 500, 200]
        self.mgr.on_record("app", rec(1))
        self.assertEqual(len(self.calls), 1)
        self.clock.advance(0.9)
        self.assertEqual(len(self.calls), 1)
        self.clock.advance(0.1)
        self.assertEqual(len(self.calls), 2)
        self.clock.advance(2.0)
        self.assertEqual(len(self.calls), 3)
        self.assertEqual(self.counts(), (0, 1))
        self.mgr.on_record("app", rec(2))
        self.assertEqual(self.counts(), (1, 1))

    def test_overflow_counted(self) -> None:
        """While a batch is stuck in retries the queue is bounded; overflow is counted."""
        self.mgr.add("d1", "app", "https://example.invalid/logs")
        self.replies = ["error"] * 10
        for i in range(10):
            self.mgr.on_record("app", rec(i))
        # 1 in flight, 5 queued, 4 overflowed
        self.assertEqual(self.counts(), (0, 4))
        self.mgr.remove("d1")
        self.assertEqual(self.counts(), (0, 10))

    def test_bad_url(self) -> None:
        """Unknown schemes and syslog without a port are refused."""
        self.assertRaises(ValueError, self.mgr.add, "x", "app", "ftp://h/")
        self.assertRaises(ValueError, self.mgr.add, "y", "app", "syslog://h")
