"""How other roles (the api) read logs and stats from the loggers, over the bus.

Shared floor: the api imports this, never ``epio.logs`` (roles don't import
roles).  A :class:`LogClient` talks to one logger at a time (every logger holds
the whole stream), the *current* one, and moves to the next on a timeout:

- ``await client.query(app, LineFilter(...), n)`` -> ``(lines, next_id)``:
  ``logs.query`` over DEALER to the logger's ROUTER (``logger.router_bind``);
- ``await client.stats(app, metric, since, until, resolution)``: ``stats.query``;
- ``client.follow(app, sink, n, filter)`` -> :class:`Follower`: the last n
  lines, then every new one.  It subscribes to ``log.live`` on the logger's
  PUB (``logger.publish_bind``, topic ``b"log\\0APP\\0"``) *before* asking for
  history, then joins the two by line id (ids are consecutive per app on one
  logger): nothing between history and live is lost or repeated, and a gap in
  the live ids (a PUB queue overflow, the subscription still connecting) is
  filled from the logger's store with ``logs.query after=``.  What cannot be
  filled is reported to the sink as missed.

A sink gets ``lines(list[Line])``, ``ready(next_id)`` (history done),
``missed(n)``, ``notice(text)`` and ``error(code, message)``; it must not block.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from attrs import frozen
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from epio.config.settings import LoggerSettings

if TYPE_CHECKING:
    from epio.bus import Bus, Envelope
    from epio.bus.sockets import Subscriber
    from epio.node import Node

MAX_GREP = 200  # characters of a grep pattern


def live_topic(app: str) -> bytes:
    """The PUB/SUB topic of an app's live lines (NUL-terminated: exact match)."""
    return b"log\0" + app.encode() + b"\0"


class LogsUnavailable(Exception):
    """No logger answered."""


def compile_grep(pattern: str) -> Any:  # Any: the re2 module is untyped
    """Compile a user's ``grep`` with RE2 (linear time, no backreferences).

    Python's ``re`` backtracks: a pattern like ``(a+)+$`` over a 10 kB line
    would hold a logger for minutes, for every app.  RE2 cannot be made to.
    Raises BadFilter for an invalid pattern.
    """
    import re2

    options = re2.Options()
    options.log_errors = False
    try:
        return re2.compile(pattern, options)
    except re2.error as e:
        message = e.args[0].decode() if e.args and isinstance(e.args[0], bytes) else str(e)
        raise BadFilter(f"grep is not a valid regular expression: {message}") from None


class BadFilter(ValueError):
    """A filter parameter is invalid (message says which and why)."""


class Line(NamedTuple):
    """A stored log line as readers see it; ``id`` is its number in the app's log
    on the logger that served it; ``lost`` > 0 marks a "N lines lost" marker.
    (A NamedTuple: tails make one per line.)"""

    id: int
    timestamp: float
    source: str
    text: str
    lost: int = 0

    @classmethod
    def from_wire(cls, item: Sequence[Any]) -> Line:
        if len(item) == 5 and type(item[0]) is int and type(item[4]) is int:
            return cls._make(item)
        return cls(int(item[0]), float(item[1]), str(item[2]), str(item[3]), int(item[4]))

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "timestamp": self.timestamp, "source": self.source,
                             "text": self.text}
        if self.lost:
            d["lost"] = self.lost
        return d


PLATFORM_SOURCES: dict[str, str] = {
    "build": "the build's output",
    "release": "the [release] command's output",
    "platform": "deploys, scaling, starts, exits and sessions",
    "router": "one access line per request",
    "run": "detached `epio run` sessions (run.N)",
    "cron": "[cron] runs (cron.NAME)",
}
"""The log sources every app has, besides its process types (``web`` for web.N)."""


