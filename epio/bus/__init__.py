"""The epio bus: signed ZeroMQ messaging between the roles.

``node.bus`` is a :class:`Bus`; its factories return Twisted services (add
them to your role's service tree) for the four patterns::

    router = bus.router("tcp://127.0.0.1:7731", handler)     # handler: async (env) -> (type, body)
    dealer = bus.dealer(["tcp://127.0.0.1:7731"])
    reply = await dealer.request("runner.start", {...})       # -> Envelope
    pub = bus.publisher(bind="tcp://127.0.0.1:7713"); pub.publish("t", {...}, topic=b"x")
    sub = bus.subscriber(["tcp://..."], [b"x"], handler)      # handler(topic, env)
    push = bus.push(["tcp://..."]); push.send("log.line", {...})
    pull = bus.pull("tcp://127.0.0.1:7721", handler)          # handler(env)

Importing this package does not import txzmq (which installs the default
reactor); the socket module is loaded when the first service is made.
See docs/messages.md for the envelope, signing and every message type.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from epio.bus.counters import BusCounters, RateLimitedLog
from epio.bus.envelope import Envelope, ReplayGuard, open_frame, seal
from epio.bus.errors import (
    BusError,
    NotRunning,
    Reason,
    Rejected,
    RemoteError,
    RequestTimeout,
)
from epio.bus.messages import REGISTRY, MessageType, Registry
from epio.config.settings import BusSettings

if TYPE_CHECKING:
    from epio.bus.sockets import (
        Dealer,
        Publisher,
        Pull,
        PullHandler,
        Push,
        Router,
        RouterHandler,
        SubHandler,
        Subscriber,
        _Connection,
    )

__all__ = [
    "Bus",
    "BusCounters",
    "bus_settings",
    "BusError",
    "Envelope",
    "MessageType",
    "NotRunning",
    "REGISTRY",
    "Reason",
    "Rejected",
    "RemoteError",
    "RequestTimeout",
]

SocketOption = int | bytes  # a ZeroMQ socket option's value (setsockopt takes either)
LINGER_MS = 100  # how long closing a socket may wait to flush: stopping never hangs


def bus_settings(**overrides: Any) -> BusSettings:
    """The ``[bus]`` settings of a configuration that sets only ``overrides`` (the
    schema's defaults for the rest): for buses made outside a node (tests, tools)."""
    from epio.config import validate

    return validate({"bus": overrides}).settings.bus


class Bus:
    """Factory of bus services sharing one ZeroMQ context, secret and counters.

    ``settings`` is the node's ``[bus]`` section (the schema's defaults when None).
    The ZeroMQ context is created when the first socket opens and terminated when
    the last one closes.
    """

    log = Logger()

    def __init__(self, reactor: IReactorTime, secret: bytes, sender: str,
                 settings: BusSettings | None = None, registry: Registry = REGISTRY) -> None:
        if not isinstance(secret, bytes) or len(secret) < 16:
            raise ValueError("the bus secret must be at least 16 bytes")
        if settings is None:
            settings = bus_settings()
        self.reactor = reactor
        self._secret = secret
        self.sender = sender
        self.registry = registry
        self.request_timeout: float = settings.request_timeout
        self.max_skew: float = settings.max_skew
        self.high_water_mark: int = settings.high_water_mark
        self.max_message_size: int = settings.max_message_size
        self.encrypt: bool = settings.encrypt
        self.log_line_max_bytes: int = settings.log_line_max_bytes
        self.peer_heartbeat: float = settings.peer_heartbeat
        #: Node-wide counters of every service made by this bus.
        self.counters = BusCounters()
        self._ratelog = RateLimitedLog(reactor)
        self._factory: Any = None  # txzmq's ZmqFactory (txzmq is untyped)
        self._connections: set[_Connection] = set()
        self._curve: tuple[bytes, bytes, bytes, bytes] | None = None
        self._services: set[Any] = set()  # running services, for status()

    def __repr__(self) -> str:  # never show the secret
        return f"<Bus sender={self.sender!r} sockets={len(self._connections)}>"

    def status(self) -> dict[str, Any]:
        """Node-wide counters and every running socket (for status pages, metrics)."""
        return {
            "sender": self.sender,
            "encrypt": self.encrypt,
            "counters": self.counters.snapshot(),
            "sockets": sorted((svc.status() for svc in self._services),
                              key=lambda st: (st["kind"], st["endpoint"] or "",
                                              ",".join(st["connects"]))),
        }

    # -- envelopes --------------------------------------------------------------

    def envelope(self, type: str, body: dict[str, Any], *, pattern: str,
                 reply_to: str | None = None) -> Envelope:
        """A new envelope from this node (checked against the registry)."""
        mtype = self.registry.check_outgoing(type, body, pattern)
        return Envelope(type, mtype.version, self.sender, self.reactor.seconds(), body,
                        reply_to=reply_to)

    def seal(self, env: Envelope, topic: bytes = b"") -> bytes:
        """Sign and encode ``env`` for the wire."""
        return seal(env, self._secret, topic)

    def seal_new(self, type: str, body: dict[str, Any], *, pattern: str, topic: bytes = b"",
                 reply_to: str | None = None) -> bytes:
        return self.seal(self.envelope(type, body, pattern=pattern, reply_to=reply_to), topic)

    def open(self, frame: bytes, *, topic: bytes = b"", pattern: str | None = None,
             replay: ReplayGuard | None = None) -> Envelope:
        """Verify and decode a wire frame, or raise Rejected."""
        return open_frame(frame, self._secret, self.reactor.seconds(), self.max_skew,
                          topic=topic, pattern=pattern, registry=self.registry, replay=replay)

    # -- services -----------------------------------------------------------------

    def router(self, bind: str, handler: RouterHandler) -> Router:
        """ROUTER bound at ``bind``; ``handler(env)`` returns ``(reply_type, body)``."""
        from epio.bus.sockets import Router

        return Router(self, bind, handler)

    def dealer(self, endpoints: Sequence[str]) -> Dealer:
        """DEALER connected to ``endpoints``; ``await dealer.request(type, body)``."""
        from epio.bus.sockets import Dealer

        return Dealer(self, endpoints)

    def publisher(self, bind: str | None = None,
                  connect: Sequence[str] | str | None = None,
                  may_start_empty: bool = False) -> Publisher:
        """PUB, bound at ``bind`` or connected to ``connect``; ``.publish(type, body, topic)``.
        ``may_start_empty``: no endpoint yet (``set_connects`` adds them later)."""
        from epio.bus.sockets import Publisher

        return Publisher(self, bind=bind, connect=connect, may_start_empty=may_start_empty)

    def subscriber(self, endpoints: Sequence[str], topics: Sequence[bytes],
                   handler: SubHandler, bind: str | None = None) -> Subscriber:
        """SUB connected to ``endpoints`` (or bound at ``bind``); ``handler(topic, env)``."""
        from epio.bus.sockets import Subscriber

        return Subscriber(self, endpoints, topics, handler, bind=bind)

    def push(self, endpoints: Sequence[str]) -> Push:
        """PUSH connected to ``endpoints`` (round-robin); ``.send(type, body)``."""
        from epio.bus.sockets import Push

        return Push(self, endpoints)

    def pull(self, bind: str, handler: PullHandler) -> Pull:
        """PULL bound at ``bind``; ``handler(env)``."""
        from epio.bus.sockets import Pull

        return Pull(self, bind, handler)

    # -- sockets (used by the services) --------------------------------------------

    def curve_options(self, bind: bool) -> list[tuple[int, SocketOption]]:
        """CurveZMQ socket options derived from the cluster secret.

        The binding side is the CURVE server, the connecting side the client;
        both key pairs are derived from the secret, so only cluster members
        can complete the handshake and everything on the wire is encrypted.
        """
        import zmq
        from zmq.utils import z85

        if self._curve is None:
            def keypair(label: bytes) -> tuple[bytes, bytes]:
                raw = hmac.new(self._secret, b"epio-bus-curve-" + label, hashlib.sha256).digest()
                secret_z85 = z85.encode(raw)
                return zmq.curve_public(secret_z85), secret_z85

            spub, ssec = keypair(b"server")
            cpub, csec = keypair(b"client")
            self._curve = (spub, ssec, cpub, csec)
        spub, ssec, cpub, csec = self._curve
        if bind:
            return [(zmq.CURVE_SERVER, 1), (zmq.CURVE_SECRETKEY, ssec)]
        return [(zmq.CURVE_SERVERKEY, spub), (zmq.CURVE_PUBLICKEY, cpub),
                (zmq.CURVE_SECRETKEY, csec)]

    def socket_options(self, bind: bool) -> list[tuple[int, SocketOption]]:
        """The options every bus socket gets before it binds or connects."""
        import zmq

        opts: list[tuple[int, SocketOption]] = [
            (zmq.IPV6, 1),
            (zmq.SNDHWM, self.high_water_mark),
            (zmq.RCVHWM, self.high_water_mark),
            (zmq.MAXMSGSIZE, self.max_message_size),
            (zmq.LINGER, LINGER_MS),
            # ZMTP heartbeats: a peer that stops answering (frozen, or its host gone
            # without closing TCP) is disconnected after 3 intervals, so a dealer stops
            # sending it requests and a connected socket starts reconnecting.
            (zmq.HEARTBEAT_IVL, int(self.peer_heartbeat * 1000)),
            (zmq.HEARTBEAT_TIMEOUT, int(self.peer_heartbeat * 3000)),
            (zmq.HEARTBEAT_TTL, int(self.peer_heartbeat * 3000)),
        ]
        if self.encrypt:
            opts += self.curve_options(bind)
        return opts

    def _connection(self, socket_type: int, binds: Sequence[str], connects: Sequence[str],
                    on_message: Callable[[list[bytes]], None],
                    extra: Sequence[tuple[int, SocketOption]],
                    on_event: Callable[[int, str], None] | None = None) -> _Connection:
        from epio.bus import sockets

        if self._factory is None:
            self._factory = sockets.make_factory(self.reactor, LINGER_MS)
        options = self.socket_options(bind=bool(binds)) + list(extra)
        try:
            conn = sockets.make_connection(
                self._factory, socket_type, binds, connects, on_message, options, on_event
            )
        except BaseException:
            self._maybe_terminate()
            raise
        self._connections.add(conn)
        return conn

    def _release(self, conn: _Connection) -> None:
        self._connections.discard(conn)
        if conn.socket is not None:
            conn.shutdown()
        self._maybe_terminate()

    def _maybe_terminate(self) -> None:
        if self._connections or self._factory is None:
            return
        factory, self._factory = self._factory, None
        factory.connections = set()
        factory.context.term()
