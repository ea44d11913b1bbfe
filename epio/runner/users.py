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
from pathlib import Path

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


def uids_with_processes(uid_min: int, uid_max: int, proc: Path = Path("/proc")) -> set[int]:
    """The UIDs in ``uid_min``-``uid_max`` that own a process on this host now (any of
    its real, effective, saved or file-system UIDs: a socket is owned by the fs UID).

    The network fence keeps fencing such a UID after its last instance or session of
    this runner ended: a process that outlived its instance (a daemon that left the
    sandbox's process group without namespaces) stays fenced until it is gone.
    """
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
                        out.update(u for u in map(int, line.split()[1:])
                                   if uid_min <= u <= uid_max)
                        break
        except (OSError, ValueError):
            continue  # gone meanwhile
    return out
