"""epio.api.logtail: parameters, the JSON endpoint, and slow-client buffering."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from epio.api.logtail import LogTail, TailBuffer, TailFactory, parse_params, parse_time
from epio.logclient import BadFilter, Line, LineFilter, LogsUnavailable


def lines(a: int, b: int) -> list[Line]:
    return [Line(i, float(i), "web.1", f"line {i}") for i in range(a, b)]


class TailBufferTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.sent: list[dict] = []
        self.missed_counter: list[int] = []
        self.buf = TailBuffer(10, self.sent.append, self.missed_counter.append)

    def sent_ids(self) -> list[int]:
        return [ln["id"] for m in self.sent if m["type"] == "lines" for ln in m["lines"]]

    def test_fast_client_gets_everything_at_once(self) -> None:
        """Not paused: every batch is sent immediately, nothing queued."""
        self.buf.lines(lines(1, 6))
        self.buf.message({"type": "ready", "next": 6})
        self.buf.lines(lines(6, 8))
        self.assertEqual(self.sent_ids(), list(range(1, 8)))
        self.assertEqual(self.sent[1], {"type": "ready", "next": 6})
        self.assertEqual(self.buf.queued_lines, 0)

    def test_slow_client_bounded_and_told_what_it_missed(self) -> None:
        """Paused: up to the limit is queued, the rest is dropped and counted; on
        resume the queue is sent, then one 'missed' with the exact count, then live
        lines flow again."""
        self.buf.pause()
        self.buf.lines(lines(1, 8))
        self.buf.lines(lines(8, 15))  # 3 fit, 4 dropped
        self.buf.lines(lines(15, 20))  # all 5 dropped (once dropping, until caught up)
        self.assertEqual(self.sent, [])
        self.assertEqual(self.buf.queued_lines, 10)
        self.assertEqual(sum(self.missed_counter), 9)
        self.buf.resume()
        self.assertEqual(self.sent_ids(), list(range(1, 11)))
        self.assertEqual(self.sent[-1], {"type": "missed", "count": 9})
        self.buf.lines(lines(20, 22))
        self.assertEqual(self.sent_ids()[-2:], [20, 21])
        self.assertEqual(self.buf.total_missed, 9)

    def test_pause_during_drain(self) -> None:
        """A send that pauses the client again stops the drain; the rest waits."""
        def send(msg: dict) -> None:
            self.sent.append(msg)
            if len(self.sent) == 1:
                self.buf.pause()

        self.buf.send = send
        self.buf.pause()
        self.buf.lines(lines(1, 3))
        self.buf.message({"type": "notice", "message": "x"})
        self.buf.lines(lines(3, 5))
        self.buf.resume()
        self.assertEqual(self.sent_ids(), [1, 2])
        self.buf.resume()
        self.assertEqual(self.sent_ids(), [1, 2, 3, 4])
        self.assertEqual(self.sent[1]["type"], "notice")

    def test_control_messages_never_dropped(self) -> None:
        """Notices queue even when the line budget is exhausted."""
        self.buf.pause()
        self.buf.lines(lines(1, 30))
        self.buf.message({"type": "notice", "message": "switched"})
        self.buf.resume()
        self.assertIn({"type": "notice", "message": "switched"}, self.sent)


class ParamTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        """No parameters: default n, no filter."""
        n, f = parse_params({}, 1000.0, 100, 10_000)
        self.assertEqual((n, f), (100, LineFilter()))

    def test_all_parameters(self) -> None:
        """n, repeated/comma sources, grep, relative since and ISO until are parsed."""
        n, f = parse_params({b"n": [b"5"], b"source": [b"web,worker.2", b"router"],
                             b"grep": [b"err(or)?"], b"since": [b"1h"],
                             b"until": [b"1970-01-01T01:00:00Z"]}, 10_000.0, 100, 10_000)
        self.assertEqual(n, 5)
        self.assertEqual(f.sources, frozenset({"web", "worker.2", "router"}))
        self.assertEqual(f.grep, "err(or)?")
        self.assertEqual(f.since, 10_000.0 - 3600)
        self.assertEqual(f.until, 3600.0)

    def test_bad_values_are_clear_errors(self) -> None:
        """Out-of-range n, bad regex, bad source, bad time: BadFilter saying what is wrong."""
        for args, word in [({b"n": [b"x"]}, "integer"), ({b"n": [b"20000"]}, "between"),
                           ({b"grep": [b"("]}, "regular expression"),
                           ({b"source": [b"we b"]}, "source"),
                           ({b"since": [b"yesterday"]}, "since"),
                           ({b"since": [b"2026-01-01T00:00:00"]}, "time zone")]:
            e = self.assertRaises(BadFilter, parse_params, args, 0.0, 100, 10_000)
            self.assertIn(word, str(e))

    def test_parse_time_forms(self) -> None:
        """Durations, epoch seconds and ISO 8601 with zone."""
        self.assertEqual(parse_time("90s", 1000.0, "since"), 910.0)
        self.assertEqual(parse_time("2d", 200_000.0, "since"), 200_000.0 - 172_800)
        self.assertEqual(parse_time("1234.5", 0.0, "since"), 1234.5)
        self.assertEqual(parse_time("1970-01-01T00:00:10+00:00", 0.0, "since"), 10.0)


class FakeClient:
    """Implements what LogTail uses of LogClient."""

    def __init__(self, result: Any = None, error: Exception | None = None) -> None:
        self.result = result
        self.error = error
        self.queries: list[tuple] = []

    def query(self, app: str, filt: LineFilter, n: int, **kw: Any) -> Deferred:
        self.queries.append((app, filt, n))
        if self.error is not None:
            from twisted.internet.defer import fail

            return fail(self.error)
        return succeed(self.result)


class Refused(Exception):
    pass


def fire(coro: Any) -> Any:
    out: list = []
    Deferred.fromCoroutine(coro).addBoth(out.append)
    assert out
    return out[0]


class HandleTests(SynchronousTestCase):
    def make(self, client: FakeClient, allowed: bool = True) -> LogTail:
        async def authorize(request: Any, app: str) -> None:
            if not allowed:
                raise Refused(app)

        return LogTail(client, authorize, Clock())  # type: ignore[arg-type]

    def test_json_answer(self) -> None:
        """A plain GET answers the lines as JSON with the next id."""
        client = FakeClient(([Line(7, 1.5, "web.1", "hi"), Line(8, 2.0, "web.1", "[epio] 3 lost", 3)], 9))
        req = DummyRequest([b""])
        req.args = {b"n": [b"2"], b"source": [b"web"]}
        body = fire(self.make(client).handle(req, "app"))
        doc = json.loads(body)
        self.assertEqual(doc, {"app": "app", "next": 9, "lines": [
            {"id": 7, "timestamp": 1.5, "source": "web.1", "text": "hi"},
            {"id": 8, "timestamp": 2.0, "source": "web.1", "text": "[epio] 3 lost", "lost": 3}]})
        self.assertEqual(client.queries[0][2], 2)
        self.assertEqual(client.queries[0][1].sources, frozenset({"web"}))

    def test_refused_before_reading(self) -> None:
        """The auth check's exception propagates (the api maps it to 404) and no
        logger is asked anything."""
        client = FakeClient(([], 1))
        req = DummyRequest([b""])
        result = fire(self.make(client, allowed=False).handle(req, "theirs"))
        self.assertTrue(result.check(Refused))
        self.assertEqual(client.queries, [])

    def test_bad_parameter_400(self) -> None:
        """A bad parameter is a 400 with the standard error body."""
        req = DummyRequest([b""])
        req.args = {b"grep": [b"(("]}
        body = fire(self.make(FakeClient(([], 1))).handle(req, "app"))
        self.assertEqual(req.responseCode, 400)
        self.assertEqual(json.loads(body)["error"]["code"], "invalid_parameter")

    def test_unavailable_503(self) -> None:
        """No logger answering is a 503, without internals."""
        req = DummyRequest([b""])
        body = fire(self.make(FakeClient(error=LogsUnavailable("tcp://10.0.0.1:7722 timeout"))).handle(req, "app"))
        self.assertEqual(req.responseCode, 503)
        self.assertNotIn(b"10.0.0.1", body)

    def test_websocket_upgrade_returns_resource(self) -> None:
        """With Upgrade: websocket the answer is a WebSocketResource for this app and filter."""
        from autobahn.twisted.resource import WebSocketResource

        req = DummyRequest([b""])
        req.requestHeaders.setRawHeaders(b"upgrade", [b"websocket"])
        req.args = {b"n": [b"0"], b"grep": [b"x"]}
        res = fire(self.make(FakeClient(([], 1))).handle(req, "app"))
        self.assertIsInstance(res, WebSocketResource)
        factory = res._factory
        self.assertIsInstance(factory, TailFactory)
        self.assertEqual((factory.app, factory.n, factory.filter.grep), ("app", 0, "x"))


class FakeFollowClient:
    def __init__(self) -> None:
        self.followers: list[Any] = []

    def follow(self, app: str, sink: Any, n: int, filt: LineFilter) -> Any:
        class F:
            stopped = False

            def stop(self) -> None:
                self.stopped = True

        f = F()
        self.followers.append((sink, f))
        return f


class ProtocolTests(SynchronousTestCase):
    def test_slow_socket_pauses_and_reports_missed(self) -> None:
        """Over a real protocol instance: when the transport pauses the producer
        lines queue (bounded), the overflow is counted, and after resumeProducing
        the client receives the queue then 'missed'. Closing stops the follower."""
        client = FakeFollowClient()
        missed: list[int] = []
        factory = TailFactory(client, "app", 0, LineFilter(), 3, missed.append)  # type: ignore[arg-type]
        proto = factory.buildProtocol(None)
        sent: list[dict] = []
        proto.sendMessage = lambda payload, isBinary=False: sent.append(json.loads(payload))
        proto.state = proto.STATE_OPEN
        transport = StringTransport()
        proto.transport = transport
        proto.onOpen()
        self.assertIs(transport.producer, proto)
        sink, follower = client.followers[0]
        sink.lines(lines(1, 3))
        self.assertEqual(len(sent), 1)
        proto.pauseProducing()
        sink.lines(lines(3, 10))
        self.assertEqual(len(sent), 1)
        self.assertEqual(sum(missed), 4)
        proto.resumeProducing()
        self.assertEqual([ln["id"] for ln in sent[1]["lines"]], [3, 4, 5])
        self.assertEqual(sent[-1], {"type": "missed", "count": 4})
        proto.onClose(True, 1000, None)
        self.assertTrue(follower.stopped)


class StatsClient:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def stats(self, app, metric, since, until, resolution) -> Deferred:
        self.calls.append((app, metric, since, until, resolution))
        return succeed({"resolution": 10, "series": {"requests": [[100, 5.0]]}})


class StatsHandleTests(SynchronousTestCase):
    def make(self, allowed: bool = True) -> tuple[LogTail, StatsClient]:
        client = StatsClient()

        async def authorize(request: Any, app: str) -> None:
            if not allowed:
                raise Refused(app)

        clock = Clock()
        clock.advance(10_000)
        return LogTail(client, authorize, clock), client  # type: ignore[arg-type]

    def test_stats_json(self) -> None:
        """GET stats passes metric, times and resolution through and answers the series."""
        tail, client = self.make()
        req = DummyRequest([b""])
        req.args = {b"metric": [b"requests"], b"since": [b"1h"], b"resolution": [b"10"]}
        doc = json.loads(fire(tail.handle_stats(req, "app")))
        self.assertEqual(doc, {"app": "app", "resolution": 10, "series": {"requests": [[100, 5.0]]}})
        self.assertEqual(client.calls, [("app", "requests", 10_000 - 3600, None, 10)])

    def test_stats_refused_and_bad(self) -> None:
        """Another user's app is refused before the logger is asked; a bad resolution is a 400."""
        tail, client = self.make(allowed=False)
        self.assertTrue(fire(tail.handle_stats(DummyRequest([b""]), "x")).check(Refused))
        self.assertEqual(client.calls, [])
        tail, client = self.make()
        req = DummyRequest([b""])
        req.args = {b"resolution": [b"7"]}
        fire(tail.handle_stats(req, "app"))
        self.assertEqual(req.responseCode, 400)


class RemoteErrorTests(SynchronousTestCase):
    def test_logger_refusal_is_400_other_errors_502(self) -> None:
        """A logger's invalid_parameter becomes a 400 with its message; any other
        logger error a 502 without details."""
        from epio.bus.errors import RemoteError

        async def authorize(request: Any, app: str) -> None:
            return None

        for err, status in [(RemoteError("invalid_parameter", "n must be between 0 and 10"), 400),
                            (RemoteError("internal", "boom at /srv/x.py"), 502)]:
            tail = LogTail(FakeClient(error=err), authorize, Clock())  # type: ignore[arg-type]
            req = DummyRequest([b""])
            body = fire(tail.handle(req, "app"))
            self.assertEqual(req.responseCode, status)
            self.assertNotIn(b"/srv/x.py", body)
