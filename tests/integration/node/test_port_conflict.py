"""Two nodes on one host with the same bus port: the second fails fast (issue 20)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import tempfile
import time
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.util import NodeProcess, free_port, isolated_config, to_toml


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
        code = b.proc.wait(timeout=60)  # before, it never exited: it retried the bind
        took = time.monotonic() - t0
        out = b.output()
        self.assertNotEqual(code, 0, out)
        self.assertLess(took, 30, out)  # the interpreter and imports (a loaded machine)
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


def ipv6_only_listener() -> socket.socket | None:
    """A TCP socket listening on [::]:PORT for IPv6 only (None without IPv6): another
    program's, on a port the node's pre-start check (IPv4, as Twisted listens) passes
    but a bus socket (dual-stack, ZMQ_IPV6) cannot bind."""
    if not socket.has_ipv6:
        return None
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind(("::", free_port()))
        s.listen(1)
    except OSError:
        s.close()
        return None
    return s


class BindFailsAfterCheckTests(SynchronousTestCase):
    def test_bus_port_taken_after_the_check_stops_the_whole_node(self) -> None:
        """A --role=all node whose runner.control_bind (tcp://*:PORT) passes the
        pre-start check but cannot be bound when the runner starts -- another program
        listens IPv6-only there, which the IPv4 check cannot see and the dual-stack bus
        socket collides with -- stops: exit status 1, one line naming the port, the
        role and the key; the roles after it never start, the ones before are stopped
        (the runner's fence removed) and not one port of the node is left listening."""
        from epio.config import validate
        from epio.listen import node_listeners, try_bind

        other = ipv6_only_listener()
        if other is None:
            self.skipTest("no IPv6 on this host")
        self.addCleanup(other.close)
        port = other.getsockname()[1]
        bind = f"tcp://*:{port}"
        doc, _ = isolated_config({"runner": {"control_bind": bind}})
        t0 = time.monotonic()
        node = NodeProcess(["--role=all"], config=to_toml(doc))
        self.addCleanup(node.cleanup)
        code = node.proc.wait(timeout=90)
        took = time.monotonic() - t0
        out = node.output()
        self.assertEqual(code, 1, out)
        self.assertIn("starting roles", out)  # the pre-start check passed
        line = (f"epio: the node stops: the runner role cannot listen on port {port} "
                f"(runner.control_bind = {bind!r}): Address already in use (another node "
                f"or program on this host listens there); stop that program or set "
                f"runner.control_bind to a free port")
        self.assertIn(line, out)
        for role in ("nexus", "logger"):  # started before the runner, then stopped
            self.assertIn(f"service {role} started", out)
        for role in ("runner", "lb", "api", "backup"):
            self.assertNotIn(f"service {role} started", out)
        self.assertNotIn("Traceback", out)
        if "network fence ON" in out:
            self.assertIn("network fence removed", out)
        settings = validate(doc).settings
        for ln in node_listeners(settings, ["all"]):
            if ln.target.port != port:  # no role kept a port: each binds again
                try_bind(ln.target.host, ln.target.port)
        api = int(str(doc["api"]["listen"]).split(":")[1])
        try_bind("127.0.0.1", api)
        print(f"\n[port taken after the check] exit {code} after {took:.1f}s: "
              f"{line[:90]}...", flush=True)


    def test_api_port_taken_after_the_check_stops_the_node(self) -> None:
        """The api listens as twistd's privileged start begins: an api.listen of
        tcp6:PORT passes the (IPv4) check but collides with an IPv6-only listener; the
        node stops there, exit 1, one line naming port, role and key, no role started
        and no traceback (its /metrics listener, never started, is not stopped)."""
        other = ipv6_only_listener()
        if other is None:
            self.skipTest("no IPv6 on this host")
        self.addCleanup(other.close)
        port = other.getsockname()[1]
        doc, _ = isolated_config({"api": {"listen": f"tcp6:{port}"},
                                  "metrics": {"listen": f"tcp:{free_port()}:interface=127.0.0.1"}})
        node = NodeProcess(["--role=api"], config=to_toml(doc))
        self.addCleanup(node.cleanup)
        code = node.proc.wait(timeout=60)
        out = node.output()
        self.assertEqual(code, 1, out)
        self.assertIn(f"epio: the node stops: the api role cannot listen on port {port} "
                      f"(api.listen = 'tcp6:{port}'): Address already in use", out)
        self.assertNotIn("service api started", out)
        self.assertNotIn("Traceback", out)


class RangeConflictTests(SynchronousTestCase):
    def test_second_runner_of_this_host_with_overlapping_uids_exits(self) -> None:
        """A --role=all node runs with a store; a runner-only node of the same store on
        this host (its own data dir and control port) with an overlapping
        runner.uid_min/uid_max exits 1 with one sentence naming both ranges and the keys
        and removes its fence table; with disjoint UID and port ranges the same runner
        starts, registers and stays up."""
        tmp = Path(tempfile.mkdtemp(prefix="epio-ranges-"))
        os.chmod(tmp, 0o711)
        self.addCleanup(shutil.rmtree, tmp, True)
        store = f"sqlite:///{tmp}/store.sqlite3"
        doc_a, _ = isolated_config({"store": {"url": store}, "node": {"id": "a"},
                                    "runner": {"uid_min": 40000, "uid_max": 40999,
                                               "port_min": 26000, "port_max": 26099}})
        a = NodeProcess(["--role=all"], config=to_toml(doc_a), data_dir=tmp / "a" / "data")
        self.addCleanup(a.cleanup)
        a.wait_for_log("router listening on", timeout=60)

        def runner_b(name: str, runner: dict[str, object]) -> NodeProcess:
            doc = json.loads(json.dumps(doc_a))  # the same cluster, store and nexus
            doc["runner"].update({"control_bind": f"tcp://127.0.0.1:{free_port()}",
                                  "static_listen": "", **runner})
            doc.setdefault("metrics", {})["listen"] = ""
            doc["node"]["id"] = name
            b = NodeProcess(["--role=runner"], config=to_toml(doc),
                            data_dir=tmp / name / "data")
            self.addCleanup(b.cleanup)
            return b

        b = runner_b("b", {"uid_min": 40500, "uid_max": 41999,
                           "port_min": 27000, "port_max": 27099})
        code = b.proc.wait(timeout=60)
        out = b.output()
        self.assertEqual(code, 1, out)
        self.assertIn("epio: the runner cannot start: its app UIDs runner.uid_min-uid_max "
                      "40500-41999 overlap 40000-40999 of runner a on this host", out)
        self.assertIn("network fence removed", out)
        self.assertNotIn("Traceback", out)
        self.assertIsNone(a.proc.poll(), a.output())

        c = runner_b("c", {"uid_min": 41000, "uid_max": 41999,
                           "port_min": 27000, "port_max": 27099})
        c.wait_for_log("runner c: sandbox=", timeout=60)

        def registered() -> dict[str, object] | None:
            with sqlite3.connect(f"{tmp}/store.sqlite3", timeout=10) as db:
                row = db.execute("SELECT status FROM nodes WHERE id = 'c'").fetchone()
            return json.loads(row[0]) if row else None

        deadline = time.monotonic() + 60
        while registered() is None and c.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        status = registered()  # checked, then registered with its ranges and host
        self.assertIsNotNone(status, c.output())
        assert status is not None
        self.assertEqual((status["uids"], status["ports"]), ([41000, 41999], [27000, 27099]))
        self.assertIsNone(c.proc.poll(), c.output())
        self.assertNotIn("cannot start", c.output())
        self.assertIn(c.stop(timeout=40), (0, -15), c.output())
