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
