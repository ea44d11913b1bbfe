"""The node's pre-start port check (epio.listen): fail fast, naming the key."""

from __future__ import annotations

import errno
import socket

from twisted.trial.unittest import SynchronousTestCase

from epio.config import validate
from epio.listen import (
    Listener,
    Target,
    node_listeners,
    port_conflicts,
    refuse_port_conflicts,
    try_bind,
)


def taken(*ports: int):  # type: ignore[no-untyped-def]
    """A bind function for which ``ports`` are in use (records every call)."""
    calls: list[tuple[str, int]] = []

    def bind(host: str, port: int) -> None:
        calls.append((host, port))
        if port in ports:
            raise OSError(errno.EADDRINUSE, "Address already in use")

    return bind, calls


class NodeListenersTests(SynchronousTestCase):
    def test_all_roles_listen_on_every_fixed_port(self) -> None:
        """--role=all needs the api, router, nexus, runner, logger and backup ports and
        metrics.listen; port 0 (any free port) and unix sockets are left out."""
        settings = validate({"metrics": {"listen": "tcp:9100:interface=127.0.0.1"},
                             "lb": {"tls_listen": "tcp:0"},
                             "api": {"listen": "unix:/run/epio/api.sock"}}).settings
        keys = [(ln.key, ln.target.port) for ln in node_listeners(settings, ["all"])]
        self.assertEqual(keys, [
            ("nexus.heartbeat_bind", 7711), ("nexus.router_bind", 7712),
            ("nexus.publish_bind", 7713), ("lb.listen", 8080),
            ("runner.control_bind", 7731), ("logger.pull_bind", 7721),
            ("logger.router_bind", 7722), ("logger.publish_bind", 7723),
            ("backup.control_bind", 7741), ("metrics.listen", 9100)])

    def test_only_the_roles_it_runs(self) -> None:
        """A runner-only node checks only the runner's ports."""
        settings = validate({}).settings
        self.assertEqual([ln.key for ln in node_listeners(settings, ["runner"])],
                         ["runner.control_bind"])


class PortConflictTests(SynchronousTestCase):
    def test_free_ports_pass(self) -> None:
        """Every port is tried once; none taken: no problem, no exit."""
        bind, calls = taken()
        settings = validate({}).settings
        refuse_port_conflicts(settings, ["nexus"], bind)
        self.assertEqual(calls, [("127.0.0.1", 7711), ("127.0.0.1", 7712), ("127.0.0.1", 7713)])

    def test_taken_port_exits_naming_port_and_key(self) -> None:
        """A taken port makes the node exit with one sentence naming the port, the key
        and its value, and what to change; every taken port is listed."""
        bind, _ = taken(7712, 8080)
        settings = validate({}).settings
        with self.assertRaises(SystemExit) as caught:
            refuse_port_conflicts(settings, ["all"], bind)
        self.assertEqual(str(caught.exception), (
            "epio: the node cannot start: cannot listen on port 7712 (nexus.router_bind = "
            "'tcp://127.0.0.1:7712'): Address already in use (another node or program on "
            "this host listens there); stop that program or set nexus.router_bind to a free "
            "port; cannot listen on port 8080 (lb.listen = 'tcp:8080'): Address already in "
            "use (another node or program on this host listens there); stop that program or "
            "set lb.listen to a free port"))

    def test_try_bind_sees_a_listener(self) -> None:
        """try_bind raises EADDRINUSE for a port another socket listens on and passes
        once it is closed."""
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        with self.assertRaises(OSError) as caught:
            try_bind("127.0.0.1", port)
        self.assertEqual(caught.exception.errno, errno.EADDRINUSE)
        problems = port_conflicts([Listener("api.listen", f"tcp:{port}", Target("", port))])
        self.assertEqual(len(problems), 1)
        s.close()
        try_bind("127.0.0.1", port)
