"""Unit tests of request body buffering at the router (docs/router.md "Request
bodies") on fakes: the backend is chosen and connected only once the whole body is
in; memory up to body_buffer_size, then a spool file; chunked bodies go on with a
Content-Length; the body deadlines (stall and minimum rate) answer 408; an app that
turned buffering off gets its body streamed, with the stall deadline."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from epio.lb.proxy import C_BODY, C_HEAD
from epio.routing import Backend
from tests.lb.test_proxy import OK, Harness

B = [Backend("10.0.0.1", 8000)]


def post(body: bytes, extra: bytes = b"") -> bytes:
    return (b"POST /up HTTP/1.1\r\nHost: a.example.com\r\nContent-Length: %d\r\n%s\r\n"
            % (len(body), extra)) + body


def spool_files(path: str) -> list[str]:
    """Open files under ``path`` held by this process (the spool files are unlinked,
    so /proc/self/fd is where they show)."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(path):
            out.append(target)
    return out


class BufferingTests(SynchronousTestCase):
    def test_backend_sees_nothing_until_the_body_is_complete(self) -> None:
        """No connect while the body arrives; then one write of head and body with the
        declared length."""
        h = Harness(B)
        c, ct = h.client()
        c.dataReceived(post(b"hello world")[:-6])
        self.assertEqual(c.state, C_BODY)
        self.assertEqual(h.clock.tcpClients, [])
        c.dataReceived(b" world")
        bp, bt, _ = h.accept()
        raw = bt.value()
        self.assertIn(b"\r\nContent-Length: 11\r\n", raw)
        self.assertTrue(raw.endswith(b"\r\n\r\nhello world"))
        bp.dataReceived(OK)
        self.assertTrue(ct.value().startswith(b"HTTP/1.1 200 OK"))
        self.assertEqual(c.state, C_HEAD)

    def test_chunked_body_goes_on_with_content_length(self) -> None:
        """A chunked body is decoded while buffered and forwarded with Content-Length;
        extensions and trailers are dropped."""
        h = Harness(B)
        c, ct = h.client()
        c.dataReceived(b"POST /up HTTP/1.1\r\nHost: a.example.com\r\nTransfer-Encoding: chunked"
                       b"\r\n\r\n3;ext=1\r\nabc\r\n")
        self.assertEqual(h.clock.tcpClients, [])
        c.dataReceived(b"2\r\nde\r\n0\r\nX-Trailer: t\r\n\r\n")
        bp, bt, _ = h.accept()
        raw = bt.value()
        self.assertIn(b"\r\nContent-Length: 5\r\n", raw)
        self.assertNotIn(b"chunked", raw.lower())
        self.assertNotIn(b"X-Trailer", raw)
        self.assertTrue(raw.endswith(b"\r\n\r\nabcde"))

    def test_chunked_body_over_the_limit_is_413(self) -> None:
        """A chunked body that grows past the app's limit is answered 413 and closed,
        and no backend is contacted."""
        h = Harness(B, max_body_size=10)
        c, ct = h.client()
        c.dataReceived(b"POST /up HTTP/1.1\r\nHost: a.example.com\r\nTransfer-Encoding: chunked"
                       b"\r\n\r\n8\r\n12345678\r\n8\r\n12345678\r\n")
        self.assertTrue(ct.value().startswith(b"HTTP/1.1 413"))
        self.assertEqual(h.clock.tcpClients, [])

    def test_large_body_spools_to_a_private_unlinked_file(self) -> None:
        """A body over body_buffer_size goes to a file in the spool directory: mode
        0600, already unlinked, closed once the body was sent; sent to the backend as
        its socket drains."""
        spool = self.mktemp()
        os.mkdir(spool, 0o700)
        h = Harness(B, spool_dir=spool, body_buffer_size=1000)
        body = bytes(range(256)) * 40  # 10,240 bytes
        c, ct = h.client()
        c.dataReceived(post(body)[:-5000])
        self.assertEqual(h.lb.spooled, 1)
        files = spool_files(os.path.abspath(spool))
        self.assertEqual(len(files), 1)
        self.assertTrue(files[0].endswith("(deleted)"), files)
        self.assertEqual(os.listdir(spool), [])
        assert c.body is not None
        sp = c.body.spool
        assert sp is not None
        self.assertEqual(os.fstat(sp.fileno()).st_mode & 0o777, 0o600)
        c.dataReceived(post(body)[-5000:])
        bp, bt, _ = h.accept()
        # a StringTransport takes everything at once: let it ask for more until done
        while c.body is not None and c.body.sender is not None:
            bt.producer.resumeProducing()
        raw = bt.value()
        self.assertIn(b"\r\nContent-Length: 10240\r\n", raw)
        self.assertTrue(raw.endswith(b"\r\n\r\n" + body))
        self.assertEqual(spool_files(os.path.abspath(spool)), [])
        bp.dataReceived(OK)
        self.assertTrue(ct.value().startswith(b"HTTP/1.1 200 OK"))

    def test_spool_closed_when_the_client_goes(self) -> None:
        """A client that hangs up mid-body leaves no spool file open."""
        spool = self.mktemp()
        os.mkdir(spool, 0o700)
        h = Harness(B, spool_dir=spool, body_buffer_size=10)
        c, ct = h.client()
        c.dataReceived(post(b"x" * 100)[:-10])
        self.assertEqual(len(spool_files(os.path.abspath(spool))), 1)
        from tests.lb.test_proxy import lose

        lose(c, ct)
        self.assertEqual(spool_files(os.path.abspath(spool)), [])
        self.assertEqual(h.observer.totals, {"client_closed": 1})

    def test_spool_failure_is_503(self) -> None:
        """When the spool directory is unusable the request gets 503 spool_failed, the
        connection closes and nothing reaches a backend."""
        missing = str(Path(self.mktemp()) / "gone")
        h = Harness(B, spool_dir=missing, body_buffer_size=10)
        c, ct = h.client()
        c.dataReceived(post(b"x" * 100))
        self.assertTrue(ct.value().startswith(b"HTTP/1.1 503"))
        self.assertIn(b"Connection: close", ct.value())
        self.assertEqual(h.clock.tcpClients, [])
        self.assertEqual(h.observer.totals, {"spool_failed": 1})
        self.flushLoggedErrors()

    def test_expect_continue_answered_by_the_router(self) -> None:
        """Expect: 100-continue is answered at once (no backend yet); a declared length
        over the limit is 413 without 100."""
        h = Harness(B, max_body_size=100)
        c, ct = h.client()
        c.dataReceived(b"POST /up HTTP/1.1\r\nHost: a.example.com\r\nContent-Length: 3\r\n"
                       b"Expect: 100-continue\r\n\r\n")
        self.assertEqual(ct.value(), b"HTTP/1.1 100 Continue\r\n\r\n")
        self.assertEqual(h.clock.tcpClients, [])
        c.dataReceived(b"abc")
        bp, bt, _ = h.accept()
        self.assertNotIn(b"expect", bt.value().lower())
        c2, ct2 = h.client()
        c2.dataReceived(b"POST /up HTTP/1.1\r\nHost: a.example.com\r\nContent-Length: 300\r\n"
                        b"Expect: 100-continue\r\n\r\n")
        self.assertTrue(ct2.value().startswith(b"HTTP/1.1 413"))

    def test_pipelined_request_after_a_buffered_body(self) -> None:
        """Bytes after the body are the next request, answered in order."""
        h = Harness(B)
        c, ct = h.client()
        c.dataReceived(post(b"abc") + b"GET /next HTTP/1.1\r\nHost: a.example.com\r\n\r\n")
        bp, bt, _ = h.accept()
        self.assertTrue(bt.value().endswith(b"\r\n\r\nabc"))
        bt.clear()
        bp.dataReceived(OK)
        self.assertTrue(bt.value().startswith(b"GET /next HTTP/1.1"))

    def test_connect_failure_retries_with_the_buffered_body(self) -> None:
        """A refused connect moves the request, body and all, to the next backend."""
        h = Harness([Backend("10.0.0.1", 1), Backend("10.0.0.2", 2)])
        c, ct = h.client()
        c.dataReceived(post(b"payload"))
        h.refuse()
        bp, bt, _ = h.accept()
        self.assertTrue(bt.value().endswith(b"\r\n\r\npayload"))


