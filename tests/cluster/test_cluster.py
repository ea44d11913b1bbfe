"""Chaos on a real multi-host cluster: hosts are network namespaces (harness.py).

One cluster for the whole class (10 hosts: 2 api+lb+logger, 2 nexus, 3 runners,
1 backup with the PostgreSQL store's primary, 1 more api, 1 with the store's standby);
the cases run in order on it and each prints its figures (``pytest -s``;
docs/cluster.md quotes them):

1. deploy examples/wsgi with the ``epio`` CLI, scale web to 3: instances on
   several runner hosts, answered through both routers;
2. kill an lb host (SIGKILL + link down) under load on the other router;
3. kill a nexus host under load;
4. kill a runner host holding an instance under load: failed requests and
   seconds until 3 healthy instances again, asserted within REPLACE_BOUND (5 s) of
   the dead runner's heartbeat expiry as the scheduler logs it;
5. kill the store's primary host under load and promote its standby: requests
   through the router keep succeeding, the scheduler leader is re-elected, a scale
   and a config change made after the promotion take effect, with no other step;
6. kill the host of the scheduler's leader: another api takes over;
7. a bare host joins as a runner and logger with ``epio-admin join`` and a join token;
   every node follows the store's lists to its logger; an instance scaled onto it
   answers through the routers.
8. partition a runner host from the nexus hosts for 10 s under load (nft in its
   namespace; routers and apis still reach it), then heal: failed requests,
   re-placement (none), seconds to full routed capacity after the heal, no duplicate
   instance (a router host is revived first when cases 2 and 6 left none);
9. the bus between hosts is CurveZMQ: a raw capture on the nexus host's link sees
   no byte of a member's request in clear; outsider clients get no handshake or no
   answer.

Skipped with ``EPIO_SKIP_CLUSTER=1``, and (saying why) when not root or
without ``ip``/``nsenter``/PostgreSQL 15.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import unittest
from typing import Any

from tests.cluster.harness import (
    API_SETTINGS,
    NET,
    STORE_HOST,
    Cluster,
    Host,
    in_ns,
    sh,
    unavailable,
    wait_until,
)
from tests.cluster.harness import (
    Node as ClusterNode,
)
from tests.util import CHECKOUT, epio_env

APP = "hello"
HOST_HEADER = f"{APP}.localhost"
BODY = f"Hello from epio! ({APP})\n"


class Load:
    """Paced GET requests through one router from a few threads, on keep-alive
    connections: at most ``rate`` a second for at most ``seconds`` (so at most
    rate*seconds requests).  Every failure is recorded with its time."""

    def __init__(self, addr: str, rate: int = 200, seconds: float = 10.0,
                 threads: int = 4) -> None:
        self.addr, self.rate, self.seconds, self.threads = addr, rate, seconds, threads
        self.ok = 0
        self.failures: list[tuple[float, str]] = []
        self.latencies: list[float] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                         for i in range(threads)]
        self.t0 = 0.0

    def start(self) -> Load:
        self.t0 = time.monotonic()
        for t in self._threads:
            t.start()
        return self

    def join(self) -> Load:
        for t in self._threads:
            t.join(self.seconds + 30)
        return self

    def _run(self, i: int) -> None:
        period = self.threads / self.rate
        n_max = int(self.seconds * self.rate / self.threads)
        conn: http.client.HTTPConnection | None = None
        for n in range(n_max):
            due = self.t0 + (n + i / self.threads) * period
            now = time.monotonic()
            if now - self.t0 > self.seconds:
                break
            if due > now:
                time.sleep(due - now)
            start = time.monotonic()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(self.addr, 8080, timeout=10)
                conn.request("GET", "/", headers={"Host": HOST_HEADER})
                resp = conn.getresponse()
                body = resp.read().decode("utf-8", "replace")
                result = "ok" if (resp.status, body) == (200, BODY) else \
                    f"{resp.status} {body[:80]!r}"
                if resp.getheader("Connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as e:
                result = f"{type(e).__name__}: {e}"
                if conn is not None:
                    conn.close()
                conn = None
            with self._lock:
                self.latencies.append(time.monotonic() - start)
                if result == "ok":
                    self.ok += 1
                else:
                    self.failures.append((start - self.t0, result))
        if conn is not None:
            conn.close()

    def figures(self) -> str:
        sent = self.ok + len(self.failures)
        lat = sorted(self.latencies) or [0.0]
        kinds: dict[str, int] = {}
        for _, f in self.failures:
            kinds[f] = kinds.get(f, 0) + 1
        return (f"{sent} requests in {self.seconds:g}s (target {self.rate}/s) to "
                f"{self.addr}: {self.ok} ok, {len(self.failures)} failed "
                f"{dict(list(kinds.items())[:5])}; latency p50 {lat[len(lat) // 2] * 1000:.0f} ms, "
                f"p99 {lat[int(len(lat) * 0.99)] * 1000:.0f} ms, max {lat[-1] * 1000:.0f} ms")


def get(addr: str, path: str = "/") -> tuple[int, str]:
    conn = http.client.HTTPConnection(addr, 8080, timeout=10)
    try:
        conn.request("GET", path, headers={"Host": HOST_HEADER})
        resp = conn.getresponse()
        return resp.status, resp.read().decode("utf-8", "replace")
    finally:
        conn.close()


def secs(t: float | None, bound: float = 45) -> str:
    return f"never (within {bound:g}s)" if t is None else f"{t:.1f}s"


#: Seconds after a dead runner's heartbeat expiry (its last answer to the scheduler +
#: api.runner_dead_after) by which its stateless instances run healthy, and are routed,
#: on other runners (issue 20; docs/cluster.md case 4).
REPLACE_BOUND = 5.0


def gone_expiry(cluster: Cluster, node: str, after: float) -> float | None:
    """The expiry the scheduler logged for runner ``node`` ("runner NODE is gone: ...
    (expired HH:MM:SS.mmm"), as epoch seconds: the latest such line of any api host,
    read as the UTC day of ``after`` (an expiry is within seconds of it)."""
    import calendar
    import re

    found = None
    pattern = re.compile(rf"runner {re.escape(node)} is gone: .*?\(expired "
                         r"(\d\d):(\d\d):(\d\d)\.(\d{3})")
    day = time.gmtime(after)
    midnight = calendar.timegm((day.tm_year, day.tm_mon, day.tm_mday, 0, 0, 0))
    for h in cluster.with_role("api"):
        for m in pattern.finditer(h.node.output() if h.node else ""):
            hh, mm, ss, ms = (int(g) for g in m.groups())
            t = midnight + hh * 3600 + mm * 60 + ss + ms / 1000
            if t < after - 43200:  # past midnight since ``after``
                t += 86400
            if t >= after - 60 and (found is None or t > found):
                found = t
    return found


PARTITION_TABLE = "epioc_partition"


REACH = r'''
import errno, socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET)
s.settimeout(5)
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    print("ok")
except socket.timeout:
    print("timeout")
except OSError as e:
    print(errno.errorcode.get(e.errno, str(e.errno)))
'''


def reach(host: Host, addr: str, port: int) -> str:
    """Whether a TCP connection from ``host``'s namespace to ``addr:port`` opens."""
    return subprocess.run([*in_ns(host.ns), sys.executable, "-c", REACH, addr, str(port)],
                          capture_output=True, text=True, timeout=30, check=True).stdout.strip()


def placement(ps: list[dict[str, Any]]) -> list[str]:
    """Where each instance runs: ``web.N@node`` (a re-placed one changes node)."""
    return sorted(f"{p['name']}@{p['node']}" for p in ps)


def partition(host: Host, others: list[Host]) -> None:
    """Drop every packet between ``host`` and ``others`` (an nft table of its own in
    ``host``'s namespace, both directions); the rest of the network is untouched."""
    addrs = ", ".join(h.addr for h in others)
    rules = (f"table inet {PARTITION_TABLE} {{\n"
             f"  chain in {{ type filter hook input priority -300; ip saddr {{ {addrs} }} drop; }}\n"
             f"  chain out {{ type filter hook output priority -300; ip daddr {{ {addrs} }} drop; }}\n"
             "}\n")
    subprocess.run([*in_ns(host.ns), "nft", "-f", "-"], input=rules, text=True, check=True,
                   capture_output=True, timeout=20)


def heal(host: Host) -> None:
    sh(*in_ns(host.ns), "nft", "delete", "table", "inet", PARTITION_TABLE, check=False)


def probe(host: Host, *args: str) -> list[dict[str, Any]]:
    """Run tests/cluster/busprobe.py in ``host``'s namespace; its JSON lines."""
    r = subprocess.run([*in_ns(host.ns), sys.executable, "-m", "tests.cluster.busprobe", *args],
                       capture_output=True, text=True, env=epio_env(), cwd=str(CHECKOUT),
                       timeout=60)
    if r.returncode != 0:
        raise AssertionError(f"busprobe {args[0]} exited {r.returncode}: {r.stderr[-2000:]}")
    return [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]


class RouteWatch:
    """The app's routed instances as one nexus lists them (``nexus.where`` every 0.2 s,
    by busprobe.py from the machine's own namespace, over the bridge)."""

    def __init__(self, cluster: Cluster, nexus: Host, seconds: float) -> None:
        self.samples: list[tuple[float, list[str] | None]] = []  # (monotonic, ids)
        self._offset = time.time() - time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.cluster.busprobe", "where",
             str(cluster.root / "cluster-secret"), f"tcp://{nexus.addr}:7712", APP,
             str(seconds), "0.2"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, env=epio_env(), cwd=str(CHECKOUT))
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                d = json.loads(line)
            except ValueError:
                continue
            ids = d.get("backends")
            self.samples.append((float(d["t"]) - self._offset, ids))

    def wait_first(self, timeout: float = 30) -> None:
        wait_until("the first nexus.where answer",
                   lambda: any(ids is not None for _, ids in self.samples), timeout=timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def _answers(self, since: float, until: float = float("inf")) -> list[tuple[float, list[str]]]:
        return [(t, ids) for t, ids in list(self.samples) if ids is not None and since <= t <= until]

    def count_since(self, since: float) -> int:
        got = self._answers(since)
        return len(got[-1][1]) if got else -1

    def first_since(self, since: float, n: int) -> float:
        return next(t for t, ids in self._answers(since) if len(ids) == n)

    def first_below(self, since: float, n: int) -> float | None:
        return next((t for t, ids in self._answers(since) if len(ids) < n), None)

    def min_between(self, since: float, until: float) -> int:
        return min((len(ids) for _, ids in self._answers(since, until)), default=-1)

    def last_backends(self) -> list[str]:
        got = self._answers(0)
        return got[-1][1] if got else []


class Capture:
    """Every IPv4 TCP frame to or from ``port`` on the link ``ifname`` (a raw packet
    socket in the machine's namespace on a host's veth: no tcpdump needed), read by a
    thread until :meth:`stop`, which returns the TCP payload bytes."""

    def __init__(self, ifname: str, port: int) -> None:
        import socket

        self.port = port
        self.frames = 0
        self.mechanisms: set[str] = set()
        self._payload = bytearray()
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        self._sock.bind((ifname, 0))
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                frame = self._sock.recv(65535)
            except OSError:
                continue
            if len(frame) < 34 or frame[12:14] != b"\x08\x00" or frame[23] != 6:
                continue  # not IPv4 TCP
            ihl = (frame[14] & 0x0F) * 4
            tcp = frame[14 + ihl:]
            if len(tcp) < 20:
                continue
            sport, dport = int.from_bytes(tcp[0:2], "big"), int.from_bytes(tcp[2:4], "big")
            if self.port not in (sport, dport):
                continue
            total = int.from_bytes(frame[16:18], "big")
            data = tcp[(tcp[12] >> 4) * 4:total - ihl]
            self.frames += 1
            self._payload += data

    def stop(self) -> bytes:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()
        wire = bytes(self._payload)
        # ZMTP 3 greetings name their security mechanism in clear: 20 bytes, NUL-padded
        for mechanism in ("NULL", "PLAIN", "CURVE"):
            if mechanism.encode() + b"\0" * (20 - len(mechanism)) in wire:
                self.mechanisms.add(mechanism)
        return wire


def report(case: str, text: str) -> None:
    print(f"\n[cluster {case}] {text}", flush=True)


@unittest.skipIf(os.environ.get("EPIO_SKIP_CLUSTER") == "1", "EPIO_SKIP_CLUSTER=1")
class ClusterChaosTests(unittest.TestCase):
    """The cases share one cluster and run in name order; each needs the ones before."""

    cluster: Cluster
    deployed = False

    @classmethod
    def setUpClass(cls) -> None:
        why = unavailable()
        if why:
            raise unittest.SkipTest(why)
        cls.started = time.monotonic()
        cls.cluster = Cluster()
        cls.addClassCleanup(cls._down)
        try:
            cls.cluster.up()
        except RuntimeError as e:
            if "holds" in str(e):
                raise unittest.SkipTest(str(e)) from None
            raise AssertionError(f"{e}\n{cls.cluster.outputs()}") from None
        except AssertionError as e:
            raise AssertionError(f"{e}\n{cls.cluster.outputs()}") from None
        report("up", f"10 hosts, 9 nodes and PostgreSQL with a standby, up in "
                     f"{time.monotonic() - cls.started:.1f}s")
        cls.cli_dir = cls.cluster.root / "cli"
        shutil.copytree(CHECKOUT / "examples" / "wsgi", cls.cli_dir / "wsgi")

    @classmethod
    def _down(cls) -> None:
        t = time.monotonic()
        cls.cluster.down()
        report("down", f"removed in {time.monotonic() - t:.1f}s; whole class "
                       f"{time.monotonic() - cls.started:.1f}s")

    # -- helpers -----------------------------------------------------------------------

    def epio(self, *args: str, timeout: float = 180) -> str:
        env = epio_env({"EPIO_API": self.cluster.api_url(self.live_api()),
                        "EPIO_TOKEN": self.cluster.token,
                        "EPIO_CONFIG_DIR": str(self.cli_dir / "config")})
        proc = subprocess.run(
            [sys.executable, "-c", "import sys; from epio.cli.main import main; sys.exit(main())",
             *args], capture_output=True, text=True, env=env, cwd=self.cli_dir, timeout=timeout)
        if proc.returncode != 0:
            self.fail(f"epio {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n"
                      f"{proc.stderr}\n{self.cluster.outputs()}")
        return proc.stdout

    def live_api(self) -> Host:
        return next(h for h in self.cluster.with_role("api") if h.is_up())

    def ps(self) -> list[dict[str, Any]]:
        return [p for p in json.loads(self.epio("ps", "--app", APP, "--json"))
                if p["name"].startswith("web.")]

    def healthy(self) -> list[dict[str, Any]]:
        return [p for p in self.ps() if p["state"] == "healthy"]

    def need_deploy(self) -> None:
        if not type(self).deployed:
            self.skipTest("case 1 (deploy) did not pass")

    def router(self, name: str) -> Host:
        return self.cluster.hosts[name]

    def wait_routed(self, addr: str, n: int = 20, timeout: float = 30) -> None:
        """Until ``n`` requests in a row through the router at ``addr`` are answered."""
        wait_until(f"{addr} answers {n} in a row", lambda: all(
            get(addr) == (200, BODY) for _ in range(n)), timeout=timeout)

    # -- the cases ---------------------------------------------------------------------

    def test_1_deploy_scale_both_routers(self) -> None:
        """Deploy with the CLI, scale web to 3 on several runner hosts, both routers answer."""
        t0 = time.monotonic()
        self.epio("apps", "create", APP)
        out = self.epio("deploy", "wsgi", "--app", APP, "--poll", "0.5", timeout=240)
        self.assertIn(f"{APP} is live", out)
        deployed = time.monotonic() - t0
        self.epio("scale", "web=3", "--app", APP)
        ps = wait_until("3 healthy web instances", lambda: (
            lambda h: h if len(h) == 3 else None)(self.healthy()), timeout=90)
        scaled = time.monotonic() - t0 - deployed
        hosts = sorted({p["host"] for p in ps})
        nodes = sorted({p["node"] for p in ps})
        self.assertGreaterEqual(len(nodes), 2, ps)
        routers = [h.addr for h in self.cluster.with_role("lb")]
        for addr in routers:
            self.wait_routed(addr)
        counts = {}
        for addr in routers:  # a bounded burst through each router: 100 requests
            results = [get(addr) for _ in range(100)]
            counts[addr] = (sum(r == (200, BODY) for r in results),
                            [r for r in results if r != (200, BODY)][:3])
        # the image was built on one runner; the others fetched it from a peer host
        fetched = {h.name: next(ln.split("] ", 1)[1] for ln in h.node.output().splitlines()
                                if "fetched image" in ln)
                   for h in self.cluster.with_role("runner")
                   if h.node and "fetched image" in h.node.output()}
        report("1 deploy", f"deploy {deployed:.1f}s, scale to 3 {scaled:.1f}s; instances on "
                           f"{nodes} at {hosts}; through routers (ok, failures): {counts}; "
                           f"images fetched across hosts: {fetched}")
        self.assertGreaterEqual(len(fetched), len(nodes) - 1, fetched)
        # each runner host's fence is on, in its own namespace only: the routers on other
        # hosts reached the instances through it (above)
        root_tables = sh("nft", "list", "tables", check=False).stdout
        for h in self.cluster.with_role("runner"):
            self.assertIn("network fence ON", h.node.output() if h.node else "")
            tables = sh(*in_ns(h.ns), "nft", "list", "tables").stdout.split()
            fence = [t for t in tables if t.startswith("epio_fence_")]
            self.assertEqual(len(fence), 1, tables)
            self.assertNotIn(fence[0], root_tables)
        # from other hosts only the routers (listed in the store by the lb nodes) open a
        # connection to an instance port: a nexus host is reset by the runner's fence
        target = (str(ps[0]["host"]), int(ps[0]["port"]))
        self.assertEqual(reach(self.cluster.with_role("lb")[0], *target), "ok")
        self.assertEqual(reach(self.cluster.with_role("nexus")[0], *target), "ECONNREFUSED")
        for name, line in fetched.items():
            self.assertIn(f"from tcp://{NET}.", line)
            self.assertNotIn(f"from tcp://{self.cluster.hosts[name].addr}:", line)
        for ok, _ in counts.values():
            self.assertEqual(ok, 100, counts)
        type(self).deployed = True

    def test_2_kill_lb_host(self) -> None:
        """An lb host dies under load on the other router: not one request fails."""
        self.need_deploy()
        # the victim is the lb host whose api does not lead the scheduler: a leader whose
        # host vanishes keeps the lock until the server drops its session (case 6), and case 4 needs a scheduler
        leader = self.cluster.leader()
        victim = self.router("h1" if leader is self.router("h2") else "h2")
        other = self.router("h2" if victim.name == "h1" else "h1")
        load = Load(other.addr, rate=200, seconds=8).start()
        time.sleep(2)
        victim.kill()
        load.join()
        report("2 kill lb host", f"{victim.name} ({','.join(victim.roles)}) killed at 2 s: "
                                 + load.figures())
        self.assertEqual(load.failures, [], load.figures())
        self.assertGreater(load.ok, 0)

    def test_3_kill_nexus_host(self) -> None:
        """A nexus host dies under load: the router follows the other nexus, 0 failures."""
        self.need_deploy()
        router, victim = self.live_router(), self.cluster.hosts["h3"]
        load = Load(router.addr, rate=200, seconds=8).start()
        time.sleep(2)
        victim.kill()
        load.join()
        report("3 kill nexus host", f"{victim.name} killed at 2 s: " + load.figures())
        self.assertEqual(load.failures, [], load.figures())
        self.assertGreater(load.ok, 0)

    def test_4_kill_runner_host(self) -> None:
        """A runner host holding an instance dies under load: failures and time to 3 again."""
        self.need_deploy()
        router = self.live_router()
        before = self.healthy()
        self.assertEqual(len(before), 3, before)
        victim = next(self.cluster.hosts[p["node"]] for p in before)
        load = Load(router.addr, rate=200, seconds=10).start()
        time.sleep(1)
        victim.kill()
        killed = time.monotonic()
        killed_wall = time.time()
        killed_at = time.strftime("%H:%M:%S", time.gmtime())
        back = placed = None
        placed_wall = back_wall = 0.0
        deadline = killed + 45  # bounded: runner_dead_after + start + routing, with margin
        while time.monotonic() < deadline:
            try:  # the api directly (what `epio ps` asks): polled every 0.25 s
                ps = [p for p in self.cluster.api("GET", f"apps/{APP}/ps",
                                                  host=self.live_api())
                      if p["name"].startswith("web.") and p["node"] != victim.name]
            except OSError:
                ps = []
            if placed is None and len(ps) == 3:
                placed = time.monotonic() - killed
                placed_wall = time.time()
            if len([p for p in ps if p["state"] == "healthy"]) == 3:
                back = time.monotonic() - killed
                back_wall = time.time()
                break
            time.sleep(0.25)
        load.join()
        after = self.ps()
        dead_after = API_SETTINGS["runner_dead_after"]
        report("4 kill runner host",
               f"{victim.name} killed at 1 s: {load.figures()}; 3 healthy instances again "
               f"after {secs(back)} (placed elsewhere after {secs(placed)}) "
               f"(api.runner_dead_after {dead_after}s); instances now "
               f"{[(p['name'], p['node'], p['state']) for p in after]}")
        api_log = self.live_api().node.output()  # type: ignore[union-attr]
        print("\n".join(ln[:240] for ln in api_log.splitlines()
                        if victim.name in ln and ln[11:19] >= killed_at), flush=True)
        self.assertIsNotNone(back, f"capacity not restored: {after}")
        # issue 20's goal: placed elsewhere and routed within REPLACE_BOUND seconds of the
        # dead runner's expiry (its last answer + api.runner_dead_after, as the
        # scheduler logs it: the same clock as this process's)
        expiry = gone_expiry(self.cluster, victim.name, killed_wall)
        self.assertIsNotNone(expiry, "the scheduler logged no 'is gone' for the victim")
        assert expiry is not None
        print(f"[cluster 4 kill runner host] heartbeat expiry {expiry - killed_wall:.1f}s "
              f"after the kill; placed elsewhere {placed_wall - expiry:.1f}s and 3 healthy "
              f"(routed) {back_wall - expiry:.1f}s after the expiry (bound {REPLACE_BOUND:g}s)",
              flush=True)
        self.assertLessEqual(back_wall - expiry, REPLACE_BOUND, load.figures())
        # A request already at the instance when its host vanished gets no answer: the
        # router does not retry a request whose backend went silent (504 after
        # lb.first_byte_timeout; this client gives up after 10 s).  Counted apart; every
        # other request must be answered (a new one meets a connect timeout and the
        # router tries the next backend).
        in_flight = [f for f in load.failures
                     if f[0] < killed - load.t0 and ("timed out" in f[1] or f[1][:3] == "504")]
        others = [f for f in load.failures if f not in in_flight]
        print(f"[cluster 4 kill runner host] failed requests in flight at the kill: "
              f"{len(in_flight)}; other failures: {len(others)}", flush=True)
        self.assertEqual(others, [], load.figures())
        self.assertLessEqual(len(in_flight), load.threads, load.figures())

    # A leader api whose host vanishes (no FIN, no RST) would keep its PostgreSQL
    # session, and with it the scheduler's advisory lock, until the *server* notices the
    # dead peer (the system's keepalive: 2 hours). Every store session asks the server for
    # keepalives and tcp_user_timeout (epio/store/backend.py PG_SERVER_OPTIONS), so the
    # lock is freed about 15 s after the host went silent and another api leads.
    def test_6_kill_scheduler_leader_host(self) -> None:
        """The host of the scheduler's leader dies: another api leads within 25 s."""
        self.need_deploy()
        victim = self.cluster.leader()
        self.assertIsNotNone(victim, "no live api leads the scheduler")
        assert victim is not None
        others = [h for h in self.cluster.with_role("api") if h.is_up() and h is not victim]
        before = self.cluster.lock_holders()
        line = "elected leader for epio.scheduler"
        seen = {h.name: h.node.output().count(line) for h in others}  # type: ignore[union-attr]
        victim.kill()
        killed = time.monotonic()
        elected = None
        while time.monotonic() < killed + 25:
            if any(h.node.output().count(line) > seen[h.name]  # type: ignore[union-attr]
                   for h in others):
                elected = time.monotonic() - killed
                break
            time.sleep(0.25)
        report("6 kill leader host",
               f"{victim.name} ({victim.addr}, leader) killed; another api elected after "
               f"{secs(elected, 25)}; advisory lock holders before {before}, after "
               f"{self.cluster.lock_holders()}")
        self.assertIsNotNone(elected, "no api took the scheduler over")

    def test_5_promote_store_standby(self) -> None:
        """The store's primary host dies under load and the standby is promoted (what an
        HA manager does): routing goes on without the store, and every role finds the new
        primary through the multi-host store URL with no other step."""
        self.need_deploy()
        c = self.cluster
        router = self.live_router()
        apis = [h for h in c.with_role("api") if h.is_up()]
        elected_line = "elected leader for epio.scheduler"

        def elections(h: Host) -> int:
            return h.node.output().count(elected_line) if h.node else 0

        before = {h.name: elections(h) for h in apis}
        load = Load(router.addr, rate=200, seconds=15).start()
        time.sleep(1)
        c.hosts[STORE_HOST].kill()  # link down, its PostgreSQL (and backup node) SIGKILLed
        killed = time.monotonic()
        killed_at = time.strftime("%H:%M:%S", time.gmtime())
        c.promote_standby()
        promoted = time.monotonic() - killed
        t: dict[str, float] = {}  # what -> seconds after the kill
        version = None
        api_errors: dict[str, int] = {}

        def call(what: str, method: str, path: str, body: Any = None) -> Any:
            try:
                return c.api(method, path, body, host=self.live_api(), timeout=3)
            except OSError as e:  # HTTPError (503 store_unavailable) or a timeout
                key = f"{what}: {getattr(e, 'code', None) or type(e).__name__}"
                api_errors[key] = api_errors.get(key, 0) + 1
                return None

        deadline = killed + 90
        while time.monotonic() < deadline and len(t) < 6:
            if "elected" not in t and any(elections(h) > before[h.name] for h in apis):
                t["elected"] = time.monotonic() - killed
            if "api reads" not in t and call("ps", "GET", f"apps/{APP}/ps") is not None:
                t["api reads"] = time.monotonic() - killed
            if "scale accepted" not in t:
                if call("scale", "PATCH", f"apps/{APP}/formation",
                        {"processes": {"web": {"quantity": 4}}}) is not None:
                    t["scale accepted"] = time.monotonic() - killed
            elif "scaled" not in t:
                ps = call("ps", "GET", f"apps/{APP}/ps") or []
                if len([p for p in ps if p["name"].startswith("web.")
                        and p["state"] == "healthy"]) == 4:
                    t["scaled"] = time.monotonic() - killed
            if version is None:
                done = call("config", "PATCH", f"apps/{APP}/config", {"FAILOVER": "1"})
                if done is not None:
                    version = done["release"]["version"]
                    t["config accepted"] = time.monotonic() - killed
            elif "config live" not in t:
                rel = call("release", "GET", f"apps/{APP}/releases/{version}")
                if rel is not None and rel["status"] == "current":
                    t["config live"] = time.monotonic() - killed
            time.sleep(0.25)
        load.join()
        leaders = [h.name for h in apis if elections(h) > before[h.name]]
        reconnected = sorted(h.name for h in c.hosts.values() if h.is_up() and h.node
                             and "store listener reconnected" in h.node.output())
        report("5 promote store standby",
               f"{STORE_HOST} (primary) killed at 1 s, standby promoted in {promoted:.1f}s; "
               f"{load.figures()}; seconds after the kill: "
               + ", ".join(f"{k} {v:.1f}" for k, v in t.items())
               + f"; re-elected on {leaders}; store listeners reconnected on {reconnected}; "
               f"api calls refused while recovering {api_errors}; advisory lock holders on "
               f"the new primary {c.lock_holders()}")
        for h in apis:  # what each api logged about the store and leadership since the kill
            print("\n".join(f"{h.name} {ln[11:19]} {ln.split('] ', 1)[-1][:200]}"
                            for ln in h.node.output().splitlines()  # type: ignore[union-attr]
                            if ln[11:19] >= killed_at and ("store " in ln or "leader" in ln)
                            )[-3000:], flush=True)
        # the routers never ask the store: not one request through them may fail
        self.assertEqual(load.failures, [], load.figures())
        for what in ("elected", "api reads", "scaled", "config live"):
            self.assertIn(what, t, f"{what}: not within 90 s of the kill ({t})")
        # the scheduler leader's LISTEN connection (the only store listener here: lb
        # nodes listen only with TLS certificates) came back on the new primary
        self.assertTrue(reconnected, "no store listener reconnected")

    def test_7_join_runner_host(self) -> None:
        """A bare host joins as a runner (and a logger) with one command (the store URL
        and a join token from the api); it gets the nexus and logger lists from the
        store, every other node's log sinks follow the store's list to its logger, an
        instance scaled onto it is answered through every live router, and the token is
        used up.  No secret in the command's output or the node's log."""
        self.need_deploy()
        c = self.cluster
        t0 = time.monotonic()
        made = c.api("POST", "cluster/join-tokens", {"node_id": "h11", "ttl": 300},
                     host=self.live_api())
        token = made["token"]
        # a runner, and a logger: every node's log sinks must follow the store's list to it
        host = c.add_host("h11", ["runner", "logger"])
        out = c.join(host, token, c.runner_sets(host))
        joined = time.monotonic() - t0
        secret = (c.root / "cluster-secret").read_text().strip()
        self.assertEqual((host.dir / "data" / "cluster-secret").read_text().strip(), secret)
        self.assertNotIn(secret, out)
        self.assertNotIn(token, out)
        used = [t for t in c.api("GET", "cluster/join-tokens", host=self.live_api())
                if t["id"] == made["info"]["id"]]
        self.assertIsNotNone(used[0]["used"], used)
        host.node = ClusterNode(host, host.roles, None)  # twistd epio --config --role only
        host.node.start()
        wait_until("h11 registered as a runner", lambda: any(
            n["id"] == "h11" and "runner" in n["roles"]
            for n in c.api("GET", "nodes", host=self.live_api())), timeout=60)
        registered = time.monotonic() - t0
        # its logger listed itself in the store: every live node with a log sink (runners,
        # apis, routers) connects to it without a word in their configs
        pull = f"tcp://{host.addr}:7721"
        sinks = [h for h in c.hosts.values() if h is not host and h.is_up() and h.node
                 and {"runner", "api", "lb"} & set(h.roles)]
        wait_until(f"every node's log sink follows to {pull}", lambda: all(
            f"bus push: connected to {pull}" in h.node.output() for h in sinks),  # type: ignore[union-attr]
            timeout=30)
        followed = time.monotonic() - t0
        # a scheduler pass places with the runners it listed when it began: one under way
        # at the registration (a pass lasts api.status_timeout while a dead runner is
        # still registered, after case 4) would place on the others.  The next pass polls
        # the new runner first: its leader's dealer connects to it.
        leader = wait_until("a live scheduler leader", c.leader, timeout=30)
        wait_until(f"the scheduler ({leader.name}) reaches h11", lambda: (
            f"connected to tcp://{host.addr}:7731" in leader.node.output()), timeout=30)
        # one more web instance: the scheduler spreads an app's type first, so it goes to
        # the runner with none of them: the new host
        n = len([p for p in c.api("GET", f"apps/{APP}/ps", host=self.live_api())
                 if p["name"].startswith("web.")])
        c.api("PATCH", f"apps/{APP}/formation", {"processes": {"web": {"quantity": n + 1}}},
              host=self.live_api())
        try:
            mine = wait_until("a healthy instance on h11", lambda: [
                p for p in c.api("GET", f"apps/{APP}/ps", host=self.live_api())
                if p["name"].startswith("web.") and p["node"] == "h11"
                and p["state"] == "healthy"], timeout=60)
        except AssertionError as e:
            ps = c.api("GET", f"apps/{APP}/ps", host=self.live_api())
            leader = c.leader()
            since = time.strftime("%H:%M:%S", time.gmtime(time.time() - (time.monotonic() - t0)))
            self.fail(f"{e}\nps: {[(p['name'], p['node'], p['state']) for p in ps]}\n"
                      f"--- h11 ---\n{host.node.output()[-6000:]}\n--- leader "
                      f"{leader.name if leader else None} since {since} ---\n"
                      + "\n".join(ln[11:19] + " " + ln.split("] ", 1)[-1][:300]
                                  for ln in (leader.node.output() if leader and leader.node
                                             else "").splitlines()
                                  if ln[11:19] >= since)[-8000:])
        healthy = time.monotonic() - t0
        self.assertEqual(mine[0]["host"], host.addr)
        backend = f"backend={host.addr}:{mine[0]['port']}"
        self.router_back("7 join runner host")  # cases 2 and 6 may have killed both
        routers = [h for h in c.with_role("lb") if h.is_up()]
        answered: dict[str, int] = {}
        for r in routers:
            wait_until(f"{r.name} routes to h11's instance", lambda r=r: self.routed_to(
                r, backend, f"/join-wait-{r.name}-"), timeout=30, interval=0.5)
            results = [get(r.addr, f"/join-probe-{r.name}-{i}") for i in range(100)]
            answered[r.name] = sum(x == (200, BODY) for x in results)
        reached = {r.name: wait_until(f"access lines of {r.name}'s probes", lambda r=r: (
            lambda lines: lines if len(lines) >= 100 else None)(
                self.access_lines(f"/join-probe-{r.name}-")), timeout=20) for r in routers}
        on_new = {name: sum(backend in ln for ln in lines) for name, lines in reached.items()}
        report("7 join runner host",
               f"h11 ({host.addr}) joined in {joined:.1f}s (one command), registered as a "
               f"runner after {registered:.1f}s, its logger followed by "
               f"{sorted(h.name for h in sinks)} after {followed:.1f}s, its instance "
               f"healthy after {healthy:.1f}s "
               f"(web {n} -> {n + 1}); 100 requests through each router (answered): "
               f"{answered}; of them at h11's instance ({backend}): {on_new}; join said: "
               + " | ".join(ln.strip() for ln in out.splitlines()[:5]))
        self.assertNotIn(secret, host.node.output())
        # the lists came from the store (the joined config has none by hand): every live
        # nexus and logger is in them (a dead host's entry stays until cluster.endpoint_ttl)
        said = {ln.split()[0]: ln.split()[1:] for ln in out.splitlines() if ln.startswith("  ")}
        live = [h for h in c.hosts.values() if h.is_up() and h is not host]
        self.assertTrue(said["nexus"], out)
        for h in live:
            if "nexus" in h.roles:
                self.assertIn(f"tcp://{h.addr}:7712", said["nexus"], out)
            if "logger" in h.roles:
                self.assertIn(f"tcp://{h.addr}:7721", said["loggers"], out)
        for name in answered:
            self.assertEqual(answered[name], 100, answered)
            self.assertGreater(on_new[name], 0, on_new)
        if len(c.with_role("lb")) == len(routers):  # run alone (-k): both routers alive
            self.assertEqual(len(routers), 2)
        self.assertTrue(routers)

    def access_lines(self, prefix: str) -> list[str]:
        """The routers' access lines of requests whose path starts with ``prefix``."""
        body = self.cluster.api("GET", f"apps/{APP}/logs?source=router&n=2000",
                                host=self.live_api())
        return [ln["text"] for ln in body["lines"] if f"GET {prefix}" in ln["text"]]

    def routed_to(self, router: Host, backend: str, prefix: str) -> bool:
        """Whether ``router`` sent one of a few more requests to ``backend``."""
        for i in range(8):
            get(router.addr, f"{prefix}{i}")
        return any(backend in ln for ln in self.access_lines(prefix))
    def test_8_partition_runner_host(self) -> None:
        """One runner host is cut from every nexus host for 10 s under load, then healed.

        The partition is between that runner and the nexuses only (nft rules in the
        runner's namespace dropping both ways, as a broken link between two racks
        would): the routers and the apis still reach it.  So the nexuses drop its
        instances from the routes after nexus.node_timeout (no heartbeats), the
        routers send everything to the other instances, and the scheduler, which
        still gets the runner's answers, re-places nothing (a runner that serves is
        not dead: re-placing would only make duplicates).  After the heal its
        heartbeats come back and its instances are routed again."""
        self.need_deploy()
        c = self.cluster
        router = self.router_back()
        nexus = [h for h in c.with_role("nexus") if h.is_up()]
        self.assertTrue(nexus, "no nexus host left")
        before = self.healthy()
        by_node: dict[str, int] = {}
        for p in before:
            by_node[p["node"]] = by_node.get(p["node"], 0) + 1
        victim = c.hosts[max(sorted(by_node), key=lambda n: by_node[n])]
        total = len(before)
        ids_before = placement(before)
        watch = RouteWatch(c, nexus[0], seconds=50)
        try:
            watch.wait_first()
            load = Load(router.addr, rate=200, seconds=14).start()
            time.sleep(1)
            partition(victim, nexus)
            cut = time.monotonic()
            time.sleep(10)
            heal(victim)
            healed = time.monotonic()
            full = None
            while time.monotonic() < healed + 30:
                if watch.count_since(healed) == total:
                    full = watch.first_since(healed, total) - healed
                    break
                time.sleep(0.1)
            load.join()
        finally:
            heal(victim)
            watch.stop()
        low = watch.min_between(cut, healed)
        dropped = watch.first_below(cut, total)
        settle = wait_until("the formation's instances healthy", lambda: (
            lambda h: h if len(h) == total else None)(self.healthy()), timeout=30)
        ids_after = placement(settle)
        every = self.ps()
        routed = watch.last_backends()
        report("8 partition runner host",
               f"{victim.name} ({by_node[victim.name]} of {total} web instances) cut from "
               f"nexus {[h.name for h in nexus]} at 1 s for 10 s: {load.figures()}; routed "
               f"instances fell to {low} after {secs(None if dropped is None else dropped - cut)}"
               f" (nexus.node_timeout); re-placed: "
               f"{'no' if ids_after == ids_before else f'yes ({ids_before} -> {ids_after})'}; "
               f"full capacity ({total} routed) {secs(full, 30)} after the heal; web "
               f"instances after: {len(every)} ({[(p['name'], p['node'], p['state']) for p in every]}),"
               f" routed {len(routed)} ({len(set(routed))} distinct)")
        self.assertEqual(load.failures, [], load.figures())
        self.assertIsNotNone(full, "capacity not back within 30 s of the heal")
        self.assertEqual(low, total - by_node[victim.name], "the cut runner stayed routed")
        self.assertEqual(ids_after, ids_before, "instances were re-placed")
        self.assertEqual(len(every), total, every)  # no duplicate left
        self.assertEqual(sorted(set(routed)), sorted(routed))
        self.assertEqual(len(routed), total)

    def test_9_bus_is_curve_across_hosts(self) -> None:
        """The bus between hosts is CurveZMQ: a cluster member's request to the nexus
        from a runner host is answered while no byte of it crosses the wire in clear
        (a raw capture on the nexus host's link); clients without the cluster secret
        get no handshake (no CurveZMQ, or a guessed server key) or, with the server
        key but no secret to sign with, no answer."""
        c = self.cluster
        nexus = next(h for h in c.with_role("nexus") if h.is_up())
        client = next(h for h in c.with_role("runner") if h.is_up())
        canary = "plaintext-canary-" + os.urandom(6).hex()
        endpoint = f"tcp://{nexus.addr}:7712"
        capture = Capture(nexus.veth, port=7712)
        try:
            member = probe(client, "where", str(c.root / "cluster-secret"), endpoint, canary)
            outsiders = probe(client, "outsider", str(c.root / "cluster-secret"), endpoint,
                              canary)
        finally:
            wire = capture.stop()
        report("9 bus curve", f"from {client.name} to {endpoint}: member {member}; "
                              f"outsiders {outsiders}; captured {capture.frames} frames, "
                              f"{len(wire)} TCP payload bytes on port 7712; mechanism in "
                              f"the greetings: {sorted(capture.mechanisms)}; canary in "
                              f"clear: {canary.encode() in wire}")
        self.assertEqual(len(member), 1, member)
        # answered: an unknown app's bus.error, naming the canary it got (decrypted)
        self.assertEqual(member[0].get("error"),
                         f"not_found: no app {canary!r} is known to this nexus", member)
        by = {o["client"]: o for o in outsiders}
        self.assertEqual(by["null"]["handshake"], "failed", by)
        self.assertNotEqual(by["wrong-key"]["handshake"], "succeeded", by)
        for o in outsiders:
            self.assertFalse(o["reply"], o)
        self.assertGreater(len(wire), 0)
        self.assertIn("CURVE", capture.mechanisms)
        self.assertNotIn(canary.encode(), wire)
        self.assertNotIn(b"nexus.where", wire)

    def router_back(self, case: str = "8 partition runner host") -> Host:
        """A live router; when cases 2 and 6 killed both lb hosts (the scheduler's
        leader ran on the second), the first one comes back (revive: link up, its node
        started again) and answers."""
        live = next((h for h in self.cluster.with_role("lb") if h.is_up()), None)
        if live is not None:
            return live
        host = self.cluster.with_role("lb")[0]
        assert host.node is not None
        # its api too (the first live api host answers the cases' api calls)
        lines = ["router listening on", *(["api ready"] if "api" in host.roles else [])]
        seen = {ln: host.node.output().count(ln) for ln in lines}
        t0 = time.monotonic()
        host.revive()
        for ln in lines:
            wait_until(f"{host.name}: {ln!r} again", lambda ln=ln: host.node is not None
                       and host.node.output().count(ln) > seen[ln], timeout=90)
        self.wait_routed(host.addr)
        report(case, f"no router was left (cases 2 and 6): {host.name} revived, routing "
                     f"after {time.monotonic() - t0:.1f}s")
        return host

    def live_router(self) -> Host:
        return next(h for h in self.cluster.with_role("lb") if h.is_up())


if __name__ == "__main__":
    unittest.main()