METRICS: dict[str, str] = {
    "requests": "requests through the routers (count per bucket)",
    "status_1xx": "1xx answers", "status_2xx": "2xx answers", "status_3xx": "3xx answers",
    "status_4xx": "4xx answers", "status_5xx": "5xx answers",
    "error_": "router errors by code (error_<code>)",
    "bytes_out": "bytes sent to clients",
    "latency_p50_ms": "median latency", "latency_p95_ms": "95th percentile latency",
    "latency_p99_ms": "99th percentile latency", "latency_mean_ms": "mean latency",
    "memory_bytes": "memory per instance", "memory_limit_bytes": "memory limit per instance",
    "cpu_percent": "CPU per instance, percent of one core (200 = two cores busy)",
    "processes": "processes per instance", "restarts": "restarts per instance",
}
"""The stats metrics (epio.logs.stats aggregates what the routers and runners sample);
other sample kinds are summed as ``KIND.KEY``."""


def unknown_metric(name: str) -> str | None:
    """Why ``name`` (a metric name or prefix) matches no metric, or None if it may."""
    if "." in name or name.startswith("error_") or any(m.startswith(name) for m in METRICS):
        return None
    return (f"unknown metric {name!r}; the metrics are: "
            + ", ".join(m + "<code>" if m.endswith("_") else m for m in METRICS)
            + " (a prefix such as latency or status matches several)")


@frozen
class LineFilter:
    """Which lines: sources (``web`` matches ``web.N``), a regex, a time range.
    Lost markers pass the regex (a reader must see that lines are missing)."""

    sources: frozenset[str] = frozenset()
    grep: str | None = None
    since: float | None = None
    until: float | None = None

    def __attrs_post_init__(self) -> None:
        if self.grep is not None:
            if len(self.grep) > MAX_GREP:
                raise BadFilter(f"grep pattern longer than {MAX_GREP} characters")
            compile_grep(self.grep)

    @property
    def regex(self) -> Any:  # Any: a compiled re2 pattern (untyped module)
        return None if self.grep is None else compile_grep(self.grep)

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if self.sources:
            body["sources"] = sorted(self.sources)
        if self.grep is not None:
            body["grep"] = self.grep
        if self.since is not None:
            body["since"] = self.since
        if self.until is not None:
            body["until"] = self.until
        return body

    def matcher(self) -> Callable[[Line], bool]:
        sources = self.sources
        rx = self.regex
        since, until = self.since, self.until

        def ok(line: Line) -> bool:
            if sources and line.source not in sources and line.source.split(".", 1)[0] not in sources:
                return False
            if since is not None and line.timestamp < since:
                return False
            if until is not None and line.timestamp >= until:
                return False
            return line.lost > 0 or rx is None or rx.search(line.text) is not None

        return ok


@frozen
class LoggerPeer:
    router: str
    publish: str


class TailSink(Protocol):
    def lines(self, lines: list[Line]) -> None: ...
    def ready(self, next_id: int) -> None: ...
    def missed(self, n: int) -> None: ...
    def notice(self, text: str) -> None: ...
    def error(self, code: str, message: str) -> None: ...


