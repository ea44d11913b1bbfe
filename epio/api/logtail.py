"""``GET /api/v1/apps/{app}/logs``: recent lines as JSON, or a live tail over a websocket.

Self-contained: the api's Klein app mounts it with its own app-scoped auth
check (``authorize(request, app)`` raises the api's usual not-found error for
an app the caller may not see; this module lets that exception propagate)::

    tail = LogTail.from_node(node, log_client, authorize)

    @app.route("/api/v1/apps/<app_name>/logs", methods=["GET"])
    async def logs(self, request, app_name):
        return await self.tail.handle(request, app_name)

    @app.route("/api/v1/apps/<app_name>/stats", methods=["GET"])
    async def stats(self, request, app_name):
        return await self.tail.handle_stats(request, app_name)

Query parameters (both forms): ``n`` (lines of history, default
``logger.tail_default_lines``, at most ``logger.query_max_lines``), ``source``
(repeatable or comma list; ``web`` matches ``web.1``), ``grep`` (a regular
expression), ``since`` and ``until`` (epoch seconds, ISO 8601, or a duration
before now: ``90s``, ``15m``, ``1h``, ``2d``).

A plain GET answers ``{"app", "lines": [{id, timestamp, source, text[, lost]}],
"next"}``.  A GET with ``Upgrade: websocket`` becomes a live tail: the server
sends JSON text messages

- ``{"type": "lines", "lines": [...]}`` -- the last n lines first, then new ones;
- ``{"type": "ready", "next": id}`` -- history is done, live lines follow;
- ``{"type": "missed", "count": N}`` -- N lines were not sent to this client
  (its buffer of ``logger.tail_buffer_lines`` overflowed because it read too
  slowly, or the log server could not supply them);
- ``{"type": "notice", "message": text}`` and ``{"type": "error", "code", "message"}``
  (then the server closes).

A slow reader only ever costs its own bounded buffer: the tail is a Twisted
push producer on the connection, paused when the socket's send buffer is full;
while paused, lines queue up to the bound and past it are counted, dropped and
reported as ``missed`` once the client has caught up.  Nothing else waits.
"""

from __future__ import annotations

import json
import re
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from epio.api.spec import METRIC_NAME, SOURCE_NAME
from epio.bus.errors import RemoteError
from epio.logclient import (
    BadFilter,
    Line,
    LineFilter,
    LogClient,
    LogsUnavailable,
    unknown_metric,
)

if TYPE_CHECKING:
    from epio.node import Node

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d|w)$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
BATCH = 500  # lines per websocket message


def parse_time(text: str, now: float, name: str) -> float:
    """Epoch seconds, ISO 8601, or a duration before ``now`` (``15m``)."""
    t = text.strip()
    m = _DURATION.match(t)
    if m:
        return now - float(m.group(1)) * _UNITS[m.group(2)]
    try:
        return float(t)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(t.replace("Z", "+00:00"))
    except ValueError:
        raise BadFilter(
            f"{name} must be epoch seconds, an ISO 8601 time or a duration like 15m, 1h, 2d"
        ) from None
    if dt.tzinfo is None:
        raise BadFilter(f"{name}: an ISO 8601 time needs a time zone (e.g. Z)")
    return dt.timestamp()


def _arg(args: dict[bytes, list[bytes]], name: str) -> list[str]:
    try:
        return [v.decode("utf-8") for v in args.get(name.encode(), [])]
    except UnicodeDecodeError:
        raise BadFilter(f"{name} is not valid UTF-8") from None


