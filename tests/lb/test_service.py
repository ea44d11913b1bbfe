"""The lb role's process machinery: child processes restarted with ProcessMonitor's
backoff, listen addresses parsed by Twisted's endpoint parser, and the process-wide
SIGHUP handler and GC tuning owned by :class:`RouterProcess`, not by the router."""

from __future__ import annotations

import gc
import os
import signal
import socket
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.logger import formatEvent, globalLogPublisher
from twisted.runner.test.test_procmon import DummyProcessReactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from epio.config import load_config
from epio.lb.service import (
    FEED,
    GC_THRESHOLDS,
    ChildMonitor,
    LBService,
    RouterProcess,
    reuseport_address,
    route_feed_mode,
)
from epio.routing import Backend, Route, StaticRouteSource


class ChildMonitorTests(SynchronousTestCase):
    """Children die and come back: at once after a long life, later and later after
    dying young; stopping waits for every child."""

    def setUp(self) -> None:
        self.reactor = DummyProcessReactor()
        self.monitor = ChildMonitor(self.reactor, 40)
        self.logged: list[str] = []

        def observer(event: dict[str, Any]) -> None:
            self.logged.append(formatEvent(event))
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def die(self, index: int) -> None:
        self.reactor.spawnedProcesses[index].processEnded(1)

    def test_a_child_dying_young_is_restarted_later_and_later(self) -> None:
        """A worker that dies at once is restarted after 1 s, then 2 s, then 4 s."""
        self.monitor.add("worker 1", "epio.lb.worker", "EPIO_LB_WORKER_SPEC", "{}")
        self.monitor.startService()
        self.assertEqual(len(self.reactor.spawnedProcesses), 1)
        args = self.reactor.spawnedProcesses[0]._args
        self.assertEqual(args[1:], ["-m", "epio.lb.worker"])
        env = self.reactor.spawnedProcesses[0]._environment
        self.assertEqual((env["EPIO_LB_WORKER_SPEC"], env["EPIO_LB_PARENT"]),
                         ("{}", str(os.getpid())))
        for n, delay in enumerate((1.0, 2.0, 4.0)):
            self.die(n)
            self.assertIn(f"router worker 1 exited; restarting it in {delay:g}s", self.logged)
            self.reactor.advance(delay - 0.01)
            self.assertEqual(len(self.reactor.spawnedProcesses), n + 1)
            self.reactor.advance(0.01)
            self.assertEqual(len(self.reactor.spawnedProcesses), n + 2)

    def test_a_long_lived_child_is_restarted_at_once(self) -> None:
        """The route feed process, dead after a long life, comes back at once."""
        self.monitor.add(FEED, "epio.lb.feed", "EPIO_LB_FEED_SPEC", "{}")
        self.monitor.startService()
        self.reactor.advance(60)
        self.die(0)
        self.assertIn("route feed process exited; restarting it in 0s (the router serves "
                      "its last route table meanwhile)", self.logged)
        self.reactor.advance(0)
        self.assertEqual(len(self.reactor.spawnedProcesses), 2)

    def test_relays_each_line_with_the_child_name(self) -> None:
        """A child's output goes to the node log as ``NAME: LINE``."""
        self.monitor.add("worker 2", "epio.lb.worker", "EPIO_LB_WORKER_SPEC", "{}")
        self.monitor.startService()
        self.monitor.protocols["worker 2"].outReceived(b"router listening\nhal")
        self.monitor.protocols["worker 2"].outReceived(b"f a line\n")
        self.assertIn("worker 2: router listening", self.logged)
        self.assertIn("worker 2: half a line", self.logged)

    def test_stop_waits_for_every_child_and_restarts_none(self) -> None:
        """stop() sends SIGTERM and fires once every child ended; none is restarted."""
        self.monitor.add("worker 1", "epio.lb.worker", "EPIO_LB_WORKER_SPEC", "{}")
        self.monitor.add(FEED, "epio.lb.feed", "EPIO_LB_FEED_SPEC", "{}")
        self.monitor.startService()
        done = self.monitor.stop()
        self.assertNoResult(done)
        self.reactor.advance(1)  # the fake children end a second after SIGTERM
        self.successResultOf(done)
        self.reactor.advance(100)
        self.assertEqual(len(self.reactor.spawnedProcesses), 2)

    def test_a_child_ignoring_sigterm_is_killed(self) -> None:
        """A child still there killTime seconds after SIGTERM gets SIGKILL."""
        self.monitor.add("worker 1", "epio.lb.worker", "EPIO_LB_WORKER_SPEC", "{}")
        self.monitor.startService()
        self.reactor.spawnedProcesses[0]._terminationDelay = 1000
        done = self.monitor.stop()
        self.reactor.advance(39)
        self.assertNoResult(done)
        self.reactor.advance(1)
        self.successResultOf(done)


