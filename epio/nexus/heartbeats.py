"""Heartbeat intake: which nodes are alive and what instances each one runs.

A runner publishes ``runner.heartbeat`` (docs/messages.md) every ``interval``
seconds to every nexus.  :class:`NodeTracker` keeps, per node, the last
accepted heartbeat and applies three rules:

- **sequence:** within one boot id, a heartbeat whose ``seq`` is not greater
  than the last accepted one is a duplicate or arrived out of order: ignored,
  counted and logged (rate-limited); a jump in ``seq`` counts the heartbeats
  that never arrived (``missed``);
- **boot id:** a heartbeat with a new boot id *replaces* everything known about
  the node (its old instances are gone, never merged); a heartbeat of a boot
  id the node has already left behind is ignored and counted (``stale_boot``);
- **expiry:** a node silent for ``max(node_timeout, 3 * interval)`` seconds is
  gone: its instances leave the table.

It is soft state only: a restarted nexus rebuilds it from the next heartbeats.
Every change that may move a route is reported to ``on_change`` as the set of
apps whose instances changed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from attrs import define, field, frozen
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from epio.bus.counters import RateLimitedLog
from epio.domain import RUNNER_STATES

# Instance states a runner reports (PROTOCOL.md).
STATES = RUNNER_STATES
# Addresses that mean "every interface": the node's advertise_host is used instead.
UNSPECIFIED_HOSTS = frozenset({"", "0.0.0.0", "::", "[::]"})
# How many retired boot ids are remembered per node (late heartbeats of an old boot).
RETIRED_BOOTS = 4

# Outcomes of NodeTracker.receive (each is also a counter name).
NEW_NODE = "new_node"
ACCEPTED = "accepted"
REPLACED = "replaced"  # a new boot id replaced the node's entries
DUPLICATE = "duplicate"
OUT_OF_ORDER = "out_of_order"
STALE_BOOT = "stale_boot"
INVALID = "invalid"
EXPIRED = "expired"  # a node was declared gone
MISSED = "missed"  # heartbeats never received (a jump in seq within one boot)
BAD_INSTANCES = "bad_instances"  # instance entries skipped as malformed


class InvalidHeartbeat(ValueError):
    """A heartbeat body that cannot be used (its reason is the message)."""


@frozen
class InstanceInfo:
    """One instance as its node last reported it."""

    node: str
    instance_id: str
    app: str
    release: int
    process_type: str
    host: str
    port: int | None
    state: str
    since: float
    restarts: int = 0
    waking: bool = False  # an asleep instance launched again by runner.wake

    def as_dict(self) -> dict[str, Any]:
        return {
            "instance_id": self.instance_id,
            "node": self.node,
            "app": self.app,
            "release": self.release,
            "process_type": self.process_type,
            "host": self.host,
            "port": self.port,
            "state": self.state,
            "since": self.since,
            "restarts": self.restarts,
        }


@define
class NodeState:
    """What the nexus knows about one live node (from its last heartbeat)."""

    node_id: str
    boot_id: str
    seq: int
    interval: float
    last_seen: float  # nexus clock
    load: dict[str, Any]
    control: str | None
    advertise_host: str | None
    raw_instances: list[Any]
    instances: dict[str, InstanceInfo]
    timer: Any = None  # IDelayedCall of the expiry
    retired_boots: list[str] = field(factory=list)
    # the node's static file server (docs/static.md): (host, port) and prefixes by app
    static: tuple[str, int] | None = None
    static_prefixes: dict[str, tuple[str, ...]] = field(factory=dict)
    # each instance's entry as last parsed, by instance id: an entry equal to it is not
    # parsed again (a runner with 1,000 asleep apps reports them all every beat)
    raw_by_id: dict[str, Any] = field(factory=dict)

    def as_dict(self, now: float) -> dict[str, Any]:
        return {
            "node": self.node_id,
            "boot_id": self.boot_id,
            "seq": self.seq,
            "interval": self.interval,
            "age": max(0.0, now - self.last_seen),
            "load": self.load,
            "control": self.control,
            "advertise_host": self.advertise_host,
            "instances": [i.as_dict() for i in sorted(self.instances.values(), key=_by_id)],
        }


def _by_id(info: InstanceInfo) -> str:
    return info.instance_id


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def parse_instance(node: str, advertise_host: str | None, raw: Any) -> InstanceInfo:
    """Turn one heartbeat instance entry into an :class:`InstanceInfo` or raise."""
    if not isinstance(raw, Mapping):
        raise InvalidHeartbeat("instance entry is not a map")
    iid = raw.get("instance_id")
    app = raw.get("app")
    ptype = raw.get("process_type")
    state = raw.get("state")
    release = raw.get("release")
    if not (isinstance(iid, str) and iid):
        raise InvalidHeartbeat("instance_id must be a non-empty string")
    if not (isinstance(app, str) and app):
        raise InvalidHeartbeat(f"instance {iid}: app must be a non-empty string")
    if not (isinstance(ptype, str) and ptype):
        raise InvalidHeartbeat(f"instance {iid}: process_type must be a non-empty string")
    if state not in STATES:
        raise InvalidHeartbeat(f"instance {iid}: unknown state {state!r}")
    if not isinstance(release, int) or isinstance(release, bool):
        raise InvalidHeartbeat(f"instance {iid}: release must be an integer")
    host = raw.get("host") or ""
    if not isinstance(host, str):
        raise InvalidHeartbeat(f"instance {iid}: host must be a string")
    if host in UNSPECIFIED_HOSTS:
        host = advertise_host or ""
    port = raw.get("port")
    if port is not None and (
        not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536
    ):
        raise InvalidHeartbeat(f"instance {iid}: port must be 1..65535 or nil")
    since = raw.get("since", 0.0)
    restarts = raw.get("restarts", 0)
    return InstanceInfo(
        node=node,
        instance_id=iid,
        app=app,
        release=release,
        process_type=ptype,
        host=host,
        port=port,
        state=state,
        since=float(since) if _number(since) else 0.0,
        restarts=restarts if isinstance(restarts, int) and not isinstance(restarts, bool) else 0,
        waking=raw.get("waking") is True,
    )


def parse_static(body: Mapping[str, Any], advertise_host: str | None
                 ) -> tuple[tuple[str, int] | None, dict[str, tuple[str, ...]]]:
    """A heartbeat's ``static`` ("host:port") and ``static_prefixes`` ({app: [path]});
    anything malformed counts as no static server."""
    raw = body.get("static")
    if not isinstance(raw, str) or not raw:
        return None, {}
    if raw.startswith("["):
        host, sep, port = raw[1:].partition("]:")
    else:
        host, sep, port = raw.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        return None, {}
    if host in UNSPECIFIED_HOSTS:
        host = advertise_host or ""
    if not host:
        return None, {}
    prefixes: dict[str, tuple[str, ...]] = {}
    raw_p = body.get("static_prefixes")
    if isinstance(raw_p, Mapping):
        for app, paths in raw_p.items():
            if isinstance(app, str) and isinstance(paths, list):
                ok = tuple(p for p in paths if isinstance(p, str) and p.startswith("/"))
                if ok:
                    prefixes[app] = ok
    return (host, int(port)), prefixes


class NodeTracker:
    """Live nodes and their instances, fed by heartbeats, expired on a clock.

    ``by_app[app]`` maps ``(node, instance_id)`` to the instance, for building
    routes without scanning every node.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        node_timeout: float,
        on_change: Callable[[set[str]], None],
    ) -> None:
        self._clock = clock
        self.node_timeout = node_timeout
        self._on_change = on_change
        self.nodes: dict[str, NodeState] = {}
        self.by_app: dict[str, dict[tuple[str, str], InstanceInfo]] = {}
        self.counters: Counter[str] = Counter()
        self._ratelog = RateLimitedLog(clock)

    # -- intake ---------------------------------------------------------------

    def receive(self, body: Mapping[str, Any]) -> str:
        """Take one heartbeat body; return what happened (an outcome name)."""
        try:
            outcome = self._receive(body)
        except InvalidHeartbeat as e:
            self.counters[INVALID] += 1
            self.log.warn("heartbeat rejected: {reason}", reason=str(e))
            return INVALID
        self.counters[outcome] += 1
        return outcome

    def _receive(self, body: Mapping[str, Any]) -> str:
        node_id = body.get("node_id")
        boot_id = body.get("boot_id")
        seq = body.get("seq")
        raw_instances = body.get("instances")
        if not (isinstance(node_id, str) and node_id):
            raise InvalidHeartbeat("node_id must be a non-empty string")
        if not (isinstance(boot_id, str) and boot_id):
            raise InvalidHeartbeat(f"node {node_id}: boot_id must be a non-empty string")
        if not isinstance(seq, int) or isinstance(seq, bool):
            raise InvalidHeartbeat(f"node {node_id}: seq must be an integer")
        if not isinstance(raw_instances, list):
            raise InvalidHeartbeat(f"node {node_id}: instances must be a list")
        raw_interval: Any = body.get("interval")
        interval = float(raw_interval) if _number(raw_interval) and raw_interval > 0 else 1.0
        now = self._clock.seconds()
        state = self.nodes.get(node_id)
        if state is not None and state.boot_id == boot_id:
            if seq <= state.seq:
                self._ratelog.warn(
                    f"old:{node_id}", "node {node}: heartbeat seq {seq} ignored (have {last})",
                    node=node_id, seq=seq, last=state.seq,
                )
                return DUPLICATE if seq == state.seq else OUT_OF_ORDER
            if seq > state.seq + 1:
                self.counters[MISSED] += seq - state.seq - 1
                self._ratelog.warn(
                    f"missed:{node_id}", "node {node}: {count} heartbeats missed (seq {last} -> "
                    "{seq})", node=node_id, count=seq - state.seq - 1, last=state.seq, seq=seq,
                )
            outcome = ACCEPTED
        elif state is not None and boot_id in state.retired_boots:
            return STALE_BOOT
        elif state is not None:
            outcome = REPLACED
            self.log.info(
                "node {node} restarted (boot {old} -> {new}): its old instances are replaced",
                node=node_id, old=state.boot_id, new=boot_id,
            )
        else:
            outcome = NEW_NODE
            self.log.info("node {node} is up (boot {boot})", node=node_id, boot=boot_id)

        control = body.get("control")
        advertise = body.get("advertise_host")
        load = body.get("load")
        control = control if isinstance(control, str) else None
        advertise = advertise if isinstance(advertise, str) and advertise else None
        load = dict(load) if isinstance(load, Mapping) else {}
        changed: set[str] = set()

        if state is None or outcome == REPLACED:
            retired: list[str] = []
            if state is not None:
                retired = [*state.retired_boots, state.boot_id][-RETIRED_BOOTS:]
                changed |= self._drop_instances(state)
                if state.timer is not None and state.timer.active():
                    state.timer.cancel()
            state = NodeState(
                node_id=node_id, boot_id=boot_id, seq=seq, interval=interval, last_seen=now,
                load=load, control=control, advertise_host=advertise, raw_instances=[],
                instances={}, retired_boots=retired,
            )
            self.nodes[node_id] = state
        else:
            state.seq = seq
            state.interval = interval
            state.last_seen = now
            state.load = load
            state.control = control
            if advertise != state.advertise_host:
                state.advertise_host = advertise
                state.raw_instances = []  # hosts may resolve differently: re-parse
                state.raw_by_id = {}
        static, static_prefixes = parse_static(body, state.advertise_host)
        if static != state.static or static_prefixes != state.static_prefixes:
            changed |= set(state.static_prefixes) | set(static_prefixes)
            changed |= {i.app for i in state.instances.values()}
            state.static, state.static_prefixes = static, static_prefixes
        if raw_instances != state.raw_instances:
            changed |= self._replace_instances(state, raw_instances)
        self._arm(state)
        if changed:
            self._on_change(changed)
        return outcome

    def _replace_instances(self, state: NodeState, raw_instances: list[Any]) -> set[str]:
        """Take a heartbeat's instance list; the apps whose instances changed.  Only the
        entries that differ from the last heartbeat's are parsed and compared: the work
        grows with what changed, not with how many instances the node has."""
        new: dict[str, InstanceInfo] = {}
        raw_by_id: dict[str, Any] = {}
        old_raw, old = state.raw_by_id, state.instances
        for raw in raw_instances:
            iid = raw.get("instance_id") if isinstance(raw, Mapping) else None
            if isinstance(iid, str) and iid in old and old_raw.get(iid) == raw:
                new[iid] = old[iid]
                raw_by_id[iid] = raw
                continue
            try:
                info = parse_instance(state.node_id, state.advertise_host, raw)
            except InvalidHeartbeat as e:
                self.counters[BAD_INSTANCES] += 1
                self.log.warn(
                    "node {node}: heartbeat instance skipped: {reason}",
                    node=state.node_id, reason=str(e),
                )
                continue
            new[info.instance_id] = info
            raw_by_id[info.instance_id] = raw
        changed: set[str] = set()
        for iid, info in old.items():
            now = new.get(iid)
            if now is not info and now != info:
                changed.add(info.app)
                self.by_app.get(info.app, {}).pop((state.node_id, iid), None)
        for iid, info in new.items():
            was = old.get(iid)
            if was is not info and was != info:
                changed.add(info.app)
                self.by_app.setdefault(info.app, {})[(state.node_id, iid)] = info
        for app in changed:
            if not self.by_app.get(app, True):
                del self.by_app[app]
        state.instances = new
        state.raw_instances = raw_instances
        state.raw_by_id = raw_by_id
        return changed

    def _drop_instances(self, state: NodeState) -> set[str]:
        changed: set[str] = set()
        for iid, info in state.instances.items():
            changed.add(info.app)
            entries = self.by_app.get(info.app)
            if entries is not None:
                entries.pop((state.node_id, iid), None)
                if not entries:
                    del self.by_app[info.app]
        state.instances = {}
        state.raw_instances = []
        return changed

    # -- expiry ---------------------------------------------------------------

    def timeout_for(self, state: NodeState) -> float:
        """How long ``state``'s node may stay silent before it is gone."""
        return max(self.node_timeout, 3 * state.interval)

    def _arm(self, state: NodeState) -> None:
        delay = self.timeout_for(state)
        if state.timer is not None and state.timer.active():
            state.timer.reset(delay)
        else:
            state.timer = self._clock.callLater(delay, self._expire, state.node_id)

    def _expire(self, node_id: str) -> None:
        state = self.nodes.pop(node_id, None)
        if state is None:
            return
        state.timer = None
        self.counters[EXPIRED] += 1
        silent = self._clock.seconds() - state.last_seen
        self.log.warn(
            "node {node} is gone: no heartbeat for {silent:.1f}s; "
            "its {count} instances leave the route table",
            node=node_id, silent=silent, count=len(state.instances),
        )
        changed = self._drop_instances(state)
        if changed:
            self._on_change(changed)

    def stop(self) -> None:
        """Cancel every expiry timer (the service stops)."""
        for state in self.nodes.values():
            if state.timer is not None and state.timer.active():
                state.timer.cancel()
            state.timer = None

    # -- queries --------------------------------------------------------------

    def instances_of(self, app: str) -> Iterable[InstanceInfo]:
        return self.by_app.get(app, {}).values()

    def static_of(self, node: str, app: str) -> tuple[tuple[str, int], tuple[str, ...]] | None:
        """The static server of ``node`` and the prefixes it serves for ``app``."""
        state = self.nodes.get(node)
        if state is None or state.static is None:
            return None
        prefixes = state.static_prefixes.get(app)
        return (state.static, prefixes) if prefixes else None

    def control_of(self, node: str) -> str | None:
        """The control endpoint of ``node`` (where ``runner.wake`` goes)."""
        state = self.nodes.get(node)
        return None if state is None else state.control

    def apps(self) -> set[str]:
        return set(self.by_app)
