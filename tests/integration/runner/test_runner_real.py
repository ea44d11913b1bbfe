"""Real app processes under the real sandbox, as their own UIDs (root + bubblewrap).

Each test starts a :class:`RealRunner` (the real launcher, cgroups, bubblewrap,
health probes) in a temp data dir and stops everything it started.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, readBody

from . import apps
from .helpers import RealRunner, skip_reason, sleep, wait_for

SKIP = skip_reason()


def result_of(runner: RealRunner, app: str) -> dict[str, Any] | None:
    for line in runner.texts(app):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return None


def alive(pids: set[int]) -> list[str]:
    """Those of ``pids`` that still exist and are not zombies (with their state)."""
    out = []
    for pid in sorted(pids):
        try:
            status = open(f"/proc/{pid}/status").read()
        except OSError:
            continue
        state = next(line for line in status.splitlines() if line.startswith("State:"))
        if "zombie" not in state:
            out.append(f"{pid} {state}")
    return out


async def get(url: str) -> tuple[int, bytes]:
    agent = Agent(reactor, connectTimeout=2)
    response = await agent.request(b"GET", url.encode())
    return response.code, await readBody(response)


class IsolationTests(TestCase):
    skip = SKIP
    timeout = 60

    def setUp(self) -> None:
        self.runner = RealRunner(reactor)
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(self.runner.close()))

    async def test_probe_cannot_see_other_apps_or_the_node(self) -> None:
        """A probe app runs as its own UID with no groups; it cannot read the node's
        secret, the data dir, another app's data dir or image, cannot signal another
        app's processes, sees only its own processes in /proc, can write its data dir
        and /tmp but not its image."""
        r = self.runner
        self.assertEqual(r.isolation.sandbox, "bwrap", r.isolation.off)
        alpha_img = r.image({"sleeper.py": apps.SLEEPER})
        r.start("alpha-1", "alpha", 20101, alpha_img, "python /app/app/sleeper.py",
                process_type="worker")
        self.assertTrue(await wait_for(reactor, lambda: r.state("alpha-1") == "healthy", 15))
        (r.data_dir / "appdata" / "alpha" / "secret.txt").write_text("alpha's")
        alpha = r.sup.get("alpha-1")
        assert alpha.launch is not None and alpha.launch.cgroup is not None
        alpha_pids = sorted(alpha.launch.cgroup.pids())
        self.assertTrue(alpha_pids)
        host = r.data_dir
        reads = [str(host / "cluster-secret"), str(host), str(host / "appdata" / "alpha"),
                 str(host / "appdata" / "alpha" / "secret.txt"),
                 str(host / "images" / alpha_img / "app" / "sleeper.py"),
                 "/work", "/root/.ssh", "/home/app/data", "/data", "/app/app/probe.py"]
        probe_img = r.image({"probe.py": apps.PROBE})
        r.start("probe-1", "probe", 20102, probe_img, "python /app/app/probe.py",
                process_type="worker",
                env={"PROBE": json.dumps({"read": reads, "kill": alpha_pids})})
        self.assertTrue(await wait_for(reactor, lambda: result_of(r, "probe") is not None, 15),
                        r.texts("probe"))
        res = result_of(r, "probe")
        assert res is not None
        if os.environ.get("EPIO_TEST_SHOW"):
            print(json.dumps(res, indent=1))
        self.assertEqual((res["uid"], res["euid"], res["gid"]), (20102, 20102, 20102))
        self.assertNotIn(0, res["groups"])
        read = res["read"]
        for p in reads[:7]:
            self.assertNotEqual(read[p], True, f"probe could read {p}")
        self.assertIs(read["/home/app/data"], True)  # ep.io's ~/data
        self.assertIs(read["/data"], True)
        self.assertIs(read["/app/app/probe.py"], True)
        self.assertTrue(all(v is not True for v in res["kill"].values()), res["kill"])
        self.assertTrue(set(res["proc_pids"]).isdisjoint(alpha_pids), res["proc_pids"])
        self.assertLessEqual(len(res["proc_pids"]), 4, res["proc_pids"])
        self.assertIs(res["write_data"], True)
        self.assertIs(res["write_tmp"], True)
        self.assertNotEqual(res["write_image"], True)
        mine = host / "appdata" / "probe" / "mine.txt"
        self.assertEqual(mine.read_text(), "hello")
        self.assertEqual(mine.stat().st_uid, 20102)
        # the victim is untouched
        await sleep(reactor, 0.3)
        self.assertEqual(r.state("alpha-1"), "healthy")
        self.assertEqual(r.sup.get("alpha-1").restarts, 0)
        for pid in alpha_pids:
            os.kill(pid, 0)  # still alive


    async def test_reused_app_name_starts_with_empty_data(self) -> None:
        """An app deleted and created again under the same name (a new UID) never gets
        the earlier app's files: they are moved aside, root-only."""
        r = self.runner
        img = r.image({"sleeper.py": apps.SLEEPER})
        r.start("gamma-1", "gamma", 20111, img, "python /app/app/sleeper.py",
                process_type="worker")
        self.assertTrue(await wait_for(reactor, lambda: r.state("gamma-1") == "healthy", 15))
        old = r.data_dir / "appdata" / "gamma"
        (old / "private.txt").write_text("the first gamma's")
        os.chown(old / "private.txt", 20111, 20111)
        await r.sup.stop("gamma-1", grace=1)
        probe_img = r.image({"probe.py": apps.PROBE})
        r.start("gamma-2", "gamma", 20112, probe_img, "python /app/app/probe.py",
                process_type="worker",
                env={"PROBE": json.dumps({"read": ["/data/private.txt"], "kill": []})})
        self.assertTrue(await wait_for(reactor, lambda: result_of(r, "gamma") is not None, 15),
                        r.texts("gamma"))
        res = result_of(r, "gamma")
        assert res is not None
        self.assertEqual(res["uid"], 20112)
        self.assertNotEqual(res["read"]["/data/private.txt"], True)
        self.assertEqual(old.stat().st_uid, 20112)
        [retired] = (r.data_dir / "appdata" / ".retired").iterdir()
        self.assertEqual((retired / "private.txt").read_text(), "the first gamma's")
        self.assertEqual((r.data_dir / "appdata" / ".retired").stat().st_mode & 0o777, 0o700)


    async def test_reused_uid_never_reaches_earlier_files(self) -> None:
        """A UID given to a new app after an app of another name was deleted (the store
        reuses UIDs) does not get the earlier app's data dir: it is moved aside,
        root-only, before the new app's first process runs."""
        r = self.runner
        img = r.image({"sleeper.py": apps.SLEEPER})
        r.start("delta-1", "delta", 20121, img, "python /app/app/sleeper.py",
                process_type="worker")
        self.assertTrue(await wait_for(reactor, lambda: r.state("delta-1") == "healthy", 15))
        old = r.data_dir / "appdata" / "delta"
        (old / "private.txt").write_text("delta's")
        os.chown(old / "private.txt", 20121, 20121)
        await r.sup.stop("delta-1", grace=1)
        probe_img = r.image({"probe.py": apps.PROBE})
        r.start("eps-1", "epsilon", 20121, probe_img, "python /app/app/probe.py",
                process_type="worker",
                env={"PROBE": json.dumps({"read": [str(old / "private.txt")], "kill": []})})
        self.assertTrue(await wait_for(reactor, lambda: result_of(r, "epsilon") is not None,
                                       15), r.texts("epsilon"))
        res = result_of(r, "epsilon")
        assert res is not None
        self.assertEqual(res["uid"], 20121)
        self.assertNotEqual(res["read"][str(old / "private.txt")], True)
        self.assertFalse(old.exists())
        [retired] = (r.data_dir / "appdata" / ".retired").iterdir()
        self.assertTrue(retired.name.startswith("delta.uid20121."))
        self.assertEqual((retired / "private.txt").read_text(), "delta's")
        self.assertEqual((r.data_dir / "appdata" / ".retired").stat().st_mode & 0o777, 0o700)


