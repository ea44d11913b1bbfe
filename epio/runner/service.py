"""The ``runner`` role: control ROUTER, heartbeats, state file, supervisor.

``make_service(node)`` is the role's composition root (docs/architecture.md): it
detects what the host allows (root, bubblewrap, setpriv, cgroups v1, nft), builds
every object once with its collaborators passed to its constructor, and returns a
:class:`RunnerService` (which logs exactly which protections are off) holding:

* a bus ROUTER at ``runner.control_bind`` answering ``runner.start``,
  ``runner.stop``, ``runner.drain``, ``runner.status`` and ``runner.build``;
* a PUB connected to every ``cluster.nexus[*].heartbeat`` publishing
  ``runner.heartbeat`` (topic ``hb``) every ``runner.heartbeat_interval``;
* the node's row in the store (``upsert_node``) refreshed every
  ``runner.register_interval``;
* the :class:`~epio.runner.supervisor.Supervisor` and its state file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import attrs
from attrs import frozen
from twisted.application.service import IService, MultiService
from twisted.internet import defer, task, threads
from twisted.logger import Logger

from epio.runner import state as statefile
from epio.runner.cgroups import CgroupSupport, detect, stale_cgroups
from epio.runner.health import NetworkProbe
from epio.runner.images import FetchingImages, ImageServer
from epio.runner.ports import NoFreePort, PortAllocator, bindable
from epio.runner.sandbox import DEFAULT_SHM_BYTES, Isolation, detect_isolation, shm_args
from epio.runner.supervisor import (
    InstanceSpec,
    Settings,
    ShuttingDown,
    SpecError,
    State,
    Supervisor,
    UnknownInstance,
    busy_ports,
)
from epio.runner.users import RangeClaim, claims_on_host, host_identity, range_conflicts, refusal
from epio.services import OrderedMultiService

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall

    from epio.bus.envelope import Envelope
    from epio.bus.sockets import Dealer, Publisher
    from epio.bus.sockets import RouterHandler as Handler
    from epio.config.settings import RunnerSettings
    from epio.metrics import Family
    from epio.node import INodeReactor, Node
    from epio.pipeline import BusLogSink, IStatsSink
    from epio.runner.build import Builder
    from epio.runner.build.images import ImageStore
    from epio.runner.fence import NetworkFence
    from epio.runner.sessions import SessionManager
    from epio.runner.snapshots import SnapshotService
    from epio.runner.static import StaticServer
    from epio.store import Store, StoreService

HEARTBEAT_TOPIC = b"hb"


def control_advertise(bind: str, advertise_host: str, explicit: str = "") -> str:
    """The control endpoint to publish: ``explicit``, or ``bind`` with a wildcard
    host replaced by ``advertise_host``."""
    if explicit:
        return explicit
    parts = urlsplit(bind)
    host = parts.hostname or ""
    if parts.scheme == "tcp" and host in ("", "*", "0.0.0.0", "::"):
        h = f"[{advertise_host}]" if ":" in advertise_host else advertise_host
        return f"tcp://{h}:{parts.port}"
    return bind


def cgroup_parent(name: str, data_dir: Path) -> str:
    """``NAME/<runner key>``: each runner (one per data dir) owns its own sub-cgroup, so a
    restarting runner cleans only its own leftovers, never another runner's on the host."""
    key = hashlib.sha256(str(Path(data_dir).absolute()).encode()).hexdigest()[:12]
    return f"{name}/runner-{key}"


def host_load(ncpu: int | None = None) -> dict[str, float]:
    """cpu: 1-minute load per core; mem: fraction of memory in use."""
    out: dict[str, float] = {}
    try:
        out["cpu"] = round(os.getloadavg()[0] / (ncpu or os.cpu_count() or 1), 3)
    except OSError:
        pass
    try:
        info = {}
        for line in Path("/proc/meminfo").read_text().splitlines():
            k, _, v = line.partition(":")
            info[k] = int(v.split()[0])
        out["mem"] = round(1 - info["MemAvailable"] / info["MemTotal"], 3)
    except (OSError, KeyError, ValueError, ZeroDivisionError):
        pass
    return out


@frozen
class BwrapTrial:
    """What the trial run found: bubblewrap works here, and takes ``--size``."""

    works: bool
    shm_size: bool = True


BWRAP_TRIAL_TIMEOUT = 10.0  # seconds one trial run of bubblewrap may take


def bwrap_trial(bwrap: str, shm_bytes: int = DEFAULT_SHM_BYTES,
                run: Callable[..., Any] = subprocess.run) -> BwrapTrial:
    """Can bubblewrap make the namespaces and the /dev/shm we use here?  (Run once,
    before the reactor; ``run`` is for tests.)  The trial mounts /dev/shm with the
    exact options the sandbox uses (:func:`shm_args`); when that bubblewrap does not
    know ``--size`` (before 0.7.0, e.g. Ubuntu 22.04's 0.6.1) it tries again without
    it, and the sandbox then mounts an unsized /dev/shm."""
    argv = [bwrap, "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--die-with-parent",
            "--new-session", "--ro-bind", "/usr", "/usr", "--proc", "/proc", "--dev", "/dev"]
    for name in ("bin", "lib", "lib64"):
        p = Path("/") / name
        if p.is_symlink():
            argv += ["--symlink", os.readlink(p), f"/{name}"]

    def attempt(sized: bool) -> tuple[bool, bytes]:
        try:
            r = run([*argv, *shm_args(shm_bytes, sized), "--", "/usr/bin/true"],
                    capture_output=True, timeout=BWRAP_TRIAL_TIMEOUT)
        except (OSError, subprocess.SubprocessError) as e:
            return False, str(e).encode()
        return r.returncode == 0, r.stderr or b""

    ok, err = attempt(True)
    if ok:
        return BwrapTrial(True, True)
    if b"--size" in err:  # "bwrap: Unknown option --size"
        return BwrapTrial(attempt(False)[0], False)
    return BwrapTrial(False)


