"""The supervisor's state machine, backoff, health and stop logic, on fakes and a Clock."""

from __future__ import annotations

import signal
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IProcessTransport, IReactorProcess
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from epio.pipeline import ILogSink, MemoryLogSink
from epio.runner.health import IHealthProbe
from epio.runner.ports import PortAllocator
from epio.runner.supervisor import (
    TRANSITIONS,
    ILauncher,
    InvalidTransition,
    Settings,
    SpecError,
    State,
    Supervisor,
    backoff_delay,
)

from .fakes import FakeLauncher, FakeProbe, FakeProcessReactor

DIGEST = "ab" * 32


def body(**kw: Any) -> dict[str, Any]:
    b = {"instance_id": "i1", "app": "hello", "uid": 20001, "release": 3,
         "process_type": "web", "command": "python app.py", "image_digest": DIGEST,
         "env": {"FOO": "bar"}, "limits": {"memory_mb": 128}, "health_check": None,
         "boot_timeout": 60, "grace": 30}
    b.update(kw)
    return b


class Harness:
    def __init__(self, **settings: Any) -> None:
        self.reactor = FakeProcessReactor()
        self.launcher = FakeLauncher()
        self.probe = FakeProbe()
        self.sink = MemoryLogSink()
        self.ports = PortAllocator(20000, 20009, lambda p: True)
        self.changes = 0
        self.gates: list[Any] = []  # the spawn gates, as the runner's root owns them
        self.sup = Supervisor(self.reactor, self.launcher, self.probe, self.sink, self.ports,
                              Settings(**settings), observers=[self._changed],
                              before_spawn=self.gates)

    def _changed(self) -> None:
        self.changes += 1

    def state(self, iid: str = "i1") -> str:
        return self.sup.get(iid).state.value

    def proc(self, n: int = -1) -> Any:
        return self.reactor.spawned[n]


class FakesTests(SynchronousTestCase):
    def test_fakes_implement_the_interfaces(self) -> None:
        """The fakes provide the interfaces the real components provide."""
        h = Harness()
        verifyObject(IReactorProcess, h.reactor)
        verifyObject(ILauncher, h.launcher)
        verifyObject(IHealthProbe, h.probe)
        verifyObject(ILogSink, h.sink)
        h.sup.start(body())
        verifyObject(IProcessTransport, h.proc())


class BackoffTests(SynchronousTestCase):
    def test_schedule_doubles_from_one_second_capped_at_five_minutes(self) -> None:
        """Restart delays are 1, 2, 4, ... 256 s, then 300 s forever."""
        self.assertEqual([backoff_delay(n) for n in range(11)],
                         [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300])
        self.assertEqual(backoff_delay(10_000), 300)

    def test_crash_loop_over_a_minute(self) -> None:
        """A process that exits at once is started at t=0,1,3,7,15,31 (6 starts in the
        first minute, the 7th at 63 s) and is reported crashed while waiting."""
        h = Harness()
        h.sup.start(body(process_type="worker", instance_id="w1"))
        starts = []
        seen = 0
        for _ in range(600):  # 1 s steps over 10 minutes
            while len(h.reactor.spawned) > seen:
                starts.append(round(h.reactor.spawned[seen].spawned_at, 6))
                h.reactor.spawned[seen].exit(1)
                seen += 1
                self.assertEqual(h.state("w1"), "crashed")
            h.reactor.advance(1)
        self.assertEqual(starts[:8], [0, 1, 3, 7, 15, 31, 63, 127])
        self.assertEqual(len([s for s in starts if s < 60]), 6)
        gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
        self.assertTrue(all(g >= 1 for g in gaps), "never a tight loop")
        self.assertLessEqual(max(gaps), 300)
        self.assertEqual(h.sup.get("w1").restarts, len(starts) - 1)

    def test_backoff_resets_after_ten_minutes_healthy(self) -> None:
        """After 10 min of healthy running a crash restarts after 1 s again; a crash after
        a shorter healthy run keeps doubling."""
        h = Harness(worker_settle=1.0)
        h.sup.start(body(process_type="worker", instance_id="w1"))
        for _ in range(4):  # crashes right away: next delays 1, 2, 4, 8
            h.proc().exit(1)
            h.reactor.advance(h.sup.get("w1").calls["restart"].getTime() - h.reactor.seconds())
        h.reactor.advance(1.0)
        self.assertEqual(h.state("w1"), "healthy")
        h.reactor.advance(300)  # healthy 5 min: not enough
        h.proc().exit(1)
        call = h.sup.get("w1").calls["restart"]
        self.assertEqual(call.getTime() - h.reactor.seconds(), 16)
        h.reactor.advance(16)
        h.reactor.advance(1.0)
        h.reactor.advance(600)  # healthy 10 min
        h.proc().exit(1)
        call = h.sup.get("w1").calls["restart"]
        self.assertEqual(call.getTime() - h.reactor.seconds(), 1)