class WebTests(TestCase):
    skip = SKIP
    timeout = 60

    def setUp(self) -> None:
        self.runner = RealRunner(reactor)
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(self.runner.close()))

    async def test_web_app_healthy_answers_and_stops_with_sigkill_after_grace(self) -> None:
        """A web app becomes healthy through its HTTP health check and answers on its
        port; stopping an app that ignores SIGTERM sends SIGTERM, then SIGKILL after
        the grace period, and leaves no process behind."""
        r = self.runner
        img = r.image({"web.py": apps.WEB})
        reply = r.start("web-1", "webby", 20103, img, "python /app/app/web.py",
                        health_check="/health", env={"IGNORE_TERM": "1"}, grace=1.5)
        port = reply["port"]
        self.assertTrue(await wait_for(reactor, lambda: r.state("web-1") == "healthy", 20),
                        r.texts("webby"))
        code, text = await get(f"http://127.0.0.1:{port}/")
        self.assertEqual((code, text), (200, b"hello from web.1 1\n"))
        inst = r.sup.get("web-1")
        assert inst.launch is not None and inst.launch.cgroup is not None
        pids = inst.launch.cgroup.pids()
        clock: Any = reactor
        started = clock.seconds()
        await r.sup.stop("web-1")
        took = clock.seconds() - started
        self.assertEqual(r.state("web-1"), "stopped")
        self.assertGreaterEqual(took, 1.4)
        self.assertLess(took, 5)
        logs = r.texts("webby")
        self.assertIn("got SIGTERM", logs)
        self.assertIn("web.1: did not exit in time: SIGKILL", logs)
        self.assertTrue(await wait_for(reactor, lambda: not alive(pids), 3), alive(pids))

    async def test_drain_rollover_without_errors(self) -> None:
        """Runner-level rollover: a client that sends each request to a healthy instance
        (as routers do from heartbeats) sees no error while v2 starts, v1 drains and
        stops; a broken v3 never becomes routable and v2 keeps serving."""
        r = self.runner
        img = r.image({"web.py": apps.WEB})
        r.start("v1", "roll", 20104, img, "python /app/app/web.py", health_check="/")
        self.assertTrue(await wait_for(reactor, lambda: r.state("v1") == "healthy", 20))
        errors: list[str] = []
        served: dict[str, int] = {}
        running = True

        async def client() -> None:
            while running:
                healthy = [i for i in r.sup.heartbeat_instances() if i["state"] == "healthy"]
                if not healthy:
                    errors.append("no healthy instance")
                    await sleep(reactor, 0.01)
                    continue
                target = healthy[-1]
                try:
                    code, _ = await get(f"http://127.0.0.1:{target['port']}/")
                    if code != 200:
                        errors.append(f"status {code}")
                    served[target["instance_id"]] = served.get(target["instance_id"], 0) + 1
                except Exception as e:
                    errors.append(f"{target['instance_id']}: {e!r}")

        done = defer.Deferred.fromCoroutine(client())
        await sleep(reactor, 0.3)
        r.start("v2", "roll", 20104, img, "python /app/app/web.py", health_check="/", release=2)
        self.assertTrue(await wait_for(reactor, lambda: r.state("v2") == "healthy", 20))
        r.sup.drain("v1")
        self.assertTrue(await wait_for(reactor, lambda: r.state("v1") == "stopped", 20))
        broken = r.image({"web.py": apps.CRASH})
        r.start("v3", "roll", 20104, broken, "python /app/app/web.py", health_check="/",
                boot_timeout=2, release=3)
        await sleep(reactor, 2.5)
        running = False
        await done
        self.assertEqual(errors, [])
        self.assertGreater(served.get("v1", 0), 0)
        self.assertGreater(served.get("v2", 0), 0)
        self.assertNotIn("v3", served)
        self.assertIn(r.state("v3"), ("crashed", "starting", "failed"))
        self.assertEqual(r.state("v2"), "healthy")


