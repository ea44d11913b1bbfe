"""End to end: the README's quick start on a real single-box node.

A real ``twistd -n epio --role=all`` in a temp dir (free ports, SQLite store);
the real ``epio`` CLI in subprocesses, run from a "clone" in a 0700 home directory
(root's, when the tests run as root) with the node's data dir outside it, as the README
says; HTTP through the real router.  Steps:
log in with the admin token, create an app, deploy examples/flask, get its page
through the router, scale to 2 and see both instances serve, set a config var
and see it in the app, roll back, delete the app and see its processes, mounts,
image references and routes gone.

Each step is named; a failure says which step failed, with the end of the
node's log.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.util import CHECKOUT, NodeProcess, epio_env, free_port, isolated_config, to_toml

STEP_TIMEOUT = 240.0


def http_get(port: int, host: str, path: str = "/", target: str = "127.0.0.1",
             timeout: float = 5.0) -> tuple[int, str]:
    conn = http.client.HTTPConnection(target, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": host})
        resp = conn.getresponse()
        return resp.status, resp.read().decode("utf-8", "replace")
    finally:
        conn.close()


class RouterLoad:
    """Requests sent back to back through the router from a thread, on keep-alive
    connections (as browsers do); every failure is recorded."""

    def __init__(self, port: int, host: str) -> None:
        self.port, self.host = port, host
        self.ok = 0
        self.failures: list[str] = []
        self.bodies: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(30)

    def report(self) -> str:
        return f"{self.ok} ok, failures: {self.failures[:10]}, bodies: {sorted(self.bodies)}"

    def _run(self) -> None:
        conn = None
        while not self._stop.is_set():
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                conn.request("GET", "/", headers={"Host": self.host})
                resp = conn.getresponse()
                body = resp.read().decode("utf-8", "replace")
                if resp.status == 200:
                    self.ok += 1
                    self.bodies.add(body)
                else:
                    self.failures.append(f"{resp.status} {body[:100]!r}")
                if resp.getheader("Connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as e:
                self.failures.append(f"{type(e).__name__}: {e}")
                if conn is not None:
                    conn.close()
                conn = None
            time.sleep(0.02)
        if conn is not None:
            conn.close()


def wait_until(what: str, check: Callable[[], Any], timeout: float = 60.0,
               interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            result = check()
        except Exception as e:  # a connection refused while things start, ...
            result, last = None, e
        else:
            last = result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not true after {timeout:g}s (last: {last!r})")
        time.sleep(interval)


class QuickStartTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="epio-e2e-"))
        # like any data dir's parent: app and build users must be able to traverse it
        os.chmod(self.tmp, 0o711)
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.addCleanup(_unmount_under, self.tmp)  # after the node is killed (LIFO)
        base = random.randrange(21000, 32000, 100)
        doc, _ = isolated_config({
            "api": {"reconcile_interval": 0.5, "drain_seconds": 1.0, "stop_grace": 3.0,
                    "runner_dead_after": 10.0, "rollout_timeout": 60.0},
            # app ports of their own: other nodes on this machine (other tests) use the
            # default range too
            "runner": {"backoff_initial": 0.2, "port_min": base, "port_max": base + 99},
            "lb": {"stats_interval": 0.5},
            "metrics": {"listen": f"tcp:{free_port()}:interface=127.0.0.1"},
        })
        self.doc = doc
        self.api_port = int(doc["api"]["listen"].split(":")[1])
        self.lb_port = int(doc["lb"]["listen"].split(":")[1])
        self.node = NodeProcess(["--role=all"], data_dir=self.tmp / "data",
                                config=to_toml(doc))
        self.addCleanup(self.node.cleanup)
        # the clone in a 0700 home (as root's is): the CLI runs there, its config there
        self.home = self.tmp / "home"
        self.home.mkdir()
        os.chmod(self.home, 0o700)
        self.work = self.home / "epio"
        shutil.copytree(CHECKOUT / "examples" / "flask", self.work / "examples" / "flask")
        self.step_name = "start"
        self.seen_instances: set[str] = set()

    def epio(self, *args: str, stdin: str | None = None, check: bool = True,
             timeout: float = STEP_TIMEOUT) -> tuple[int, str, str]:
        env = epio_env({"EPIO_CONFIG_DIR": str(self.home / ".config" / "epio"),
                        "HOME": str(self.home)})
        proc = subprocess.run(
            [sys.executable, "-c", "import sys; from epio.cli.main import main; sys.exit(main())",
             *args], input=stdin, capture_output=True, text=True, env=env, cwd=self.work,
            timeout=timeout)
        if check and proc.returncode != 0:
            self.fail_step(f"epio {' '.join(args)} exited {proc.returncode}:\n"
                           f"{proc.stdout}\n{proc.stderr}")
        return proc.returncode, proc.stdout, proc.stderr

    def fail_step(self, message: str) -> None:
        if os.environ.get("EPIO_E2E_KEEP_LOG"):
            Path(os.environ["EPIO_E2E_KEEP_LOG"]).write_text(self.node.output())
        mounts = _mounts_under(self.tmp)
        raise AssertionError(f"e2e step '{self.step_name}' failed: {message}\n"
                             f"--- mounts under the test dir ---\n" + "\n".join(mounts) +
                             f"\n--- node log (end) ---\n{self.node.output()[-6000:]}")

    def step(self, name: str) -> None:
        self.step_name = name
        sys.stderr.write(f"[e2e] {time.strftime('%H:%M:%S')} {name}\n")

    def api_get(self, path: str) -> Any:
        token = (self.tmp / "data" / "admin-token").read_text().strip()
        conn = http.client.HTTPConnection("127.0.0.1", self.api_port, timeout=10)
        try:
            conn.request("GET", "/api/v1/" + path, headers={"Authorization": f"Bearer {token}"})
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 200:
                raise AssertionError(f"GET {path}: {resp.status} {body[:200]!r}")
            return json.loads(body)
        finally:
            conn.close()

    def router(self, path: str = "/") -> tuple[int, str]:
        return http_get(self.lb_port, "hello.localhost", path)

    def ps(self) -> list[dict[str, Any]]:
        ps = json.loads(self.epio("ps", "--app", "hello", "--json")[1])
        self.seen_instances.update(i["id"] for i in ps)
        return ps

    def test_quick_start(self) -> None:
        """The quick start works end to end and deleting the app leaves nothing behind."""
        try:
            self._walk()
        except AssertionError as e:
            if "e2e step" in str(e):
                raise
            self.fail_step(str(e))

    def _walk(self) -> None:
        if os.geteuid() == 0:
            self.step("a root runner whose data dir is in the 0700 home says so at start")
            inside = NodeProcess(["--role=runner"], data_dir=self.work / "epio-data",
                                 config=to_toml(self.doc))
            try:
                inside.wait_for_log("the build and app users cannot reach the data dir "
                                    f"{self.work / 'epio-data'}: {self.home} is mode 700",
                                    timeout=60)
                self.assertIn(f"chmod o+x {self.home}", inside.output())
            finally:
                inside.cleanup()

        self.step("node starts and writes the admin token")
        self.node.wait_for_log("api ready", timeout=60)
        token_file = self.tmp / "data" / "admin-token"
        self.assertEqual(token_file.stat().st_mode & 0o777, 0o600)
        self.assertNotIn(token_file.read_text().strip(), self.node.output())

        self.step("epio login with the admin token")
        api = f"http://127.0.0.1:{self.api_port}"
        self.epio("login", "--api", api, stdin=token_file.read_text())

        self.step("epio apps create hello")
        _, out, _ = self.epio("apps", "create", "hello")
        self.assertIn(f"http://hello.localhost:{self.lb_port}/", out)

        self.step("epio deploy examples/flask")
        _, out, _ = self.epio("deploy", "examples/flask", "--poll", "0.5")
        self.assertIn(f"hello is live at http://hello.localhost:{self.lb_port}/", out)

        self.step("the page answers through the router")
        wait_until("router serves the app", lambda: self.router() == (
            200, "Hello from Flask on epio!\n"), timeout=30)

        self.step("scale web=2: both instances serve")
        self.epio("scale", "web=2")
        ps = wait_until("two healthy web instances", lambda: (lambda p: p if len(
            [i for i in p if i["state"] == "healthy"]) == 2 else None)(self.ps()), timeout=60)
        for inst in ps:
            self.assertEqual(http_get(inst["port"], "hello.localhost", target=inst["host"])[0],
                             200, inst)
        for _ in range(10):
            self.assertEqual(self.router()[0], 200)
        # the router's access log (through the logger and the logs endpoint) names the
        # backend of each request: both instances got traffic through the router
        ports = {f":{i['port']}" for i in ps}

        def backends() -> set[str]:
            for _ in range(4):  # the route table learns the second instance from heartbeats
                self.assertEqual(self.router()[0], 200)
            lines = self.api_get("apps/hello/logs?source=router&n=200")["lines"]
            seen = {w.split("=", 1)[1] for ln in lines for w in ln["text"].split()
                    if w.startswith("backend=")}
            return {p for p in ports if any(b.endswith(p) for b in seen)}

        try:
            wait_until("the router used both instances", lambda: backends() == ports,
                       timeout=30)
        except AssertionError:
            lines = self.api_get("apps/hello/logs?n=40")["lines"]
            raise AssertionError("the router did not use both instances " + repr(ports)
                                 + "; recent log:\n" + "\n".join(
                                     f"{ln['source']} {ln['text']}" for ln in lines)) from None

        self.step("/metrics: the router's requests by class, the runner's instances")

        def metrics() -> dict[str, float]:
            from prometheus_client.parser import text_string_to_metric_families

            port = int(self.doc["metrics"]["listen"].split(":")[1])
            text = http_get(port, "localhost", "/metrics")[1]
            out: dict[str, float] = {}
            for fam in text_string_to_metric_families(text):
                for smp in fam.samples:
                    if smp.name == "epio_lb_requests_total" and smp.labels.get("app") == "hello":
                        out[f"lb_{smp.labels['class']}"] = smp.value
                    if smp.name == "epio_runner_instances":
                        out[f"runner_{smp.labels['state']}"] = smp.value
                    if smp.name == "epio_api_requests_total":
                        out[f"api_{smp.labels['class']}"] = smp.value
            return out

        seen = wait_until("router and runner metrics", lambda: (lambda m: m if m.get(
            "lb_2xx", 0) >= 10 and m.get("runner_healthy") == 2 else None)(metrics()),
            timeout=30)
        self.assertNotIn("lb_5xx", seen)
        self.assertGreater(seen.get("api_2xx", 0), 5)  # the CLI's calls so far

        self.step("config set GREETING=Howdy shows in the app, with zero failed requests")
        load = RouterLoad(self.lb_port, "hello.localhost")
        load.start()
        self.addCleanup(load.stop)
        self.epio("config", "set", "GREETING=Howdy")
        wait_until("only the new config served", lambda: all(self.router() == (
            200, "Howdy from Flask on epio!\n") for _ in range(6)), timeout=60)

        self.step("a broken deploy fails and the previous release keeps serving")
        broken = self.tmp / "broken"
        shutil.copytree(CHECKOUT / "examples" / "flask", broken)
        (broken / "app.py").write_text('raise SystemExit("broken on purpose")\n')
        ini = (broken / "epio.ini").read_text()
        (broken / "epio.ini").write_text(ini.replace("[http]\n", "[http]\nboot_timeout = 5\n"))
        code, out, err = self.epio("deploy", str(broken), "--app", "hello", "--poll", "0.5",
                                   check=False)
        self.assertEqual(code, 1, out + err)
        self.assertIn("deploy failed", err)
        self.assertIn("before becoming healthy", err)
        self.assertEqual(self.router(), (200, "Howdy from Flask on epio!\n"))
        releases = json.loads(self.epio("releases", "--app", "hello", "--json")[1])
        self.assertEqual(releases[0]["status"], "failed")
        wait_until("the broken release's instance is stopped", lambda: {
            i["release"] for i in self.ps()} == {releases[1]["version"]}, timeout=30)
        load.stop()
        # continuous requests through the router across the release replacement (and
        # the broken deploy) all succeeded, from the old or the new release only
        self.assertGreater(load.ok, 20, load.report())
        self.assertEqual(load.failures, [], load.report())
        self.assertEqual(load.bodies, {"Hello from Flask on epio!\n",
                                       "Howdy from Flask on epio!\n"}, load.report())

        self.step("rollback serves the previous config again")
        _, out, _ = self.epio("rollback")
        self.assertRegex(out.splitlines()[0], r"^Rolled back hello to v\d+: the new release "
                                              r"v\d+ runs v\d+'s code and config$")
        wait_until("only the rolled back release served", lambda: all(self.router() == (
            200, "Hello from Flask on epio!\n") for _ in range(6)), timeout=60)
        releases = json.loads(self.epio("releases", "--app", "hello", "--json")[1])
        self.assertTrue(releases[0]["description"].startswith("Rollback to v"))
        image = releases[0]["image"]
        app_ports = [i["port"] for i in self.ps()]
        self.assertTrue(_instance_processes(self.seen_instances),
                        "no app process found before the delete")

        self.step("a failed build: its last lines come before 'Deploy failed'")
        escape = self.tmp / "escape"
        shutil.copytree(CHECKOUT / "examples" / "flask", escape)
        (escape / "etc").symlink_to("../../../../../etc")
        code, out, err = self.epio("deploy", str(escape), "--app", "hello", "--poll", "0.5",
                                   check=False)
        self.assertEqual(code, 1, out + err)
        lines = out.splitlines()
        last_build = max(i for i, ln in enumerate(lines) if ln.startswith("  | "))
        self.assertTrue(lines[last_build].startswith("  | !!!!!> build failed:"), out)
        failed = [i for i, ln in enumerate(lines) if ln.startswith("Deploy failed: ")]
        self.assertEqual(len(failed), 1, out)
        self.assertLess(last_build, failed[0], out)
        self.assertIn("points outside the app", err)

        self.step("apps destroy removes processes, mounts, image refs and routes")
        self.epio("apps", "destroy", "hello", "--confirm", "hello")
        wait_until("route gone", lambda: self.router()[0] in (404, 502, 503), timeout=30)
        for port in app_ports:
            wait_until(f"nothing listens on {port}", lambda p=port: not _listening(p),
                       timeout=30)
        digest = image.split(":")[-1]
        wait_until("image unmounted", lambda: not [
            m for m in _mounts_under(self.tmp) if digest in m], timeout=30)
        code, _, err = self.epio("releases", "--app", "hello", check=False)
        self.assertEqual(code, 1)
        self.assertIn("no app named 'hello'", err)
        wait_until("no process of the app's instances", lambda: not _instance_processes(
            self.seen_instances), timeout=30)


def _listening(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _mounts_under(root: Path) -> list[str]:
    """Mount points under ``root`` (images of this test's node only)."""
    return [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
            if line.split()[1].startswith(str(root) + "/")]


def _unmount_under(root: Path) -> None:
    """Lazily unmount what a killed node left mounted under ``root``."""
    for mount in sorted(_mounts_under(root), reverse=True):
        subprocess.run(["umount", "-l", mount], capture_output=True, check=False)


def _instance_processes(instances: set[str]) -> list[str]:
    """Command lines of processes of these instances (the runner sets EPIO_INSTANCE)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        for item in env:
            if item.startswith(b"EPIO_INSTANCE=") and item[14:].decode() in instances:
                found.append(cmd)
    return found
