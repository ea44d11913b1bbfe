"""The route feed process's protocol: a RouteFeed's publisher and a router's source.

Both ends run here on the real reactor over a real Unix socket; the RouteFeed
itself runs on a ``Clock`` and is fed nexus messages by hand, so nexus silence
happens exactly when a test says so.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import struct
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock, deferLater
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from epio.config import load_config
from epio.lb import feed as feed_module
from epio.lb.feed import (
    FRAME_ROUTES,
    FeedProcessSource,
    FeedPublisher,
    feed_socket_path,
    private_dir_problem,
)
from epio.routefeed import InvalidTransition, NexusLink, RouteFeed, Snapshot, Table, TableSink
from epio.routing import IRouteSource, Route, RouteTable


def wire(app: str, *ports: int) -> dict[str, Any]:
    """A nexus wire route of ``app`` with backends on 127.0.0.1:``ports``."""
    return {"app": app, "hostnames": [f"{app}.example.com"], "maintenance": False,
            "options": {}, "backends": [
                {"instance_id": f"{app}-{p}", "host": "127.0.0.1", "port": p, "release": 1,
                 "state": "healthy"} for p in ports]}


async def wait_until(pred: Any, timeout: float = 5.0, what: str = "condition") -> None:
    deadline = reactor.seconds() + timeout
    while not pred():
        if reactor.seconds() > deadline:
            raise AssertionError(f"{what} not met in {timeout}s")
        await deferLater(reactor, 0.005, lambda: None)


def ports(table: RouteTable, app: str) -> list[int]:
    route = table.get(app)
    return sorted(b.port for b in route.backends) if route is not None else []


class FeedProtocolTests(TestCase):
    def setUp(self) -> None:
        d = Path(self.mktemp())
        d.mkdir(parents=True)
        self.path = d / "feed.sock"
        self.clock = Clock()
        self.link = NexusLink("nexus[0]", "tcp://r:1", "tcp://p:1")
        self.requests = 0
        self.hold: Deferred[Any] | None = None
        self.routes = [wire("hello", 8001), wire("other", 8002)]
        self.feed = RouteFeed(self.clock, [self.link], self.request, feed_timeout=2.0)
        self.publisher = FeedPublisher(self.feed)
        self.port = reactor.listenUNIX(str(self.path), self.publisher, mode=0o600)
        self.addCleanup(self.close_port)
        self.logged: list[str] = []

        def observer(event: dict[str, Any]) -> None:
            self.logged.append(formatEvent(event))
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def close_port(self) -> Any:
        for conn in list(self.publisher.routers):
            conn.transport.loseConnection()
        return self.port.stopListening() if self.port is not None else None

    def request(self, link: NexusLink) -> Deferred[Any]:
        self.requests += 1
        body = {"nexus_id": "A", "version": 1, "routes": self.routes}
        if self.hold is not None:
            d, self.hold = self.hold, None
            d.addCallback(lambda _: body)
            return d
        return succeed(body)

    def delta(self, version: int, *changes: dict[str, Any]) -> None:
        self.feed.on_message(self.link, "nexus.delta", {
            "nexus_id": "A", "version": version, "prev_version": version - 1,
            "changes": list(changes)})

    def router(self, table: RouteTable | None = None) -> tuple[FeedProcessSource, RouteTable]:
        table = table if table is not None else RouteTable("localhost", clock=reactor)
        source = FeedProcessSource(reactor, self.path, 1, retry=0.05)
        source.start(table)
        self.addCleanup(source.stop)
        return source, table

    async def test_snapshot_then_merged_changes(self) -> None:
        """A router connecting to a live feed gets its table, then every merged change."""
        self.feed.start(self.publisher)
        source, table = self.router()
        verifyObject(IRouteSource, source)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        await wait_until(lambda: len(table) == 2, what="snapshot applied")
        self.assertEqual(ports(table, "hello"), [8001])
        await wait_until(lambda: source.status().get("state") == "live", what="live status")
        status = source.status()
        self.assertTrue(status["process"]["connected"])
        self.assertEqual(status["alive"], 1)
        self.assertEqual(status["nexuses"][0]["version"], 1)

        hello = table.get("hello")
        self.delta(2, {"op": "set", "app": "hello", "route": wire("hello", 8001, 8003)},
                   {"op": "remove", "app": "other"})
        await wait_until(lambda: table.get("other") is None, what="delta applied")
        self.assertEqual(ports(table, "hello"), [8001, 8003])
        # the backend that did not change is the same object: its pool and state stay
        assert hello is not None
        self.assertIn(hello.backends[0], table.get("hello").backends)  # type: ignore[union-attr]
        self.assertEqual(source.counters["deltas"], 1)

    async def test_changes_in_churn_leave_together(self) -> None:
        """With lb.feed_interval, the first change goes at once and the ones that follow
        within the interval leave in one frame, the latest route of each app."""
        pclock = Clock()
        pclock.advance(100)
        self.publisher.clock, self.publisher.interval = pclock, 0.02
        self.feed.start(self.publisher)
        source, table = self.router()
        await wait_until(lambda: len(table) == 2, what="snapshot")
        pclock.advance(0.05)  # quiet since the feed's first table
        self.delta(2, {"op": "set", "app": "hello", "route": wire("hello", 8005)})
        await wait_until(lambda: ports(table, "hello") == [8005], what="first change at once")
        self.delta(3, {"op": "set", "app": "hello", "route": wire("hello", 8006)})
        self.delta(4, {"op": "set", "app": "hello", "route": wire("hello", 8007)},
                   {"op": "set", "app": "third", "route": wire("third", 8008)})
        self.delta(5, {"op": "remove", "app": "other"})
        await deferLater(reactor, 0.05, lambda: None)
        self.assertEqual((ports(table, "hello"), source.counters["deltas"]), ([8005], 1))
        pclock.advance(0.02)
        await wait_until(lambda: source.counters["deltas"] == 2, what="the batch")
        self.assertEqual(ports(table, "hello"), [8007])
        self.assertEqual(ports(table, "third"), [8008])
        self.assertIsNone(table.get("other"))
        # quiet for an interval: the next change goes at once again
        pclock.advance(0.05)
        self.delta(6, {"op": "remove", "app": "third"})
        await wait_until(lambda: table.get("third") is None, what="a lone change at once")
        self.assertEqual(source.counters["deltas"], 3)
        # a clock set back never holds a change longer than one interval
        pclock.advance(-10)
        self.delta(7, {"op": "remove", "app": "hello"})
        await wait_until(lambda: table.get("hello") is None, what="after the clock jump")

    async def test_a_big_table_arrives_in_slices_and_swaps_once(self) -> None:
        """A table of many routes comes in frames of FRAME_ROUTES and is built one route
        per reactor turn (budget 0 here), the old table serving until one swap."""
        self.patch(feed_module, "APPLY_BUDGET", 0.0)
        self.routes = [wire(f"app{i}", 9000 + i) for i in range(3 * FRAME_ROUTES + 1)]
        self.feed.start(self.publisher)
        table = RouteTable("localhost", [Route(app="old", hostnames=["old.example.com"],
                                               backends=[])], clock=reactor)
        version = table.version
        source, _ = self.router(table)
        turns: list[int] = []
        work = source._work

        def counted() -> None:
            turns.append(len(table))
            work()
        source._work = counted  # type: ignore[method-assign]
        await wait_until(lambda: source.has_table, what="the table")
        self.assertEqual(len(table), len(self.routes))
        self.assertEqual(table.version, version + 1)  # one swap
        self.assertGreater(len(turns), len(self.routes))  # one route per turn at most
        self.assertEqual(set(turns[:-1]), {1})  # the old table served until the swap
        self.assertEqual(source.counters["snapshots"], 1)

        # a change of more routes than a frame holds: several frames, all applied
        changes = [{"op": "set", "app": f"app{i}", "route": wire(f"app{i}", 7000 + i)}
                   for i in range(2 * FRAME_ROUTES + 3)]
        self.delta(2, *changes, {"op": "remove", "app": "app30"})
        await wait_until(lambda: ports(table, f"app{2 * FRAME_ROUTES + 2}") == [
            7000 + 2 * FRAME_ROUTES + 2], what="the last route of the change")
        self.assertEqual(ports(table, "app0"), [7000])
        self.assertIsNone(table.get("app30"))
        self.assertEqual(source.counters["deltas"], 3)

    async def test_no_empty_table_before_the_feed_is_live(self) -> None:
        """A router that connects to a feed without a table keeps its own until there is one."""
        self.hold = Deferred()
        held = self.hold
        self.feed.start(self.publisher)
        table = RouteTable("localhost", [Route(app="old", hostnames=["old.example.com"],
                                               backends=[])], clock=reactor)
        source, _ = self.router(table)
        await wait_until(lambda: source.status()["process"]["connected"], what="connected")
        await wait_until(lambda: source.feed_status is not None, what="first status")
        self.assertEqual(source.status()["state"], "starting")
        await deferLater(reactor, 0.1, lambda: None)
        self.assertEqual([r.app for r in table.routes()], ["old"])
        held.callback(None)
        await wait_until(lambda: table.get("old") is None, what="snapshot replaced the table")
        self.assertEqual(sorted(r.app for r in table.routes()), ["hello", "other"])

    async def test_nexus_silence_reaches_the_router_at_once(self) -> None:
        """A nexus leaving the merge is in the router's status without waiting for a tick."""
        self.feed.start(self.publisher)
        source, table = self.router()
        await wait_until(lambda: source.status().get("state") == "live", what="live")
        self.hold = Deferred()  # and does not answer the snapshot request that follows
        self.clock.advance(2.0)  # the only nexus is silent: stale
        await wait_until(lambda: source.status().get("state") == "stale", timeout=0.5,
                         what="stale status")
        self.assertTrue(source.status()["stale"])
        self.assertEqual(len(table), 2)  # the last table, kept

    async def test_feed_gone_keeps_the_table_and_reconnects(self) -> None:
        """Without its feed process a router serves its last table, says it is stale,
        and takes the new feed's snapshot when it is back."""
        self.feed.start(self.publisher)
        source, table = self.router()
        await wait_until(lambda: source.status().get("state") == "live", what="live")
        await self.close_port()
        self.port = None
        await wait_until(lambda: not source.status()["process"]["connected"], what="lost")
        status = source.status()
        self.assertEqual((status["state"], status["stale"], status["alive"]),
                         ("stale", True, 0))
        self.assertIsNotNone(status["since"])
        self.assertEqual(status["routes"], 2)
        self.assertEqual(len(table), 2)
        self.assertTrue(any("route feed process connection lost" in m for m in self.logged))

        # a new feed process (a new RouteFeed) with a changed table
        self.routes = [wire("hello", 9001)]
        feed = RouteFeed(self.clock, [NexusLink("nexus[0]", "tcp://r:1", "tcp://p:1")],
                         self.request)
        self.publisher = FeedPublisher(feed)
        feed.start(self.publisher)
        self.port = reactor.listenUNIX(str(self.path), self.publisher, mode=0o600)
        await wait_until(lambda: ports(table, "hello") == [9001], what="new snapshot")
        self.assertIsNone(table.get("other"))
        self.assertEqual(source.status()["state"], "live")
        self.assertTrue(any("route feed process is back" in m for m in self.logged))

    async def test_a_restarted_feed_without_a_table_is_still_stale(self) -> None:
        """Connected again to a feed that has no table yet, the router still says its own
        (last) table is stale, until the new feed's table comes."""
        self.feed.start(self.publisher)
        source, table = self.router()
        await wait_until(lambda: source.status().get("state") == "live", what="live")
        await self.close_port()
        self.hold = Deferred()
        held = self.hold
        feed = RouteFeed(self.clock, [NexusLink("nexus[0]", "tcp://r:1", "tcp://p:1")],
                         self.request)
        self.publisher = FeedPublisher(feed)
        feed.start(self.publisher)
        self.port = reactor.listenUNIX(str(self.path), self.publisher, mode=0o600)
        await wait_until(lambda: source.counters["connects"] == 2
                         and source.feed_status is not None
                         and source.feed_status.get("state") == "starting", what="reconnected")
        status = source.status()
        self.assertEqual((status["state"], status["stale"], status["routes"]), ("stale", True, 2))
        self.assertTrue(status["process"]["connected"])
        held.callback(None)
        await wait_until(lambda: source.status()["state"] == "live", what="live again")

    async def test_a_bad_frame_starts_over(self) -> None:
        """A frame the router cannot use: logged, the table untouched, a fresh snapshot."""
        self.feed.start(self.publisher)
        source, table = self.router()
        await wait_until(lambda: len(table) == 2, what="snapshot")
        self.publisher.routers[0].sendString(b'{"upsert": 1, "remove": []}')
        await wait_until(lambda: source.counters["connects"] == 2
                         and source.status()["process"]["connected"], what="reconnect")
        self.assertEqual(source.counters["bad_frames"], 1)
        self.assertEqual(len(table), 2)
        await wait_until(lambda: source.counters["snapshots"] == 2, what="second snapshot")
        self.flushLoggedErrors()

    async def test_reload_refreshes_every_nexus(self) -> None:
        """SIGHUP on a router: its feed asks every nexus for a snapshot again."""
        self.feed.start(self.publisher)
        source, table = self.router()
        await wait_until(lambda: len(table) == 2, what="snapshot")
        before = self.requests
        source.reload()
        await wait_until(lambda: self.requests == before + 1, what="snapshot request")

    async def test_oversized_request_is_refused(self) -> None:
        """Routers only ever send a few bytes; a big frame closes that connection."""
        self.feed.start(self.publisher)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        self.addCleanup(s.close)
        s.connect(str(self.path))
        await wait_until(lambda: len(self.publisher.routers) == 1, what="joined")
        s.send(struct.pack("!I", 5000) + b"x" * 5000)
        await wait_until(lambda: not self.publisher.routers, what="closed")
        self.assertTrue(any("5000-byte request" in m for m in self.logged))
        frames = b""
        while True:  # it had been sent the feed's status and table, nothing else
            try:
                chunk = s.recv(65536)
            except BlockingIOError:
                await deferLater(reactor, 0.01, lambda: None)
                continue
            if not chunk:
                break
            frames += chunk
        kinds = []
        while frames:
            (length,) = struct.unpack("!I", frames[:4])
            kinds.append(sorted(json.loads(frames[4:4 + length])))
            frames = frames[4 + length:]
        self.assertEqual(kinds, [["status"], ["more", "snapshot"]])