class Follower:
    """One live tail: history, then live lines, joined by id; see the module doc."""

    log = Logger()

    def __init__(self, client: LogClient, app: str, sink: TailSink, n: int,
                 filt: LineFilter, max_pending: int, fill_limit: int) -> None:
        self.client = client
        self.app = app
        self.sink = sink
        self.n = n
        self.filter = filt
        self._ok = filt.matcher()
        self.max_pending = max_pending
        self.fill_limit = fill_limit
        self.expected: int | None = None  # next live id to deliver
        self.stopped = False
        self._busy = True  # history or a fill running: live batches wait
        self._pending: list[tuple[int, list[Line]]] = []
        self._pending_lines = 0

    def start(self) -> None:
        Deferred.fromCoroutine(self._history(self.n))

    def restart(self) -> None:
        """The client moved to another logger: ids start over there."""
        if self.stopped:
            return
        self.sink.notice("switched to another log server; lines around this point may be "
                         "repeated or missing")
        self.expected = None
        self._busy = True
        self._pending.clear()
        self._pending_lines = 0
        Deferred.fromCoroutine(self._history(0))

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.client._detach(self)

    async def _history(self, n: int) -> None:
        try:
            lines, nxt = await self.client.query(self.app, self.filter, n)
        except LogsUnavailable as e:
            if not self.stopped:
                self.sink.error("logs_unavailable", str(e))
                self.stop()
            return
        except Exception:
            self.log.failure("log tail of {app}: history query failed", app=self.app)
            if not self.stopped:
                self.sink.error("internal", "could not read the log")
                self.stop()
            return
        if self.stopped:
            return
        if n and lines:
            self.sink.lines(lines)
        self.expected = nxt
        self.sink.ready(nxt)
        self._resume()

    def _resume(self) -> None:
        self._busy = False
        while self._pending and not self._busy and not self.stopped:
            first, lines = self._pending.pop(0)
            self._pending_lines -= len(lines)
            self.live(first, lines)

    def live(self, first: int, lines: list[Line]) -> None:
        """A ``log.live`` batch (ids first, first+1, ...)."""
        if self.stopped:
            return
        if self._busy:
            # past the bound a batch is not kept: its ids become a gap that is
            # filled from the store (or reported missed) like any other
            if self._pending_lines + len(lines) <= self.max_pending:
                self._pending.append((first, lines))
                self._pending_lines += len(lines)
            return
        expected = self.expected
        assert expected is not None
        last = first + len(lines) - 1
        if last < expected:
            return  # already delivered (history overlapped)
        if first < expected:
            lines = lines[expected - first :]
            first = expected
        if first > expected:
            gap = first - expected
            if gap <= self.fill_limit:
                self._busy = True
                self._pending.insert(0, (first, lines))
                self._pending_lines += len(lines)
                Deferred.fromCoroutine(self._fill(expected, gap))
                return
            self.sink.missed(gap)
        ok = self._ok
        out = [ln for ln in lines if ok(ln)]
        if out:
            self.sink.lines(out)
        self.expected = last + 1

    async def _fill(self, expected: int, gap: int) -> None:
        try:
            lines, _ = await self.client.query(self.app, self.filter, gap, after=expected - 1,
                                               unfiltered=True)
        except Exception as e:
            lines = []
            self.log.warn("log tail of {app}: could not fill a gap of {gap}: {err}",
                          app=self.app, gap=gap, err=str(e))
        if self.stopped:
            return
        got = [ln for ln in lines if expected <= ln.id < expected + gap]
        have = {ln.id for ln in got}
        missing = gap - len(have)
        ok = self._ok
        out = [ln for ln in got if ok(ln)]
        if out:
            self.sink.lines(out)
        if missing:
            self.sink.missed(missing)
        self.expected = expected + gap
        self._resume()


class _AppSubscription:
    def __init__(self, service: Subscriber) -> None:
        self.service = service
        self.followers: set[Follower] = set()


