"""``epio run`` end to end: the real CLI (through a PTY with pexpect, or pipes) against a
real node (api + runner in one ``twistd``), the command in the real sandbox.

One node serves every test of the class (``run.detached_idle_timeout`` = 4 s so the
idle-stop test is quick); each test uses fresh sessions.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.run.helpers import CLI, RunNode, rss_kb, skip_reason, wait_until

IDLE = 4.0


class RunCliTests(SynchronousTestCase):
    node: RunNode

    @classmethod
    def setUpClass(cls) -> None:
        if skip_reason():
            return
        cls.node = RunNode(run={"detached_idle_timeout": IDLE, "kill_grace": 2.0})
        try:
            cls.node.start()
        except BaseException:
            cls.node.close()
            raise

    @classmethod
    def tearDownClass(cls) -> None:
        if not skip_reason():
            cls.node.close()

    def setUp(self) -> None:
        if skip_reason():
            self.skipTest(skip_reason() or "")

    def spawn(self, *command: str, rows: int = 24, cols: int = 80) -> Any:
        child = self.node.spawn("run", "--app", "hello", "--", *command, rows=rows, cols=cols)
        self.addCleanup(lambda: child.terminate(force=True))
        return child

    def history(self) -> dict[int, dict[str, Any]]:
        return {r["number"]: r for r in self.node.runs(history=True)}

    def api_get(self, path: str, token: str) -> Any:
        req = urllib.request.Request(f"http://127.0.0.1:{self.node.api_port}/api/v1/{path}",
                                     headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    # -- interactive -----------------------------------------------------------------

    def test_interactive_prompt(self) -> None:
        """input() in the command gets what is typed in the CLI's terminal; the answer
        comes back; the command runs as the app's user in its image (/app/app)."""
        import pexpect

        child = self.spawn("python", "-c", "import os; print(os.getcwd(), os.getuid()); "
                           "exec(open('ask.py').read())")
        child.expect("attached to a terminal")
        child.expect(r"/app/app (\d+)")
        self.assertGreaterEqual(int(child.match.group(1)), 10000)
        child.expect(r"name\? ")
        child.send("bob\r")
        child.expect("hello, BOB!")
        child.expect(pexpect.EOF)
        child.close()
        self.assertEqual(child.exitstatus, 0)

    def test_window_size_follows_resize_and_exit_status(self) -> None:
        """The PTY starts at the client's size, a resize of the client's terminal
        reaches the command (stty size), and the CLI exits with the command's status."""
        import pexpect

        child = self.spawn("stty size; read x; stty size; exit 7", rows=33, cols=101)
        child.expect("33 101")
        child.setwinsize(40, 120)
        time.sleep(0.3)
        child.send("\r")
        child.expect("40 120")
        child.expect(pexpect.EOF)
        child.close()
        self.assertEqual(child.exitstatus, 7)

    def test_ctrl_c_reaches_the_command(self) -> None:
        """Ctrl-C interrupts the remote sleep (the CLI's terminal is raw: the byte goes
        through), the CLI exits 130 at once and its terminal mode is restored."""
        import pexpect

        child = self.spawn("echo sleep-starts; sleep 30")
        child.expect("attached to a terminal")
        child.expect("sleep-starts")
        started = time.monotonic()
        child.send("\x03")
        child.expect(pexpect.EOF)
        child.close()
        self.assertEqual(child.exitstatus, 130)
        self.assertLess(time.monotonic() - started, 5)

    def test_python_repl_keyboard_interrupt(self) -> None:
        """In an interactive Python, Ctrl-C is a KeyboardInterrupt (the session goes on)
        and exit(5) ends the CLI with status 5."""
        import pexpect

        child = self.spawn("python")
        child.expect(">>> ")
        child.send("6 * 7\r")
        child.expect("42")
        child.send("\x03")
        child.expect("KeyboardInterrupt")
        child.send("exit(5)\r")
        child.expect(pexpect.EOF)
        child.close()
        self.assertEqual(child.exitstatus, 5)

    # -- pipes -----------------------------------------------------------------------

    def test_pipes_preserve_bytes(self) -> None:
        """Without a TTY, stdin and stdout are byte streams (every byte value, no CR
        added), stderr stays stderr, and the exit status comes back."""
        data = bytes(range(256)) * 4096 + b"\r\n\x00end"
        code, out, err = 0, b"", b""
        proc = subprocess.run([*CLI, "run", "--app", "hello", "--", "cat; echo oops >&2; "
                               "exit 3"], input=data, capture_output=True, env=self.node.env,
                              timeout=60)
        code, out, err = proc.returncode, proc.stdout, proc.stderr
        self.assertEqual(code, 3, err)
        self.assertEqual(out, data)
        self.assertIn(b"oops\n", err)

    # -- detach, reattach, idle timeout, audit ----------------------------------------

    def test_detach_runs_in_the_background_with_output_in_the_log(self) -> None:
        """--detach returns at once; the command's output is in the app's log as
        run.N; the audit records who ran what and how it ended; platform lines too."""
        _, out, _ = self.node.epio("run", "--app", "hello", "--detach", "--",
                                   "echo detached-$((6*7)); exit 4")
        number = int(out.split("run.")[1].split()[0])
        rec = wait_until("the detached run ended", lambda: (lambda r: r if r.get("state") ==
                         "exited" else None)(self.history().get(number, {})), timeout=20)
        self.assertEqual((rec["kind"], rec["exit_status"], rec["user"]), ("detached", 4,
                                                                            "admin"))

        def lines() -> Any:
            got = self.api_get("apps/hello/logs?n=200", self.node.token)["lines"]
            return got if any(ln["text"] == "detached-42" for ln in got) else None

        got = wait_until("output in the app's log", lines, timeout=20)
        sources = {ln["source"] for ln in got if ln["text"] == "detached-42"}
        self.assertEqual(sources, {f"run.{number}"})
        platform = [ln["text"] for ln in got if ln["source"] == "platform"]
        self.assertTrue(any(f"run.{number} started by admin" in t for t in platform), platform)
        self.assertTrue(any(f"run.{number}" in t and "exited with status 4" in t
                            for t in platform), platform)

    def test_client_killed_then_reattach(self) -> None:
        """A killed client leaves the command running; --list shows it detached and
        --attach reconnects to it: the next keystrokes reach the same process."""
        import pexpect

        child = self.spawn("python", "ask.py")
        child.expect(r"as run\.(\d+)")
        number = int(child.match.group(1))
        child.expect(r"name\? ")
        os.kill(child.pid, signal.SIGKILL)
        child.close(force=True)
        running = wait_until("listed as detached", lambda: [
            r for r in self.node.runs() if r["number"] == number and r["attached"] is False],
            timeout=10)
        self.assertEqual(running[0]["state"], "running")
        again = self.node.spawn("run", "--app", "hello", "--attach", str(number))
        self.addCleanup(lambda: again.terminate(force=True))
        again.expect("attached to a terminal")
        again.send("alice\r")
        again.expect("hello, ALICE!")
        again.expect(pexpect.EOF)
        again.close()
        self.assertEqual(again.exitstatus, 0)
        self.assertEqual(self.history()[number]["exit_status"], 0)

    def test_detached_interactive_session_stops_after_idle_timeout(self) -> None:
        """With no client, an interactive session runs until run.detached_idle_timeout,
        then it is stopped (SIGTERM) and the audit says why."""
        child = self.spawn("echo waiting; sleep 600")
        child.expect(r"as run\.(\d+)")
        number = int(child.match.group(1))
        child.expect("waiting")
        os.kill(child.pid, signal.SIGKILL)
        child.close(force=True)
        time.sleep(IDLE / 2)
        self.assertEqual(self.history()[number]["state"], "running")
        rec = wait_until("stopped after the idle timeout", lambda: (lambda r: r if r["state"]
                         == "exited" else None)(self.history()[number]), timeout=IDLE + 15)
        self.assertIn("run.detached_idle_timeout", rec["reason"])
        self.assertIsNotNone(rec["ended"])
        # SIGTERM ended it, not the SIGKILL after run.kill_grace (bwrap: 128 + N)
        self.assertTrue(rec["exit_signal"] == "SIGTERM" or rec["exit_status"] == 143, rec)

    # -- flow control ------------------------------------------------------------------

    def test_flood_through_a_slow_reader_keeps_memory_bounded(self) -> None:
        """`yes | head -c 200M` read slowly: the node (api + runner in one process) does
        not grow (the runner stops reading the command), then every byte arrives."""
        pid = self.node.node.proc.pid
        base = rss_kb(pid)
        proc = subprocess.Popen([*CLI, "run", "--app", "hello", "-q", "--",
                                 "yes | head -c 200M"], stdout=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, env=self.node.env, bufsize=0)
        self.addCleanup(proc.kill)
        assert proc.stdout is not None
        total, samples = 0, []
        started = time.monotonic()
        while time.monotonic() - started < 3:
            total += len(proc.stdout.read(16384))
            time.sleep(0.02)
            samples.append(rss_kb(pid))
        self.assertLess(total, 20 << 20)  # it really was slow
        while True:
            chunk = proc.stdout.read(1 << 20)
            if not chunk:
                break
            total += len(chunk)
            if len(samples) % 16 == 0:
                samples.append(rss_kb(pid))
            else:
                samples.append(samples[-1])
        self.assertEqual(proc.wait(timeout=30), 0)
        self.assertEqual(total, 200 << 20)
        growth_mb = (max(samples) - base) / 1024
        self.assertLess(growth_mb, 40, f"node RSS grew {growth_mb:.1f} MB (base {base} kB)")

    # -- authorization -------------------------------------------------------------------

    def test_other_users_token_is_refused_on_the_websocket(self) -> None:
        """A second user's token gets 404 on the websocket handshake (the app does not
        exist for them) and on the session list; nothing runs."""
        from epio.cli.client import CliError
        from epio.cli.wsclient import WebSocket

        req = urllib.request.Request(
            f"http://127.0.0.1:{self.node.api_port}/api/v1/users",
            data=json.dumps({"name": f"mallory{os.getpid()}"}).encode(), method="POST",
            headers={"Authorization": f"Bearer {self.node.token}",
                     "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            token = json.loads(resp.read())["token"]
        before = len(self.history())
        url = f"http://127.0.0.1:{self.node.api_port}/api/v1/apps/hello/run"
        with self.assertRaises(CliError) as caught:
            WebSocket.connect(url, {"Authorization": f"Bearer {token}"})
        self.assertIn("no app named 'hello'", caught.exception.message)
        code, _, err = self.node.epio("run", "--app", "hello", "--", "touch /data/pwned",
                                      check=False, token=token)
        self.assertEqual(code, 1)
        self.assertIn("no app named 'hello'", err)
        self.assertNotIn("Traceback", err)
        code, _, err = self.node.epio("run", "--app", "hello", "--attach", "1", check=False,
                                      token=token)
        self.assertEqual(code, 1)
        self.assertIn("no app named 'hello'", err)
        self.assertEqual(len(self.history()), before)