class RoutesWaitTests(TestCase):
    """A fed router listens once it has a table, or after lb.routes_wait without one."""

    def service(self, wait: float) -> Any:
        from epio.lb.service import LBService

        d = Path(self.mktemp())
        d.mkdir(parents=True)
        source = FeedProcessSource(reactor, d / "feed.sock", 1, retry=0.05)  # no feed there
        settings = load_config(None, {"lb": {"listen": "tcp:0:interface=127.0.0.1",
                                             "routes_wait": wait, "access_log": "off"}})
        svc = LBService(reactor, settings.settings.lb, "localhost", source)
        return svc

    async def test_listens_without_a_table_after_the_wait(self) -> None:
        logged: list[str] = []

        def observer(event: dict[str, Any]) -> None:
            logged.append(formatEvent(event))
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        svc = self.service(0.3)
        started = reactor.seconds()
        svc.startService()
        self.addCleanup(svc.stopService)
        await deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(svc.ports, [])  # still waiting for routes
        ports = await svc.whenReady()
        self.assertGreaterEqual(reactor.seconds() - started, 0.3)
        self.assertEqual(len(ports), 1)
        self.assertTrue(any("no route table after 0.3s (lb.routes_wait)" in m for m in logged))

    async def test_stopped_while_waiting_never_listens(self) -> None:
        svc = self.service(30.0)
        svc.startService()
        await deferLater(reactor, 0.05, lambda: None)
        await svc.stopService()
        ports = await svc.whenReady()
        self.assertEqual(ports, [])


