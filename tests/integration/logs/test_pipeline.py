"""The log pipeline with real processes: a pusher process -> the real bus -> a real
logger process -> storage, queries, websocket tail, /metrics."""

from __future__ import annotations

import json
import re
import tempfile
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from epio.logclient import LogClient

from .helpers import (
    LoggerNode,
    Pusher,
    all_lines,
    connect_tail,
    make_bus,
    peer,
    serve_tail,
    until,
    write_secret,
)


def by_source(lines: list) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for ln in lines:
        text = ln.text if hasattr(ln, "text") else ln["text"]
        m = re.match(r"^(\S+) line (\d+)(?: x+)?$", text)
        if m:
            out.setdefault(m.group(1), []).append(int(m.group(2)))
    return out


class PipelineTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        tmp = tempfile.TemporaryDirectory(prefix="epio-logs-")
        self.addCleanup(tmp.cleanup)
        self.tmp = Path(tmp.name)
        self.secret_file, self.secret = write_secret(self.tmp)

    def start_logger(self, overrides: dict | None = None) -> LoggerNode:
        node = LoggerNode(self.tmp, self.secret_file, overrides)
        self.addCleanup(node.stop)
        node.start()
        return node

    def client(self, node: LoggerNode) -> LogClient:
        bus = make_bus(self.secret)
        client = LogClient(bus, [peer(node)], reactor, timeout=5.0, ping_interval=1.0)
        client.startService()
        self.addCleanup(client.stopService)
        return client

    def pusher(self, node: LoggerNode, **args) -> Pusher:
        p = Pusher.spawn(secret=self.secret.hex(), endpoints=[node.pull], app="burst", **args)
        self.addCleanup(p.close)
        return p

    async def test_burst_stored_in_order_and_tailed(self) -> None:
        """10,000 numbered lines pushed in one burst from another process are all
        stored, in order per source, all reach a websocket tail opened before the
        burst, and the logger's /metrics (parsed by prometheus_client) counts them, per
        app and source with logger.metrics_per_app."""
        node = self.start_logger({"logger": {"metrics_per_app": True}})
        client = self.client(node)
        port, http_port = serve_tail(client, {"burst"})
        self.addCleanup(port.stopListening)
        tail = connect_tail(http_port, "burst", "n=0")
        await tail.ready.addTimeout(20, reactor)

        p = self.pusher(node, sources=["web.1", "worker.1"], count=5000, stats=3)
        sent = await p.events["sent"].addTimeout(30, reactor)
        self.assertEqual((sent["sent"], sent["dropped"]), (10_000, 0))

        await tail.wait_lines(10_000, 30)
        stored: list = []

        async def all_stored() -> bool:
            stored[:] = await all_lines(client, "burst")
            return len(stored) >= 10_000

        await until(all_stored, 20)
        self.assertEqual(len(stored), 10_000)
        self.assertEqual([ln.lost for ln in stored if ln.lost], [])
        self.assertEqual(by_source(stored), {"web.1": list(range(1, 5001)),
                                             "worker.1": list(range(1, 5001))})
        self.assertEqual([ln.id for ln in stored], list(range(1, 10_001)))
        # the websocket tail saw every line once, in order, and was told of no loss
        self.assertEqual(by_source(tail.lines), {"web.1": list(range(1, 5001)),
                                                 "worker.1": list(range(1, 5001))})
        self.assertEqual([m for m in tail.messages if m["type"] == "missed"], [])

        # recent lines over plain HTTP, filtered
        body = await _get(f"http://127.0.0.1:{http_port}/api/v1/apps/burst/logs?n=3&source=worker")
        doc = json.loads(body[1])
        self.assertEqual(body[0], 200)
        self.assertEqual([ln["text"] for ln in doc["lines"]],
                         ["worker.1 line 4998", "worker.1 line 4999", "worker.1 line 5000"])
        # another user's app: refused by the api's own check, before anything is read
        status, _ = await _get(f"http://127.0.0.1:{http_port}/api/v1/apps/other/logs")
        self.assertEqual(status, 404)

        text = (await _get(f"http://127.0.0.1:{node.metrics_port}/metrics"))[1].decode()
        fams = {f.name: f for f in text_string_to_metric_families(text)}
        written = {s.labels["source"]: s.value for s in fams["epio_log_lines_written"].samples
                   if s.name == "epio_log_lines_written_total" and s.labels["app"] == "burst"}
        self.assertEqual(written, {"web.1": 5000, "worker.1": 5000})

        # stats samples from the same process were aggregated and can be queried
        got: dict = {}

        async def stats_written() -> bool:
            got.update(await client.stats("burst", "requests", since=0, resolution=10))
            return bool(got["series"])

        await until(stats_written, 10, interval=0.3)
        self.assertEqual(sum(v for _, v in got["series"]["requests"]), 30)

        tail.protocol_instance.sendClose()
        await p.close()

    async def test_slow_tail_client_does_not_slow_others(self) -> None:
        """A websocket client that stops reading gets a bounded buffer; the others
        get every line meanwhile; when it reads again it gets what was buffered and
        one 'missed' whose count makes up exactly what it did not get."""
        node = self.start_logger()
        client = self.client(node)
        port, http_port = serve_tail(client, {"burst"}, buffer_lines=2000)
        self.addCleanup(port.stopListening)
        slow = connect_tail(http_port, "burst", "n=0")
        fast = connect_tail(http_port, "burst", "n=0")
        await slow.ready.addTimeout(20, reactor)
        await fast.ready.addTimeout(20, reactor)
        slow.protocol_instance.transport.pauseProducing()  # stop reading the socket
        total = 10_000
        # ~10 MB over 4 s: a reading client keeps up, one that does not read overflows
        p = self.pusher(node, sources=["web.1"], count=total, pad=1000, rate=2500)
        await p.events["sent"].addTimeout(30, reactor)
        await fast.wait_lines(total, 30)
        self.assertEqual(by_source(fast.lines), {"web.1": list(range(1, total + 1))})
        self.assertEqual(len(slow.lines), 0)
        slow.protocol_instance.transport.resumeProducing()

        async def slow_caught_up() -> bool:
            return any(m["type"] == "missed" for m in slow.messages)

        await until(slow_caught_up, 20)
        await task.deferLater(reactor, 0.5, lambda: None)
        missed = sum(m["count"] for m in slow.messages if m["type"] == "missed")
        got = by_source(slow.lines)["web.1"]
        self.assertGreater(missed, 0)
        self.assertEqual(got, sorted(got))
        self.assertEqual(len(got) + missed, total)
        # what it got is a prefix: the buffer kept the oldest lines, then the gap
        self.assertEqual(got, list(range(1, len(got) + 1)))
        fast.protocol_instance.sendClose()
        slow.protocol_instance.sendClose()
        await p.close()

    async def test_sigterm_stops_cleanly_and_keeps_everything(self) -> None:
        """SIGTERM: the logger flushes and exits cleanly (no traceback); after a
        restart every line is there and the next lines continue the numbering.  (By
        default its /metrics counts the lines summed over apps and sources.)"""
        node = self.start_logger()
        client = self.client(node)
        p = self.pusher(node, sources=["web.1"], count=2000, stats=2)
        await p.events["sent"].addTimeout(30, reactor)

        async def stored(n: int) -> bool:
            return len(await all_lines(client, "burst")) >= n

        await until(lambda: stored(2000), 20)
        await p.close()
        text = (await _get(f"http://127.0.0.1:{node.metrics_port}/metrics"))[1].decode()
        fams = {f.name: f for f in text_string_to_metric_families(text)}
        self.assertEqual([(s.labels, s.value) for s in fams["epio_log_lines_written"].samples
                          if s.name == "epio_log_lines_written_total"], [({}, 2000.0)])
        assert node.proc is not None
        code = await _in_thread(node.proc.stop)
        out = node.proc.output()
        self.assertIn("Server Shut Down", out)
        self.assertNotIn("Traceback", out)
        self.assertIn(code, (0, -15))
        await _in_thread(node.start)
        lines = await all_lines(client, "burst")
        self.assertEqual([ln.id for ln in lines], list(range(1, 2001)))
        self.assertEqual(by_source(lines), {"web.1": list(range(1, 2001))})

    async def test_two_loggers_each_hold_everything_and_tails_fail_over(self) -> None:
        """With two loggers, a sender's lines reach both (each holds the whole
        stream); when the logger a tail reads from dies, the client moves to the
        other, the tail is told, and new lines keep coming."""
        (self.tmp / "a").mkdir()
        (self.tmp / "b").mkdir()
        a = LoggerNode(self.tmp / "a", self.secret_file)
        b = LoggerNode(self.tmp / "b", self.secret_file)
        for node in (a, b):
            self.addCleanup(node.stop)
            node.start()
        client = LogClient(make_bus(self.secret), [peer(a), peer(b)], reactor, timeout=1.0,
                           ping_interval=0.5)
        client.startService()
        self.addCleanup(client.stopService)
        only_b = LogClient(make_bus(self.secret, "b-reader"), [peer(b)], reactor, timeout=5.0)
        only_b.startService()
        self.addCleanup(only_b.stopService)
        port, http_port = serve_tail(client, {"burst"})
        self.addCleanup(port.stopListening)
        tail = connect_tail(http_port, "burst", "n=0")
        await tail.ready.addTimeout(20, reactor)

        p = Pusher.spawn(secret=self.secret.hex(), endpoints=[a.pull, b.pull], app="burst",
                         sources=["web.1"], count=3000)
        self.addCleanup(p.close)
        await p.events["sent"].addTimeout(30, reactor)
        await tail.wait_lines(3000, 20)
        for reader in (client, only_b):
            async def has_all(r=reader) -> bool:
                return len(await all_lines(r, "burst")) >= 3000

            await until(has_all, 20)
        self.assertEqual(by_source(await all_lines(only_b, "burst")),
                         {"web.1": list(range(1, 3001))})

        a.kill()

        async def told() -> bool:
            return any(m["type"] == "notice" for m in tail.messages)

        await until(told, 20)
        p2 = Pusher.spawn(secret=self.secret.hex(), endpoints=[a.pull, b.pull], app="burst",
                          sources=["web.2"], count=500)
        self.addCleanup(p2.close)
        await p2.events["sent"].addTimeout(30, reactor)
        await tail.wait_lines(3500, 20)
        self.assertEqual(by_source(tail.lines)["web.2"], list(range(1, 501)))
        self.assertEqual(client.peer, peer(b))
        tail.protocol_instance.sendClose()

    async def test_kill_and_restart_during_burst(self) -> None:
        """Killing the logger (SIGKILL) mid-stream and restarting it on the same data:
        for every source each line is either stored (once, in order) or inside a
        'lost' marker, and the markers' counts equal exactly the lines missing."""
        node = self.start_logger()
        client = self.client(node)
        total = 10_000
        p = self.pusher(node, sources=["web.1", "web.2"], count=total, rate=8000,
                        hwm=3000)
        await p.events["ready"].addTimeout(20, reactor)
        await task.deferLater(reactor, 0.9, lambda: None)
        node.kill()
        await task.deferLater(reactor, 0.3, lambda: None)
        await _in_thread(node.start)
        await p.events["sent"].addTimeout(60, reactor)

        stored: list = []

        async def last_lines_arrived() -> bool:
            stored[:] = await all_lines(client, "burst")
            seen = by_source(stored)
            return all(seen.get(s, [0])[-1] == total for s in ("web.1", "web.2"))

        await until(last_lines_arrived, 30, interval=0.5)
        lost_total = 0
        for source in ("web.1", "web.2"):
            lines = [ln for ln in stored if ln.source == source]
            expected = 1
            for ln in lines:
                if ln.lost:
                    expected += ln.lost
                    lost_total += ln.lost
                    continue
                n = int(ln.text.rsplit(" ", 1)[1])
                self.assertEqual(n, expected, f"{source}: line {n} where {expected} was due")
                expected += 1
            self.assertEqual(expected - 1, total)
        # ~2 s down at 8,000 lines/s with a 3,000-line sender queue: lines were lost,
        # so the gap path was exercised, and every one of them is accounted for
        self.assertGreater(lost_total, 0)
        self.assertEqual(len([ln for ln in stored if not ln.lost]) + lost_total, 2 * total)
        await p.close()


async def _in_thread(f):
    from twisted.internet.threads import deferToThread

    return await deferToThread(f)


def _get(url: str) -> Deferred:
    from twisted.internet.threads import deferToThread

    def fetch() -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    return deferToThread(fetch)