def parse_params(args: dict[bytes, list[bytes]], now: float, default_n: int,
                 max_n: int) -> tuple[int, LineFilter]:
    """(n, filter) from a request's query arguments, or BadFilter."""
    n = default_n
    ns = _arg(args, "n")
    if ns:
        try:
            n = int(ns[-1])
        except ValueError:
            raise BadFilter("n must be an integer") from None
        if not 0 <= n <= max_n:
            raise BadFilter(f"n must be between 0 and {max_n}")
    sources = frozenset(s.strip() for v in _arg(args, "source") for s in v.split(",") if s.strip())
    for s in sources:
        if not re.fullmatch(SOURCE_NAME, s):
            raise BadFilter(f"invalid source {s!r}")
    greps = _arg(args, "grep")
    grep = greps[-1] if greps and greps[-1] != "" else None
    since = until = None
    if _arg(args, "since"):
        since = parse_time(_arg(args, "since")[-1], now, "since")
    if _arg(args, "until"):
        until = parse_time(_arg(args, "until")[-1], now, "until")
    return n, LineFilter(sources=sources, grep=grep, since=since, until=until)


class TailBuffer:
    """What one websocket client has not yet been sent, bounded by ``limit`` lines.

    ``send(message)`` writes one JSON message.  While paused (the client's
    socket is full), lines queue; when ``limit`` lines are queued, further lines
    are dropped and counted until the queue has been sent, then the client gets
    ``{"type": "missed", "count": N}``.  Control messages are never dropped.
    """

    def __init__(self, limit: int, send: Callable[[dict[str, Any]], None],
                 on_missed: Callable[[int], None] | None = None) -> None:
        self.limit = limit
        self.send = send
        self.on_missed = on_missed
        self.paused = False
        self.queue: deque[tuple[str, Any]] = deque()
        self.queued_lines = 0
        self.dropping = 0  # lines dropped since the queue filled up, not yet reported
        self.total_missed = 0
        self.total_sent = 0

    def lines(self, lines: list[Line]) -> None:
        if not lines:
            return
        if not self.paused and not self.queue and not self.dropping:
            self._send_lines(lines)
            return
        room = self.limit - self.queued_lines if not self.dropping else 0
        if room > 0:
            take = lines[:room]
            self.queue.append(("lines", take))
            self.queued_lines += len(take)
            lines = lines[room:]
        if lines:
            self.dropping += len(lines)
            if self.on_missed is not None:
                self.on_missed(len(lines))

    def message(self, msg: dict[str, Any]) -> None:
        if not self.paused and not self.queue and not self.dropping:
            self.send(msg)
        else:
            self.queue.append(("msg", msg))

    def _send_lines(self, lines: list[Line]) -> None:
        for i in range(0, len(lines), BATCH):
            part = lines[i : i + BATCH]
            self.send({"type": "lines", "lines": [ln.to_json() for ln in part]})
            self.total_sent += len(part)

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        self.drain()

    def drain(self) -> None:
        """Send what is queued while not paused (a send may pause us again)."""
        while self.queue and not self.paused:
            kind, item = self.queue.popleft()
            if kind == "lines":
                self.queued_lines -= len(item)
                self._send_lines(item)
            else:
                self.send(item)
        if not self.queue and not self.paused and self.dropping:
            n, self.dropping = self.dropping, 0
            self.total_missed += n
            self.send({"type": "missed", "count": n})