class SocketPathTests(SynchronousTestCase):
    def test_the_feed_listens_only_in_a_private_directory(self) -> None:
        """A directory that is a link, open to others or missing is refused."""
        d = Path(self.mktemp())
        d.mkdir(mode=0o700)
        self.assertEqual(private_dir_problem(d), "")
        os.chmod(d, 0o755)
        self.assertEqual(private_dir_problem(d), "mode 755, not 0700")
        os.chmod(d, 0o700)
        link = Path(self.mktemp())
        link.symlink_to(d)
        self.assertEqual(private_dir_problem(link), "not a directory")
        self.assertTrue(private_dir_problem(d / "missing"))

    def test_in_the_data_dir(self) -> None:
        """The socket lives in <data_dir>/run, a directory only the node's user enters."""
        data = Path(self.mktemp())
        path = feed_socket_path(data)
        self.assertEqual(path, data / "run" / "lb-feed.sock")
        self.assertEqual(stat.S_IMODE(os.stat(data / "run").st_mode), 0o700)

    def test_too_long_for_a_unix_socket(self) -> None:
        """A data dir too deep for sun_path: a private directory of its own instead."""
        data = Path(self.mktemp()).absolute() / ("d" * 120)
        path = feed_socket_path(data)
        self.addCleanup(os.rmdir, path.parent)
        self.assertLessEqual(len(os.fsencode(path)), 100)
        self.assertEqual(stat.S_IMODE(os.stat(path.parent).st_mode), 0o700)