class LogClient(MultiService):
    """The api's handle on the loggers (a service: add it to the api's tree)."""

    log = Logger()

    def __init__(self, bus: Bus, peers: Sequence[LoggerPeer], clock: IReactorTime, *,
                 timeout: float = 10.0, ping_interval: float = 5.0,
                 max_pending: int = 10_000, fill_limit: int = 10_000) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        if not peers:
            raise ValueError("LogClient needs at least one logger")
        self.bus = bus
        self.peers = list(peers)
        self.clock = clock
        self.timeout = timeout
        self.ping_interval = ping_interval
        self.max_pending = max_pending
        self.fill_limit = fill_limit
        self.current = 0
        self.dealer = bus.dealer([p.router for p in self.peers])
        self.dealer.setServiceParent(self)  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        self._subs: dict[str, _AppSubscription] = {}
        self._watch = LoopingCall(self._ping)
        self._watch.clock = clock
        self.setName("log-client")  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated

    @property
    def peer(self) -> LoggerPeer:
        return self.peers[self.current]

    def stopService(self) -> Any:
        if self._watch.running:
            self._watch.stop()
        for sub in list(self._subs.values()):
            for f in list(sub.followers):
                f.stop()
        return super().stopService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated

    # -- requests --------------------------------------------------------------

    async def _request(self, type: str, body: dict[str, Any]) -> Envelope:
        from epio.bus.errors import NotRunning, RequestTimeout

        errors = []
        for _ in range(len(self.peers)):
            peer = self.peer
            try:
                return await self.dealer.request_to(peer.router, type, body, timeout=self.timeout)
            except (RequestTimeout, NotRunning) as e:
                errors.append(str(e))
                self._switch(self.current)
        raise LogsUnavailable("no logger answered: " + "; ".join(errors))

    async def query(self, app: str, filt: LineFilter = LineFilter(), n: int = 100, *,
                    after: int | None = None, unfiltered: bool = False) -> tuple[list[Line], int]:
        """Stored lines of ``app`` (the last n matching, or the first n after id
        ``after``) and the id its next line will get."""
        body: dict[str, Any] = {"app": app, "n": n}
        if not unfiltered:
            body.update(filt.to_body())
        if after is not None:
            body["after"] = after
        reply = await self._request("logs.query", body)
        return [Line.from_wire(i) for i in reply.body["lines"]], int(reply.body["next"])

    async def stats(self, app: str, metric: str | None = None, since: float | None = None,
                    until: float | None = None, resolution: int | None = None) -> dict[str, Any]:
        """``{"resolution": s, "series": {metric: [[t, v], ...]}}`` for ``app``."""
        body: dict[str, Any] = {"app": app}
        for k, v in (("metric", metric), ("since", since), ("until", until),
                     ("resolution", resolution)):
            if v is not None:
                body[k] = v
        reply = await self._request("stats.query", body)
        return {"resolution": reply.body["resolution"], "series": reply.body["series"]}

    # -- live ------------------------------------------------------------------

    def follow(self, app: str, sink: TailSink, n: int = 100,
               filt: LineFilter = LineFilter()) -> Follower:
        """Start a live tail of ``app`` into ``sink``; ``follower.stop()`` ends it."""
        f = Follower(self, app, sink, n, filt, self.max_pending, self.fill_limit)
        sub = self._subs.get(app)
        if sub is None:
            sub = self._subs[app] = _AppSubscription(self._subscribe(app))
        sub.followers.add(f)
        if not self._watch.running and self.running:
            self._watch.start(self.ping_interval, now=False)
        f.start()
        return f

    def _subscribe(self, app: str) -> Subscriber:
        def handler(topic: bytes, env: Envelope) -> None:
            sub = self._subs.get(app)
            if sub is None or env.type != "log.live":
                return
            body = env.body
            lines = [Line.from_wire(i) for i in body["lines"]]
            for f in list(sub.followers):
                f.live(int(body["first"]), lines)

        svc = self.bus.subscriber([self.peer.publish], [live_topic(app)], handler)
        svc.setServiceParent(self)  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        return svc

    def _detach(self, f: Follower) -> None:
        sub = self._subs.get(f.app)
        if sub is None:
            return
        sub.followers.discard(f)
        if not sub.followers:
            del self._subs[f.app]
            sub.service.disownServiceParent()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        if not self._subs and self._watch.running:
            self._watch.stop()

    def _switch(self, failed: int) -> None:
        """Move from peer ``failed`` to the next one (if still current)."""
        if len(self.peers) < 2 or self.current != failed:
            return
        self.current = (failed + 1) % len(self.peers)
        self.log.warn("logger {old} not answering; using {new}",
                      old=self.peers[failed].router, new=self.peer.router)
        for app, sub in list(self._subs.items()):
            sub.service.disownServiceParent()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
            sub.service = self._subscribe(app)
            for f in list(sub.followers):
                f.restart()

    async def _ping_once(self) -> None:
        from epio.bus.errors import BusError

        current = self.current
        try:
            await self.dealer.request_to(self.peer.router, "bus.ping", {},
                                         timeout=min(self.timeout, self.ping_interval))
        except BusError:
            self._switch(current)

    def _ping(self) -> Deferred[None]:
        d = Deferred.fromCoroutine(self._ping_once())
        d.addErrback(lambda f: self.log.failure("log client ping failed", f))
        return d


def peers_of(settings: LoggerSettings) -> list[LoggerPeer]:
    """The loggers' query/publish endpoints from ``logger.peers``."""
    return [LoggerPeer(p["router"], p["publish"]) for p in settings.peers]


def make_log_client(node: Node) -> LogClient:
    """The LogClient for a node's api (add it to the api's service tree)."""
    sec = node.settings.logger
    return LogClient(node.bus, peers_of(sec), node.reactor,
                     timeout=sec.client_timeout, ping_interval=sec.client_ping_interval,
                     max_pending=sec.tail_buffer_lines, fill_limit=sec.query_max_lines)
