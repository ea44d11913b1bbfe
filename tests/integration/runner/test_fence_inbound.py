"""The fence's inbound half with real nftables across network namespaces: a "runner
host" namespace with an instance listening in its port range, a "client host"
namespace with several addresses; only the addresses the store lists as routers (an
``lb`` node's row, followed by a real :class:`~epio.cluster.ClusterDirectory` on a real
PostgreSQL store) reach the instance ports (root + nft + ip netns; both namespaces
and the veth between them are removed even when the test fails)."""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.trial.unittest import TestCase

from epio.cluster import ClusterDirectory
from epio.config import validate
from epio.runner.fence import Nft, make_fence
from epio.store import open_store
from tests.store import pg

from .test_fence import CLIENT_PYTHON
from .test_fence import SKIP as FENCE_SKIP

IP = shutil.which("ip")
NSENTER = shutil.which("nsenter")
PORT_MIN, PORT_MAX = 20000, 20099
WEB, ADDON, STATIC, OUTSIDE = 20005, 20007, 20200, 20300  # ports in the runner's namespace

SERVE = r'''
import socket, sys, time
socks = []
for port in map(int, sys.argv[2:]):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[1], port))
    s.listen(64)
    socks.append(s)
print("listening", flush=True)
time.sleep(600)
'''

CONNECT_FROM = r'''
import errno, json, socket, sys
out = []
for source, host, port in json.loads(sys.argv[1]):
    s = socket.socket()
    s.settimeout(3)
    try:
        s.bind((source, 0))
        s.connect((host, port))
        out.append("ok")
    except socket.timeout:
        out.append("timeout")
    except OSError as e:
        out.append(errno.errorcode.get(e.errno, str(e.errno)))
    finally:
        s.close()
print(json.dumps(out))
'''


def skip_reason() -> str | None:
    if FENCE_SKIP:
        return FENCE_SKIP
    if IP is None or NSENTER is None:
        return "needs ip (iproute2) and nsenter"
    return None


class NsNft(Nft):
    """The ``nft`` command inside one network namespace."""

    def __init__(self, ns: str) -> None:
        super().__init__(NSENTER or "nsenter")
        self.ns = ns

    def _run(self, args: list[str], text: str | None = None) -> subprocess.CompletedProcess[str]:
        return super()._run(["--net=/run/netns/" + self.ns, "nft", *args], text)


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=20)