class StartTests(SynchronousTestCase):
    def test_start_allocates_port_and_replies_at_once(self) -> None:
        """runner.start replies with host and port before the process is healthy; the
        process gets PORT and the launcher prepared that port."""
        h = Harness()
        reply = h.sup.start(body())
        self.assertEqual(reply, {"instance_id": "i1", "host": "127.0.0.1", "port": 20000,
                                 "state": "starting"})
        self.assertEqual(h.launcher.prepared, [("i1", 20000)])
        self.assertEqual(h.proc().env["PORT"], "20000")
        self.assertTrue(h.proc().stdin_closed)

    def test_worker_has_no_port_and_is_healthy_after_settling(self) -> None:
        """A non-web process gets no port and counts as healthy once it stayed up."""
        h = Harness(worker_settle=1.0)
        reply = h.sup.start(body(process_type="worker"))
        self.assertIsNone(reply["port"])
        h.reactor.advance(0.5)
        self.assertEqual(h.state(), "starting")
        h.reactor.advance(0.6)
        self.assertEqual(h.state(), "healthy")
        self.assertEqual(h.probe.checks, [])

    def test_start_is_idempotent_and_refuses_a_different_spec(self) -> None:
        """The same start twice answers the same port; another spec under that id is refused."""
        h = Harness()
        a = h.sup.start(body())
        b = h.sup.start(body())
        self.assertEqual(a["port"], b["port"])
        self.assertEqual(len(h.reactor.spawned), 1)
        self.assertRaises(SpecError, h.sup.start, body(command="other"))

    def test_invalid_specs_are_refused(self) -> None:
        """Root, out-of-range UIDs, bad names, digests, env and paths are refused clearly."""
        h = Harness()
        bads: list[dict[str, Any]] = [dict(uid=0), dict(uid=5), dict(uid=True), dict(app="../x"),
                    dict(app="Hello"), dict(image_digest="abc"), dict(instance_id="a/b"),
                    dict(env={"A": None}), dict(env={"A=B": "1"}), dict(health_check="x"),
                    dict(limits={"memory_mb": -1}), dict(command=""), dict(grace=-1),
                    dict(process_type="Web!"), dict(image_digest="")]
        for bad in bads:
            with self.assertRaises(SpecError, msg=repr(bad)):
                h.sup.start(body(**bad))
        self.assertEqual(h.reactor.spawned, [])

    def test_spawn_waits_for_the_before_spawn_gates(self) -> None:
        """A Deferred returned by a before_spawn gate (the network fence opening the
        instance's ports) holds the spawn back until it fires; addon_ports are part
        of the spec (and of its state-file form); bad addon_ports are refused."""
        h = Harness()
        gate: defer.Deferred[None] = defer.Deferred()
        h.gates.append(lambda: gate)
        h.sup.start(body(addon_ports=[5432, 5432]))
        self.assertEqual(h.reactor.spawned, [])
        gate.callback(None)
        self.assertEqual(len(h.reactor.spawned), 1)
        spec = h.sup.get("i1").spec
        self.assertEqual(spec.addon_ports, (5432,))
        self.assertEqual(spec.to_message()["addon_ports"], [5432])
        for bad in ([0], ["5432"], [True], 5432, list(range(1, 18))):
            with self.assertRaises(SpecError, msg=repr(bad)):
                h.sup.start(body(instance_id="i2", addon_ports=bad))

    def test_a_dedicated_server_may_have_no_image(self) -> None:
        """A dedicated database server (provisioned before the app's first build) may
        start with image_digest "" (the launcher's empty image); an app process may not."""
        h = Harness()
        h.sup.start(body(process_type="epio-redis", image_digest="", command="redis"))
        self.assertEqual(h.sup.get("i1").spec.image_digest, "")
        with self.assertRaises(SpecError):
            h.sup.start(body(instance_id="i2", process_type="worker", image_digest=""))

    def test_a_refusing_gate_fails_the_spawn(self) -> None:
        """A before_spawn gate that fails (the network fence is on but no table is in
        place) fails the instance with the reason instead of spawning it: no process,
        the prepared launch cleaned up, its port released, the reason in the app's
        log."""
        h = Harness()
        gate: defer.Deferred[None] = defer.Deferred()
        h.gates.append(lambda: gate)
        h.sup.start(body())
        gate.errback(RuntimeError("network fence not applied (nft table inet t): nope"))
        inst = h.sup.get("i1")
        self.assertEqual(h.reactor.spawned, [])
        self.assertEqual(inst.state, State.FAILED)
        self.assertEqual(inst.reason, "cannot start: network fence not applied "
                                      "(nft table inet t): nope")
        self.assertEqual(h.launcher.cleaned, 1)
        self.assertEqual(h.ports.used, set())
        self.assertIn("web.1: cannot start: network fence not applied (nft table inet t): "
                      "nope", h.sink.texts("hello", "platform"))

    def test_prepare_failure_is_failed_and_reported(self) -> None:
        """An image that cannot be prepared makes the instance failed with the reason."""
        h = Harness()
        h.launcher.fail_prepare = RuntimeError("image abc is not on this node")
        h.sup.start(body())
        inst = h.sup.get("i1")
        self.assertEqual(inst.state, State.FAILED)
        self.assertIn("image abc is not on this node", inst.reason or "")
        self.assertEqual(h.ports.used, set())

    def test_index_is_lowest_free_per_app_and_type(self) -> None:
        """Log sources are web.1, web.2, ...: the lowest index not in use."""
        h = Harness()
        h.sup.start(body(instance_id="a"))
        h.sup.start(body(instance_id="b"))
        self.assertEqual([h.sup.get(i).spec.source for i in "ab"], ["web.1", "web.2"])


