"""Write straight to the socket when Twisted's write buffer is empty.

Twisted's ``FileDescriptor.write`` always buffers and registers the socket for
write readiness, so every response costs an extra epoll round trip
(``epoll_ctl`` add, ``epoll_wait``, ``send``, ``epoll_ctl`` remove).  With an
empty buffer a direct non-blocking ``send`` almost always takes everything; what
it does not take goes through the normal buffered path, so ordering, producer
pausing and error handling stay Twisted's.  Only plain TCP transports qualify
(TLS goes through its own memory BIO).

This reads two attributes of ``twisted.internet.abstract.FileDescriptor``
(``dataBuffer``, ``_tempDataLen``); Twisted is pinned and
``tests/lb/test_fastio.py`` checks the assumption.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp
from twisted.internet.main import CONNECTION_DONE, CONNECTION_LOST
from twisted.logger import Logger
from twisted.python.failure import Failure

FAST_TYPES = (tcp.Server, tcp.Client)


def is_fast(transport: Any) -> bool:
    return type(transport) in FAST_TYPES


def fast_write(t: Any, data: bytes) -> None:
    """Send ``data`` on TCP transport ``t`` now if nothing is queued before it."""
    if t.dataBuffer or t._tempDataLen or t.disconnecting or not t.connected:
        t.write(data)
        return
    try:
        n = t.socket.send(data)
    except BlockingIOError:
        n = 0
    except OSError:
        # let Twisted's own write path notice and report the broken connection
        t.write(data)
        return
    if n < len(data):
        t.write(data[n:])


class ReadMux:
    """The read side of the router's plain-TCP connections, on an epoll of its own.

    Twisted wraps every readable socket's ``doRead`` in ``log.callWithLogger``
    and context tracking (~2.5 µs per event, two events per proxied request).
    The router instead takes its connections out of the reactor's read set and
    puts them in this epoll, whose own descriptor is one reader of the reactor:
    one wrapped call per reactor wake-up, then a plain loop that does what
    ``tcp.Connection.doRead`` does, inline: ``recv(bufferSize)``, ``EWOULDBLOCK`` is
    nothing, another error is ``CONNECTION_LOST``, no bytes is ``CONNECTION_DONE``,
    else ``protocol.dataReceived`` (two Python calls fewer per read than calling
    ``doRead``; the Twisted version is pinned and ``tests/lb/test_fastio.py`` runs it
    on real ``tcp.Connection`` objects).  Writing, closing and connection loss stay
    Twisted's.  Paused connections are taken out of the epoll altogether (no
    level-triggered HUP spinning).
    """

    log = Logger()

    def __init__(self, reactor: Any) -> None:
        import select

        self.reactor = reactor
        self.ep = select.epoll()
        self.conns: dict[int, Any] = {}
        self.paused: set[int] = set()
        self._in = select.EPOLLIN
        self.started = False

    # IReadDescriptor
    def fileno(self) -> int:
        return self.ep.fileno()

    def logPrefix(self) -> str:
        return "lb-read-mux"

    def connectionLost(self, reason: Failure) -> None:
        pass

    def start(self) -> None:
        if not self.started:
            self.started = True
            self.reactor.addReader(self)

    def stop(self) -> None:
        if self.started:
            self.started = False
            self.reactor.removeReader(self)

    def adopt(self, t: Any) -> int:
        """Move ``t``'s reading here; returns its fd (the key for the calls below)."""
        fd: int = t.fileno()
        t.stopReading()
        self.conns[fd] = t
        self.ep.register(fd, self._in)
        return fd

    def pause(self, fd: int) -> None:
        if fd in self.conns and fd not in self.paused:
            self.paused.add(fd)
            try:
                self.ep.unregister(fd)
            except OSError:
                pass

    def resume(self, fd: int) -> None:
        if fd in self.paused:
            self.paused.discard(fd)
            try:
                self.ep.register(fd, self._in)
            except OSError:
                pass

    def drop(self, fd: int) -> None:
        if self.conns.pop(fd, None) is not None and fd not in self.paused:
            try:
                self.ep.unregister(fd)
            except (OSError, ValueError):
                pass
        self.paused.discard(fd)

    def doRead(self) -> None:
        conns = self.conns
        paused = self.paused
        for fd, _ in self.ep.poll(0, 512):
            t = conns.get(fd)
            if t is None or fd in paused:
                continue
            try:
                data = t.socket.recv(t.bufferSize)
            except BlockingIOError:
                continue
            except OSError:
                why: Any = CONNECTION_LOST
            else:
                if not data:
                    why = CONNECTION_DONE
                else:
                    try:
                        t.protocol.dataReceived(data)
                        continue
                    except BaseException as e:
                        self.log.failure("router connection read failed")
                        why = e
            self.drop(fd)
            self.reactor._disconnectSelectable(t, why, True)
        return None
