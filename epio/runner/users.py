"""Per-app users: the numeric UID/GID an app's processes run as.

The platform (the api's scheduler) allocates one UID per app and never reuses it
while the app exists; it arrives in ``runner.start`` as ``uid``.  The runner
does not create system accounts (``useradd`` would race between runners and
leave entries behind): processes run with the bare numeric id and the GID equal
to the UID.  Inside the sandbox a synthesized ``/etc/passwd`` and ``/etc/group``
name only ``root``, ``nobody`` and the app user, so tools that look the user up
(``getpass.getuser()``, ``psql``, ``ssh``) work and no host account is visible.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from attrs import frozen

from epio.domain import APP_NAME


class UserError(ValueError):
    """A UID or app name the runner refuses to run as."""


@frozen
class AppUser:
    """The identity of one app's processes."""

    app: str
    uid: int
    gid: int
    home: str = "/home/app"

    @property
    def name(self) -> str:
        return "app-" + self.app

    def passwd(self) -> str:
        """The sandbox's whole /etc/passwd."""
        return (
            "root:x:0:0:root:/root:/usr/sbin/nologin\n"
            f"{self.name}:x:{self.uid}:{self.gid}:epio app {self.app}:{self.home}:/bin/sh\n"
            "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
        )

    def group(self) -> str:
        """The sandbox's whole /etc/group."""
        return f"root:x:0:\n{self.name}:x:{self.gid}:\nnogroup:x:65534:\n"


def check_app_name(app: str) -> str:
    """Return ``app`` if it is a valid app name (it becomes a path component)."""
    if not isinstance(app, str) or not APP_NAME.match(app):
        raise UserError(f"invalid app name {app!r}: lowercase letters, digits and '-' only")
    return app


def app_user(app: str, uid: object, uid_min: int, uid_max: int) -> AppUser:
    """Validate the platform-allocated ``uid`` for ``app`` and return its identity.

    Never root, never a system account, always inside the configured range.
    """
    check_app_name(app)
    if not isinstance(uid, int) or isinstance(uid, bool):
        raise UserError(f"uid must be an integer, not {uid!r}")
    if uid == 0:
        raise UserError("refusing to run an app as root (uid 0)")
    if not uid_min <= uid <= uid_max:
        raise UserError(f"uid {uid} is outside the app range {uid_min}-{uid_max}")
    return AppUser(app=app, uid=uid, gid=uid)


def uids_with_processes(candidates: Collection[int], proc: Path = Path("/proc")) -> set[int]:
    """Those of ``candidates`` that own a process on this host now (by any of its
    real, effective, saved or file-system UIDs: a socket is owned by the fs UID).

    The network fence keeps fencing a UID this runner ran after its last instance or
    session of this runner ended while such a process is left (a daemon that left
    the sandbox without namespaces), until it is gone.
    """
    wanted = set(candidates)
    out: set[int] = set()
    try:
        entries = list(os.scandir(proc))
    except OSError:
        return out
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            with open(os.path.join(entry.path, "status"), "rb") as f:
                for line in f:
                    if line.startswith(b"Uid:"):
                        out.update(u for u in map(int, line.split()[1:]) if u in wanted)
                        break
        except (OSError, ValueError):
            continue  # gone meanwhile
    return out


# -- one host, several runners: their ranges must not overlap ------------------------


def host_identity(proc: Path = Path("/proc")) -> str:
    """What names this host among the runners of a store: the kernel's boot id and
    this process's network namespace (``<boot id>/net:<inode>``; "" if unreadable).
    Two runners with the same identity share the kernel's UIDs, its ports and its
    nftables rules; a network namespace is a host of its own for ports and rules."""
    try:
        boot = (proc / "sys" / "kernel" / "random" / "boot_id").read_text().strip()
        net = os.readlink(proc / "self" / "ns" / "net")
    except OSError:
        return ""
    return f"{boot}/{net}"


@frozen
class RangeClaim:
    """The app UIDs and instance ports a runner of this host uses."""

    node_id: str
    uids: tuple[int, int]
    ports: tuple[int, int]


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def range_conflicts(mine: RangeClaim, others: Iterable[RangeClaim]) -> list[str]:
    """One sentence per overlap of ``mine`` with another live runner of this host."""
    out: list[str] = []
    for o in sorted(others, key=lambda c: c.node_id):
        if o.node_id == mine.node_id:
            continue
        if _overlap(mine.uids, o.uids):
            out.append(f"its app UIDs runner.uid_min-uid_max {mine.uids[0]}-{mine.uids[1]} "
                       f"overlap {o.uids[0]}-{o.uids[1]} of runner {o.node_id} on this host")
        if _overlap(mine.ports, o.ports):
            out.append(f"its instance ports runner.port_min-port_max {mine.ports[0]}-"
                       f"{mine.ports[1]} overlap {o.ports[0]}-{o.ports[1]} of runner "
                       f"{o.node_id} on this host")
    return out


def _pair(value: object) -> tuple[int, int] | None:
    if isinstance(value, list | tuple) and len(value) == 2 \
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return int(value[0]), int(value[1])
    return None


def claims_on_host(nodes: Iterable[tuple[str, float, Mapping[str, Any]]], host: str,
                   now: float, max_age: float,
                   alive: Callable[[Mapping[str, Any]], bool | None]) -> list[RangeClaim]:
    """The ranges of the live runners of ``host`` among ``nodes`` (id, last_seen,
    status as registered).  ``alive(status["host"])`` says whether the runner's
    process still exists (None: it cannot tell, e.g. another pid namespace); then a
    registration younger than ``max_age`` seconds counts as alive."""
    out: list[RangeClaim] = []
    for node_id, last_seen, status in nodes:
        where = status.get("host")
        if not isinstance(where, Mapping) or not host or where.get("id") != host:
            continue
        uids, ports = _pair(status.get("uids")), _pair(status.get("ports"))
        if uids is None or ports is None:
            continue
        live = alive(where)
        if live is None:
            live = now - last_seen <= max_age
        if live:
            out.append(RangeClaim(node_id, uids, ports))
    return out


def refusal(problems: Sequence[str]) -> str:
    """What a runner whose ranges overlap another's on this host says as it exits."""
    return ("epio: the runner cannot start: " + "; ".join(problems) + ". Runners on one "
            "host must use disjoint runner.uid_min/uid_max and runner.port_min/port_max "
            "(docs/runner.md)")