class HealthTests(SynchronousTestCase):
    def test_web_becomes_healthy_when_probe_passes(self) -> None:
        """A web instance stays starting until its health check passes, then healthy."""
        h = Harness()
        h.sup.start(body(health_check="/health"))
        h.reactor.advance(2)
        self.assertEqual(h.state(), "starting")
        self.assertEqual(h.probe.checks[-1], ("127.0.0.1", 20000, "/health"))
        h.probe.healthy.add(20000)
        h.reactor.advance(0.5)
        self.assertEqual(h.state(), "healthy")
        self.assertEqual(h.sup.heartbeat_instances()[0]["state"], "healthy")

    def test_boot_checks_start_early_and_back_off(self) -> None:
        """A booting web instance is first checked health_boot_first (50 ms) after its
        launch, each next check 1.5 times later, never more than health_boot_interval
        apart; once it answers it is healthy at that check and checked every
        health_interval. A restart starts the schedule again."""
        h = Harness(health_boot_first=0.05, health_boot_interval=0.5, health_interval=5,
                    backoff_initial=1)
        h.sup.start(body(health_check="/health"))
        times: list[float] = []
        while h.reactor.seconds() < 3:  # to each next check, and one more check there
            at = h.sup.get("i1").calls["health"].getTime()
            h.reactor.advance(at - h.reactor.seconds())
            self.assertEqual(len(h.probe.checks), len(times) + 1)
            times.append(at)
        gaps = [round(b - a, 4) for a, b in zip([0.0, *times], times, strict=False)]
        self.assertEqual(gaps[:8], [0.05, 0.075, 0.1125, 0.1688, 0.2531, 0.3797, 0.5, 0.5])
        self.assertEqual(max(gaps), 0.5)
        self.assertEqual(h.state(), "starting")
        h.probe.healthy.add(20000)
        n = len(h.probe.checks)
        h.reactor.advance(0.5)
        self.assertEqual((h.state(), len(h.probe.checks)), ("healthy", n + 1))
        h.reactor.advance(4.9)
        self.assertEqual(len(h.probe.checks), n + 1)
        h.reactor.advance(0.1)
        self.assertEqual(len(h.probe.checks), n + 2)
        h.probe.healthy.clear()
        h.proc().exit(1)  # crashed: restarted after the backoff (1 s)
        h.reactor.advance(1)
        self.assertEqual(len(h.reactor.spawned), 2)
        at = h.sup.get("i1").calls["health"].getTime()
        self.assertAlmostEqual(at - h.proc().spawned_at, 0.05)

    def test_boot_timeout_fails_and_kills(self) -> None:
        """Never healthy within boot_timeout: killed (SIGKILL), failed, not restarted."""
        h = Harness()
        h.sup.start(body(boot_timeout=10))
        h.reactor.advance(10)
        self.assertIn((h.proc().pid, signal.SIGKILL), h.launcher.signals)
        h.proc().exit(137)
        inst = h.sup.get("i1")
        self.assertEqual(inst.state, State.FAILED)
        self.assertIn("boot timeout", inst.reason or "")
        h.reactor.advance(1000)
        self.assertEqual(len(h.reactor.spawned), 1)
        self.assertEqual(h.ports.used, set())

    def test_boot_timeout_says_what_is_wrong_with_port(self) -> None:
        """The boot-timeout failure names $PORT and what the process listens on: another
        port ("web listens on 5000; it must listen on $PORT"), $PORT itself (the health
        check failed), or nothing."""
        cases = [([5000], None, "web listens on 5000; it must listen on $PORT (20000) (not "
                                "healthy within the boot timeout of 10s)"),
                 ([20000, 9000], "/health", "not healthy within the boot timeout of 10s: it "
                                            "listens on $PORT (20000) but its health check GET "
                                            "/health never succeeded"),
                 ([], None, "not healthy within the boot timeout of 10s: nothing listens on "
                            "$PORT (20000)")]
        for listening, check, reason in cases:
            h = Harness()
            h.launcher.listening = listening
            h.sup.start(body(boot_timeout=10, health_check=check))
            h.reactor.advance(10)
            h.proc().exit(137)
            self.assertEqual(h.sup.get("i1").reason, reason)

    def test_a_port_answered_by_another_process_is_not_healthy(self) -> None:
        """Apps share the host's network namespace: another app's process may hold the
        port while this one is down.  A health check that passes there is not this
        instance's: it stays starting (never routed), says why once, and becomes healthy
        only once its own processes listen on the port."""
        h = Harness()
        h.launcher.listening = []  # the app has not bound $PORT; someone else answers
        h.probe.healthy.add(20000)
        h.sup.start(body(boot_timeout=10))
        for _ in range(6):
            h.reactor.advance(0.5)
        self.assertEqual(h.state(), "starting")
        said = [t for t in h.sink.texts("hello", "platform") if "another process" in t]
        self.assertEqual(said, ["web.1: port 20000 answers, but not from this instance's own "
                                "processes (another process holds it): not healthy"])
        h.launcher.listening = [20000]
        h.reactor.advance(0.5)
        self.assertEqual(h.state(), "healthy")

    def test_a_web_port_taken_while_down_moves_the_instance(self) -> None:
        """A web process restarting (a crash, a wake) whose port another process bound
        meanwhile starts on a free port, says so, and reports the new port."""
        h = Harness()
        taken: set[int] = set()
        h.ports.is_free = lambda p: p not in taken
        h.sup.start(body())
        h.probe.healthy.update({20000, 20001})
        h.reactor.advance(0.5)
        self.assertEqual(h.state(), "healthy")
        taken.add(20000)
        h.proc().exit(1)
        h.reactor.advance(1)
        self.assertEqual(h.launcher.prepared[-1], ("i1", 20001))
        self.assertEqual(h.sup.get("i1").port, 20001)
        self.assertNotIn(20000, h.ports.used)
        self.assertIn("web.1: port 20000 is taken by another process: starting on port 20001",
                      h.sink.texts("hello", "platform"))
        h.reactor.advance(0.5)
        self.assertEqual(h.state(), "healthy")
        self.assertEqual(h.sup.heartbeat_instances()[0]["port"], 20001)

    def test_status_carries_the_last_lines_of_an_unhealthy_instance(self) -> None:
        """runner.status reports the last 20 lines of output (over restarts, each cut to
        500 characters) of an instance that is not healthy; heartbeats and healthy
        instances carry none."""
        h = Harness()
        h.sup.start(body(boot_timeout=10))
        h.proc().output(b"".join(b"line %d\n" % n for n in range(30)) + b"x" * 600 + b"\n")
        status = h.sup.heartbeat_instances(tail=True)[0]
        self.assertEqual(status["tail"], [f"line {n}" for n in range(11, 30)] + ["x" * 500])
        self.assertNotIn("tail", h.sup.heartbeat_instances()[0])
        h.probe.healthy.add(20000)
        h.reactor.advance(0.5)
        self.assertEqual(h.state(), "healthy")
        self.assertNotIn("tail", h.sup.heartbeat_instances(tail=True)[0])

    def test_unhealthy_running_instance_leaves_routes_and_restarts(self) -> None:
        """health_failures failed checks in a row: crashed at once (not routable), SIGTERM,
        then restarted after the backoff."""
        h = Harness(health_interval=5, health_failures=3)
        h.sup.start(body())
        h.probe.healthy.add(20000)
        h.reactor.advance(0.5)
        self.assertEqual(h.state(), "healthy")
        h.probe.healthy.clear()
        h.reactor.advance(5)
        h.reactor.advance(5)
        self.assertEqual(h.state(), "healthy")
        h.reactor.advance(5)
        self.assertEqual(h.state(), "crashed")
        self.assertIn((h.proc().pid, signal.SIGTERM), h.launcher.signals)
        h.proc().exit(0, signal.SIGTERM)
        self.assertEqual(h.state(), "crashed")
        h.probe.healthy.add(20000)
        h.reactor.advance(1)
        self.assertEqual(len(h.reactor.spawned), 2)
        h.reactor.advance(0.5)
        self.assertEqual(h.state(), "healthy")

    def test_a_single_failed_check_is_tolerated(self) -> None:
        """One failed check between good ones does not take the instance out."""
        h = Harness(health_interval=5, health_failures=3)
        h.sup.start(body())
        h.probe.healthy.add(20000)
        h.reactor.advance(0.5)
        h.probe.healthy.clear()
        h.reactor.advance(5)
        h.probe.healthy.add(20000)
        for _ in range(5):
            h.reactor.advance(5)
        self.assertEqual(h.state(), "healthy")


