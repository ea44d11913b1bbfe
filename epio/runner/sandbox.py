"""The sandbox an app process runs in, and what the host lets us enforce.

Launch chain of one instance (each step ``exec``s the next, so the pid the
reactor spawned stays the same process until bubblewrap forks)::

    /bin/sh -c SHIM            root: ulimit -n, enter the instance's cgroups
      bwrap ...                new pid/ipc/uts/mount namespaces, --die-with-parent
        [ns init, pid 1]       bubblewrap's reaper, session + group leader
          setpriv --reuid U --regid U --clear-groups --no-new-privs
            /bin/sh -c COMMAND the Procfile command, as the app's UID

Without bubblewrap (or not root) the chain degrades step by step and
:class:`Isolation` says exactly which protections are off.  The network
namespace is deliberately shared: the app binds ``$PORT`` on the host network so
routers reach it; the control plane's TCP ports are protected by the bus HMAC
signatures and encryption, api authentication and the runner's nftables network
fence by app UID (epio/runner/fence.py, docs/security.md).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from attrs import field, frozen

from epio.manifest import DATA_DIRECTORY
from epio.runner.build.platform import SETTINGS_MODULE as PLATFORM_SETTINGS
from epio.runner.cgroups import CgroupSupport
from epio.runner.users import AppUser

# paths inside the sandbox
APP_ROOT = "/app"  # the image: app/, venv/, epio/
HOME = "/home/app"
# the app's writable, persistent data dir; builds expand %(data_directory)s to it,
# and ``~/data`` (ep.io's path) is a symlink to it
DATA = DATA_DIRECTORY

# /etc entries an app needs (name resolution, TLS roots, time zone, linker)
ETC_ESSENTIALS = (
    "resolv.conf", "hosts", "host.conf", "nsswitch.conf", "gai.conf", "ssl",
    "ca-certificates", "ca-certificates.conf", "localtime", "timezone", "mime.types",
    "protocols", "services", "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "alternatives",
    "os-release", "debian_version",
)
TOP_DIRS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
#: The size of each instance's private /dev/shm (``runner.shm_mb``): POSIX shared
#: memory and semaphores (multiprocessing.Lock, Celery's prefork pool) live there.
DEFAULT_SHM_BYTES = 64 * 1024 * 1024


@frozen
class Isolation:
    """The protections this runner enforces; reported at start and in heartbeats."""

    sandbox: str  # "bwrap" or "none"
    uid_switch: bool  # processes run as the app's own UID
    namespaces: tuple[str, ...]  # pid, ipc, uts, mount
    cgroups: tuple[str, ...]  # memory, cpu, pids
    nofile: bool
    off: dict[str, str]  # protection -> why it is off
    # bubblewrap takes --size (0.7.0+): /dev/shm is bounded by runner.shm_mb; without
    # it /dev/shm is an unsized tmpfs whose pages the instance's memory cgroup bounds
    shm_size: bool = True

    def as_dict(self) -> dict[str, Any]:
        return {
            "sandbox": self.sandbox,
            "uid_switch": self.uid_switch,
            "namespaces": list(self.namespaces),
            "cgroups": list(self.cgroups),
            "nofile": self.nofile,
            "network": "shared",
            "off": dict(self.off),
        }


def detect_isolation(
    mode: str,
    euid: int,
    bwrap: str | None,
    setpriv: str | None,
    cgroups: CgroupSupport,
    bwrap_works: bool | None = None,
    shm_size: bool = True,
) -> Isolation:
    """Decide what we can enforce.  ``mode`` is ``runner.sandbox``: auto, bwrap or none.

    ``bwrap_works`` is the result of a trial run (None: not tried); ``shm_size``
    whether that bubblewrap takes ``--size`` (:func:`shm_args`).
    """
    off: dict[str, str] = {}
    root = euid == 0
    use_bwrap = False
    if mode == "none":
        off["sandbox"] = "disabled by runner.sandbox = none"
    elif not root:
        off["sandbox"] = "the runner is not root: no namespaces or bind mounts"
    elif bwrap is None:
        off["sandbox"] = "bubblewrap (bwrap) is not installed"
    elif bwrap_works is False:
        off["sandbox"] = "bubblewrap is installed but failed its trial run"
    else:
        use_bwrap = True
    uid_switch = root and setpriv is not None
    if not uid_switch:
        off["uid"] = (
            "the runner is not root: apps run as the runner's own user"
            if not root else "setpriv (util-linux) is not installed: cannot drop to the app UID"
        )
    if use_bwrap and not uid_switch:
        use_bwrap = False
        off["sandbox"] = "no way to drop to the app UID inside bubblewrap"
    namespaces = ("pid", "ipc", "uts", "mount") if use_bwrap else ()
    if not use_bwrap:
        off["filesystem"] = (
            "no mount namespace: apps see the host filesystem (file modes still "
            "keep other apps' data dirs private when UIDs differ)"
        )
        off["processes"] = "no pid namespace: apps see every process of the host"
    for ctrl, why in cgroups.problems.items():
        off[ctrl] = why
    if not root:
        # without root we cannot write cgroup limits for other users' processes
        pass
    return Isolation(
        sandbox="bwrap" if use_bwrap else "none",
        uid_switch=uid_switch,
        namespaces=namespaces,
        cgroups=tuple(c for c in ("memory", "cpu", "pids") if cgroups.has(c)),
        nofile=True,
        off=off,
        shm_size=shm_size,
    )


def shm_args(shm_bytes: int, sized: bool = True) -> list[str]:
    """bubblewrap options for each instance's private, writable /dev/shm (bubblewrap's
    /dev has a root-owned one), bounded to ``shm_bytes`` when ``sized``: ``--size``
    first shipped in bubblewrap 0.7.0.  Without it the tmpfs has the kernel's default
    size; its pages still count against the instance's memory cgroup."""
    size = ["--size", str(shm_bytes)] if sized else []
    return ["--perms", "1777", *size, "--tmpfs", "/dev/shm"]


