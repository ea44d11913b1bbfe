"""Two nodes on one host with the same bus port: the second fails fast (issue 20)."""

from __future__ import annotations

import socket
import time

from twisted.trial.unittest import SynchronousTestCase

from tests.util import NodeProcess, isolated_config, to_toml


class PortConflictTests(SynchronousTestCase):
    def test_second_node_with_the_same_bus_port_exits_at_once(self) -> None:
        """A --role=all node is running; a second --role=all node (its own data dir and
        other ports) whose nexus.heartbeat_bind is the first node's exits non-zero
        within a few seconds with one sentence naming the port and the key to
        change, without starting any role; the first node keeps serving."""
        doc_a, _ = isolated_config()
        a = NodeProcess(["--role=all"], config=to_toml(doc_a))
        self.addCleanup(a.cleanup)
        a.wait_for_log("router listening on", timeout=60)
        bus = str(doc_a["nexus"]["heartbeat_bind"])
        port = int(bus.rsplit(":", 1)[1])
        doc_b, _ = isolated_config()
        doc_b["nexus"]["heartbeat_bind"] = bus
        t0 = time.monotonic()
        b = NodeProcess(["--role=all"], config=to_toml(doc_b))
        self.addCleanup(b.cleanup)
        code = b.proc.wait(timeout=30)
        took = time.monotonic() - t0
        out = b.output()
        self.assertNotEqual(code, 0, out)
        self.assertLess(took, 15, out)  # the interpreter and imports, no retrying
        self.assertIn(f"cannot listen on port {port} (nexus.heartbeat_bind = {bus!r}): "
                      "Address already in use", out)
        self.assertIn("set nexus.heartbeat_bind to a free port", out)
        self.assertNotIn("service runner started", out)
        self.assertNotIn("Traceback", out)
        # the first node is unaffected: still running, its api still answers
        self.assertIsNone(a.proc.poll(), a.output())
        api_port = int(str(doc_a["api"]["listen"]).split(":")[1])
        with socket.create_connection(("127.0.0.1", api_port), timeout=5) as s:
            s.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
            self.assertTrue(s.recv(100).startswith(b"HTTP/1."))
        self.assertNotIn("cannot bind", a.output())
