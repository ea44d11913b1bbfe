"""The bus services: thin Twisted services over txZMQ sockets.

Imported lazily by :class:`epio.bus.Bus` (importing txzmq installs the default
reactor, which must not happen during twistd's plugin discovery).

Every service creates its socket in ``startService`` and closes it in
``stopService``; ZeroMQ itself reconnects connected sockets (with backoff), so a
peer that restarts is found again without any code here.  A bind that fails
(address in use: another node on this host) ends the node: ``startService``
raises :class:`BindFailed` (a SystemExit naming the endpoint) -- fail fast, rather
than half the node serving while the cluster takes it for gone.  ``whenReady()``
fires once every socket is bound.
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import zmq
from attrs import evolve
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from txzmq import ZmqEndpoint, ZmqEndpointType, ZmqFactory
from txzmq.connection import ZmqConnection
from zmq.utils.monitor import parse_monitor_message
from zope.interface import implementer

from epio.bus import counters as C
from epio.bus.counters import BusCounters
from epio.bus.envelope import Envelope, ReplayGuard, triage_request
from epio.bus.errors import NotRunning, Reason, Rejected, RemoteError, RequestTimeout
from epio.listen import ListenFailed, zmq_endpoint

if TYPE_CHECKING:
    from epio.bus import Bus, SocketOption

RouterHandler = Callable[[Envelope], Awaitable[tuple[str, dict[str, Any]]] | tuple[str, dict[str, Any]]]
PullHandler = Callable[[Envelope], Any]
SubHandler = Callable[[bytes, Envelope], Any]

_TCP = re.compile(r"^tcp://(?P<host>\*|\[[0-9a-fA-F:.%\w]+\]|[\w.-]+):(?P<port>\*|\d{1,5})$")



def check_endpoint(endpoint: str, bind: bool) -> str:
    """Validate a ZeroMQ endpoint URL; return it as it goes to libzmq.

    ``tcp://HOST:PORT`` (HOST an IPv4 address, ``[IPv6]``, a name or, to bind,
    ``*``), ``ipc://PATH`` or ``inproc://NAME``.  Binding to port 0 means any
    free port (read it back from the service's ``endpoint``).
    """
    if not isinstance(endpoint, str):
        raise ValueError(f"bus endpoint must be a string, not {endpoint!r}")
    if endpoint.startswith(("ipc://", "inproc://")) and len(endpoint.split("://", 1)[1]) > 0:
        return endpoint
    m = _TCP.match(endpoint)
    if m is None:
        raise ValueError(
            f"bad bus endpoint {endpoint!r}: expected tcp://HOST:PORT, tcp://[IPv6]:PORT, "
            "ipc://PATH or inproc://NAME"
        )
    port = m["port"]
    if port == "*" or int(port) == 0:
        if not bind:
            raise ValueError(f"bad bus endpoint {endpoint!r}: cannot connect to port {port}")
        return f"tcp://{m['host']}:*"
    if int(port) > 65535:
        raise ValueError(f"bad bus endpoint {endpoint!r}: port out of range")
    if m["host"] == "*" and not bind:
        raise ValueError(f"bad bus endpoint {endpoint!r}: cannot connect to *")
    return endpoint


def _public_endpoint(requested: str, last: str) -> str:
    """The endpoint peers should connect to, from the bind request and LAST_ENDPOINT.

    With IPv6 enabled libzmq reports an IPv4 bind as ``[::ffff:a.b.c.d]``;
    give back the address as it was asked for, with the real port.
    """
    m = _TCP.match(requested)
    lm = re.match(r"^tcp://.*:(\d+)$", last)
    if m is None or lm is None or m["host"] == "*":
        return last
    return f"tcp://{m['host']}:{lm.group(1)}"


class _Connection(ZmqConnection):  # type: ignore[misc]  # txzmq is untyped: its base is Any
    """One ZeroMQ socket in the reactor; hands complete multipart messages on."""

    log = Logger()

    def __init__(
        self,
        factory: ZmqFactory,
        socket_type: int,
        options: Sequence[tuple[int, SocketOption]],
        endpoints: Sequence[ZmqEndpoint],
        on_message: Callable[[list[bytes]], None],
        on_event: Callable[[int, str], None] | None = None,
    ) -> None:
        self.socketType = socket_type
        self._on_message = on_message
        self.monitor: _Monitor | None = None
        super().__init__(factory)
        try:
            for opt, value in options:
                self.socket.setsockopt(opt, value)
            if on_event is not None:
                self.monitor = _Monitor(factory.reactor, self.socket, on_event)
            self.addEndpoints(list(endpoints))
        except BaseException:
            self.shutdown()
            raise

    def shutdown(self) -> None:
        if self.monitor is not None:
            self.monitor.close(self.socket)
            self.monitor = None
        super().shutdown()

    def messageReceived(self, message: list[bytes]) -> None:
        # An exception escaping here would make the reactor drop the socket.
        try:
            self._on_message(message)
        except Exception:
            self.log.failure("bus: unhandled error processing a message")

    def doRead(self) -> None:
        """Handle at most ``READ_BATCH`` messages, then yield to the reactor.

        txzmq's loop handles every queued message before anything else runs: a
        burst (a backlog of route deltas, a logger catching up) stalled the
        router's requests and the api's websocket writes for its whole length.
        ZeroMQ's fd is edge-triggered, so the rest is read on a scheduled call.
        """
        if self.read_scheduled is not None:  # type: ignore[has-type]
            if not self.read_scheduled.called:  # type: ignore[has-type]
                self.read_scheduled.cancel()  # type: ignore[has-type]
            self.read_scheduled = None
        for _ in range(READ_BATCH):
            if self.factory is None:  # disconnected
                return
            if not int(self.socket.get(zmq.EVENTS)) & zmq.POLLIN:
                return
            try:
                message = self._readMultipart()
            except zmq.Again:
                continue
            self.messageReceived(message)
        if self.factory is not None and int(self.socket.get(zmq.EVENTS)) & zmq.POLLIN:
            self.read_scheduled = self.factory.reactor.callLater(0, self.doRead)

    def send(self, message: list[bytes]) -> None:
        """Send a multipart message without blocking; raises zmq.Again when full.

        Same as txzmq's, but schedules the follow-up read on the injected
        reactor (ZeroMQ's fd is edge-triggered: a send may hide a pending read).
        """
        sock = self.socket
        for part in message[:-1]:
            sock.send(part, zmq.NOBLOCK | zmq.SNDMORE)
        sock.send(message[-1], zmq.NOBLOCK)
        if self.read_scheduled is None:
            self.read_scheduled = self.factory.reactor.callLater(0, self.doRead)


# messages one socket handles per reactor turn before letting others run
READ_BATCH = 64

_MONITORED = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)
_HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


def _peer_endpoint(raw: bytes) -> str:
    """An event's endpoint as peers write it (IPv4-mapped addresses unmapped)."""
    ep = raw.decode("utf-8", "replace")
    m = re.match(r"^tcp://\[::ffff:(\d+\.\d+\.\d+\.\d+)\]:(\d+)$", ep)
    return f"tcp://{m.group(1)}:{m.group(2)}" if m else ep


@implementer(IReadDescriptor)
class _Monitor:
    """Reads a socket's ZeroMQ monitor events (connects, disconnects, failed
    handshakes) in the reactor and hands ``(event, endpoint)`` on."""

    log = Logger()

    def __init__(self, reactor: Any, sock: zmq.Socket[bytes], on_event: Callable[[int, str], None]
                 ) -> None:
        self._reactor = reactor
        self._on_event = on_event
        self.sock: zmq.Socket[bytes] | None = sock.get_monitor_socket(_MONITORED)
        self.sock.setsockopt(zmq.LINGER, 0)
        self._fd: int = self.sock.getsockopt(zmq.FD)  # type: ignore[assignment]
        reactor.addReader(self)
        self.doRead()  # the fd is edge-triggered: arm it by reading what is there

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "ZMQ-monitor"

    def doRead(self) -> None:
        while self.sock is not None and int(self.sock.get(zmq.EVENTS)) & zmq.POLLIN:
            try:
                msg = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                event = parse_monitor_message(msg)
                self._on_event(int(event["event"]), _peer_endpoint(event["endpoint"]))
            except Exception:
                self.log.failure("bus: error handling a socket monitor event")

    def connectionLost(self, reason: Failure) -> None:
        self._reactor.removeReader(self)

    def close(self, main: zmq.Socket[bytes] | None) -> None:
        self._reactor.removeReader(self)
        if main is not None:
            try:
                main.disable_monitor()
            except zmq.ZMQError:
                pass
        if self.sock is not None:
            self.sock.close(0)
            self.sock = None


class BindFailed(ListenFailed):
    """A bus socket cannot bind its endpoint: the node must not run without it (the
    node stops: :class:`epio.tap.NodeService`)."""


class BusService(Service):
    """What every bus socket service shares: lifecycle, counters, rejections.

    The socket's lifecycle is held in ``_conn`` (the ZeroMQ socket exists)::

                 startService            bind ok
        stopped -------------> opening ----------> open  (whenReady fires)
           ^                    |                   |
           |                    | bind failed       |
           |                    v                   |
           |          BindFailed raised (the node exits; nothing retries)
           +---- stopService (the socket released) -+

    Peers are ZeroMQ's to reconnect; what this service knows of them is
    ``connected`` (handshake succeeded, not yet disconnected), fed by the socket's
    monitor events; ``whenConnected`` fires on the first handshake.
    """

    log = Logger()
    socket_type: int = -1
    kind = "socket"
    # The pattern of the messages this socket receives (None: receives none).
    receives: str | None = None
    replay_protection = True
    # a dealer may start with no peer and learn them (add_endpoint / request_to)
    may_start_empty = False

    def __init__(self, bus: Bus, binds: Sequence[str] = (), connects: Sequence[str] = ()) -> None:
        self.bus = bus
        self.binds = [check_endpoint(e, bind=True) for e in binds]
        self.connects = [check_endpoint(e, bind=False) for e in connects]
        if not self.binds and not self.connects and not self.may_start_empty:
            raise ValueError(f"bus {self.kind}: no endpoint to bind or connect")
        self.counters = BusCounters(bus.counters)
        #: The bound endpoint (the real port when bound to port 0), once bound.
        self.endpoint: str | None = None
        self._conn: _Connection | None = None
        self._ready: list[defer.Deferred[None]] = []
        self._replay = ReplayGuard(bus.max_skew) if self.replay_protection else None
        #: Peers this socket has connected to and completed the handshake with.
        self.connected: set[str] = set()
        self._when_connected: list[defer.Deferred[None]] = []
        self.setName(f"bus-{self.kind}")  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated

    def __repr__(self) -> str:
        where = self.endpoint or ",".join(self.binds + self.connects)
        return f"<{type(self).__name__} {where}>"

    # -- lifecycle ------------------------------------------------------------

    def whenReady(self) -> defer.Deferred[None]:
        """Fires once the socket exists and is bound (at once for connect-only)."""
        if self._conn is not None:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._ready.append(d)
        return d

    def whenConnected(self) -> defer.Deferred[None]:
        """Fires once a connecting socket has completed a handshake with a peer
        (now, if it already has)."""
        if self.connected:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._when_connected.append(d)
        return d

    def status(self) -> dict[str, Any]:
        """What a status page shows of this socket."""
        return {
            "kind": self.kind, "running": bool(self.running), "endpoint": self.endpoint,
            "binds": list(self.binds), "connects": list(self.connects),
            "connected": sorted(self.connected), "counters": self.counters.snapshot(),
        }

    def _event(self, event: int, endpoint: str) -> None:
        """A monitor event of one of this service's sockets."""
        connecting = not self.binds
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.counters.incr("connects")
            if connecting:
                if endpoint not in self.connected:
                    self.log.info("bus {kind}: connected to {endpoint}", kind=self.kind,
                                  endpoint=endpoint)
                self.connected.add(endpoint)
                waiting, self._when_connected = self._when_connected, []
                for d in waiting:
                    d.callback(None)
        elif event == zmq.EVENT_DISCONNECTED:
            if endpoint in self.connected:
                self.connected.discard(endpoint)
                self.counters.incr("disconnects")
                self.log.info("bus {kind}: lost {endpoint}; ZeroMQ keeps reconnecting",
                              kind=self.kind, endpoint=endpoint)
        elif event & _HANDSHAKE_FAILED:
            self.counters.incr("handshake_failures")
            if connecting:
                self.bus._ratelog.warn(
                    f"{self.kind}:{id(self)}:handshake",
                    "bus {kind}: handshake with {endpoint} failed; does the peer use the "
                    "same cluster secret and bus.encrypt setting?",
                    kind=self.kind, endpoint=endpoint,
                )
            else:  # libzmq names only our own endpoint, not the peer's
                self.bus._ratelog.warn(
                    f"{self.kind}:{id(self)}:handshake",
                    "bus {kind} {where}: a connecting peer failed the handshake; does it use "
                    "the same cluster secret and bus.encrypt setting?",
                    kind=self.kind, where=self.endpoint,
                )

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        self.bus._services.add(self)
        self._open()

    def stopService(self) -> defer.Deferred[None] | None:
        super().stopService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        self.bus._services.discard(self)
        self._close()
        return None

    def _open(self) -> None:
        if not self.running:
            return
        try:
            self._conn = self.bus._connection(
                self.socket_type, self.binds, self.connects, self._frames, self._options(),
                self._event,
            )
        except zmq.ZMQError as e:
            self.running = False
            self.bus._services.discard(self)
            self.log.error("bus {kind}: cannot bind {binds}: {error}", kind=self.kind,
                           binds=" ".join(self.binds), error=e.strerror)
            reason = os.strerror(e.errno) if e.errno else e.strerror
            failed = self.binds[0] if self.binds else ""  # a bus socket binds one
            target = zmq_endpoint(failed)
            raise BindFailed(
                f"epio: bus {self.kind} cannot bind {' '.join(self.binds)}: {reason}"
                + (" (another node on this host uses that port? give this node its own "
                   "ports in the config)" if e.errno == zmq.EADDRINUSE else ""),
                failed, target.port if target is not None else None, reason) from None
        if self.binds:
            last = self._conn.socket.getsockopt(zmq.LAST_ENDPOINT).decode()
            self.endpoint = _public_endpoint(self.binds[-1], last)
        self._opened(self._conn)
        ready, self._ready = self._ready, []
        for d in ready:
            d.callback(None)

    def _opened(self, conn: _Connection) -> None:
        """Hook: the socket exists."""

    def set_connects(self, endpoints: Sequence[str]) -> None:
        """Connect to exactly ``endpoints`` from now on (a nexus or logger joined or left
        the cluster: epio.cluster): the live socket connects to each new one and
        disconnects from each one gone; queued messages for a gone peer are dropped."""
        wanted = list(dict.fromkeys(check_endpoint(e, bind=False) for e in endpoints))
        gone = [e for e in self.connects if e not in wanted]
        new = [e for e in wanted if e not in self.connects]
        self.connects = wanted
        conn = self._conn
        for ep in gone:
            self.connected.discard(ep)
            if conn is not None:
                try:
                    conn.socket.disconnect(ep)
                except zmq.ZMQError as e:  # never connected (ENOENT): nothing to undo
                    self.log.info("bus {kind}: disconnect {endpoint}: {error}", kind=self.kind,
                                  endpoint=ep, error=e.strerror)
        for ep in new:
            if conn is not None:
                conn.socket.connect(ep)
        if gone or new:
            self.log.info("bus {kind}: now connects to {endpoints}", kind=self.kind,
                          endpoints=" ".join(wanted) or "nothing")

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        self.connected.clear()
        if conn is not None:
            self.bus._release(conn)

    def _options(self) -> list[tuple[int, SocketOption]]:
        return []

    # -- receiving ------------------------------------------------------------

    def _frames(self, frames: list[bytes]) -> None:
        raise NotImplementedError

    def _open_frame(self, frame: bytes, topic: bytes = b"") -> Envelope | None:
        """Verify a frame; count and log a rejection and return None."""
        try:
            env = self.bus.open(frame, topic=topic, pattern=self.receives, replay=self._replay)
        except Rejected as r:
            self._rejected(r)
            return None
        self.counters.incr(C.RECEIVED)
        return env

    def _rejected(self, r: Rejected) -> None:
        self.counters.rejected(r.reason)
        self.bus._ratelog.warn(
            f"{self.kind}:{id(self)}:{r.reason.value}",
            "bus {kind} {where} dropped a message: {reason} ({detail})",
            kind=self.kind, where=self.endpoint or ",".join(self.connects),
            reason=r.reason.value, detail=r.detail,
        )

    def _malformed(self, detail: str) -> None:
        self._rejected(Rejected(Reason.MALFORMED, detail))

    def _send(self, conn: _Connection | None, frames: list[bytes], what: str) -> bool:
        """Send without blocking; a full queue is counted and logged, not raised."""
        if conn is None:
            self.counters.incr(C.DROPPED_NOT_RUNNING)
            self.bus._ratelog.warn(
                f"{self.kind}:notrunning", "bus {kind}: {what} dropped: service not running",
                kind=self.kind, what=what,
            )
            return False
        try:
            conn.send(frames)
        except zmq.Again:
            self.counters.incr(C.DROPPED_HWM)
            self.bus._ratelog.warn(
                f"{self.kind}:hwm",
                "bus {kind} {where}: {what} dropped: queue full (high-water mark {hwm})",
                kind=self.kind, where=self.endpoint or ",".join(self.connects), what=what,
                hwm=self.bus.high_water_mark,
            )
            return False
        except zmq.ZMQError as e:
            self.counters.incr("dropped.error")
            self.bus._ratelog.warn(
                f"{self.kind}:senderror", "bus {kind}: {what} dropped: {error}",
                kind=self.kind, what=what, error=e.strerror,
            )
            return False
        self.counters.incr(C.SENT)
        return True

    def _call_handler(self, what: str, handler: Callable[..., Any], *args: Any) -> None:
        """Run a PULL/SUB handler; errors (sync or async) are logged as bugs."""
        try:
            result = handler(*args)
        except Exception:
            self.counters.incr(C.HANDLER_ERRORS)
            self.log.failure("bus {kind}: handler for {what} failed", kind=self.kind, what=what)
            return
        if inspect.isawaitable(result):
            d: defer.Deferred[Any] = defer.ensureDeferred(result)  # type: ignore[arg-type]

            def failed(f: Failure) -> None:
                self.counters.incr(C.HANDLER_ERRORS)
                self.log.failure(
                    "bus {kind}: handler for {what} failed", f, kind=self.kind, what=what
                )

            d.addErrback(failed)


# ---------------------------------------------------------------------------
# request / reply


class Router(BusService):
    """ROUTER: answers requests with ``handler(env) -> (reply_type, body)``.

    The handler may be a coroutine function or return a Deferred.  Raising
    :class:`RemoteError` answers ``bus.error`` with its code and message; any
    other exception answers ``bus.error`` code ``internal`` (no traceback) and
    is logged as a failure.  ``bus.ping`` is answered here without the handler.
    """

    socket_type = zmq.ROUTER
    kind = "router"
    receives = "request"

    def __init__(self, bus: Bus, bind: str, handler: RouterHandler) -> None:
        super().__init__(bus, binds=[bind])
        self.handler = handler
        self._inflight: set[defer.Deferred[Any]] = set()

    def _options(self) -> list[tuple[int, SocketOption]]:
        # Report unroutable replies (peer gone) as errors instead of dropping silently.
        return [(zmq.ROUTER_MANDATORY, 1)]

    def stopService(self) -> defer.Deferred[None] | None:
        for d in list(self._inflight):
            d.cancel()
        return super().stopService()

    def _frames(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            self._malformed(f"expected [identity, envelope], got {len(frames)} frames")
            return
        identity, frame = frames
        env = triage_request(self.bus, frame, self._replay, self.counters, self._rejected,
                             lambda req, type, body: self._reply(identity, req, type, body))
        if env is None:
            return
        d = defer.maybeDeferred(self.handler, env)
        d.addCallback(self._coerce)
        self._inflight.add(d)

        def done(result: tuple[str, dict[str, Any]]) -> None:
            self._inflight.discard(d)
            self._reply(identity, env, *result)

        def failed(f: Failure) -> None:
            self._inflight.discard(d)
            if f.check(defer.CancelledError):
                return
            if f.check(RemoteError):
                err: RemoteError = f.value  # type: ignore[assignment]
                self._reply(identity, env, "bus.error", {"code": err.code, "message": err.message})
                return
            self.counters.incr(C.HANDLER_ERRORS)
            self.log.failure(
                "bus router {where}: handler for {type} from {sender} failed", f,
                where=self.endpoint, type=env.type, sender=env.sender,
            )
            self._reply(
                identity, env, "bus.error",
                {"code": "internal", "message": f"internal error handling {env.type}"},
            )

        d.addCallbacks(done, failed)

    @staticmethod
    def _coerce(result: Any) -> Any:
        if inspect.isawaitable(result):
            return defer.ensureDeferred(result)  # type: ignore[arg-type]
        return result

    def _reply(self, identity: bytes, req: Envelope, type: str, body: dict[str, Any]) -> None:
        try:
            frame = self.bus.seal_new(type, body, pattern="reply", reply_to=req.id)
        except (ValueError, TypeError) as e:
            self.counters.incr(C.HANDLER_ERRORS)
            self.log.error(
                "bus router {where}: handler for {req} gave a bad reply: {error}",
                where=self.endpoint, req=req.type, error=str(e),
            )
            frame = self.bus.seal_new(
                "bus.error", {"code": "internal", "message": f"internal error handling {req.type}"},
                pattern="reply", reply_to=req.id,
            )
            type = "bus.error"
        if type == "bus.error":
            self.counters.incr(C.ERROR_REPLIES)
        self._send(self._conn, [identity, frame], f"reply {type} to {req.sender}")


class _Pending:
    __slots__ = ("deferred", "timer", "type", "endpoint", "timeout")

    def __init__(self, deferred: defer.Deferred[Envelope], type: str, endpoint: str,
                 timeout: float) -> None:
        self.deferred = deferred
        self.timer: Any = None
        self.type = type
        self.endpoint = endpoint
        self.timeout = timeout


class Dealer(BusService):
    """DEALER side of request/reply: ``await dealer.request(type, body)``.

    One ZeroMQ DEALER socket per endpoint (with ZMQ_IMMEDIATE, so a request is
    only queued to a peer that is connected).  ``request`` goes to the next
    connected endpoint in turn (waiting, within the timeout, for one to
    connect); ``request_to`` addresses one endpoint.  Replies are matched to
    requests by id; a reply that comes after its request timed out is dropped
    and counted (``late_replies``).
    """

    socket_type = zmq.DEALER
    kind = "dealer"
    receives = "reply"
    may_start_empty = True
    _POLL = 0.05  # seconds between attempts while no peer is connected

    def __init__(self, bus: Bus, endpoints: Sequence[str]) -> None:
        if isinstance(endpoints, str):
            endpoints = [endpoints]
        super().__init__(bus, connects=list(endpoints))
        self._conns: dict[str, _Connection] = {}
        self._pending: dict[str, _Pending] = {}
        # ids of requests that timed out recently, to tell late replies from strays
        self._expired: dict[str, None] = {}
        # requests waiting for a peer to connect: id -> retry
        self._waiting: dict[str, Callable[[], None]] = {}
        self._next = 0

    @property
    def endpoints(self) -> list[str]:
        return list(self.connects)

    def _open(self) -> None:
        if not self.running:
            return
        for ep in self.connects:
            self._connect(ep)
        self._conn = next(iter(self._conns.values()), None)
        ready, self._ready = self._ready, []
        for d in ready:
            d.callback(None)

    def whenReady(self) -> defer.Deferred[None]:
        if self.running:
            return defer.succeed(None)
        return super().whenReady()

    def _connect(self, ep: str) -> None:
        def frames(parts: list[bytes]) -> None:
            self._reply_frames(ep, parts)

        def event(event: int, endpoint: str) -> None:
            # one socket per peer: name the peer as configured, whatever libzmq says
            self._event(event, ep)

        self._conns[ep] = self.bus._connection(
            self.socket_type, [], [ep], frames, [(zmq.IMMEDIATE, 1)], event
        )

    def add_endpoint(self, endpoint: str) -> None:
        """Connect to one more peer (e.g. a runner that joined)."""
        ep = check_endpoint(endpoint, bind=False)
        if ep in self.connects:
            return
        self.connects.append(ep)
        if self.running:
            self._connect(ep)

    def set_connects(self, endpoints: Sequence[str]) -> None:
        """Talk to exactly ``endpoints`` from now on (one socket per peer)."""
        wanted = list(dict.fromkeys(check_endpoint(e, bind=False) for e in endpoints))
        for ep in [e for e in self.connects if e not in wanted]:
            self.remove_endpoint(ep)
        for ep in wanted:
            self.add_endpoint(ep)

    def remove_endpoint(self, endpoint: str) -> None:
        """Disconnect from a peer; its pending requests fail when they time out."""
        if endpoint not in self.connects:
            return
        self.connects.remove(endpoint)
        conn = self._conns.pop(endpoint, None)
        self.connected.discard(endpoint)
        if conn is not None:
            self.bus._release(conn)

    def _close(self) -> None:
        self._conn = None
        self._waiting.clear()
        self.connected.clear()
        conns, self._conns = self._conns, {}
        for conn in conns.values():
            self.bus._release(conn)
        pending, self._pending = self._pending, {}
        for p in pending.values():
            if p.timer is not None and p.timer.active():
                p.timer.cancel()
            p.deferred.errback(NotRunning(f"bus dealer stopped before {p.type} got a reply"))

    async def request(self, type: str, body: dict[str, Any], timeout: float | None = None) -> Envelope:
        """Send a request to the next connected peer; return the reply envelope.

        Raises RequestTimeout (no reply in ``timeout``, default
        ``bus.request_timeout``), RemoteError (the peer answered bus.error) or
        NotRunning.
        """
        return await self._request(None, type, body, timeout)

    async def request_to(
        self, endpoint: str, type: str, body: dict[str, Any], timeout: float | None = None
    ) -> Envelope:
        """Like :meth:`request`, to one given endpoint (added if not yet known)."""
        ep = check_endpoint(endpoint, bind=False)
        if ep not in self.connects:
            self.add_endpoint(ep)
        return await self._request(ep, type, body, timeout)

    def _request(
        self, endpoint: str | None, type: str, body: dict[str, Any], timeout: float | None
    ) -> defer.Deferred[Envelope]:
        if not self.running:
            return defer.fail(NotRunning(f"bus dealer not running: cannot send {type}"))
        timeout = self.bus.request_timeout if timeout is None else timeout
        env = self.bus.envelope(type, body, pattern="request")
        where = endpoint or ",".join(self.connects) or "(no endpoints)"
        clock = self.bus.reactor
        deadline = clock.seconds() + timeout

        def cancel(d: defer.Deferred[Envelope]) -> None:
            self._waiting.pop(env.id, None)
            p = self._pending.pop(env.id, None)
            if p is not None and p.timer is not None and p.timer.active():
                p.timer.cancel()

        d: defer.Deferred[Envelope] = defer.Deferred(cancel)
        pending = _Pending(d, type, where, timeout)
        self._pending[env.id] = pending

        def expire() -> None:
            p = self._pending.pop(env.id, None)
            if p is None:
                return
            self.counters.incr(C.TIMEOUTS)
            self._expired[env.id] = None
            if len(self._expired) > 10_000:
                self._expired.pop(next(iter(self._expired)))
            d.errback(RequestTimeout(type, p.endpoint, timeout))

        def attempt() -> None:
            if pending.timer is not None and pending.timer.active():
                pending.timer.cancel()
            pending.timer = None
            self._waiting.pop(env.id, None)
            if env.id not in self._pending:
                return
            # sealed when actually sent: a request that waited for a peer is not stale
            frame = self.bus.seal(evolve(env, timestamp=clock.seconds()))
            targets = [endpoint] if endpoint is not None else self._rotation()
            for ep in targets:
                conn = self._conns.get(ep)
                if conn is None:
                    continue
                try:
                    conn.send([frame])
                except zmq.Again:
                    continue  # not connected (ZMQ_IMMEDIATE) or full: next peer
                except zmq.ZMQError as e:
                    self.log.warn("bus dealer: sending {type} to {ep} failed: {error}",
                                  type=type, ep=ep, error=e.strerror)
                    continue
                self.counters.incr(C.SENT)
                pending.endpoint = ep
                pending.timer = clock.callLater(max(0.0, deadline - clock.seconds()), expire)
                return
            left = deadline - clock.seconds()
            if left <= 0:
                self._waiting.pop(env.id, None)
                p = self._pending.pop(env.id, None)
                if p is not None:
                    self.counters.incr(C.TIMEOUTS)
                    d.errback(RequestTimeout(
                        type, where, timeout, "no connection to any peer" if endpoint is None
                        else "not connected"))
                return
            pending.timer = clock.callLater(min(self._POLL, left), attempt)
            self._waiting[env.id] = attempt  # or sooner, when a peer connects

        attempt()
        return d

    def _event(self, event: int, endpoint: str) -> None:
        super()._event(event, endpoint)
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED and self._waiting:
            waiting, self._waiting = self._waiting, {}
            for attempt in waiting.values():
                self.bus.reactor.callLater(0, attempt)

    def _rotation(self) -> list[str]:
        eps = self.connects
        if not eps:
            return []
        start = self._next % len(eps)
        self._next += 1
        return eps[start:] + eps[:start]

    def _reply_frames(self, ep: str, frames: list[bytes]) -> None:
        if len(frames) != 1:
            self._malformed(f"expected one envelope frame from {ep}, got {len(frames)}")
            return
        env = self._open_frame(frames[0])
        if env is None:
            return
        p = self._pending.pop(env.reply_to or "", None)
        if p is None:
            self.counters.incr(C.LATE_REPLIES)
            late = env.reply_to in self._expired
            self.bus._ratelog.warn(
                "dealer:late", "bus dealer: dropped {kind} reply {type} from {sender}",
                kind="late" if late else "unmatched", type=env.type, sender=env.sender,
            )
            return
        if p.timer is not None and p.timer.active():
            p.timer.cancel()
        if env.type == "bus.error":
            p.deferred.errback(RemoteError(env.body["code"], env.body["message"]))
        else:
            p.deferred.callback(env)


# ---------------------------------------------------------------------------
# publish / subscribe


class Publisher(BusService):
    """PUB: ``publish(type, body, topic=b"...")`` to every subscriber.

    libzmq drops messages for a subscriber whose queue is full without telling
    the sender (other subscribers are unaffected); receivers detect such gaps
    with sequence numbers in the body.  A zmq.Again is counted, never raised.
    """

    socket_type = zmq.PUB
    kind = "publisher"

    def __init__(self, bus: Bus, bind: str | None = None,
                 connect: Sequence[str] | str | None = None,
                 may_start_empty: bool = False) -> None:
        if isinstance(connect, str):
            connect = [connect]
        # a publisher following the cluster's nexus list may have no peer yet
        self.may_start_empty = may_start_empty
        super().__init__(bus, binds=[bind] if bind else [], connects=list(connect or ()))

    def _frames(self, frames: list[bytes]) -> None:
        pass  # a PUB socket receives nothing

    def publish(self, type: str, body: dict[str, Any], topic: bytes = b"") -> bool:
        """Publish; True if queued, False if dropped (counted and logged)."""
        if not isinstance(topic, bytes):
            raise TypeError(f"topic must be bytes, not {topic.__class__.__name__}")
        frame = self.bus.seal_new(type, body, pattern="publish", topic=topic)
        return self._send(self._conn, [topic, frame], type)


class Subscriber(BusService):
    """SUB: ``handler(topic, env)`` for each verified message on ``topics``.

    Connects to ``endpoints`` (a list) or binds ``bind``.  A topic is a prefix;
    ``b""`` subscribes to everything.
    """

    socket_type = zmq.SUB
    kind = "subscriber"
    receives = "publish"

    def __init__(self, bus: Bus, endpoints: Sequence[str], topics: Sequence[bytes],
                 handler: SubHandler, bind: str | None = None) -> None:
        if isinstance(endpoints, str):
            endpoints = [endpoints]
        super().__init__(bus, binds=[bind] if bind else [], connects=list(endpoints or ()))
        for t in topics:
            if not isinstance(t, bytes):
                raise TypeError(f"topics must be bytes, not {t!r}")
        self.topics = list(topics)
        self.handler = handler

    def _options(self) -> list[tuple[int, SocketOption]]:
        return [(zmq.SUBSCRIBE, t) for t in self.topics]

    def _frames(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            self._malformed(f"expected [topic, envelope], got {len(frames)} frames")
            return
        topic, frame = frames
        env = self._open_frame(frame, topic)
        if env is not None:
            self._call_handler(env.type, self.handler, topic, env)


# ---------------------------------------------------------------------------
# push / pull


class Push(BusService):
    """PUSH: ``send(type, body)``, load-balanced round-robin over ``endpoints``.

    To deliver to *every* endpoint (as the log pipeline does) make one Push per
    endpoint.  Messages for a peer that is not (yet) connected are queued up
    to the high-water mark; past it they are dropped and counted.
    """

    socket_type = zmq.PUSH
    kind = "push"

    def __init__(self, bus: Bus, endpoints: Sequence[str]) -> None:
        if isinstance(endpoints, str):
            endpoints = [endpoints]
        super().__init__(bus, connects=list(endpoints))

    def _frames(self, frames: list[bytes]) -> None:
        pass

    def send(self, type: str, body: dict[str, Any]) -> bool:
        """Queue a message without blocking; False if it was dropped (counted)."""
        frame = self.bus.seal_new(type, body, pattern="push")
        return self._send(self._conn, [frame], type)


class Pull(BusService):
    """PULL: ``handler(env)`` for each verified pushed message."""

    socket_type = zmq.PULL
    kind = "pull"
    receives = "push"

    def __init__(self, bus: Bus, bind: str, handler: PullHandler) -> None:
        super().__init__(bus, binds=[bind])
        self.handler = handler

    def _frames(self, frames: list[bytes]) -> None:
        if len(frames) != 1:
            self._malformed(f"expected one envelope frame, got {len(frames)}")
            return
        env = self._open_frame(frames[0])
        if env is not None:
            self._call_handler(env.type, self.handler, env)


def make_factory(reactor: Any, linger_ms: int) -> ZmqFactory:
    """One ZeroMQ context for a Bus, driven by the given reactor."""
    factory = ZmqFactory()
    factory.reactor = reactor
    factory.lingerPeriod = linger_ms
    return factory


def make_connection(
    factory: ZmqFactory,
    socket_type: int,
    binds: Sequence[str],
    connects: Sequence[str],
    on_message: Callable[[list[bytes]], None],
    options: Sequence[tuple[int, SocketOption]],
    on_event: Callable[[int, str], None] | None = None,
) -> _Connection:
    endpoints = [ZmqEndpoint(ZmqEndpointType.bind, e) for e in binds] + [
        ZmqEndpoint(ZmqEndpointType.connect, e) for e in connects
    ]
    return _Connection(factory, socket_type, options, endpoints, on_message, on_event)