@frozen
class Layout:
    """Where an instance's paths are, as the app sees them."""

    app_root: str
    home: str
    data: str
    tmp: str


@frozen
class LaunchSpec:
    """Everything needed to launch one instance."""

    instance_id: str
    user: AppUser
    image_root: Path  # host path of the image (app/, venv/, epio/)
    data_dir: Path  # host path of the app's persistent data dir
    scratch: Path  # host path of the instance's own dir (home/, tmp/, etc/)
    command: str | tuple[str, ...]
    nofile: int
    cgroup_procs: tuple[str, ...]
    python_prefix: str | None  # the Python install the venv points to (bound read-only)
    workdir: str = "app"  # image-relative working directory (the build's facts)
    shm_bytes: int = DEFAULT_SHM_BYTES  # size of the private /dev/shm (a tmpfs)
    data_seed: tuple[str, ...] = ()  # ImageFacts.data_seed: copied before a shell command
    data_dirs: tuple[str, ...] = ()  # ImageFacts.data_dirs: made before a shell command


def layout_for(spec: LaunchSpec, isolation: Isolation) -> Layout:
    if isolation.sandbox == "bwrap":
        return Layout(app_root=APP_ROOT, home=HOME, data=DATA, tmp="/tmp")
    return Layout(
        app_root=str(spec.image_root),
        home=str(spec.scratch / "home"),
        data=str(spec.data_dir),
        tmp=str(spec.scratch / "tmp"),
    )