class LimitTests(TestCase):
    skip = SKIP
    timeout = 60

    def setUp(self) -> None:
        self.runner = RealRunner(reactor)
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(self.runner.close()))

    async def test_memory_limit_kills_and_reports_only_the_hog(self) -> None:
        """A process allocating past its memory limit is killed and reported as out of
        memory; another app's instance keeps running untouched."""
        r = self.runner
        if "memory" not in r.isolation.cgroups:
            self.skipTest("no memory cgroup: " + r.isolation.off.get("memory", "?"))
        calm_img = r.image({"sleeper.py": apps.SLEEPER})
        r.start("calm-1", "calm", 20105, calm_img, "python /app/app/sleeper.py",
                process_type="worker", limits={"memory_mb": 64})
        self.assertTrue(await wait_for(reactor, lambda: r.state("calm-1") == "healthy", 10))
        hog_img = r.image({"hog.py": apps.HOG})
        r.start("hog-1", "hog", 20106, hog_img, "python /app/app/hog.py",
                process_type="worker", limits={"memory_mb": 64})
        ok = await wait_for(reactor, lambda: r.sup.get("hog-1").reason == "killed: out of memory",
                            20)
        self.assertTrue(ok, (r.sup.get("hog-1").reason, r.texts("hog")[-5:]))
        self.assertEqual(r.state("hog-1"), "crashed")
        self.assertTrue(any("killed: out of memory" in t for t in r.texts("hog")))
        self.assertEqual(r.state("calm-1"), "healthy")
        self.assertEqual(r.sup.get("calm-1").restarts, 0, r.texts("calm"))
        await r.sup.stop("hog-1", grace=0)


