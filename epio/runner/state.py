"""The runner's state file and what a restarted runner does with it.

``DATA_DIR/runner/state.json`` (0600, replaced atomically on every change)
records each instance: its ``runner.start`` spec, state, port, pids, process
group, cgroups, scratch dir and image.  A runner that starts finds the file of
its previous run and:

1. kills whatever is left of the old processes -- bubblewrap's
   ``--die-with-parent`` (and ``setpriv --pdeathsig`` without a sandbox)
   already SIGKILLed them when the old runner died; this catches grandchildren
   that escaped, by process group and by cgroup membership;
2. removes every instance cgroup under its own ``<runner.cgroup_parent>/runner-<key>``
   (the key is a hash of the data dir: other runners on the host are left alone) and every
   scratch dir, and unmounts image mounts no instance needs;
3. starts again, from scratch, every instance that was not stopped or failed.

Adoption of live processes is deliberately not done: a process that is not
our child cannot be ``wait()``-ed (its exit status, and so OOM and crash
reporting, would be lost), and ``--die-with-parent`` means there is nothing
alive to adopt anyway.  A runner restart therefore restarts its instances
(routers keep using instances on other runners meanwhile); docs/runner.md.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

from twisted.logger import Logger

from epio.secretfile import write_secret_file

STATE_VERSION = 1
log = Logger(namespace="epio.runner.state")


def save(path: Path, body: dict[str, Any]) -> None:
    """Write the state atomically (tmp file + rename), mode 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_secret_file(path, json.dumps({"version": STATE_VERSION, **body}, sort_keys=True))


class RecordCache:
    """Each instance's state-file record as JSON text, kept between saves: a save
    serialises only the records that changed since the last one (a runner with 1,000
    asleep instances rewrote all of them on every change of any one)."""

    def __init__(self) -> None:
        self._texts: dict[str, tuple[dict[str, Any], str]] = {}

    def render(self, head: dict[str, Any], records: list[tuple[str, dict[str, Any]]]) -> str:
        """The state file's text for ``head`` (boot and node ids) and ``records``
        (instance id, record) — what :func:`save` writes for the same body."""
        texts: dict[str, tuple[dict[str, Any], str]] = {}
        parts = []
        for iid, record in records:
            known = self._texts.get(iid)
            text = known[1] if known is not None and known[0] == record \
                else json.dumps(record, sort_keys=True)
            texts[iid] = (record, text)
            parts.append(text)
        self._texts = texts
        doc = json.dumps({"version": STATE_VERSION, **head, "instances": None}, sort_keys=True)
        return doc.replace('"instances": null', '"instances": [' + ", ".join(parts) + "]", 1)


def save_text(path: Path, text: str) -> None:
    """Write a state file's text (from :meth:`RecordCache.render`) as :func:`save` does."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_secret_file(path, text)


def load(path: Path) -> dict[str, Any] | None:
    """The previous run's state, or None (missing or unreadable: logged)."""
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warn("runner state file {path} is unreadable ({error}); starting empty",
                 path=str(path), error=str(e))
        return None
    if not isinstance(raw, dict) or raw.get("version") != STATE_VERSION:
        log.warn("runner state file {path} has an unknown version; starting empty",
                 path=str(path))
        return None
    return raw


def process_table(proc: Path = Path("/proc")) -> list[tuple[int, int, int, int]]:
    """(pid, pgid, uid, start_time) of every process we can see."""
    out = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat.rsplit(")", 1)[1].split()
            uid = entry.stat().st_uid
        except (OSError, IndexError):
            continue
        out.append((int(entry.name), int(fields[2]), uid, int(fields[19])))
    return out


def kill_leftovers(records: list[dict[str, Any]], proc: Path = Path("/proc")) -> int:
    """SIGKILL what is left of recorded instances; return how many processes got it.

    A recorded pid is killed only if its start time still matches (pids are
    reused); a recorded process group only in the processes that run as the
    instance's app UID (process group ids are reused too).
    """
    killed = 0
    table = process_table(proc)
    for rec in records:
        pid, start = rec.get("pid"), rec.get("start_time")
        group, uid = rec.get("group"), rec.get("uid")
        for p, pgid, puid, pstart in table:
            mine = (p == pid and pstart == start) or (
                group is not None and pgid == group and puid == uid and uid not in (None, 0)
            )
            if mine and p != os.getpid():
                try:
                    os.kill(p, signal.SIGKILL)
                    killed += 1
                except (ProcessLookupError, PermissionError):
                    pass
    return killed


def mounted_under(directory: Path, mountinfo: Path = Path("/proc/self/mountinfo")) -> list[Path]:
    """Mount points directly below ``directory``."""
    out: list[Path] = []
    try:
        text = mountinfo.read_text()
    except OSError:
        return out
    for line in text.splitlines():
        parts = line.split()
        if len(parts) > 4:
            mp = Path(parts[4].replace("\\040", " "))
            if mp.parent == directory:
                out.append(mp)
    return out
