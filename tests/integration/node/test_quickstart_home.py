"""The README's quick start, as written, from a clone in a 0700 home, as root.

The commands are read from README.md's "Start a single-box node" section (the two
shell blocks after the ``apt-get`` line), so README and test cannot drift: the node
shell (install, ``twistd ...``) and the CLI shell (activate, ``epio login``, ``epio
apps create hello``, ``epio deploy examples/flask``) run in bash, in a copy of this
checkout under a mode 0700 "home" (as root's is), then the app must answer 200
through the router on the README's port.

Two stand-ins, and only these: the install runs no pip (the project's venv is
linked as the clone's ``.venv`` and the clone is on ``PYTHONPATH``, so the code
under test is the clone's, as ``pip install .`` would make it -- pip would only add
a minute), and ``/var/lib`` is a fresh tmpfs in a private mount namespace shared by
both shells (a fresh machine's ``/var/lib``: nothing of this test stays on the host,
and a real ``/var/lib/epio`` is never touched).  The node uses every default port, as
the README's ``twistd`` line does; when one is taken (another node on this machine)
the test skips, naming it.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.util import CHECKOUT, TWISTD, epio_env

README = CHECKOUT / "README.md"
# the README's install, which the test replaces by a link to the installed venv
INSTALL = "python3 -m venv .venv && .venv/bin/pip install . && "
# what a clone needs to run the quick start: the package, its plugin, the example
CLONE_PARTS = ["README.md", "pyproject.toml", "setup.cfg", "epio", "twisted", "examples"]
DEPLOY_TIMEOUT = 120.0


def quick_start() -> tuple[list[str], list[str]]:
    """The README quick start's node shell and CLI shell, one command a line."""
    section = README.read_text().split("## Start a single-box node", 1)[1]
    section = section.split("\n## ", 1)[0]
    blocks = [b for b in re.findall(r"^```sh\n(.*?)^```", section, re.MULTILINE | re.DOTALL)
              if not b.startswith("apt-get ")]
    if len(blocks) != 2:
        raise AssertionError(f"README quick start: expected 2 shell blocks after apt-get, "
                             f"found {len(blocks)}")
    node, cli = ([ln for ln in b.splitlines() if ln.strip()] for b in blocks)
    return node, cli


def default_ports() -> set[int]:
    """Every TCP port the node's default configuration listens on or dials."""
    from epio.config.schema import SCHEMA

    ports = set()
    for keys in SCHEMA.values():
        for key in keys.values():
            for m in re.finditer(r"(?:tcp6?:|tcp://[^'\"\s]*:)(\d+)", repr(key.default)):
                ports.add(int(m.group(1)))
    return ports


def taken(port: int) -> bool:
    for host in ("127.0.0.1", "0.0.0.0"):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                return True
    return False


def skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root: the README's node runs as root (per-app users, the fence)"
    for tool in ("unshare", "nsenter", "bash"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    if not (Path(sys.prefix) / "bin" / "twistd").exists():
        return f"{sys.prefix} is not a venv with twistd (the clone's .venv links to it)"
    return None


def router_get(port: int, host: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/", headers={"Host": host})
        resp = conn.getresponse()
        return resp.status, resp.read().decode("utf-8", "replace")
    finally:
        conn.close()


class QuickStartHomeTests(SynchronousTestCase):
    skip = skip_reason()

    def setUp(self) -> None:
        self.node_lines, self.cli_lines = quick_start()
        # the "home": made by mkdtemp, mode 0700 like /root; the clone inside it
        self.home = Path(tempfile.mkdtemp(prefix="epio-home-"))
        self.addCleanup(shutil.rmtree, self.home, True)
        self.assertEqual(self.home.stat().st_mode & 0o777, 0o700)
        self.clone = self.home / "epio"
        self.clone.mkdir()
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".epio-app")
        for part in CLONE_PARTS:
            src = CHECKOUT / part
            if src.is_dir():
                shutil.copytree(src, self.clone / part, ignore=ignore)
            else:
                shutil.copy2(src, self.clone / part)
        # a user's shell: no venv on PATH (the README's commands put epio there)
        path = [d for d in os.environ.get("PATH", "/usr/bin:/bin").split(":")
                if d and not (Path(d) / "epio").exists()]
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "EPIO_CONFIG_DIR")}
        self.env.update({
            "PATH": ":".join(path), "HOME": str(self.home),
            # stands for `pip install .`: the clone's epio and twistd plugin come first
            "PYTHONPATH": str(self.clone),
        })
        self.env.pop("PYTHONDONTWRITEBYTECODE", None)

    def mount_namespace(self) -> int:
        """A private mount namespace with a fresh tmpfs at /var/lib; its holder's pid."""
        holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "--",
                                   "sleep", "3600"])
        self.addCleanup(lambda: (holder.kill(), holder.wait()))
        mine = os.readlink("/proc/self/ns/mnt")
        deadline = time.monotonic() + 10
        while os.readlink(f"/proc/{holder.pid}/ns/mnt") == mine:
            if holder.poll() is not None or time.monotonic() > deadline:
                self.skipTest("cannot make a private mount namespace here")
            time.sleep(0.02)
        r = subprocess.run(["nsenter", "-t", str(holder.pid), "-m", "--", "mount", "-t",
                            "tmpfs", "-o", "mode=0755,size=2g", "tmpfs", "/var/lib"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            self.skipTest(f"cannot mount a tmpfs at /var/lib in a mount namespace: {r.stderr}")
        return holder.pid

    def in_namespace(self, ns: int, script: str) -> list[str]:
        """bash running ``script`` in the clone, in the namespace (entering a mount
        namespace moves to its root: ``--wd`` comes back to the clone)."""
        return ["nsenter", "-t", str(ns), "-m", f"--wd={self.clone}", "--", "bash", "-c",
                script]

    def test_readme_quick_start_from_a_0700_home(self) -> None:
        """As root, from a clone in a 0700 home, the README's commands as written start
        a node, log in, create hello, deploy examples/flask ("hello is live at
        http://hello.localhost:8080/"), and the app answers 200 through the router on
        port 8080; the home keeps its mode (nothing opened it)."""
        busy = sorted(p for p in default_ports() if taken(p))
        if busy:
            self.skipTest(f"the README's node needs the default ports; taken here: {busy}")
        install = self.node_lines[0]
        self.assertTrue(install.startswith(INSTALL), install)
        self.assertIn('export PATH="$PWD/.venv/bin:$PATH"', install)  # epio on PATH, 1st line
        # `pip install .` replaced by the already installed venv (see the module docstring)
        node_script = "\n".join(["set -e", f"ln -sT {sys.prefix} .venv && {install[len(INSTALL):]}",
                                 *self.node_lines[1:]])
        self.assertTrue(self.node_lines[-1].startswith("twistd -n "), self.node_lines)
        ns = self.mount_namespace()

        log_path = self.home.parent / f"{self.home.name}-node.log"
        self.addCleanup(lambda: log_path.unlink(missing_ok=True))
        log = open(log_path, "wb")
        self.addCleanup(log.close)
        node = subprocess.Popen(self.in_namespace(ns, node_script), cwd=self.clone,
                                env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.addCleanup(self.stop_group, node)

        def node_log() -> str:
            log.flush()
            return log_path.read_text("utf-8", "replace")

        deadline = time.monotonic() + 60
        while "api ready" not in node_log():
            if node.poll() is not None or time.monotonic() > deadline:
                self.fail(f"the README's node did not get ready (exit {node.poll()}):\n"
                          f"{node_log()[-4000:]}")
            time.sleep(0.1)
        self.assertIn("in /var/lib/epio", node_log())

        # in the second shell epio is not on PATH until the README's first line
        r = subprocess.run(["bash", "-c", "command -v epio"], env=self.env, cwd=self.clone,
                           capture_output=True)
        self.assertNotEqual(r.returncode, 0, r.stdout)
        cli_script = "\n".join(["set -ex", *self.cli_lines])
        try:
            cli = subprocess.run(self.in_namespace(ns, cli_script), cwd=self.clone,
                                 env=self.env, capture_output=True, text=True,
                                 timeout=DEPLOY_TIMEOUT)
        except subprocess.TimeoutExpired as e:
            self.fail(f"the README's CLI commands did not finish in {DEPLOY_TIMEOUT:g}s:\n"
                      f"{e.stdout!r}\n{e.stderr!r}\n--- node log ---\n{node_log()[-4000:]}")
        report = f"{cli.stdout}\n{cli.stderr}\n--- node log ---\n{node_log()[-4000:]}"
        self.assertEqual(cli.returncode, 0, report)
        self.assertIn("hello is live at http://hello.localhost:8080/", cli.stdout, report)

        deadline = time.monotonic() + 20
        while True:
            try:
                got = router_get(8080, "hello.localhost")
            except OSError as e:
                got = (0, repr(e))
            if got == (200, "Hello from Flask on epio!\n"):
                break
            if time.monotonic() > deadline:
                self.fail(f"no 200 through the router: {got}\n{report}")
            time.sleep(0.2)
        self.assertEqual(self.home.stat().st_mode & 0o777, 0o700)

    def stop_group(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGTERM the node shell's process group (bash, twistd and its helpers), wait
        for the node to stop its apps and exit, then SIGKILL what is left."""
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            proc.poll()
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def test_data_dir_in_the_home_refused(self) -> None:
        """The old quick start's ``--data-dir ./epio-data`` in that clone: the root node
        refuses to start, exit status 1, with the sentence that names the closed home and
        both ways out, and creates nothing there; the home keeps mode 0700."""
        proc = subprocess.run([*TWISTD, "-n", "--pidfile=", "epio", "--role=all",
                               "--data-dir", "./epio-data"], cwd=self.clone,
                              env=epio_env({"HOME": str(self.home)}), capture_output=True,
                              text=True, timeout=60)
        self.assertEqual(proc.returncode, 1, proc.stdout + proc.stderr)
        self.assertIn(f"epio: the build and app users cannot reach the data dir "
                      f"{self.clone / 'epio-data'}: {self.home} is mode 700, not searchable "
                      f"by others, so no build or app could run. Start the node with a data "
                      f"dir they can reach (--data-dir /var/lib/epio), or let them through "
                      f"(chmod o+x {self.home})", proc.stderr)
        self.assertFalse((self.clone / "epio-data").exists())
        self.assertEqual(self.home.stat().st_mode & 0o777, 0o700)
