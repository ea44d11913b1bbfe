"""The router's route feed process (``lb.route_feed = "process"``; ``"auto"``, the default,
chooses it for every router but a one-process one beside the node's own nexus).

A router fed by the nexus needs the nexuses' route tables, and following them
costs CPU: two nexuses send every change twice, each one in a signed
envelope to verify, to decode and to merge with the other nexus's copy.  Done in
the proxy, that work competes with requests for the proxy's reactor and
shows in its tail latency (docs/nexus.md, "Benchmark").  So a router node runs
it in a process of its own, ``python -m epio.lb.feed``, started (and restarted)
by the router's parent process:

- the feed process follows every nexus with a
  :class:`~epio.routefeed.NexusRouteSource` and merges their tables;
- it listens on a Unix socket (mode 0600, in ``<data_dir>/run``) and streams
  the *merged* routes to every router process of the node (the parent and each
  ``lb.workers`` process): a snapshot when a router connects, then one small
  frame per merged change, at most one per ``lb.feed_interval`` under churn
  (the first change after a quiet interval leaves at once), and its status
  every :data:`STATUS_INTERVAL` seconds and whenever a nexus joins or leaves;
- a router process (:class:`FeedProcessSource`) applies what it receives to
  its :class:`~epio.routing.RouteTable`.  While the feed process is away
  (crashed, restarting) it keeps serving its last table, says so in its log
  and status (``stale``), and reconnects every :data:`FEED_RETRY` seconds; the
  next snapshot replaces the table.

Frames are length-prefixed (32-bit, :class:`Int32StringReceiver`) JSON
objects: ``{"snapshot": [route, ...], "more": bool}`` (a table in frames of
:data:`FRAME_ROUTES` routes, the last with ``"more": false``), ``{"upsert":
[route, ...], "remove": [app, ...]}`` (also :data:`FRAME_ROUTES` at most) and
``{"status": {...}}`` from the feed; ``{"refresh": true}`` from a router on
SIGHUP (every nexus is asked for a new snapshot).  Routes are the nexus wire
routes (docs/messages.md), already merged.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    # The route feed process speaks the bus (HMAC-signed, no TLS) and a Unix socket:
    # keep pyOpenSSL/cryptography and the ssl module out of it.  Twisted's reactor
    # imports its TLS support eagerly when it can (twisted.internet.posixbase), about
    # 14 MiB of RSS here (benchmarks/memory/run.py); a None entry in sys.modules makes
    # those imports fail, which Twisted and asyncio treat as "no TLS available".
    for _name in ("OpenSSL", "ssl"):
        sys.modules.setdefault(_name, None)  # type: ignore[arg-type]

import json
import os
import stat
import tempfile
from collections import Counter, deque
from pathlib import Path
from time import perf_counter
from typing import Any

from twisted.application.internet import ClientService
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.interfaces import IAddress, IDelayedCall
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from epio.routefeed import NexusRouteSource, RouteFeed, TableBuild, TableSink
from epio.routing import IRouteSource, RouteTable

# Seconds between two attempts of a router process to reach its feed process.
FEED_RETRY = 0.2
# Seconds between two status frames from the feed process to the routers.
STATUS_INTERVAL = 1.0
# Largest frame a router takes from its feed (a snapshot of every route).
MAX_FRAME = 1 << 30
# Largest frame the feed takes from a router (they only ever send {"refresh": true}).
MAX_REQUEST = 1024
# Routes per frame: a snapshot or a big change is sent as several frames so that
# a router never decodes much in one go.
FRAME_ROUTES = 8
# Seconds of route work (decoding a frame, building a route) a router does per
# reactor turn before it lets requests in again.
APPLY_BUDGET = 0.0001
# Least seconds before the router restarts a child process (the route feed, a worker)
# that died soon after its start; doubled at each such death (ProcessMonitor backoff).
FEED_RESTART = 1
# Longest Unix socket path (sun_path is 108 bytes on Linux, with its NUL).
_MAX_SOCKET_PATH = 100
_PRIVATE_DIR = "epio-lb-feed-"


def _frame(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def feed_socket_path(data_dir: Path) -> Path:
    """Where the feed process of the router in ``data_dir`` listens.

    ``<data_dir>/run/lb-feed.sock`` (the directory mode 0700); when that path is
    too long for a Unix socket, a fresh private directory under the system's
    temporary directory.
    """
    run = data_dir / "run"
    run.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(run, 0o700)
    path = run / "lb-feed.sock"
    if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
        path = Path(tempfile.mkdtemp(prefix=_PRIVATE_DIR)) / "feed.sock"
    return path


def snapshot_frames(routes: list[dict[str, Any]]) -> list[bytes]:
    """A whole table as frames of :data:`FRAME_ROUTES` routes; all but the last say
    ``"more": true``."""
    chunks = [routes[i:i + FRAME_ROUTES] for i in range(0, len(routes), FRAME_ROUTES)] or [[]]
    return [_frame({"snapshot": chunk, "more": i < len(chunks) - 1})
            for i, chunk in enumerate(chunks)]


# -- the feed process's side ---------------------------------------------------------


class _RouterConnection(Int32StringReceiver):
    """One router process connected to the feed."""

    MAX_LENGTH = MAX_REQUEST
    factory: FeedPublisher
    transport: Any
    synced = False  # has had a snapshot: deltas from now on

    def connectionMade(self) -> None:
        self.factory.joined(self)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.factory.left(self)

    def stringReceived(self, data: bytes) -> None:
        try:
            msg = json.loads(data)
        except ValueError:
            msg = None
        if isinstance(msg, dict) and msg.get("refresh") is True:
            self.factory.feed.refresh()
        else:
            self.factory.log.warn("route feed: unknown request from a router ignored")

    def lengthLimitExceeded(self, length: int) -> None:
        self.factory.log.warn("route feed: a {length}-byte request from a router; closing it",
                              length=length)
        self.transport.loseConnection()


class FeedPublisher(Factory):
    """The feed process's sink for a :class:`RouteFeed`: merged changes to every router.

    A router that connects before the feed has had any table waits for its
    snapshot until the feed has one, so that a restarted feed process never
    replaces a router's table with an empty one.
    """

    log = Logger()

    def buildProtocol(self, addr: Any) -> Any:
        conn = _RouterConnection()
        conn.factory = self
        return conn

    def __init__(self, feed: RouteFeed, clock: Any = None, interval: float = 0.0) -> None:
        self.feed = feed
        self.routers: list[_RouterConnection] = []
        feed.observe_state(self.send_status)  # a nexus joined or left: tell the routers now
        # lb.feed_interval: the first change after a quiet interval leaves at once, the
        # ones that follow within it wait and leave together, one frame per interval
        self.clock = clock
        self.interval = interval if clock is not None else 0.0
        self._pending: dict[str, dict[str, Any] | None] = {}  # app -> route, None: removed
        self._last: float | None = None
        self._call: IDelayedCall | None = None

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def joined(self, conn: _RouterConnection) -> None:
        self.routers.append(conn)
        conn.sendString(_frame({"status": self.feed.status()}))  # type: ignore[no-untyped-call]
        if self.feed.ever_live:
            self._sync(conn)

    def left(self, conn: _RouterConnection) -> None:
        if conn in self.routers:
            self.routers.remove(conn)

    def _sync(self, conn: _RouterConnection) -> None:
        for frame in snapshot_frames(list(self.feed.merged.values())):
            conn.sendString(frame)  # type: ignore[no-untyped-call]
        conn.synced = True

    # the sink interface of RouteFeed (see epio.routefeed.TableSink)
    def replace(self, routes: list[dict[str, Any]]) -> None:
        self.stop()  # waiting changes are in the new table
        self._pending = {}
        frames = snapshot_frames(routes)
        for conn in self.routers:
            for frame in frames:
                conn.sendString(frame)  # type: ignore[no-untyped-call]
            conn.synced = True

    def apply(self, upsert: list[dict[str, Any]], remove: list[str]) -> None:
        if self.interval > 0:
            now = self.clock.seconds()
            wait = None if self._last is None else self._last + self.interval - now
            if self._call is not None or (wait is not None and 0 < wait <= self.interval):
                pending = self._pending
                for route in upsert:
                    pending[route["app"]] = route
                for app in remove:
                    pending[app] = None
                if self._call is None:
                    self._call = self.clock.callLater(wait, self._flush)
                return
            self._last = now
        self._send(upsert, remove)

    def _flush(self) -> None:
        self._call = None
        pending, self._pending = self._pending, {}
        self._last = self.clock.seconds()
        upsert = [r for r in pending.values() if r is not None]
        remove = [app for app, r in pending.items() if r is None]
        if upsert or remove:
            self._send(upsert, remove)

    def _send(self, upsert: list[dict[str, Any]], remove: list[str]) -> None:
        frames = None
        for conn in self.routers:
            if conn.synced:
                if frames is None:
                    frames = [_frame({"upsert": upsert[i:i + FRAME_ROUTES],
                                      "remove": remove if i == 0 else []})
                              for i in range(0, max(1, len(upsert)), FRAME_ROUTES)]
                for frame in frames:
                    conn.sendString(frame)  # type: ignore[no-untyped-call]
            else:
                self._sync(conn)

    def send_status(self) -> None:
        """The feed's status to every router: every :data:`STATUS_INTERVAL` seconds and
        whenever a nexus joins or leaves the merge."""
        if not self.routers:
            return
        frame = _frame({"status": self.feed.status()})
        for conn in self.routers:
            conn.sendString(frame)  # type: ignore[no-untyped-call]
            if not conn.synced and self.feed.ever_live:
                self._sync(conn)  # live with nothing merged yet: an empty table is a table


# -- the router process's side --------------------------------------------------------


class _FeedConnection(Int32StringReceiver):
    MAX_LENGTH = MAX_FRAME
    transport: Any

    def __init__(self, source: FeedProcessSource) -> None:
        self.source = source

    def connectionMade(self) -> None:
        self.source._connected(self)

    def stringReceived(self, data: bytes) -> None:
        self.source._received(self, data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.source._lost(self)

    def lengthLimitExceeded(self, length: int) -> None:
        self.source.log.error("route feed sent a {length}-byte frame (limit {limit}); "
                              "reconnecting", length=length, limit=self.MAX_LENGTH)
        self.transport.loseConnection()


class _FeedConnectionFactory(Factory):
    def __init__(self, source: FeedProcessSource) -> None:
        self.source = source

    def buildProtocol(self, addr: IAddress | None) -> _FeedConnection:
        return _FeedConnection(self.source)


@implementer(IRouteSource)
class FeedProcessSource:
    """:class:`IRouteSource` fed by the node's route feed process over a Unix socket."""

    log = Logger()

    def __init__(self, reactor: Any, path: Path, nexuses: int, *,
                 retry: float = FEED_RETRY) -> None:
        self.reactor = reactor
        self.path = Path(path)
        self.retry = retry
        self.description = (f"nexus feed process ({nexuses} nexus"
                            f"{'es' if nexuses != 1 else ''})")
        self.counters: Counter[str] = Counter()
        self.sink: TableSink | None = None
        self.feed_status: dict[str, Any] | None = None
        self.has_table = False
        self.lost_at: float | None = None
        self.heard: float | None = None
        self._conn: _FeedConnection | None = None
        self._service: ClientService | None = None
        self._ready: list[Deferred[None]] = []
        # frames received and not yet worked through; the items of the frame at hand
        self._frames: deque[bytes] = deque()
        self._items: deque[tuple[str, Any]] = deque()
        self._build: TableBuild | None = None  # a snapshot arriving
        self._fresh = False  # a table has come over the current connection
        self._call: IDelayedCall | None = None

    def start(self, table: RouteTable) -> None:
        self.sink = TableSink(table, self.counters, lazy=True)
        self.lost_at = self.reactor.seconds()
        endpoint: Any = UNIXClientEndpoint(self.reactor, str(self.path), timeout=5)
        factory: Any = _FeedConnectionFactory(self)
        self._service = ClientService(endpoint, factory,
                                      retryPolicy=lambda attempt: self.retry, clock=self.reactor)
        self._service.startService()

    def stop(self) -> Any:
        """Disconnect (the table keeps its contents); fires when the connection is closed."""
        self._reset()
        service, self._service = self._service, None
        if service is not None:
            return service.stopService()
        return None

    def when_ready(self) -> Deferred[None]:
        """Fires with the first table from the feed (the router listens after it)."""
        d: Deferred[None] = Deferred()
        if self.has_table:
            d.callback(None)
        else:
            self._ready.append(d)
        return d

    def reload(self) -> None:
        """SIGHUP: the feed asks every nexus for a fresh snapshot."""
        if self._conn is not None:
            self._conn.sendString(_frame({"refresh": True}))  # type: ignore[no-untyped-call]

    # -- the connection --------------------------------------------------------------
    def _connected(self, conn: _FeedConnection) -> None:
        self._conn = conn
        self._fresh = False  # no table from this connection yet
        self.heard = self.reactor.seconds()
        self.counters["connects"] += 1
        if self.counters["connects"] > 1:
            self.log.info("route feed process is back ({path})", path=str(self.path))

    def _received(self, conn: _FeedConnection, data: bytes) -> None:
        """A frame: queued, and worked through a little per reactor turn (:meth:`_work`)."""
        self.heard = self.reactor.seconds()
        self._frames.append(data)
        if self._call is None:
            self._call = self.reactor.callLater(0, self._work)

    def _work(self) -> None:
        """Decode frames and apply routes for at most :data:`APPLY_BUDGET` seconds, then
        let the reactor serve requests and come back: a burst of route changes, or a whole
        table, never holds the proxy for more than about one route."""
        self._call = None
        deadline = perf_counter() + APPLY_BUDGET
        items, frames = self._items, self._frames
        try:
            while True:
                if items:
                    self._step(items.popleft())
                elif frames:
                    self._decode(frames.popleft())
                else:
                    return
                if perf_counter() >= deadline:
                    break
        except Exception:
            # our own feed process sent it: a bug, not an attack.  Start over with a
            # fresh snapshot rather than guess; the table stays as it is meanwhile.
            self.counters["bad_frames"] += 1
            self.log.failure("route feed sent a frame this router cannot use; reconnecting")
            conn = self._conn
            self._reset()
            if conn is not None:
                conn.transport.loseConnection()
            return
        self._call = self.reactor.callLater(0, self._work)

    def _decode(self, data: bytes) -> None:
        msg = json.loads(data)
        items = self._items
        if "upsert" in msg:
            upsert, remove = msg["upsert"], msg["remove"]
            if not isinstance(upsert, list) or not isinstance(remove, list):
                raise ValueError("malformed route change")
            self.counters["deltas"] += 1
            if remove:
                items.append(("remove", remove))
            items.extend(("upsert", r) for r in upsert)
        elif "snapshot" in msg:
            routes = msg["snapshot"]
            if not isinstance(routes, list):
                raise ValueError("malformed snapshot")
            if self._build is None:
                self._build = self.sink.building() if self.sink is not None else None
            items.extend(("build", r) for r in routes)
            if not msg.get("more"):
                items.append(("commit", None))
        elif isinstance(msg.get("status"), dict):
            self.feed_status = msg["status"]
        else:
            raise ValueError("unknown frame")

    def _step(self, item: tuple[str, Any]) -> None:
        kind, value = item
        sink = self.sink
        if kind == "upsert":
            if sink is not None:
                sink.apply((value,), ())
        elif kind == "remove":
            if sink is not None:
                sink.apply((), value)
        elif kind == "build":
            if self._build is not None:
                self._build.add(value)
        else:  # commit: the whole table, in one swap
            build, self._build = self._build, None
            if build is not None:
                build.commit()
            self.has_table = True
            self._fresh = True
            self.counters["snapshots"] += 1
            ready, self._ready = self._ready, []
            for d in ready:
                if not d.called:  # a router that gave up waiting (cancelled)
                    d.callback(None)

    def _reset(self) -> None:
        """Forget what a lost connection sent and was not applied yet (the next
        connection starts with a whole table)."""
        self._frames.clear()
        self._items.clear()
        self._build = None
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _lost(self, conn: _FeedConnection) -> None:
        if conn is not self._conn:
            return
        self._conn = None
        self._reset()
        self.lost_at = self.reactor.seconds()
        if self._service is not None and self._service.running:
            self.log.warn("route feed process connection lost: serving the last route table "
                          "({routes} routes) until it is back", routes=self._routes())
        self.counters["disconnects"] += 1

    def _routes(self) -> int:
        return len(self.sink.table) if self.sink is not None else 0

    # -- status ----------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """As :meth:`RouteFeed.status`, from the feed process, with ``process``."""
        now = self.reactor.seconds()
        connected = self._conn is not None
        process = {
            "socket": str(self.path),
            "connected": connected,
            "age": None if self.heard is None else max(0.0, now - self.heard),
            "counters": dict(self.counters),
        }
        if connected and self.feed_status is not None and (self._fresh or not self.has_table):
            return dict(self.feed_status, process=process)
        # no feed, or a feed (restarted) whose table has not come yet: this router
        # serves its last table, of whatever age
        status = dict(self.feed_status or {"nexuses": [], "counters": {}})
        status.update(
            state="stale" if self.has_table else "starting",
            stale=self.has_table,
            since=self.lost_at if self.has_table else None,
            alive=0,
            routes=self._routes(),
            process=process,
        )
        return status


