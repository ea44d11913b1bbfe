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


class _Reactor:
    """Just what ReadMux calls on a reactor."""

    def __init__(self) -> None:
        self.readers: list[object] = []
        self.lost: list[tuple[object, object]] = []

    def addReader(self, r: object) -> None:
        self.readers.append(r)

    def removeReader(self, r: object) -> None:
        self.readers.remove(r)

    def _disconnectSelectable(self, t: object, why: object, is_read: bool) -> None:
        self.lost.append((t, why))


class _Transport:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.got: list[bytes] = []
        self.stopped = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def stopReading(self) -> None:
        self.stopped = True

    def doRead(self) -> object:
        data = self.sock.recv(65536)
        if not data:
            return "done"
        self.got.append(data)
        return None


class ReadMuxTests(SynchronousTestCase):
    def test_dispatch_pause_resume_and_eof(self) -> None:
        """Ready sockets are read in one pass; paused ones are not read (even after the
        peer hangs up) until resumed; EOF disconnects and forgets the socket."""
        from epio.lb.fastio import ReadMux

        r = _Reactor()
        mux = ReadMux(r)
        mux.start()
        self.assertEqual(r.readers, [mux])
        pairs = [socket.socketpair() for _ in range(3)]
        for a, b in pairs:
            self.addCleanup(a.close)
            self.addCleanup(b.close)
            a.setblocking(False)
        ts = [_Transport(a) for a, _ in pairs]
        fds = [mux.adopt(t) for t in ts]
        self.assertTrue(all(t.stopped for t in ts))
        for i, (_, b) in enumerate(pairs):
            b.send(b"m%d" % i)
        mux.pause(fds[1])
        mux.doRead()
        self.assertEqual([t.got for t in ts], [[b"m0"], [], [b"m2"]])
        pairs[1][1].close()  # hang up while paused: no read, no spin
        mux.doRead()
        self.assertEqual(ts[1].got, [])
        mux.resume(fds[1])
        mux.doRead()
        self.assertEqual(ts[1].got, [b"m1"])
        mux.doRead()
        self.assertEqual(r.lost, [(ts[1], "done")])
        self.assertNotIn(fds[1], mux.conns)
        mux.stop()
        self.assertEqual(r.readers, [])
