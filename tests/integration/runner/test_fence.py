"""The network fence with real nftables: processes running as app UIDs are refused on
the control plane's ports and on other apps' instances, while root, the router and
the add-on PostgreSQL stay reachable (root + nft; each test uses its own table name
and removes it even when it fails)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import uuid
from pathlib import Path
from typing import Any

import attrs
from attrs import define
from twisted.internet import defer, reactor, task
from twisted.trial.unittest import SynchronousTestCase, TestCase

from epio.addons.services import REDIS_TYPE
from epio.config import validate
from epio.runner.fence import (
    FencedIsolation,
    NetworkFence,
    Nft,
    app_reach,
    app_uids,
    make_fence,
    pid_namespace,
    plan_from_config,
    proc_start,
    render,
)

from .helpers import RealRunner, wait_for
from .helpers import skip_reason as runner_skip_reason

NFT = shutil.which("nft")
SETPRIV = shutil.which("setpriv")
CLIENT_PYTHON = "/usr/bin/python3"  # readable by any UID (the venv's may not be)
UID_A, UID_B, UID_C = 20301, 20302, 20303  # three apps
NOBODY = 65534  # outside the app UID range


def skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (nftables rules, processes as app UIDs)"
    if NFT is None:
        return "needs nft (nftables)"
    if SETPRIV is None or not os.path.exists(CLIENT_PYTHON):
        return "needs setpriv and /usr/bin/python3"
    try:
        subprocess.run([NFT, "list", "tables"], check=True, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as e:
        return f"nft does not work here: {e}"
    return None


SKIP = skip_reason()

CONNECT = r'''
import errno, json, socket, sys, time
out = []
for host, port in json.loads(sys.argv[1]):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(3)
    t = time.monotonic()
    try:
        s.connect((host, port))
        r = "ok"
    except socket.timeout:
        r = "timeout"
    except OSError as e:
        r = errno.errorcode.get(e.errno, str(e.errno))
    finally:
        s.close()
    out.append([r, round(time.monotonic() - t, 3)])
print(json.dumps(out))
'''

PROBE = r'''
import errno, json, os, socket, time
out = {}
for name, (host, port) in json.loads(os.environ["TARGETS"]).items():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(3)
    try:
        s.connect((host, port))
        out[name] = "ok"
    except socket.timeout:
        out[name] = "timeout"
    except OSError as e:
        out[name] = errno.errorcode.get(e.errno, str(e.errno))
    finally:
        s.close()
print("RESULT " + json.dumps(out), flush=True)
time.sleep(600)
'''


def listen(host: str, port: int = 0) -> socket.socket | None:
    """A listening TCP socket (the kernel completes handshakes without accept())."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.bind((host, port))
    except OSError:
        s.close()
        return None
    s.listen(64)
    return s


def connect_as(uid: int | None, targets: list[tuple[str, int]]) -> list[tuple[str, float]]:
    """Try each (host, port) as ``uid`` (None: as root, this process's user)."""
    argv = [CLIENT_PYTHON, "-c", CONNECT, json.dumps(targets)]
    if uid is not None:
        assert SETPRIV is not None
        argv = [SETPRIV, "--reuid", str(uid), "--regid", str(uid), "--clear-groups",
                "--no-new-privs", "--", *argv]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd="/")
    if r.returncode != 0:
        raise AssertionError(f"client failed: {r.stderr}")
    return [(res, took) for res, took in json.loads(r.stdout)]


def unique_table() -> str:
    return f"epio_test_{uuid.uuid4().hex[:12]}"