class NexusLinkStateTests(SynchronousTestCase):
    """A link's table and snapshot request move only along the drawn transitions."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.link = NexusLink("nexus[0]", "tcp://r:1", "tcp://p:1")
        self.asked: list[Deferred[Any]] = []
        self.feed = RouteFeed(self.clock, [self.link], self.request, feed_timeout=2.0,
                              snapshot_retry=0.5)

    def request(self, link: NexusLink) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.asked.append(d)
        return d

    def test_invalid_transitions_raise(self) -> None:
        """A move the machines do not have is a bug, and says so."""
        link = NexusLink("nexus[0]", "tcp://r:1", "tcp://p:1")
        with self.assertRaises(InvalidTransition):
            link.to_snapshot(Snapshot.ASKING_AGAIN)  # nothing on its way to ask again
        with self.assertRaises(InvalidTransition):
            link.to_snapshot(Snapshot.RETRY)  # nothing failed
        link.to_snapshot(Snapshot.ASKING)
        link.to_snapshot(Snapshot.RETRY)
        with self.assertRaises(InvalidTransition):
            link.to_snapshot(Snapshot.ASKING_AGAIN)
        link.to_table(Table.LIVE)
        link.to_table(Table.NONE)
        self.assertEqual((link.table, link.snapshot), (Table.NONE, Snapshot.RETRY))

    def test_ask_again_answer_fail_retry_silence(self) -> None:
        """Asked while asking: one more request once the answer came; a failure waits
        snapshot_retry; an answer makes the table LIVE; silence makes it NONE and asks."""
        self.feed.start(TableSink(RouteTable("localhost")))
        link = self.link
        self.assertEqual((link.snapshot, len(self.asked)), (Snapshot.ASKING, 1))
        self.feed.refresh()  # SIGHUP while the first is on its way
        self.assertEqual((link.snapshot, len(self.asked)), (Snapshot.ASKING_AGAIN, 1))
        self.asked[0].callback({"nexus_id": "n1", "version": 3, "routes": []})
        self.assertEqual((link.table, link.version), (Table.LIVE, 3))
        self.assertEqual((link.snapshot, len(self.asked)), (Snapshot.ASKING, 2))
        self.asked[1].errback(ValueError("no answer"))
        self.assertEqual(link.snapshot, Snapshot.RETRY)
        self.clock.advance(0.5)
        self.assertEqual((link.snapshot, len(self.asked)), (Snapshot.ASKING, 3))
        self.asked[2].callback({"nexus_id": "n1", "version": 4, "routes": []})
        self.assertEqual((link.table, link.snapshot), (Table.LIVE, Snapshot.IDLE))
        self.clock.advance(2.0)  # silent for feed_timeout
        self.assertEqual((link.table, link.version), (Table.NONE, None))
        self.assertEqual((link.snapshot, len(self.asked)), (Snapshot.ASKING, 4))
        self.feed.stop()
        self.asked[3].errback(ValueError("stopped"))
        self.assertEqual(link.snapshot, Snapshot.IDLE)
