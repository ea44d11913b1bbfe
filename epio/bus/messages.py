"""THE registry of bus message types: every type epio sends is declared here.

Each entry names the type, its current version (and the oldest still
accepted), the pattern it travels on, a one-line doc and the body fields that
are checked on receive.  ``docs/messages.md`` documents every entry; a test
fails when a registered type is missing there.

To add a type: append one ``REGISTRY.add(MessageType(...))`` below (in the
block of your role), then describe it in docs/messages.md.  Bump ``version``
when a body changes incompatibly; keep ``min_version`` at the oldest version
receivers still understand.

Patterns: ``request`` (DEALER -> ROUTER), ``reply`` (ROUTER -> DEALER),
``push`` (PUSH -> PULL), ``publish`` (PUB -> SUB).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
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
    """Message types by name."""

    def __init__(self) -> None:
        self._types: dict[str, MessageType] = {}

    def add(self, mtype: MessageType) -> MessageType:
        if mtype.name in self._types:
            raise ValueError(f"message type {mtype.name} is declared twice")
        self._types[mtype.name] = mtype
        return mtype

    def __getitem__(self, name: str) -> MessageType:
        return self._types[name]

    def __contains__(self, name: object) -> bool:
        return name in self._types

    def __iter__(self) -> Iterator[MessageType]:
        return iter(sorted(self._types.values(), key=lambda t: t.name))

    def __len__(self) -> int:
        return len(self._types)

    def check_outgoing(self, type: str, body: Mapping[str, Any], pattern: str) -> MessageType:
        """Refuse to send what no receiver would accept (a bug in the caller)."""
        mtype = self._types.get(type)
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
        mtype = self._types.get(env.type)
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


REGISTRY = Registry()
_ = REGISTRY.add
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
    optional={"part": int, "parts": int, "node": str},
))
_(MessageType(
    "stats.sample", 1, "push",
    "One stats sample of an app: a kind (e.g. http, process) and its values.",
    fields={"app": str, "kind": str, "values": dict, "timestamp": Number, "seq": int},
    optional={"node": str},
))

# --- test types (used by the bus's own tests; harmless in production) -----------
_(MessageType(
    "test.echo", 1, "request", "Test only: asks a test ROUTER to echo the body.",
    fields={"n": int}, optional={"sleep": Number, "fail": str},
))
_(MessageType("test.echoed", 1, "reply", "Test only: reply to test.echo.", fields={"n": int}))
_(MessageType(
    "test.event", 1, "publish", "Test only: a published event.", fields={"n": int}
))
_(MessageType("test.job", 1, "push", "Test only: a pushed job.", fields={"n": int}))

# --- nexus (owner: nexus) -------------------------------------------------------

# --- runner (owner: runner) -----------------------------------------------------

# --- api (owner: api) -----------------------------------------------------------

# --- logger (owner: logs) -------------------------------------------------------

