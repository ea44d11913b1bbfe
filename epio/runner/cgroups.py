"""cgroups v1 limits for app instances: memory, CPU share, PIDs.

Each instance gets one cgroup per controller, nested under the runner's own
cgroup of that controller (``<own>/<parent>/<instance_id>``), so a runner that
is itself limited (a container, a systemd slice) hands its apps a share of its
own budget and never escapes it.  Processes enter the cgroups before the app's
first instruction: the launch shim writes its own pid into every
``cgroup.procs`` and then execs the sandbox (see :mod:`epio.runner.sandbox`),
so no child can be forked outside them.

The memory cgroup also tells the supervisor why a process died: the kernel
counts OOM kills in ``memory.oom_control`` (``oom_kill N``).

All file I/O here is on cgroupfs (in-kernel, non-blocking in practice); it is
done synchronously from the reactor thread.
"""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Iterable
from pathlib import Path

from attrs import field, frozen

CONTROLLERS = ("memory", "cpu", "pids")
#: controllers that only count (CPU time for stats): used when present, never a problem
#: of isolation when missing (``CgroupSupport.accounting_off`` says why)
ACCOUNTING = ("cpuacct",)
# the file that proves a controller is there and writable by us
_PROBE = {"memory": "memory.limit_in_bytes", "cpu": "cpu.shares", "pids": "pids.max",
          "cpuacct": "cpuacct.usage"}


@frozen
class Limits:
    """Resource limits of one instance (from ``runner.start`` ``limits``)."""

    memory_mb: int
    cpu_shares: int
    pids: int
    nofile: int


@frozen
class CgroupSupport:
    """Which controllers the runner can use, where, and why the others are off."""

    bases: dict[str, Path]
    problems: dict[str, str]
    accounting_off: dict[str, str] = field(factory=dict)

    def has(self, controller: str) -> bool:
        return controller in self.bases


def own_cgroups(proc_self_cgroup: Path) -> dict[str, str]:
    """Parse ``/proc/self/cgroup``: controller -> path of this process (v1 lines)."""
    out: dict[str, str] = {}
    try:
        text = proc_self_cgroup.read_text()
    except OSError:
        return out
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3 or not parts[1]:
            continue
        for ctrl in parts[1].split(","):
            out[ctrl] = parts[2]
    return out


def detect(
    root: Path = Path("/sys/fs/cgroup"),
    proc_self_cgroup: Path = Path("/proc/self/cgroup"),
    parent: str = "epio",
) -> CgroupSupport:
    """Find usable v1 controllers and create ``parent`` under our own cgroups.

    Runs once at runner start (I/O allowed there).
    """
    own = own_cgroups(proc_self_cgroup)
    bases: dict[str, Path] = {}
    problems: dict[str, str] = {}
    for ctrl in CONTROLLERS + ACCOUNTING:
        mount = root / ctrl
        if not (mount / _PROBE[ctrl]).exists() and not (mount / "cgroup.procs").exists():
            problems[ctrl] = f"no cgroup v1 {ctrl} controller at {mount}"
            continue
        if ctrl not in own:
            problems[ctrl] = f"this process is in no {ctrl} cgroup"
            continue
        base = mount / own[ctrl].lstrip("/") / parent
        try:
            base.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            problems[ctrl] = f"cannot create {base}: {e.strerror}"
            continue
        if not (base / _PROBE[ctrl]).exists():
            problems[ctrl] = f"{base} has no {_PROBE[ctrl]}"
            continue
        if not os.access(base / "cgroup.procs", os.W_OK):
            problems[ctrl] = f"{base}/cgroup.procs is not writable"
            continue
        bases[ctrl] = base
    off = {c: problems.pop(c) for c in ACCOUNTING if c in problems}
    return CgroupSupport(bases=bases, problems=problems, accounting_off=off)


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


class InstanceCgroup:
    """The cgroups of one instance (one directory per usable controller)."""

    def __init__(self, support: CgroupSupport, name: str) -> None:
        self.name = name
        self.paths = {ctrl: base / name for ctrl, base in support.bases.items()}

    def create(self, limits: Limits) -> list[str]:
        """Create the cgroups and write the limits; return problems (empty if all set)."""
        problems: list[str] = []
        for ctrl, path in list(self.paths.items()):
            try:
                path.mkdir(exist_ok=True)
                if ctrl == "memory":
                    limit = limits.memory_mb * 1024 * 1024
                    _write(path / "memory.limit_in_bytes", str(limit))
                    memsw = path / "memory.memsw.limit_in_bytes"
                    if memsw.exists():
                        try:
                            _write(memsw, str(limit))  # no swapping past the limit
                        except OSError:
                            pass
                elif ctrl == "cpu":
                    _write(path / "cpu.shares", str(limits.cpu_shares))
                elif ctrl == "pids":
                    _write(path / "pids.max", str(limits.pids))
            except OSError as e:
                problems.append(f"{ctrl}: {e.strerror}")
                del self.paths[ctrl]
        return problems

    def procs_files(self) -> list[str]:
        return [str(p / "cgroup.procs") for p in self.paths.values()]

    def pids(self) -> set[int]:
        """Every process in any of the instance's cgroups."""
        found: set[int] = set()
        for path in self.paths.values():
            try:
                text = (path / "cgroup.procs").read_text()
            except OSError:
                continue
            found.update(int(x) for x in text.split())
        return found

    def oom_kills(self) -> int:
        """How many processes the kernel OOM-killed in this cgroup (0 if unknown)."""
        path = self.paths.get("memory")
        if path is None:
            return 0
        try:
            text = (path / "memory.oom_control").read_text()
        except OSError:
            return 0
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def memory_usage(self) -> int | None:
        path = self.paths.get("memory")
        if path is None:
            return None
        try:
            return int((path / "memory.usage_in_bytes").read_text())
        except (OSError, ValueError):
            return None

    def cpu_usage_usec(self) -> int | None:
        """CPU time (user + system) every process of the instance used so far,
        exited ones included (``cpuacct.usage``, nanoseconds, in microseconds)."""
        path = self.paths.get("cpuacct")
        if path is None:
            return None
        try:
            return int((path / "cpuacct.usage").read_text()) // 1000
        except (OSError, ValueError):
            return None

    def signal_all(self, sig: int = signal.SIGKILL) -> int:
        """Send ``sig`` to every process in the cgroups; return how many got it."""
        sent = 0
        for pid in self.pids():
            try:
                os.kill(pid, sig)
                sent += 1
            except ProcessLookupError:
                pass
        return sent

    def remove(self) -> bool:
        """Remove the (empty) cgroups; False if some still hold processes."""
        ok = True
        for path in self.paths.values():
            try:
                path.rmdir()
            except FileNotFoundError:
                pass
            except OSError as e:
                if e.errno in (errno.EBUSY, errno.ENOTEMPTY):
                    ok = False
                else:
                    raise
        return ok


def stale_cgroups(support: CgroupSupport, keep: Iterable[str]) -> list[InstanceCgroup]:
    """Instance cgroups under our parent that no live instance owns."""
    keep = set(keep)
    names: set[str] = set()
    for base in support.bases.values():
        try:
            names.update(p.name for p in base.iterdir() if p.is_dir())
        except OSError:
            continue
    return [InstanceCgroup(support, n) for n in sorted(names - keep)]
