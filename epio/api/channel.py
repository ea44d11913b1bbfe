"""The api listener's HTTP channel: twisted.web's, with request deadlines.

twisted.web's :class:`~twisted.web.http.HTTPChannel` only has an idle timeout
(reset by every byte, 12 hours by default), so a client sending a header line or a
body byte now and then holds a connection for ever.  :class:`DeadlineChannel` adds
the router's two deadlines (docs/router.md, docs/api.md):

- a request head must be complete within ``header_timeout`` seconds of its first
  byte;
- a request body may go at most ``body_timeout`` seconds without a byte, and must
  average at least ``body_min_rate`` bytes a second after a grace of
  ``body_timeout`` (each byte received buys ``1/body_min_rate`` s more).

Either miss is answered ``408`` (JSON, the api's error shape) and the connection
closed.  While a request is being handled (and for an upgraded websocket) no
deadline runs: those are the handler's business.
"""

from __future__ import annotations

import json
from typing import Any

from attrs import frozen
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.iweb import IRequest

IDLE, HEAD, BODY, DONE = range(4)


@frozen
class Deadlines:
    """``api.header_timeout``, ``api.body_timeout``, ``api.body_min_rate``."""

    header_timeout: float = 10.0
    body_timeout: float = 10.0
    body_min_rate: int = 1024


def _timeout_response(what: str) -> bytes:
    body = json.dumps({"error": {"code": "request_timeout",
                                 "message": f"the request {what} was not received in time"}}
                      ).encode() + b"\n"
    return (b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
            b"Cache-Control: no-store\r\nConnection: close\r\nContent-Length: %d\r\n\r\n"
            % len(body)) + body


class DeadlineChannel(HTTPChannel):
    """An HTTPChannel whose factory (a Site) has ``deadlines`` and ``reactor``."""

    log = Logger()
    factory: Any
    _phase = IDLE
    _timer: Any = None
    _t0 = 0.0
    _last = 0.0
    _got = 0

    def _now(self) -> float:
        return float(self.factory.reactor.seconds())

    def _arm(self, at: float) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = self.factory.reactor.callLater(max(0.0, at - self._now()), self._expire)

    def _disarm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _start_head(self) -> None:
        self._phase = HEAD
        self._arm(self._now() + self.factory.deadlines.header_timeout)

    def _expire(self) -> None:
        self._timer = None
        d = self.factory.deadlines
        if self._phase == HEAD:
            what = "head"
        elif self._phase == BODY:
            limit = min(self._t0 + d.body_timeout + self._got / d.body_min_rate,
                        self._last + d.body_timeout)
            if self._now() < limit:
                self._arm(limit)
                return
            what = "body"
        else:
            return
        self._phase = DONE
        transport: Any = self.transport
        if transport is None:
            return
        peer = transport.getPeer()
        self.log.info("api: request {what} from {peer} not received in time (408)",
                      what=what, peer=getattr(peer, "host", str(peer)))
        transport.write(_timeout_response(what))
        transport.loseConnection()

    # -- HTTPChannel hooks ----------------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:
        phase = self._phase
        if phase == DONE:
            return
        if phase == BODY:
            self._got += len(data)
            self._last = self._now()
        elif phase == IDLE and not self._handlingRequest and data.strip(b"\r\n"):
            self._start_head()
        HTTPChannel.dataReceived(self, data)

    def lineReceived(self, line: bytes) -> None:
        if self._phase == IDLE and not self._handlingRequest:
            self._start_head()  # a pipelined head replayed from the channel's buffer
        HTTPChannel.lineReceived(self, line)

    def allHeadersReceived(self) -> None:
        if self.length != 0:  # a body follows (None: chunked)
            self._phase = BODY
            self._t0 = self._last = self._now()
            self._got = 0
            self._arm(self._t0 + self.factory.deadlines.body_timeout)
        else:
            self._phase = IDLE
            self._disarm()
        HTTPChannel.allHeadersReceived(self)

    def allContentReceived(self) -> None:
        self._phase = IDLE
        self._disarm()
        HTTPChannel.allContentReceived(self)

    def requestDone(self, request: IRequest) -> None:
        HTTPChannel.requestDone(self, request)
        # bytes of a next head left over from the replay of pipelined data
        buffered: Any = self.__dict__.get("_buffer", b"")
        if self._phase == IDLE and not self._handlingRequest and buffered:
            self._start_head()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._phase = DONE
        self._disarm()
        limit = getattr(self.factory, "limit", None)
        if limit is not None:
            limit.closed()
        HTTPChannel.connectionLost(self, reason)
