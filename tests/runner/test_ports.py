"""What the runner reads of a process's listening sockets (/proc), for boot failures."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from epio.runner.ports import covers, listening_ports, process_tree


class ListeningPortsTests(SynchronousTestCase):
    def test_listening_sockets_of_a_process_tree(self) -> None:
        """A child process's listening IPv4 and IPv6 sockets are found through its parent's
        process tree; a connected (not listening) socket and other processes' are not."""
        code = ("import socket, sys, time\n"
                "a = socket.socket(); a.bind(('127.0.0.1', 0)); a.listen()\n"
                "b = socket.socket(socket.AF_INET6); b.bind(('::1', 0)); b.listen()\n"
                "print(a.getsockname()[1], b.getsockname()[1], flush=True)\n"
                "time.sleep(30)\n")
        shell = subprocess.Popen(["/bin/sh", "-c", f"{sys.executable} -c \"$0\"; true", code],
                                 stdout=subprocess.PIPE, text=True)
        self.addCleanup(shell.wait)
        self.addCleanup(lambda: [os.kill(p, 9) for p in process_tree([shell.pid])
                                 if p != shell.pid])
        assert shell.stdout is not None
        v4, v6 = (int(p) for p in shell.stdout.readline().split())
        mine = socket.socket()
        mine.bind(("127.0.0.1", 0))
        mine.listen()
        self.addCleanup(mine.close)
        tree = process_tree([shell.pid])
        self.assertIn(shell.pid, tree)
        self.assertGreater(len(tree), 1)
        self.assertEqual(listening_ports(tree), sorted([v4, v6]))
        self.assertIn(mine.getsockname()[1], listening_ports([os.getpid()]))
        self.assertEqual(listening_ports([2 ** 22 + 1]), [])

    def test_only_sockets_that_take_the_hosts_connections(self) -> None:
        """With a host, a port counts only on a socket that takes connections to that
        address: the wildcard (IPv4 or IPv6) or the address itself.  One on 127.0.0.1
        leaves the host's other addresses to whoever binds them (a squatter answering
        the health check there must not make the instance healthy)."""
        socks = []
        for family, addr in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET, "0.0.0.0"),
                             (socket.AF_INET6, "::"), (socket.AF_INET6, "::1")):
            s = socket.socket(family)
            s.bind((addr, 0))
            s.listen()
            self.addCleanup(s.close)
            socks.append(s.getsockname()[1])
        lo4, any4, any6, lo6 = socks
        mine = listening_ports([os.getpid()], host="10.1.2.3")
        self.assertNotIn(lo4, mine)
        self.assertNotIn(lo6, mine)
        self.assertIn(any4, mine)
        self.assertIn(any6, mine)
        local = listening_ports([os.getpid()], host="127.0.0.1")
        self.assertIn(lo4, local)
        self.assertIn(any4, local)
        self.assertTrue(covers("::ffff:10.1.2.3", "10.1.2.3"))
        self.assertTrue(covers("::1", "::1"))
        self.assertFalse(covers("10.1.2.4", "10.1.2.3"))
