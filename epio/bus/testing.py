"""An in-memory bus for other components' unit tests (no sockets, a fake clock).

:class:`MemoryBus` has the factories of :class:`epio.bus.Bus` and returns
services with the same methods (``request``/``request_to``, ``publish``,
``send``, handlers, ``endpoint``, ``counters``, ``whenReady``).  Every message
really is sealed and opened -- msgpack round trip, signature, registry checks
-- so a body the real bus would refuse is refused here too.  Several buses (one
per simulated node) share a :class:`MemoryNetwork`::

    clock = task.Clock()
    net = MemoryNetwork()
    nexus_bus = MemoryBus(clock, "nexus-1", network=net)
    runner_bus = MemoryBus(clock, "runner-1", network=net)
    sub = nexus_bus.subscriber([], [b"hb"], handler, bind="tcp://127.0.0.1:7711")
    pub = runner_bus.publisher(connect=["tcp://127.0.0.1:7711"])
    sub.startService(); pub.startService()
    pub.publish("runner.heartbeat", {...}, topic=b"hb")
    clock.advance(0)            # deliveries run on the clock, like the reactor's

Delivery is asynchronous (``clock.callLater(0, ...)``), as on the real bus.
Differences from ZeroMQ, on purpose: no slow-joiner (a subscriber receives
from the moment both services run), messages to a stopped PULL/ROUTER are
dropped at once (counted) rather than queued in a kernel buffer.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Sequence
from typing import Any, TypeVar

from attrs import evolve
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from epio.bus import Bus
from epio.bus import counters as C
from epio.bus.counters import BusCounters
from epio.bus.envelope import Envelope, ReplayGuard, triage_request
from epio.bus.errors import NotRunning, Rejected, RemoteError, RequestTimeout
from epio.bus.messages import REGISTRY, MessageType, Registry
from epio.config.settings import BusSettings

#: Every production type plus the ``test.*`` types of the bus's own tests (kept
#: out of the production registry, so no production socket accepts them).
TEST_REGISTRY = Registry([
    MessageType("test.echo", 1, "request", "Test only: asks a test ROUTER to echo the body.",
                fields={"n": int}, optional={"sleep": (int, float), "fail": str}),
    MessageType("test.echoed", 1, "reply", "Test only: reply to test.echo.", fields={"n": int}),
    MessageType("test.event", 1, "publish", "Test only: a published event.", fields={"n": int}),
    MessageType("test.job", 1, "push", "Test only: a pushed job.", fields={"n": int}),
], parent=REGISTRY)



_S = TypeVar("_S", bound="_MemoryService")


class MemoryNetwork:
    """The endpoints bound by memory services, shared by the buses of a test."""

    def __init__(self) -> None:
        self.bound: dict[str, _MemoryService] = {}
        self.services: list[_MemoryService] = []
        self._ports = itertools.count(40000)

    def bind(self, endpoint: str, svc: _MemoryService) -> str:
        if endpoint.endswith((":0", ":*")):
            endpoint = endpoint.rsplit(":", 1)[0] + f":{next(self._ports)}"
        other = self.bound.get(endpoint)
        if other is not None and other is not svc:
            raise OSError(f"memory bus: {endpoint} is already bound by {other!r}")
        self.bound[endpoint] = svc
        return endpoint

    def unbind(self, svc: _MemoryService) -> None:
        for ep, s in list(self.bound.items()):
            if s is svc:
                del self.bound[ep]

    def running(self, endpoint: str, kind: type[_S]) -> _S | None:
        svc = self.bound.get(endpoint)
        if isinstance(svc, kind) and svc.running:
            return svc
        return None


class MemoryBus(Bus):
    """A :class:`Bus` whose services talk through a :class:`MemoryNetwork`."""

    def __init__(self, clock: IReactorTime, sender: str = "test-node",
                 settings: BusSettings | None = None, network: MemoryNetwork | None = None,
                 secret: bytes = b"memory-bus-secret!", registry: Registry = REGISTRY) -> None:
        super().__init__(clock, secret, sender, settings, registry=registry)
        self.network = network if network is not None else MemoryNetwork()

    def router(self, bind: str, handler: Any) -> MemoryRouter:  # type: ignore[override]
        return MemoryRouter(self, [bind], [], handler)

    def dealer(self, endpoints: Sequence[str]) -> MemoryDealer:  # type: ignore[override]
        return MemoryDealer(self, [], [endpoints] if isinstance(endpoints, str) else endpoints)

    def publisher(self, bind: str | None = None,  # type: ignore[override]
                  connect: Sequence[str] | str | None = None,
                  may_start_empty: bool = False) -> MemoryPublisher:
        if isinstance(connect, str):
            connect = [connect]
        return MemoryPublisher(self, [bind] if bind else [], list(connect or ()),
                               may_start_empty=may_start_empty)

    def subscriber(self, endpoints: Sequence[str], topics: Sequence[bytes],  # type: ignore[override]
                   handler: Any, bind: str | None = None) -> MemorySubscriber:
        if isinstance(endpoints, str):
            endpoints = [endpoints]
        return MemorySubscriber(self, [bind] if bind else [], list(endpoints or ()), handler,
                                topics)

    def push(self, endpoints: Sequence[str]) -> MemoryPush:  # type: ignore[override]
        return MemoryPush(self, [], [endpoints] if isinstance(endpoints, str) else endpoints)

    def pull(self, bind: str, handler: Any) -> MemoryPull:  # type: ignore[override]
        return MemoryPull(self, [bind], [], handler)


class _MemoryService(Service):
    log = Logger()
    kind = "socket"
    receives: str | None = None

    def __init__(self, bus: MemoryBus, binds: Sequence[str], connects: Sequence[str],
                 handler: Any = None, may_start_empty: bool = False) -> None:
        self.bus = bus
        self.binds = list(binds)
        self.connects = list(connects)
        if (not self.binds and not self.connects and self.kind != "dealer"
                and not may_start_empty):
            raise ValueError(f"bus {self.kind}: no endpoint to bind or connect")
        self.handler = handler
        self.counters = BusCounters(bus.counters)
        self.endpoint: str | None = None
        self._replay = ReplayGuard(bus.max_skew)
        bus.network.services.append(self)
        self.setName(f"bus-{self.kind}")  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.endpoint or ','.join(self.connects)}>"

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        self.bus._services.add(self)
        for ep in self.binds:
            self.endpoint = self.bus.network.bind(ep, self)

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        self.bus._services.discard(self)
        self.bus.network.unbind(self)

    def set_connects(self, endpoints: Sequence[str]) -> None:
        """Connect to exactly ``endpoints`` from now on (as BusService.set_connects)."""
        self.connects = list(dict.fromkeys(endpoints))

    @property
    def connected(self) -> set[str]:
        """Connect endpoints bound by a running service of the network."""
        if not self.running:
            return set()
        return {ep for ep in self.connects
                if (svc := self.bus.network.bound.get(ep)) is not None and svc.running}

    def whenConnected(self) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()

        def check() -> None:
            if self.connected:
                d.callback(None)
            else:
                self.bus.reactor.callLater(0.05, check)

        check()
        return d

    def status(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "running": bool(self.running), "endpoint": self.endpoint,
            "binds": list(self.binds), "connects": list(self.connects),
            "connected": sorted(self.connected), "counters": self.counters.snapshot(),
        }

    def whenReady(self) -> defer.Deferred[None]:
        return defer.succeed(None)

    # -- delivery -------------------------------------------------------------

    def _later(self, f: Any, *a: Any) -> None:
        self.bus.reactor.callLater(0, f, *a)

    def _open(self, frame: bytes, topic: bytes = b"") -> Envelope | None:
        try:
            env = self.bus.open(frame, topic=topic, pattern=self.receives, replay=self._replay)
        except Rejected as r:
            self.counters.rejected(r.reason)
            return None
        self.counters.incr(C.RECEIVED)
        return env

    def _call(self, what: str, *args: Any) -> None:
        try:
            result = self.handler(*args)
        except Exception:
            self.counters.incr(C.HANDLER_ERRORS)
            self.log.failure("memory bus {kind}: handler for {what} failed", kind=self.kind,
                             what=what)
            return
        if inspect.isawaitable(result):
            d: defer.Deferred[Any] = defer.ensureDeferred(result)  # type: ignore[arg-type]

            def failed(f: Failure) -> None:
                self.counters.incr(C.HANDLER_ERRORS)
                self.log.failure("memory bus {kind}: handler for {what} failed", f,
                                 kind=self.kind, what=what)

            d.addErrback(failed)

    def _not_running(self) -> bool:
        self.counters.incr(C.DROPPED_NOT_RUNNING)
        return False


def _awaited(result: Any) -> Any:
    if inspect.isawaitable(result):
        return defer.ensureDeferred(result)  # type: ignore[arg-type]
    return result


class MemoryRouter(_MemoryService):
    kind = "router"
    receives = "request"

    def _request(self, frame: bytes, reply: Any) -> None:
        env = triage_request(self.bus, frame, self._replay, self.counters,
                             lambda r: self.counters.rejected(r.reason),
                             lambda req, type, body: self._reply(reply, req, type, body))
        if env is None:
            return
        d = defer.maybeDeferred(self.handler, env)
        d.addCallback(_awaited)

        def done(result: tuple[str, dict[str, Any]]) -> None:
            self._reply(reply, env, *result)

        def failed(f: Failure) -> None:
            if f.check(RemoteError):
                err: RemoteError = f.value  # type: ignore[assignment]
                self._reply(reply, env, "bus.error", {"code": err.code, "message": err.message})
                return
            self.counters.incr(C.HANDLER_ERRORS)
            self.log.failure("memory bus router: handler for {type} failed", f, type=env.type)
            self._reply(reply, env, "bus.error",
                        {"code": "internal", "message": f"internal error handling {env.type}"})

        d.addCallbacks(done, failed)

    def _reply(self, reply: Any, req: Envelope, type: str, body: dict[str, Any]) -> None:
        if not self.running:
            return
        try:
            frame = self.bus.seal_new(type, body, pattern="reply", reply_to=req.id)
        except (ValueError, TypeError) as e:
            self.counters.incr(C.HANDLER_ERRORS)
            self.log.error("memory bus router: handler for {req} gave a bad reply: {error}",
                           req=req.type, error=str(e))
            type = "bus.error"
            frame = self.bus.seal_new(
                type, {"code": "internal", "message": f"internal error handling {req.type}"},
                pattern="reply", reply_to=req.id)
        if type == "bus.error":
            self.counters.incr(C.ERROR_REPLIES)
        self.counters.incr(C.SENT)
        self._later(reply, frame)


class MemoryDealer(_MemoryService):
    kind = "dealer"
    receives = "reply"
    _POLL = 0.05

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self._pending: dict[str, tuple[defer.Deferred[Envelope], Any]] = {}
        self._next = 0

    @property
    def endpoints(self) -> list[str]:
        return list(self.connects)

    def add_endpoint(self, endpoint: str) -> None:
        if endpoint not in self.connects:
            self.connects.append(endpoint)

    def remove_endpoint(self, endpoint: str) -> None:
        if endpoint in self.connects:
            self.connects.remove(endpoint)

    def stopService(self) -> None:
        super().stopService()
        pending, self._pending = self._pending, {}
        for d, timer in pending.values():
            if timer is not None and timer.active():
                timer.cancel()
            d.errback(NotRunning("bus dealer stopped before the reply"))

    async def request(self, type: str, body: dict[str, Any], timeout: float | None = None) -> Envelope:
        return await self._request(None, type, body, timeout)

    async def request_to(self, endpoint: str, type: str, body: dict[str, Any],
                         timeout: float | None = None) -> Envelope:
        self.add_endpoint(endpoint)
        return await self._request(endpoint, type, body, timeout)

    def _request(self, endpoint: str | None, type: str, body: dict[str, Any],
                 timeout: float | None) -> defer.Deferred[Envelope]:
        if not self.running:
            return defer.fail(NotRunning(f"bus dealer not running: cannot send {type}"))
        timeout = self.bus.request_timeout if timeout is None else timeout
        env = self.bus.envelope(type, body, pattern="request")
        clock = self.bus.reactor
        deadline = clock.seconds() + timeout
        where = endpoint or ",".join(self.connects) or "(no endpoints)"

        def cancel(d: defer.Deferred[Envelope]) -> None:
            p = self._pending.pop(env.id, None)
            if p is not None and p[1] is not None and p[1].active():
                p[1].cancel()

        d: defer.Deferred[Envelope] = defer.Deferred(cancel)

        def expire(ep: str, detail: str = "") -> None:
            if self._pending.pop(env.id, None) is not None:
                self.counters.incr(C.TIMEOUTS)
                d.errback(RequestTimeout(type, ep, timeout, detail))

        def attempt() -> None:
            if env.id not in self._pending:
                return
            if endpoint is not None:
                targets = [endpoint]
            else:
                eps = self.connects
                start = self._next % max(1, len(eps))
                self._next += 1
                targets = eps[start:] + eps[:start]
            for ep in targets:
                router = self.bus.network.running(ep, MemoryRouter)
                if router is None:
                    continue
                frame = self.bus.seal(evolve(env, timestamp=clock.seconds()))
                self.counters.incr(C.SENT)
                timer = clock.callLater(max(0.0, deadline - clock.seconds()), expire, ep)
                self._pending[env.id] = (d, timer)
                self._later(router._request, frame, self._reply)
                return
            if clock.seconds() >= deadline:
                expire(where, "no connection to any peer" if endpoint is None else "not connected")
                return
            self._pending[env.id] = (d, clock.callLater(
                min(self._POLL, deadline - clock.seconds()), attempt))

        self._pending[env.id] = (d, None)
        attempt()
        return d

    def _reply(self, frame: bytes) -> None:
        if not self.running:
            return
        env = self._open(frame)
        if env is None:
            return
        p = self._pending.pop(env.reply_to or "", None)
        if p is None:
            self.counters.incr(C.LATE_REPLIES)
            return
        if p[1] is not None and p[1].active():
            p[1].cancel()
        if env.type == "bus.error":
            p[0].errback(RemoteError(env.body["code"], env.body["message"]))
        else:
            p[0].callback(env)


class MemorySubscriber(_MemoryService):
    kind = "subscriber"
    receives = "publish"

    def __init__(self, bus: MemoryBus, binds: Sequence[str], connects: Sequence[str],
                 handler: Any, topics: Sequence[bytes]) -> None:
        super().__init__(bus, binds, connects, handler)
        for t in topics:
            if not isinstance(t, bytes):
                raise TypeError(f"topics must be bytes, not {t!r}")
        self.topics = list(topics)

    def _deliver(self, topic: bytes, frame: bytes) -> None:
        if not self.running:
            return
        env = self._open(frame, topic)
        if env is not None:
            self._call(env.type, topic, env)


class MemoryPublisher(_MemoryService):
    kind = "publisher"

    def publish(self, type: str, body: dict[str, Any], topic: bytes = b"") -> bool:
        if not isinstance(topic, bytes):
            raise TypeError(f"topic must be bytes, not {topic.__class__.__name__}")
        frame = self.bus.seal_new(type, body, pattern="publish", topic=topic)
        if not self.running:
            return self._not_running()
        self.counters.incr(C.SENT)
        net = self.bus.network
        for sub in list(net.services):
            if not (isinstance(sub, MemorySubscriber) and sub.running):
                continue
            linked = (self.endpoint is not None and self.endpoint in sub.connects) or (
                sub.endpoint is not None and sub.endpoint in self.connects)
            if linked and any(topic.startswith(t) for t in sub.topics):
                self._later(sub._deliver, topic, frame)
        return True


class MemoryPush(_MemoryService):
    kind = "push"

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self._next = 0

    def send(self, type: str, body: dict[str, Any]) -> bool:
        frame = self.bus.seal_new(type, body, pattern="push")
        if not self.running:
            return self._not_running()
        eps = self.connects
        start = self._next % len(eps)
        self._next += 1
        for ep in eps[start:] + eps[:start]:
            pull = self.bus.network.running(ep, MemoryPull)
            if pull is not None:
                self.counters.incr(C.SENT)
                self._later(pull._deliver, frame)
                return True
        # the real PUSH would queue for an absent peer; here it is lost, and counted
        self.counters.incr("dropped.no_peer")
        return False


class MemoryPull(_MemoryService):
    kind = "pull"
    receives = "push"

    def _deliver(self, frame: bytes) -> None:
        if not self.running:
            return
        env = self._open(frame)
        if env is not None:
            self._call(env.type, env)
