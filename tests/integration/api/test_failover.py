"""Scheduler leader failover on PostgreSQL, with real processes.

Two ``twistd epio --role=api`` processes share one PostgreSQL store and one
cluster secret.  A runner stand-in in the test process (a real, signed bus
ROUTER, registered in the store like a runner) answers runner.status/start/
stop/drain.  The leader (advisory lock ``epio.scheduler``) places the app's
instance; it is SIGKILLed; the other api takes the lock over, and a scale
request made through it converges on the stand-in.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from epio.store import open_store
from tests.store.pg import fresh_database_for_test
from tests.util import NodeProcess, free_port, to_toml

DIGEST = "d" * 64


class StandInRunner:
    """Runner control over a real bus ROUTER, instances kept in memory."""

    def __init__(self) -> None:
        self.instances: dict[str, dict[str, Any]] = {}
        self.starts: list[tuple[str, str]] = []  # (sender, instance_id)
        self.port = 30000

    async def handle(self, env: Any) -> tuple[str, dict[str, Any]]:
        b = env.body
        if env.type == "runner.status":
            for i in self.instances.values():
                i["state"] = "healthy"
            return "runner.status_reply", {"node_id": "standin", "boot_id": "boot1",
                                           "instances": list(self.instances.values())}
        if env.type == "runner.start":
            self.port += 1
            self.starts.append((env.sender, b["instance_id"]))
            self.instances[b["instance_id"]] = {
                "instance_id": b["instance_id"], "app": b["app"], "release": b["release"],
                "process_type": b["process_type"], "host": "127.0.0.1", "port": self.port,
                "state": "starting", "since": 1.0, "restarts": 0}
            return "runner.started", {"instance_id": b["instance_id"], "host": "127.0.0.1",
                                      "port": self.port}
        if env.type == "runner.stop":
            self.instances.pop(b["instance_id"], None)
            return "runner.stopped", {"instance_id": b["instance_id"]}
        if env.type == "runner.drain":
            return "runner.draining", {"instance_id": b["instance_id"]}
        raise ValueError(env.type)


async def wait_for(what: str, check: Any, timeout: float = 30.0) -> Any:
    waited = 0.0
    while True:
        result = check()
        if result:
            return result
        if waited > timeout:
            raise AssertionError(f"{what}: not true after {timeout}s")
        await deferLater(reactor, 0.1, lambda: None)
        waited += 0.1


class LeaderFailoverTests(TestCase):
    timeout = 120

    async def _setup(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="epio-failover-"))
        self.addCleanup(shutil.rmtree, self.tmp, True)
        url = fresh_database_for_test(self)
        secret_file = self.tmp / "secret"
        secret = secrets.token_bytes(32)
        fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, secret.hex().encode() + b"\n")
        os.close(fd)
        self.store = await open_store(url, reactor)
        self.addCleanup(lambda: ensureDeferred(self.store.close()))
        from epio.bus import Bus

        self.runner = StandInRunner()
        bus = Bus(reactor, secret, "standin")
        endpoint = f"tcp://127.0.0.1:{free_port()}"
        router = bus.router(endpoint, self.runner.handle)
        router.startService()
        self.addCleanup(router.stopService)
        await self.store.upsert_node("standin", ["runner"], endpoint, "boot1")
        self.nodes: dict[str, NodeProcess] = {}
        self.ports: dict[str, int] = {}
        for name in ("api-a", "api-b"):
            port = free_port()
            self.ports[name] = port
            config = to_toml({
                "node": {"id": name},
                "store": {"url": url},
                "cluster": {"secret_file": str(secret_file), "loggers": []},
                "api": {"listen": f"tcp:{port}:interface=127.0.0.1",
                        "reconcile_interval": 0.3, "drain_seconds": 0.0,
                        "runner_dead_after": 30.0},
            })
            node = NodeProcess(["--role=api"], data_dir=self.tmp / name / "data", config=config)
            self.addCleanup(node.cleanup)
            self.nodes[name] = node

    def setUp(self) -> Any:
        return ensureDeferred(self._setup())

    def api(self, name: str, method: str, path: str, body: Any, token: str) -> Any:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.ports[name]}/api/v1/{path}", method=method,
            data=json.dumps(body).encode(), headers={"Authorization": f"Bearer {token}",
                                                     "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def leader(self) -> str | None:
        for name, node in self.nodes.items():
            if "elected leader for epio.scheduler" in node.output():
                return name
        return None

    async def test_failover_converges(self) -> None:
        """Kill the scheduling api: the other takes over and a scale request converges."""
        for node in self.nodes.values():
            await wait_for("api ready", lambda n=node: "api ready" in n.output())
        first = await wait_for("a leader", self.leader)
        other = "api-b" if first == "api-a" else "api-a"
        token_file = next(p for p in (self.tmp / n / "data" / "admin-token"
                                      for n in self.nodes) if p.exists())
        token = token_file.read_text().strip()
        await deferToThread(self.api, other, "POST", "apps", {"name": "web"}, token)
        await self.store.create_release("web", DIGEST, processes={"web": "serve"})
        await deferToThread(self.api, other, "PATCH", "apps/web/formation",
                            {"processes": {"web": {"quantity": 1}}}, token)
        await wait_for("one instance", lambda: len(self.runner.instances) == 1)
        self.assertEqual({s for s, _ in self.runner.starts}, {first})

        self.nodes[first].kill()
        await wait_for("the other api is elected",
                       lambda: "elected leader for epio.scheduler" in self.nodes[other].output(),
                       timeout=30)
        await deferToThread(self.api, other, "PATCH", "apps/web/formation",
                            {"processes": {"web": {"quantity": 3}}}, token)
        await wait_for("three instances", lambda: len(self.runner.instances) == 3, timeout=30)
        after = [s for s, _ in self.runner.starts[1:]]
        self.assertEqual(set(after), {other})
        for _ in range(100):
            instances = await self.store.list_instances("web")
            if [i.state for i in instances] == ["healthy"] * 3:
                break
            await deferLater(reactor, 0.1, lambda: None)
        self.assertEqual([i.state for i in instances], ["healthy"] * 3)
        self.assertFalse(re.search(r"Traceback", self.nodes[other].output()))
        req = urllib.request.Request(f"http://127.0.0.1:{self.ports[other]}/api/v1/nodes",
                                     headers={"Authorization": f"Bearer {token}"})
        nodes = json.loads(await deferToThread(lambda: urllib.request.urlopen(req).read()))
        self.assertEqual(sorted(n["id"] for n in nodes), ["api-a", "api-b", "standin"])
