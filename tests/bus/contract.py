"""The bus services' behaviour as one contract, run twice: on the in-memory bus
(tests/bus/test_services.py: fake clock, what other components' unit tests use)
and on the real bus (tests/integration/bus/test_contract.py: real ZeroMQ sockets
on 127.0.0.1).  If the fake drifts from the real thing, one of the two fails."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, task
from zope.interface.verify import verifyObject

from epio.bus import Bus, NotRunning, RemoteError, RequestTimeout
from epio.pipeline import BusLogSink, ILogSink, IStatsSink

SECRET = b"contract-secret-0123456789"


class ContractMixin:
    timeout = 20

    # provided by the concrete classes
    clock: Any

    def make_bus(self, sender: str, **settings: Any) -> Bus:
        raise NotImplementedError

    async def settle(self, cond: Any = lambda: False, limit: float = 5.0) -> None:
        """Let deliveries happen until ``cond()`` holds (or a bound passes)."""
        raise NotImplementedError

    async def elapse(self, seconds: float) -> None:
        raise NotImplementedError

    def start(self, svc: Any) -> Any:
        svc.startService()
        self.addCleanup(lambda: svc.stopService() if svc.running else None)
        return svc

    def deferred(self, coro: Any) -> defer.Deferred[Any]:
        return defer.ensureDeferred(coro)

    # -- request / reply ----------------------------------------------------------

    def echo_router(self, bus: Bus) -> Any:
        clock = self.clock

        async def handler(env: Any) -> tuple[str, dict]:
            if env.body.get("sleep"):
                await task.deferLater(clock, env.body["sleep"])
            if env.body.get("fail") == "remote":
                raise RemoteError("nope", "refused on purpose")
            if env.body.get("fail") == "crash":
                raise ZeroDivisionError("internal detail")
            if env.body.get("fail") == "badreply":
                return "no.such.reply", {}
            return "test.echoed", {"n": env.body["n"] * 2}

        return self.start(bus.router("tcp://127.0.0.1:0", handler))

    async def test_request_reply(self) -> None:
        """A request gets its handler's reply; ping is answered without the handler."""
        server, client = self.make_bus("server"), self.make_bus("client")
        router = self.echo_router(server)
        dealer = self.start(client.dealer([router.endpoint]))
        d = self.deferred(dealer.request("test.echo", {"n": 21}))
        await self.settle(lambda: d.called)
        reply = await d
        self.assertEqual((reply.type, reply.body, reply.sender), ("test.echoed", {"n": 42}, "server"))
        d = self.deferred(dealer.request("bus.ping", {"payload": [1, 2]}))
        await self.settle(lambda: d.called)
        self.assertEqual((await d).body, {"node": "server", "payload": [1, 2]})
        self.assertEqual(router.counters["received"], 2)

    async def test_handler_errors_become_error_replies(self) -> None:
        """RemoteError keeps its code and message; a crash or a bad reply type becomes
        code internal with no internals; the failure is logged and counted."""
        server, client = self.make_bus("server"), self.make_bus("client")
        router = self.echo_router(server)
        dealer = self.start(client.dealer([router.endpoint]))
        for fail, code in (("remote", "nope"), ("crash", "internal"), ("badreply", "internal")):
            d = self.deferred(dealer.request("test.echo", {"n": 1, "fail": fail}))
            await self.settle(lambda d=d: d.called)
            e = await self.assertFailure(d, RemoteError)
            self.assertEqual(e.code, code)
            self.assertNotIn("internal detail", e.message)
        self.assertEqual(router.counters["error_replies"], 3)
        self.assertEqual(router.counters["handler_errors"], 2)
        self.flushLoggedErrors(ZeroDivisionError)

    async def test_timeout_then_late_reply(self) -> None:
        """No reply within the timeout raises RequestTimeout naming type and endpoint;
        the reply arriving later is dropped and counted as late."""
        server, client = self.make_bus("server"), self.make_bus("client")
        router = self.echo_router(server)
        dealer = self.start(client.dealer([router.endpoint]))
        d = self.deferred(dealer.request("test.echo", {"n": 1, "sleep": 0.5}, timeout=0.2))
        await self.elapse(0.3)
        await self.settle(lambda: d.called)
        e = await self.assertFailure(d, RequestTimeout)
        self.assertIn("test.echo", str(e))
        self.assertIn(router.endpoint, str(e))
        await self.elapse(0.4)
        await self.settle(lambda: dealer.counters["late_replies"] == 1)
        self.assertEqual(dealer.counters["late_replies"], 1)
        self.assertEqual(dealer.counters["timeouts"], 1)

    async def test_no_peer_times_out(self) -> None:
        """With no peer listening a request fails after its timeout, saying so."""
        client = self.make_bus("client")
        dealer = self.start(client.dealer(["tcp://127.0.0.1:9"]))
        d = self.deferred(dealer.request("bus.ping", {}, timeout=0.3))
        await self.elapse(0.4)
        await self.settle(lambda: d.called)
        e = await self.assertFailure(d, RequestTimeout)
        self.assertIn("no connection", str(e))

    async def test_waits_for_a_late_peer(self) -> None:
        """A request made before its peer is up is delivered when the peer comes, even
        after longer than the skew window (it is stamped when sent, not when made)."""
        from tests.util import free_port

        server = self.make_bus("server", max_skew=1.0)
        client = self.make_bus("client", max_skew=1.0)
        endpoint = f"tcp://127.0.0.1:{free_port()}"
        dealer = self.start(client.dealer([endpoint]))
        d = self.deferred(dealer.request("test.echo", {"n": 4}, timeout=10))
        await self.elapse(1.5)
        self.assertFalse(d.called)
        self.start(server.router(endpoint, lambda env: ("test.echoed", {"n": env.body["n"]})))
        await self.elapse(0.1)
        await self.settle(lambda: d.called)
        self.assertEqual((await d).body, {"n": 4})

    async def test_not_running(self) -> None:
        """A request on a stopped dealer fails with NotRunning; stopping fails the
        requests still waiting (stopService never leaves a caller hanging)."""
        server, client = self.make_bus("server"), self.make_bus("client")
        router = self.echo_router(server)
        dealer = client.dealer([router.endpoint])
        await self.assertFailure(self.deferred(dealer.request("bus.ping", {})), NotRunning)
        self.start(dealer)
        d = self.deferred(dealer.request("test.echo", {"n": 1, "sleep": 5}))
        await self.elapse(0.05)
        dealer.stopService()
        await self.assertFailure(d, NotRunning)

    async def test_request_to_and_rotation(self) -> None:
        """request_to reaches the named peer; request spreads over connected peers."""
        a, b, client = self.make_bus("a"), self.make_bus("b"), self.make_bus("client")
        ra, rb = self.echo_router(a), self.echo_router(b)
        dealer = self.start(client.dealer([ra.endpoint]))
        for target, name in ((rb.endpoint, "b"), (ra.endpoint, "a")):
            d = self.deferred(dealer.request_to(target, "bus.ping", {}))
            await self.settle(lambda d=d: d.called)
            self.assertEqual((await d).sender, name)
        self.assertEqual(dealer.endpoints, [ra.endpoint, rb.endpoint])
        senders = set()
        for _ in range(6):
            d = self.deferred(dealer.request("bus.ping", {}))
            await self.settle(lambda d=d: d.called)
            senders.add((await d).sender)
        self.assertEqual(senders, {"a", "b"})

    async def test_empty_dealer(self) -> None:
        """A dealer may start with no peers: request_to adds one; request with none
        fails after its timeout saying there is no endpoint."""
        server, client = self.make_bus("server"), self.make_bus("client")
        router = self.echo_router(server)
        dealer = self.start(client.dealer([]))
        d = self.deferred(dealer.request("bus.ping", {}, timeout=0.1))
        await self.elapse(0.2)
        await self.settle(lambda: d.called)
        e = await self.assertFailure(d, RequestTimeout)
        self.assertIn("(no endpoints)", str(e))
        d = self.deferred(dealer.request_to(router.endpoint, "bus.ping", {}))
        await self.settle(lambda: d.called)
        self.assertEqual((await d).sender, "server")
        dealer.remove_endpoint(router.endpoint)
        self.assertEqual(dealer.endpoints, [])

    async def test_bad_outgoing_refused(self) -> None:
        """Sending an undeclared type or a body missing a field is a caller bug
        (ValueError), caught before anything goes on the wire."""
        client = self.make_bus("client")
        dealer = self.start(client.dealer(["tcp://127.0.0.1:9"]))
        push = self.start(client.push(["tcp://127.0.0.1:9"]))
        with self.assertRaises(ValueError):
            await dealer.request("no.such", {})
        self.assertRaises(ValueError, push.send, "test.job", {"n": "x"})
        self.assertRaises(ValueError, push.send, "test.echo", {"n": 1})

    # -- push / pull ------------------------------------------------------------------

    async def test_push_pull(self) -> None:
        """Pushed messages reach the PULL handler once each, in order; a handler that
        raises is counted and logged and the next message is still handled."""
        server, client = self.make_bus("server"), self.make_bus("client")
        got: list[int] = []

        def handler(env: Any) -> None:
            if env.body["n"] == 3:
                raise ZeroDivisionError("bug")
            got.append(env.body["n"])

        pull = self.start(server.pull("tcp://127.0.0.1:0", handler))
        push = self.start(client.push([pull.endpoint]))
        for n in range(10):
            self.assertTrue(push.send("test.job", {"n": n}))
        await self.settle(lambda: len(got) == 9)
        self.assertEqual(got, [0, 1, 2, 4, 5, 6, 7, 8, 9])
        self.assertEqual(pull.counters["handler_errors"], 1)
        self.assertEqual(push.counters["sent"], 10)
        self.flushLoggedErrors(ZeroDivisionError)

    async def test_send_when_stopped(self) -> None:
        """send/publish on a stopped service returns False and counts, never raises."""
        client = self.make_bus("client")
        push = client.push(["tcp://127.0.0.1:9"])
        pub = client.publisher(bind="tcp://127.0.0.1:0")
        self.assertFalse(push.send("test.job", {"n": 1}))
        self.assertFalse(pub.publish("test.event", {"n": 1}, topic=b"x"))
        self.assertEqual(client.counters["dropped.not_running"], 2)

    # -- pub / sub ----------------------------------------------------------------------

    async def test_pub_sub(self) -> None:
        """Subscribers get what matches their topic prefixes, with the topic; an async
        handler works; the topic must be bytes."""
        server, client = self.make_bus("server"), self.make_bus("client")
        pub = self.start(server.publisher(bind="tcp://127.0.0.1:0"))
        got: list[tuple[bytes, int]] = []

        async def handler(topic: bytes, env: Any) -> None:
            got.append((topic, env.body["n"]))

        self.start(client.subscriber([pub.endpoint], [b"a.", b"c"], handler))
        # slow joiner on real ZeroMQ: publish a probe until it arrives
        for _ in range(100):
            pub.publish("test.event", {"n": -1}, topic=b"a.probe")
            await self.settle(lambda: bool(got), limit=0.05)
            if got:
                break
        got.clear()
        for n, topic in enumerate([b"a.1", b"b.1", b"c", b"cx", b"a"]):
            pub.publish("test.event", {"n": n}, topic=topic)
        await self.settle(lambda: len([g for g in got if g[1] >= 0]) == 3)
        self.assertEqual([g for g in got if g[1] >= 0], [(b"a.1", 0), (b"c", 2), (b"cx", 3)])
        self.assertRaises(TypeError, pub.publish, "test.event", {"n": 1}, topic="a.str")

    async def test_subscriber_binds_publishers_connect(self) -> None:
        """The reverse wiring (many publishers connect to one bound subscriber, as
        runners send heartbeats to a nexus) works too."""
        server, c1, c2 = self.make_bus("nexus"), self.make_bus("r1"), self.make_bus("r2")
        got: list[str] = []
        sub = self.start(server.subscriber([], [b""], lambda t, e: got.append(e.sender),
                                           bind="tcp://127.0.0.1:0"))
        pubs = [self.start(c.publisher(connect=[sub.endpoint])) for c in (c1, c2)]
        for _ in range(100):
            for p in pubs:
                p.publish("test.event", {"n": 1}, topic=b"hb")
            await self.settle(lambda: {"r1", "r2"} <= set(got), limit=0.05)
            if {"r1", "r2"} <= set(got):
                break
        self.assertEqual({"r1", "r2"}, set(got))

    async def test_publisher_follows_a_changing_list(self) -> None:
        """A publisher made with no peer (a node following the cluster's nexus list)
        reaches a subscriber once set_connects names it, another one added later, and
        none it was told to drop (epio.cluster)."""
        server, client = self.make_bus("server"), self.make_bus("runner")
        got: dict[str, list[int]] = {"a": [], "b": []}
        subs = {k: self.start(server.subscriber(
            [], [b""], lambda t, e, k=k: got[k].append(e.body["n"]), bind="tcp://127.0.0.1:0"))
            for k in "ab"}
        pub = self.start(client.publisher(may_start_empty=True))
        self.assertTrue(pub.publish("test.event", {"n": 0}, topic=b"hb"))  # nobody: dropped

        async def reaches(*keys: str) -> None:
            for n in range(1, 101):
                pub.publish("test.event", {"n": n}, topic=b"hb")
                await self.settle(lambda: all(got[k] for k in keys), limit=0.05)
                if all(got[k] for k in keys):
                    return

        pub.set_connects([subs["a"].endpoint])
        await reaches("a")
        self.assertTrue(got["a"])
        pub.set_connects([subs["a"].endpoint, subs["b"].endpoint])
        await reaches("a", "b")
        self.assertTrue(got["b"])
        pub.set_connects([subs["b"].endpoint])
        await self.settle(limit=0.2)
        got["a"].clear()
        got["b"].clear()
        await reaches("b")
        for n in range(20):
            pub.publish("test.event", {"n": 1000 + n}, topic=b"hb")
        await self.settle(lambda: 1019 in got["b"], limit=2.0)
        self.assertIn(1019, got["b"])
        self.assertEqual(got["a"], [])


