"""The router's proxy core: client connections, backend pools, balancing.

Protocol-level on the reactor, no twisted.web and no Deferreds on the request
path.  One :class:`ClientConn` per client connection runs one exchange at a time
(pipelined requests wait in its buffer, so answers leave in order); it parses
the request head (:mod:`epio.lb.http`), finds the route, picks a backend (least
outstanding requests among healthy, non-ejected backends), takes an idle pooled
:class:`BackendConn` or connects a new one, writes a re-serialised head and
streams the body up, then parses the response and streams it down.  Each
transport is registered as the other's streaming producer for the exchange, so
a slow reader pauses the fast writer and memory stays flat.

Timeouts are deadlines checked by one periodic sweep (``SWEEP_INTERVAL``), not a
timer per request.
"""

from __future__ import annotations

import os
import tempfile
from collections import deque
from collections.abc import Callable
from typing import IO, Any

from attrs import define, fields
from twisted.internet import error as ierror
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IAddress,
    IConnector,
    IDelayedCall,
    IPullProducer,
    IPushProducer,
)
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from epio.config.settings import LbSettings
from epio.domain import ROUTER_VIA
from epio.lb import pages
from epio.lb.compress import GzipBody
from epio.lb.compress import plan as compress_plan
from epio.lb.fastio import ReadMux, fast_write, is_fast
from epio.lb.http import (
    IDEMPOTENT,
    MAX_HEADER_BYTES,
    MAX_REQUEST_LINE,
    MAX_RESPONSE_HEAD,
    BadMessage,
    BadResponse,
    ChunkedDecoder,
    HTTPError,
    Request,
    Response,
    check_request_line_length,
    parse_request,
    parse_response,
    valid_request_id,
)
from epio.lb.observe import Observer
from epio.listen import ConnectionLimit
from epio.routing import InvalidTransition, Route, RouteTable, static_token

SWEEP_INTERVAL = 0.5
PIPELINE_BUFFER = 65536  # bytes of a client's next requests held before reading pauses

SPOOL_CHUNK = 65536  # bytes read from a spooled body per write to the backend
# Retry-After (seconds) of a 503 spool_full: the spool frees as bodies reach their apps
SPOOL_FULL_RETRY_AFTER = 5
# Retry-After (seconds) of a 503 for an asleep app that did not wake in lb.wake_timeout
# (or whose lb.wake_queue_size held requests are waiting already)
WAKE_RETRY_AFTER = 5
# seconds between two runner.wake of one app from one router process (the runner
# launches once anyway: this only spares the messages)
WAKE_REPEAT = 2.0
# seconds between two looks at whether an app with held requests has a backend now
WAKE_POLL = 0.005

# client connection states (C_BODY: a request body being buffered before dispatch),
# one bit each, so that a move is checked with one AND (drawn in ClientConn's docstring)
C_HEAD, C_WAIT, C_PROXY, C_TUNNEL, C_CLOSED, C_LINGER, C_BODY = (1 << i for i in range(7))
C_NAMES = {C_HEAD: "HEAD", C_WAIT: "WAIT", C_PROXY: "PROXY", C_TUNNEL: "TUNNEL",
           C_CLOSED: "CLOSED", C_LINGER: "LINGER", C_BODY: "BODY"}
# INTO_X: the states a client connection may move to X from (any may move to C_CLOSED)
INTO_HEAD = C_HEAD | C_BODY | C_WAIT | C_PROXY | C_TUNNEL
INTO_BODY = C_HEAD
INTO_WAIT = C_HEAD | C_BODY | C_WAIT | C_PROXY
INTO_PROXY = C_WAIT
INTO_TUNNEL = C_PROXY
INTO_LINGER = C_HEAD | C_BODY | C_WAIT | C_PROXY | C_TUNNEL | C_LINGER
# after answering and half-closing, unread client bytes are read and dropped for at
# most this long, so that closing does not RST away the answer (lingering close)
LINGER_SECONDS = 2.0
# response reading modes
R_HEAD, R_CL, R_CHUNKED, R_CLOSE, R_TUNNEL, R_DONE, R_GZIP = range(7)
# client read-pause reasons
P_UP = 1     # the backend's send buffer is full
P_BUF = 2    # pipelined bytes waiting
P_WAIT = 4   # body bytes waiting for a backend connection


@define
class Settings:
    """Resolved ``[lb]`` settings the proxy reads (see epio/config/schema.py)."""

    header_timeout: float = 10.0
    connect_timeout: float = 5.0
    first_byte_timeout: float = 30.0
    idle_timeout: float = 55.0
    keepalive_timeout: float = 75.0
    websocket_idle_timeout: float = 3600.0
    queue_timeout: float = 10.0
    pool_idle_timeout: float = 15.0
    pool_max_idle: int = 256
    backend_max_conns: int = 256
    backend_queue_size: int = 256
    connect_attempts: int = 3
    eject_after: int = 5
    eject_seconds: float = 10.0
    max_body_size: int = 104857600
    body_timeout: float = 10.0
    body_min_rate: int = 1024
    body_buffer_size: int = 65536
    spool_max_bytes: int = 1073741824
    trusted_proxies: tuple[str, ...] = ()
    shutdown_timeout: float = 30.0
    via: bytes = ROUTER_VIA.encode()  # the routers' Via (the api reads it: docs/cli.md)
    https_port: int = 443  # in the Location of an app's https_redirect (docs/https.md)
    # an asleep app's requests: held at most wake_timeout s, at most wake_queue_size
    # of them per app (docs/apps.md "Sleeping apps")
    wake_timeout: float = 10.0
    wake_queue_size: int = 256

    @classmethod
    def from_settings(cls, lb: LbSettings) -> Settings:
        """The proxy's part of the node's ``[lb]`` settings."""
        return cls(**{a.name: getattr(lb, a.name) for a in fields(cls) if a.name != "via"})


class SpoolFull(Exception):
    """Spooling this body would pass lb.spool_max_bytes (503 spool_full, Retry-After)."""


class BackendState:
    """Per-backend (host, port) balancing state, idle pool and waiting queue."""

    __slots__ = ("key", "label", "outstanding", "fails", "ejected_until", "probation", "idle",
                 "queue")

    def __init__(self, key: tuple[str, int]) -> None:
        self.key = key
        host, port = key
        self.label = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.outstanding = 0
        self.fails = 0
        self.ejected_until = 0.0
        # ejected once and not yet answered since: its next request is a trial, and one
        # failure ejects it again (half-open, docs/router.md "Failures")
        self.probation = False
        self.idle: list[BackendConn] = []
        self.queue: deque[ClientConn] = deque()


