"""Chaos on a real multi-host cluster: hosts are network namespaces (harness.py).

One cluster for the whole class (9 hosts: 2 api+lb+logger, 2 nexus, 3 runners,
1 backup with the PostgreSQL store, 1 more api); the cases run in order on it and each
prints its figures (``pytest -s``; docs/cluster.md quotes them):

1. deploy examples/wsgi with the ``epio`` CLI, scale web to 3: instances on
   several runner hosts, answered through both routers;
2. kill an lb host (SIGKILL + link down) under load on the other router;
3. kill a nexus host under load;
4. kill a runner host holding an instance under load: failed requests and
   seconds until 3 healthy instances again;
5. kill the host of the scheduler's leader: another api takes over (expected
   to fail today: the dead session keeps the advisory lock; see the case).

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
    Cluster,
    Host,
    in_ns,
    sh,
    unavailable,
    wait_until,
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


def get(addr: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection(addr, 8080, timeout=10)
    try:
        conn.request("GET", "/", headers={"Host": HOST_HEADER})
        resp = conn.getresponse()
        return resp.status, resp.read().decode("utf-8", "replace")
    finally:
        conn.close()


def secs(t: float | None, bound: float = 45) -> str:
    return f"never (within {bound:g}s)" if t is None else f"{t:.1f}s"


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
        report("up", f"9 hosts, 9 nodes and PostgreSQL, up in "
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
        # host vanishes keeps the lock (case 5), and case 4 needs a scheduler
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
        killed_at = time.strftime("%H:%M:%S", time.gmtime())
        back = placed = None
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
            if len([p for p in ps if p["state"] == "healthy"]) == 3:
                back = time.monotonic() - killed
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
    def test_5_kill_scheduler_leader_host(self) -> None:
        """The host of the scheduler's leader dies: another api leads within 25 s."""
        self.need_deploy()
        victim = self.cluster.leader()
        self.assertIsNotNone(victim, "no live api leads the scheduler")
        assert victim is not None
        others = [h for h in self.cluster.with_role("api") if h.is_up() and h is not victim]
        before = self.cluster.lock_holders()
        victim.kill()
        killed = time.monotonic()
        elected = None
        while time.monotonic() < killed + 25:
            if any("elected leader for epio.scheduler" in h.node.output()  # type: ignore[union-attr]
                   for h in others):
                elected = time.monotonic() - killed
                break
            time.sleep(0.25)
        report("5 kill leader host",
               f"{victim.name} ({victim.addr}, leader) killed; another api elected after "
               f"{secs(elected, 25)}; advisory lock holders before {before}, after "
               f"{self.cluster.lock_holders()}")
        self.assertIsNotNone(elected, "no api took the scheduler over")

    def live_router(self) -> Host:
        return next(h for h in self.cluster.with_role("lb") if h.is_up())


if __name__ == "__main__":
    unittest.main()
