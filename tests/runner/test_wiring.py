"""The runner role's composition root: what ``make_service`` builds, in which order,
and that nothing is re-wired once it returned."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from epio.config import validate
from epio.node import Node, installed_reactor
from epio.runner.service import RunnerService, make_service
from epio.services import OrderedMultiService


def wiring(svc: RunnerService) -> dict[str, Any]:
    """Every public collaborator attribute of the wired objects (by identity; the
    private ones are their own run-time state), and the
    contents of the observer and gate lists and of the service tree."""
    objects = {"runner": svc, "supervisor": svc.supervisor, "sessions": svc.sessions,
               "fence": svc.fence, "static": svc.static_server}
    out: dict[str, Any] = {}
    for label, obj in objects.items():
        for name, value in vars(obj).items():
            if not name.startswith("_") and not isinstance(
                    value, (int, float, str, bytes, bool, type(None), dict, set)):
                out[f"{label}.{name}"] = id(value)
    out["observers"] = list(svc.supervisor.observers)
    out["gates"] = list(svc.supervisor.before_spawn)
    out["children"] = list(svc)
    return out


class CompositionRootTests(TestCase):
    def node(self) -> Node:
        tmp = Path(self.mktemp()).absolute()
        tmp.mkdir(parents=True)
        short = tempfile.mkdtemp(prefix="epio-w")
        self.addCleanup(shutil.rmtree, short, True)
        config = validate({
            "node": {"data_dir": str(tmp / "data")},
            "cluster": {"nexus": [], "loggers": []},
            "runner": {"fence": "off", "sandbox": "none",
                       # a short path: a unix socket's is at most 107 bytes (a bind
                       # that fails ends the node: BindFailed)
                       "control_bind": f"ipc://{short}/control",
                       "static_listen": "tcp:0:interface=127.0.0.1"},
            "addons": {"snapshot_interval": 0},
        })
        return Node.prepare(installed_reactor(), config, frozenset({"runner"}))

    async def test_tree_order_and_no_rewiring(self) -> None:
        """make_service builds the runner's tree in its documented start order -- the
        network fence first, so (an ordered tree stopping in reverse) it comes down
        last, after every app process and session is gone -- hands the supervisor its
        observers (the runner's state file, the fence, the static server, in that
        order) and its one spawn gate (the fence), shares that gate list with the
        session manager, and nothing it wired changes when the runner starts and
        stops."""
        svc = make_service(self.node())
        self.assertIsInstance(svc, OrderedMultiService)
        self.assertEqual([c.name for c in svc],
                         ["network-fence", "bus-log-sink", "runner-control", "runner-peers",
                          "run-sessions", "static-files"])
        fence, sup = svc.fence, svc.supervisor
        self.assertIs(list(svc)[0], fence)
        self.assertEqual(list(sup.observers),
                         [svc.changed, fence.changed, svc.static_server.instances_changed])
        self.assertEqual(list(sup.before_spawn), [fence.ready])
        self.assertIs(svc.sessions.observers, sup.before_spawn)
        self.assertIs(svc.isolation.fence, fence)
        before = wiring(svc)
        svc.startService()
        await svc.whenReady()
        self.assertTrue(all(c.running for c in svc))
        await defer.maybeDeferred(svc.stopService)
        self.assertFalse(any(c.running for c in svc))
        after = wiring(svc)
        self.maxDiff = None
        self.assertEqual(after, before)