class StopTests(SynchronousTestCase):
    def _healthy(self) -> Harness:
        h = Harness()
        h.sup.start(body(grace=30))
        h.probe.healthy.add(20000)
        h.reactor.advance(0.5)
        return h

    def test_stop_sigterm_then_sigkill_after_grace(self) -> None:
        """Stop sends SIGTERM to the group, SIGKILL after the grace period, and fires
        once the process is gone; the instance is then stopped and its port freed."""
        h = self._healthy()
        d = h.sup.stop("i1")
        pid = h.proc().pid
        self.assertEqual(h.state(), "draining")
        self.assertEqual(h.launcher.signals, [(pid, signal.SIGTERM)])
        h.reactor.advance(29.9)
        self.assertEqual(h.launcher.signals, [(pid, signal.SIGTERM)])
        self.assertNoResult(d)
        h.reactor.advance(0.1)
        self.assertEqual(h.launcher.signals[-1], (pid, signal.SIGKILL))
        h.proc().exit(137)
        self.successResultOf(d)
        self.assertEqual(h.state(), "stopped")
        self.assertEqual(h.ports.used, set())
        h.reactor.advance(1000)
        self.assertEqual(len(h.reactor.spawned), 1, "a stopped instance is not restarted")

    def test_stop_without_sigkill_when_process_exits_in_time(self) -> None:
        """A process that exits on SIGTERM is not SIGKILLed."""
        h = self._healthy()
        h.sup.stop("i1", grace=5)
        h.proc().exit(0)
        h.reactor.advance(10)
        self.assertNotIn(signal.SIGKILL, [s for _, s in h.launcher.signals])
        self.assertEqual(h.state(), "stopped")

    def test_stop_while_crashed_cancels_restart(self) -> None:
        """Stopping an instance waiting for its restart stops it at once."""
        h = Harness()
        h.sup.start(body(process_type="worker"))
        h.proc().exit(1)
        d = h.sup.stop("i1")
        self.successResultOf(d)
        h.reactor.advance(100)
        self.assertEqual(len(h.reactor.spawned), 1)

    def test_drain_leaves_routes_then_stops(self) -> None:
        """Drain: draining at once (routers stop sending), SIGTERM after drain_delay, then
        stopped when the process exits."""
        h = Harness(drain_delay=3)
        h.sup.start(body())
        h.probe.healthy.add(20000)
        h.reactor.advance(0.5)
        h.sup.drain("i1")
        self.assertEqual(h.state(), "draining")
        self.assertEqual(h.launcher.signals, [])
        h.reactor.advance(3)
        self.assertEqual(h.launcher.signals, [(h.proc().pid, signal.SIGTERM)])
        h.proc().exit(0)
        self.assertEqual(h.state(), "stopped")

    def test_drain_while_unhealthy_kill_keeps_port_until_exit(self) -> None:
        """Draining an instance whose unhealthy process is still being killed stops it
        once the process is gone; its port stays allocated until then."""
        h = Harness(health_interval=5, health_failures=1)
        h.sup.start(body())
        h.probe.healthy.add(20000)
        h.reactor.advance(0.5)
        h.probe.healthy.clear()
        h.reactor.advance(5)
        self.assertEqual(h.state(), "crashed")
        h.sup.drain("i1")
        self.assertIn(20000, h.ports.used)
        h.proc().exit(0)
        self.assertEqual(h.state(), "stopped")
        self.assertNotIn(20000, h.ports.used)
        h.reactor.advance(100)
        self.assertEqual(len(h.reactor.spawned), 1)

    def test_stopped_instance_is_forgotten_after_retention(self) -> None:
        """A stopped instance stays in heartbeats for stopped_retention, then disappears."""
        h = Harness(stopped_retention=60)
        h.sup.start(body(process_type="worker"))
        h.sup.stop("i1")
        h.proc().exit(0)
        self.assertEqual(h.sup.heartbeat_instances()[0]["state"], "stopped")
        h.reactor.advance(60)
        self.assertEqual(h.sup.heartbeat_instances(), [])

    def test_stop_during_prepare(self) -> None:
        """Stopping while the image is still being prepared never spawns the process."""
        h = Harness()
        h.launcher.hold = True
        h.sup.start(body())
        d = h.sup.stop("i1")
        self.successResultOf(d)
        assert h.launcher.pending is not None
        h.launcher.pending.callback(None)
        self.assertEqual(h.reactor.spawned, [])
        self.assertEqual(h.launcher.cleaned, 1)

    def test_shutdown_stops_processes_without_forgetting_them(self) -> None:
        """Node shutdown terminates every process but keeps instances (for the state file)."""
        h = self._healthy()
        d = h.sup.shutdown(grace=10)
        self.assertEqual(h.launcher.signals, [(h.proc().pid, signal.SIGTERM)])
        h.proc().exit(0)
        self.successResultOf(d)
        self.assertEqual(h.state(), "healthy")
        h.reactor.advance(1000)
        self.assertEqual(len(h.reactor.spawned), 1)


    def test_shutdown_gives_a_database_server_its_own_longer_grace(self) -> None:
        """On a node stop a web process is SIGKILLed after the runner's shutdown grace, a
        dedicated database server only after its own (longer) grace -- its SHUTDOWN SAVE
        or fast shutdown is what keeps its data; its log line does not show its script."""
        h = Harness()
        h.sup.start(body(process_type="worker", instance_id="w1"))
        h.sup.start(body(process_type="epio-postgres", instance_id="pg", release=0,
                         command=["/bin/sh", "-c", "SCRIPT-LINE\n" * 30], grace=30))
        web, pg = h.reactor.spawned
        h.sup.shutdown(grace=10)
        h.reactor.advance(10)
        self.assertIn((web.pid, signal.SIGKILL), h.launcher.signals)
        self.assertNotIn((pg.pid, signal.SIGKILL), h.launcher.signals)
        h.reactor.advance(20)
        self.assertIn((pg.pid, signal.SIGKILL), h.launcher.signals)
        texts = h.sink.texts("hello", "platform")
        self.assertFalse([t for t in texts if "SCRIPT-LINE" in t], texts)
        self.assertIn("epio-postgres.1: starting release 0: the dedicated postgres server "
                      "(PORT=20000)", texts)


    def test_one_database_server_per_data_directory(self) -> None:
        """A second dedicated server of the app on the same data directory is refused
        while the first is not stopped; once it is, or for another directory, it starts."""
        h = Harness()
        env = {"EPIO_SERVICE_DIR": ".epio-redis-ab"}
        h.sup.start(body(process_type="epio-redis", instance_id="r1", release=0, env=env))
        with self.assertRaises(SpecError) as cm:
            h.sup.start(body(process_type="epio-redis", instance_id="r2", release=0, env=env))
        self.assertIn(".epio-redis-ab of hello is in use by instance r1", str(cm.exception))
        h.sup.start(body(process_type="epio-redis", instance_id="r3", release=0,
                         env={"EPIO_SERVICE_DIR": ".epio-redis-cd"}))
        h.sup.stop("r1")
        h.reactor.spawned[0].exit(0)
        h.sup.start(body(process_type="epio-redis", instance_id="r2", release=0, env=env))
        self.assertEqual(h.state("r2"), "starting")


