"""epio.listen on fakes and in a subprocess: the connection cap pauses and resumes the
ports it watches, the backlog goes into endpoint strings, the open-files limit is
raised to the hard limit."""

from __future__ import annotations

import json
import resource
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from epio.listen import ConnectionLimit, effective_backlog, with_backlog
from tests.util import epio_env


class FakePort:
    def __init__(self) -> None:
        self.reading = True
        self.connected = True

    def stopReading(self) -> None:
        self.reading = False

    def startReading(self) -> None:
        self.reading = True


class ConnectionLimitTests(SynchronousTestCase):
    def test_pause_at_the_limit_and_resume_below(self) -> None:
        """At max_connections every watched port stops accepting; one closed connection
        resumes them; a connection built past the limit is refused."""
        limit = ConnectionLimit("t", 2)
        a, b = FakePort(), FakePort()
        limit.watch(a)
        limit.watch(b)
        self.assertTrue(limit.opened())
        self.assertTrue(a.reading and b.reading)
        self.assertTrue(limit.opened())
        self.assertFalse(a.reading or b.reading)
        self.assertFalse(limit.opened(), "past the limit (same accept batch): refused")
        self.assertEqual((limit.open, limit.refused, limit.pauses), (2, 1, 1))
        limit.closed()
        self.assertTrue(a.reading and b.reading)
        b.connected = False  # stopped listening meanwhile: never restarted
        b.reading = False
        limit.opened()
        limit.closed()
        self.assertFalse(b.reading)

    def test_zero_is_no_limit(self) -> None:
        """max_connections = 0 never pauses."""
        limit = ConnectionLimit("t", 0)
        port = FakePort()
        limit.watch(port)
        for _ in range(10000):
            self.assertTrue(limit.opened())
        self.assertTrue(port.reading)


class BacklogTests(SynchronousTestCase):
    def test_with_backlog(self) -> None:
        """tcp/tcp6/unix/ssl endpoints get backlog=N unless they name one."""
        self.assertEqual(with_backlog("tcp:8080:interface=127.0.0.1", 4096),
                         "tcp:8080:interface=127.0.0.1:backlog=4096")
        self.assertEqual(with_backlog("tcp6:8080", 10), "tcp6:8080:backlog=10")
        self.assertEqual(with_backlog("unix:/run/x.sock", 10), "unix:/run/x.sock:backlog=10")
        self.assertEqual(with_backlog("tcp:8080:backlog=99", 4096), "tcp:8080:backlog=99")
        self.assertEqual(with_backlog("systemd:domain=INET:index=0", 10),
                         "systemd:domain=INET:index=0")

    def test_capped_by_somaxconn(self) -> None:
        """The backlog the kernel uses is at most net.core.somaxconn."""
        cap = int(open("/proc/sys/net/core/somaxconn").read())
        self.assertEqual(effective_backlog(cap + 1000), (cap, cap))
        self.assertEqual(effective_backlog(1), (1, cap))


class NofileTests(SynchronousTestCase):
    def test_raised_to_the_hard_limit(self) -> None:
        """A process started with a soft limit of 256 ends up at the hard limit."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and hard <= 256:
            self.skipTest(f"hard limit {hard} leaves nothing to raise")
        code = ("import json, resource; from epio.listen import raise_nofile_limit; "
                "print(json.dumps([*raise_nofile_limit(), "
                "resource.getrlimit(resource.RLIMIT_NOFILE)[0]]))")
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=epio_env(),
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)),
            check=True).stdout
        before, after, got_hard, now = json.loads(out)
        self.assertEqual((before, got_hard), (256, hard))
        self.assertEqual(after, now)
        self.assertGreater(after, 256)