# -- the process ----------------------------------------------------------------------


def private_dir_problem(directory: Path) -> str:
    """Why the feed must not listen in ``directory`` (empty: it may): it must be a real
    directory (not a link) of this process's user, closed to everyone else."""
    try:
        st = os.lstat(directory)
    except OSError as e:
        return e.strerror or "cannot stat it"
    if not stat.S_ISDIR(st.st_mode):
        return "not a directory"
    if st.st_uid != os.getuid():
        return f"owned by uid {st.st_uid}"
    if st.st_mode & 0o077:
        return f"mode {stat.S_IMODE(st.st_mode):o}, not 0700"
    return ""


class FeedProcessService(Service):
    """The route feed process's service: follows the nexuses (``source``) and serves the
    merged table on the UNIX socket ``path`` to every router process of the node."""

    def __init__(self, reactor: Any, source: NexusRouteSource, interval: float,
                 path: Path) -> None:
        self.reactor = reactor
        self.source = source
        self.publisher = FeedPublisher(source.feed, reactor, interval)
        self.path = path
        self.status = LoopingCall(self.publisher.send_status)
        self.status.clock = reactor
        self.port: Any = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        try:
            self.path.unlink()  # a previous feed's, left by a crash
        except FileNotFoundError:
            pass
        self.port = self.reactor.listenUNIX(str(self.path), self.publisher, mode=0o600)
        self.source.follow(self.publisher)
        self.status.start(STATUS_INTERVAL, now=False)

    def stopService(self) -> Any:
        super().stopService()  # type: ignore[no-untyped-call]
        if self.status.running:
            self.status.stop()
        self.source.stop()
        self.publisher.stop()
        return self.port.stopListening() if self.port is not None else None


def main() -> None:
    """``python -m epio.lb.feed`` with ``EPIO_LB_FEED_SPEC`` (JSON: config, socket)."""
    from epio.cluster import follows_store
    from epio.lb.service import run_child, start_child
    from epio.routefeed import make_route_source

    # with a PostgreSQL store the feed follows the cluster's nexus list itself
    # (epio.cluster): a store of its own, read by its own ClusterDirectory
    reactor, spec, node = start_child("EPIO_LB_FEED_SPEC",
                                      lambda s: follows_store(s.store.url))
    path = Path(spec["socket"])
    problem = private_dir_problem(path.parent)
    if problem:  # made by the router's parent, 0700: anything else is not ours to trust
        print(f"route feed: refusing to listen in {path.parent}: {problem}", flush=True)
        raise SystemExit(1)
    service = FeedProcessService(reactor, make_route_source(node),
                                 node.settings.lb.feed_interval, path)
    services: list[Any] = [svc for svc in (node.store_service, node.cluster) if svc is not None]
    run_child(reactor, "epio-lb-feed", [*services, service])


if __name__ == "__main__":
    main()
