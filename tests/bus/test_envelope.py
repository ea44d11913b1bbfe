"""Envelope sealing and opening: signature, staleness, shape, types, replays."""

from __future__ import annotations

from functools import partial

import msgpack
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from epio.bus import Bus, bus_settings
from epio.bus.envelope import MAGIC, Envelope, ReplayGuard, open_frame, pack_payload, seal
from epio.bus.errors import Reason, Rejected
from epio.bus.testing import TEST_REGISTRY

# the test.* types live in the test registry, not in production's
open_frame = partial(open_frame, registry=TEST_REGISTRY)

SECRET = b"s" * 32
OTHER = b"o" * 32
NOW = 1_800_000_000.0


def env(type: str = "test.job", body: dict | None = None, ts: float = NOW, **kw) -> Envelope:
    return Envelope(type, 1, "node-a", ts, {"n": 1} if body is None else body, **kw)


class SealOpenTests(SynchronousTestCase):
    def reason(self, frame: bytes, **kw) -> Reason:
        kw.setdefault("now", NOW)
        exc = self.assertRaises(Rejected, open_frame, frame, SECRET, kw.pop("now"), 30.0, **kw)
        return exc.reason

    def test_round_trip(self) -> None:
        """A sealed envelope opens to an equal envelope (bytes in bodies survive)."""
        e = env(body={"n": 3, "data": b"\x00\xff", "nested": {"a": [1, 2.5, None]}})
        self.assertEqual(open_frame(seal(e, SECRET), SECRET, NOW, 30.0), e)

    def test_reply_to_survives(self) -> None:
        """reply_to and id are part of the signed envelope."""
        e = env(type="test.echoed", reply_to="abc")
        out = open_frame(seal(e, SECRET), SECRET, NOW, 30.0)
        self.assertEqual((out.id, out.reply_to), (e.id, "abc"))

    def test_unsigned(self) -> None:
        """A bare msgpack payload with no signature header is rejected as unsigned."""
        self.assertEqual(self.reason(pack_payload(env())), Reason.UNSIGNED)

    def test_wrong_secret(self) -> None:
        """A message signed with another secret is a bad signature."""
        self.assertEqual(self.reason(seal(env(), OTHER)), Reason.BAD_SIGNATURE)

    def test_every_flipped_byte_is_caught(self) -> None:
        """Flipping any single byte of the MAC or payload makes the frame rejected."""
        frame = seal(env(), SECRET)
        for i in range(len(MAGIC), len(frame)):
            tampered = frame[:i] + bytes([frame[i] ^ 0x01]) + frame[i + 1 :]
            self.assertEqual(self.reason(tampered), Reason.BAD_SIGNATURE, f"byte {i}")

    def test_topic_is_signed(self) -> None:
        """A published message moved to another topic fails its signature."""
        frame = seal(env(type="test.event"), SECRET, topic=b"app.a")
        open_frame(frame, SECRET, NOW, 30.0, topic=b"app.a")
        self.assertEqual(self.reason(frame, topic=b"app.b"), Reason.BAD_SIGNATURE)

    def test_stale_both_directions(self) -> None:
        """More than max_skew in the past or the future is stale; within it is fine."""
        frame = seal(env(), SECRET)
        open_frame(frame, SECRET, NOW + 30.0, 30.0)
        open_frame(frame, SECRET, NOW - 30.0, 30.0)
        self.assertEqual(self.reason(frame, now=NOW + 30.5), Reason.STALE)
        self.assertEqual(self.reason(frame, now=NOW - 30.5), Reason.STALE)

    def test_malformed_signed_payloads(self) -> None:
        """Correctly signed garbage is malformed, never processed."""
        from epio.bus.envelope import _mac

        def signed(payload: bytes) -> bytes:
            return MAGIC + _mac(SECRET, b"", payload) + payload

        good = msgpack.unpackb(pack_payload(env()))
        cases = [
            b"\xc1",  # never used in msgpack
            msgpack.packb([1, 2]),
            msgpack.packb({k: v for k, v in good.items() if k != "b"}),
            msgpack.packb({**good, "v": "1"}),
            msgpack.packb({**good, "ts": "now"}),
            msgpack.packb({**good, "b": [1]}),
            msgpack.packb({**good, "id": ""}),
        ]
        for payload in cases:
            self.assertEqual(self.reason(signed(payload)), Reason.MALFORMED, repr(payload))
        self.assertEqual(self.reason(MAGIC + b"x" * 10), Reason.MALFORMED)

    def test_unknown_type_and_version(self) -> None:
        """Unknown types and versions outside the declared range are refused."""
        self.assertEqual(self.reason(seal(env(type="no.such"), SECRET)), Reason.UNKNOWN_TYPE)
        e = Envelope("test.job", 2, "node-a", NOW, {"n": 1})
        self.assertEqual(self.reason(seal(e, SECRET)), Reason.UNSUPPORTED_VERSION)

    def test_post_mac_rejection_carries_envelope(self) -> None:
        """A rejection found after the MAC verified carries the envelope (to answer it)."""
        e = env(type="no.such")
        exc = self.assertRaises(Rejected, open_frame, seal(e, SECRET), SECRET, NOW, 30.0)
        self.assertEqual(exc.envelope, e)

    def test_wrong_pattern_and_body(self) -> None:
        """A push type received as a request, or a body missing a field, is refused."""
        self.assertEqual(self.reason(seal(env(), SECRET), pattern="request"), Reason.WRONG_PATTERN)
        self.assertEqual(self.reason(seal(env(body={}), SECRET)), Reason.INVALID_BODY)
        self.assertEqual(self.reason(seal(env(body={"n": "1"}), SECRET)), Reason.INVALID_BODY)
        self.assertEqual(self.reason(seal(env(body={"n": True}), SECRET)), Reason.INVALID_BODY)

    def test_replay_refused_within_window(self) -> None:
        """The same envelope twice is a replay; ids are forgotten after the window."""
        guard = ReplayGuard(30.0)
        frame = seal(env(), SECRET)
        open_frame(frame, SECRET, NOW, 30.0, replay=guard)
        self.assertEqual(self.reason(frame, replay=guard), Reason.REPLAYED)
        other = seal(env(ts=NOW + 61), SECRET)
        open_frame(other, SECRET, NOW + 61, 30.0, replay=guard)
        self.assertNotIn(env().id, guard._seen)

    def test_replay_guard_is_bounded(self) -> None:
        """The replay guard never keeps more than its limit of ids."""
        guard = ReplayGuard(30.0, limit=10)
        for _ in range(100):
            guard.check(env(), NOW)
        self.assertLessEqual(len(guard._seen), 11)


