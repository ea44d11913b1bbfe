"""The runner service: control messages, heartbeats, registration, state file, recovery."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from attrs import frozen
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from epio.bus import RemoteError
from epio.bus.messages import REGISTRY
from epio.pipeline import MemoryLogSink
from epio.runner.cgroups import CgroupSupport
from epio.runner.ports import PortAllocator
from epio.runner.sandbox import Isolation
from epio.runner.service import RunnerService, control_advertise
from epio.runner.supervisor import Settings, Supervisor
from epio.runner.users import RangeClaim, claims_on_host, range_conflicts
from epio.store.records import NodeInfo

from .fakes import FakeLauncher, FakeProbe, FakeProcessReactor
from .test_supervisor import body


@frozen
class Env:
    type: str
    body: dict[str, Any]


class FakePublisher:
    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any], bytes]] = []

    def publish(self, type: str, body: dict[str, Any], topic: bytes = b"") -> bool:
        REGISTRY.check_outgoing(type, body, "publish")
        self.sent.append((type, body, topic))
        return True


class FakeStore:
    def __init__(self) -> None:
        self.nodes: list[tuple[Any, ...]] = []
        self.others: list[NodeInfo] = []  # rows of other nodes (list_nodes)

    async def list_nodes(self, role: str | None = None) -> list[NodeInfo]:
        return [n for n in self.others if role is None or role in n.roles]

    async def upsert_node(self, node_id: str, roles: Any, control_endpoint: Any = None,
                          boot_id: Any = None, status: Any = None) -> None:
        self.nodes.append((node_id, tuple(roles), control_endpoint, boot_id, status))


class FakeStoreService:
    def __init__(self) -> None:
        self.store = FakeStore()

    def whenReady(self) -> defer.Deferred[FakeStore]:
        return defer.succeed(self.store)


class FakeImages:
    async def unmount(self, digest: str, force: bool = False) -> None:
        pass


def make(data_dir: Path, reactor: FakeProcessReactor | None = None,
         iso: Isolation | None = None, gates: Any = (), **kw: Any) -> Any:
    reactor = reactor or FakeProcessReactor()
    launcher = FakeLauncher()
    probe = FakeProbe()
    observers: list[Any] = []
    sup = Supervisor(reactor, launcher, probe, MemoryLogSink(),
                     PortAllocator(20000, 20009, lambda p: True), Settings(),
                     observers=observers, before_spawn=gates)
    pub = FakePublisher()
    stores = FakeStoreService()
    iso = iso or Isolation("bwrap", True, ("pid",), ("memory",), True,
                           {"cpu": "no cpu controller"})
    svc = RunnerService(reactor=reactor, supervisor=sup, isolation=iso,
                        cgroups=CgroupSupport({}, {}), images=FakeImages(), data_dir=data_dir,
                        node_id="n1", boot_id="b1", control="tcp://127.0.0.1:7731",
                        heartbeat_interval=1.0, register_interval=10.0, publisher=pub,
                        store_service=stores, stats=sup.sink, stats_interval=5.0, **kw)
    observers.append(svc.changed)
    return svc, reactor, pub, stores, probe


class ControlTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.svc, self.reactor, self.pub, self.stores, self.probe = make(Path(self.mktemp()))
        self.svc.startService()
        self.addCleanup(self.svc.supervisor.cancel_timers)
        self.addCleanup(lambda: self.svc._beat.stop() if self.svc._beat.running else None)

    def call(self, type: str, b: dict[str, Any]) -> Any:
        return self.successResultOf(defer.Deferred.fromCoroutine(self.svc.handle(Env(type, b))))

    def error(self, type: str, b: dict[str, Any]) -> RemoteError:
        f = self.failureResultOf(defer.Deferred.fromCoroutine(self.svc.handle(Env(type, b))),
                                 RemoteError)
        return f.value

    def test_start_status_drain_stop(self) -> None:
        """start answers host/port at once; status lists it; drain makes it draining; stop
        answers once it is stopped; replies are valid registered reply bodies."""
        t, reply = self.call("runner.start", body())
        self.assertEqual(t, "runner.started")
        REGISTRY.check_outgoing(t, reply, "reply")
        self.assertEqual((reply["host"], reply["port"]), ("127.0.0.1", 20000))
        t, status = self.call("runner.status", {})
        REGISTRY.check_outgoing(t, status, "reply")
        self.assertEqual(status["instances"][0]["state"], "starting")
        self.assertEqual(status["isolation"]["off"], {"cpu": "no cpu controller"})
        self.probe.healthy.add(20000)
        self.reactor.advance(0.5)
        t, drained = self.call("runner.drain", {"instance_id": "i1"})
        REGISTRY.check_outgoing(t, drained, "reply")
        self.assertEqual(drained["state"], "draining")
        d = defer.Deferred.fromCoroutine(self.svc.handle(Env("runner.stop",
                                                             {"instance_id": "i1"})))
        self.assertNoResult(d)
        self.reactor.spawned[-1].exit(0)
        t, stopped = self.successResultOf(d)
        self.assertEqual((t, stopped), ("runner.stopped", {"instance_id": "i1",
                                                           "state": "stopped"}))

    def test_errors_have_stable_codes(self) -> None:
        """A bad start is bad_request, draining an unknown instance unknown_instance,
        build without a builder unavailable; stopping an unknown instance succeeds."""
        self.assertEqual(self.error("runner.start", body(uid=0)).code, "bad_request")
        self.assertEqual(self.error("runner.drain", {"instance_id": "nope"}).code,
                         "unknown_instance")
        self.assertEqual(self.error("runner.build", {"build_id": "b", "app": "a",
                                                     "tarball": b""}).code, "unavailable")
        t, _ = self.call("runner.stop", {"instance_id": "nope"})
        self.assertEqual(t, "runner.stopped")

    def test_heartbeats_and_registration(self) -> None:
        """A heartbeat per interval on topic hb with increasing seq (plus one at once
        when an instance changes state), the control endpoint and isolation; the node
        row is refreshed every register_interval."""
        self.call("runner.start", body())
        self.reactor.advance(0)  # the new instance (starting): one heartbeat at once
        self.assertEqual(len(self.pub.sent), 2)
        self.reactor.advance(1.0)
        self.reactor.advance(1.0)
        seqs = [b["seq"] for _, b, _ in self.pub.sent]
        self.assertEqual(seqs, [1, 2, 3, 4])
        t, hb, topic = self.pub.sent[-1]
        self.assertEqual((t, topic), ("runner.heartbeat", b"hb"))
        self.assertEqual(hb["control"], "tcp://127.0.0.1:7731")
        self.assertEqual(hb["instances"][0]["instance_id"], "i1")
        self.assertIn("instances", hb["load"])
        self.assertEqual(len(self.stores.store.nodes), 1)
        self.assertEqual(self.stores.store.nodes[0][:4],
                         ("n1", ("runner",), "tcp://127.0.0.1:7731", "b1"))
        self.reactor.advance(10)
        self.assertEqual(len(self.stores.store.nodes), 2)
        # the app UIDs it accepts: the scheduler places an app only where its UID fits
        self.assertEqual(self.stores.store.nodes[0][4]["uids"], [20000, 59999])

    def test_healthy_is_announced_at_once(self) -> None:
        """The heartbeat that tells the nexuses (and so the routers) an instance is
        healthy goes out in the reactor turn it became healthy, not up to
        heartbeat_interval later; changes in one turn make one heartbeat."""
        self.call("runner.start", body())
        self.reactor.advance(0)
        sent = len(self.pub.sent)
        self.probe.healthy.add(20000)
        self.reactor.advance(0.5)  # the boot health check passes (before the next beat)
        new = self.pub.sent[sent:]
        self.assertEqual(len(new), 1)
        self.assertEqual([i["state"] for i in new[0][1]["instances"]], ["healthy"])
        self.svc.changed()
        self.svc.changed()
        self.reactor.advance(0)
        self.assertEqual(len(self.pub.sent), sent + 2)

    def test_purge_app_refused_while_it_runs(self) -> None:
        """runner.purge_app for an app with a running instance is refused and keeps
        the data dir."""
        data = self.svc.data_dir / "appdata" / body()["app"]
        data.mkdir(parents=True)
        (data / "f").write_text("kept")
        self.call("runner.start", body())
        err = self.error("runner.purge_app", {"app": body()["app"], "uid": body()["uid"]})
        self.assertEqual(err.code, "app_running")
        self.assertEqual((data / "f").read_text(), "kept")

    def test_process_stats_samples(self) -> None:
        """Each running instance gets a 'process' stats sample every stats_interval."""
        self.call("runner.start", body())
        sink = self.svc.supervisor.sink
        self.reactor.advance(4)
        self.assertEqual(len(sink.stats), 0)
        self.reactor.advance(1)
        self.assertEqual(len(sink.stats), 1)
        sample = sink.stats[0]
        self.assertEqual((sample.app, sample.kind), ("hello", "process"))
        self.assertEqual(sample.values["process"], "web.1")
        self.reactor.advance(5)
        self.assertEqual(len(sink.stats), 2)


    def test_cpu_share_between_two_samples(self) -> None:
        """cpu_percent is the cgroup CPU time used between two samples over the time
        between them, in percent of one core; nothing on an instance's first sample,
        without accounting, or when the counter went back (a new cgroup)."""
        iid = self.call("runner.start", body())[1]["instance_id"]
        cpu = self.svc._cpu_percent
        self.assertIsNone(cpu(iid, 2_000_000))
        self.reactor.advance(4)
        self.assertEqual(cpu(iid, 4_000_000), 50.0)  # 2 s of CPU in 4 s
        self.reactor.advance(2)
        self.assertEqual(cpu(iid, 8_000_000), 200.0)  # two cores busy
        self.reactor.advance(2)
        self.assertIsNone(cpu(iid, 1_000))
        self.reactor.advance(2)
        self.assertEqual(cpu(iid, 1_000), 0.0)
        self.assertIsNone(cpu("other", None))
        # an instance that is gone is forgotten at the next sample
        d = defer.Deferred.fromCoroutine(self.svc.handle(Env("runner.stop",
                                                             {"instance_id": iid})))
        self.reactor.spawned[-1].exit(0)
        self.successResultOf(d)
        self.reactor.advance(10)
        self.assertEqual(self.svc._cpu_seen, {})


class RecoveryTests(SynchronousTestCase):
    def test_state_file_and_restart_from_it(self) -> None:
        """The state file records instances (0600); a new runner on the same data dir
        starts the wanted ones again on the same port and forgets stopped ones."""
        data = Path(self.mktemp())
        svc, reactor, *_ = make(data)
        svc.startService()
        svc.supervisor.start(body(instance_id="keep"))
        svc.supervisor.start(body(instance_id="gone", process_type="worker"))
        svc.supervisor.stop("gone")
        reactor.spawned[-1].exit(0)
        reactor.advance(0)
        path = data / "runner" / "state.json"
        self.assertEqual(path.stat().st_mode & 0o777, 0o600)
        saved = json.loads(path.read_text())
        self.assertEqual({r["spec"]["instance_id"]: r["state"] for r in saved["instances"]},
                         {"keep": "starting", "gone": "stopped"})
        svc.supervisor.cancel_timers()
        svc._beat.stop()

        svc2, reactor2, *_ = make(data)
        svc2.startService()
        self.addCleanup(svc2.supervisor.cancel_timers)
        self.addCleanup(svc2._beat.stop)
        self.successResultOf(svc2.whenReady())
        self.assertEqual(list(svc2.supervisor.instances), ["keep"])
        self.assertEqual(svc2.supervisor.get("keep").port, 20000)
        self.assertEqual(len(reactor2.spawned), 1)


class RecordCacheTests(SynchronousTestCase):
    def test_render_is_save_and_serialises_only_changes(self) -> None:
        """The state file a save renders parses to what ``save`` writes for the same body
        (restarts read it back the same), and a record equal to the last save's is not
        serialised again: its text is reused, a changed one is new."""
        from epio.runner import state as statefile

        cache = statefile.RecordCache()
        head = {"boot_id": "b1", "node_id": 'n"1'}
        a, b = {"state": "asleep", "port": 20000}, {"state": "healthy", "port": 20001}
        text = cache.render(head, [("a", a), ("b", b)])
        path = Path(self.mktemp())
        statefile.save(path, {**head, "instances": [a, b]})
        self.assertEqual(json.loads(text), json.loads(path.read_text()))
        statefile.save_text(path, text)
        self.assertEqual(statefile.load(path), json.loads(text))
        a_text = cache._texts["a"][1]
        again = cache.render(head, [("a", dict(a)), ("b", {**b, "state": "asleep"})])
        self.assertIs(cache._texts["a"][1], a_text)
        self.assertEqual(json.loads(again)["instances"], [a, {**b, "state": "asleep"}])
        self.assertEqual(json.loads(cache.render(head, []))["instances"], [])
        self.assertEqual(cache._texts, {})


class StartLogTests(SynchronousTestCase):
    def test_unsized_dev_shm_is_said_at_start(self) -> None:
        """A runner whose bubblewrap has no --size says at start that /dev/shm has no
        runner.shm_mb bound and is charged to the instance's memory limit; one whose
        bubblewrap has it says nothing of the kind."""
        from twisted.logger import globalLogPublisher

        seen: list[dict[str, Any]] = []
        observer: Any = seen.append  # an ILogObserver
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        for sized in (True, False):
            iso = Isolation("bwrap", True, ("pid",), ("memory",), True, {}, shm_size=sized)
            svc, *_ = make(Path(self.mktemp()), iso=iso)
            svc.startService()
            svc._beat.stop()
            svc.supervisor.cancel_timers()
            said = [e for e in seen if "has no --size" in e.get("log_format", "")]
            self.assertEqual(len(said), 0 if sized else 1, said)
        self.assertIn("count against the instance's memory limit", said[0]["log_format"])


class AdvertiseTests(SynchronousTestCase):
    def test_control_advertise(self) -> None:
        """A wildcard bind is advertised with advertise_host (IPv6 in brackets)."""
        self.assertEqual(control_advertise("tcp://0.0.0.0:7731", "10.0.0.5"),
                         "tcp://10.0.0.5:7731")
        self.assertEqual(control_advertise("tcp://*:7731", "::1"), "tcp://[::1]:7731")
        self.assertEqual(control_advertise("tcp://127.0.0.1:7731", "x"), "tcp://127.0.0.1:7731")
        self.assertEqual(control_advertise("tcp://0.0.0.0:1", "x", "tcp://y:2"), "tcp://y:2")


class StopOrderTests(SynchronousTestCase):
    def test_fence_goes_last_after_every_app_process(self) -> None:
        """On a clean stop the runner SIGTERMs its instances, then stops its children
        one at a time in reverse start order; the network fence (the first child)
        removes its table only after the instances exited AND the
        ``epio run`` sessions' stop finished (their processes gone) -- never while an
        app-UID process may still run; a start request meanwhile is refused."""
        from twisted.application.service import Service
        from twisted.internet import task

        from epio.config import validate
        from epio.runner.fence import app_reach, app_uids, make_fence

        from .test_fence import FakeNft, FakeNode, FakeSupervisor

        nft = FakeNft()
        events: list[str] = []
        sessions_gone: defer.Deferred[None] = defer.Deferred()

        class Sessions(Service):
            """Stands for the session manager: stopping waits for its processes."""

            def stopService(self) -> defer.Deferred[None]:
                super().stopService()
                events.append("sessions stopping")
                return sessions_gone.addCallback(lambda _: events.append("sessions gone"))

        node = FakeNode(validate({"build": {"user": "no-such-epio-user"}}), ("runner",),
                        task.Clock())
        fence = make_fence(node.reactor, node.config.settings, node.roles, node.data_dir,
                           app_reach(FakeSupervisor(), None),
                           uids=app_uids(FakeSupervisor(), None), nft_binary="/usr/sbin/nft",
                           euid=0, nft=nft, in_thread=lambda f, *a: defer.maybeDeferred(f, *a))
        # the order make_service gives: the fence first, the sessions after the router
        svc, reactor, _, _, _ = make(Path(self.mktemp()), gates=[fence.ready],
                                     before_router=[fence], after_router=[Sessions()])
        self.assertIs(list(svc)[0], fence)
        svc.startService()
        self.addCleanup(svc.supervisor.cancel_timers)
        self.successResultOf(defer.Deferred.fromCoroutine(svc.handle(Env("runner.start",
                                                                         body()))))
        reactor.advance(0.1)
        proc = reactor.spawned[-1]
        stopped = svc.stopService()
        self.assertNoResult(stopped)
        self.assertEqual((events, nft.deleted), ([], []))  # the instance still runs
        refused = self.failureResultOf(defer.Deferred.fromCoroutine(
            svc.handle(Env("runner.start", body(instance_id="i2")))), RemoteError)
        self.assertEqual(refused.value.code, "unavailable")
        proc.exit(0)
        self.assertEqual((events, nft.deleted), (["sessions stopping"], []))
        reactor.advance(30)  # however long the sessions take
        self.assertEqual(nft.deleted, [])
        self.assertTrue(fence.running)
        sessions_gone.callback(None)
        self.assertEqual(events, ["sessions stopping", "sessions gone"])
        self.assertEqual(nft.deleted, [fence.plan.table])
        self.assertIsNone(self.successResultOf(stopped))
        self.assertFalse(fence.running)


HOST = {"id": "boot-1/net:[4026531840]", "pid": 1, "start": 5, "pidns": 77}


def runner_row(node_id: str, uids: list[int], ports: list[int], host: dict[str, Any],
               last_seen: float = 0.0) -> NodeInfo:
    return NodeInfo(node_id, ("runner",), None, None, last_seen,
                    {"uids": uids, "ports": ports, "host": host})


class RangeTests(SynchronousTestCase):
    def test_overlaps_are_named(self) -> None:
        """An overlap of the UID range or the instance port range with another runner
        is one sentence each naming both ranges and the other runner; touching ends
        overlap; disjoint ranges and the runner itself are no conflict."""
        mine = RangeClaim("a", (20000, 20999), (21000, 21099))
        self.assertEqual(range_conflicts(mine, [
            RangeClaim("a", (20000, 20999), (21000, 21099)),
            RangeClaim("b", (21000, 21999), (21100, 21199)),
        ]), [])
        self.assertEqual(range_conflicts(mine, [RangeClaim("c", (20999, 21500),
                                                           (21099, 21200))]), [
            "its app UIDs runner.uid_min-uid_max 20000-20999 overlap 20999-21500 of runner "
            "c on this host",
            "its instance ports runner.port_min-port_max 21000-21099 overlap 21099-21200 of "
            "runner c on this host"])

    def test_only_live_runners_of_this_host_count(self) -> None:
        """claims_on_host keeps the runners registered with this host's identity whose
        process is alive (or, where that cannot be told, registered within max_age);
        other hosts (UIDs are per host: they may overlap) and rows without ranges are
        left out."""
        other_host = {**HOST, "id": "boot-2/net:[1]"}
        rows = [("same-live", 0.0, runner_row("x", [1, 2], [3, 4], {**HOST, "pid": 10}).status),
                ("same-dead", 0.0, runner_row("x", [1, 2], [3, 4], {**HOST, "pid": 11}).status),
                ("same-other-ns-fresh", 95.0,
                 runner_row("x", [1, 2], [3, 4], {**HOST, "pid": 12, "pidns": 1}).status),
                ("same-other-ns-stale", 50.0,
                 runner_row("x", [1, 2], [3, 4], {**HOST, "pid": 13, "pidns": 1}).status),
                ("elsewhere", 100.0, runner_row("x", [1, 2], [3, 4], other_host).status),
                ("old-row", 100.0, {"uids": [1, 2]})]
        alive = {10: True, 11: False}

        def check(where: Any) -> bool | None:
            return alive[where["pid"]] if where["pidns"] == 77 else None

        claims = claims_on_host(rows, HOST["id"], 100.0, 30.0, check)
        self.assertEqual([c.node_id for c in claims], ["same-live", "same-other-ns-fresh"])
        self.assertEqual(claims[0], RangeClaim("same-live", (1, 2), (3, 4)))

    def test_runner_refuses_to_start_beside_an_overlapping_runner(self) -> None:
        """At its first registration a runner whose UID range overlaps that of a live
        runner of the same host in the store does not register and is refused with
        one sentence naming both ranges and the keys; with the other runner gone from
        the store (or on another host) it registers its ranges and host."""
        import os

        from epio.runner.fence import pid_namespace, proc_start

        me = {"id": HOST["id"], "pid": os.getpid(), "start": proc_start(os.getpid()),
              "pidns": pid_namespace()}
        refused: list[str] = []
        svc, reactor, _, stores, _ = make(
            Path(self.mktemp()), ranges=RangeClaim("n1", (20000, 59999), (20000, 20009)),
            host=me, refuse=refused.append)
        # another live runner of this host: this very process stands for it
        stores.store.others = [runner_row("n0", [50000, 50999], [30000, 30099], me)]
        svc.startService()
        self.addCleanup(svc.supervisor.cancel_timers)
        reactor.advance(0)
        self.assertEqual(refused, [
            "epio: the runner cannot start: its app UIDs runner.uid_min-uid_max 20000-59999 "
            "overlap 50000-50999 of runner n0 on this host. Runners on one host must use "
            "disjoint runner.uid_min/uid_max and runner.port_min/port_max (docs/runner.md)"])
        self.assertEqual(stores.store.nodes, [])
        stores.store.others = [runner_row("n0", [50000, 50999], [30000, 30099],
                                          {**me, "id": "another-host"})]
        reactor.advance(10)
        self.assertEqual(len(refused), 1)
        status = stores.store.nodes[-1][4]
        self.assertEqual((status["uids"], status["ports"], status["host"]),
                         ([20000, 59999], [20000, 20009], me))
        svc.stopService()
