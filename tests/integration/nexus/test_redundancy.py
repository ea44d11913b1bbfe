"""Two nexuses, two routers and a runner stand-in as separate processes.

- every process is a real ``twistd -n epio`` (``--role=nexus`` / ``--role=lb``)
  or a script (the runner stand-in: signed heartbeats announcing a real HTTP
  backend), talking over real ZeroMQ and HTTP sockets on 127.0.0.1;
- kill one nexus: every request through either router is still answered;
- kill both: the routers keep serving their last table and say it is stale;
- restart a nexus: the routers have the fresh table (a backend announced while
  every nexus was down) within 3 heartbeat periods of the nexus starting.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.util import NodeProcess, child_processes, epio_env, free_port, wait_for_port

HERE = Path(__file__).resolve().parent
INTERVAL = 1.0  # heartbeat period of the stand-in (the runner default)


def get(port: int, host: str = "hello.localhost", timeout: float = 2.0,
        addr: str = "127.0.0.1") -> tuple[int, str]:
    conn = http.client.HTTPConnection(addr, port, timeout=timeout)
    try:
        conn.request("GET", "/", headers={"Host": host})
        resp = conn.getresponse()
        return resp.status, resp.read().decode("utf-8", "replace")
    finally:
        conn.close()


def toml_value(v: Any) -> str:
    return json.dumps(v)


class ClusterCase(SynchronousTestCase):
    """Nexuses, routers and the runner stand-in as processes (no tests of its own)."""

    ADDR = "127.0.0.1"  # every socket of the test: bus, router listener, backends

    def ep(self, port: int) -> str:
        return f"tcp://[{self.ADDR}]:{port}" if ":" in self.ADDR else f"tcp://{self.ADDR}:{port}"

    def setUp(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="epio-nexus-it-"))
        self.procs: list[NodeProcess] = []
        self.scripts: list[subprocess.Popen[bytes]] = []
        self.addCleanup(self.cleanup)
        secret = self.tmp / "secret"
        fd = os.open(secret, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, secrets.token_hex(32).encode())
        os.close(fd)
        self.secret = secret
        self.store_url = f"sqlite:///{self.tmp / 'store.sqlite3'}"
        subprocess.run([sys.executable, str(HERE / "tool.py"), "create-app", self.store_url,
                        "hello"], env=epio_env(), check=True, timeout=30)
        self.nexus_ports = [
            {"heartbeat": free_port(self.ADDR), "router": free_port(self.ADDR),
             "publish": free_port(self.ADDR)}
            for _ in range(2)
        ]
        self.cluster = [{k: self.ep(p) for k, p in ports.items()}
                        for ports in self.nexus_ports]

    def cleanup(self) -> None:
        for p in self.scripts:
            if p.poll() is None:
                p.kill()
                p.wait()
        for node in self.procs:
            node.cleanup()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def config(self, extra: str) -> str:
        nexus = ", ".join(
            "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in n.items()) + "}"
            for n in self.cluster
        )
        return (
            f"[cluster]\nsecret_file = {toml_value(str(self.secret))}\nnexus = [{nexus}]\n"
            f"[store]\nurl = {toml_value(self.store_url)}\n{extra}"
        )

    def start_nexus(self, i: int) -> NodeProcess:
        c = self.cluster[i]
        extra = (f"[nexus]\nheartbeat_bind = {toml_value(c['heartbeat'])}\n"
                 f"router_bind = {toml_value(c['router'])}\n"
                 f"publish_bind = {toml_value(c['publish'])}\n")
        node = NodeProcess(["--role=nexus"], data_dir=self.tmp / f"nexus{i}-{time.monotonic()}",
                           config=self.config(extra))
        self.procs.append(node)
        return node

    def start_router(self, port: int, i: int, lb: str = "") -> NodeProcess:
        listen = (f"tcp6:{port}:interface=\\:\\:1" if ":" in self.ADDR
                  else f"tcp:{port}:interface={self.ADDR}")
        metrics = free_port()
        extra = (f"[lb]\nlisten = {toml_value(listen)}\n{lb}"
                 f"[metrics]\nlisten = \"tcp:{metrics}:interface=127.0.0.1\"\n")
        node = NodeProcess(["--role=lb"], data_dir=self.tmp / f"router{i}",
                           config=self.config(extra))
        node.metrics_port = metrics  # type: ignore[attr-defined]
        self.procs.append(node)
        return node

    def start_standin(self) -> Path:
        state = self.tmp / "standin.json"
        args = [sys.executable, str(HERE / "standin.py"), "--secret-file", str(self.secret),
                "--state-file", str(state), "--interval", str(INTERVAL), "--node", "runner-1",
                "--host", self.ADDR]
        for c in self.cluster:
            args += ["--nexus", c["heartbeat"]]
        log = open(self.tmp / "standin.log", "wb")
        self.addCleanup(log.close)
        self.scripts.append(subprocess.Popen(args, env=epio_env(), stdout=log,
                                             stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 20
        while not state.exists():
            self.assertLess(time.monotonic(), deadline, "stand-in did not start")
            time.sleep(0.05)
        return state

    def wait_body(self, ports: list[int], body: str, timeout: float) -> float:
        """Poll every router until each answers ``body``; return when the last did."""
        deadline = time.monotonic() + timeout
        pending = set(ports)
        last: dict[int, Any] = {}
        while pending:
            for port in sorted(pending):
                try:
                    last[port] = get(port, timeout=1.0, addr=self.ADDR)
                except OSError as e:
                    last[port] = repr(e)
                if last[port] == (200, body):
                    pending.discard(port)
            if pending and time.monotonic() > deadline:
                self.fail(f"routers {sorted(pending)} did not answer {body!r} in {timeout}s: "
                          f"{last}\n" + "\n".join(p.output()[-3000:] for p in self.procs))
            if pending:
                time.sleep(0.02)
        return time.monotonic()

    def hammer(self, ports: list[int], seconds: float, body: str) -> int:
        """Send requests round-robin for ``seconds``; every one must be answered ``body``."""
        deadline = time.monotonic() + seconds
        n = 0
        failures = []
        while time.monotonic() < deadline:
            port = ports[n % len(ports)]
            try:
                result: Any = get(port, addr=self.ADDR)
            except OSError as e:
                result = repr(e)
            if result != (200, body):
                failures.append((port, result))
            n += 1
            time.sleep(0.005)
        self.assertEqual(failures, [], f"{len(failures)} of {n} requests failed")
        return n

    def status(self, router: NodeProcess) -> dict[str, Any]:
        url = f"http://127.0.0.1:{router.metrics_port}/status"  # type: ignore[attr-defined]
        return json.loads(urllib.request.urlopen(url, timeout=5).read())["router"]


class RedundancyTests(ClusterCase):
    def test_redundancy(self) -> None:
        """Losing one nexus loses no request; losing both keeps the table; a restart refreshes it."""
        started = time.monotonic()
        state_file = self.start_standin()
        nexus = [self.start_nexus(0), self.start_nexus(1)]
        lb_ports = [free_port(self.ADDR), free_port(self.ADDR)]
        # one router with its route feed process (the default), one following inline
        routers = [self.start_router(lb_ports[0], 0),
                   self.start_router(lb_ports[1], 1, 'route_feed = "inline"\n')]
        for n in nexus:
            n.wait_for_log(" ready: ", timeout=30)
        for port in lb_ports:
            wait_for_port(self.ADDR, port, timeout=30)
        for port in lb_ports:  # a router listens once it has a table: never a 404 first
            self.assertEqual(get(port, addr=self.ADDR), (200, "backend-1"))

        # 1. kill one nexus: not one request fails, before, during and after it leaves
        nexus[0].kill()
        n1 = self.hammer(lb_ports, 3.0, "backend-1")  # > nexus.feed_timeout (2 s)
        for r in routers:
            r.wait_for_log(f"nexus[0] ({self.cluster[0]['publish']}) silent", timeout=5)
            self.assertNotIn("every nexus is silent", r.output())

        # 2. kill both: the routers keep their last table and say it is stale
        nexus[1].kill()
        for r in routers:
            r.wait_for_log("every nexus is silent: serving the last route table", timeout=10)
            # ... and say so in their status (/metrics) too
            text = urllib.request.urlopen(
                f"http://127.0.0.1:{r.metrics_port}/metrics", timeout=5).read().decode()
            self.assertIn("epio_lb_routes_stale 1", text)
            self.assertIn("epio_lb_nexus_alive 0", text)
            status = json.loads(urllib.request.urlopen(
                f"http://127.0.0.1:{r.metrics_port}/status", timeout=5).read())["router"]
            self.assertEqual(status["feed"]["state"], "stale")
            self.assertIsNotNone(status["feed"]["since"])
            self.assertEqual([n["alive"] for n in status["feed"]["nexuses"]], [False, False])
            self.assertGreaterEqual(status["table"]["apps"], 1)  # the last table, kept
        n2 = self.hammer(lb_ports, 1.0, "backend-1")

        # 3. while every nexus is down the runner moves to another backend; a restarted
        #    nexus gives the routers the fresh table within 3 heartbeat periods
        standin = self.scripts[0]
        standin.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while json.loads(state_file.read_text())["announced"] != "2":
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.02)
        self.hammer(lb_ports, 0.3, "backend-1")  # still the stale table
        again = self.start_nexus(0)
        again.wait_for_log("heartbeats at", timeout=30)  # the nexus service started
        t0 = time.monotonic()
        t1 = self.wait_body(lb_ports, "backend-2", timeout=15)
        refresh = t1 - t0
        for r in routers:
            r.wait_for_log("answers again: the route table is fresh", timeout=5)
            status = json.loads(urllib.request.urlopen(
                f"http://127.0.0.1:{r.metrics_port}/status", timeout=5).read())["router"]
            self.assertEqual(status["feed"]["state"], "live")
            self.assertFalse(status["feed"]["stale"])
        print(f"\nnexus redundancy: {n1} + {n2} requests answered with nexuses dying; "
              f"fresh table {refresh:.2f}s after the restarted nexus started "
              f"(heartbeat period {INTERVAL}s); test took {time.monotonic() - started:.1f}s")
        self.assertLessEqual(refresh, 3 * INTERVAL)


class IPv6Tests(RedundancyTests):
    """The same path over IPv6 only: bus endpoints, router listener and backend on ::1."""

    ADDR = "::1"

    def status(self, router: NodeProcess) -> dict[str, Any]:
        url = f"http://127.0.0.1:{router.metrics_port}/status"  # type: ignore[attr-defined]
        return json.loads(urllib.request.urlopen(url, timeout=5).read())["router"]


class RedundancyTests(ClusterCase):
    def test_redundancy(self) -> None:
        """Over ::1 a heartbeat routes a request, and losing one nexus loses no request."""
        self.start_standin()
        nexus = [self.start_nexus(0), self.start_nexus(1)]
        port = free_port(self.ADDR)
        router = self.start_router(port, 0)
        for n in nexus:
            n.wait_for_log(" ready: ", timeout=30)
        wait_for_port(self.ADDR, port, timeout=30)
        self.wait_body([port], "backend-1", timeout=15)
        self.assertIn("following nexus", router.output())
        nexus[1].kill()
        self.hammer([port], 2.5, "backend-1")


class FeedProcessTests(ClusterCase):
    def test_no_nexus_listens_after_routes_wait(self) -> None:
        """With no nexus answering, a router listens after lb.routes_wait, and says so."""
        port = free_port(self.ADDR)
        router = self.start_router(port, 0, "routes_wait = 0.5\n")
        wait_for_port(self.ADDR, port, timeout=30)
        router.wait_for_log("no route table after 0.5s (lb.routes_wait)", timeout=5)
        self.assertEqual(get(port, addr=self.ADDR)[0], 404)
        self.assertEqual(self.status(router)["feed"]["state"], "starting")

    def test_feed_process_serves_every_worker_and_survives_a_crash(self) -> None:
        """One route feed process serves the router and its worker; killed, the router
        keeps its table and says so, the feed comes back and the routes move on; the
        router killed, its children go too."""
        state_file = self.start_standin()
        nexus = [self.start_nexus(0), self.start_nexus(1)]
        port = free_port(self.ADDR)
        router = self.start_router(port, 0, "workers = 2\n")
        for n in nexus:
            n.wait_for_log(" ready: ", timeout=30)
        wait_for_port(self.ADDR, port, timeout=30)
        self.wait_body([port], "backend-1", timeout=15)
        deadline = time.monotonic() + 10
        while len(child_processes(router.proc.pid, "epio.lb.worker")) != 1:
            self.assertLess(time.monotonic(), deadline, "no worker process")
            time.sleep(0.05)
        # one feed for the node: the worker follows it, not the nexuses
        feeds = child_processes(router.proc.pid, "epio.lb.feed")
        self.assertEqual(len(feeds), 1)
        (worker,) = child_processes(router.proc.pid, "epio.lb.worker")
        self.assertEqual(child_processes(worker, "epio.lb.feed"), [])
        self.hammer([port], 0.5, "backend-1")  # new connections: both processes answer
        status = self.status(router)
        self.assertEqual(status["feed"]["state"], "live")
        self.assertTrue(status["feed"]["process"]["connected"])
        self.assertEqual(status["feed"]["alive"], 2)

        # the feed process dies: not one request fails, the status says stale
        os.kill(feeds[0], signal.SIGKILL)
        deadline = time.monotonic() + 5
        while self.status(router)["feed"]["process"]["connected"]:
            self.assertLess(time.monotonic(), deadline, "the router did not notice")
            time.sleep(0.02)
        status = self.status(router)["feed"]
        self.assertEqual((status["state"], status["stale"]), ("stale", True))
        self.hammer([port], 0.5, "backend-1")
        router.wait_for_log("route feed process exited; restarting it", timeout=5)

        # it is back (a new process) and the routes move on through it, in both processes
        deadline = time.monotonic() + 10
        while self.status(router)["feed"]["state"] != "live":
            self.assertLess(time.monotonic(), deadline, "the feed did not come back")
            time.sleep(0.05)
        again = child_processes(router.proc.pid, "epio.lb.feed")
        self.assertEqual(len(again), 1)
        self.assertNotEqual(again, feeds)
        self.scripts[0].send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while json.loads(state_file.read_text())["announced"] != "2":
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.02)
        self.wait_body([port], "backend-2", timeout=5)
        time.sleep(0.2)  # the other router process applies the same frame
        self.hammer([port], 0.5, "backend-2")

        # a router killed outright takes its worker and its feed with it: no orphan
        # keeps the port or follows the nexuses for nobody
        (worker,) = child_processes(router.proc.pid, "epio.lb.worker")
        os.kill(router.proc.pid, signal.SIGKILL)
        router.proc.wait()
        deadline = time.monotonic() + 10
        while any(os.path.exists(f"/proc/{pid}/cmdline")
                  and Path(f"/proc/{pid}/cmdline").read_bytes() for pid in (worker, again[0])):
            self.assertLess(time.monotonic(), deadline, "a child outlived its router")
            time.sleep(0.05)

