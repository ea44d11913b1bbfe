"""The direct-send fast path relies on two FileDescriptor attributes: check them."""

from __future__ import annotations

import socket

from twisted.internet import abstract, main, tcp
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


class _Recorder(Protocol):
    def __init__(self) -> None:
        self.got: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.got.append(data)


def _transport(sock: socket.socket) -> tcp.Connection:
    """A real Twisted TCP connection on ``sock`` (what ReadMux reads from inline)."""
    conn = tcp.Connection(sock, _Recorder(), reactor=MemoryReactor())
    conn.stopReading = lambda: None  # type: ignore[method-assign]
    conn.connected = 1
    return conn


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
        ts = [_transport(a) for a, _ in pairs]
        fds = [mux.adopt(t) for t in ts]
        for i, (_, b) in enumerate(pairs):
            b.send(b"m%d" % i)
        mux.pause(fds[1])
        mux.doRead()
        self.assertEqual([t.protocol.got for t in ts], [[b"m0"], [], [b"m2"]])
        pairs[1][1].close()  # hang up while paused: no read, no spin
        mux.doRead()
        self.assertEqual(ts[1].protocol.got, [])
        mux.resume(fds[1])
        mux.doRead()
        self.assertEqual(ts[1].protocol.got, [b"m1"])
        mux.doRead()
        self.assertEqual(r.lost, [(ts[1], main.CONNECTION_DONE)])
        self.assertNotIn(fds[1], mux.conns)
        mux.stop()
        self.assertEqual(r.readers, [])

    def test_read_error_and_protocol_failure_disconnect(self) -> None:
        """A reset connection (recv error) is CONNECTION_LOST; an exception in
        dataReceived is logged and disconnects that connection only; the others are
        read in the same pass."""
        import struct

        from epio.lb.fastio import ReadMux

        r = _Reactor()
        mux = ReadMux(r)
        pairs = [socket.socketpair() for _ in range(2)]
        # a real TCP connection whose peer resets it: recv raises ECONNRESET
        lsn = socket.create_server(("127.0.0.1", 0))
        peer = socket.create_connection(lsn.getsockname())
        srv, _ = lsn.accept()
        lsn.close()
        pairs.append((srv, peer))
        for a, b in pairs:
            self.addCleanup(a.close)
            self.addCleanup(b.close)
            a.setblocking(False)
        ts = [_transport(a) for a, _ in pairs]
        for t in ts:
            mux.adopt(t)

        def boom(data: bytes) -> None:
            raise ValueError("protocol bug")

        ts[0].protocol.dataReceived = boom  # type: ignore[method-assign]
        pairs[0][1].send(b"x")
        pairs[1][1].send(b"y")
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.close()  # RST
        mux.doRead()
        self.assertEqual(ts[1].protocol.got, [b"y"])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        lost = dict((id(t), why) for t, why in r.lost)
        self.assertEqual(set(lost), {id(ts[0]), id(ts[2])})
        self.assertIsInstance(lost[id(ts[0])], ValueError)
        self.assertIs(lost[id(ts[2])], main.CONNECTION_LOST)
        self.assertEqual(ts[2].protocol.got, [])
        self.assertEqual(set(mux.conns), {ts[1].fileno()})