def app_environment(
    layout: Layout, platform: Mapping[str, str], user_env: Mapping[str, str],
    image_env: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The app's environment: the image's build env (e.g. DJANGO_SETTINGS_MODULE), then
    user config vars over it, then platform values that win over both."""
    env = {str(k): str(v) for k, v in (image_env or {}).items()}
    env.update({str(k): str(v) for k, v in user_env.items()})
    # the build's platform settings stay on top of a DJANGO_SETTINGS_MODULE config var:
    # they import the module it names (epio.runner.build.platform)
    platform_settings = (image_env or {}).get("DJANGO_SETTINGS_MODULE")
    chosen = str(user_env.get("DJANGO_SETTINGS_MODULE") or "")
    if platform_settings == PLATFORM_SETTINGS and chosen and chosen != PLATFORM_SETTINGS:
        env["EPIO_APP_SETTINGS_MODULE"] = chosen
        env["DJANGO_SETTINGS_MODULE"] = PLATFORM_SETTINGS
    venv = layout.app_root + "/venv"
    env.update(
        {
            "HOME": layout.home,
            "TMPDIR": layout.tmp,
            "EPIO_DATA_DIR": layout.data,
            "VIRTUAL_ENV": venv,
            "PATH": f"{venv}/bin:/usr/local/bin:/usr/bin:/bin",
            "PYTHONUNBUFFERED": "1",
            "LANG": env.get("LANG", "C.UTF-8"),
        }
    )
    env.update(platform)
    return env


@frozen
class ImageFacts:
    """How to run an image, from its ``epio/manifest.json`` ``build`` facts."""

    workdir: str = "app"
    env: dict[str, str] = field(factory=dict)
    # data-directory paths the image seeds: epio/data/<rel> is copied to /data/<rel> (as
    # the app's user, before its command) -- a Django STATIC_ROOT kept in the data dir
    data_seed: tuple[str, ...] = ()
    # data-directory paths [symlinks] point at: made (mkdir -p, as the app's user) before
    # the command, so a link into the data directory never dangles
    data_dirs: tuple[str, ...] = ()


_SEED_PATH = re.compile(r"^[A-Za-z0-9._/-]{1,200}$")


def _seed_paths(raw: Any) -> tuple[str, ...]:
    out = []
    for rel in raw if isinstance(raw, list) else ():
        if isinstance(rel, str) and _SEED_PATH.match(rel) and not rel.startswith("/") \
                and ".." not in PurePosixPath(rel).parts:
            out.append(str(PurePosixPath(rel)))
    return tuple(out)


def seed_command(seed: tuple[str, ...], app_root: str, data: str,
                 dirs: tuple[str, ...] = ()) -> str:
    """Shell lines making the data directories ``[symlinks]`` point at, then copying the
    image's seeded data paths into the data directory (a release's files win; files
    the app wrote there beside them stay)."""
    lines = []
    for rel in dirs:
        dst = shlex.quote(f"{data}/{rel}")
        lines.append(f"mkdir -p -- {dst} || {{ echo 'epio: cannot make {data}/{rel} "
                     "([symlinks] target)' >&2; exit 1; }")
    for rel in seed:
        src = shlex.quote(f"{app_root}/epio/data/{rel}")
        dst = shlex.quote(f"{data}/{rel}")
        lines.append(f"mkdir -p -- {dst} && cp -R -- {src}/. {dst}/ || "
                     f"{{ echo 'epio: cannot copy the static files into {data}/{rel}' >&2; "
                     "exit 1; }")
    return "\n".join(lines)


def image_facts(image_root: Path) -> ImageFacts:
    """Read and check the build facts; anything odd falls back to the defaults."""
    try:
        doc = json.loads((image_root / "epio" / "manifest.json").read_text())
    except (OSError, ValueError):
        return ImageFacts()
    build = doc.get("build") if isinstance(doc, dict) else None
    if not isinstance(build, dict):
        return ImageFacts()
    raw = build.get("workdir")
    workdir = raw if isinstance(raw, str) else "app"
    parts = PurePosixPath(workdir).parts
    if not parts or parts[0] != "app" or ".." in parts or workdir.startswith("/") \
            or not (image_root / workdir).is_dir():
        workdir = "app"
    raw_env = build.get("env")
    env = {k: v for k, v in (raw_env.items() if isinstance(raw_env, dict) else ())
           if isinstance(k, str) and isinstance(v, str) and k and "=" not in k
           and "\0" not in k + v}
    return ImageFacts(workdir=workdir, env=env, data_seed=_seed_paths(build.get("data_seed")),
                      data_dirs=_seed_paths(build.get("data_dirs")))


def python_prefix_of(image_root: Path) -> str | None:
    """The Python install a venv's ``pyvenv.cfg`` ``home`` points to (its prefix)."""
    try:
        text = (image_root / "venv" / "pyvenv.cfg").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() == "home":
            home = Path(value.strip())
            return str(home.parent if home.name == "bin" else home)
    return None


def _shim(nofile: int, cgroup_procs: Sequence[str]) -> str:
    # umask 022: bubblewrap creates mount points with the caller's umask, and
    # they must be traversable by the app's UID
    parts = ["umask 022", f"ulimit -n {int(nofile)} || exit 126"]
    for path in cgroup_procs:
        parts.append(f"echo $$ > '{path}' || exit 126")
    parts.append('exec "$@"')
    return "; ".join(parts)


def _etc_binds() -> list[str]:
    out: list[str] = []
    for name in ETC_ESSENTIALS:
        out += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
    return out