class InboundFenceTests(TestCase):
    timeout = 40

    if skip_reason():
        skip = skip_reason()

    def netns(self) -> tuple[str, str, str]:
        """Two namespaces joined by a veth: (runner ns, client ns, subnet prefix)."""
        tag = secrets.token_hex(3)
        run_ns, client_ns = f"epfi-{tag}-r", f"epfi-{tag}-c"
        net = f"10.{200 + int(tag[:2], 16) % 50}.{int(tag[2:4], 16)}"

        def remove() -> None:
            for ns in (run_ns, client_ns):
                subprocess.run([IP or "ip", "netns", "del", ns], capture_output=True, timeout=20)

        self.addCleanup(remove)
        for ns in (run_ns, client_ns):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "link", "add", f"efi{tag}r", "netns", run_ns, "type", "veth",
           "peer", "name", f"efi{tag}c", "netns", client_ns)
        sh("ip", "-n", run_ns, "addr", "add", f"{net}.1/24", "dev", f"efi{tag}r")
        for host in (2, 3, 4):
            sh("ip", "-n", client_ns, "addr", "add", f"{net}.{host}/24", "dev", f"efi{tag}c")
        sh("ip", "-n", run_ns, "link", "set", f"efi{tag}r", "up")
        sh("ip", "-n", client_ns, "link", "set", f"efi{tag}c", "up")
        return run_ns, client_ns, net

    def serve(self, ns: str, host: str, ports: list[int]) -> None:
        p = subprocess.Popen([NSENTER or "nsenter", "--net=/run/netns/" + ns, CLIENT_PYTHON,
                              "-c", SERVE, host, *map(str, ports)],
                             stdout=subprocess.PIPE, text=True)

        def stop() -> None:
            p.kill()
            p.wait()
            if p.stdout is not None:
                p.stdout.close()

        self.addCleanup(stop)
        assert p.stdout is not None
        self.assertEqual(p.stdout.readline().strip(), "listening")

    def connect(self, ns: str, attempts: list[tuple[str, str, int]]) -> list[str]:
        r = subprocess.run([NSENTER or "nsenter", "--net=/run/netns/" + ns, CLIENT_PYTHON,
                            "-c", CONNECT_FROM, json.dumps(attempts)],
                           capture_output=True, text=True, timeout=30, check=True)
        return list(json.loads(r.stdout))

    def directory(self, store: Any, node_id: str, roles: list[str],
                  addresses: list[str]) -> ClusterDirectory:
        data = Path(tempfile.mkdtemp(prefix="epio-fi-"))
        self.addCleanup(shutil.rmtree, data, True)
        settings = validate({"node": {"id": node_id}, "cluster": {
            "nexus": [], "loggers": [], "follow_interval": 0.2}}).settings
        return ClusterDirectory(reactor, lambda: defer.succeed(store), node_id, settings,
                                roles, data, addresses=lambda: list(addresses))

    async def until(self, what: Any, timeout: float = 10.0) -> float:
        start = time.monotonic()
        while not what():
            if time.monotonic() - start > timeout:
                self.fail("timed out")
            await task.deferLater(reactor, 0.05, lambda: None)
        return time.monotonic() - start

    async def test_only_routers_listed_in_the_store_reach_instance_ports(self) -> None:
        """From another host, the instance port and the static server's port accept
        only the router's address (listed by an lb node in the store); another address
        is reset, except on a dedicated add-on server's port, and a port outside the
        guarded ones is untouched; the runner's own host always passes.  A second
        router listed later passes once the runner's directory read it (follow
        interval 0.2 s) and is reset again once it unlisted itself."""
        run_ns, client_ns, net = self.netns()
        runner_ip, router, other, late = (f"{net}.{h}" for h in (1, 2, 3, 4))
        self.serve(run_ns, runner_ip, [WEB, ADDON, STATIC, OUTSIDE])
        store = await open_store(pg.pg_url_for_test(self), reactor)
        self.addCleanup(store.close)
        lb1 = self.directory(store, "lb-1", ["lb"], [router])
        await lb1.tick()  # lists its address
        runner_dir = self.directory(store, "runner-1", ["runner"], [runner_ip])
        data = Path(tempfile.mkdtemp(prefix="epio-fi-"))
        self.addCleanup(shutil.rmtree, data, True)
        settings = validate({
            "node": {"id": "runner-1"},
            "runner": {"port_min": PORT_MIN, "port_max": PORT_MAX,
                       "fence_table": "epio_fence_inbound", "fence_check_interval": 0},
        }).settings
        fence = make_fence(reactor, settings, ["runner"], data, lambda: (), uids=lambda: (),
                           routers=lambda: runner_dir.current.routers,
                           servers=lambda: [ADDON], inbound=lambda: [STATIC],
                           nft=NsNft(run_ns), euid=0, nft_binary="nft")
        runner_dir.observe(lambda _lists: fence.changed())
        fence.startService()
        self.addCleanup(fence.stopService)
        runner_dir.startService()
        self.addCleanup(runner_dir.stopService)
        await self.until(lambda: fence.applied is not None and router in fence.applied)
        self.assertEqual(fence.report()["routers"], [router])

        self.assertEqual(self.connect(client_ns, [
            (router, runner_ip, WEB), (router, runner_ip, STATIC),
            (other, runner_ip, WEB), (other, runner_ip, STATIC),
            (other, runner_ip, ADDON), (other, runner_ip, OUTSIDE),
            (late, runner_ip, WEB),
        ]), ["ok", "ok", "ECONNREFUSED", "ECONNREFUSED", "ok", "ok", "ECONNREFUSED"])
        self.assertEqual(self.connect(run_ns, [(runner_ip, runner_ip, WEB)]), ["ok"])

        lb2 = self.directory(store, "lb-2", ["lb"], [late])
        lb2.startService()  # lists itself at once
        took = await self.until(lambda: late in (fence.applied or ""))
        self.assertLess(took, 5.0)
        self.assertEqual(self.connect(client_ns, [(late, runner_ip, WEB),
                                                  (other, runner_ip, WEB)]),
                         ["ok", "ECONNREFUSED"])
        await lb2.stopService()  # removes its row: out after the next read
        await self.until(lambda: late not in (fence.applied or ""))
        self.assertEqual(self.connect(client_ns, [(late, runner_ip, WEB),
                                                  (router, runner_ip, WEB)]),
                         ["ECONNREFUSED", "ok"])

    def test_host_addresses_skip_loopback_and_link_local(self) -> None:
        """A node's own addresses as an lb row lists them: the veth's global ones only."""
        run_ns, client_ns, net = self.netns()
        r = subprocess.run([NSENTER or "nsenter", "--net=/run/netns/" + client_ns,
                            sys.executable, "-c",
                            "import sys; sys.path.insert(0, sys.argv[1]); "
                            "from epio.cluster import host_addresses; print(host_addresses())",
                            str(Path(__file__).resolve().parents[3])],
                           capture_output=True, text=True, timeout=30, check=True)
        self.assertEqual(r.stdout.strip(), str([f"{net}.2", f"{net}.3", f"{net}.4"]))