class LB:
    """Shared state of one router process: table, balancer, pools, observer."""

    log = Logger()

    def __init__(self, reactor: Any, table: RouteTable, settings: Settings,
                 observer: Observer | None = None, scheme: bytes = b"http",
                 spool_dir: str | None = None, acme: Any = None,
                 open_file: Callable[..., IO[bytes]] = tempfile.TemporaryFile,
                 static_secret: bytes = b"", mux: ReadMux | None = None,
                 waker: Callable[[str, tuple[str, ...]], None] | None = None) -> None:
        self.reactor = reactor
        # asleep apps (docs/apps.md "Sleeping apps"): waker(app, runner endpoints) sends
        # runner.wake; requests wait in held[app] until the app's route has a backend
        self.waker = waker
        self.held: dict[str, deque[ClientConn]] = {}
        self._woken: dict[str, float] = {}
        self._wake_poll: IDelayedCall | None = None
        self._wake_version = -1
        self.wakes = 0  # runner.wake sent (for /metrics and tests)
        # where request bodies larger than body_buffer_size are spooled (the router's
        # private run/tmp directory; None: the system's temporary directory)
        self.spool_dir = spool_dir
        self.spooled = 0  # bodies spooled to a file since start (for /metrics and tests)
        # bytes in this process's spool files now: at most settings.spool_max_bytes
        self.spool_bytes = 0
        self.spool_refused = 0  # requests answered 503 spool_full since start (/metrics)
        self._open_file = open_file
        # epio.certs.router.RouterCerts: answers ACME HTTP-01 challenges (docs/https.md)
        self.acme = acme
        self.table = table
        self.s = settings
        self.observer = observer if observer is not None else Observer(None, None, False)
        self.states: dict[tuple[str, int], BackendState] = {}
        self.conns: set[ClientConn | BackendConn] = set()  # every client and backend connection (for sweeps)
        self.clients = 0
        self.stopping = False
        self.trusted = frozenset(settings.trusted_proxies)
        self._rr = 0
        self._rid_prefix = os.urandom(6).hex().encode()
        self._rid_n = 0
        self._drained: list[Deferred[None]] = []
        # epio.lb.fastio.ReadMux (epoll reactors), or None; Any: the hot paths use it
        # only where a connection holds a mux slot (mfd), so it is never None there
        self.mux: Any = mux
        # the cluster secret: static requests go to the runners' static servers with an
        # X-Epio-Static token made from it (docs/static.md); empty: no static routing
        self.static_secret = static_secret
        self._static_headers: dict[str, bytes] = {}
        self.pages = pages.ErrorPages()

    def static_header(self, app: str) -> bytes:
        """The ``X-Epio-Static`` header line (with CRLF) for ``app``'s static requests."""
        h = self._static_headers.get(app)
        if h is None:
            if len(self._static_headers) > 100000:
                self._static_headers.clear()
            token = static_token(self.static_secret, app)
            h = self._static_headers[app] = b"X-Epio-Static: %s %s\r\n" % (
                app.encode("utf-8"), token.encode())
        return h

    def open_spool(self) -> IO[bytes]:
        """A file for one request body: 0600, unlinked at once (``TemporaryFile``), so it
        is gone when closed -- or when the router dies -- and no other process can open it."""
        f = self._open_file(dir=self.spool_dir, prefix="body-")
        self.spooled += 1
        return f

    # -- request ids ----------------------------------------------------------------
    def new_request_id(self) -> bytes:
        self._rid_n += 1
        return b"%s%012x" % (self._rid_prefix, self._rid_n)

    # -- balancing ------------------------------------------------------------------
    def state_for(self, key: tuple[str, int]) -> BackendState:
        st = self.states.get(key)
        if st is None:
            st = self.states[key] = BackendState(key)
        return st

    def pick(self, route: Route, now: float, exclude: set[tuple[str, int]] | None = None
             ) -> BackendState | None:
        """Least outstanding (running + queued) among live, non-ejected backends; when
        every one is ejected, among the ejected ones: an app is never left without a
        backend by ejection (docs/router.md "Failures")."""
        live = route.live
        n = len(live)
        if n == 1:
            st = self.states.get(live[0].address) or self.state_for(live[0].address)
            if exclude and st.key in exclude:
                return None
            return st
        best = None
        best_load = 1 << 62
        self._rr = start = (self._rr + 1) % n if n else 0
        states = self.states
        ejected = False
        for j in range(n):
            b = live[(start + j) % n]
            st = states.get(b.address) or self.state_for(b.address)
            if exclude and st.key in exclude:
                continue
            if st.ejected_until > now:
                ejected = True
                continue
            load = st.outstanding + len(st.queue)
            if load < best_load:
                best, best_load = st, load
        if best is None and ejected:
            for j in range(n):
                st = states[live[(start + j) % n].address]
                if not (exclude and st.key in exclude):
                    load = st.outstanding + len(st.queue)
                    if load < best_load:
                        best, best_load = st, load
        return best

    def note_failure(self, st: BackendState, now: float, route: Route | None = None) -> None:
        """A connect or an exchange on ``st`` failed (refused, timed out, closed without
        an answer): ``eject_after`` in a row -- or one, on probation -- eject it for
        ``eject_seconds``, unless it is the last usable backend of ``route``."""
        st.fails += 1
        if st.fails < self.s.eject_after and not st.probation:
            return
        st.fails = 0
        if route is not None and not self._others_usable(route, st, now):
            self.log.warn("backend {backend} keeps failing but is the last usable backend of "
                          "{app}: not ejected", backend=st.label, app=route.app)
            return
        st.ejected_until = now + self.s.eject_seconds
        st.probation = True
        self.log.warn("backend {backend} ejected for {seconds}s after repeated failures",
                      backend=st.label, seconds=self.s.eject_seconds)

    def _others_usable(self, route: Route, st: BackendState, now: float) -> bool:
        states = self.states
        for b in route.live:
            if b.address != st.key:
                other = states.get(b.address)
                if other is None or other.ejected_until <= now:
                    return True
        return False

    def release(self, st: BackendState) -> None:
        """One exchange on ``st`` ended: hand its slot to the next queued request."""
        st.outstanding -= 1
        q = st.queue
        while q and st.outstanding < self.s.backend_max_conns:
            c = q.popleft()
            if c.state == C_WAIT and c.queued:
                c.queued = False
                c.dispatch(st)

    def park(self, bc: BackendConn) -> None:
        """Keep an idle backend connection for reuse (or close it)."""
        st = bc.bstate
        if self.stopping or len(st.idle) >= self.s.pool_max_idle:
            bc.transport.loseConnection()
            return
        bc.client = None
        bc.deadline = self.reactor.seconds() + self.s.pool_idle_timeout
        st.idle.append(bc)

    def connect(self, st: BackendState, client: ClientConn, timeout: float) -> None:
        f = BackendConnector(self, st, client)
        client.connector = f
        self.reactor.connectTCP(st.key[0], st.key[1], f, timeout=timeout)

    # -- asleep apps (docs/apps.md "Sleeping apps") ------------------------------------
    def hold(self, client: ClientConn, route: Route, now: float) -> bool:
        """Hold ``client``'s request until ``route``'s app has a backend (and ask its
        runners to wake it); False when lb.wake_queue_size requests wait already."""
        q = self.held.get(route.app)
        if q is None:
            q = self.held[route.app] = deque()
        if len(q) >= self.s.wake_queue_size:
            return False
        q.append(client)
        if now - self._woken.get(route.app, -WAKE_REPEAT) >= WAKE_REPEAT:
            self._woken[route.app] = now
            if self.waker is not None:
                self.wakes += 1
                try:
                    self.waker(route.app, route.wake)
                except Exception:
                    self.log.failure("asking to wake {app} failed", app=route.app)
        if self._wake_poll is None:
            self._wake_poll = self.reactor.callLater(WAKE_POLL, self._check_held)
        return True

    def unhold(self, client: ClientConn, app: str) -> None:
        q = self.held.get(app)
        if q is not None:
            try:
                q.remove(client)
            except ValueError:
                pass
            if not q:
                del self.held[app]

    def _check_held(self) -> None:
        """Release the held requests of each app whose route has a backend now."""
        self._wake_poll = None
        if self.table.version != self._wake_version:
            self._wake_version = self.table.version
            for app in list(self.held):
                route = self.table.get(app)
                if route is None or route.live or route.maintenance or not route.wake:
                    q = self.held.pop(app)
                    self._woken.pop(app, None)
                    while q:
                        q.popleft().release_held()
        if self.held:
            self._wake_poll = self.reactor.callLater(WAKE_POLL, self._check_held)

    # -- sweeping and stopping ---------------------------------------------------------
    def sweep(self) -> None:
        now = self.reactor.seconds()
        for c in list(self.conns):
            if c.deadline and c.deadline <= now or c.active:
                c.tick(now)
        if self.stopping:
            self._check_drained()

    def begin_stop(self) -> None:
        """Stop taking new requests on kept-alive connections; in-flight ones finish."""
        self.stopping = True
        for c in list(self.conns):
            if isinstance(c, ClientConn):
                if c.state == C_HEAD and not c.buf:
                    c.close()
                else:
                    c.closing = True
            elif c.client is None:
                c.transport.loseConnection()

    def abort_all(self) -> None:
        for c in list(self.conns):
            if c.transport is not None:
                c.transport.abortConnection()

    def when_drained(self, d: Deferred[None]) -> None:
        self._drained.append(d)
        self._check_drained()

    def _check_drained(self) -> None:
        if self.clients == 0 and self._drained:
            ds, self._drained = self._drained, []
            for d in ds:
                d.callback(None)