class ExitTests(SynchronousTestCase):
    def test_oom_kill_is_reported(self) -> None:
        """A process the kernel killed for memory is logged as 'killed: out of memory'."""
        h = Harness()
        h.sup.start(body(process_type="worker"))
        h.launcher.ooms = 1
        h.proc().exit(137)
        inst = h.sup.get("i1")
        self.assertEqual(inst.state, State.CRASHED)
        self.assertEqual(inst.reason, "killed: out of memory")
        self.assertTrue(any(t.startswith("worker.1: ") and "killed: out of memory" in t
                            for t in h.sink.texts("hello", "platform")))

    def test_oom_kill_of_a_child_process_is_reported_once(self) -> None:
        """An OOM kill inside a running instance (not its main process) is logged once."""
        h = Harness()
        h.sup.start(body(process_type="worker"))
        h.sup.poll_oom()
        h.launcher.ooms = 1
        h.sup.poll_oom()
        h.sup.poll_oom()
        texts = h.sink.texts("hello", "platform")
        self.assertEqual(texts.count("worker.1: a process was killed: out of memory"), 1)
        self.assertEqual(h.state(), "starting")

    def test_exit_descriptions(self) -> None:
        """Exit codes and signals (and bubblewrap's 128+N) are described for humans."""
        from epio.runner.supervisor import describe_exit

        self.assertEqual(describe_exit(3, None, False), "exited with code 3")
        self.assertEqual(describe_exit(None, 9, False), "killed by signal SIGKILL")
        self.assertEqual(describe_exit(143, None, False),
                         "exited with code 143 (killed by signal SIGTERM)")

    def test_output_lines_go_to_the_sink_with_their_source(self) -> None:
        """stdout and stderr reach the log sink line by line as web.N; partial lines are
        joined, a last line without newline is flushed at exit, long lines are cut."""
        h = Harness(max_line=10)
        h.sup.start(body())
        p = h.proc()
        p.output(b"hel")
        p.output(b"lo\nwor")
        p.output(b"ld\r\n")
        p.output(b"err\n", fd=2)
        p.output(b"0123456789abc")
        p.output(b"tail", fd=2)
        p.exit(1)
        self.assertEqual(h.sink.texts("hello", "web.1"),
                         ["hello", "world", "err", "0123456789", "abc", "tail"])