class BodyDeadlineTests(SynchronousTestCase):
    def test_stalled_body_is_408(self) -> None:
        """A body without a byte for body_timeout gets 408 and the connection closes."""
        h = Harness(B, body_timeout=10, body_min_rate=1)
        c, ct = h.client()
        c.dataReceived(post(b"x" * 100)[:-50])
        h.sweep(9.0)
        self.assertEqual(ct.value(), b"")
        h.sweep(1.5)
        self.assertTrue(ct.value().startswith(b"HTTP/1.1 408"))
        self.assertIn(b"Connection: close", ct.value())
        self.assertEqual(h.clock.tcpClients, [])
        self.assertEqual(h.observer.totals, {"client_timeout": 1})

    def test_crawling_body_is_408(self) -> None:
        """A body sent a byte a second never stalls for body_timeout, but falls under
        body_min_rate: it is cut off at body_timeout + received/body_min_rate."""
        h = Harness(B, body_timeout=10, body_min_rate=100)
        c, ct = h.client()
        c.dataReceived(post(b"x" * 1000)[:-1000])
        for _ in range(12):
            c.dataReceived(b"x")
            h.sweep(1.0)
        # 12 bytes bought 0.12 s: the limit was 10.12 s
        self.assertTrue(ct.value().startswith(b"HTTP/1.1 408"))
        self.assertTrue(ct.disconnecting)

    def test_steady_body_at_the_minimum_rate_completes(self) -> None:
        """A body that keeps above body_min_rate may take longer than body_timeout."""
        h = Harness(B, body_timeout=2, body_min_rate=100)
        c, ct = h.client()
        c.dataReceived(post(b"x" * 3000)[:-3000])
        for _ in range(25):  # 120 bytes a second for 25 s
            c.dataReceived(b"x" * 60)
            h.sweep(0.5)
        assert c.body is not None
        self.assertEqual((ct.value(), c.body.size), (b"", 1500))
        c.dataReceived(b"x" * 1500)
        bp, bt, _ = h.accept()
        self.assertTrue(bt.value().endswith(b"x" * 3000))

    def test_streamed_body_stall_is_408_unless_the_app_is_not_reading(self) -> None:
        """With request_buffering off the body streams to the app; it may not stall for
        body_timeout while the router reads, but the app pausing the upload is not the
        client's fault."""
        h = Harness(B, route={"request_buffering": False}, body_timeout=5)
        c, ct = h.client()
        c.dataReceived(post(b"x" * 100)[:-50])
        bp, bt, _ = h.accept()
        self.assertTrue(bt.value().endswith(b"x" * 50), "streamed as it came")
        c.pauseProducing()  # the backend's buffer is full
        h.sweep(20.0)
        self.assertEqual(ct.value(), b"")
        c.resumeProducing()
        h.sweep(3.0)
        self.assertEqual(ct.value(), b"")
        h.sweep(3.0)
        self.assertTrue(ct.value().startswith(b"HTTP/1.1 408"))
        self.assertTrue(bt.disconnecting or not bt.connected)


