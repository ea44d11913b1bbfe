"""Shared helpers for tests that run real epio node processes.

Subprocesses import epio from this checkout (``PYTHONPATH``), so the code under
test is the code in the tree, and twistd finds ``twisted/plugins/epio_plugin.py``
through the same path.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

CHECKOUT = Path(__file__).resolve().parent.parent

# What starts twistd with this interpreter (no reliance on a console script).
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def epio_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a subprocess that must import epio from this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(CHECKOUT), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])]
    )
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.update(extra or {})
    return env


#: Where :func:`free_port` picks from: below the kernel's ephemeral range (32768-60999
#: on Linux), which every outgoing connection (to PostgreSQL, Redis, another node)
#: draws its local port from, and below the app port blocks tests give runners
#: (20000 and up).  A port handed out from the ephemeral range could be taken by such a
#: connection before the node binds it ("Address already in use").
FREE_PORTS = (10000, 19999)
_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago, never one this process handed out before
    (prefer port 0 where a server allows it)."""
    import random

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(1000):
        port = random.randint(*FREE_PORTS)
        if port in _handed_out:
            continue
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in {FREE_PORTS} on {host}")


def wait_for_port(host: str, port: int, timeout: float = 20.0) -> None:
    """Block until something accepts TCP connections on host:port, or raise."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s") from None
            time.sleep(0.05)


def child_processes(pid: int, module: str) -> list[int]:
    """The child processes of ``pid`` that run ``python -m module`` (Linux /proc)."""
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            kids = Path(f"/proc/{pid}/task/{tid}/children").read_text().split()
        except OSError:
            continue
        for kid in kids:
            try:
                argv = Path(f"/proc/{kid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if module.encode() in argv:
                out.append(int(kid))
    return out


class NodeProcess:
    """A real ``twistd -n epio ...`` process with its own data dir and log file.

    ``stop()`` sends SIGTERM and waits (then SIGKILL after ``timeout``); the
    combined output is in ``self.output()``.
    """

    def __init__(
        self,
        args: Iterable[str],
        data_dir: Path | None = None,
        env: dict[str, str] | None = None,
        config: str | None = None,
    ) -> None:
        self._tmp = None
        if data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="epio-node-")
            # like any data dir's parent: a root runner refuses a data dir its build
            # and app users cannot reach (mkdtemp makes 0700)
            os.chmod(self._tmp.name, 0o711)
            data_dir = Path(self._tmp.name) / "data"
        self.data_dir = data_dir
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = self.data_dir.parent / f"node-{os.getpid()}-{id(self)}.log"
        argv = [*TWISTD, "-n", "--pidfile=", "--logfile=-", "epio", "--data-dir", str(data_dir)]
        if config is not None:
            cfg = self.data_dir.parent / f"epio-{id(self)}.toml"
            cfg.write_text(config)
            argv += ["--config", str(cfg)]
        argv += list(args)
        self.argv = argv
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=epio_env(env),
            cwd=str(self.data_dir.parent),
            start_new_session=True,
        )

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text("utf-8", "replace")

    def wait_for_log(self, text: str, timeout: float = 30.0) -> str:
        """Block until ``text`` appears in the node's output; raise with the output if not."""
        deadline = time.monotonic() + timeout
        while True:
            out = self.output()
            if text in out:
                return out
            if self.proc.poll() is not None:
                raise AssertionError(f"node exited ({self.proc.returncode}) before {text!r}:\n{out}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not logged after {timeout}s:\n{out}")
            time.sleep(0.05)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, wait up to ``timeout``, then SIGKILL the process group."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the node's whole process group (a crashed node)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def cleanup(self) -> None:
        self.kill()
        if not self._log.closed:
            self._log.close()
        if self._tmp is not None:
            self._tmp.cleanup()


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(doc: dict[str, dict[str, object]]) -> str:
    """Write a two-level config document as TOML (the subset epio's config uses)."""
    out = []
    for section, table in doc.items():
        out.append(f"[{section}]")
        out.extend(f"{k} = {_toml_value(v)}" for k, v in table.items())
        out.append("")
    return "\n".join(out)


def isolated_config(
    overrides: dict[str, dict[str, object]] | None = None,
) -> tuple[dict[str, dict[str, object]], dict[int, int]]:
    """A config document in which every default port is replaced by a free one, and
    the app UID range by a random block of 500 UIDs (unless ``overrides`` sets it).

    The same old port always maps to the same new port, so the defaults that wire
    roles to each other (``cluster.nexus`` pointing at ``nexus.*_bind``, say) stay
    wired.  Returns the document (for :func:`to_toml`) and the port map.
    """
    import re

    from epio.config.schema import SCHEMA

    ports: dict[int, int] = {}

    def remap(text: str) -> str:
        def sub(m: re.Match[str]) -> str:
            old = int(m.group(2))
            if old not in ports:
                ports[old] = free_port()
            return f"{m.group(1)}{ports[old]}"

        new = re.sub(r"((?:tcp://[^\s\"]*?:)|(?:^tcp6?:))(\d+)", sub, text)
        if new != text and new.startswith("tcp:") and not new.startswith("tcp://") \
                and "interface=" not in new:
            new += ":interface=127.0.0.1"  # test servers never listen beyond loopback
        return new

    def walk(value: object) -> object:
        if isinstance(value, str):
            return remap(value)
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        return value

    doc: dict[str, dict[str, object]] = {}
    for section, keys in SCHEMA.items():
        for name, key in keys.items():
            new = walk(key.default)
            if new != key.default:
                doc.setdefault(section, {})[name] = new
    # a UID block of its own (unless the caller sets one): two test nodes running at once
    # never run apps as the same UID, so neither's network fence matches the other's apps
    # (docs/security.md: a fence matches only the UIDs its runner runs)
    runner = (overrides or {}).get("runner", {})
    if "uid_min" not in runner and "uid_max" not in runner:
        low = random.SystemRandom().randrange(20000, 59500, 500)  # 79 blocks
        doc.setdefault("runner", {}).update({"uid_min": low, "uid_max": low + 499})
    # and a block of instance ports of its own: two nodes at once (test runs side by
    # side) would otherwise both hand out 20000, 20001, ... and take each other's
    if "port_min" not in runner and "port_max" not in runner:
        low = random.SystemRandom().randrange(20000, 32000, 200)  # 60 blocks
        doc.setdefault("runner", {}).update({"port_min": low, "port_max": low + 199})
    for section, table in (overrides or {}).items():
        doc.setdefault(section, {}).update(table)
    return doc, ports


def small_tmpfs(testcase: Any, size: str) -> Path:
    """A tmpfs of ``size`` (e.g. "2m") mounted for one test and unmounted at cleanup:
    a full disk on demand.  Skips the test where mounting is not allowed."""
    import subprocess as sp

    path = Path(testcase.mktemp()).absolute()
    path.mkdir(parents=True)
    r = sp.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
               capture_output=True, text=True)
    if r.returncode != 0:
        raise testcase.skipTest(f"cannot mount a small tmpfs here: {r.stderr.strip()}")
    testcase.addCleanup(lambda: sp.run(["umount", "-l", str(path)]))
    return path