class TransitionTests(SynchronousTestCase):
    def test_table_is_closed(self) -> None:
        """Every state has an entry; stopped is terminal; healthy cannot go back to starting."""
        self.assertEqual(set(TRANSITIONS), set(State))
        self.assertEqual(TRANSITIONS[State.STOPPED], frozenset())
        self.assertNotIn(State.STARTING, TRANSITIONS[State.HEALTHY])

    def test_invalid_transition_raises(self) -> None:
        """The supervisor refuses a transition the machine does not have."""
        h = Harness()
        h.sup.start(body())
        h.sup._to(h.sup.get("i1"), State.DRAINING)
        for bad in (State.HEALTHY, State.STARTING, State.CRASHED, State.FAILED):
            self.assertRaises(InvalidTransition, h.sup._to, h.sup.get("i1"), bad)


class SleepTests(SynchronousTestCase):
    def _healthy(self, h: Harness, **kw: Any) -> None:
        h.probe.healthy.add(20000)
        h.sup.start(body(**kw))
        h.reactor.advance(0.5)
        self.assertEqual(h.state(), "healthy")

    def test_idle_web_sleeps_and_keeps_its_port(self) -> None:
        """A healthy web instance with idle_sleep whose port had no connection for that
        long is asleep: SIGTERM, not restarted after it exits, its port kept; a busy
        port keeps it awake."""
        h = Harness()
        self._healthy(h, idle_sleep=5)
        for _ in range(10):
            h.reactor.advance(1)
            h.sup.check_idle({20000})
        self.assertEqual(h.state(), "healthy")
        for _ in range(5):
            h.reactor.advance(1)
            h.sup.check_idle(set())
        self.assertEqual(h.state(), "asleep")
        self.assertIn((h.proc().pid, signal.SIGTERM), h.launcher.signals)
        h.proc().exit(0)
        h.reactor.advance(1000)
        self.assertEqual(h.state(), "asleep")
        self.assertEqual(len(h.reactor.spawned), 1)
        self.assertEqual(h.ports.used, {20000})
        self.assertEqual(h.sup.watched_ports(), set())

    def test_only_web_sleeps_and_default_comes_from_settings(self) -> None:
        """A worker never sleeps; a web instance without idle_sleep takes the runner's
        default; idle_sleep 0 never sleeps whatever the default."""
        h = Harness(idle_sleep=2.0)
        h.sup.start(body(instance_id="w1", process_type="worker", idle_sleep=2))
        self._healthy(h)
        h.probe.healthy.add(20001)
        h.sup.start(body(instance_id="i2", idle_sleep=0))
        h.reactor.advance(1.5)
        for _ in range(5):
            h.reactor.advance(1)
            h.sup.check_idle(set())
        self.assertEqual(h.state("w1"), "healthy")
        self.assertEqual(h.state("i1"), "asleep")
        self.assertEqual(h.state("i2"), "healthy")

    def test_wake_launches_once_and_probes_fast(self) -> None:
        """runner.wake launches an asleep instance again, once however often it is asked,
        and probes it every wake_probe_interval until healthy."""
        h = Harness(wake_probe_interval=0.02)
        self._healthy(h, idle_sleep=1)
        h.reactor.advance(1)
        h.sup.check_idle(set())
        h.proc().exit(0)
        h.probe.healthy.discard(20000)
        for _ in range(20):
            h.sup.wake("hello")
        self.assertEqual(len(h.reactor.spawned), 2)
        self.assertEqual(h.state(), "starting")
        checks = len(h.probe.checks)
        h.reactor.pump([0.02] * 5)
        self.assertEqual(len(h.probe.checks) - checks, 5)
        h.probe.healthy.add(20000)
        h.reactor.advance(0.02)
        self.assertEqual(h.state(), "healthy")
        self.assertEqual(len(h.reactor.spawned), 2)

    def test_wake_while_the_sleeping_process_exits(self) -> None:
        """A wake before the sleeping process exited launches it once it has."""
        h = Harness()
        self._healthy(h, idle_sleep=1)
        h.reactor.advance(1)
        h.sup.check_idle(set())
        h.sup.wake("hello")
        self.assertEqual(len(h.reactor.spawned), 1)
        h.proc(0).exit(0)
        self.assertEqual(len(h.reactor.spawned), 2)
        self.assertEqual(h.state(), "starting")

    def test_stop_and_drain_of_an_asleep_instance(self) -> None:
        """An asleep instance stops (or drains) at once and frees its port."""
        for how in ("stop", "drain"):
            h = Harness()
            self._healthy(h, idle_sleep=1)
            h.reactor.advance(1)
            h.sup.check_idle(set())
            h.proc().exit(0)
            if how == "stop":
                d = h.sup.stop("i1")
                self.successResultOf(d)
            else:
                h.sup.drain("i1")
            self.assertEqual(h.state(), "stopped")
            self.assertEqual(h.ports.used, set())


