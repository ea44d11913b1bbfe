"""The client-affinity program of ``lb.tls_affinity`` in the kernel (epio.lb.affinity).

Real listening sockets in one ``SO_REUSEPORT`` group on loopback, the program attached
to one of them: every connection from one client address is accepted by the same
socket, whatever its source port; addresses are spread by ``address mod n``; IPv4
clients of a dual-stack IPv6 group are chosen by their IPv4 address.
"""

from __future__ import annotations

import select
import socket

from twisted.trial.unittest import SynchronousTestCase

from epio.lb.affinity import attach_client_affinity, client_program


class AffinityTests(SynchronousTestCase):
    def group(self, family: socket.AddressFamily, host: str, n: int) -> list[socket.socket]:
        socks: list[socket.socket] = []
        port = 0
        for _ in range(n):
            s = socket.socket(family, socket.SOCK_STREAM)
            self.addCleanup(s.close)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.bind((host, port))
            port = s.getsockname()[1]
            s.listen(16)
            s.setblocking(False)
            socks.append(s)
        attach_client_affinity(socks[0], n)
        return socks

    def accepted_by(self, socks: list[socket.socket], family: socket.AddressFamily,
                    source: str, target: str, times: int = 6) -> list[int]:
        """Which socket of the group accepted each of ``times`` connections from
        ``source``."""
        port = socks[0].getsockname()[1]
        out = []
        for _ in range(times):
            with socket.socket(family, socket.SOCK_STREAM) as c:
                c.bind((source, 0))
                c.connect((target, port))
                ready, _, _ = select.select(socks, [], [], 5)
                self.assertEqual(len(ready), 1)
                conn, _ = ready[0].accept()
                conn.close()
                out.append(socks.index(ready[0]))
        return out

    def test_ipv4_clients_stick_to_one_socket(self) -> None:
        """Each client address always meets the same socket, address mod n."""
        for n in (2, 3):
            socks = self.group(socket.AF_INET, "127.0.0.1", n)
            for last in (1, 2, 3, 4):
                source = f"127.0.0.{last}"
                expect = (0x7F000000 + last) % n
                self.assertEqual(self.accepted_by(socks, socket.AF_INET, source, "127.0.0.1"),
                                 [expect] * 6, f"{source}, n={n}")

    def test_dual_stack_group(self) -> None:
        """In an IPv6 group, ::1 sticks to one socket (its first 64 bits: 0 -> socket 0)
        and IPv4 clients are chosen by their IPv4 address."""
        if not socket.has_ipv6:
            self.skipTest("no IPv6")
        try:
            socks = self.group(socket.AF_INET6, "::", 2)
        except OSError as e:
            self.skipTest(f"no IPv6 listener here: {e}")
        self.assertEqual(self.accepted_by(socks, socket.AF_INET6, "::1", "::1"), [0] * 6)
        self.assertEqual(self.accepted_by(socks, socket.AF_INET, "127.0.0.1", "127.0.0.1"),
                         [1] * 6)
        self.assertEqual(self.accepted_by(socks, socket.AF_INET, "127.0.0.2", "127.0.0.1"),
                         [0] * 6)

    def test_program_shape(self) -> None:
        """Eleven instructions of eight bytes; n must be positive."""
        self.assertEqual(len(client_program(4)), 11 * 8)
        self.assertRaises(ValueError, client_program, 0)
