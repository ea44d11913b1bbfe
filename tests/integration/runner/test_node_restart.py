"""A real ``twistd epio --role=runner`` node driven over the real bus.

Control requests go through a DEALER, heartbeats arrive on a SUB bound where the
config says the nexus listens.  The node is then SIGKILLed (a crashed runner):
its app processes must die with it (no orphans), and the restarted node must
clean the leftovers and start the instance again from its state file.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from twisted.internet import reactor, task
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, readBody

from epio.bus import Bus
from epio.runner.service import cgroup_parent
from tests.util import NodeProcess, isolated_config, to_toml

from . import apps
from .helpers import make_image, skip_reason

SKIP = skip_reason()
SECRET_HEX = "5e" * 32


async def pause(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


async def wait_log(node: NodeProcess, text: str, timeout: float = 30) -> None:
    for _ in range(int(timeout / 0.05)):
        out = node.output()
        if text in out:
            return
        if node.proc.poll() is not None:
            raise AssertionError(f"node exited before {text!r}:\n{out}")
        await pause(0.05)
    raise AssertionError(f"{text!r} not logged:\n{node.output()}")


def alive(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        if "zombie" not in status:
            out.append(pid)
    return out


class NodeRestartTests(TestCase):
    skip = SKIP
    timeout = 90

    async def test_control_heartbeats_crash_and_recovery(self) -> None:
        """start over the bus -> healthy in heartbeats -> serves HTTP; SIGKILL of the node
        kills its apps (no orphan); a restarted node cleans up and runs the instance again
        on the same port; stop over the bus stops it."""
        base = Path(self.mktemp()).absolute()
        data = base / "data"
        data.mkdir(parents=True)
        os.chmod(data, 0o711)
        os.chmod(base.parent, 0o711)  # trial's 0700 mktemp dir: a root runner refuses it
        secret = data / "cluster-secret"
        secret.write_text(SECRET_HEX + "\n")
        os.chmod(secret, 0o600)
        digest = make_image(data, {"web.py": apps.WEB})
        parent = f"epio-test-{uuid.uuid4().hex[:8]}"
        low = 23000 + (os.getpid() % 40) * 200
        doc, _ = isolated_config({"runner": {
            "port_min": low, "port_max": low + 99, "heartbeat_interval": 0.3,
            "health_boot_interval": 0.1, "cgroup_parent": parent, "shutdown_grace": 2.0,
        }})
        config = to_toml(doc)
        control = str(doc["runner"]["control_bind"])
        hb_endpoint = str(doc["cluster"]["nexus"][0]["heartbeat"])  # type: ignore[index]
        self.addCleanup(self._remove_cgroups, parent)

        bus = Bus(reactor, bytes.fromhex(SECRET_HEX), "test")
        beats: list[dict[str, Any]] = []
        sub = bus.subscriber([], [b"hb"], lambda topic, env: beats.append(env.body),
                             bind=hb_endpoint)
        sub.startService()
        self.addCleanup(sub.stopService)
        dealer = bus.dealer([control])
        dealer.startService()
        self.addCleanup(dealer.stopService)

        def instance(iid: str) -> dict[str, Any] | None:
            if not beats:
                return None
            for i in beats[-1]["instances"]:
                if i["instance_id"] == iid:
                    return i
            return None

        async def wait_state(iid: str, state: str, timeout: float = 30) -> dict[str, Any]:
            for _ in range(int(timeout / 0.1)):
                i = instance(iid)
                if i is not None and i["state"] == state:
                    return i
                await pause(0.1)
            raise AssertionError(f"{iid} never {state}: {instance(iid)}")

        node = NodeProcess(["--role=runner"], data_dir=data, config=config)
        self.addCleanup(node.cleanup)
        await wait_log(node, "runner ")
        reply = await dealer.request("runner.start", {
            "instance_id": "web-a", "app": "hello",
            "uid": int(doc["runner"]["uid_min"]) + 1,  # type: ignore[call-overload]
            "release": 1,
            "process_type": "web", "command": "python /app/app/web.py",
            "image_digest": digest, "env": {}, "health_check": "/", "grace": 2,
        }, timeout=10)
        port = reply.body["port"]
        self.assertTrue(low <= port <= low + 99)
        info = await wait_state("web-a", "healthy")
        self.assertEqual(info["port"], port)
        self.assertEqual(beats[-1]["isolation"]["sandbox"], "bwrap")
        self.assertEqual(beats[-1]["control"], control)
        code, text = await self._get(port)
        self.assertEqual(code, 200)

        cg = (Path("/sys/fs/cgroup/pids") / cgroup_parent(parent, data) / "web-a"
              / "cgroup.procs")
        pids = [int(x) for x in cg.read_text().split()] if cg.exists() else []
        self.assertTrue(pids, "the instance's processes are in its cgroup")

        # a crashed runner: its apps die with it
        node.kill()
        for _ in range(50):
            if not alive(pids):
                break
            await pause(0.1)
        self.assertEqual(alive(pids), [], "app processes outlived the runner")

        # the restarted runner cleans up and starts the instance again (new boot id)
        old_boot = beats[-1]["boot_id"]
        node2 = NodeProcess(["--role=runner"], data_dir=data, config=config)
        self.addCleanup(node2.cleanup)
        await wait_log(node2, "restarted instance web-a")
        for _ in range(300):
            if beats[-1]["boot_id"] != old_boot and (instance("web-a") or {}).get("state") == "healthy":
                break
            await pause(0.1)
        again = instance("web-a") or {}
        self.assertEqual(again.get("state"), "healthy", node2.output()[-3000:])
        self.assertEqual(again.get("port"), port)
        code, _ = await self._get(port)
        self.assertEqual(code, 200)

        stopped = await dealer.request("runner.stop", {"instance_id": "web-a", "grace": 2},
                                       timeout=10)
        self.assertEqual(stopped.body["instance_id"], "web-a")
        # twistd re-raises the SIGTERM it handled: -15 is a clean shutdown
        self.assertIn(node2.stop(), (0, -15))
        self.assertIn("Server Shut Down.", node2.output())
        self.assertFalse((data / "runner" / "instances" / "web-a").exists())

    async def _get(self, port: int) -> tuple[int, bytes]:
        agent = Agent(reactor, connectTimeout=2)
        response = await agent.request(b"GET", f"http://127.0.0.1:{port}/".encode())
        return response.code, await readBody(response)

    def _remove_cgroups(self, parent: str) -> None:
        for root in Path("/sys/fs/cgroup").iterdir():
            for base in root.glob(f"**/{parent}"):
                for d in sorted((p for p in base.glob("**/*") if p.is_dir()),
                                key=lambda p: -len(p.parts)):
                    try:
                        d.rmdir()
                    except OSError:
                        pass
                try:
                    base.rmdir()
                except OSError:
                    pass