class BusyPortsTests(SynchronousTestCase):
    def test_established_connections_of_watched_ports(self) -> None:
        """busy_ports reads /proc/net/tcp-shaped tables: a watched port with an
        ESTABLISHED (01) connection is busy; LISTEN (0A), TIME_WAIT (06), other ports and
        a missing table are not."""
        import shutil
        import tempfile
        from pathlib import Path

        from epio.runner.supervisor import busy_ports

        head = ("  sl  local_address rem_address   st tx_queue rx_queue tr tm->when "
                "retrnsmt   uid  timeout inode\n")
        rows = [
            "   0: 0100007F:4E20 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 1",
            "   1: 0100007F:4E20 0100007F:9C40 01 00000000:00000000 00:00000000 00000000 0 0 2",
            "   2: 0100007F:4E21 0100007F:9C41 06 00000000:00000000 00:00000000 00000000 0 0 3",
            "   3: 0100007F:4E22 0100007F:9C42 0A 00000000:00000000 00:00000000 00000000 0 0 4",
        ]
        v6 = ("   0: 00000000000000000000000001000000:4E23 00000000000000000000000001000000:"
              "A000 01 00000000:00000000 00:00000000 00000000 0 0 5\n")
        d = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, d, True)
        (d / "tcp").write_text(head + "\n".join(rows) + "\n")
        (d / "tcp6").write_text(head + v6)
        tables = (str(d / "tcp"), str(d / "tcp6"), str(d / "missing"))
        self.assertEqual(busy_ports({20000, 20001, 20002, 20003}, tables), {20000, 20003})
        self.assertEqual(busy_ports(set(), tables), set())


