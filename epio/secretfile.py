"""Write a file that holds a secret without following anything planted in its directory.

A secret file (an admin token, the CLI's config, a redis config with its
password, a runner's state) is written to a fresh temporary file in the same
directory and renamed over the final name. The temporary file is created with
``O_CREAT|O_EXCL|O_NOFOLLOW`` under a random name, and its mode and owner are
set on the open descriptor: a symlink or file another user planted in the
directory (for instance at a guessable ``.name.<pid>``) is never opened,
chmodded or chowned. ``os.replace`` renames the directory entry itself, so a
symlink at the final name is replaced, not followed.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

# How many random names are tried before giving up (each collision means an
# existing entry at a 64-bit random name: something is planting them).
CREATE_ATTEMPTS = 16


def write_secret_file(path: Path, data: str, mode: int = 0o600,
                      owner: tuple[int, int] | None = None) -> Path:
    """Write ``data`` to ``path`` atomically with ``mode``; chown to ``owner`` if given.

    Raises FileExistsError when no fresh temporary name could be created.
    """
    fd = -1
    tmp = path
    for _ in range(CREATE_ATTEMPTS):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, mode)
        except FileExistsError:
            continue
        break
    if fd < 0:
        raise FileExistsError(f"could not create a temporary file next to {path}")
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), mode)
            if owner is not None:
                os.fchown(f.fileno(), owner[0], owner[1])
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
