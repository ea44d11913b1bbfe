"""The direct-send fast path relies on two FileDescriptor attributes: check them."""

from __future__ import annotations

import socket

from twisted.internet import abstract, tcp
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase

from epio.lb.fastio import fast_write, is_fast


class FastIOTests(SynchronousTestCase):
    def test_buffer_attributes(self) -> None:
        """dataBuffer/_tempDataLen are empty when idle and count buffered writes."""
        fd = abstract.FileDescriptor(reactor=MemoryReactor())
        fd.startWriting = lambda: None  # type: ignore[method-assign]
        fd.connected = 1
        self.assertEqual((fd.dataBuffer, fd._tempDataLen), (b"", 0))
        fd.write(b"abc")
        self.assertEqual(fd._tempDataLen, 3)

    def test_fast_write_sends_now_and_queues_after(self) -> None:
        """With an empty buffer bytes go straight to the socket; once queued, they queue."""
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        a.setblocking(False)
        conn = tcp.Connection(a, Protocol(), reactor=MemoryReactor())
        conn.startWriting = lambda: None  # type: ignore[method-assign]
        conn.connected = 1
        b.settimeout(5)
        self.assertFalse(is_fast(conn))  # a bare Connection is neither Server nor Client
        fast_write(conn, b"hello")
        self.assertEqual(b.recv(10), b"hello")
        conn.write(b"queued")
        fast_write(conn, b"after")
        self.assertEqual(conn._tempDataBuffer, [b"queued", b"after"])