class AsleepAfterBootTests(SynchronousTestCase):
    def test_new_release_of_an_asleep_app_sleeps_once_healthy(self) -> None:
        """Started with asleep_after_boot (a release of an asleep app), a web instance
        passes its first health check (healthy: the rollout counts it) and goes to sleep
        at once; woken later, it stays awake."""
        h = Harness()
        h.probe.healthy.add(20000)
        h.sup.start(body(asleep_after_boot=True, idle_sleep=600))
        h.reactor.advance(0.5)
        self.assertEqual(h.state(), "asleep")
        self.assertTrue(h.sup.get("i1").ever_healthy)
        self.assertIn((h.proc().pid, signal.SIGTERM), h.launcher.signals)
        h.proc().exit(0)
        h.sup.wake("hello")
        h.reactor.advance(0.02)
        self.assertEqual(h.state(), "healthy")
        h.reactor.advance(10)
        self.assertEqual(h.state(), "healthy")

    def test_heartbeat_says_waking_until_healthy(self) -> None:
        """A woken instance's heartbeat carries waking: true until it is healthy (its
        route stays asleep meanwhile), and an unrelated app is not woken."""
        h = Harness()
        h.probe.healthy.add(20000)
        h.sup.start(body(idle_sleep=1))
        h.reactor.advance(0.5)
        h.reactor.advance(1)
        h.sup.check_idle(set())
        h.proc().exit(0)
        self.assertEqual(h.sup.wake("other"), [])
        h.probe.healthy.discard(20000)
        [reply] = h.sup.wake("hello")
        self.assertEqual(reply["state"], "starting")
        self.assertIs(h.sup.heartbeat_instances()[0].get("waking"), True)
        h.probe.healthy.add(20000)
        h.reactor.advance(0.02)
        self.assertNotIn("waking", h.sup.heartbeat_instances()[0])


class ServiceGateTests(SynchronousTestCase):
    """The gate a runner asks before every spawn of a dedicated server of an add-on with
    a standby (epio.addons.standby): its answer is the server's role; a fenced server
    is never spawned; an unknown role is asked again after the crash backoff."""

    def setUp(self) -> None:
        self.h = Harness(backoff_initial=1.0)
        self.answers: list[Any] = []

        async def gate(spec: Any) -> dict[str, str]:
            answer = self.answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return dict(answer)

        self.h.sup.service_gate = gate

    def start(self) -> None:
        self.h.sup.start(body(process_type="epio-redis", command=["/bin/sh", "-c", "x"],
                              release=0, env={"EPIO_ADDON_EPOCH": "2",
                                              "EPIO_SERVICE_DIR": ".epio-redis-ab"}))

    def test_role_reaches_the_server(self) -> None:
        self.answers = [{"EPIO_SERVER_ROLE": "standby", "EPIO_PRIMARY_HOST": "10.0.0.1",
                         "EPIO_PRIMARY_PORT": "20001"}]
        self.start()
        self.assertEqual(len(self.h.reactor.spawned), 1)
        self.assertEqual(self.h.proc().env["EPIO_SERVER_ROLE"], "standby")
        self.assertEqual(self.h.proc().env["EPIO_PRIMARY_PORT"], "20001")

    def test_fenced_server_never_spawns(self) -> None:
        from epio.addons.standby import Fenced

        self.answers = [Fenced("fenced: the redis add-on of hello is at epoch 3")]
        self.start()
        self.assertEqual(self.h.reactor.spawned, [])
        self.assertEqual(self.h.state(), "failed")
        self.h.reactor.advance(600)
        self.assertEqual(self.h.reactor.spawned, [])
        self.assertIn("fenced", " ".join(self.h.sink.texts("hello")))

    def test_unknown_role_is_asked_again(self) -> None:
        self.answers = [ConnectionError("store down"), {"EPIO_SERVER_ROLE": "primary"}]
        self.start()
        self.assertEqual(self.h.reactor.spawned, [])
        self.assertEqual(self.h.state(), "crashed")
        self.h.reactor.advance(1.0)
        self.assertEqual(len(self.h.reactor.spawned), 1)
        self.assertEqual(self.h.proc().env["EPIO_SERVER_ROLE"], "primary")

    def test_no_gate_no_start(self) -> None:
        """A runner without a gate (no store to ask) never spawns a server of an add-on
        with a standby: it could be a fenced old primary (fail closed)."""
        self.h.sup.service_gate = None
        self.start()
        self.assertEqual(self.h.reactor.spawned, [])
        self.assertEqual(self.h.state(), "failed")
        self.h.reactor.advance(600)
        self.assertEqual(self.h.reactor.spawned, [])

    def test_servers_without_an_epoch_are_not_asked(self) -> None:
        self.h.sup.start(body(process_type="epio-redis", command=["/bin/sh", "-c", "x"],
                              release=0, env={"EPIO_SERVICE_DIR": ".epio-redis-ab"}))
        self.assertEqual(len(self.h.reactor.spawned), 1)
        self.assertNotIn("EPIO_SERVER_ROLE", self.h.proc().env)