class SpoolDirTests(SynchronousTestCase):
    def test_spool_dir_private(self) -> None:
        """The service's spool directory is DATA_DIR/run/tmp, mode 0700."""
        from epio.lb.service import spool_dir

        data = Path(self.mktemp())
        path = spool_dir(data)
        self.assertEqual(path, data / "run" / "tmp")
        self.assertEqual(path.stat().st_mode & 0o777, 0o700)
        self.assertEqual((data / "run").stat().st_mode & 0o777, 0o700)



class FlushFails:
    """A spool file on a full disk: writes land in the page cache, flush fails."""

    def __init__(self, **kw: object) -> None:
        self.closed = False

    def write(self, data: bytes) -> int:
        return len(data)

    def flush(self) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    def close(self) -> None:
        self.closed = True


class SpoolLimitTests(SynchronousTestCase):
    """lb.spool_max_bytes bounds what one router process keeps in spool files."""

    def chunked(self, body: bytes) -> bytes:
        return (b"POST /up HTTP/1.1\r\nHost: a.example.com\r\nTransfer-Encoding: chunked"
                b"\r\n\r\n%x\r\n%s\r\n" % (len(body), body))

    def test_total_limit_is_503_spool_full_and_bytes_come_back(self) -> None:
        """Bodies spool until the process total would pass spool_max_bytes; the one that
        would is answered 503 spool_full with Retry-After and closed, no backend asked;
        the bytes count again once a body was sent or its client went away."""
        spool = self.mktemp()
        os.mkdir(spool, 0o700)
        h = Harness(B, spool_dir=spool, body_buffer_size=10, spool_max_bytes=250)
        a, at = h.client()
        a.dataReceived(post(b"a" * 200)[:-50])  # 150 bytes spooled, body not complete
        self.assertEqual(h.lb.spool_bytes, 150)
        b, bt = h.client()
        b.dataReceived(self.chunked(b"b" * 120))  # 150 + 120 > 250 (chunked path)
        self.assertTrue(bt.value().startswith(b"HTTP/1.1 503"), bt.value())
        self.assertIn(b"\r\nRetry-After: 5\r\n", bt.value())
        self.assertIn(b"Connection: close", bt.value())
        self.assertTrue(bt.disconnecting)
        self.assertEqual(h.lb.spool_bytes, 150)
        self.assertEqual(h.lb.spool_refused, 1)
        self.assertEqual(h.observer.totals, {"spool_full": 1})
        # a's body completes within the limit (200 <= 250)
        a.dataReceived(post(b"a" * 200)[-50:])
        self.assertEqual(h.lb.spool_bytes, 200)
        _, bet, _ = h.accept()
        while a.body is not None and a.body.sender is not None:
            bet.producer.resumeProducing()
        self.assertEqual(h.lb.spool_bytes, 0)  # sent: the file is closed, bytes back
        c, ct = h.client()
        c.dataReceived(post(b"c" * 240)[:-10])
        self.assertEqual(h.lb.spool_bytes, 230)
        from tests.lb.test_proxy import lose

        lose(c, ct)
        self.assertEqual(h.lb.spool_bytes, 0)  # client gone: bytes back
        self.assertEqual(h.clock.tcpClients[1:], [])

    def test_spool_counts_in_metrics(self) -> None:
        """/metrics shows the spooled bytes now and the spool_full refusals."""
        from types import SimpleNamespace

        from epio.lb.service import listener_families
        from epio.listen import ConnectionLimit

        h = Harness(B, spool_dir=None, body_buffer_size=10, spool_max_bytes=100)
        a, _ = h.client()
        a.dataReceived(post(b"a" * 90)[:-10])
        b, _ = h.client()
        b.dataReceived(post(b"b" * 50))
        lim = ConnectionLimit("http", 0)
        fams = {f.name: f.samples[0][2] for f in listener_families(
            SimpleNamespace(lb=h.lb, limit=lim, tls_limit=lim))}  # type: ignore[arg-type]
        self.assertEqual(fams["epio_lb_spool_bytes"], 80.0)
        self.assertEqual(fams["epio_lb_spool_full_total"], 1.0)

    def test_chunked_flush_error_is_503_spool_failed(self) -> None:
        """A spool whose flush fails (disk full) at the end of a chunked body gets a
        clean 503 spool_failed and a close, not an exception out of dataReceived; its
        bytes are given back."""
        h = Harness(B, open_file=FlushFails, body_buffer_size=10)
        c, ct = h.client()
        c.dataReceived(self.chunked(b"x" * 40) + b"0\r\n\r\n")
        self.assertTrue(ct.value().startswith(b"HTTP/1.1 503"), ct.value())
        self.assertIn(b"Connection: close", ct.value())
        self.assertEqual(h.observer.totals, {"spool_failed": 1})
        self.assertEqual(h.clock.tcpClients, [])
        self.assertEqual(h.lb.spool_bytes, 0)
        self.flushLoggedErrors()
