"""The websocket classes of ``epio run`` sessions (:mod:`epio.api.run`), apart so that
autobahn is imported with the first session, not when the api starts (docs/router.md,
"Memory of an idle node")."""

from __future__ import annotations

import json
import uuid
from typing import TYPE_CHECKING, Any

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet.defer import ensureDeferred
from twisted.internet.interfaces import IPushProducer, IReactorTime
from zope.interface import implementer

from epio.api import errors
from epio.api.run import (
    FIRST_MESSAGE_TIMEOUT,
    Bridge,
    RunSessions,
    _log,
    _message,
    check_command,
)

if TYPE_CHECKING:
    from epio.store.records import App, User


@implementer(IPushProducer)
class RunProtocol(WebSocketServerProtocol):
    """One websocket client of one session (see the module doc for the frames)."""

    def onOpen(self) -> None:
        self.bridge: Bridge | None = None
        self.begun = False
        t: Any = self.transport
        if getattr(t, "producer", None) is not None:
            t.unregisterProducer()
        t.registerProducer(self, True)
        f = self.factory
        self._first = f.clock.callLater(FIRST_MESSAGE_TIMEOUT, self._no_start)

    def _no_start(self) -> None:
        if not self.begun:
            self.on_error("bad_request", "no start message")

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if not self.begun:
            self.begun = True
            if self._first.active():
                self._first.cancel()
            try:
                msg = json.loads(payload) if not isBinary else None
            except ValueError:
                msg = None
            if not isinstance(msg, dict):
                self.on_error("bad_request", "the first message must be a JSON object")
                return
            d = ensureDeferred(self._begin(msg))
            d.addErrback(self._begin_failed)
            return
        b = self.bridge
        if b is None:
            return
        if isBinary:
            if payload:
                b.send(data=bytes(payload))
            return
        try:
            msg = json.loads(payload)
        except ValueError:
            return
        if not isinstance(msg, dict):
            return
        kind = msg.get("type")
        if kind == "resize":
            rows, cols = msg.get("rows"), msg.get("cols")
            if isinstance(rows, int) and isinstance(cols, int) and 0 < rows < 10000 \
                    and 0 < cols < 10000:
                b.send(rows=rows, cols=cols)
        elif kind == "eof":
            b.send(eof=True)
        elif kind == "signal" and isinstance(msg.get("name"), str):
            b.send(signal=msg["name"])
        elif kind == "detach":
            self.sendClose(1000, "detached")

    async def _begin(self, msg: dict[str, Any]) -> None:
        f = self.factory
        client = uuid.uuid4().hex
        sessions: RunSessions = f.sessions
        rows = int(msg["rows"]) if isinstance(msg.get("rows"), int) else 24
        cols = int(msg["cols"]) if isinstance(msg.get("cols"), int) else 80
        if f.number is None:
            if msg.get("type") != "start":
                raise errors.BadRequest("the first message must be {\"type\": \"start\"}")
            command = check_command(msg.get("command"))
            tty = bool(msg.get("tty", True))
            term = str(msg["term"]) if isinstance(msg.get("term"), str) else "xterm"
            rec, endpoint = await sessions.start(f.app, f.user, command, tty=tty,
                                                 detach=False, rows=rows, cols=cols,
                                                 term=term, client=client)
            offset, seq = 0, 0
        else:
            from epio.store.runs import get_run

            if msg.get("type") != "attach":
                raise errors.BadRequest("the first message must be {\"type\": \"attach\"}")
            rec = await get_run(sessions.store, f.app.name, f.number)
            if rec.state not in ("starting", "running"):
                raise errors.Conflict(f"run.{rec.number} has ended ({rec.state})",
                                      code="session_ended")
            endpoint = await sessions.endpoint_of(rec.node)
            reply = await sessions.control.request(
                endpoint, "run.attach", {"session_id": rec.id, "client": client,
                                         "rows": rows, "cols": cols},
                timeout=sessions.settings.runner_timeout)
            offset, seq, tty = int(reply["offset"]), int(reply["seq"]), bool(reply["tty"])
        if self.state != self.STATE_OPEN:
            # the client left while the session started: it stays detached
            await sessions.control.request(endpoint, "run.detach",
                                           {"session_id": rec.id, "client": client},
                                           timeout=sessions.settings.runner_timeout)
            return
        self._json({"type": "session", "id": rec.id, "number": rec.number,
                    "node": rec.node, "tty": tty, "command": rec.command})
        self.bridge = Bridge(sessions.control, endpoint, rec.id, client, f.clock,
                             sessions.settings, self)
        self.bridge.start(offset, seq)

    def _begin_failed(self, failure: Any) -> None:
        err = errors.to_api_error(failure.value)
        if err is None:
            code = getattr(failure.value, "code", None)
            if code is not None:
                err = errors.ApiError(_message(failure.value), code=str(code))
            else:
                _log.failure("starting a run session failed", failure)
                err = errors.INTERNAL
        self.on_error(err.code, err.message)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        first = getattr(self, "_first", None)
        if first is not None and first.active():
            first.cancel()
        b = getattr(self, "bridge", None)
        if b is not None:
            b.close()

    def _json(self, msg: dict[str, Any]) -> None:
        if self.state == self.STATE_OPEN:
            self.sendMessage(  # type: ignore[no-untyped-call]  # autobahn is unannotated
                json.dumps(msg, separators=(",", ":")).encode("utf-8"))

    # BridgeSink
    def on_output(self, fd: int, data: bytes) -> None:
        if self.state == self.STATE_OPEN:
            self.sendMessage(  # type: ignore[no-untyped-call]  # autobahn is unannotated
                bytes([fd]) + data, isBinary=True)

    def on_exit(self, status: int | None, signal: str | None, reason: str | None) -> None:
        self._json({"type": "exit", "status": status, "signal": signal, "reason": reason})
        if self.state == self.STATE_OPEN:
            self.sendClose(1000, "exited")

    def on_error(self, code: str, message: str) -> None:
        self._json({"type": "error", "code": code, "message": message})
        if self.state == self.STATE_OPEN:
            self.sendClose(1000, code[:100])

    def pause_input(self) -> None:
        t: Any = self.transport
        t.pauseProducing()

    def resume_input(self) -> None:
        t: Any = self.transport
        t.resumeProducing()

    # IPushProducer: the transport's send buffer is full / drained
    def pauseProducing(self) -> None:
        b = getattr(self, "bridge", None)
        if b is not None:
            b.pause()

    def resumeProducing(self) -> None:
        b = getattr(self, "bridge", None)
        if b is not None:
            b.resume()

    def stopProducing(self) -> None:
        pass


class RunFactory(WebSocketServerFactory):
    protocol = RunProtocol

    def __init__(self, sessions: RunSessions, app: App, user: User, number: int | None,
                 clock: IReactorTime) -> None:
        WebSocketServerFactory.__init__(self)
        self.sessions = sessions
        self.app = app
        self.user = user
        self.number = number
        self.clock = clock
        WebSocketServerFactory.setProtocolOptions(self, autoPingInterval=30, autoPingTimeout=30)


def websocket_resource(sessions: RunSessions, app: App, user: User,
                       number: int | None) -> WebSocketResource:
    return WebSocketResource(RunFactory(sessions, app, user, number, sessions.clock))


