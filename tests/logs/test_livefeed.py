"""The logger's live feed: batches per reactor turn, consecutive ids, bounded size."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from epio.logclient import live_topic
from epio.logs.records import LogRecord
from epio.logs.service import LIVE_BATCH, LiveFeed


class LiveFeedTests(SynchronousTestCase):
    def test_one_message_per_app_per_turn(self) -> None:
        """Lines stored in one reactor turn go out as one log.live per app, on the
        app's topic, with the first id and the lines in order."""
        clock = Clock()
        sent: list = []
        feed = LiveFeed(clock, lambda t, b, topic: sent.append((t, b, topic)), "logger-1")
        for i in range(1, 4):
            feed.add("a", LogRecord(i, 1.0, "web.1", f"l{i}"))
        feed.add("b", LogRecord(1, 1.0, "web.1", "x", 2))
        self.assertEqual(sent, [])
        clock.advance(0)
        self.assertEqual([(t, topic) for t, _, topic in sent],
                         [("log.live", live_topic("a")), ("log.live", live_topic("b"))])
        self.assertEqual(sent[0][1]["first"], 1)
        self.assertEqual([ln[3] for ln in sent[0][1]["lines"]], ["l1", "l2", "l3"])
        self.assertEqual(sent[1][1]["lines"], [[1, 1.0, "web.1", "x", 2]])
        self.assertEqual(live_topic("app"), b"log\0app\0")  # exact: 'app' never matches 'app2'

    def test_full_batch_published_at_once(self) -> None:
        """A full batch is published immediately, not at the end of a long turn."""
        clock = Clock()
        sent: list = []
        feed = LiveFeed(clock, lambda t, b, topic: sent.append(b), "logger-1")
        for i in range(1, LIVE_BATCH + 2):
            feed.add("a", LogRecord(i, 1.0, "web.1", "x"))
        self.assertEqual([len(b["lines"]) for b in sent], [LIVE_BATCH])
        clock.advance(0)
        self.assertEqual([(b["first"], len(b["lines"])) for b in sent],
                         [(1, LIVE_BATCH), (LIVE_BATCH + 1, 1)])
