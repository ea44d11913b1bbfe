"""THE registry of bus message types: every type epio sends is declared here.

Each entry names the type, its current version (and the oldest still
accepted), the pattern it travels on, a one-line doc and the body fields that
are checked on receive.  ``docs/messages.md`` documents every entry; a test
fails when a registered type is missing there.

To add a type: append one ``_(MessageType(...))`` below (in the
block of your role), then describe it in docs/messages.md.  Bump ``version``
when a body changes incompatibly; keep ``min_version`` at the oldest version
receivers still understand.

Patterns: ``request`` (DEALER -> ROUTER), ``reply`` (ROUTER -> DEALER),
``push`` (PUSH -> PULL), ``publish`` (PUB -> SUB).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from attrs import field, frozen

from epio.bus.errors import Reason, Rejected

if TYPE_CHECKING:
    from epio.bus.envelope import Envelope

PATTERNS = frozenset({"request", "reply", "push", "publish"})

# A field spec is a Python type or a tuple of types (``(int, float)``); ``object``
# accepts anything.  bool is never accepted where int/float is asked.
FieldSpec = type | tuple[type, ...]


def _check_field(value: Any, spec: FieldSpec) -> bool:
    kinds = spec if isinstance(spec, tuple) else (spec,)
    if object in kinds:
        return True
    if isinstance(value, bool) and bool not in kinds:
        return False
    if value is None:
        return type(None) in kinds
    return isinstance(value, kinds)


@frozen
class MessageType:
    """Declaration of one message type."""

    name: str
    version: int
    pattern: str
    doc: str
    fields: Mapping[str, FieldSpec] = field(factory=dict)
    optional: Mapping[str, FieldSpec] = field(factory=dict)
    min_version: int = 1

    def __attrs_post_init__(self) -> None:
        if self.pattern not in PATTERNS:
            raise ValueError(f"{self.name}: pattern must be one of {sorted(PATTERNS)}")
        if not 1 <= self.min_version <= self.version:
            raise ValueError(f"{self.name}: need 1 <= min_version <= version")

    def check_body(self, body: Mapping[str, Any]) -> str | None:
        """Return what is wrong with ``body``, or None."""
        for name, spec in self.fields.items():
            if name not in body:
                return f"{self.name}: body field {name!r} missing"
            if not _check_field(body[name], spec):
                return f"{self.name}: body field {name!r} has the wrong type"
        for name, spec in self.optional.items():
            if name in body and not _check_field(body[name], spec):
                return f"{self.name}: body field {name!r} has the wrong type"
        return None


class Registry:
    """Message types by name, fixed when made; a registry with a ``parent`` also
    knows the parent's.  A name declared twice (here or in the parent) is a
    ValueError."""

    def __init__(self, types: Iterable[MessageType] = (),
                 parent: Registry | None = None) -> None:
        self._parent = parent
        found: dict[str, MessageType] = {}
        for mtype in types:
            if mtype.name in found or (parent is not None and mtype.name in parent):
                raise ValueError(f"message type {mtype.name} is declared twice")
            found[mtype.name] = mtype
        self._types: Mapping[str, MessageType] = MappingProxyType(found)

    def get(self, name: str) -> MessageType | None:
        mtype = self._types.get(name)
        if mtype is None and self._parent is not None:
            return self._parent.get(name)
        return mtype

    def __getitem__(self, name: str) -> MessageType:
        mtype = self.get(name)
        if mtype is None:
            raise KeyError(name)
        return mtype

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __iter__(self) -> Iterator[MessageType]:
        return iter(sorted(self._types.values(), key=lambda t: t.name))

    def __len__(self) -> int:
        return len(self._types)

    def check_outgoing(self, type: str, body: Mapping[str, Any], pattern: str) -> MessageType:
        """Refuse to send what no receiver would accept (a bug in the caller)."""
        mtype = self.get(type)
        if mtype is None:
            raise ValueError(f"unknown bus message type {type!r}: declare it in epio/bus/messages.py")
        if mtype.pattern != pattern:
            raise ValueError(f"{type} is a {mtype.pattern} message, not {pattern}")
        problem = mtype.check_body(body)
        if problem is not None:
            raise ValueError(problem)
        return mtype

    def validate(self, env: Envelope, pattern: str | None) -> MessageType:
        """Check a received envelope against its declaration or raise Rejected."""
        mtype = self.get(env.type)
        if mtype is None:
            raise Rejected(Reason.UNKNOWN_TYPE, f"{env.type!r} from {env.sender}")
        if not mtype.min_version <= env.version <= mtype.version:
            raise Rejected(
                Reason.UNSUPPORTED_VERSION,
                f"{env.type} v{env.version} from {env.sender} "
                f"(accepted: v{mtype.min_version}..v{mtype.version})",
            )
        if pattern is not None and mtype.pattern != pattern:
            raise Rejected(
                Reason.WRONG_PATTERN,
                f"{env.type} from {env.sender} is a {mtype.pattern} message, "
                f"received as {pattern}",
            )
        problem = mtype.check_body(env.body)
        if problem is not None:
            raise Rejected(Reason.INVALID_BODY, f"{problem} (from {env.sender})")
        return mtype


_DECLARED: list[MessageType] = []  # collected below, then fixed in REGISTRY
_ = _DECLARED.append
Number = (int, float)

# --- bus (owner: bus) ---------------------------------------------------------
_(MessageType(
    "bus.ping", 1, "request",
    "Liveness probe: any ROUTER answers bus.pong without calling its handler.",
    optional={"payload": object},
))
_(MessageType(
    "bus.pong", 1, "reply",
    "Answer to bus.ping: echoes the payload and names the answering node.",
    fields={"node": str}, optional={"payload": object},
))
_(MessageType(
    "bus.error", 1, "reply",
    "Error answer to any request: a stable code and a human message, never a traceback.",
    fields={"code": str, "message": str},
))

# --- log pipeline (owner: bus; received by logger) -----------------------------
_(MessageType(
    "log.line", 1, "push",
    "One log line (or a part of a line over 10,000 bytes) of an app's log stream.",
    fields={"app": str, "source": str, "text": str, "timestamp": Number, "seq": int},
    optional={"part": int, "parts": int, "node": str, "boot": str},
))
_(MessageType(
    "stats.sample", 1, "push",
    "One stats sample of an app: a kind (e.g. http, process) and its values.",
    fields={"app": str, "kind": str, "values": dict, "timestamp": Number, "seq": int},
    optional={"node": str, "boot": str},
))

# --- nexus (owner: nexus) -------------------------------------------------------
_(MessageType(
    "nexus.snapshot_request", 1, "request",
    "A router asks a nexus for its whole route table (on connect, on a gap, on a restart).",
))
_(MessageType(
    "nexus.snapshot", 1, "reply",
    "A nexus's whole route table at one version; routes are PROTOCOL.md route maps.",
    fields={"nexus_id": str, "version": int, "routes": list},
))
_(MessageType(
    "nexus.delta", 1, "publish",
    "Route changes since the previous delta (topic routes; at most one per "
    "nexus.delta_interval): version follows prev_version; changes are "
    "{op: set, app, route} or {op: remove, app}.",
    fields={"nexus_id": str, "version": int, "prev_version": int, "changes": list},
))
_(MessageType(
    "nexus.keepalive", 1, "publish",
    "A nexus is alive (topic routes, every nexus.keepalive_interval) at this table version.",
    fields={"nexus_id": str, "version": int}, optional={"routes": int, "nodes": int},
))
_(MessageType(
    "nexus.where", 1, "request",
    "Where does app X run / what does node N run (give app or node).",
    optional={"app": str, "node": str},
))
_(MessageType(
    "nexus.location", 1, "reply",
    "Answer to nexus.where: instances (and the app's route, or the node's facts) and age, "
    "the seconds since the answer's heartbeats were received.",
    fields={"nexus_id": str, "age": Number},
    optional={"app": str, "node": str, "instances": list, "route": (dict, type(None)),
              "known": bool, "ready": bool, "store_age": (int, float, type(None)),
              "boot_id": str, "seq": int, "interval": Number, "load": dict,
              "control": (str, type(None)), "advertise_host": (str, type(None))},
))
_(MessageType(
    "nexus.status", 1, "request", "Ask a nexus for its numbers (table, nodes, counters).",
))
_(MessageType(
    "nexus.status_reply", 1, "reply",
    "A nexus's status: nexus_id, ready, version, routes, backends, nodes, counters.",
    fields={"nexus_id": str, "ready": bool, "version": int},
    optional={"routes": int, "backends": int, "nodes": int, "store_age": (int, float, type(None)),
              "heartbeats": dict, "table": dict, "api_nodes": int, "api_heartbeats": dict},
))

# --- runner (owner: runner) -----------------------------------------------------
_(MessageType(
    "runner.build", 1, "request",
    "Build an uploaded app tarball into an image on this runner (build log goes to the "
    "app's log stream, source build); app_created (the app's creation time) tells this "
    "app from an earlier one of the same name: what builds of another kept is not used.",
    fields={"build_id": str, "app": str, "tarball": bytes},
    optional={"env": dict, "app_created": Number},
))
_(MessageType(
    "runner.built", 1, "reply",
    "Answer to runner.build: the image digest, the parsed manifest and build facts.",
    fields={"build_id": str, "digest": str, "manifest": dict},
    optional={"duration": Number, "log_tail": list, "size": int},
))
_(MessageType(
    "runner.fetch_image", 1, "request",
    "A runner that lacks an image asks a peer for one chunk of it, from offset.",
    fields={"digest": str, "offset": int},
))
_(MessageType(
    "runner.image_chunk", 1, "reply",
    "One chunk of an image (format squashfs or dir: a tar); eof on the last one. The "
    "receiver installs the image only if its bytes hash to the digest.",
    fields={"digest": str, "format": str, "offset": int, "size": int, "data": bytes,
            "eof": bool},
))
_(MessageType(
    "runner.start", 1, "request",
    "Start one app instance on this runner (replies at once; state follows in heartbeats).",
    fields={"instance_id": str, "app": str, "uid": int, "command": (str, list),
            "image_digest": str},
    optional={"release": int, "process_type": str, "index": int, "env": dict,
              "limits": dict, "health_check": (str, type(None)),
              "boot_timeout": Number, "grace": Number, "addon_ports": list,
              "idle_sleep": (int, float, type(None)), "asleep_after_boot": bool},
))
_(MessageType(
    "runner.started", 1, "reply",
    "Answer to runner.start: where the instance will listen (port is nil for non-web).",
    fields={"instance_id": str, "host": str, "port": (int, type(None))},
    optional={"state": str},
))
_(MessageType(
    "runner.purge_app", 1, "request",
    "Delete an app's data dir on this runner for good (the app was purged after its "
    "grace period): only a dir owned by uid; refused while an instance of the app runs.",
    fields={"app": str, "uid": int},
))
_(MessageType(
    "runner.purged", 1, "reply",
    "Answer to runner.purge_app: whether a data dir was deleted.",
    fields={"app": str, "deleted": bool},
))
_(MessageType(
    "runner.stop", 1, "request",
    "Stop an instance: SIGTERM to its process group, grace seconds, then SIGKILL; the "
    "reply comes once it has stopped.",
    fields={"instance_id": str}, optional={"grace": Number},
))
_(MessageType(
    "runner.stopped", 1, "reply", "Answer to runner.stop: the instance is stopped.",
    fields={"instance_id": str}, optional={"state": str},
))
_(MessageType(
    "runner.drain", 1, "request",
    "Drain an instance: it leaves the route table now (state draining) and is stopped "
    "after runner.drain_delay plus its grace period.",
    fields={"instance_id": str},
))
_(MessageType(
    "runner.draining", 1, "reply", "Answer to runner.drain.",
    fields={"instance_id": str}, optional={"state": str},
))
_(MessageType(
    "runner.wake", 1, "request",
    "Wake an app: launch again every asleep web instance of it (one launch however many "
    "routers ask; docs/apps.md \"Sleeping apps\").",
    fields={"app": str},
))
_(MessageType(
    "runner.waking", 1, "reply",
    "Answer to runner.wake: the app's web instances on this runner and their states.",
    fields={"app": str, "instances": list},
))
_(MessageType(
    "runner.status", 1, "request", "Ask a runner for its instances and isolation facts.",
))
_(MessageType(
    "runner.status_reply", 1, "reply",
    "A runner's node_id, boot_id and instances (heartbeat entries; one that is starting, "
    "crashed or failed also carries `tail`: its last 20 output lines), plus isolation.",
    fields={"node_id": str, "boot_id": str, "instances": list},
    optional={"isolation": dict, "control": str, "advertise_host": str, "load": dict},
))
_(MessageType(
    "runner.snapshots", 1, "request",
    "List the btrfs snapshots of one dedicated data dir of an app on this runner.",
    fields={"app": str, "addon_dir": str},
))
_(MessageType(
    "runner.snapshot_list", 1, "reply", "Answer to runner.snapshots: newest first.",
    fields={"snapshots": list},
))
_(MessageType(
    "runner.snapshot_restore", 1, "request",
    "Make a dedicated data dir its snapshot's (the server must be stopped); the previous "
    "data dir is kept beside it.",
    fields={"app": str, "addon_dir": str, "id": str},
))
_(MessageType(
    "runner.snapshot_restored", 1, "reply", "Answer to runner.snapshot_restore.",
    fields={"kept_as": str},
))
_(MessageType(
    "runner.heartbeat", 1, "publish",
    "A runner is alive (topic hb, every runner.heartbeat_interval): its instances and load.",
    fields={"node_id": str, "boot_id": str, "seq": int, "interval": Number,
            "instances": list},
    optional={"load": dict, "control": str, "advertise_host": str, "isolation": dict,
              "static": str, "static_prefixes": dict},
))

# --- api (owner: api) -----------------------------------------------------------

_(MessageType(
    "api.heartbeat", 1, "publish",
    "An api node is alive (topic hb, every api.heartbeat_interval): where the routers "
    "reach its API (the platform's own route).",
    fields={"node_id": str, "boot_id": str, "seq": int, "interval": Number, "host": str,
            "port": int},
    optional={"draining": bool},
))

# --- logger (owner: logs) -------------------------------------------------------
_(MessageType(
    "log.batch", 1, "push",
    "Several log lines in one message (a sender batches what it emitted in one reactor "
    "turn): `lines` items are [app, source, text, timestamp, seq], each as in log.line.",
    fields={"lines": list}, optional={"node": str, "boot": str},
))
_(MessageType(
    "logs.query", 1, "request",
    "Ask a logger for stored lines of an app: the last n matching (or the first n after "
    "line number `after`); filters: time range, sources, regex.",
    fields={"app": str, "n": int},
    optional={"since": Number, "until": Number, "sources": list, "grep": str, "after": int},
))
_(MessageType(
    "logs.result", 1, "reply",
    "Answer to logs.query: lines as [id, timestamp, source, text, lost], oldest first; `next` "
    "is the id the app's next line will get on this logger.",
    fields={"app": str, "lines": list, "next": int}, optional={"logger": str},
))
_(MessageType(
    "log.live", 1, "publish",
    "Lines a logger just stored, for live tails (topic b'log\\0APP\\0'): consecutive ids "
    "from `first`, so a subscriber sees a gap.",
    fields={"app": str, "first": int, "lines": list}, optional={"logger": str},
))
_(MessageType(
    "stats.query", 1, "request",
    "Ask a logger for an app's stats time series (metric name or prefix, time range, "
    "resolution 10 or 60 s).",
    fields={"app": str},
    optional={"metric": str, "since": Number, "until": Number, "resolution": int},
))
_(MessageType(
    "stats.result", 1, "reply",
    "Answer to stats.query: {metric: [[bucket_start, value], ...]} at `resolution` seconds.",
    fields={"app": str, "resolution": int, "series": dict},
))

# --- backup (owner: backup) -----------------------------------------------------
_(MessageType(
    "backup.list", 1, "request", "List an app's backups (newest first).",
    fields={"app": str}, optional={"kind": str},
))
_(MessageType(
    "backup.listing", 1, "reply", "Answer to backup.list: backup records (never credentials).",
    fields={"backups": list},
))
_(MessageType(
    "backup.create", 1, "request",
    "Back up an app's databases now; replies when verified (or failed).",
    fields={"app": str}, optional={"kind": str},
))
_(MessageType(
    "backup.created", 1, "reply", "Answer to backup.create: the new backup records.",
    fields={"backups": list},
))
_(MessageType(
    "backup.restore", 1, "request",
    "Restore a backup into the app's (or to_app's) database: a new database first, then a "
    "switch; the previous database is kept.",
    fields={"app": str, "id": str}, optional={"to_app": str},
))
_(MessageType(
    "backup.restored", 1, "reply", "Answer to backup.restore: what the live data was renamed to.",
    fields={"app": str, "id": str}, optional={"kept_as": str, "keys": int},
))
_(MessageType(
    "backup.adopt", 1, "request",
    "Find a backup this node has no record of (its disk was wiped) in its offsite archive: "
    "fetch, check and keep it locally.",
    fields={"app": str, "id": str},
))
_(MessageType(
    "backup.adopted", 1, "reply", "Answer to backup.adopt: the backup's record.",
    fields={"backup": dict},
))
_(MessageType(
    "backup.fetch", 1, "request",
    "Read one chunk of a backup's file from offset (the api streams downloads this way).",
    fields={"app": str, "id": str, "offset": int},
))
_(MessageType(
    "backup.chunk", 1, "reply",
    "One chunk of a backup file: size is the whole file's, sha256 its recorded checksum; eof "
    "on the last chunk.",
    fields={"id": str, "offset": int, "size": int, "data": bytes, "eof": bool,
            "sha256": str, "status": str},
))

# --- run sessions: `epio run` (owner: run; api DEALER -> runner control ROUTER) ---
_(MessageType(
    "run.start", 1, "request",
    "Start a session: command (argv; one item = a shell string) as the app's user in its "
    "sandbox from image_digest, in a PTY (tty) or with pipes; detach sends output to the "
    "app's log (source run.N) instead of the client.",
    fields={"session_id": str, "app": str, "uid": int, "number": int, "command": list,
            "image_digest": str, "tty": bool, "detach": bool},
    optional={"release": int, "env": dict, "limits": dict, "rows": int, "cols": int,
              "term": str, "user": str, "kind": str, "client": str, "source": str,
              "addon_ports": list},
))
_(MessageType(
    "run.started", 1, "reply",
    "Answer to run.start: the session runs (or is starting) on this runner.",
    fields={"session_id": str, "state": str}, optional={"node": str},
))
_(MessageType(
    "run.poll", 1, "request",
    "The attached client's output poll: acknowledges output up to byte offset ack (the "
    "runner frees it and may resume reading) and asks for up to max bytes after it, "
    "waiting up to wait seconds when there is none. Renews the attach lease.",
    fields={"session_id": str, "client": str, "ack": int},
    optional={"max": int, "wait": Number},
))
_(MessageType(
    "run.output", 1, "reply",
    "Answer to run.poll: chunks [[fd, bytes], ...] starting at byte offset `offset` (fd 1 "
    "is the PTY or stdout, 2 stderr); exited once every byte was sent and the command ended.",
    fields={"session_id": str, "offset": int, "chunks": list, "exited": bool},
    optional={"status": (int, type(None)), "signal": (str, type(None)), "reason": str},
))
_(MessageType(
    "run.input", 1, "request",
    "One event of the attached client, applied in seq order (a duplicate is acknowledged "
    "again, a gap refused): data for stdin/the PTY, eof (close stdin), a window size, or a "
    "signal name (sessions without a PTY).",
    fields={"session_id": str, "client": str, "seq": int},
    optional={"data": bytes, "eof": bool, "rows": int, "cols": int, "signal": str},
))
_(MessageType(
    "run.attach", 1, "request",
    "Attach a client to a running interactive session (a previous client is taken over); "
    "the reply says from which output offset and input seq to go on.",
    fields={"session_id": str, "client": str}, optional={"rows": int, "cols": int},
))
_(MessageType(
    "run.attached", 1, "reply",
    "Answer to run.attach: the session's state, output offset and next input seq.",
    fields={"session_id": str, "offset": int, "seq": int, "tty": bool, "state": str},
    optional={"number": int, "command": str},
))
_(MessageType(
    "run.detach", 1, "request",
    "The client left: an interactive session keeps running (run.detached_idle_timeout); a "
    "session without a PTY is stopped.",
    fields={"session_id": str, "client": str},
))
_(MessageType(
    "run.kill", 1, "request",
    "Stop a session: SIGTERM (or the named signal), SIGKILL after run.kill_grace.",
    fields={"session_id": str}, optional={"signal": str, "reason": str},
))
_(MessageType(
    "run.ack", 1, "reply", "Answer to run.input, run.detach and run.kill.",
    fields={"session_id": str}, optional={"seq": int, "state": str},
))
_(MessageType(
    "run.wait", 1, "request",
    "Wait (up to timeout seconds) for a session to end; used for the release-phase command.",
    fields={"session_id": str}, optional={"timeout": Number},
))
_(MessageType(
    "run.exited", 1, "reply",
    "Answer to run.wait: state, and once ended the exit status (or signal), the reason and "
    "the last lines of output of a detached session.",
    fields={"session_id": str, "state": str},
    optional={"status": (int, type(None)), "signal": (str, type(None)), "reason": str,
              "tail": list},
))
_(MessageType(
    "run.list", 1, "request", "The sessions a runner runs (of one app, or all).",
    optional={"app": str},
))
_(MessageType(
    "run.sessions", 1, "reply",
    "Answer to run.list: {session_id, app, number, command, tty, detach, state, attached, "
    "started, ...} per session.",
    fields={"sessions": list},
))

#: Every message type of the bus (fixed at import: declare a type above).
REGISTRY = Registry(_DECLARED)
del _, _DECLARED