class RunnerService(OrderedMultiService):
    """Control, heartbeats, registration and recovery around one Supervisor.

    Its children are given to the constructor in start order: ``before_router``, the
    control ROUTER (``router`` makes it around :meth:`handle`), ``after_router``
    (:func:`make_service` lists them).  Stop order (docs/runner.md): the
    supervisor's instances first (SIGTERM, ``shutdown_grace``, SIGKILL), then the
    children in reverse start order, one at a time -- the snapshot job, the static
    server, the ``epio run`` sessions (their processes gone), the peer DEALERs, the
    control ROUTER, the heartbeat publisher, the log sink -- and the network fence,
    the first child, last: no app-UID process of this runner is left when it goes.
    """

    log = Logger()

    def __init__(
        self,
        *,
        reactor: INodeReactor,
        supervisor: Supervisor,
        isolation: Isolation,
        cgroups: CgroupSupport,
        images: FetchingImages,
        data_dir: Path,
        node_id: str,
        boot_id: str,
        roles: frozenset[str] | tuple[str, ...] = ("runner",),
        control: str = "",
        heartbeat_interval: float = 1.0,
        register_interval: float = 10.0,
        shutdown_grace: float = 10.0,
        publisher: Publisher | None = None,
        store_service: StoreService | None = None,
        builder: Builder | None = None,
        image_server: ImageServer | None = None,
        stats: IStatsSink | None = None,
        stats_interval: float = 0.0,
        sessions: SessionManager | None = None,
        static_server: StaticServer | None = None,
        fence: NetworkFence | None = None,
        before_router: Sequence[IService] = (),
        router: Callable[[Handler], IService] | None = None,
        after_router: Sequence[IService] = (),
        ranges: RangeClaim | None = None,
        host: Mapping[str, Any] | None = None,
        refuse: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # Twisted leaves it untyped
        # this runner's UID and port ranges, checked against the other live runners of
        # this host (``host``: host_identity and this process) at its first
        # registration; ``refuse`` ends the node when they overlap (node.exit)
        self.ranges = ranges
        self.host = dict(host or {})
        self.refuse = refuse
        self._ranges_checked = False
        self.reactor = reactor
        self.supervisor = supervisor
        self.isolation = isolation
        self.cgroups = cgroups
        self.images = images
        self.data_dir = Path(data_dir)
        self.node_id = node_id
        self.boot_id = boot_id
        self.roles = tuple(sorted(roles))
        self.control = control
        self.heartbeat_interval = heartbeat_interval
        self.register_interval = register_interval
        self.shutdown_grace = shutdown_grace
        self.publisher = publisher
        self.store_service = store_service
        self.builder = builder
        self.image_server = image_server
        self.sessions = sessions  # epio run sessions (epio.runner.sessions)
        self.static_server = static_server  # docs/static.md
        self.fence = fence  # the network fence (docs/security.md)
        self.stats = stats
        self.stats_interval = stats_interval
        self._last_stats = -1e18
        # instance id -> (cgroup CPU time in µs, when read): the next sample's CPU share
        # is the time used between two reads over the time between them
        self._cpu_seen: dict[str, tuple[int, float]] = {}
        self.state_path = self.data_dir / "runner" / "state.json"
        self.seq = 0
        self.heartbeats_sent = 0
        self.heartbeats_dropped = 0
        self._save_call: IDelayedCall | None = None
        self._records = statefile.RecordCache()  # the state file's records as JSON text
        self._announce_call: IDelayedCall | None = None
        self._beat: task.LoopingCall | None = None
        self._last_register = -1e18
        self._ready: defer.Deferred[None] = defer.Deferred()
        self._started = False  # startService went through (its children all started)
        # the children in start order (they stop in reverse, one at a time): the control
        # ROUTER, made here around this runner's handler, between the two groups
        self.router = router(self.handle) if router is not None else None
        for child in [*before_router, self.router, *after_router]:
            if child is not None:
                child.setServiceParent(self)

    # -- lifecycle -------------------------------------------------------------

    def whenReady(self) -> defer.Deferred[None]:
        """Fires once the previous run's state has been cleaned and re-applied."""
        d: defer.Deferred[None] = defer.Deferred()

        def fire(result: Any) -> Any:
            d.callback(None)
            return result

        self._ready.addBoth(fire)
        return d

    def startService(self) -> None:
        self.log.info(
            "runner {node}: sandbox={sandbox} uid_switch={uid} namespaces={ns} cgroups={cg}",
            node=self.node_id, sandbox=self.isolation.sandbox, uid=self.isolation.uid_switch,
            ns=",".join(self.isolation.namespaces) or "none",
            cg=",".join(self.isolation.cgroups) or "none",
        )
        for what, why in sorted(self.isolation.off.items()):
            self.log.warn("runner isolation OFF: {what}: {why}", what=what, why=why)
        if self.isolation.sandbox == "bwrap" and not self.isolation.shm_size:
            self.log.warn("runner: this bubblewrap has no --size (it needs 0.7.0): each "
                          "instance's /dev/shm is a tmpfs without runner.shm_mb as its "
                          "size; its pages count against the instance's memory limit "
                          "(docs/runner.md)")
        self.log.info("runner network: apps share the host network; the network fence "
                      "(its own log line) refuses their connections to the control plane")
        super().startService()  # type: ignore[no-untyped-call]  # Twisted leaves it untyped
        # started (a child that cannot bind raised above: the node stops, and this
        # run, which never read the state file, must not overwrite it)
        self._started = True
        d = defer.Deferred.fromCoroutine(self._recover())
        d.addErrback(lambda f: self.log.failure("runner recovery failed", f))
        d.addBoth(lambda _: self._ready.callback(None))
        self._beat = task.LoopingCall(self._heartbeat)
        self._beat.clock = self.reactor
        self._beat.start(self.heartbeat_interval, now=True).addErrback(
            lambda f: self.log.failure("heartbeat loop died", f))

    def stopService(self) -> defer.Deferred[None]:
        if self._beat is not None and self._beat.running:
            self._beat.stop()
        if self.image_server is not None:
            self.image_server.close()
        d = self.supervisor.shutdown(self.shutdown_grace)
        if self._started:
            d.addBoth(lambda _: self._save_now())
        d.addBoth(lambda _: self._remove_empty_cgroups())
        d.addBoth(lambda _: OrderedMultiService.stopService(self))
        return d

    # -- recovery ----------------------------------------------------------------

    async def _recover(self) -> None:
        old = statefile.load(self.state_path)
        records = [r for r in (old or {}).get("instances", []) if isinstance(r, dict)]
        killed = statefile.kill_leftovers(records)
        if killed:
            self.log.warn("killed {n} leftover processes of the previous runner", n=killed)
        # before the first await: a runner.start may arrive while we wait below
        shutil.rmtree(self.data_dir / "runner" / "instances", ignore_errors=True)
        for cg in stale_cgroups(self.cgroups, keep=()):
            cg.signal_all()
            for _ in range(20):
                if cg.remove():
                    break
                await task.deferLater(self.reactor, 0.1, lambda: None)
            else:
                self.log.warn("stale cgroup {name} could not be removed", name=cg.name)
        wanted = [r for r in records
                  if r.get("state") not in (State.STOPPED.value, State.FAILED.value)
                  and isinstance(r.get("spec"), dict)]
        wanted_digests = {str(r["spec"].get("image_digest", "")).removeprefix("sha256:")
                          for r in wanted}
        mounts_dir = self.data_dir / "mounts"
        for mp in statefile.mounted_under(mounts_dir):
            if mp.name not in wanted_digests:
                try:
                    await self.images.unmount(mp.name, force=True)
                    self.log.info("unmounted stale image mount {path}", path=str(mp))
                except Exception as e:
                    self.log.warn("cannot unmount stale {path}: {error}", path=str(mp),
                                  error=str(e))
        for r in wanted:
            try:
                self.supervisor.start(r["spec"], port=r.get("port"))
                self.log.info("restarted instance {i} from the previous run's state",
                              i=r["spec"].get("instance_id"))
            except Exception as e:
                self.log.error("cannot restart instance {i}: {error}",
                               i=r["spec"].get("instance_id"), error=str(e))
        self._save_now()

    def _remove_empty_cgroups(self) -> None:
        """Leave no empty cgroup of ours behind (busy ones are cleaned at the next start)."""
        for base in self.cgroups.bases.values():
            try:
                children = [p for p in base.iterdir() if p.is_dir()]
            except OSError:
                continue
            for child in children:
                try:
                    child.rmdir()
                except OSError:
                    pass
            try:
                base.rmdir()
            except OSError:
                pass

    # -- state file --------------------------------------------------------------

    def changed(self) -> None:
        """The supervisor's observer: save the state file and announce the change."""
        if self._save_call is None or not self._save_call.active():
            self._save_call = self.reactor.callLater(0, self._save_now)
        # an instance became healthy (or left): the nexuses, and through them the
        # routers, learn it from one more heartbeat now rather than at the next beat
        # (up to heartbeat_interval later); changes in one reactor turn make one
        if self._announce_call is None or not self._announce_call.active():
            self._announce_call = self.reactor.callLater(0, self._announce)

    def _announce(self) -> None:
        if self.publisher is None or self._beat is None or not self._beat.running:
            return
        try:
            if self.publisher.publish("runner.heartbeat", self.heartbeat_body(),
                                      topic=HEARTBEAT_TOPIC):
                self.heartbeats_sent += 1
            else:
                self.heartbeats_dropped += 1
        except Exception:
            self.log.failure("heartbeat failed")

    def _save_now(self) -> None:
        records = []
        for inst in self.supervisor.instances.values():
            launch = inst.launch
            records.append((inst.spec.instance_id, {
                "spec": inst.spec.to_message(), "state": inst.state.value, "port": inst.port,
                "uid": inst.spec.uid, "restarts": inst.restarts,
                "pid": launch.pid if launch else None,
                "start_time": launch.start_time if launch else None,
                "group": launch.group if launch else None,
                "cgroups": ({c: str(p) for c, p in launch.cgroup.paths.items()}
                            if launch and launch.cgroup else {}),
                "scratch": launch.scratch if launch else None,
                "image": launch.image if launch else None,
            }))
        try:
            statefile.save_text(self.state_path, self._records.render(
                {"boot_id": self.boot_id, "node_id": self.node_id}, records))
        except OSError as e:
            self.log.error("cannot write runner state {path}: {error}",
                           path=str(self.state_path), error=str(e))

    # -- heartbeats and registration ----------------------------------------------

    def status_body(self, tail: bool = True) -> dict[str, Any]:
        """``runner.status``: instances that are not healthy carry their last lines of
        output (``tail``); heartbeats leave those out."""
        return {
            "node_id": self.node_id, "boot_id": self.boot_id,
            "instances": self.supervisor.heartbeat_instances(tail),
            "isolation": self.isolation.as_dict(), "control": self.control,
            "advertise_host": self.supervisor.settings.advertise_host,
            "load": self._load(),
        }

    def _load(self) -> dict[str, Any]:
        load: dict[str, Any] = host_load()
        load["instances"] = sum(1 for i in self.supervisor.instances.values() if i.running)
        return load

    def heartbeat_body(self) -> dict[str, Any]:
        self.seq += 1
        body = self.status_body(tail=False)
        body.update(seq=self.seq, interval=self.heartbeat_interval)
        if self.static_server is not None:
            body.update(self.static_server.announcement())
        return body

    def _heartbeat(self) -> None:
        try:
            if self.publisher is not None:
                if self.publisher.publish("runner.heartbeat", self.heartbeat_body(),
                                          topic=HEARTBEAT_TOPIC):
                    self.heartbeats_sent += 1
                else:
                    self.heartbeats_dropped += 1
            self.supervisor.poll_oom()
            watched = self.supervisor.watched_ports()
            if watched:
                self.supervisor.check_idle(busy_ports(watched))
            now = self.reactor.seconds()
            if self.stats is not None and self.stats_interval > 0 \
                    and now - self._last_stats >= self.stats_interval:
                self._last_stats = now
                self._emit_stats()
            if self.store_service is not None and now - self._last_register >= self.register_interval:
                self._last_register = now
                d = defer.Deferred.fromCoroutine(self._register())
                d.addErrback(lambda f: self.log.warn("registering the node in the store "
                                                     "failed: {error}", error=f.getErrorMessage()))
        except Exception:
            self.log.failure("heartbeat failed")

    def _emit_stats(self) -> None:
        """One ``process`` stats sample per running instance (memory from its cgroup)."""
        if self.stats is None:
            return
        for inst in self.supervisor.instances.values():
            launch = inst.launch
            if launch is None or not inst.running:
                continue
            values: dict[str, Any] = {"instance_id": inst.spec.instance_id,
                                      "process": inst.spec.source, "node": self.node_id,
                                      "restarts": inst.restarts, "state": inst.state.value}
            if launch.cgroup is not None:
                mem = launch.cgroup.memory_usage()
                if mem is not None:
                    values["memory_bytes"] = mem
                    values["memory_limit_bytes"] = inst.spec.limits.memory_mb * 1024 * 1024
                cpu = self._cpu_percent(inst.spec.instance_id, launch.cgroup.cpu_usage_usec())
                if cpu is not None:
                    values["cpu_percent"] = cpu
                values["processes"] = len(launch.cgroup.pids())
            self.stats.emit_stats(inst.spec.app, "process", values)
        live = {i.spec.instance_id for i in self.supervisor.instances.values()
                if i.launch is not None and i.running}
        for gone in set(self._cpu_seen) - live:
            del self._cpu_seen[gone]

    def _cpu_percent(self, instance_id: str, used_usec: int | None) -> float | None:
        """CPU of one instance since its previous sample, in percent of one core (100:
        one core busy all the time); None on its first sample (nothing to compare) or
        without CPU accounting (no ``cpuacct`` cgroup)."""
        if used_usec is None:
            return None
        now = self.reactor.seconds()
        before = self._cpu_seen.get(instance_id)
        self._cpu_seen[instance_id] = (used_usec, now)
        if before is None or now <= before[1] or used_usec < before[0]:
            return None
        return round((used_usec - before[0]) / 1e6 / (now - before[1]) * 100, 1)

    async def _register(self) -> None:
        if self.store_service is None:
            return
        store = await self.store_service.whenReady()
        if self.ranges is not None and not self._ranges_checked:
            problems = await self._range_conflicts(store)
            if problems:
                why = refusal(problems)
                self.log.error("{why}", why=why)
                if self.refuse is not None:
                    self.refuse(why)
                return
            self._ranges_checked = True
        await store.upsert_node(
            self.node_id, self.roles, control_endpoint=self.control, boot_id=self.boot_id,
            status={"isolation": self.isolation.as_dict(),
                    "advertise_host": self.supervisor.settings.advertise_host,
                    # the app UIDs it accepts: the scheduler places an app only where
                    # its UID is in range (every node should use the same range)
                    "uids": [self.supervisor.settings.uid_min,
                             self.supervisor.settings.uid_max],
                    # checked by the next runner of this host (RangeClaim)
                    **({"ports": list(self.ranges.ports), "host": self.host}
                       if self.ranges is not None else {}),
                    "instances": len(self.supervisor.instances)},
        )

    async def _range_conflicts(self, store: Store) -> list[str]:
        """The overlaps of this runner's ranges with the other live runners of this
        host registered in the store (UIDs and ports are per host: runners of other
        hosts may, and for failover should, use the same ranges)."""
        from epio.runner.fence import pid_namespace, proc_start

        assert self.ranges is not None
        my_ns = pid_namespace()

        def alive(where: Mapping[str, Any]) -> bool | None:
            pid, start = where.get("pid"), where.get("start")
            if my_ns is None or where.get("pidns") != my_ns or not isinstance(pid, int):
                return None  # another pid namespace: its registration's age decides
            return proc_start(pid) == start

        nodes = [(n.id, n.last_seen, n.status) for n in await store.list_nodes("runner")
                 if n.id != self.node_id]
        claims = claims_on_host(nodes, str(self.host.get("id", "")), self.reactor.seconds(),
                                3 * self.register_interval, alive)
        return range_conflicts(self.ranges, claims)

    # -- control -------------------------------------------------------------------

    async def handle(self, env: Envelope) -> tuple[str, dict[str, Any]]:
        """The control ROUTER's handler."""
        from epio.bus import RemoteError

        body = env.body
        t = env.type
        if t in ("runner.start", "runner.stop", "runner.drain") and not self._ready.called:
            # the previous run's leftovers are being cleaned: changes wait for that
            await self.whenReady()
        if t.startswith("run.") and self.sessions is not None:
            reply: tuple[str, dict[str, Any]] = await self.sessions.handle(env)  # epio run
            return reply
        try:
            if t == "runner.start":
                return "runner.started", self.supervisor.start(body)
            if t == "runner.stop":
                iid = body["instance_id"]  # a required field (epio.bus.messages)
                grace = body.get("grace")
                try:
                    await self.supervisor.stop(iid, None if grace is None else float(grace))
                except UnknownInstance:
                    pass  # already gone: stopping is idempotent
                return "runner.stopped", {"instance_id": iid, "state": "stopped"}
            if t == "runner.drain":
                return "runner.draining", self.supervisor.drain(body["instance_id"])
            if t == "runner.wake":
                return "runner.waking", {"app": body["app"],
                                         "instances": self.supervisor.wake(body["app"])}
            if t == "runner.purge_app":
                return "runner.purged", await self._purge_app(body["app"], body["uid"])
            if t == "runner.status":
                return "runner.status_reply", self.status_body()
            if t in ("runner.snapshots", "runner.snapshot_restore"):
                return await self._snapshots(t, body)
            if t == "runner.build":
                return "runner.built", await self._build(body)
            if t == "runner.fetch_image":
                return "runner.image_chunk", await self._chunk(body)
        except SpecError as e:
            raise RemoteError("bad_request", str(e)) from None
        except ShuttingDown as e:
            raise RemoteError("unavailable", str(e)) from None
        except NoFreePort as e:
            raise RemoteError("no_port", str(e)) from None
        except UnknownInstance as e:
            raise RemoteError("unknown_instance", f"no instance {e.args[0]!r} here") from None
        raise RemoteError("bad_request", f"the runner does not handle {t}")

    async def _purge_app(self, app: str, uid: int) -> dict[str, Any]:
        """Delete a purged app's data dir (in a thread: it can be large)."""
        from twisted.internet import threads

        from epio.addons.btrfs import BtrfsError
        from epio.bus import RemoteError
        from epio.runner.launcher import purge_app_data
        from epio.runner.users import UserError

        running = [i.spec.instance_id for i in self.supervisor.instances.values()
                   if i.spec.app == app and i.state.value != "stopped"]
        if running:
            raise RemoteError("app_running", f"{app} still runs here ({', '.join(running)}); "
                              "its data is kept")
        try:
            deleted = await threads.deferToThreadPool(
                self.reactor, self.reactor.getThreadPool(), purge_app_data,
                self.data_dir, app, uid, self.isolation.uid_switch)
        except UserError as e:
            raise RemoteError("bad_request", str(e)) from None
        except (OSError, BtrfsError) as e:
            self.log.error("deleting the data of purged app {app} failed: {error}", app=app,
                           error=str(e))
            raise RemoteError("purge_failed", f"deleting {app}'s data failed: {e}") from None
        if deleted:
            self.log.info("data dir of purged app {app} (uid {uid}) deleted", app=app, uid=uid)
        return {"app": app, "deleted": bool(deleted)}

    async def _snapshots(self, t: str, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """List or restore the btrfs snapshots of a dedicated data dir (docs/databases.md);
        a restore is refused while an instance using that data dir runs here."""
        from twisted.internet import threads

        from epio.bus import RemoteError
        from epio.runner import snapshots
        from epio.runner.supervisor import State

        app, addon_dir = str(body.get("app")), str(body.get("addon_dir"))
        pool = self.reactor.getThreadPool()
        try:
            if t == "runner.snapshots":
                found = await threads.deferToThreadPool(
                    self.reactor, pool, snapshots.list_snapshots, self.data_dir, app, addon_dir)
                return "runner.snapshot_list", {"snapshots": found}
            for inst in self.supervisor.instances.values():
                if (inst.spec.app == app and inst.spec.env.get("EPIO_SERVICE_DIR") == addon_dir
                        and inst.state not in (State.STOPPED, State.FAILED)):
                    raise RemoteError("server_running", f"{addon_dir} of {app} is in use by "
                                      f"instance {inst.spec.instance_id}: stop it first")
            kept = await threads.deferToThreadPool(
                self.reactor, pool, snapshots.restore_snapshot, self.data_dir, app, addon_dir,
                str(body.get("id")), self.reactor.seconds())
            self.log.info("btrfs snapshot {id} restored into {dir} of {app}; the previous data "
                          "is kept as {kept}", id=body.get("id"), dir=addon_dir, app=app,
                          kept=kept)
            return "runner.snapshot_restored", {"kept_as": kept}
        except snapshots.SnapshotError as e:
            raise RemoteError(e.code, str(e)) from None
        except OSError as e:
            raise RemoteError("snapshot_failed", f"{type(e).__name__}: {e.strerror}") from None

    async def _chunk(self, body: dict[str, Any]) -> dict[str, Any]:
        from epio.bus import RemoteError
        from epio.runner.build.images import ImageError

        if self.image_server is None:
            raise RemoteError("no_image", "this runner serves no images")
        offset = body["offset"]
        if offset < 0:
            raise RemoteError("bad_request", "offset must be >= 0")
        try:
            return dict(await self.image_server.chunk(body["digest"], offset))
        except ImageError as e:
            raise RemoteError("no_image", str(e)) from None

    async def _build(self, body: dict[str, Any]) -> dict[str, Any]:
        from epio.bus import RemoteError

        if self.builder is None:
            raise RemoteError("unavailable", "this runner has no builder")
        from epio.runner.build import BuildFailed
        from epio.runner.users import UserError, check_app_name

        build_id, app, tarball = body["build_id"], body["app"], body["tarball"]
        env = body.get("env") or {}
        created = body.get("app_created")  # None from an older api: no check
        try:
            check_app_name(app)
        except UserError as e:
            raise RemoteError("bad_request", str(e)) from None
        if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                for k, v in env.items()):
            raise RemoteError("bad_request", "env must map names to strings")
        uploads = self.data_dir / "runner" / "uploads"
        path = uploads / f"{app}-{os.urandom(8).hex()}.tar"

        def write() -> None:
            uploads.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(tarball)

        try:
            await threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), write)
            result = await self.builder.build(app, path, env, app_created=created)
        except BuildFailed as e:
            raise RemoteError("build_failed", e.reason) from None
        except OSError as e:
            raise RemoteError("build_failed", f"cannot store the upload: {e.strerror}") from None
        finally:
            path.unlink(missing_ok=True)
        manifest = result.manifest
        return {
            "build_id": build_id, "digest": result.digest,
            "manifest": manifest.to_dict(),
            "duration": float(result.duration), "log_tail": list(result.log_tail),
        }