class FenceRulesTests(SynchronousTestCase):
    """The fence's rules against real sockets, with processes switched by setpriv."""

    skip = SKIP

    def setUp(self) -> None:
        self.sockets: list[socket.socket] = []
        self.table = unique_table()
        # removed even when the test fails (and before the sockets close)
        self.addCleanup(Nft().delete, self.table)

    def open(self, host: str, port: int = 0) -> int:
        s = listen(host, port)
        if s is None:
            self.skipTest(f"cannot listen on {host} port {port}")
        self.sockets.append(s)
        self.addCleanup(s.close)
        return int(s.getsockname()[1])

    def both(self) -> int:
        """A port listened on at 127.0.0.1 and ::1."""
        for _ in range(20):
            port = self.open("127.0.0.1")
            s6 = listen("::1", port)
            if s6 is not None:
                self.sockets.append(s6)
                self.addCleanup(s6.close)
                return port
        self.skipTest("no port free on both 127.0.0.1 and ::1")

    def postgres_reachable(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", 5432), timeout=2).close()
            return True
        except OSError:
            return False

    def test_app_uids_are_refused_on_the_control_plane_and_other_apps(self) -> None:
        """As an app UID: a bus port and the api port (IPv4, IPv6, and 0.0.0.0/::
        meaning this host), another app's instance port and a service of the host
        the config does not name (deny by default) are refused at once with
        ECONNREFUSED; the app's own instance port, the router port, a port of
        runner.fence_allow_ports and the shared add-on PostgreSQL (which is also the
        store's server here, so it is no control port) are reachable -- the latter
        only by the app that has a shared database there.  Root and a UID outside the
        app range reach everything.  After a clean stop the table is gone and the
        app UID connects again."""
        if not self.postgres_reachable():
            self.skipTest("needs PostgreSQL on 127.0.0.1:5432")
        bus, api, router = self.both(), self.both(), self.both()
        own, other = self.open("127.0.0.1"), self.open("127.0.0.1")
        unnamed, allowed = self.open("127.0.0.1"), self.open("127.0.0.1")
        cfg = validate({
            "nexus": {"router_bind": f"tcp://127.0.0.1:{bus}"},
            "api": {"listen": f"tcp:{api}:interface=127.0.0.1"},
            "lb": {"listen": f"tcp:{router}"},
            # the test's listeners take kernel ports, outside any instance range here
            "runner": {"fence_allow_ports": [allowed], "port_min": 1, "port_max": 1},
            "store": {"url": "postgresql://postgres@127.0.0.1:5432/test"},
            "addons": {"postgres_admin_url": "postgresql://postgres@127.0.0.1:5432/postgres"},
        })
        plan = plan_from_config(cfg.settings, ["all"], self.table)
        self.assertIn(bus, plan.control_ports)
        self.assertIn(api, plan.control_ports)
        self.assertNotIn(5432, plan.control_ports)
        # A has a shared database on 127.0.0.1:5432 (runner.start's addon_ports), B none
        fence = NetworkFence(task.Clock(), plan, Nft(),
                             lambda: [(UID_A, own), (UID_B, other), (UID_A, 5432)],
                             check_interval=0, in_thread=defer.maybeDeferred)
        fence.startService()
        self.assertEqual(fence.report()["state"], "on", fence.report())

        targets = [("127.0.0.1", bus), ("::1", bus), ("127.0.0.1", api), ("::1", api),
                   ("127.0.0.1", other), ("127.0.0.1", own), ("127.0.0.1", router),
                   ("::1", router), ("127.0.0.1", 5432), ("127.0.0.1", unnamed),
                   ("127.0.0.1", allowed)]
        as_app = connect_as(UID_A, targets)
        self.assertEqual([r for r, _ in as_app], [
            "ECONNREFUSED", "ECONNREFUSED", "ECONNREFUSED", "ECONNREFUSED",
            "ECONNREFUSED", "ok", "ok", "ok", "ok", "ECONNREFUSED", "ok"], as_app)
        self.assertLess(max(took for _, took in as_app[:5]), 1.0, as_app)  # fail fast
        # connecting to 0.0.0.0 or :: means this host: refused as well
        self.assertEqual([r for r, _ in connect_as(UID_A, [("0.0.0.0", bus), ("::", bus)])],
                         ["ECONNREFUSED", "ECONNREFUSED"])
        self.assertEqual([r for r, _ in connect_as(UID_B, [("127.0.0.1", other),
                                                          ("127.0.0.1", own),
                                                          ("127.0.0.1", 5432)])],
                         ["ok", "ECONNREFUSED", "ECONNREFUSED"])
        self.assertEqual({r for r, _ in connect_as(None, targets)}, {"ok"})
        self.assertEqual({r for r, _ in connect_as(NOBODY, targets)}, {"ok"})

        self.successResultOf(fence.stopService())
        self.assertFalse(Nft().exists(self.table))
        self.assertEqual(connect_as(UID_A, [("127.0.0.1", bus)])[0][0], "ok")


class OwnerTests(SynchronousTestCase):
    """Tables of dead runners are collected through the real nft, by handle."""

    skip = SKIP

    def install(self, name: str, owner: str) -> int:
        self.addCleanup(Nft().delete, name)
        plan = plan_from_config(validate({}).settings, ["runner"], name)
        Nft().apply(render(plan, owner=owner))
        tables = Nft().tables()
        self.assertEqual(tables[name][1], owner)
        return tables[name][0]

    def test_dead_runners_tables_are_removed_live_ones_kept(self) -> None:
        """A starting fence removes the table of a runner whose process is gone, keeps
        the one of a live runner, and a removal by an old handle leaves a table that
        was replaced meanwhile in place."""
        ns, me = pid_namespace(), os.getpid()
        dead = f"epio_fence_{uuid.uuid4().hex[:8]}"
        live = f"epio_fence_{uuid.uuid4().hex[:8]}"
        self.install(dead, f"epio runner pid={me} start=1 ns={ns} data=/nonexistent")
        self.install(live, f"epio runner pid={me} start={proc_start(me)} ns={ns} data=/x")
        own = unique_table()
        self.addCleanup(Nft().delete, own)
        plan = plan_from_config(validate({}).settings, ["runner"], own)
        fence = NetworkFence(task.Clock(), plan, Nft(), check_interval=0,
                             in_thread=defer.maybeDeferred)
        fence.startService()
        self.addCleanup(fence.stopService)
        self.assertFalse(Nft().exists(dead))
        self.assertTrue(Nft().exists(live))
        old = Nft().tables()[live][0]
        self.install(live, "replaced")
        Nft().delete(live, old)
        self.assertTrue(Nft().exists(live))


@define
class FakeNode:
    config: Any
    roles: tuple[str, ...]
    reactor: Any
    data_dir: Path


class SandboxedFenceTests(TestCase):
    """The fence wired to a real supervisor (as make_service wires it) with apps in the real
    sandbox as their own UIDs."""

    skip = SKIP or runner_skip_reason()
    timeout = 60

    def setUp(self) -> None:
        self.runner = RealRunner(reactor)
        self.table = unique_table()
        self.addCleanup(Nft().delete, self.table)
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(self.runner.close()))

    async def test_sandboxed_app_reaches_its_own_instance_not_another_apps(self) -> None:
        """With the fence wired to a real supervisor and the default deny-by-default
        rules: a sandboxed worker of app A (as A's UID) reaches A's own web instance,
        A's own dedicated add-on server and the router, but gets ECONNREFUSED from
        app B's web instance and B's dedicated add-on, a bus port, an api port, the
        host's PostgreSQL on 127.0.0.1:5432 and Redis on 127.0.0.1:6379 -- which root
        reaches; a worker of app C, whose spec names 5432 as its shared add-on port,
        reaches 5432 (and still not 6379); the runner's isolation facts report the
        fence on."""
        r = self.runner
        sockets = [listen("127.0.0.1"), listen("127.0.0.1"), listen("127.0.0.1")]
        for s in sockets:
            assert s is not None
            self.addCleanup(s.close)
        bus, router, api = (int(s.getsockname()[1]) for s in sockets if s is not None)
        host_services = [("127.0.0.1", 5432), ("127.0.0.1", 6379)]
        if {res for res, _ in connect_as(None, host_services)} != {"ok"}:
            self.skipTest("needs PostgreSQL on 127.0.0.1:5432 and Redis on 127.0.0.1:6379")
        # a runner-only node: the bus port is fenced as the nexus it connects to
        cfg = validate({"cluster": {"nexus": [{"heartbeat": "tcp://127.0.0.1:7711",
                                               "router": f"tcp://127.0.0.1:{bus}",
                                               "publish": "tcp://127.0.0.1:7713"}]},
                        "lb": {"listen": f"tcp:{router}"},
                        "runner": {"fence_table": self.table, "fence_check_interval": 0}})
        # wired as the runner's composition root wires it (epio.runner.service)
        fence = make_fence(reactor, cfg.settings, ("runner",), r.data_dir,
                           app_reach(r.sup, None), uids=app_uids(r.sup, None))
        r.observers.append(fence.changed)
        r.gates.append(fence.ready)
        isolation = FencedIsolation(**attrs.asdict(r.isolation, recurse=False), fence=fence)
        fence.startService()
        self.addCleanup(fence.stopService)
        self.assertEqual(isolation.as_dict()["fence"]["state"], "on", isolation.as_dict())

        from . import apps

        web = r.image({"web.py": apps.WEB, "probe.py": PROBE})
        a = r.start("fa-web", "fence-a", UID_A, web, "python /app/app/web.py")
        b = r.start("fb-web", "fence-b", UID_B, web, "python /app/app/web.py")
        # dedicated add-on servers: a process type of SERVICE_PROCESS_TYPES, app's UID
        a_db = r.start("fa-db", "fence-a", UID_A, web, "python /app/app/web.py",
                       process_type=REDIS_TYPE)
        b_db = r.start("fb-db", "fence-b", UID_B, web, "python /app/app/web.py",
                       process_type=REDIS_TYPE)
        ids = ("fa-web", "fb-web", "fa-db", "fb-db")
        self.assertTrue(await wait_for(reactor, lambda: all(r.state(i) == "healthy"
                                                            for i in ids), 30),
                        r.texts("fence-a") + r.texts("fence-b"))
        self.assertTrue(await wait_for(reactor, lambda: fence._busy is None, 5))
        targets = {"own": ["127.0.0.1", a["port"]], "other": ["127.0.0.1", b["port"]],
                   "own_addon": ["127.0.0.1", a_db["port"]],
                   "other_addon": ["127.0.0.1", b_db["port"]],
                   "bus": ["127.0.0.1", bus], "api": ["127.0.0.1", api],
                   "router": ["127.0.0.1", router], "postgres": ["127.0.0.1", 5432],
                   "redis": ["127.0.0.1", 6379]}
        r.start("fa-probe", "fence-a", UID_A, web, "python /app/app/probe.py",
                process_type="worker", env={"TARGETS": json.dumps(targets)})

        def result() -> dict[str, str] | None:
            for line in r.texts("fence-a"):
                if line.startswith("RESULT "):
                    return dict(json.loads(line[len("RESULT "):]))
            return None

        self.assertTrue(await wait_for(reactor, lambda: result() is not None, 20),
                        r.texts("fence-a"))
        self.assertEqual(result(), {"own": "ok", "other": "ECONNREFUSED", "own_addon": "ok",
                                    "other_addon": "ECONNREFUSED", "bus": "ECONNREFUSED",
                                    "api": "ECONNREFUSED", "router": "ok",
                                    "postgres": "ECONNREFUSED", "redis": "ECONNREFUSED"})
        # app C has a shared database on the host's PostgreSQL: its port opens for C only
        shared = {"postgres": ["127.0.0.1", 5432], "redis": ["127.0.0.1", 6379]}
        r.start("fc-probe", "fence-c", UID_C, web, "python /app/app/probe.py",
                process_type="worker", env={"TARGETS": json.dumps(shared)},
                addon_ports=[5432])

        def result_c() -> dict[str, str] | None:
            for line in r.texts("fence-c"):
                if line.startswith("RESULT "):
                    return dict(json.loads(line[len("RESULT "):]))
            return None

        self.assertTrue(await wait_for(reactor, lambda: result_c() is not None, 20),
                        r.texts("fence-c"))
        self.assertEqual(result_c(), {"postgres": "ok", "redis": "ECONNREFUSED"})
        # root (the runner, health checks, routers) still reaches B
        self.assertEqual(connect_as(None, [("127.0.0.1", b["port"])])[0][0], "ok")
