"""The live tail's websocket classes (:mod:`epio.api.logtail`), apart so that autobahn
is imported with the first live tail, not when the api starts (docs/router.md,
"Memory of an idle node")."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionRequest
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from epio.api.logtail import TailBuffer
from epio.logclient import Line, LineFilter, LogClient


@implementer(IPushProducer)
class TailProtocol(WebSocketServerProtocol):
    """One websocket client following one app's log."""

    log = Logger()
    factory: TailFactory

    def onConnect(self, request: ConnectionRequest) -> str | None:
        # the dashboard authenticates with subprotocols (see epio.api.web._bearer);
        # select only the plain one so the token is never echoed in the response
        return "epio.v1" if "epio.v1" in (request.protocols or []) else None

    def onOpen(self) -> None:
        f = self.factory
        self.buffer = TailBuffer(f.buffer_lines, self._send_json, f.on_missed)
        t: Any = self.transport
        # the HTTP channel was the transport's producer until the upgrade
        if getattr(t, "producer", None) is not None:
            t.unregisterProducer()
        t.registerProducer(self, True)
        self.follower = f.client.follow(f.app, self, f.n, f.filter)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        pass  # nothing to receive: filters are set when connecting

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        follower = getattr(self, "follower", None)
        if follower is not None:
            follower.stop()

    def _send_json(self, msg: dict[str, Any]) -> None:
        if self.state == self.STATE_OPEN:
            self.sendMessage(  # type: ignore[no-untyped-call]  # autobahn is unannotated
                json.dumps(msg, separators=(",", ":")).encode("utf-8"))

    # TailSink
    def lines(self, lines: list[Line]) -> None:
        self.buffer.lines(lines)

    def ready(self, next_id: int) -> None:
        self.buffer.message({"type": "ready", "next": next_id})

    def missed(self, n: int) -> None:
        self.buffer.message({"type": "missed", "count": n})
        if self.factory.on_missed is not None:
            self.factory.on_missed(n)

    def notice(self, text: str) -> None:
        self.buffer.message({"type": "notice", "message": text})

    def error(self, code: str, message: str) -> None:
        self.buffer.message({"type": "error", "code": code, "message": message})
        self.sendClose(1011, message[:100])

    # IPushProducer: the transport says when its send buffer is full / drained
    def pauseProducing(self) -> None:
        self.buffer.pause()

    def resumeProducing(self) -> None:
        self.buffer.resume()

    def stopProducing(self) -> None:
        follower = getattr(self, "follower", None)
        if follower is not None:
            follower.stop()


class TailFactory(WebSocketServerFactory):
    protocol = TailProtocol  # type: ignore[assignment]

    def __init__(self, client: LogClient, app: str, n: int, filt: LineFilter,
                 buffer_lines: int, on_missed: Callable[[int], None] | None) -> None:
        WebSocketServerFactory.__init__(self)
        self.client = client
        self.app = app
        self.n = n
        self.filter = filt
        self.buffer_lines = buffer_lines
        self.on_missed = on_missed
        # keep-alive pings so dead clients are noticed
        WebSocketServerFactory.setProtocolOptions(self, autoPingInterval=30, autoPingTimeout=30)