def __getattr__(name: str) -> Any:
    """``TailProtocol`` and ``TailFactory`` live in :mod:`epio.api.logtail_ws`: autobahn
    (about 6 MiB of a node's memory) is imported with the first live tail, not at start."""
    if name in ("TailProtocol", "TailFactory"):
        from epio.api import logtail_ws

        return getattr(logtail_ws, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _error(request: IRequest, status: int, code: str, message: str) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps({"error": {"code": code, "message": message}}).encode()


class LogTail:
    """The logs endpoint logic, for the api to mount (see the module doc)."""

    log = Logger()

    def __init__(self, client: LogClient, authorize: Callable[[IRequest, str], Awaitable[Any]],
                 clock: IReactorTime, *, default_lines: int = 100, max_lines: int = 10_000,
                 buffer_lines: int = 5_000, registry: Any = None) -> None:
        self.client = client
        self.authorize = authorize
        self.clock = clock
        self.default_lines = default_lines
        self.max_lines = max_lines
        self.buffer_lines = buffer_lines
        self._missed = None
        if registry is not None:
            self._missed = registry.counter(
                "epio_log_tail_missed_total",
                "Live-tail lines not delivered to a websocket client (slow client or gap).")

    @classmethod
    def from_node(cls, node: Node, client: LogClient,
                  authorize: Callable[[IRequest, str], Awaitable[Any]]) -> LogTail:
        sec = node.settings.logger
        return cls(client, authorize, node.reactor, default_lines=sec.tail_default_lines,
                   max_lines=sec.query_max_lines, buffer_lines=sec.tail_buffer_lines,
                   registry=node.metrics)

    def _on_missed(self, n: int) -> None:
        if self._missed is not None:
            self._missed.inc(n)

    async def handle(self, request: IRequest, app: str) -> Any:
        """Answer ``GET /api/v1/apps/{app}/logs`` (JSON, or the websocket upgrade)."""
        await self.authorize(request, app)
        try:
            n, filt = parse_params(request.args or {}, self.clock.seconds(), self.default_lines,
                                   self.max_lines)
        except BadFilter as e:
            return _error(request, 400, "invalid_parameter", str(e))
        upgrade = (request.getHeader(b"upgrade") or b"").lower()
        if upgrade == b"websocket":
            from autobahn.twisted.resource import WebSocketResource

            from epio.api.logtail_ws import TailFactory

            factory = TailFactory(self.client, app, n, filt, self.buffer_lines, self._on_missed)
            return WebSocketResource(factory)
        try:
            lines, nxt = await self.client.query(app, filt, n)
        except (LogsUnavailable, RemoteError) as e:
            return self._logger_failed(request, app, "logs", e)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"app": app, "lines": [ln.to_json() for ln in lines], "next": nxt},
                          separators=(",", ":")).encode()

    async def handle_stats(self, request: IRequest, app: str) -> bytes:
        """Answer ``GET /api/v1/apps/{app}/stats?metric=&since=&until=&resolution=``:
        ``{"app", "resolution", "series": {metric: [[t, value], ...]}}`` (see docs/logs.md)."""
        await self.authorize(request, app)
        args = request.args or {}
        now = self.clock.seconds()
        try:
            metrics = _arg(args, "metric")
            metric = metrics[-1] if metrics and metrics[-1] else None
            if metric is not None and not re.fullmatch(METRIC_NAME, metric):
                raise BadFilter("invalid metric name")
            why = unknown_metric(metric) if metric is not None else None
            if why is not None:
                raise BadFilter(why)
            since = parse_time(_arg(args, "since")[-1], now, "since") if _arg(args, "since") else None
            until = parse_time(_arg(args, "until")[-1], now, "until") if _arg(args, "until") else None
            resolution = None
            if _arg(args, "resolution"):
                try:
                    resolution = int(_arg(args, "resolution")[-1])
                except ValueError:
                    raise BadFilter("resolution must be 10 or 60") from None
                if resolution not in (10, 60):
                    raise BadFilter("resolution must be 10 or 60")
        except BadFilter as e:
            return _error(request, 400, "invalid_parameter", str(e))
        try:
            result = await self.client.stats(app, metric, since, until, resolution)
        except (LogsUnavailable, RemoteError) as e:
            return self._logger_failed(request, app, "stats", e)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"app": app, **result}, separators=(",", ":")).encode()

    def _logger_failed(self, request: IRequest, app: str, what: str,
                       e: LogsUnavailable | RemoteError) -> bytes:
        """The answer when no logger could give ``what`` ("logs", "stats"): 503 when
        none answered, 400 for a parameter a logger refused, else 502 (never its text)."""
        if isinstance(e, LogsUnavailable):
            self.log.warn("{what} of {app} unavailable: {err}", what=what, app=app, err=str(e))
            return _error(request, 503, f"{what}_unavailable", "no log server answered; try again")
        if e.code == "invalid_parameter":
            return _error(request, 400, "invalid_parameter", e.message)
        self.log.warn("{what} of {app}: logger answered {code}", what=what, app=app, code=e.code)
        return _error(request, 502, f"{what}_error", "the log server could not answer")