class ReuseportAddressTests(SynchronousTestCase):
    def test_parsed_like_any_endpoint(self) -> None:
        """tcp/tcp6 endpoint strings give (interface, port, family), escapes and all."""
        self.assertEqual(reuseport_address(reactor, "tcp:8080"), ("", 8080, socket.AF_INET))
        self.assertEqual(reuseport_address(reactor, "tcp:port=81:interface=10.0.0.1"),
                         ("10.0.0.1", 81, socket.AF_INET))
        self.assertEqual(reuseport_address(reactor, r"tcp:0:interface=\:\:1"),
                         ("::1", 0, socket.AF_INET6))
        self.assertEqual(reuseport_address(reactor, "tcp6:443"), ("::", 443, socket.AF_INET6))

    def test_other_endpoints_are_refused(self) -> None:
        """lb.workers > 1 needs a TCP address to share."""
        with self.assertRaises(ValueError):
            reuseport_address(reactor, "unix:/tmp/router.sock")


class RouteFeedModeTests(SynchronousTestCase):
    """``lb.route_feed = "auto"`` (the default) starts no route feed process only for a
    one-process router whose node runs the nexus too; a chosen mode is kept."""

    def mode(self, roles: set[str], **lb: object) -> str:
        settings = load_config(None, {"lb": dict(lb)}).settings.lb
        return route_feed_mode(settings, frozenset(roles))

    def test_auto_follows_inline_beside_the_nexus_with_one_worker(self) -> None:
        """--role=all with one router process: inline, no second interpreter."""
        self.assertEqual(self.mode({"lb", "nexus", "api", "runner", "logger", "backup"}),
                         "inline")
        self.assertEqual(self.mode({"lb", "nexus"}, workers=1), "inline")

    def test_auto_keeps_the_process_for_workers_or_a_dedicated_router(self) -> None:
        """Workers share one feed process; a router without the nexus keeps route work
        off its reactor."""
        self.assertEqual(self.mode({"lb", "nexus"}, workers=2), "process")
        self.assertEqual(self.mode({"lb"}), "process")
        self.assertEqual(self.mode({"lb", "api", "runner"}), "process")

    def test_a_chosen_mode_is_kept(self) -> None:
        """'process' and 'inline' mean what they say whatever the roles."""
        self.assertEqual(self.mode({"lb", "nexus"}, route_feed="process"), "process")
        self.assertEqual(self.mode({"lb"}, route_feed="inline"), "inline")


class RouterProcessTests(TestCase):
    """SIGHUP and the GC are the process owner's: the router alone touches neither."""

    async def test_sighup_reloads_and_gc_is_tuned_once_listening(self) -> None:
        """A router alone installs no SIGHUP handler and leaves the GC be; with its
        RouterProcess, SIGHUP re-reads its routes (the handler before it still gets the
        signal, and is back after stop) and the GC is tuned once it listens."""
        thresholds = gc.get_threshold()
        self.addCleanup(gc.set_threshold, *thresholds)
        self.addCleanup(gc.unfreeze)
        gc.set_threshold(700, 10, 10)
        chained: list[int] = []

        def handler(signum: int, frame: Any) -> None:
            chained.append(signum)
        self.addCleanup(signal.signal, signal.SIGHUP, signal.signal(signal.SIGHUP, handler))
        source = StaticRouteSource()
        settings = load_config(None, {"lb": {"listen": "tcp:0:interface=127.0.0.1",
                                             "access_log": "off"}}).settings.lb
        router = LBService(reactor, settings, "localhost", source)
        router.startService()
        self.addCleanup(router.stopService)
        await router.whenReady()
        self.assertIs(signal.getsignal(signal.SIGHUP), handler)
        self.assertEqual(gc.get_threshold(), (700, 10, 10))

        process = RouterProcess(reactor, router)
        process.startService()
        self.assertEqual(gc.get_threshold(), GC_THRESHOLDS)
        source.routes = [Route("a", ["a.example.com"], [Backend("127.0.0.1", 1)])]
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(100):
            if router.table.lookup("a.example.com") is not None:
                break
            pause: Deferred[None] = Deferred()
            reactor.callLater(0.01, pause.callback, None)
            await pause
        self.assertIsNotNone(router.table.lookup("a.example.com"))
        self.assertEqual(chained, [signal.SIGHUP])
        process.stopService()
        self.assertIs(signal.getsignal(signal.SIGHUP), handler)