class PeerRunners(MultiService):
    """The other runners of the cluster (from the store) and bus requests to them: one
    DEALER per peer, made on first use, as a child of this service."""

    def __init__(self, store_service: StoreService | None, node_id: str, own_control: str,
                 dealer: Callable[[list[str]], Dealer]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # Twisted leaves it untyped
        self.store_service = store_service
        self.node_id = node_id
        self.own_control = own_control
        self._dealer = dealer
        self._dealers: dict[str, Dealer] = {}

    async def endpoints(self) -> list[str]:
        if self.store_service is None:
            return []
        store = await self.store_service.whenReady()
        nodes = await store.list_nodes("runner")
        peers = [n for n in nodes if n.control_endpoint and n.id != self.node_id
                 and n.control_endpoint != self.own_control]
        # the most recently seen first: a runner whose host died stays registered, and an
        # image fetch that asked it first would wait out runner.fetch_timeout before the
        # next peer (a host joined after a runner host died fetched nothing for 30 s)
        peers.sort(key=lambda n: -n.last_seen)
        return [str(n.control_endpoint) for n in peers]

    async def request(self, endpoint: str, type: str, body: dict[str, Any],
                      timeout: float) -> dict[str, Any]:
        dealer = self._dealers.get(endpoint)
        if dealer is None:
            dealer = self._dealers[endpoint] = self._dealer([endpoint])
            dealer.setName(f"runner-peer {endpoint}")  # type: ignore[no-untyped-call]  # Twisted leaves it untyped
            dealer.setServiceParent(self)  # type: ignore[no-untyped-call]  # started now if the runner runs (Twisted leaves it untyped)
        env = await dealer.request(type, body, timeout=timeout)
        return dict(env.body)


def detect_isolation_of(settings: RunnerSettings, data_dir: Path) -> tuple[
        Isolation, CgroupSupport, str | None, str | None]:
    """What the host allows (root, bubblewrap, setpriv, cgroups v1): the isolation
    facts, the cgroups, and the bwrap and setpriv binaries.  Runs trial processes:
    before the reactor.  Exits when ``runner.sandbox = bwrap`` cannot be had."""
    root = os.geteuid() == 0
    cgroups = (detect(parent=cgroup_parent(settings.cgroup_parent, data_dir)) if root
               else CgroupSupport({}, {c: "the runner is not root" for c in ("memory", "cpu",
                                                                              "pids")}))
    bwrap = shutil.which("bwrap")
    setpriv = shutil.which("setpriv")
    shm_bytes = settings.shm_mb * 1024 * 1024
    trial = (bwrap_trial(bwrap, shm_bytes) if (bwrap and root and settings.sandbox != "none")
             else None)
    isolation = detect_isolation(settings.sandbox, os.geteuid(), bwrap, setpriv, cgroups,
                                 trial.works if trial else None,
                                 shm_size=trial.shm_size if trial else True)
    if settings.sandbox == "bwrap" and isolation.sandbox != "bwrap":
        raise SystemExit(f"epio: runner.sandbox = bwrap but {isolation.off.get('sandbox')}")
    return isolation, cgroups, bwrap, setpriv


def make_service(node: Node) -> RunnerService:
    """Build the runner role of ``node``: its composition root.

    Every object is made once, here, in dependency order, and receives its
    collaborators through its constructor; nothing is re-wired afterwards.  Detection
    I/O (cgroups, bubblewrap, nft) happens here, before the reactor.  The building is
    done in steps, each a helper called once from here in that order:
    :func:`_build_runtime` (what runs app processes and sessions),
    :func:`_build_fence_and_static`, :func:`_build_heartbeat_publisher`,
    :func:`_build_runner`.

    The supervisor's observers and the spawn gates are two lists this function owns
    and hands to the supervisor and the session manager; it fills them, once, after
    the objects they name exist (the fence follows the instances it gates):

    * ``observers`` (told after every instance change, in order): the runner's state
      file and heartbeat (:meth:`RunnerService.changed`), the network fence, the
      static server;
    * ``gates`` (awaited before an app process or an ``epio run`` session is
      spawned): the network fence's ``ready``.

    The runner's children, in start order (they stop in reverse, one at a time, after
    the supervisor's instances are gone -- :class:`RunnerService`): the network fence,
    the log sink, the heartbeat publisher, the control ROUTER, the peer runners'
    DEALERs, the ``epio run`` sessions, the static server, the snapshot job.  The
    fence is first, so it comes down last: no app process of this runner is left
    when it goes (docs/security.md).
    """
    from epio.metrics import registry_for
    from epio.runner.snapshots import make_snapshots

    conf = node.settings
    settings = Settings.from_config(conf.runner)
    isolation, cgroups, bwrap, setpriv = detect_isolation_of(conf.runner, node.data_dir)
    observers: list[Callable[[], None]] = []
    gates: list[Callable[[], defer.Deferred[None] | None]] = []

    runtime = _build_runtime(node, settings, isolation, cgroups, bwrap, setpriv,
                             observers=observers, gates=gates)
    supervisor = runtime.supervisor
    fence, static = _build_fence_and_static(node, isolation, runtime)
    snapshots = make_snapshots(node.reactor, node.data_dir, conf.addons, conf.backup)
    publisher = _build_heartbeat_publisher(node, runtime.sink)
    runtime.peers.setName("runner-peers")  # type: ignore[no-untyped-call]  # Twisted leaves it untyped
    svc = _build_runner(node, runtime, isolation, cgroups, fence, static, publisher, snapshots)
    observers.extend([svc.changed, fence.changed])
    if static is not None:
        observers.append(static.instances_changed)
    gates.append(fence.ready)  # a process or session starts once its ports are open
    registry_for(node).add_collector(lambda: runner_families(supervisor))
    return svc


@frozen
class _Runtime:
    """What runs the app processes and ``epio run`` sessions, as
    :func:`_build_runtime` makes it, once, for :func:`make_service`."""

    sink: BusLogSink
    store_images: ImageStore  # shared by the fetcher, the builder and the image server
    control: str  # the control endpoint this runner advertises
    peers: PeerRunners
    images: FetchingImages
    supervisor: Supervisor
    sessions: SessionManager


def _build_runtime(node: Node, settings: Settings, isolation: Isolation,
                   cgroups: CgroupSupport, bwrap: str | None, setpriv: str | None, *,
                   observers: list[Callable[[], None]],
                   gates: list[Callable[[], defer.Deferred[None] | None]]) -> _Runtime:
    """The log sink, the image store and fetcher, the peer runners, the launcher, the
    supervisor and the session manager, each made once; the supervisor gets
    ``observers`` and ``gates`` (:func:`make_service` fills them later), the session
    manager the same ``gates``."""
    from epio.pipeline import BusLogSink
    from epio.runner.build.images import ImageStore
    from epio.runner.launcher import SandboxLauncher
    from epio.runner.sessions import RunSettings, SessionManager

    conf = node.settings
    rc = conf.runner
    reactor = node.reactor
    sink = BusLogSink(node.bus, list(conf.cluster.loggers), clock=reactor)
    store_images = ImageStore(node.data_dir, reactor=reactor)
    control = control_advertise(rc.control_bind, rc.advertise_host, rc.control_advertise)
    peers = PeerRunners(node.store_service, node.node_id, control, node.bus.dealer)
    images = FetchingImages(reactor, store_images, peers.endpoints, peers.request,
                            timeout=rc.fetch_timeout)
    launcher = SandboxLauncher(reactor, node.data_dir, isolation, cgroups, images, bwrap=bwrap,
                               setpriv=setpriv, node_id=node.node_id,
                               shm_bytes=rc.shm_mb * 1024 * 1024)
    ports = PortAllocator(rc.port_min, rc.port_max, bindable(settings.advertise_host))
    supervisor = Supervisor(reactor, launcher, NetworkProbe(reactor), sink, ports, settings,
                            observers=observers, before_spawn=gates)
    if node.store_service is not None:
        supervisor.service_gate = service_gate(node.store_service)
    sessions = SessionManager(reactor, launcher, sink, RunSettings.from_config(conf.run),
                              settings, node_id=node.node_id,
                              store_service=node.store_service, observers=gates)
    return _Runtime(sink=sink, store_images=store_images, control=control, peers=peers,
                    images=images, supervisor=supervisor, sessions=sessions)


def _build_fence_and_static(node: Node, isolation: Isolation, runtime: _Runtime,
                            ) -> tuple[NetworkFence, StaticServer | None]:
    """The network fence, following the supervisor's and the sessions' instances, the
    cluster's routers and the static server's port, and the static server (or None
    when ``runner.static_listen`` is off)."""
    from epio.runner.fence import addon_servers, app_reach, app_uids, make_fence
    from epio.runner.static import make_static

    reactor = node.reactor
    supervisor, sessions = runtime.supervisor, runtime.sessions
    directory = node.cluster
    static_box: list[Any] = []  # the static server, made below (its port once listening)

    def static_ports() -> list[int]:
        port = static_box[0].port if static_box else None
        return [port.getHost().port] if port is not None else []

    fence = make_fence(reactor, node.settings, node.roles, node.data_dir,
                       app_reach(supervisor, sessions), uids=app_uids(supervisor, sessions),
                       routers=(lambda: directory.current.routers) if directory is not None
                       else (lambda: ()),
                       servers=addon_servers(supervisor), inbound=static_ports)
    if directory is not None:  # a router joins or leaves: the fence follows (epio.cluster)
        directory.observe(lambda _lists: fence.changed())
    static = make_static(reactor, node.secret, runtime.images, node.data_dir,
                         lambda: list(supervisor.instances.values()), node.settings.runner,
                         uid_check=isolation.uid_switch)
    if static is not None:
        static_box.append(static)
        static.on_listening.append(fence.changed)
    return fence, static


def _build_heartbeat_publisher(node: Node, sink: BusLogSink) -> Publisher | None:
    """The PUB the heartbeats go out on, connected to every configured nexus (None
    when there is none and no cluster directory); with a directory, it and the log
    sink follow the nexus and logger nodes that join or leave."""
    conf = node.settings
    nexus = [str(n["heartbeat"]) for n in conf.cluster.nexus if n.get("heartbeat")]
    publisher = (node.bus.publisher(connect=nexus, may_start_empty=node.cluster is not None)
                 if nexus or node.cluster is not None else None)
    if node.cluster is not None:  # a nexus or logger joins or leaves: follow (epio.cluster)
        from epio.cluster import follow_endpoints

        follow_endpoints(node.cluster, sink, publisher)
    if publisher is not None:
        publisher.setName("runner-heartbeat")  # type: ignore[no-untyped-call]  # Twisted leaves it untyped
    return publisher


def _build_runner(node: Node, runtime: _Runtime, isolation: Isolation, cgroups: CgroupSupport,
                  fence: NetworkFence, static: StaticServer | None,
                  publisher: Publisher | None, snapshots: SnapshotService | None,
                  ) -> RunnerService:
    """The :class:`RunnerService` holding what :func:`make_service` built, with its
    builder and image server, and its children in start order."""
    from epio.runner.build import Builder
    from epio.runner.fence import FencedIsolation, pid_namespace, proc_start

    conf = node.settings
    rc = conf.runner
    reactor = node.reactor
    sink, store_images = runtime.sink, runtime.store_images

    def router(handler: Handler) -> IService:
        control_router = node.bus.router(rc.control_bind, handler)
        control_router.setName("runner-control")  # type: ignore[no-untyped-call]  # Twisted leaves it untyped
        return control_router

    return RunnerService(
        reactor=reactor, supervisor=runtime.supervisor,
        isolation=FencedIsolation(**attrs.asdict(isolation, recurse=False), fence=fence),
        cgroups=cgroups, images=runtime.images, data_dir=node.data_dir, node_id=node.node_id,
        boot_id=node.boot_id, roles=node.roles, control=runtime.control,
        heartbeat_interval=rc.heartbeat_interval, register_interval=rc.register_interval,
        shutdown_grace=rc.shutdown_grace, publisher=publisher,
        store_service=node.store_service,
        builder=Builder(reactor, node.data_dir, conf.build, sink, images=store_images),
        image_server=ImageServer(reactor, store_images, rc.fetch_chunk_kb * 1024,
                                 keep_open=rc.fetch_timeout * 2),
        stats=sink, stats_interval=rc.stats_interval,
        sessions=runtime.sessions, static_server=static, fence=fence,
        before_router=[c for c in (fence, sink, publisher) if c is not None],
        router=router,
        after_router=[c for c in (runtime.peers, runtime.sessions, static, snapshots)
                      if c is not None],
        ranges=RangeClaim(node.node_id, (rc.uid_min, rc.uid_max), (rc.port_min, rc.port_max)),
        host={"id": host_identity(), "pid": os.getpid(), "start": proc_start(os.getpid()),
              "pidns": pid_namespace()},
        refuse=node.exit,
    )


def service_gate(store_service: Any) -> Callable[[InstanceSpec], Any]:
    """The supervisor's gate for dedicated servers of add-ons with a standby: the role
    the add-on record gives the instance now, or a refusal (epio.addons.standby)."""
    from epio.addons.services import KIND_OF_TYPE
    from epio.addons.standby import server_role

    async def gate(spec: InstanceSpec) -> dict[str, str]:
        store = await store_service.whenReady()
        return await server_role(store, spec.app, KIND_OF_TYPE[spec.process_type],
                                 spec.instance_id)

    return gate


def runner_families(supervisor: Supervisor) -> list[Family]:
    """Instances by state and restarts per instance, for /metrics."""
    from epio.metrics import Family

    states = Family("epio_runner_instances", "gauge", "Instances on this runner, by state")
    restarts = Family("epio_runner_restarts_total", "counter",
                      "Restarts of each instance on this runner (crashes, failed health)")
    counts: dict[str, int] = {}
    for inst in supervisor.instances.values():
        counts[inst.state.value] = counts.get(inst.state.value, 0) + 1
        restarts.samples.append(("", {"app": inst.spec.app, "instance": inst.spec.source,
                                      "id": inst.spec.instance_id}, float(inst.restarts)))
    for state, n in sorted(counts.items()):
        states.samples.append(("", {"state": state}, float(n)))
    return [states, restarts]
