"""Real processes for the log pipeline tests: a logger node, a pusher, a tail server/client."""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from array import array
from pathlib import Path
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol, connectWS
from klein import Klein
from twisted.internet import defer, reactor, task
from twisted.internet.protocol import ProcessProtocol
from twisted.web.server import Site

from epio.api.logtail import LogTail
from epio.bus import Bus
from epio.logclient import Line, LineFilter, LogClient, LoggerPeer
from tests.util import NodeProcess, epio_env, free_port, isolated_config, to_toml

HERE = Path(__file__).resolve().parent


def write_secret(directory: Path) -> tuple[Path, bytes]:
    path = directory / "cluster-secret"
    secret = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret.hex() + "\n")
    return path, secret


class LoggerNode:
    """A real ``twistd epio --role=logger`` with isolated ports; restartable on the same data."""

    def __init__(self, tmp: Path, secret_file: Path, overrides: dict | None = None) -> None:
        self.metrics_port = free_port()
        over = {
            "cluster": {"secret_file": str(secret_file)},
            "logger": {"flush_interval": 0.05, "maintenance_interval": 0.5,
                       "stats_flush_delay": 0.5},
            "metrics": {"listen": f"tcp:{self.metrics_port}:interface=127.0.0.1"},
        }
        for section, table in (overrides or {}).items():
            over.setdefault(section, {}).update(table)
        self.doc, _ = isolated_config(over)
        self.data_dir = tmp / "data"
        self.tmp = tmp
        self.proc: NodeProcess | None = None
        lg = self.doc["logger"]
        self.pull = lg["pull_bind"]
        self.router = lg["router_bind"]
        self.publish = lg["publish_bind"]

    def start(self, timeout: float = 30.0) -> None:
        self.proc = NodeProcess(["--role", "logger"], data_dir=self.data_dir,
                                config=to_toml(self.doc))
        self.proc.wait_for_log("service logger started", timeout)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc.cleanup()


class Pusher(ProcessProtocol):
    """tests/integration/logs/pusher.py in its own process; ``events[name]`` fire."""

    def __init__(self) -> None:
        self.buf = b""
        self.events: dict[str, defer.Deferred[dict]] = {
            "ready": defer.Deferred(), "sent": defer.Deferred()}
        self.ended: defer.Deferred[None] = defer.Deferred()
        self.stderr = b""

    @classmethod
    def spawn(cls, **args: Any) -> Pusher:
        p = cls()
        reactor.spawnProcess(p, sys.executable, [sys.executable, str(HERE / "pusher.py"),
                                                 json.dumps(args)], env=epio_env())
        return p

    def outReceived(self, data: bytes) -> None:
        self.buf += data
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            msg = json.loads(line)
            d = self.events.get(msg["event"])
            if d is not None and not d.called:
                d.callback(msg)

    def errReceived(self, data: bytes) -> None:
        self.stderr += data

    def processEnded(self, reason: Any) -> None:
        for d in self.events.values():
            if not d.called:
                d.errback(RuntimeError("pusher ended early: " + self.stderr.decode()[-2000:]))
        self.ended.callback(None)

    def close(self) -> defer.Deferred[None]:
        if self.transport is not None:
            self.transport.closeStdin()
        return self.ended


def make_bus(secret: bytes, name: str = "test-api") -> Bus:
    return Bus(reactor, secret, name)


class NotFound(Exception):
    pass


class TailApp:
    """The api's mounting, as docs/logs.md gives it, with a token check for app 'owner'."""

    app = Klein()

    def __init__(self, client: LogClient, allowed: set[str], buffer_lines: int = 50_000) -> None:
        self.allowed = allowed
        self.tail = LogTail(client, self.authorize, reactor, buffer_lines=buffer_lines)

    async def authorize(self, request: Any, app: str) -> None:
        if app not in self.allowed:
            raise NotFound(app)

    @app.handle_errors(NotFound)
    def not_found(self, request: Any, failure: Any) -> bytes:
        request.setResponseCode(404)
        return b'{"error": {"code": "not_found", "message": "no such app"}}'

    @app.route("/api/v1/apps/<app_name>/logs", methods=["GET"])
    async def logs(self, request: Any, app_name: str) -> Any:
        return await self.tail.handle(request, app_name)


def serve_tail(client: LogClient, allowed: set[str], buffer_lines: int = 50_000) -> tuple[Any, int]:
    port = reactor.listenTCP(0, Site(TailApp(client, allowed, buffer_lines).app.resource()),
                             interface="127.0.0.1")
    return port, port.getHost().port


class TailClientProtocol(WebSocketClientProtocol):
    def onOpen(self) -> None:
        self.factory.protocol_instance = self

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.received(json.loads(payload))

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        self.factory.closed = (code, reason)


class TailClient(WebSocketClientFactory):
    """A websocket tail client: collects lines with their arrival time."""

    protocol = TailClientProtocol

    def __init__(self, url: str, keep: bool = True) -> None:
        super().__init__(url)
        self.keep = keep  # False: only count lines and record latencies (benchmarks)
        self.count = 0
        self.latencies = array("d")  # arrival - line timestamp, seconds (when not keeping)
        self.lines: list[dict] = []
        self.arrivals: list[float] = []
        self.messages: list[dict] = []
        self.ready: defer.Deferred[dict] = defer.Deferred()
        self.closed: Any = None
        self.protocol_instance: Any = None
        self._waiters: list[tuple[int, defer.Deferred[None]]] = []

    def received(self, msg: dict) -> None:
        if self.keep or msg["type"] != "lines":
            self.messages.append(msg)
        if msg["type"] == "lines":
            now = time.time()
            self.count += len(msg["lines"])
            if self.keep:
                self.lines.extend(msg["lines"])
                self.arrivals.extend([now] * len(msg["lines"]))
            else:
                self.latencies.extend(now - ln["timestamp"] for ln in msg["lines"])
            for n, d in list(self._waiters):
                if self.count >= n:
                    self._waiters.remove((n, d))
                    d.callback(None)
        elif msg["type"] == "ready" and not self.ready.called:
            self.ready.callback(msg)

    def wait_lines(self, n: int, timeout: float) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        if self.count >= n:
            d.callback(None)
            return d
        self._waiters.append((n, d))
        d.addTimeout(timeout, reactor)
        return d


def connect_tail(port: int, app: str, query: str = "n=0", keep: bool = True) -> TailClient:
    f = TailClient(f"ws://127.0.0.1:{port}/api/v1/apps/{app}/logs?{query}", keep)
    connectWS(f)
    return f


async def all_lines(client: LogClient, app: str, filt: LineFilter | None = None) -> list[Line]:
    """Every stored line of ``app``, paging with after=."""
    out: list[Line] = []
    after = 0
    while True:
        lines, _ = await client.query(app, filt or LineFilter(), 10_000, after=after)
        if not lines:
            return out
        out.extend(lines)
        after = lines[-1].id


async def until(pred: Any, timeout: float, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if await pred():
            return
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await task.deferLater(reactor, interval)


def peer(node: LoggerNode) -> LoggerPeer:
    return LoggerPeer(node.router, node.publish)