@implementer(IPushProducer)
class BackendConn(Protocol):
    """A kept-alive HTTP/1.1 connection to one backend."""

    transport: Any

    def __init__(self, lb: LB, st: BackendState) -> None:
        self.lb = lb
        self.bstate = st
        self.client: ClientConn | None = None
        self.deadline = 0.0
        self.active = False
        self.used = 0
        self.fast = False
        self.paused = False
        self.mfd = -1

    def connectionMade(self) -> None:
        t = self.transport
        self.fast = is_fast(t)
        try:
            t.setTcpNoDelay(True)
        except (AttributeError, OSError):  # not TCP: a UNIX socket, a test transport
            pass
        if self.fast and self.lb.mux is not None:
            self.mfd = self.lb.mux.adopt(t)
        self.lb.conns.add(self)
        c = self.client
        if c is not None and c.state == C_WAIT and c.connector is not None and \
                c.connector.conn_for is self:
            c.attach(self)
        else:
            self.client = None
            self.lb.park(self)

    def write(self, data: bytes) -> None:
        if self.fast:
            fast_write(self.transport, data)
        else:
            self.transport.write(data)

    def dataReceived(self, data: bytes) -> None:
        c = self.client
        if c is None:
            # an idle connection must stay silent
            self.transport.abortConnection()
            return
        c.down(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lb.conns.discard(self)
        if self.mfd >= 0:
            self.lb.mux.drop(self.mfd)
            self.mfd = -1
        c = self.client
        if c is not None:
            self.client = None
            c.backend_lost(self)
        else:
            try:
                self.bstate.idle.remove(self)
            except ValueError:
                pass

    def tick(self, now: float) -> None:
        self.active = False
        if self.client is None and self.deadline and self.deadline <= now:
            self.deadline = 0.0
            self.transport.loseConnection()

    # IPushProducer: the client's send buffer is full / drained
    def pauseProducing(self) -> None:
        self.paused = True
        if self.mfd >= 0:
            self.lb.mux.pause(self.mfd)
        else:
            self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        if self.mfd >= 0:
            self.lb.mux.resume(self.mfd)
        else:
            self.transport.resumeProducing()

    def stopProducing(self) -> None:
        pass


class BackendConnector(ClientFactory):
    """One connection attempt on behalf of a waiting client."""

    protocol = BackendConn
    noisy = False

    def __init__(self, lb: LB, st: BackendState, client: ClientConn) -> None:
        self.lb = lb
        self.st = st
        self.client: ClientConn | None = client
        self.conn_for: BackendConn | None = None

    def buildProtocol(self, addr: IAddress | None) -> BackendConn:
        p = BackendConn(self.lb, self.st)
        p.client = self.client
        self.conn_for = p
        return p

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        c = self.client
        self.client = None
        timed_out = reason.check(ierror.TimeoutError) is not None
        if c is not None and c.connector is self:
            c.connect_failed(self.st, timed_out)
        else:
            self.lb.note_failure(self.st, self.lb.reactor.seconds())

    def clientConnectionLost(self, connector: IConnector, reason: Failure) -> None:
        pass


@implementer(IPushProducer)
class ClientConn(Protocol):
    """One client connection; runs its requests one at a time, in order.

    Its ``state`` moves only along these arrows (the ``INTO_*`` masks; any other move
    raises :class:`InvalidTransition`)::

        HEAD ---------- request ---------------> WAIT --backend connection--> PROXY
        HEAD --body to read first--> BODY --read--> WAIT                        |
        PROXY --reused connection closed unanswered: retry--> WAIT              |
        PROXY --101 Switching Protocols--> TUNNEL                               |
        HEAD, BODY, WAIT, PROXY, TUNNEL --answered, keep-alive--> HEAD  <-------+
        HEAD, BODY, WAIT, PROXY, TUNNEL --answered, closing-----> LINGER
        any --lost or aborted--> CLOSED

    (BODY: a request body read whole before a backend is picked; LINGER: answered and
    half-closed, dropping what the client still sends.)  A move costs one AND."""

    log = Logger()
    transport: Any

    # The fields are flat attributes in four bands, not objects of their own: each of
    # the last three is read or written on every request (docs/architecture.md "The
    # proxy's ClientConn").  Only the buffered body is grouped (RequestBody): most
    # requests have none.
    def __init__(self, lb: LB, scheme: bytes = b"http") -> None:
        # the connection: who it is from, how it is read (set in connectionMade)
        self.lb = lb
        self.scheme = scheme
        self.peer = ""
        self.trusted = False
        self.fwd = b""
        self.port_b = b""
        self.fast = False
        self.mfd = -1
        # the backend connection is registered as this transport's producer (only once
        # a response goes on past its first piece: _down_producer)
        self.down_reg = False
        # its lifecycle (the state diagram above) and deadlines
        self.state = C_HEAD
        self.buf = b""
        self.deadline = 0.0
        self.active = False
        self.closing = False
        self.paused = 0
        self.processing = False
        self.head_started = 0.0
        self._now = 0.0
        self._reset_exchange()

    def _reset_exchange(self) -> None:
        # the exchange's request and the backend it goes to
        self.req: Request | None = None
        self.route: Route | None = None
        self.bs: BackendState | None = None
        self.bconn: BackendConn | None = None
        self.connector: BackendConnector | None = None
        self.queued = False
        self.held: str | None = None  # the asleep app this request waits for
        self.tried: set[tuple[str, int]] | None = None
        self.attempts = 0
        self.retried = False
        self.t0 = 0.0
        self.t_conn = 0.0
        self.rid = b""
        self.static_hdr = b""
        # its body as it streams up (or how much of it came to be buffered)
        self.body_left = 0
        self.decoder: ChunkedDecoder | None = None
        self.body_done = True
        self.body_total = 0
        self.max_body = 0
        # the request body read whole before a backend is picked; None: none is
        self.body: RequestBody | None = None
        # the response as it is read from the backend
        self.rmode = R_HEAD
        self.rbuf = b""
        self.r_left = 0
        self.r_decoder: ChunkedDecoder | None = None
        self.r_chunk_out = False
        self.r_gz: GzipBody | None = None  # [http] gzip (epio.lb.compress)
        self.r_status = 0
        self.r_bytes = 0
        self.r_started = False
        self.r_reusable = True
        self.r_close_client = False
        self.got_byte = False

    # -- connection ---------------------------------------------------------------------
    def connectionMade(self) -> None:
        t = self.transport
        lb = self.lb
        self.fast = is_fast(t)
        try:
            t.setTcpNoDelay(True)
        except (AttributeError, OSError):  # not TCP: a UNIX socket, a test transport
            pass
        peer = t.getPeer()
        host = t.getHost()
        self.peer = getattr(peer, "host", "") or ""
        self.port_b = str(getattr(host, "port", "")).encode()
        self.trusted = self.peer in lb.trusted
        self.fwd = (
            b"X-Forwarded-For: " + self.peer.encode() + b"\r\nX-Forwarded-Proto: " + self.scheme
            + b"\r\nX-Forwarded-Port: " + self.port_b + b"\r\nVia: " + lb.s.via + b"\r\n"
        )
        if self.fast and lb.mux is not None:
            self.mfd = lb.mux.adopt(t)
        lb.conns.add(self)
        lb.clients += 1
        self.deadline = lb.reactor.seconds() + lb.s.header_timeout
        self.head_started = -1.0  # a fresh connection owes a head within header_timeout

    def connectionLost(self, reason: Failure | None = None) -> None:
        lb = self.lb
        state = self.state
        self.state = C_CLOSED
        lb.conns.discard(self)
        lb.clients -= 1
        limit = self.factory.limit
        if limit is not None:
            limit.closed()
        if self.body is not None:
            self._drop_body()
        if self.mfd >= 0:
            lb.mux.drop(self.mfd)
            self.mfd = -1
        if state == C_BODY:
            self._log(499, "client_closed")
        elif state == C_WAIT:
            if self.held is not None:
                lb.unhold(self, self.held)
                self.held = None
                self._log(499, "client_closed")
            elif self.queued and self.bs is not None:
                try:
                    self.bs.queue.remove(self)
                except ValueError:
                    pass
                self.queued = False
                self._log(499, "client_closed")
            elif self.bs is not None:
                if self.connector is not None:
                    self.connector.client = None
                self._log(499, "client_closed")
                self._release()
        elif state in (C_PROXY, C_TUNNEL):
            bc = self.bconn
            self.bconn = None
            if bc is not None:
                bc.client = None
                if bc.transport is not None:
                    bc.transport.abortConnection()
            if state == C_PROXY:
                self._log(499 if not self.r_started else self.r_status, "client_closed")
            else:
                self._log(101, "")
            self._release()
        if lb.stopping:
            lb._check_drained()

    def _bad_move(self, new: int) -> None:
        raise InvalidTransition(
            f"client connection: {C_NAMES[self.state]} -> {C_NAMES[new]}")

    def close(self) -> None:
        if self.state != C_CLOSED and self.transport is not None:
            if self.mfd >= 0:
                self.lb.mux.pause(self.mfd)  # no more requests from a closing connection
            self.transport.loseConnection()

    def linger_close(self) -> None:
        """Send what is buffered, half-close, then drop whatever the client still sends."""
        t = self.transport
        self.buf = b""
        if not self.state & INTO_LINGER:
            self._bad_move(C_LINGER)
        self.state = C_LINGER
        lwc = getattr(t, "loseWriteConnection", None)
        if lwc is None or not self.fast:
            t.loseConnection()
            return
        if self.paused:
            self.paused = 0
            if self.mfd >= 0:
                self.lb.mux.resume(self.mfd)
            else:
                t.resumeProducing()
        lwc()
        self.deadline = self.lb.reactor.seconds() + LINGER_SECONDS

    def write(self, data: bytes) -> None:
        if self.fast:
            fast_write(self.transport, data)
        else:
            self.transport.write(data)

    # -- read pausing -----------------------------------------------------------------
    def _pause(self, why: int) -> None:
        if not self.paused:
            if self.mfd >= 0:
                self.lb.mux.pause(self.mfd)
            else:
                self.transport.pauseProducing()
        self.paused |= why

    def _resume(self, why: int) -> None:
        if self.paused & why:
            self.paused &= ~why
            if not self.paused and self.state != C_CLOSED:
                if self.mfd >= 0:
                    self.lb.mux.resume(self.mfd)
                else:
                    self.transport.resumeProducing()

    # IPushProducer for the backend transport (upload direction)
    def pauseProducing(self) -> None:
        self._pause(P_UP)

    def resumeProducing(self) -> None:
        self._resume(P_UP)

    def stopProducing(self) -> None:
        pass

    # -- timeouts -----------------------------------------------------------------------
    def tick(self, now: float) -> None:
        state = self.state
        if state == C_BODY:
            self._body_tick(now)
            return
        if self.active:
            self.active = False
            if state == C_PROXY and (self.r_started or (self.body is not None
                                                        and self.body.sender is not None)):
                self.deadline = now + self._timeout("idle_timeout")
                return
            if state == C_PROXY and not self.body_done:
                # a streamed (unbuffered) body: body_timeout without a byte is a stall
                self.deadline = now + self.lb.s.body_timeout
                return
            if state == C_TUNNEL:
                self.deadline = now + self._timeout("websocket_idle_timeout")
                return
        if not self.deadline or self.deadline > now:
            return
        self.deadline = 0.0
        if state == C_HEAD:
            if self.buf:
                self.req = None
                self.rid = b""
                self.route = None
                self.local_error(408, "client_timeout", "The request was not received in time.",
                                 close=True)
            else:
                self.close()
        elif state == C_WAIT:
            if self.held is not None:
                self.lb.unhold(self, self.held)
                self.held = None
                self.local_error(503, "wake_timeout", "The app is waking up; try again "
                                 "shortly.", close=not self.body_done or bool(self.buf),
                                 extra=b"Retry-After: %d\r\n" % WAKE_RETRY_AFTER)
            elif self.queued and self.bs is not None:
                try:
                    self.bs.queue.remove(self)
                except ValueError:
                    pass
                self.queued = False
                self.bs = None
                self.local_error(503, "queue_full", "The app is busy; try again shortly.",
                                 close=not self.body_done or bool(self.buf))
        elif state == C_PROXY:
            if not self.body_done and not self.r_started:
                if self.paused & P_UP:  # the app is not reading: not the client's fault
                    self.deadline = now + self.lb.s.body_timeout
                    return
                self._abort_backend()
                self.local_error(408, "client_timeout",
                                 "The request body was not received in time.", close=True)
            elif not self.r_started:
                st = self.bs
                if st is not None and self.body_done:
                    self.lb.note_failure(st, now, self.route)
                self._abort_backend()
                self.local_error(504, "timeout", "The app did not answer in time.", close=True)
            else:
                self._log(self.r_status, "timeout")
                self._abort_backend()
                self._release()
                self.state = C_CLOSED
                self.transport.abortConnection()
        elif state == C_TUNNEL:
            self._abort_backend()
            self.close()
        elif state == C_LINGER:
            self.transport.abortConnection()

    def _body_tick(self, now: float) -> None:
        """The deadline of a body being buffered: at most ``body_timeout`` without a
        byte, and on average at least ``body_min_rate`` bytes a second after a grace of
        ``body_timeout`` (each byte received buys 1/body_min_rate s more); else 408."""
        s = self.lb.s
        body = self.body
        assert body is not None  # C_BODY: a body is being read
        if self.active:
            self.active = False
            body.last = now
        limit = min(body.t0 + s.body_timeout + body.size / s.body_min_rate,
                    body.last + s.body_timeout)
        if now < limit:
            self.deadline = limit
            return
        self.deadline = 0.0
        self.local_error(408, "client_timeout", "The request body was not received in time.",
                         close=True)

    def _timeout(self, name: str) -> float:
        r = self.route
        if r is not None:
            v: float | None = getattr(r, name)
            if v is not None:
                return v
        d: float = getattr(self.lb.s, name)
        return d

    # -- request side -------------------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:
        state = self.state
        if state == C_BODY:
            self.active = True
            self._keep(data)
            return
        if state == C_PROXY and not self.body_done:
            self.active = True
            self.up(data)
            return
        if state == C_TUNNEL:
            self.active = True
            bc = self.bconn
            if bc is not None:
                bc.write(data)
            return
        if state == C_HEAD and not self.buf:
            self.process(data)
            return
        if state == C_CLOSED or state == C_LINGER:
            return
        self.buf = self.buf + data if self.buf else data
        if state == C_HEAD:
            self.process(self.buf)
        elif len(self.buf) > PIPELINE_BUFFER:
            self._pause(P_BUF if state == C_PROXY else P_WAIT)

    def process(self, buf: bytes) -> None:
        """Parse and start every complete request head in ``buf``, one at a time."""
        if self.processing:
            self.buf = buf
            return
        self.processing = True
        try:
            while self.state == C_HEAD and buf:
                if buf[0] in (13, 10):
                    # RFC 9112 2.2: ignore empty lines before a request line
                    stripped = buf.lstrip(b"\r\n")
                    if len(buf) - len(stripped) > 8:
                        self.buf = b""
                        self.local_error(400, "bad_request", "Malformed request.", close=True)
                        return
                    buf = stripped
                    if not buf:
                        break
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    try:
                        if buf.count(b"\n") != buf.count(b"\r\n"):
                            raise BadMessage(400, "bad_request", "bare LF in request head")
                        check_request_line_length(buf)
                        if len(buf) > MAX_REQUEST_LINE + MAX_HEADER_BYTES + 4:
                            raise BadMessage(431, "headers_too_large",
                                             "request headers larger than 16 KiB")
                    except HTTPError as e:
                        self.buf = b""
                        self.local_error(e.status, e.code, e.message, close=True)
                        return
                    if self.head_started == 0.0:
                        # a head has begun: it must complete within header_timeout
                        self.head_started = now = self.lb.reactor.seconds()
                        self.deadline = now + self.lb.s.header_timeout
                    self.buf = buf
                    self.processing = False
                    return
                head = buf[:end]
                buf = buf[end + 4:]
                self.buf = b""
                try:
                    req = parse_request(head)
                except HTTPError as e:
                    self.req = None
                    self.rid = b""
                    self.route = None
                    # a head we cannot parse leaves the framing unknown: always close
                    self.local_error(e.status, e.code, e.message, close=True)
                    return
                self.start(req, buf)
                buf = self.buf
            if self.state == C_HEAD and not buf:
                self.buf = b""
        finally:
            self.processing = False

    def start(self, req: Request, rest: bytes, t0: float = 0.0, rid: bytes = b"") -> None:
        """Route one parsed request and send it on its way (or answer it); ``t0`` and
        ``rid``: those of a request held for an asleep app, routed again."""
        lb = self.lb
        self._reset_exchange()
        self.req = req
        now = lb.reactor.seconds()
        self.t0 = t0 or now
        if not rid:
            given = req.request_id
            rid = given if given is not None and valid_request_id(given) else \
                lb.new_request_id()
        self.rid = rid
        if lb.stopping:
            self.closing = True
        if not req.keep_alive:
            self.closing = True
        acme = lb.acme
        if acme is not None and req.method in (b"GET", b"HEAD") and not req.has_body:
            answer = acme.respond(req.host, req.target)
            if answer is not None:
                self.buf = rest
                self.local_reply(200, b"text/plain", answer, "acme_challenge")
                return
        route = lb.table.lookup(req.host)
        has_body = req.has_body
        if route is None:
            self.buf = rest
            self.local_error(404, "no_route", "No app answers at this address.", close=has_body)
            return
        self.route = route
        if route.maintenance:
            self.buf = rest
            self.local_error(503, "maintenance", "This app is down for maintenance.",
                             close=has_body)
            return
        if route.https_redirect and self.scheme == b"http" and not (
                self.trusted and req.xfproto is not None
                and req.xfproto.strip().lower() == b"https"):
            self.buf = rest
            self.local_reply(308, b"text/plain", b"", "https_redirect",
                             b"Location: " + self._https_location(req) + b"\r\n", has_body)
            return
        auth = route.basic_auth
        if auth is not None and not auth.allows(req.authorization):
            # [basic_auth]: before the static switch, so static and media files too
            self.buf = rest
            self.local_error(401, "unauthorized", "This app needs a user name and password.",
                             close=has_body, extra=auth.challenge)
            return
        sr = route.static
        if sr is not None and sr.live and lb.static_secret and route.is_static(req.target):
            route = self.route = sr  # served by a runner's static file server
            self.static_hdr = lb.static_header(route.app)
        mb = route.max_body_size
        self.max_body = mb = lb.s.max_body_size if mb is None else mb
        if req.content_length > mb:
            self.buf = rest
            self.local_error(413, "too_large", "The request body is too large.", close=True)
            return
        if not route.live:
            self.buf = rest
            if route.wake:  # asleep: wait for it to wake
                self._hold(route, now)
                return
            self.local_error(503, "no_backend", "The app has no running instance.",
                             close=has_body)
            return
        st = lb.pick(route, now)
        if st is None:
            self.buf = rest
            self.local_error(503, "no_backend", "The app has no healthy instance.",
                             close=has_body)
            return
        if has_body and route.request_buffering is not False:
            cl = req.content_length
            if cl > 0 and len(rest) >= cl and cl <= lb.s.body_buffer_size:
                # the common small body, already here with its head: no buffering state
                self.body_total = cl
                if len(rest) == cl:
                    self.body = RequestBody(rest)
                    self.buf = b""
                else:
                    self.body = RequestBody(rest[:cl])
                    self.buf = rest[cl:]
                self._send(st, now)
                return
            self._begin_body(req, rest, now)
            return
        if req.chunked:
            self.decoder = ChunkedDecoder(self._chunk_up)
            self.body_done = False
        elif req.content_length > 0:
            self.body_left = req.content_length
            self.body_done = False
        self.buf = rest
        self._send(st, now)

    def _hold(self, route: Route, now: float) -> None:
        """Wait (WAIT, no backend) until the asleep app has a backend, at most
        lb.wake_timeout; its body and the next requests stay in ``buf``."""
        if not self.state & INTO_WAIT:
            self._bad_move(C_WAIT)
        if not self.lb.hold(self, route, now):
            self.local_error(503, "wake_queue_full", "The app is waking up; try again "
                             "shortly.", close=bool(self.req and self.req.has_body)
                             or bool(self.buf),
                             extra=b"Retry-After: %d\r\n" % WAKE_RETRY_AFTER)
            return
        self.state = C_WAIT
        self.held = route.app
        self.deadline = now + self.lb.s.wake_timeout
        if len(self.buf) > PIPELINE_BUFFER:
            self._pause(P_WAIT)

    def release_held(self) -> None:
        """The app this request waited for has a backend (or changed otherwise): route
        the request again, as it came, against the current table."""
        req = self.req
        if self.state != C_WAIT or self.held is None or req is None:
            return
        self.held = None
        t0, rid = self.t0, self.rid
        rest, self.buf = self.buf, b""
        if not self.state & INTO_HEAD:
            self._bad_move(C_HEAD)
        self.state = C_HEAD
        self.deadline = 0.0
        self._resume(P_WAIT)
        self.start(req, rest, t0=t0, rid=rid)
        if self.state == C_HEAD and self.buf:
            self.process(self.buf)

    def _send(self, st: BackendState, now: float) -> None:
        """Dispatch the request to ``st`` now, or queue it there (or 503)."""
        lb = self.lb
        if not self.state & INTO_WAIT:
            self._bad_move(C_WAIT)
        self.state = C_WAIT
        self.deadline = 0.0
        if st.outstanding >= lb.s.backend_max_conns:
            if len(st.queue) >= lb.s.backend_queue_size:
                self.local_error(503, "queue_full", "The app is busy; try again shortly.",
                                 close=not self.body_done or bool(self.buf))
                return
            self.bs = st
            self.queued = True
            st.queue.append(self)
            self.deadline = now + lb.s.queue_timeout
            if len(self.buf) > PIPELINE_BUFFER:
                self._pause(P_WAIT)
            return
        self.dispatch(st)

    # -- request body buffering (docs/router.md "Request bodies") ----------------------
    def _begin_body(self, req: Request, rest: bytes, now: float) -> None:
        """Read the whole body at the router, under its deadline, before any backend is
        chosen: an app server only ever sees a complete request."""
        if not self.state & INTO_BODY:
            self._bad_move(C_BODY)
        self.state = C_BODY
        self.body = RequestBody(b"", now)
        self.body_done = False
        self.deadline = now + self.lb.s.body_timeout
        if req.chunked:
            self.decoder = ChunkedDecoder(self._chunk_keep)
        else:
            self.body_left = req.content_length
        if req.expect_continue:
            self.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if rest:
            self._keep(rest)

    def _keep(self, data: bytes) -> None:
        """Body bytes from the client while buffering (state C_BODY)."""
        dec = self.decoder
        try:
            if dec is None:
                n = self.body_left
                ln = len(data)
                if ln < n:
                    self.body_left = n - ln
                    self._store(data)
                    return
                self.body_left = 0
                self._store(data if ln == n else data[:n])
                self._body_complete(data[n:] if ln > n else b"")
                return
            rest = dec.feed(data)
        except SpoolFull:
            self.lb.spool_refused += 1
            self.local_error(503, "spool_full", "The router cannot take this request now.",
                             close=True,
                             extra=b"Retry-After: %d\r\n" % SPOOL_FULL_RETRY_AFTER)
            return
        except HTTPError as e:
            self.local_error(e.status, e.code, e.message, close=True)
            return
        except OSError as e:
            self._spool_failed(e)
            return
        if rest is not None and self.state == C_BODY:
            self._body_complete(rest)

    def _spool_failed(self, e: OSError) -> None:
        """Writing the spool file failed (disk full, directory gone): 503 and close."""
        self.log.error("cannot spool a request body in {dir}: {error}",
                       dir=self.lb.spool_dir or tempfile.gettempdir(), error=str(e))
        self.local_error(503, "spool_failed", "The router cannot take this request now.",
                         close=True)

    def _chunk_keep(self, data: bytes) -> None:
        body = self.body
        assert body is not None
        if body.size + len(data) > self.max_body:
            raise BadMessage(413, "too_large", "The request body is too large.")
        self._store(data)

    def _store(self, data: bytes) -> None:
        body = self.body
        assert body is not None
        sp = body.spool
        n = body.size + len(data)
        if sp is None:
            if n <= self.lb.s.body_buffer_size:
                body.pieces.append(data)
                body.size = n
                return
            self._spool_reserve(body, n)
            sp = body.spool = self.lb.open_spool()
            for piece in body.pieces:
                sp.write(piece)
            body.pieces = []
        else:
            self._spool_reserve(body, len(data))
        sp.write(data)
        body.size = n

    def _spool_reserve(self, body: RequestBody, n: int) -> None:
        """Count ``n`` more spooled bytes against lb.spool_max_bytes (SpoolFull past it)."""
        lb = self.lb
        if lb.spool_bytes + n > lb.s.spool_max_bytes:
            raise SpoolFull()
        lb.spool_bytes += n
        body.spool_size += n

    def _close_spool(self, body: RequestBody) -> None:
        """Close (and so remove) the spool file and give its bytes back to the total."""
        self.lb.spool_bytes -= body.spool_size
        body.spool_size = 0
        sp = body.spool
        if sp is not None:
            body.spool = None
            sp.close()

    def _body_complete(self, rest: bytes) -> None:
        """The whole body is here: choose a backend now (the table may have changed)."""
        self.body_done = True
        body = self.body
        assert body is not None
        self.body_total = body.size
        if body.spool is None:
            pieces = body.pieces
            body.data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
            body.pieces = []
        else:
            try:
                body.spool.flush()
            except OSError as e:
                self._spool_failed(e)
                return
        self.buf = rest
        if len(rest) > PIPELINE_BUFFER:
            self._pause(P_WAIT)
        lb = self.lb
        now = lb.reactor.seconds()
        route = self.route
        assert route is not None
        st = lb.pick(route, now)
        if st is None:
            self.local_error(503, "no_backend", "The app has no healthy instance.",
                             close=False)
            return
        self._send(st, now)

    def _drop_body(self) -> None:
        """Forget the buffered body (close and so remove its spool file)."""
        body = self.body
        assert body is not None
        self.body = None
        snd = body.sender
        if snd is not None:
            body.sender = None
            snd.client = None
        self._close_spool(body)

    def _spool_sent(self) -> None:
        """The spooled body went to the backend: now wait for its answer."""
        body = self.body
        assert body is not None  # a SpoolSender is dropped with its body
        body.sender = None
        self._close_spool(body)
        if not self.r_started:
            self.deadline = self.lb.reactor.seconds() + self._timeout("first_byte_timeout")

    def dispatch(self, st: BackendState) -> None:
        """Take a slot on ``st``: an idle pooled connection, or connect."""
        self.bs = st
        st.outstanding += 1
        self.deadline = 0.0
        idle = st.idle
        while idle:
            bc = idle.pop()
            if bc.transport is not None and bc.transport.connected and \
                    not bc.transport.disconnecting:
                self.attach(bc, self.t0)
                return
        self.attempts += 1
        self.lb.connect(st, self, self._timeout("connect_timeout"))
        if len(self.buf) > PIPELINE_BUFFER:
            self._pause(P_WAIT)

    def connect_failed(self, st: BackendState, timed_out: bool) -> None:
        lb = self.lb
        now = lb.reactor.seconds()
        lb.note_failure(st, now, self.route)
        self.connector = None
        self._release()
        if self.state != C_WAIT:
            return
        if self.attempts < lb.s.connect_attempts and self.route is not None:
            if self.tried is None:
                self.tried = set()
            self.tried.add(st.key)
            nxt = lb.pick(self.route, now, self.tried) or lb.pick(self.route, now)
            if nxt is not None:
                self.dispatch(nxt)
                return
        if timed_out:
            self.local_error(504, "connect_timeout", "The app did not accept a connection in time.",
                             close=not self.body_done or bool(self.buf))
        else:
            self.local_error(502, "backend_refused", "The app refused the connection.",
                             close=not self.body_done or bool(self.buf))

    def attach(self, bc: BackendConn, now: float = 0.0) -> None:
        """Send the request head (and any body bytes already here) on ``bc``."""
        lb = self.lb
        req = self.req
        assert req is not None
        self.connector = None
        self.bconn = bc
        bc.client = self
        bc.used += 1
        if not self.state & INTO_PROXY:
            self._bad_move(C_PROXY)
        self.state = C_PROXY
        self.t_conn = now or lb.reactor.seconds()
        lines = req.lines
        parts = [req.method, b" ", req.target, b" HTTP/1.1\r\n"]
        if req.host_line:
            parts.append(req.host_line)
            parts.append(b"\r\n")
        if lines:
            parts.append(b"\r\n".join(lines))
            parts.append(b"\r\n")
        body = self.body
        if body is not None:
            # a buffered body, chunked or not, goes on with its length
            parts.append(b"Content-Length: %d\r\n" % self.body_total)
        elif req.chunked:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        elif req.content_length >= 0:
            parts.append(b"Content-Length: %d\r\n" % req.content_length)
        if req.upgrade is not None:
            parts.append(b"Connection: upgrade\r\nUpgrade: " + req.upgrade + b"\r\n")
        if self.trusted:
            parts.append(self._trusted_forwarded(req))
        else:
            parts.append(self.fwd)
        if self.static_hdr:
            parts.append(self.static_hdr)
        parts.append(b"X-Request-Id: %s\r\nX-Request-Start: t=%d\r\n\r\n"
                     % (self.rid, int(self.t0 * 1000)))
        head = b"".join(parts)
        t = bc.transport
        if self.body_done:
            r = self.route
            fbt = r.first_byte_timeout if r is not None else None
            self.deadline = self.t_conn + (lb.s.first_byte_timeout if fbt is None else fbt)
            if body is None:
                bc.write(head)
            elif body.spool is None:
                data = body.data
                if len(data) < 16384:
                    bc.write(head + data)
                else:
                    bc.write(head)
                    bc.write(data)
            else:
                # the body streams from its spool file as the backend takes it
                bc.write(head)
                self.deadline = 0.0
                self.active = True
                body.spool.seek(0)
                snd = body.sender = SpoolSender(self, body.spool, t)
                t.registerProducer(snd, False)
        else:
            t.registerProducer(self, True)
            bc.write(head)
            if req.expect_continue:
                self.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            # a streamed body that stalls for body_timeout gets 408 (tick)
            self.deadline = self.t_conn + lb.s.body_timeout
        if self.paused & P_WAIT:
            self._resume(P_WAIT)
        if not self.body_done and self.buf:
            pending = self.buf
            self.buf = b""
            self.up(pending)

    def _trusted_forwarded(self, req: Request) -> bytes:
        xff = req.xff + b", " + self.peer.encode() if req.xff else self.peer.encode()
        proto = req.xfproto or self.scheme
        port = req.xfport or self.port_b
        out = b"X-Forwarded-For: %s\r\nX-Forwarded-Proto: %s\r\nX-Forwarded-Port: %s\r\nVia: %s\r\n" % (
            xff, proto, port, self.lb.s.via)
        if req.forwarded:
            out = b"\r\n".join(req.forwarded) + b"\r\n" + out
        return out

    def up(self, data: bytes) -> None:
        """Request body bytes from the client (state C_PROXY, body not done)."""
        dec = self.decoder
        bc = self.bconn
        if dec is None:
            n = self.body_left
            if len(data) <= n:
                self.body_left = n - len(data)
                bc.write(data)  # type: ignore[union-attr]
                if self.body_left == 0:
                    self._body_finished(b"")
            else:
                bc.write(data[:n])  # type: ignore[union-attr]
                self.body_left = 0
                self._body_finished(data[n:])
            return
        try:
            rest = dec.feed(data)
        except HTTPError as e:
            self._up_error(e.status, e.code, e.message)
            return
        if self.state != C_PROXY:
            return
        if rest is not None:
            bc.write(b"0\r\n\r\n")  # type: ignore[union-attr]
            self._body_finished(rest)

    def _chunk_up(self, data: bytes) -> None:
        self.body_total += len(data)
        if self.body_total > self.max_body:
            raise BadMessage(413, "too_large", "The request body is too large.")
        bc = self.bconn
        if bc is not None:
            n = len(data)
            if n < 4096:
                bc.write(b"%x\r\n%b\r\n" % (n, data))
            else:
                bc.transport.writeSequence([b"%x\r\n" % n, data, b"\r\n"])

    def _up_error(self, status: int, code: str, message: str) -> None:
        """Bad request body framing: the backend connection is unusable."""
        self._abort_backend()
        if self.r_started:
            self._log(self.r_status, code)
            self._release()
            self.state = C_CLOSED
            self.transport.abortConnection()
        else:
            self.local_error(status, code, message, close=True)

    def _body_finished(self, rest: bytes) -> None:
        self.body_done = True
        bc = self.bconn
        if bc is not None and bc.transport is not None:
            bc.transport.unregisterProducer()
        if self.paused & P_UP:
            self._resume(P_UP)
        if rest:
            self.buf = rest
            if len(rest) > PIPELINE_BUFFER:
                self._pause(P_BUF)
        if self.rmode == R_DONE:
            self._exchange_done()
        elif not self.r_started:
            self.deadline = self.lb.reactor.seconds() + self._timeout("first_byte_timeout")

    # -- response side ----------------------------------------------------------------
    def down(self, data: bytes) -> None:
        """Bytes from the backend for the current exchange."""
        mode = self.rmode
        self.active = True
        if mode == R_CL:
            n = self.r_left
            ln = len(data)
            if ln < n:
                self.r_left = n - ln
                self.r_bytes += ln
                self.write(data)
                return
            if ln > n:
                data = data[:n]
                self.r_reusable = False
            self.r_left = 0
            self.r_bytes += n
            self.write(data)
            self._response_done()
        elif mode == R_HEAD:
            self._down_head(data)
        elif mode == R_CHUNKED:
            try:
                rest = self.r_decoder.feed(data)  # type: ignore[union-attr]
            except HTTPError:
                self._bad_response_midway()
                return
            if rest is not None:
                if rest:
                    self.r_reusable = False
                if self.r_chunk_out:
                    self.write(b"0\r\n\r\n")
                self._response_done()
        elif mode == R_CLOSE:
            self._down_piece(data)
        elif mode == R_TUNNEL:
            self.write(data)
        elif mode == R_GZIP:
            try:
                self.r_gz.feed(data)  # type: ignore[union-attr]
            except HTTPError:
                self._bad_response_midway()
        else:
            # bytes after a complete response: the connection cannot be reused
            self.r_reusable = False

    def _down_piece(self, data: bytes) -> None:
        self.r_bytes += len(data)
        if self.r_chunk_out:
            n = len(data)
            if n < 4096:
                self.write(b"%x\r\n%b\r\n" % (n, data))
            else:
                self.transport.writeSequence([b"%x\r\n" % n, data, b"\r\n"])
        else:
            self.write(data)

    def _down_head(self, data: bytes) -> None:
        buf = self.rbuf + data if self.rbuf else data
        req = self.req
        assert req is not None
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_RESPONSE_HEAD:
                    self.rbuf = b""
                    self._bad_response("response head too large")
                    return
                self.rbuf = buf
                if buf:
                    self.got_byte = True
                return
            self.got_byte = True
            self.rbuf = b""
            try:
                resp = parse_response(buf[:end])
            except BadResponse as e:
                self._bad_response(str(e))
                return
            buf = buf[end + 4:]
            status = resp.status
            if status >= 200:
                break
            if status == 101:
                if req.upgrade is None:
                    self._bad_response("101 without an upgrade request")
                    return
                self._tunnel(resp, buf)
                return
            if status != 100 and req.version == 1:
                # interim responses (103 Early Hints) pass on to HTTP/1.1 clients
                self.write(resp.status_line + b"\r\n" + b"".join(
                    ln + b"\r\n" for ln in resp.lines) + b"\r\n")
        self._start_response(resp, buf)

    def _start_response(self, resp: Response, rest: bytes) -> None:
        req = self.req
        assert req is not None
        st = self.bs
        if st is not None:
            st.fails = 0
            st.probation = False
        self.r_started = True
        status = self.r_status = resp.status
        # the sweep turns activity into a rolling idle_timeout deadline
        self.deadline = 0.0
        self.active = True
        if not resp.keep_alive:
            self.r_reusable = False
        no_body = req.method == b"HEAD" or status == 204 or status == 304
        route = self.route
        if route is not None and route.gzip and not no_body:
            gz, resp.lines = compress_plan(req, resp)
            if gz:
                self._start_gzip(resp, rest)
                return
        parts = [resp.status_line, b"\r\n"]
        if resp.lines:
            parts.append(b"\r\n".join(resp.lines))
            parts.append(b"\r\n")
        client11 = req.version == 1
        if no_body:
            if resp.content_length >= 0 and status != 204:
                parts.append(b"Content-Length: %d\r\n" % resp.content_length)
            mode = R_DONE
        elif resp.content_length >= 0:
            parts.append(b"Content-Length: %d\r\n" % resp.content_length)
            mode = R_CL
            self.r_left = resp.content_length
            if resp.content_length == 0:
                mode = R_DONE
        elif resp.chunked:
            mode = R_CHUNKED
            self.r_decoder = ChunkedDecoder(self._down_piece)
            if client11:
                self.r_chunk_out = True
                parts.append(b"Transfer-Encoding: chunked\r\n")
            else:
                self.r_close_client = True
        else:
            mode = R_CLOSE
            self.r_reusable = False
            if client11:
                self.r_chunk_out = True
                parts.append(b"Transfer-Encoding: chunked\r\n")
            else:
                self.r_close_client = True
        if self.closing or self.r_close_client or not req.keep_alive or \
                (not self.body_done and mode == R_DONE):
            self.r_close_client = True
            parts.append(b"Connection: close\r\n")
        elif not client11:
            parts.append(b"Connection: keep-alive\r\n")
        route = self.route
        if route is not None and route.hsts_max_age and self.scheme == b"https":
            parts.append(b"Strict-Transport-Security: max-age=%d\r\n" % route.hsts_max_age)
        parts.append(b"Via: " + self.lb.s.via + b"\r\n\r\n")
        head = b"".join(parts)
        self.rmode = mode
        if mode == R_CL:
            n = self.r_left
            ln = len(rest)
            if ln >= n:
                if ln > n:
                    rest = rest[:n]
                    self.r_reusable = False
                self.r_left = 0
                self.r_bytes = n
                self.write(head + rest)
                self._response_done()
                return
            self._down_producer()
            self.write(head + rest if ln < 16384 else head)
            if ln >= 16384:
                self.write(rest)
            self.r_left = n - ln
            self.r_bytes = ln
            return
        if mode == R_DONE:
            self.write(head)
            if rest:
                self.r_reusable = False
            self._response_done()
            return
        self._down_producer()
        self.write(head)
        if rest:
            self.down(rest)

    def _down_producer(self) -> None:
        """The response goes on past its first piece: from now on a client that reads
        slowly pauses the backend (its connection is the client transport's producer).
        A response that is whole in its first piece -- the usual small one -- is written
        at once and never registers (two Twisted calls fewer per request)."""
        bc = self.bconn
        if bc is not None and not self.down_reg:
            self.down_reg = True
            self.transport.registerProducer(bc, True)

    def _start_gzip(self, resp: Response, rest: bytes) -> None:
        """The response goes out gzipped (epio.lb.compress): chunked to an HTTP/1.1
        client, close-delimited to an HTTP/1.0 one."""
        req = self.req
        assert req is not None
        client11 = req.version == 1
        parts = [resp.status_line, b"\r\n", b"\r\n".join(resp.lines), b"\r\n"]
        if client11:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        else:
            self.r_close_client = True
        if self.closing or self.r_close_client or not req.keep_alive:
            self.r_close_client = True
            parts.append(b"Connection: close\r\n")
        route = self.route
        if route is not None and route.hsts_max_age and self.scheme == b"https":
            parts.append(b"Strict-Transport-Security: max-age=%d\r\n" % route.hsts_max_age)
        parts.append(b"Via: " + self.lb.s.via + b"\r\n\r\n")
        self._down_producer()
        self.write(b"".join(parts))
        if resp.content_length < 0 and not resp.chunked:
            self.r_reusable = False  # the backend's body runs until it closes
        self.r_gz = GzipBody(self.write, self._gzip_done, resp.content_length, resp.chunked,
                             client11)
        self.rmode = R_GZIP
        if rest:
            self.down(rest)

    def _gzip_done(self, reusable: bool) -> None:
        gz = self.r_gz
        assert gz is not None
        self.r_bytes = gz.sent
        if not reusable:
            self.r_reusable = False
        if not gz.until_close:
            self._response_done()

    def _tunnel(self, resp: Response, rest: bytes) -> None:
        """101 Switching Protocols: from now on bytes pass through both ways."""
        bc = self.bconn
        st = self.bs
        if st is not None:
            st.fails = 0
            st.probation = False
        parts = [resp.status_line, b"\r\n"]
        if resp.lines:
            parts.append(b"\r\n".join(resp.lines))
            parts.append(b"\r\n")
        parts.append(b"Connection: upgrade\r\n")
        if resp.upgrade is not None:
            parts.append(b"Upgrade: " + resp.upgrade + b"\r\n")
        parts.append(b"\r\n")
        self._down_producer()
        self.r_started = True
        self.r_status = 101
        self.rmode = R_TUNNEL
        if not self.state & INTO_TUNNEL:
            self._bad_move(C_TUNNEL)
        self.state = C_TUNNEL
        self.r_reusable = False
        self.write(b"".join(parts))
        if rest:
            self.write(rest)
        self.deadline = self.lb.reactor.seconds() + self._timeout("websocket_idle_timeout")
        if bc is not None and bc.transport is not None and self.body_done:
            # the backend's transport got no producer for an upgrade (no body)
            bc.transport.registerProducer(self, True)
        if self.buf and bc is not None:
            pending = self.buf
            self.buf = b""
            bc.write(pending)
        if self.paused & (P_BUF | P_WAIT):
            self._resume(P_BUF | P_WAIT)

    def _response_done(self) -> None:
        self.rmode = R_DONE
        if self.body_done:
            self._exchange_done()
        else:
            # the backend answered before reading the whole body: finish the
            # response, then close (the rest of the body cannot be framed)
            self.r_reusable = False
            self.r_close_client = True
            self._exchange_done()

    def _exchange_done(self) -> None:
        lb = self.lb
        bc = self.bconn
        self.bconn = None
        if self.down_reg:
            self.down_reg = False
            self.transport.unregisterProducer()
        if self.body is not None:
            if self.body.sender is not None:
                # answered before the spooled body was all sent: the connection is not
                # at a message boundary
                self.r_reusable = False
                if bc is not None:
                    bc.transport.unregisterProducer()
            self._drop_body()
        if bc is not None:
            bc.client = None
            t = bc.transport
            if not self.body_done:
                t.unregisterProducer()
            if self.r_reusable:
                if bc.paused:
                    bc.resumeProducing()
                lb.park(bc)
            else:
                t.loseConnection()
        if self.paused & P_UP:
            self._resume(P_UP)
        self._log(self.r_status, "")
        self._release()
        self._next()

    def _next(self) -> None:
        """The exchange is over: close, or read the next request."""
        if self.r_close_client or self.closing:
            self._reset_exchange()
            self.linger_close()
            return
        # the exchange fields are reset by the next start(); only the state changes here
        self.req = None
        if not self.state & INTO_HEAD:
            self._bad_move(C_HEAD)
        self.state = C_HEAD
        self.deadline = self._now + self.lb.s.keepalive_timeout
        self.head_started = 0.0
        if self.paused & (P_BUF | P_WAIT):
            self._resume(P_BUF | P_WAIT)
        if self.buf:
            self.process(self.buf)

    def _release(self) -> None:
        st = self.bs
        if st is not None:
            self.bs = None
            if not self.queued:
                self.lb.release(st)

    def _abort_backend(self) -> None:
        bc = self.bconn
        self.bconn = None
        if bc is not None:
            bc.client = None
            if bc.transport is not None:
                bc.transport.abortConnection()
        if self.connector is not None:
            self.connector.client = None
            self.connector = None

    def backend_lost(self, bc: BackendConn) -> None:
        """The backend connection closed during this exchange."""
        if bc is not self.bconn:
            return
        self.bconn = None
        lb = self.lb
        mode = self.rmode
        self.down_reg = False
        try:
            self.transport.unregisterProducer()
        except RuntimeError:  # none registered (StringTransport says so; sockets do not)
            pass
        if self.body is not None:  # the body (sent or not) is of no more use
            self._drop_body()
        if mode == R_GZIP and self.r_gz is not None and self.r_gz.until_close:
            self.r_gz.finish()
            mode = R_CLOSE
        if mode == R_CLOSE:
            if self.r_chunk_out:
                self.write(b"0\r\n\r\n")
            self.rmode = R_DONE
            self._log(self.r_status, "")
            self._release()
            if not self.body_done:
                self.r_close_client = True
            self._next()
            return
        if mode == R_TUNNEL:
            self._log(101, "")
            self._release()
            if not self.state & INTO_HEAD:
                self._bad_move(C_HEAD)
            self.state = C_HEAD
            self.close()
            return
        now = lb.reactor.seconds()
        if mode == R_HEAD and not self.got_byte:
            req = self.req
            assert req is not None
            if bc.used > 1 and not self.retried and req.method in IDEMPOTENT and \
                    not req.has_body and self.bs is not None:
                # a reused pooled connection the backend had closed: try once more
                self.retried = True
                st = self.bs
                if not self.state & INTO_WAIT:
                    self._bad_move(C_WAIT)
                self.state = C_WAIT
                self.rbuf = b""
                self.attempts += 1
                lb.connect(st, self, self._timeout("connect_timeout"))
                return
            if self.bs is not None:
                lb.note_failure(self.bs, now, self.route)
            self.local_error(502, "backend_closed",
                             "The app closed the connection without answering.",
                             close=not self.body_done or bool(self.buf))
            return
        if not self.r_started:
            self.local_error(502, "bad_response", "The app sent an incomplete response.",
                             close=True)
            return
        # the response was cut short: the client must see the connection end
        self._log(self.r_status, "backend_closed")
        self._release()
        self.state = C_CLOSED
        self.transport.abortConnection()

    def _bad_response(self, why: str) -> None:
        self.log.warn("bad response from {backend}: {why}",
                      backend=self.bs.label if self.bs else "-", why=why)
        self._abort_backend()
        self.local_error(502, "bad_response", "The app sent an invalid response.", close=True)

    def _bad_response_midway(self) -> None:
        self._abort_backend()
        self._log(self.r_status, "bad_response")
        self._release()
        self.state = C_CLOSED
        self.transport.abortConnection()

    # -- local answers ------------------------------------------------------------------
    def local_error(self, status: int, code: str, message: str, close: bool,
                    extra: bytes = b"") -> None:
        """Answer the current request ourselves; then close or go on.  ``extra``:
        more header lines (CRLF-terminated), e.g. a 401's ``WWW-Authenticate``."""
        req = self.req
        if self.bconn is not None or self.connector is not None:
            self._abort_backend()
        if self.body is not None:
            self._drop_body()
        self.down_reg = False
        try:
            self.transport.unregisterProducer()
        except RuntimeError:  # none registered (StringTransport says so; sockets do not)
            pass
        as_json = req is not None and req.accept_json
        ctype, body = self.lb.pages.render(status, code, message, as_json)
        self.local_reply(status, ctype, body, code, extra, close, default_reason=b"Error")

    def _https_location(self, req: Request) -> bytes:
        """``https://HOST[:lb.https_port]TARGET`` for an app's https_redirect."""
        host = req.host.encode("latin-1")
        if host.startswith(b"["):
            host = host[:host.find(b"]") + 1]
        elif b":" in host:
            host = host[:host.find(b":")]
        port = self.lb.s.https_port
        return b"https://" + host + (b"" if port == 443 else b":%d" % port) + req.target

    def local_reply(self, status: int, ctype: bytes, body: bytes, code: str,
                    extra: bytes = b"", close: bool = False,
                    default_reason: bytes = b"OK") -> None:
        """Answer the current request with ``body`` ourselves; go on (or close: a
        request body we did not read).  :meth:`local_error` ends here too."""
        req = self.req
        close = close or self.closing or req is None or not req.keep_alive
        head = b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n" \
               b"Cache-Control: no-store\r\nX-Request-Id: %s\r\n%s%s\r\n" % (
                   status, pages.REASONS.get(status, default_reason), ctype, len(body),
                   self.rid or self.lb.new_request_id(), extra,
                   b"Connection: close\r\n" if close else b"")
        self.write(head if req is not None and req.method == b"HEAD" else head + body)
        self.r_status = status
        self.r_bytes = len(body)
        self._log(status, code)
        self._release()
        if close:
            self._reset_exchange()
            self.linger_close()
        else:
            self._next()

    def _log(self, status: int, code: str) -> None:
        req = self.req
        if req is None:
            self._now = self.lb.reactor.seconds()
            self.lb.observer.record(self._now, "", b"-", b"-", "", status,
                                    self.r_bytes, 0.0, 0.0, "", self.rid or b"-", code)
            return
        now = self._now = self.lb.reactor.seconds()
        t0 = self.t0
        route = self.route
        self.lb.observer.record(
            t0, route.app if route is not None else "", req.method, req.target, req.host,
            status, self.r_bytes, (self.t_conn - t0) if self.t_conn else 0.0, now - t0,
            self.bs.label if self.bs is not None else "", self.rid, code,
        )