class BusLogSinkContract:
    """BusLogSink against PULL services of the bus under test (two loggers)."""

    timeout = 10

    def make_bus(self, **settings: Any) -> Bus:
        raise NotImplementedError

    async def wait_for(self, cond: Any) -> None:
        raise NotImplementedError

    def setup_loggers(self, **settings: Any) -> tuple[Bus, dict[str, list]]:
        bus = self.make_bus(**settings)
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

    async def test_sink_follows_a_changing_logger_list(self) -> None:
        """A sink made with no logger writes to the node's log; set_endpoints makes it
        push to the loggers named, and no longer to one dropped (epio.cluster)."""
        bus, got = self.setup_loggers()
        sink = BusLogSink(bus, [])
        sink.startService()
        self.addCleanup(sink.stopService)
        sink.emit("app1", "web.1", "local only")
        sink.set_endpoints(["inproc://logger-a", "inproc://logger-b"])
        self.assertEqual(len(sink.pushes), 2)
        sink.emit("app1", "web.1", "to both")
        await self.wait_for(lambda: all(self.lines_of(got[k]) for k in "ab"))
        sink.set_endpoints(["inproc://logger-b"])
        self.assertEqual(len(sink.pushes), 1)
        sink.emit("app1", "web.1", "to b only")
        await self.wait_for(lambda: len(self.lines_of(got["b"])) == 2)
        self.assertEqual([b["text"] for b in self.lines_of(got["a"])], ["to both"])
        self.assertEqual([b["text"] for b in self.lines_of(got["b"])],
                         ["to both", "to b only"])

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