class CrashLoopTests(TestCase):
    skip = SKIP
    timeout = 90

    def setUp(self) -> None:
        # backoff_initial 0.25 s: the default schedule (1 s, doubling: 6 starts in a
        # minute) a quarter as long, so the real processes show it in 15 s
        self.runner = RealRunner(reactor, backoff_initial=0.25, backoff_max=300.0)
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(self.runner.close()))

    async def test_crash_loop_backs_off_doubling_in_real_time(self) -> None:
        """An app that exits at once is restarted with backoff doubling from
        backoff_initial (0.25 s here): at most 7 starts in 15 real seconds (the schedule
        gives 6: at 0, 0.25, 0.75, 1.75, 3.75, 7.75 s, the next at 15.75 s; with the
        default 1 s that is 6 in a minute), crashed while waiting."""
        r = self.runner
        img = r.image({"crash.py": apps.CRASH})
        r.start("crash-1", "crashy", 20107, img, "python /app/app/crash.py",
                process_type="worker")
        crashed_seen = 0
        for _ in range(150):
            await sleep(reactor, 0.1)
            if r.state("crash-1") == "crashed":
                crashed_seen += 1
        starts = r.sup.get("crash-1").starts
        self.assertLessEqual(starts, 7)
        self.assertGreaterEqual(starts, 5)
        self.assertGreater(crashed_seen, 100, "reported crashed while waiting")
        self.assertEqual(r.texts("crashy", "worker.1").count("starting and dying"), starts)



class DegradedTests(TestCase):
    skip = SKIP
    timeout = 60

    def setUp(self) -> None:
        self.runner = RealRunner(reactor, sandbox="none")
        # without a sandbox the app needs a Python its UID can reach on the host (this
        # test machine's own Python lives under /root, mode 0700)
        self.python = Path("/usr/bin/python3")
        if not self.python.exists():
            self.skipTest("needs /usr/bin/python3")
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(self.runner.close()))

    async def test_without_sandbox_uids_and_modes_still_protect(self) -> None:
        """runner.sandbox = none: the runner says which protections are off (filesystem,
        processes), yet the app still runs as its own UID, cannot read the node's secret
        or another app's data dir, and cannot signal another app's processes."""
        r = self.runner
        self.assertEqual(r.isolation.sandbox, "none")
        self.assertIn("filesystem", r.isolation.off)
        self.assertIn("processes", r.isolation.off)
        alpha_img = r.image({"sleeper.py": apps.SLEEPER}, self.python)
        r.start("alpha-1", "alpha", 20111, alpha_img, "python sleeper.py",
                process_type="worker")
        self.assertTrue(await wait_for(reactor, lambda: r.state("alpha-1") == "healthy", 15))
        (r.data_dir / "appdata" / "alpha" / "secret.txt").write_text("alpha's")
        alpha = r.sup.get("alpha-1")
        assert alpha.launch is not None and alpha.launch.cgroup is not None
        alpha_pids = sorted(alpha.launch.cgroup.pids())
        host = r.data_dir
        reads = [str(host / "cluster-secret"), str(host / "appdata" / "alpha"),
                 str(host / "appdata" / "alpha" / "secret.txt")]
        probe_img = r.image({"probe.py": apps.PROBE}, self.python)
        r.start("probe-1", "probe", 20112, probe_img, "python probe.py",
                process_type="worker",
                env={"PROBE": json.dumps({"read": reads, "kill": alpha_pids})})
        self.assertTrue(await wait_for(reactor, lambda: result_of(r, "probe") is not None, 15),
                        r.texts("probe"))
        res = result_of(r, "probe")
        assert res is not None
        self.assertEqual((res["uid"], res["euid"]), (20112, 20112))
        for p in reads:
            self.assertEqual(res["read"][p], "PermissionError", p)
        self.assertTrue(all(v == "PermissionError" for v in res["kill"].values()), res["kill"])
        self.assertIs(res["write_data"], True)
        self.assertEqual(r.state("alpha-1"), "healthy")
