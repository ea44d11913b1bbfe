"""Bus envelopes: what every ZeroMQ message of epio carries, and how it is sealed.

Wire format of one envelope (one ZeroMQ frame)::

    b"EPB1" | HMAC-SHA256(secret, b"epio-bus-v1\\0" + len(topic) + topic + payload) | payload

``payload`` is a msgpack map ``{"t": type, "v": version, "s": sender,
"ts": timestamp, "id": id, "r": reply_to, "b": body}``.  The MAC covers the
topic of PUB/SUB messages too (empty for the other patterns), so a message
cannot be re-published under another topic.  See docs/messages.md.

Opening a frame checks, in this order: the signature header (unsigned), the MAC
(bad_signature, compared with :func:`hmac.compare_digest`), the payload shape
(malformed), the clock skew (stale), the type (unknown_type), the version
(unsupported_version), the pattern (wrong_pattern), the body fields
(invalid_body) and, where a :class:`ReplayGuard` is given, replays (replayed).
Nothing is parsed before the MAC has been verified.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections import deque
from collections.abc import Callable
from typing import Any

import msgpack
from attrs import field, frozen

from epio.bus.errors import Reason, Rejected
from epio.bus.messages import REGISTRY, Registry

MAGIC = b"EPB1"
MAC_SIZE = 32
_DOMAIN = b"epio-bus-v1\x00"


def new_id() -> str:
    """A fresh random message id (128 bits, hex)."""
    return os.urandom(16).hex()


@frozen
class Envelope:
    """One bus message.  ``reply_to`` is the request id a reply answers."""

    type: str
    version: int
    sender: str
    timestamp: float
    body: dict[str, Any]
    id: str = field(factory=new_id)
    reply_to: str | None = None


def _mac(secret: bytes, topic: bytes, payload: bytes) -> bytes:
    m = hmac.new(secret, digestmod=hashlib.sha256)
    m.update(_DOMAIN)
    m.update(struct.pack(">H", len(topic)))
    m.update(topic)
    m.update(payload)
    return m.digest()


def pack_payload(env: Envelope) -> bytes:
    """The msgpack payload of an envelope (unsigned; see :func:`seal`)."""
    packed: bytes = msgpack.packb(  # msgpack is untyped: packb returns Any
        {
            "t": env.type,
            "v": env.version,
            "s": env.sender,
            "ts": env.timestamp,
            "id": env.id,
            "r": env.reply_to,
            "b": env.body,
        },
        use_bin_type=True,
    )
    return packed


def seal(env: Envelope, secret: bytes, topic: bytes = b"") -> bytes:
    """Encode and sign ``env``: the frame to put on the wire."""
    payload = pack_payload(env)
    return MAGIC + _mac(secret, topic, payload) + payload


def _unpack(payload: bytes) -> Envelope:
    try:
        raw = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types
        raise Rejected(Reason.MALFORMED, f"payload is not msgpack ({type(e).__name__})") from None
    if not isinstance(raw, dict):
        raise Rejected(Reason.MALFORMED, "payload is not a map")
    try:
        t, v, s, ts, i, r, b = (raw[k] for k in ("t", "v", "s", "ts", "id", "r", "b"))
    except KeyError as e:
        raise Rejected(Reason.MALFORMED, f"envelope field {e.args[0]!r} missing") from None
    if not (isinstance(t, str) and t):
        raise Rejected(Reason.MALFORMED, "type must be a non-empty string")
    if not isinstance(v, int) or isinstance(v, bool):
        raise Rejected(Reason.MALFORMED, "version must be an integer")
    if not isinstance(s, str):
        raise Rejected(Reason.MALFORMED, "sender must be a string")
    if not isinstance(ts, int | float) or isinstance(ts, bool):
        raise Rejected(Reason.MALFORMED, "timestamp must be a number")
    if not (isinstance(i, str) and i):
        raise Rejected(Reason.MALFORMED, "id must be a non-empty string")
    if r is not None and not isinstance(r, str):
        raise Rejected(Reason.MALFORMED, "reply_to must be a string or nil")
    if not isinstance(b, dict):
        raise Rejected(Reason.MALFORMED, "body must be a map")
    return Envelope(t, v, s, float(ts), b, i, r)


def open_frame(
    frame: bytes,
    secret: bytes,
    now: float,
    max_skew: float,
    *,
    topic: bytes = b"",
    pattern: str | None = None,
    registry: Registry = REGISTRY,
    replay: ReplayGuard | None = None,
) -> Envelope:
    """Verify and decode one wire frame, or raise :class:`Rejected`.

    ``pattern`` (``request``, ``reply``, ``push``, ``publish``) is what the
    receiving socket expects; None skips that check.
    """
    if not frame.startswith(MAGIC):
        raise Rejected(Reason.UNSIGNED, "no signature header")
    if len(frame) <= len(MAGIC) + MAC_SIZE:
        raise Rejected(Reason.MALFORMED, "frame too short")
    mac = frame[len(MAGIC) : len(MAGIC) + MAC_SIZE]
    payload = frame[len(MAGIC) + MAC_SIZE :]
    if not hmac.compare_digest(mac, _mac(secret, topic, payload)):
        raise Rejected(Reason.BAD_SIGNATURE, "signature does not match")
    env = _unpack(payload)
    skew = now - env.timestamp
    if abs(skew) > max_skew:
        raise Rejected(
            Reason.STALE,
            f"{env.type} from {env.sender} is {skew:+.1f}s off (max {max_skew:g}s)",
        )
    try:
        registry.validate(env, pattern)
    except Rejected as r:
        r.envelope = env
        raise
    if replay is not None:
        replay.check(env, now)
    return env


class ReplayGuard:
    """Remembers the ids seen within the skew window; a repeat is rejected.

    An envelope older than ``max_skew`` is already refused as stale, so ids
    only need to be kept for ``2 * max_skew`` (the window is symmetric).
    ``limit`` bounds memory: past it the oldest ids are forgotten first.
    """

    def __init__(self, max_skew: float, limit: int = 100_000) -> None:
        self._keep = 2 * max_skew
        self._limit = limit
        self._seen: set[str] = set()
        self._order: deque[tuple[float, str]] = deque()

    def check(self, env: Envelope, now: float) -> None:
        order = self._order
        while order and (order[0][0] < now - self._keep or len(order) > self._limit):
            self._seen.discard(order.popleft()[1])
        if env.id in self._seen:
            raise Rejected(Reason.REPLAYED, f"{env.type} {env.id} from {env.sender} seen before")
        self._seen.add(env.id)
        order.append((now, env.id))


# Reasons that are only found after the MAC verified: the peer is one of ours
# and a router answers it with bus.error rather than letting it time out.
ANSWERABLE = frozenset(
    {Reason.UNKNOWN_TYPE, Reason.UNSUPPORTED_VERSION, Reason.WRONG_PATTERN, Reason.INVALID_BODY}
)


def triage_request(
    bus: Any,
    frame: bytes,
    replay: ReplayGuard | None,
    counters: Any,
    on_rejected: Callable[[Rejected], None],
    reply: Callable[[Envelope, str, dict[str, Any]], None],
) -> Envelope | None:
    """What every ROUTER (ZeroMQ or in-memory) does with a request frame before its handler.

    A rejected frame goes to ``on_rejected``; when the peer is one of ours (the MAC
    verified) it is answered with ``bus.error``.  ``bus.ping`` is answered here.
    Returns the envelope for the handler, or None when it has been dealt with.
    """
    from epio.bus import counters as C

    try:
        env: Envelope = bus.open(frame, pattern="request", replay=replay)
    except Rejected as r:
        on_rejected(r)
        if r.reason in ANSWERABLE and r.envelope is not None:
            reply(r.envelope, "bus.error", {"code": r.reason.value, "message": str(r)})
        return None
    counters.incr(C.RECEIVED)
    if env.type == "bus.ping":
        body = {"node": bus.sender}
        if "payload" in env.body:
            body["payload"] = env.body["payload"]
        reply(env, "bus.pong", body)
        return None
    return env