class BusCodecTests(SynchronousTestCase):
    def test_bus_uses_injected_clock(self) -> None:
        """The bus stamps and checks time with its injected clock."""
        clock = Clock()
        clock.advance(NOW)
        bus = Bus(clock, SECRET, "node-a", bus_settings(max_skew=5.0), registry=TEST_REGISTRY)
        frame = bus.seal_new("test.job", {"n": 1}, pattern="push")
        self.assertEqual(bus.open(frame).timestamp, NOW)
        clock.advance(6)
        exc = self.assertRaises(Rejected, bus.open, frame)
        self.assertEqual(exc.reason, Reason.STALE)

    def test_bus_refuses_to_send_undeclared(self) -> None:
        """Sending an undeclared type, a wrong pattern or a bad body is a caller bug."""
        bus = Bus(Clock(), SECRET, "node-a", bus_settings(), registry=TEST_REGISTRY)
        self.assertRaises(ValueError, bus.seal_new, "no.such", {}, pattern="push")
        self.assertRaises(ValueError, bus.seal_new, "test.job", {"n": 1}, pattern="publish")
        self.assertRaises(ValueError, bus.seal_new, "test.job", {}, pattern="push")

    def test_unserialisable_body_is_a_caller_error(self) -> None:
        """A body value msgpack cannot carry raises TypeError at the call; extra
        (undeclared) fields pass through."""
        bus = Bus(Clock(), SECRET, "node-a", bus_settings(), registry=TEST_REGISTRY)
        self.assertRaises(TypeError, bus.seal_new, "test.job", {"n": 1, "s": {1, 2}},
                          pattern="push")
        env = bus.open(bus.seal_new("test.job", {"n": 1, "extra": (1, "x")}, pattern="push"))
        self.assertEqual(env.body["extra"], [1, "x"])

    def test_short_secret_refused(self) -> None:
        """A bus cannot be made with a trivially short secret."""
        self.assertRaises(ValueError, Bus, Clock(), b"short", "n", bus_settings())

    def test_repr_hides_secret(self) -> None:
        """Neither repr nor str of the bus shows the secret."""
        bus = Bus(Clock(), b"supersecretvalue" * 2, "node-a", bus_settings(), registry=TEST_REGISTRY)
        self.assertNotIn("supersecret", repr(bus) + str(bus))
