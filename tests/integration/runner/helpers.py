"""Real runners for integration tests: real sandbox, cgroups, processes, UIDs.

Images are directory images made here (``DATA_DIR/images/<digest>/`` with
``app/``, ``venv/`` (``python -m venv --without-pip`` of this Python's base
install) and ``epio/manifest.json``), since a probe app is a plain Python script.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

from twisted.internet import defer, task

from epio.pipeline import MemoryLogSink
from epio.runner.build.images import ImageStore
from epio.runner.cgroups import detect
from epio.runner.health import NetworkProbe
from epio.runner.launcher import SandboxLauncher
from epio.runner.ports import PortAllocator, bindable
from epio.runner.sandbox import detect_isolation
from epio.runner.service import bwrap_trial
from epio.runner.supervisor import Settings, Supervisor

BWRAP = shutil.which("bwrap")
SETPRIV = shutil.which("setpriv")
ROOT = os.geteuid() == 0
BASE_PYTHON = Path(sys.base_prefix) / "bin" / "python3"


def skip_reason() -> str | None:
    if not ROOT:
        return "needs root (per-app UIDs, cgroups, bubblewrap)"
    if not BWRAP or not SETPRIV:
        return "needs bubblewrap and setpriv"
    return None


def make_image(data_dir: Path, files: dict[str, str], python: Path | None = None) -> str:
    """A directory image holding ``files`` under app/; return its (fake) digest.

    The venv points at ``python`` (default: this interpreter's base install, which the
    sandbox binds read-only wherever it lives)."""
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()
                            + uuid.uuid4().bytes).hexdigest()
    root = data_dir / "images" / digest
    (root / "app").mkdir(parents=True)
    (root / "epio").mkdir()
    for name, text in files.items():
        (root / "app" / name).write_text(text)
    subprocess.run([str(python or BASE_PYTHON), "-m", "venv", "--without-pip", str(root / "venv")],
                   check=True)
    (root / "epio" / "manifest.json").write_text("{}")
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            if not p.is_symlink():
                os.chmod(p, 0o755 if p.is_dir() else 0o644)
    os.chmod(root, 0o755)
    return digest


async def sleep(reactor: Any, seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


async def wait_for(reactor: Any, predicate: Any, timeout: float, step: float = 0.05) -> bool:
    waited = 0.0
    while not predicate():
        if waited >= timeout:
            return False
        await sleep(reactor, step)
        waited += step
    return True


class RealRunner:
    """A Supervisor with the real launcher, probes, cgroups and sandbox in a temp dir."""

    def __init__(self, reactor: Any, sandbox: str = "auto", **settings: Any) -> None:
        self.reactor = reactor
        self.data_dir = Path(tempfile.mkdtemp(prefix="epio-runner-it-"))
        os.chmod(self.data_dir, 0o711)
        self.secret = self.data_dir / "cluster-secret"
        self.secret.write_text("00" * 32 + "\n")
        os.chmod(self.secret, 0o600)
        self.cgroup_parent = f"epio-test-{uuid.uuid4().hex[:8]}"
        self.cgroups = detect(parent=self.cgroup_parent)
        trial = bwrap_trial(BWRAP) if BWRAP and sandbox != "none" else None
        self.isolation = detect_isolation(sandbox, os.geteuid(), BWRAP, SETPRIV, self.cgroups,
                                          trial.works if trial else None,
                                          shm_size=trial.shm_size if trial else True)
        self.images = ImageStore(self.data_dir, reactor=reactor)
        self.launcher = SandboxLauncher(reactor, self.data_dir, self.isolation, self.cgroups,
                                        self.images, bwrap=BWRAP, setpriv=SETPRIV,
                                        node_id="test")
        self.sink = MemoryLogSink()
        defaults: dict[str, Any] = dict(health_boot_interval=0.1, health_interval=0.5, drain_delay=0.5,
                        worker_settle=0.3)
        defaults.update(settings)
        low = 21000 + (os.getpid() % 50) * 100  # ports < 32768, spread per test process
        high = low + 99
        self.ports = PortAllocator(low, high, bindable("127.0.0.1"))
        # the supervisor's observers and spawn gates, as the runner's root owns them
        self.observers: list[Any] = []
        self.gates: list[Any] = []
        self.sup = Supervisor(reactor, self.launcher, NetworkProbe(reactor), self.sink,
                              self.ports, Settings(**defaults), observers=self.observers,
                              before_spawn=self.gates)

    def image(self, files: dict[str, str], python: Path | None = None) -> str:
        return make_image(self.data_dir, files, python)

    def start(self, iid: str, app: str, uid: int, digest: str, command: str,
              **kw: Any) -> dict[str, Any]:
        body = {"instance_id": iid, "app": app, "uid": uid, "release": 1,
                "process_type": kw.pop("process_type", "web"), "command": command,
                "image_digest": digest, "env": kw.pop("env", {}), "grace": kw.pop("grace", 5),
                "boot_timeout": kw.pop("boot_timeout", 20)}
        body.update(kw)
        return self.sup.start(body)

    def state(self, iid: str) -> str:
        return self.sup.get(iid).state.value

    def texts(self, app: str, source: str | None = None) -> list[str]:
        return self.sink.texts(app, source)

    async def close(self) -> None:
        waits = []
        for inst in list(self.sup.instances.values()):
            if inst.state.value != "stopped":
                waits.append(self.sup.stop(inst.spec.instance_id, grace=1))
        if waits:
            await defer.DeferredList(waits)
        # let cleanups (cgroup removal) finish
        await sleep(self.reactor, 0.3)
        self.sup.cancel_timers()
        for base in self.cgroups.bases.values():
            for _ in range(20):
                try:
                    for child in base.iterdir():
                        if child.is_dir():
                            child.rmdir()
                    base.rmdir()
                    break
                except OSError:
                    await sleep(self.reactor, 0.1)
        shutil.rmtree(self.data_dir, ignore_errors=True)