class RequestBody:
    """A request body read whole at the router before a backend is picked (docs/router.md
    "Request bodies"): in memory (``pieces``, then one bytes object ``data``) up to
    body_buffer_size, else in a ``spool`` file.  Made only for a request that has a
    body, so a request without one resets none of these fields."""

    __slots__ = ("pieces", "data", "size", "spool", "spool_size", "sender", "t0", "last")

    def __init__(self, data: bytes = b"", now: float = 0.0) -> None:
        self.pieces: list[bytes] = []
        self.data = data
        self.size = 0
        self.spool: IO[bytes] | None = None
        self.spool_size = 0  # bytes of this body counted in lb.spool_bytes
        self.sender: SpoolSender | None = None  # sending it from the spool file
        self.t0 = self.last = now  # when reading it began; when a byte last came


@implementer(IPullProducer)
class SpoolSender:
    """Sends a spooled request body to the backend as its socket drains (a pull
    producer on the backend transport: Twisted asks for more when it has written
    what it had, so the file is never read faster than the backend takes it)."""

    __slots__ = ("client", "f", "t")

    def __init__(self, client: ClientConn, f: IO[bytes], transport: Any) -> None:
        self.client: ClientConn | None = client
        self.f = f
        self.t = transport

    def resumeProducing(self) -> None:
        c = self.client
        if c is None:
            return
        c.active = True
        try:
            data = self.f.read(SPOOL_CHUNK)
        except (OSError, ValueError):  # ValueError: the file was closed under us
            data = b""
        if data:
            self.t.write(data)
            return
        self.client = None
        self.t.unregisterProducer()
        c._spool_sent()

    def stopProducing(self) -> None:
        self.client = None


class LBFactory(Factory):
    """Builds a :class:`ClientConn` for every accepted connection (none past the
    listener's :class:`epio.listen.ConnectionLimit`, when it has one)."""

    noisy = False

    def __init__(self, lb: LB, scheme: bytes = b"http", limit: ConnectionLimit | None = None
                 ) -> None:
        self.lb = lb
        self.scheme = scheme
        self.limit = limit

    def buildProtocol(self, addr: IAddress | None) -> ClientConn | None:
        limit = self.limit
        if limit is not None and not limit.opened():
            return None  # accepted in the batch that reached the limit: closed at once
        p = ClientConn(self.lb, self.scheme)
        p.factory = self
        return p