def _top_binds() -> list[str]:
    out = ["--ro-bind", "/usr", "/usr"]
    for name in TOP_DIRS:
        p = Path("/") / name
        if p.is_symlink():
            out += ["--symlink", os.readlink(p), f"/{name}"]
        elif p.is_dir():
            out += ["--ro-bind", str(p), f"/{name}"]
    return out


def build_argv(
    spec: LaunchSpec,
    isolation: Isolation,
    *,
    bwrap: str | None,
    setpriv: str | None,
    sh: str = "/bin/sh",
    app_shell: str | None = None,
    info_fd: int | None = 3,
) -> list[str]:
    """The argv to spawn (argv[0] is the executable) for ``spec`` under ``isolation``."""
    # bash runs the last command of ``-c`` in place (exec): the app itself gets
    # SIGTERM, not a shell that would die first and take the sandbox with it
    shell = app_shell or ("/bin/bash" if os.path.exists("/bin/bash") else sh)
    command = (
        [shell, "-c", spec.command] if isinstance(spec.command, str) else list(spec.command)
    )
    if isinstance(spec.command, str) and (spec.data_seed or spec.data_dirs):
        # seed, then exec a fresh shell for the command (so it still runs in place)
        layout = layout_for(spec, isolation)
        seed = seed_command(spec.data_seed, layout.app_root, layout.data, spec.data_dirs)
        command = [shell, "-c", f'{seed}\nexec {shlex.quote(shell)} -c "$1"', "epio-seed",
                   spec.command]
    argv = [sh, "-c", _shim(spec.nofile, spec.cgroup_procs), "epio-launch"]
    drop = [
        setpriv or "setpriv", "--reuid", str(spec.user.uid), "--regid", str(spec.user.gid),
        "--clear-groups", "--no-new-privs",
    ]
    if isolation.sandbox == "bwrap":
        assert bwrap is not None
        argv += [
            bwrap, "--unshare-pid", "--unshare-ipc", "--unshare-uts",
            "--hostname", spec.user.app, "--die-with-parent", "--new-session",
        ]
        if info_fd is not None:
            argv += ["--info-fd", str(info_fd)]
        argv += _top_binds()
        # bubblewrap makes the parents of file mounts 0700: create them 0755 first
        parents = ["/etc", "/home"]
        if spec.python_prefix and not spec.python_prefix.startswith("/usr/"):
            parents += [str(p) for p in reversed(Path(spec.python_prefix).parents)][1:]
        for d in parents:
            argv += ["--perms", "0755", "--dir", d]
        argv += _etc_binds()
        argv += [
            "--ro-bind", str(spec.scratch / "etc" / "passwd"), "/etc/passwd",
            "--ro-bind", str(spec.scratch / "etc" / "group"), "/etc/group",
        ]
        if spec.python_prefix and not spec.python_prefix.startswith("/usr/"):
            argv += ["--ro-bind", spec.python_prefix, spec.python_prefix]
        argv += [
            "--ro-bind", str(spec.image_root), APP_ROOT,
            "--bind", str(spec.scratch / "home"), HOME,
            "--bind", str(spec.data_dir), DATA,
            "--perms", "1777", "--tmpfs", "/tmp",
            "--proc", "/proc", "--dev", "/dev",
            *shm_args(spec.shm_bytes, isolation.shm_size),
            "--chdir", f"{APP_ROOT}/{spec.workdir}",
            "--", *drop, "--", *command,
        ]
        return argv
    # no sandbox: a new session (so the whole group can be signalled), then the UID
    argv += [shutil.which("setsid") or "/usr/bin/setsid"]
    if isolation.uid_switch:
        argv += [*drop, "--pdeathsig", "KILL", "--"]
    argv += command
    return argv


def launch_cwd(spec: LaunchSpec, isolation: Isolation) -> str:
    """The directory to spawn in (bwrap changes into /app/app itself)."""
    if isolation.sandbox == "bwrap":
        return "/"
    return str(spec.image_root / spec.workdir)


def sandboxed_pid(info: bytes | str) -> int | None:
    """The sandboxed command's pid from bubblewrap's ``--info-fd`` JSON, if complete."""
    try:
        parsed = json.loads(info)
    except ValueError:
        return None
    pid = parsed.get("child-pid") if isinstance(parsed, dict) else None
    return pid if isinstance(pid, int) and pid > 1 else None
