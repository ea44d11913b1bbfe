"""twistd options: roles from a closed set, overrides, the service tree."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from epio.node import Node, NodeSetupError, read_or_create_secret
from epio.tap import ROLES, Options, parse_roles


class RoleTests(SynchronousTestCase):
    def test_all(self) -> None:
        """--role=all means every role."""
        self.assertEqual(parse_roles("all"), frozenset(ROLES))

    def test_list(self) -> None:
        """A comma list picks those roles, ignoring blanks and spaces."""
        self.assertEqual(parse_roles("lb, nexus,"), frozenset({"lb", "nexus"}))

    def test_bogus_names_valid_roles(self) -> None:
        """An unknown role is a usage error naming every valid role."""
        with self.assertRaises(UsageError) as cm:
            parse_roles("lb,bogus")
        message = str(cm.exception)
        self.assertIn("'bogus'", message)
        for role in [*ROLES, "all"]:
            self.assertIn(role, message)

    def test_empty(self) -> None:
        """An empty --role is an error too."""
        self.assertRaises(UsageError, parse_roles, " , ")


class OptionsTests(SynchronousTestCase):
    def test_overrides(self) -> None:
        """Command-line options override config keys."""
        options = Options()
        options.parseOptions(
            ["--role", "lb", "--data-dir", "/tmp/x", "--domain", "example.test",
             "--lb-listen", "tcp:9", "--api-listen", "tcp:10"]
        )
        config = options["config_obj"]
        self.assertEqual(options["roles"], frozenset({"lb"}))
        self.assertEqual(config["node"]["data_dir"], "/tmp/x")
        self.assertEqual(config["node"]["domain"], "example.test")
        self.assertEqual(config["lb"]["listen"], "tcp:9")
        self.assertEqual(config["api"]["listen"], "tcp:10")

    def test_bad_config_is_usage_error(self) -> None:
        """A broken config file becomes a usage error listing all its problems."""
        path = Path(self.mktemp())
        path.write_text("[lb]\nx = 1\ny = 2\n")
        with self.assertRaises(UsageError) as cm:
            Options().parseOptions(["--config", str(path)])
        self.assertIn("lb.x", str(cm.exception))
        self.assertIn("lb.y", str(cm.exception))


class NodeTests(SynchronousTestCase):
    def test_prepare_creates_dir_and_secret(self) -> None:
        """First start creates the data dir and a 0600 cluster secret; later starts reuse it."""
        options = Options()
        data = Path(self.mktemp()) / "nested" / "data"
        # no runner: as root, one would refuse the test dir's 0700 parents (see below)
        options.parseOptions(["--role=api", "--data-dir", str(data)])
        node = Node.prepare(None, options["config_obj"], options["roles"])
        secret_path = data / "cluster-secret"
        self.assertTrue(data.is_dir())
        self.assertEqual(stat.S_IMODE(secret_path.stat().st_mode), 0o600)
        self.assertEqual(len(node.secret), 32)
        again = Node.prepare(None, options["config_obj"], options["roles"])
        self.assertEqual(again.secret, node.secret)

    def test_unreachable_data_dir_refused(self) -> None:
        """A root node with the runner role whose data dir other users cannot reach (a
        clone in root's 0700 home) refuses to start, saying which directory is closed and
        both fixes, and creates nothing under that home; a non-root node or one without
        the runner role starts there; once the home is searchable the root runner starts."""
        import shutil
        import tempfile

        from epio.node import reach_problem

        base = Path(tempfile.mkdtemp(prefix="epio-reach-"))  # under /tmp: 1777
        self.addCleanup(shutil.rmtree, base, True)
        base.chmod(0o711)
        home = base / "root"
        home.mkdir()
        home.chmod(0o700)
        data = home / "epio" / "epio-data"
        all_roles = frozenset(ROLES)
        sentence = (
            f"the build and app users cannot reach the data dir {data}: {home} is mode 700, "
            "not searchable by others, so no build or app could run. Start the node with a "
            f"data dir they can reach (--data-dir /var/lib/epio), or let them through "
            f"(chmod o+x {home})")
        self.assertEqual(reach_problem(data, all_roles, 0), sentence)
        self.assertIsNone(reach_problem(data, all_roles, 1000))
        self.assertIsNone(reach_problem(data, frozenset({"api", "lb"}), 0))

        options = Options()
        options.parseOptions(["--data-dir", str(data)])
        config = options["config_obj"]
        with self.assertRaises(NodeSetupError) as cm:
            Node.prepare(None, config, all_roles, euid=0)
        self.assertEqual(str(cm.exception), sentence)
        self.assertEqual(list(home.iterdir()), [])  # nothing made in the closed home
        self.assertEqual(stat.S_IMODE(home.stat().st_mode), 0o700)  # and never opened
        Node.prepare(None, config, frozenset({"api", "lb"}), euid=0)
        shutil.rmtree(home / "epio")
        Node.prepare(None, config, all_roles, euid=1000)

        home.chmod(0o711)
        self.assertIsNone(reach_problem(data, all_roles, 0))
        Node.prepare(None, config, all_roles, euid=0)
        self.assertTrue((data / "cluster-secret").exists())

    def test_closed_parent_made_by_the_node_refused(self) -> None:
        """Parents the node creates itself under a strict umask (077) are closed to the
        build and app users too: the root runner refuses instead of failing every build."""
        import shutil
        import tempfile

        base = Path(tempfile.mkdtemp(prefix="epio-reach-"))
        self.addCleanup(shutil.rmtree, base, True)
        base.chmod(0o711)
        data = base / "new" / "data"
        options = Options()
        options.parseOptions(["--data-dir", str(data)])
        old = os.umask(0o077)
        try:
            with self.assertRaises(NodeSetupError) as cm:
                Node.prepare(None, options["config_obj"], frozenset(ROLES), euid=0)
        finally:
            os.umask(old)
        self.assertIn(f"cannot reach the data dir {data}: {base / 'new'} is mode 700",
                      str(cm.exception))

    def test_secret_readable_by_others_refused(self) -> None:
        """A secret file that others can read stops the node with a clear message."""
        path = Path(self.mktemp())
        path.write_text("00" * 32)
        path.chmod(0o644)
        with self.assertRaises(NodeSetupError) as cm:
            read_or_create_secret(path)
        self.assertIn("chmod 600", str(cm.exception))

    def test_stop_order_roles_then_store(self) -> None:
        """NodeService stops every role at once, and the store only after every role's
        stop finished (a role's last in-flight work still has its store), even when a
        role's stop fails."""
        from twisted.application.service import Service
        from twisted.internet.defer import Deferred, fail
        from twisted.internet.testing import MemoryReactorClock

        from epio.config import validate
        from epio.tap import NodeService

        events: list[str] = []
        pending: dict[str, Deferred[None]] = {}

        class Recording(Service):
            def __init__(self, name: str, outcome: str = "wait") -> None:
                self.setName(name)
                self.outcome = outcome

            def stopService(self) -> Deferred[None] | None:
                super().stopService()
                events.append("stop " + self.name)
                if self.outcome == "fail":
                    return fail(RuntimeError("boom"))
                d: Deferred[None] = Deferred()
                pending[self.name] = d
                return d

        cfg = validate({"node": {"data_dir": self.mktemp()}})
        node = Node.prepare(MemoryReactorClock(), cfg, frozenset({"api", "runner"}))
        root = NodeService(node, [Recording("store"), Recording("runner"),
                                  Recording("api", "fail"), Recording("metrics")])
        root.startService()
        stopped = root.stopService()
        self.assertEqual(events, ["stop metrics", "stop api", "stop runner"])
        pending["runner"].callback(None)
        self.assertEqual(events, ["stop metrics", "stop api", "stop runner"])
        pending["metrics"].callback(None)
        self.assertEqual(events[-1], "stop store")
        self.assertNoResult(stopped)
        pending["store"].callback(None)
        self.successResultOf(stopped)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
