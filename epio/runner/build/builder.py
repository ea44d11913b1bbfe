"""The build pipeline: an uploaded tarball in, a content-addressed image out.

Steps (each streamed line by line to the app's log, source ``build``):

1. size check of the upload (``build.max_upload_mb``), safe unpack
   (``build.max_unpacked_mb``; see :mod:`.unpack`);
2. manifest parsed — every error reported at once — before any other work;
3. virtualenv with the node's Python (``--without-pip``: pip runs from the node);
4. requirements: when this exact requirements set was resolved before, installed
   offline (``pip install --no-index --find-links DATA_DIR/cache/wheels``) —
   nothing downloaded or compiled; otherwise ``pip wheel`` fills the node-wide
   wheel cache first (from the index), then the same offline install runs; the
   same app's next build with the same plain set copies what pip installed then
   (``cache/installed/<app>``) and runs no pip;
5. app files moved into ``app/``, ``[symlinks]`` made, app put on ``sys.path``;
6. Django: platform settings module + ep.io's ``bundle_config``; collectstatic;
7. bytecode compiled for the image's run-time path, shebangs made relocatable,
   permissions normalised, ``epio/manifest.json`` written;
8. ``mksquashfs`` (deterministic: no times, no xattrs, all files root's) into
   ``DATA_DIR/images/<sha256>.squashfs``, or a read-only directory image.

Identical work is done once: after step 2, the build's inputs (the unpacked files'
digest, the config it sees, the node's interpreters and build settings, this
pipeline's own code) name an entry of ``DATA_DIR/cache/builds``; when an earlier build
with the same inputs left its image there, that image is the result and steps 3-8 are
skipped (:class:`BuildCache`).

Untrusted steps (pip, the app's Django code) run as the build user in their
own process group and memory cgroup, under the build's deadline.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import threading
import tomllib
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from attrs import define, field, frozen
from twisted.internet import defer, threads
from twisted.logger import Logger

from epio.config.settings import BuildSettings
from epio.manifest import (
    DATA_DIRECTORY,
    PYTHON_VERSION,
    AppFileError,
    Manifest,
    ManifestError,
    load_manifest,
    read_app_file,
)
from epio.runner.build import platform as plat
from epio.runner.build.images import ImageStore, unlock_tree
from epio.runner.build.proc import MemoryCgroup, StepResult, run_step
from epio.runner.build.unpack import UnpackError, safe_unpack

if TYPE_CHECKING:
    from epio.node import INodeReactor
    from epio.pipeline import ILogSink

#: Where runners mount images inside the sandbox: bytecode file names point here.
RUNTIME_ROOT = "/app"
LOG_TAIL = 100
MB = 1024 * 1024
#: under the data dir, per app (:func:`app_build_caches`): the kept install of its last
#: plain requirements set, and the wheels built from source in its builds
KEPT_INSTALLS = Path("cache") / "installed"
APP_WHEELS = Path("cache") / "wheels-app"
#: per app: the creation time of the app whose builds filled the two above
CACHE_OWNERS = Path("cache") / "app-owners"
_REQ_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


class _SoftFail(Exception):
    """A step failed in a way the caller may recover from (nothing emitted yet)."""


class BuildFailed(Exception):
    """A build failed: ``reason`` is one sentence for the user, ``log_tail`` its last lines."""

    def __init__(self, reason: str, log_tail: list[str] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.log_tail = list(log_tail or [])


@frozen
class BuildResult:
    digest: str
    manifest: Manifest
    log_tail: list[str]
    duration: float
    facts: Mapping[str, Any]


def _cut(text: str, limit: int = 80) -> str:
    """User content quoted in a build message: at most ``limit`` characters."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


#: Any of these in an app's requirements is its own PostgreSQL driver.
POSTGRES_DRIVERS = frozenset({"psycopg", "psycopg-binary", "psycopg-c", "psycopg2",
                              "psycopg2-binary", "psycopg2cffi", "pg8000", "asyncpg"})


def names_gunicorn(command: str) -> bool:
    """Whether a process command runs gunicorn: as a word of the command line
    (``gunicorn``, ``exec gunicorn``, ``newrelic-admin run-program gunicorn``,
    ``.../bin/gunicorn``) or ``python -m gunicorn``."""
    try:
        words = shlex.split(command, comments=True)
    except ValueError:
        words = command.split()
    return any(w.rsplit("/", 1)[-1] == "gunicorn" or (w == "-m" and words[i + 1:i + 2] ==
                                                      ["gunicorn"])
               for i, w in enumerate(words))


def platform_requirements(manifest: Manifest, names: set[str], gunicorn: str,
                          postgres_driver: str) -> list[tuple[str, str]]:
    """Requirements the build adds (each with why) to an app that needs but does not list
    them: gunicorn for a web process that runs it (generated from [wsgi]/[django] or
    named in any process command), a PostgreSQL driver for ``[services] postgres``."""
    out = []
    if gunicorn and "gunicorn" not in names and (
            manifest.needs_gunicorn or any(names_gunicorn(c)
                                           for c in manifest.processes.values())):
        out.append((gunicorn, "for the process that runs gunicorn"))
    if postgres_driver and manifest.services.get("postgres") and not names & POSTGRES_DRIVERS:
        out.append((postgres_driver, "for [services] postgres (the app lists no driver)"))
    return out


def _base_python() -> Path:
    exe = getattr(sys, "_base_executable", None) or sys.executable
    return Path(os.path.realpath(exe))


def _world_executable(path: Path) -> bool:
    """Whether any user may execute ``path`` (every parent dir searchable by others)."""
    try:
        if not os.stat(path).st_mode & 0o001:
            return False
        for parent in path.parents:
            if not os.stat(parent).st_mode & 0o001:
                return False
    except OSError:
        return False
    return True


def choose_python(configured: str, need_world: bool) -> tuple[Path, str | None]:
    """The interpreter for app venvs, and a note when it is not the node's own."""
    if configured:
        p = Path(configured)
        if not p.exists():
            raise BuildFailed(f"build.python {configured} does not exist")
        return p, None
    node = _base_python()
    if not need_world or _world_executable(node):
        return node, None
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    for cand in (f"/usr/bin/python{ver}", f"/usr/local/bin/python{ver}"):
        c = Path(os.path.realpath(cand))
        if c.exists() and _world_executable(c):
            return c, (
                f"the node's Python {node} is not usable by the build user; "
                f"using {c} (same version {ver})"
            )
    raise BuildFailed(
        f"the node's Python {node} cannot be run by the build user and no system "
        f"python{ver} was found: set build.python"
    )


PYTHON_SEARCH_DIRS = ("/usr/local/bin", "/usr/bin")  # where python3.X is discovered
_PY_NAME = re.compile(r"^python3\.\d{1,2}$")


def discover_pythons(configured: Sequence[str], default: Path, need_world: bool,
                     search: Sequence[str] = PYTHON_SEARCH_DIRS) -> dict[str, Path]:
    """The interpreters apps may ask for: full version ("3.12.1") -> path.  The default
    one, ``build.pythons``, and every ``python3.X`` in ``search``; only those the build
    user can run (when it is not the node's user)."""
    cands = [default, *(Path(c) for c in configured)]
    for d in search:
        try:
            names = sorted(os.listdir(d))
        except OSError:
            continue
        cands += [Path(d) / n for n in names if _PY_NAME.match(n)]
    found: dict[str, Path] = {}
    seen: set[Path] = set()
    for c in cands:
        real = Path(os.path.realpath(c))
        if real in seen or not real.is_file() or (need_world and not _world_executable(real)):
            continue
        seen.add(real)
        try:
            out = subprocess.run(
                [str(real), "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"],
                capture_output=True, text=True, timeout=30, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            continue
        found.setdefault(out, real)
    return found


def compile_piptool(piptool: Path, python: Path) -> bool:
    """Compile the node's pip copy to bytecode for ``python`` (as the node's user, so
    the build user can read it but not change it).  Builds run with
    PYTHONDONTWRITEBYTECODE: without these files every ``pip`` of every build compiled
    pip's ~900 modules again (about 1 s idle, several under load).  Done once per pip
    version and interpreter (a marker file records it); False when ``python`` cannot
    compile it (too old for this pip: its builds would fail at pip anyway)."""
    try:
        tag = subprocess.run(
            [str(python), "-c", "import sys; print(sys.implementation.cache_tag)"],
            capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return False
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", tag or ""):
        return False
    marker = piptool / f".compiled-{tag}"
    if marker.exists():
        return True
    try:
        done = subprocess.run(
            [str(python), "-m", "compileall", "-q", "-j", "0", str(piptool / "pip")],
            capture_output=True, timeout=600, env={"PATH": "/usr/bin:/bin"}).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False
    if done:
        marker.write_text("")
    return done


def requested_python(manifest: Manifest, workdir: Path) -> tuple[str, str] | None:
    """(version, where it was asked) from ``[python] version``, ``runtime.txt``
    (``python-3.12.1``) or ``.python-version`` (``3.12``), first found; raises
    BuildFailed for a file that asks for something that is not a CPython 3 version."""
    if manifest.python_version:
        return manifest.python_version, "epio.ini [python] version"
    for name in ("runtime.txt", ".python-version"):
        try:
            text = read_app_file(workdir, name).decode("utf-8", "replace")
        except (AppFileError, OSError, ValueError):
            continue
        lines = [ln.strip() for ln in text.splitlines()
                 if ln.strip() and not ln.strip().startswith("#")]
        if not lines:
            continue
        value = lines[0].removeprefix("python-")
        if not PYTHON_VERSION.match(value):
            raise BuildFailed(f"{name}:1: {_cut(lines[0])!r} is not a Python version this "
                              "platform can give (like 3.12 or python-3.12.1)")
        return value, name
    return None


def pick_python(want: str, available: Mapping[str, Path]) -> tuple[str, Path] | None:
    """The available interpreter for ``want`` ("3.12" or "3.12.1"): the exact version,
    else the newest of the same minor."""
    if want in available:
        return want, available[want]
    minor = ".".join(want.split(".")[:2])
    same = sorted((v for v in available if ".".join(v.split(".")[:2]) == minor),
                  key=lambda v: tuple(int(x) for x in v.split(".")))
    return (same[-1], available[same[-1]]) if same else None


@define
class _Ctx:
    app: str
    work: Path  # the build user's tree (root/ = the image tree)
    priv: Path  # root-owned files the build user may read but never replace
    root: Path
    env: dict[str, str]
    tail: deque[str]
    deadline: float
    cgroup: MemoryCgroup | None
    uid: int | None
    gid: int | None
    facts: dict[str, Any]
    python_version: str = ""  # the app's interpreter (the requirement set's cache key)
    source: str = ""  # digest of the unpacked upload (the build cache's key), "" if none
    node: dict[str, Any] = field(factory=dict)  # the node's part of the build cache's key


@define
class _Tree:
    """What one build's steps hand on to the next (:meth:`Builder._steps`)."""

    manifest: Manifest
    prep: dict[str, Any]  # the node's build facts, with the app's Python
    workdir: Path  # the app's directory in the image tree
    env: dict[str, str]  # the build steps' environment
    reqs: Any = None  # what _requirements found (None: nothing to install)
    pythonpath: list[str] = field(factory=list)
    runtime_env: dict[str, str] = field(factory=dict)
    static: dict[str, str] = field(factory=dict)  # URL path -> image or data dir
    seed: list[str] = field(factory=list)  # data-directory paths the image seeds
    sp: Path = Path()  # the venv's site-packages (once the venv exists)
    # the app's kept install was copied in (no pip): its bytecode came with it
    reused: bool = False

    tree: Path = Path()  # the image tree (the working tree's ``root/``)

    @property
    def venv(self) -> Path:
        return self.tree / "venv"

    @property
    def rel_work(self) -> str:
        """The app's directory, relative to the image's root."""
        return self.workdir.relative_to(self.tree).as_posix()


def _pipeline_version() -> str:
    """A digest of the build pipeline's own code: a new epio makes new build keys."""
    global _PIPELINE
    if _PIPELINE is None:
        h = hashlib.sha256()
        here = Path(__file__).resolve().parent
        for f in sorted([*here.glob("*.py"), here.parents[1] / "manifest.py"]):
            h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
        _PIPELINE = h.hexdigest()
    return _PIPELINE


_PIPELINE: str | None = None


class BuildCache:
    """Builds already done: their inputs' digest -> the image and facts they produced.

    The key covers everything a build's output depends on: the unpacked upload (every
    path, mode, link and content: :func:`~.images.tree_digest`), the config vars the
    build sees (add-on URLs and secrets included: an app with other config never
    shares), the node's interpreters, image format and ``[build]`` settings, and the
    pipeline's code.  It is scoped to the app (its name is part of the key) whenever
    the app's own wheel cache (``cache/wheels-app/<app>``: wheels built from source or
    fetched through the app's own pip options) is not empty, and requirements that
    name paths or URLs (``local``) are never cached — so a hit across apps only ever
    returns an image made of the same uploaded files and wheels from the node-wide
    cache, exactly what the app's own build would have made.  Each app still runs
    under its own UID with its own data dir and route; only the read-only image is
    shared, as the content-addressed image store already shares equal images.

    Entries are root's own files (0600 in a 0700 directory).  An entry whose image
    was garbage-collected is ignored (and rebuilt over).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @staticmethod
    def key(source_digest: str, env: Mapping[str, str], node: Mapping[str, Any],
            scope: str | None) -> str:
        doc = {"source": source_digest, "env": sorted(env.items()), "node": node,
               "pipeline": _pipeline_version(), "app": scope}
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()

    def get(self, key: str) -> dict[str, Any] | None:
        try:
            doc = json.loads((self.directory / f"{key}.json").read_text())
        except (OSError, ValueError):
            return None
        return doc if isinstance(doc, dict) else None

    def put(self, key: str, digest: str, facts: Mapping[str, Any]) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.directory / f".{key}.{os.urandom(4).hex()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"digest": digest, "facts": dict(facts)}, f, sort_keys=True)
        os.replace(tmp, self.directory / f"{key}.json")


class Builder:
    """Builds images on this node.  ``await builder.build(app, tarball, env)``.

    ``log_sink`` provides :class:`epio.pipeline.ILogSink`; build lines use source ``build``.
    """

    log = Logger()

    def __init__(self, reactor: INodeReactor, data_dir: str | Path, settings: BuildSettings,
                 log_sink: ILogSink, images: ImageStore | None = None) -> None:
        self.reactor = reactor
        self.data_dir = Path(data_dir)
        self.settings = settings
        self.log_sink = log_sink
        self.images = images if images is not None else ImageStore(self.data_dir, reactor)
        self.wheels = self.data_dir / "cache" / "wheels"
        self.pip_cache = self.data_dir / "cache" / "pip"
        self.resolved = self.data_dir / "cache" / "resolved"
        self.app_wheels = self.data_dir / APP_WHEELS
        # per app: what pip installed for its last plain requirements set (root's)
        self.installed = self.data_dir / KEPT_INSTALLS
        self.builds_dir = self.data_dir / "builds"
        self.cache = BuildCache(self.data_dir / "cache" / "builds")
        self._sem = defer.DeferredSemaphore(self.settings.max_concurrent)
        self._prepared: dict[str, Any] | None = None
        self._prepare_lock = threading.Lock()
        self._counter = 0

    # ------------------------------------------------------------------ setup

    def image_format(self) -> str:
        fmt = self.settings.image_format
        if fmt != "auto":
            return str(fmt)
        ok = (
            os.geteuid() == 0 and shutil.which("mksquashfs") and os.path.exists("/dev/loop-control")
        )
        return "squashfs" if ok else "dir"

    def _prepare(self) -> dict[str, Any]:
        """Once per Builder (in a thread): build user, interpreter, cache dirs, pip copy."""
        with self._prepare_lock:
            if self._prepared is None:
                self._prepared = self._do_prepare()
            return self._prepared

    def _do_prepare(self) -> dict[str, Any]:
        notes: list[str] = []
        uid = gid = None
        if os.geteuid() == 0:
            name = self.settings.user
            try:
                pw = pwd.getpwnam(name)
            except KeyError:
                subprocess.run(
                    [
                        "useradd",
                        "--system",
                        "--no-create-home",
                        "--home-dir",
                        "/nonexistent",
                        "--shell",
                        "/usr/sbin/nologin",
                        "--user-group",
                        name,
                    ],
                    check=True,
                    capture_output=True,
                )
                pw = pwd.getpwnam(name)
                notes.append(f"created system user {name}")
            uid, gid = pw.pw_uid, pw.pw_gid
        else:
            notes.append(
                f"not root: builds run as the node's own user (uid {os.geteuid()}), not as {self.settings.user}"
            )
        if uid is not None:
            for d in (self.data_dir, *self.data_dir.parents):
                if not os.stat(d).st_mode & 0o001:
                    raise BuildFailed(
                        f"the build user {self.settings.user} cannot reach {self.data_dir}: "
                        f"{d} is not searchable by others (chmod o+x {d})"
                    )
        self._remove_stale_work()
        python, note = choose_python(self.settings.python, need_world=uid is not None)
        if note:
            notes.append(note)
        pythons = discover_pythons(self.settings.pythons, python, need_world=uid is not None)
        for d in (self.wheels, self.app_wheels, self.resolved, self.builds_dir):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o755)
        self.pip_cache.mkdir(parents=True, exist_ok=True)
        if uid is not None:
            os.chown(self.pip_cache, uid, gid)  # type: ignore[arg-type]
            os.chmod(self.builds_dir, 0o711)
        import pip

        pip_src = Path(pip.__file__).parent
        piptool = self.data_dir / "cache" / "piptool" / pip.__version__
        if not (piptool / "pip").is_dir():
            tmp = piptool.with_name(piptool.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(pip_src, tmp / "pip", ignore=shutil.ignore_patterns("__pycache__"))
            shutil.rmtree(piptool, ignore_errors=True)
            os.replace(tmp, piptool)
        for py in sorted(set(pythons.values()) | {python}):
            compile_piptool(piptool, py)
        version = subprocess.run(
            [str(python), "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        fmt = self.image_format()
        if fmt == "dir":
            notes.append(
                "images are read-only directories (no SquashFS/loop mounts): isolation is reduced"
            )
        prepared = {
            "uid": uid,
            "gid": gid,
            "python": python,
            "python_version": version,
            "pythons": pythons,
            "piptool": piptool,
            "notes": notes,
            "format": fmt,
        }
        for n in notes:
            self.log.warn("build: {note}", note=n)
        return prepared

    def _remove_stale_work(self) -> None:
        """Remove work dirs left by a node process that died mid-build."""
        if not self.builds_dir.is_dir():
            return
        for d in self.builds_dir.iterdir():
            parts = d.name.rsplit("-", 3)
            try:
                pid = int(parts[1]) if len(parts) == 4 else -1
            except ValueError:
                pid = -1
            if pid == os.getpid():
                continue
            if pid > 0:
                try:
                    os.kill(pid, 0)
                    continue  # another live node process owns it
                except ProcessLookupError:
                    pass
                except PermissionError:
                    continue
            self.log.info("removing stale build directory {path}", path=str(d))
            _rmtree(d)

    # ------------------------------------------------------------------ api

    async def build(
        self, app: str, tarball: str | Path, env: Mapping[str, str] | None = None,
        app_created: float | None = None,
    ) -> BuildResult:
        """Build ``tarball`` for ``app``; ``env`` is the app's config (visible to its build).
        ``app_created``, the app's creation time, tells it from an earlier app of the
        same name (:meth:`_own_caches`); None skips that check."""
        return await self._sem.run(
            lambda: defer.Deferred.fromCoroutine(
                self._build(app, Path(tarball), dict(env or {}), app_created))
        )

    def _emit(self, ctx: _Ctx, text: str) -> None:
        ctx.tail.append(text)
        try:
            self.log_sink.emit(ctx.app, "build", text, self.reactor.seconds())
        except Exception:
            self.log.failure("log sink failed")

    def _fail(self, ctx: _Ctx, reason: str) -> BuildFailed:
        self._emit(ctx, f"!!!!!> build failed: {reason}")
        return BuildFailed(reason, list(ctx.tail))

    async def _build(self, app: str, tarball: Path, env: dict[str, str],
                     app_created: float | None = None) -> BuildResult:
        start = self.reactor.seconds()
        self._counter += 1
        work = (
            self.builds_dir
            / f"{re.sub(r'[^A-Za-z0-9_-]', '_', app)[:40]}-{os.getpid()}-{self._counter}-{os.urandom(4).hex()}"
        )
        ctx = _Ctx(
            app,
            work,
            work.with_name(work.name + ".priv"),
            work / "root",
            env,
            deque(maxlen=LOG_TAIL),
            start + self.settings.timeout,
            None,
            None,
            None,
            {},
        )
        try:
            if app_created is not None:
                await self._thread(self._own_caches, app, app_created)
            return await self._steps(ctx, tarball, start)
        except BuildFailed:
            raise
        except Exception:
            self.log.failure("build of {app} failed unexpectedly", app=app)
            raise self._fail(
                ctx, "internal error in the build system (details are in the node's log)"
            ) from None
        finally:
            if ctx.cgroup is not None:
                await ctx.cgroup.remove(self.reactor)
            await threads.deferToThreadPool(
                self.reactor, self.reactor.getThreadPool(), _rmtree, work
            )
            await threads.deferToThreadPool(
                self.reactor, self.reactor.getThreadPool(), _rmtree, ctx.priv
            )

    def _remaining(self, ctx: _Ctx) -> float:
        return ctx.deadline - float(self.reactor.seconds())

    async def _run(
        self,
        ctx: _Ctx,
        what: str,
        argv: list[str],
        *,
        cwd: Path,
        env: Mapping[str, str],
        untrusted: bool = True,
        on_line: Any = None,
        soft: bool = False,
    ) -> StepResult:
        remaining = self._remaining(ctx)
        if remaining <= 0:
            raise self._fail(ctx, f"build exceeded its time limit of {self.settings.timeout:g} s")

        def line(text: str) -> None:
            if on_line is not None and on_line(text):
                return
            self._emit(ctx, "       " + text)

        oom_before = ctx.cgroup.oom_kills() if ctx.cgroup is not None else 0
        res = await run_step(
            self.reactor,
            argv,
            env=env,
            cwd=cwd,
            on_line=line,
            timeout=remaining,
            uid=ctx.uid if untrusted else None,
            gid=ctx.gid if untrusted else None,
            cgroup=ctx.cgroup if untrusted else None,
            rlimit_as=(
                self.settings.memory_mb * MB if untrusted and ctx.cgroup is None else None
            ),
            rlimit_fsize=self.settings.max_disk_mb * MB if untrusted else None,
            rlimit_nproc=self.settings.max_processes
            if untrusted and ctx.uid is not None
            else None,
        )
        if res.timed_out:
            raise self._fail(
                ctx, f"build exceeded its time limit of {self.settings.timeout:g} s ({what})"
            )
        if not res.ok:
            cg = ctx.cgroup if untrusted else None
            memory_error = any("MemoryError" in t for t in list(ctx.tail)[-20:])
            if (
                cg is not None
                and (
                    cg.oom_kills() > oom_before
                    or (cg.hit_limit() and (res.signal == signal.SIGKILL or memory_error))
                )
                or (untrusted and cg is None and res.signal is None and memory_error)
            ):
                raise self._fail(
                    ctx, f"build exceeded its memory limit of {self.settings.memory_mb} MB ({what})"
                )
            how = f"exit status {res.exit_code}" if res.signal is None else f"signal {res.signal}"
            if soft:
                raise _SoftFail(f"{what} failed ({how})")
            raise self._fail(ctx, f"{what} failed ({how})")
        await self._check_disk(ctx)
        return res

    async def _check_disk(self, ctx: _Ctx) -> None:
        used = await self._thread(_tree_size, ctx.work)
        if used > self.settings.max_disk_mb * MB:
            raise self._fail(
                ctx,
                f"build used {used // MB} MB of disk, over its limit of {self.settings.max_disk_mb} MB",
            )

    async def _thread(self, fn: Any, *args: Any) -> Any:
        return await threads.deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), fn, *args
        )

    def _step_env(self, ctx: _Ctx, venv: Path, prep: dict[str, Any]) -> dict[str, str]:
        env = {
            "PATH": f"{venv / 'bin'}:/usr/local/bin:/usr/bin:/bin",
            "HOME": str(ctx.work / "home"),
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "TMPDIR": str(ctx.work / "tmp"),
            "SOURCE_DATE_EPOCH": "315532800",
            "PYTHONDONTWRITEBYTECODE": "1",
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            "PIP_NO_INPUT": "1",
            "PIP_PROGRESS_BAR": "off",
            "PIP_ROOT_USER_ACTION": "ignore",
        }
        for k, v in os.environ.items():  # the operator's proxy and pip settings
            if k.lower() in ("http_proxy", "https_proxy", "no_proxy", "all_proxy") or (
                k.startswith("PIP_")
                and k not in env
                and k
                not in ("PIP_FIND_LINKS", "PIP_NO_INDEX", "PIP_TARGET", "PIP_PREFIX", "PIP_USER")
            ):
                env[k] = v
        return env

    async def _steps(self, ctx: _Ctx, tarball: Path, start: float) -> BuildResult:
        """The build, step by step: each step below is one named method."""
        self._emit(ctx, f"-----> Building {ctx.app}")
        prep = await self._thread(self._prepare)
        ctx.uid, ctx.gid = prep["uid"], prep["gid"]
        for note in prep["notes"]:
            if not note.startswith("created"):
                self._emit(ctx, f"       note: {note}")
        src = await self._unpack(ctx, tarball)  # 1. upload size and unpack
        manifest = await self._read_manifest(ctx, src)  # 2. manifest, before any build work
        key, hit = await self._thread(self._cached, ctx, src, prep)
        if hit is not None:
            duration = self.reactor.seconds() - start
            self._emit(ctx, f"-----> Image {hit['digest']} reused in {duration:.1f} s: the same "
                            "files, config and platform as an earlier build")
            return BuildResult(hit["digest"], manifest, list(ctx.tail), duration, hit["facts"])
        workdir = await self._lay_out(ctx, src, manifest)
        prep = self._choose_python(ctx, manifest, workdir, prep)
        t = _Tree(manifest=manifest, prep=prep, workdir=workdir,
                  env=self._step_env(ctx, ctx.root / "venv", prep), tree=ctx.root)
        await self._make_venv(ctx, t)  # 3. virtualenv
        # 4. requirements
        t.reqs = await self._thread(self._requirements, ctx, manifest, workdir)
        if t.reqs is not None:
            t.reused = await self._install(ctx, t.reqs, t.venv, t.env, prep)
        else:
            self._emit(ctx, "-----> No requirements to install")
        await self._place_app(ctx, t)  # 5. app on sys.path, symlinks
        await self._django(ctx, t)  # 6. Django
        await self._finish(ctx, t)  # 7. finish the tree
        digest = await self._write_image(ctx, t)  # 8. image
        if key is not None and (t.reqs is None or t.reqs[2] != "local"):
            await self._thread(self._remember, ctx, digest)
        duration = self.reactor.seconds() - start
        self._emit(ctx, f"-----> Image {digest} built in {duration:.1f} s")
        return BuildResult(digest, manifest, list(ctx.tail), duration, ctx.facts)

    def _cache_key(self, ctx: _Ctx) -> str:
        """The build's key (:class:`BuildCache`); scoped to the app when its own wheel
        cache has anything in it."""
        try:
            with os.scandir(self.app_wheels / _safe_name(ctx.app)) as it:
                scoped = any(True for _ in it)
        except OSError:
            scoped = False
        return self.cache.key(ctx.source, ctx.env, ctx.node, ctx.app if scoped else None)

    def _cached(self, ctx: _Ctx, src: Path,
                prep: Mapping[str, Any]) -> tuple[str | None, dict[str, Any] | None]:
        """(in a thread) The build's key, and an earlier build of the same inputs whose
        image is still here, if any."""
        from epio.runner.build.images import ImageError, tree_digest

        try:
            ctx.source = tree_digest(src)
        except (ImageError, OSError):
            return None, None
        ctx.node = {"python": str(prep["python"]), "python_version": prep["python_version"],
                    "pythons": {v: str(p) for v, p in prep["pythons"].items()},
                    "format": prep["format"], "settings": repr(self.settings)}
        key = self._cache_key(ctx)
        doc = self.cache.get(key)
        if doc is None or not isinstance(doc.get("facts"), dict):
            return key, None
        try:
            if not self.images.has(str(doc.get("digest"))):
                return key, None
        except ImageError:
            return key, None
        return key, doc

    def _remember(self, ctx: _Ctx, digest: str) -> None:
        """(in a thread) Record a finished build under its key — recomputed, since the
        build may have put wheels in the app's own cache (then the entry is the app's)."""
        try:
            self.cache.put(self._cache_key(ctx), digest, ctx.facts)
        except OSError as e:
            self.log.warn("build cache: cannot record a build of {app}: {e}", app=ctx.app, e=e)

    async def _unpack(self, ctx: _Ctx, tarball: Path) -> Path:
        """Check the upload's size and unpack it (safely) into the work tree."""
        try:
            size = tarball.stat().st_size
        except OSError as e:
            raise self._fail(ctx, f"cannot read the upload: {e.strerror}") from None
        limit = self.settings.max_upload_mb * MB
        if size > limit:
            raise self._fail(
                ctx,
                f"the upload is {size / MB:.1f} MB, over the limit of {self.settings.max_upload_mb} MB (build.max_upload_mb)",
            )
        self._emit(ctx, f"-----> Unpacking upload ({size / MB:.1f} MB)")
        src = ctx.work / "src"
        ctx.work.mkdir(parents=True)
        os.chmod(ctx.work, 0o700)
        ctx.priv.mkdir()
        os.chmod(ctx.priv, 0o711)
        try:
            await self._thread(safe_unpack, tarball, src, self.settings.max_unpacked_mb * MB)
        except UnpackError as e:
            raise self._fail(ctx, f"upload rejected: {e}") from None
        return src

    async def _read_manifest(self, ctx: _Ctx, src: Path) -> Manifest:
        """The app's manifest (every error in the build log)."""
        try:
            manifest: Manifest = await self._thread(load_manifest, src)
        except ManifestError as e:
            for err in e.errors:
                self._emit(ctx, "       " + err)
            n = len(e.errors)
            raise self._fail(
                ctx,
                f"the app manifest has {n} error{'s' if n != 1 else ''}: " + "; ".join(e.errors),
            ) from None
        for w in manifest.warnings:
            self._emit(ctx, "       warning: " + w)
        self._emit(ctx, f"-----> Manifest: processes {', '.join(sorted(manifest.processes))}")
        return manifest

    async def _lay_out(self, ctx: _Ctx, src: Path, manifest: Manifest) -> Path:
        """The working tree, owned by the build user, with the app at its checkout
        directory; the build's memory cgroup.  Returns the app's directory."""
        root = ctx.root
        for d in (ctx.root, ctx.work / "home", ctx.work / "tmp", ctx.work / "wheels-new"):
            d.mkdir(parents=True, exist_ok=True)
        app_dir = root / "app"
        workdir = app_dir / manifest.checkout_directory if manifest.checkout_directory else app_dir
        workdir.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, workdir)
        if ctx.uid is not None:
            await self._thread(_chown_tree, ctx.work, ctx.uid, ctx.gid)
        if ctx.uid is not None:
            ctx.cgroup = MemoryCgroup.create(
                f"{os.getpid()}-{self._counter}-{os.urandom(3).hex()}",
                self.settings.memory_mb * MB,
            )
        if ctx.cgroup is None:
            self._emit(
                ctx,
                f"       (memory limit {self.settings.memory_mb} MB through RLIMIT_AS: no memory cgroup)",
            )
        return workdir

    def _choose_python(self, ctx: _Ctx, manifest: Manifest, workdir: Path,
                       prep: dict[str, Any]) -> dict[str, Any]:
        """The app's Python: [python] version, runtime.txt or .python-version, among the
        interpreters this node offers; the default otherwise."""
        try:
            asked = requested_python(manifest, workdir)
        except BuildFailed as e:
            raise self._fail(ctx, e.reason) from None
        if asked is not None:
            pick = pick_python(asked[0], prep["pythons"])
            if pick is None:
                offered = ", ".join(
                    v + (" (default)" if v == prep["python_version"] else "")
                    for v in sorted(prep["pythons"],
                                    key=lambda v: tuple(int(x) for x in v.split("."))))
                raise self._fail(ctx, f"Python {asked[0]} ({asked[1]}) is not available on "
                                      f"this platform; available: {offered}")
            prep = dict(prep, python_version=pick[0], python=pick[1])
            self._emit(ctx, f"       Python {asked[0]} asked by {asked[1]}: {pick[1]}")
        ctx.python_version = prep["python_version"]
        return prep

    async def _make_venv(self, ctx: _Ctx, t: _Tree) -> None:
        """The image's virtualenv, made by the app's Python."""
        python: Path = t.prep["python"]
        self._emit(ctx, f"-----> Creating virtualenv (Python {t.prep['python_version']})")
        await self._run(
            ctx,
            "creating the virtualenv",
            [str(python), "-m", "venv", "--without-pip", str(t.venv)],
            cwd=ctx.work,
            env=t.env,
        )

    async def _place_app(self, ctx: _Ctx, t: _Tree) -> None:
        """Put the app on sys.path (a .pth file), make its [symlinks], and refuse a link
        that leads out of the app."""
        workdir, manifest = t.workdir, t.manifest
        sp = t.sp = plat.site_packages(t.venv)
        rel_work = t.rel_work
        pythonpath = t.pythonpath = [rel_work]
        if manifest.checkout_directory:
            pythonpath.append("app")
        django_cfg = manifest.django
        if django_cfg is not None and django_cfg.base:
            pythonpath.append(f"{rel_work}/{django_cfg.base}")
        # From here on the node writes into a tree build-user code has run in (and every
        # such process is dead): nothing may be followed through a symlink planted there.
        self._real_dir(ctx, sp)
        _write_nofollow(sp / "epio-app.pth", plat.pth_lines(pythonpath))
        for link, target in manifest.symlinks.items():
            lp = workdir / link
            self._real_dir(ctx, lp.parent, create=True)
            if lp.exists() or lp.is_symlink():
                raise self._fail(
                    ctx, f"[symlinks] {link}: a file of that name is already in the app"
                )
            os.symlink(target, lp)
        # every link of the app (uploaded, [symlinks], or planted by build code) must
        # resolve inside the app or under the data directory: a new link can change
        # where an older dangling one leads
        bad = await self._thread(_links_leaving, workdir)
        if bad is not None:
            raise self._fail(
                ctx,
                f"the symlink {_cut(bad[0])!r} -> {_cut(bad[1])!r} leads outside the app "
                "(through other symlinks)",
            )

    async def _django(self, ctx: _Ctx, t: _Tree) -> None:
        """The image's static directories and, for a Django app, the platform settings
        and collectstatic (run as the build user)."""
        workdir, manifest, root, venv, sp, env = (t.workdir, t.manifest, ctx.root, t.venv,
                                                  t.sp, t.env)
        rel_work, runtime_env, static, seed = t.rel_work, t.runtime_env, t.static, t.seed
        django_cfg = manifest.django
        for url, sdir in manifest.static.items():
            if sdir.startswith(DATA_DIRECTORY):
                static[url] = sdir
            else:
                static[url] = f"{rel_work}/{sdir}"
        has_django = any(sp.glob("django/__init__.py"))
        _write_nofollow(sp / "bundle_config.py", plat.bundle_config_source(DATA_DIRECTORY))
        if has_django and (django_cfg is not None or (workdir / "manage.py").exists()):
            base = django_cfg.base if django_cfg else ""
            # a DJANGO_SETTINGS_MODULE config var (or [env]) is what the app expects at run
            # time; with append_settings the platform settings import it (not bypassed)
            chosen = ctx.env.get("DJANGO_SETTINGS_MODULE") or manifest.env.get(
                "DJANGO_SETTINGS_MODULE") or ""
            if chosen == plat.SETTINGS_MODULE or not _MODULE_NAME.match(chosen):
                chosen = ""
            user_module = chosen or (
                django_cfg.settings_module if django_cfg else ""
            ) or plat.detect_settings_module(workdir, base)
            if not user_module:
                raise self._fail(
                    ctx,
                    "Django app: cannot find its settings module; set [django] settings_module in epio.ini",
                )
            append = django_cfg.append_settings if django_cfg else True
            module = plat.SETTINGS_MODULE if append else user_module
            if append:
                static_data = {
                    url: os.path.relpath(os.path.normpath(sdir), DATA_DIRECTORY)
                    for url, sdir in manifest.static.items()
                    if sdir.startswith(DATA_DIRECTORY) and os.path.normpath(sdir) != DATA_DIRECTORY
                }
                _write_nofollow(
                    sp / f"{plat.SETTINGS_MODULE}.py",
                    plat.settings_module_source(user_module, None, static_data, DATA_DIRECTORY),
                )
            runtime_env["DJANGO_SETTINGS_MODULE"] = module
            self._emit(
                ctx,
                f"-----> Django: settings {user_module}"
                + (f" + platform settings ({module})" if append else ""),
            )
            script = ctx.priv / "epio_django_build.py"
            _write_nofollow(script, plat.DJANGO_BUILD_SCRIPT)
            info: dict[str, Any] = {}

            def grab(text: str) -> bool:
                if text.startswith("EPIO-DJANGO "):
                    info.update(json.loads(text[len("EPIO-DJANGO ") :]))
                    return True
                return False

            staging = root / plat.DATA_SEED  # the data directory as the build sees it
            self._real_dir(ctx, staging, create=True)
            # the config vars and [env] may name DJANGO_SETTINGS_MODULE themselves: the
            # platform's values go last (a dict() with both as keywords raised TypeError)
            denv = {
                **env, **manifest.env, **ctx.env, "DJANGO_SETTINGS_MODULE": module,
                "EPIO_BUILD": "1", "EPIO_APP_SETTINGS_MODULE": user_module,
                "EPIO_DATA_DIR": str(staging), "EPIO_IMAGE_ROOT": str(root),
                "EPIO_RUNTIME_DATA": DATA_DIRECTORY, "EPIO_COLLECTED": plat.COLLECTED_STATIC,
            }
            denv.setdefault("SECRET_KEY", os.urandom(24).hex())
            if ctx.uid is not None:
                await self._thread(_chown_tree, root, ctx.uid, ctx.gid)
            self._emit(ctx, "-----> Running collectstatic")
            await self._run(
                ctx,
                "collectstatic",
                [str(venv / "bin" / "python"), str(script)],
                cwd=workdir,
                env=denv,
                on_line=grab,
            )
            for line in info.get("overrides") or []:
                self._emit(ctx, f"       epio overrides {_cut(str(line), 300)}")
            url = str(info.get("STATIC_URL") or "")
            collected = os.path.normpath(str(info.get("root") or ""))
            if url.startswith("/") and info.get("collect") and collected:
                where = os.path.relpath(collected, root)
                if where == plat.DATA_SEED or where.startswith(plat.DATA_SEED + "/"):
                    rel = os.path.relpath(collected, staging)
                    static["/" + url.strip("/")] = os.path.normpath(os.path.join(DATA_DIRECTORY, rel))
                    seed.append(rel)
                    self._emit(ctx, f"       static files: {DATA_DIRECTORY}/{rel} (the data "
                                    "directory, copied there when an instance starts)")
                elif not where.startswith(".."):
                    static["/" + url.strip("/")] = where

        for url, sdir in static.items():
            if not sdir.startswith(DATA_DIRECTORY) and not (root / sdir).is_dir():
                self._emit(ctx, f"       warning: [static] {url}: no directory {sdir} in the image")
    async def _finish(self, ctx: _Ctx, t: _Tree) -> None:
        """Compile the bytecode, record the build's facts, take the tree back from the
        build user and check it was not tampered with."""
        root, venv, sp, static, seed = ctx.root, t.venv, t.sp, t.static, t.seed
        app_dir = root / "app"
        self._emit(ctx, "-----> Finishing image")
        tag = _cache_tag(t.prep["python_version"])
        targets = [str(root / "app"), str(sp)]
        if t.reused:  # site-packages came with its bytecode: compile only what lacks it
            lacking = await self._thread(_lacking_bytecode, sp, tag)
            self._emit(ctx, f"       site-packages kept its bytecode ({len(lacking)} "
                            "file(s) without it compiled)")
            listing = ctx.priv / "compile.txt"  # root's, readable by name
            await self._thread(_write_nofollow, listing, "".join(f"{f}\n" for f in lacking))
            targets = [str(root / "app"), "-i", str(listing)]
        await self._run(
            ctx,
            "compiling bytecode",
            [
                str(venv / "bin" / "python"),
                "-m",
                "compileall",
                "-q",
                "-j",
                "0",
                "--invalidation-mode",
                "checked-hash",
                "-s",
                str(root),
                "-p",
                RUNTIME_ROOT,
                *targets,
            ],
            cwd=ctx.work,
            env=dict(t.env, PYTHONDONTWRITEBYTECODE=""),
            untrusted=True,
        )
        ctx.facts = {
            "python": str(t.prep["python"]),
            "python_version": t.prep["python_version"],
            "workdir": t.rel_work,
            "pythonpath": t.pythonpath,
            "env": t.runtime_env,
            "static": static,
            "data_seed": seed,
            "data_dirs": symlink_data_dirs(t.manifest.symlinks),
            "django": "DJANGO_SETTINGS_MODULE" in t.runtime_env,
            "runtime_root": RUNTIME_ROOT,
            "requirements_sha256": t.reqs[3] if t.reqs else None,
        }
        manifest_doc = {"manifest": t.manifest.to_dict(), "build": ctx.facts}
        await self._thread(self._reclaim, ctx)
        if t.reqs is not None and t.reqs[2] == "plain" and not t.reused:
            await self._thread(self._keep_bytecode, ctx, t.reqs[1], sp, tag)
        # build-user code (collectstatic, .pth files) could have replaced a static
        # directory or an app file with a symlink to the host: the runner's static
        # server (root) starts from these directories, so they must stay in the image
        for url, sdir in static.items():
            if not sdir.startswith(DATA_DIRECTORY) and not _inside(root / sdir, root):
                raise self._fail(
                    ctx,
                    f"the build tree was tampered with: static directory {sdir} ({url}) "
                    "leads outside the image",
                )
        for rel in seed:  # copied into /data by the app's own user; still, real dirs
            self._real_dir(ctx, root / plat.DATA_SEED / rel)
        bad = await self._thread(_links_leaving, app_dir)
        if bad is not None:
            raise self._fail(
                ctx,
                f"the build tree was tampered with: the symlink {_cut(bad[0])!r} -> "
                f"{_cut(bad[1])!r} leads outside the app",
            )
        await self._thread(self._finish_tree, root, venv, manifest_doc)

    async def _write_image(self, ctx: _Ctx, t: _Tree) -> str:
        """Write the image (SquashFS, or a read-only directory) into the image store;
        return its digest."""
        root = ctx.root
        fmt = t.prep["format"]
        if fmt == "squashfs":
            self._emit(ctx, "-----> Writing SquashFS image")
            tmp_img = ctx.priv / "image.squashfs"
            await self._run(
                ctx,
                "mksquashfs",
                [
                    "mksquashfs",
                    str(root),
                    str(tmp_img),
                    "-noappend",
                    "-no-xattrs",
                    "-all-root",
                    "-mkfs-time",
                    "0",
                    "-all-time",
                    "0",
                    "-comp",
                    self.settings.squashfs_compression,
                    "-quiet",
                    "-no-progress",
                ],
                cwd=ctx.priv,
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
                untrusted=False,
            )
            digest = await self._thread(self.images.add_squashfs, tmp_img)
        else:
            self._emit(ctx, "-----> Writing read-only directory image (reduced isolation)")
            digest = await self._thread(self.images.add_tree, root)
        return str(digest)

    def _real_dir(self, ctx: _Ctx, path: Path, create: bool = False) -> None:
        """Check that every component of ``path`` below the work dir is a real directory
        (not a symlink a build step planted); with ``create``, make missing ones."""
        rel = path.relative_to(ctx.work)
        cur = ctx.work
        for part in rel.parts:
            cur = cur / part
            try:
                st = os.lstat(cur)
            except FileNotFoundError:
                if not create:
                    raise self._fail(ctx, f"the build tree lacks {rel}") from None
                os.mkdir(cur, 0o755)
                continue
            if not stat.S_ISDIR(st.st_mode):
                raise self._fail(
                    ctx,
                    f"the build tree was tampered with: {cur.relative_to(ctx.work)} is not a directory",
                )

    def _reclaim(self, ctx: _Ctx) -> None:
        """After the last step that ran build-user code: check the image tree's frame is
        made of real directories and give the whole tree to root (when we are root)."""
        sp = plat.site_packages(ctx.root / "venv")
        for d in (ctx.root / "app", ctx.root / "venv" / "bin", sp):
            self._real_dir(ctx, d)
        if not stat.S_ISREG(os.lstat(ctx.root / "venv" / "pyvenv.cfg").st_mode):
            raise self._fail(ctx, "the build tree was tampered with: venv/pyvenv.cfg")
        self._real_dir(ctx, ctx.root / "epio", create=True)
        if os.geteuid() == 0:
            _chown_tree(ctx.root, 0, 0)

    # ------------------------------------------------------------------ requirements

    def _app_file(self, ctx: _Ctx, workdir: Path, rel: str) -> bytes:
        """An app file the node reads as root (requirements, pyproject.toml): a regular
        file inside the app, never read through a symlink (:func:`read_app_file`)."""
        try:
            return read_app_file(workdir, rel)
        except AppFileError as e:
            raise self._fail(ctx, str(e)) from None
        except OSError as e:
            raise self._fail(ctx, f"{rel}: cannot read: {e.strerror}") from None

    def _requirements(
        self, ctx: _Ctx, manifest: Manifest, workdir: Path
    ) -> tuple[Path, str, str, str] | None:
        """Write the effective requirements file; return (path, cache key, kind, digest of
        the requirement set) or None.

        ``kind``: ``plain`` (only requirement specifiers), ``options`` (pip options such
        as another index or find-links: wheels cached for this app only) or ``local``
        (paths, URLs, editables: nothing cached).
        """
        lines: list[str] = []  # what the key covers
        effective: list[str] = []  # what pip reads
        kind = "plain"
        if manifest.requirements:
            orig = workdir / manifest.requirements
            # read as root: never through a symlink, never from outside the app
            text = self._app_file(ctx, workdir, manifest.requirements).decode("utf-8", "replace")
            # pip reads the app's own file, so relative paths in it resolve as on a laptop
            effective.append(f"-r {orig}")
            lines.append(f"# {manifest.requirements}")
            for raw in text.splitlines():
                s = raw.split(" #", 1)[0].strip()
                if not s or s.startswith("#"):
                    continue
                if s.startswith(("-r", "--requirement", "-c", "--constraint")):
                    ref = (s.split(None, 1)[1] if " " in s else s[2:]).strip()
                    inc = os.path.relpath(os.path.normpath(orig.parent / ref), workdir)
                    try:
                        included = read_app_file(workdir, inc)
                    except (AppFileError, OSError, ValueError):
                        raise self._fail(
                            ctx,
                            f"{manifest.requirements}: {_cut(ref)} is not a regular file in the app",
                        ) from None
                    lines.append(s)
                    lines.append("# " + hashlib.sha256(included).hexdigest())
                    continue
                if s.startswith(("-e", "--editable", ".", "/", "file:")) or "://" in s:
                    kind = "local"
                elif s.startswith("-") and kind == "plain":
                    kind = "options"
                lines.append(s)
        elif manifest.pyproject:
            raw_toml = self._app_file(ctx, workdir, "pyproject.toml")
            try:
                data = tomllib.loads(raw_toml.decode("utf-8"))
            except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
                raise self._fail(ctx, f"pyproject.toml: {_cut(str(e))}") from None
            deps = [str(d) for d in data.get("project", {}).get("dependencies", [])]
            lines += deps
            effective += deps
        names = {
            _canonical(m.group(1))
            for ln in lines
            if (m := _REQ_NAME.match(ln)) and not ln.startswith(("-", "#"))
        }
        for req, why in platform_requirements(
            manifest, names, self.settings.gunicorn, self.settings.postgres_driver
        ):
            lines.append(req)
            effective.append(req)
            self._emit(ctx, f"       (adding {req} {why})")
        if not effective:
            return None
        content = "\n".join(lines) + "\n"
        scope = "" if kind == "plain" else "\napp " + ctx.app
        key = hashlib.sha256(
            (content + "\n" + ctx.python_version + scope).encode()
        ).hexdigest()
        path = ctx.priv / "requirements.epio.txt"
        _write_nofollow(path, "\n".join(effective) + "\n")
        return path, key, kind, hashlib.sha256(content.encode()).hexdigest()

    async def _install(
        self,
        ctx: _Ctx,
        reqs: tuple[Path, str, str, str],
        venv: Path,
        env: dict[str, str],
        prep: dict[str, Any],
    ) -> bool:
        """Install requirements; offline from the caches when this set was resolved before.
        True when the app's kept install of this set was copied instead (no pip ran).

        Only wheels pip itself *downloaded* for a plain requirement set enter the
        node-wide cache; wheels built from source, or fetched through the app's own pip
        options, go to the app's own cache (``cache/wheels-app/<app>``), so one app's
        build cannot plant a wheel another app will install.
        """
        path, key, kind, _ = reqs
        marker = self.resolved / key
        app_cache = self.app_wheels / _safe_name(ctx.app)
        app_cache.mkdir(mode=0o755, exist_ok=True)
        new = ctx.work / "wheels-new"
        links = [str(self.wheels), str(app_cache)] + ([str(new)] if kind == "local" else [])
        pip = [str(venv / "bin" / "python"), "-m", "pip"]
        penv = dict(env, PYTHONPATH=str(prep["piptool"]), PIP_CACHE_DIR=str(self.pip_cache))
        offline = [*pip, "install", "--no-index"]
        for link in links:
            offline += ["--find-links", link]
        offline += ["--no-compile", "--only-binary", ":all:", "-r", str(path)]
        done = await self._install_resolved(ctx, kind, key, venv, marker, offline, penv)
        if done is not None:
            return done
        await self._fill_wheel_cache(ctx, path, kind, pip, links[:2], new, app_cache, penv)
        self._emit(ctx, "-----> Installing requirements from the wheel cache")
        await self._run(ctx, "pip install", offline, cwd=ctx.work, env=penv)
        if kind != "local":
            marker.write_text(path.read_text())  # (for operators: what was resolved)
        if kind == "plain":
            await self._thread(self._keep_installed, ctx, key, venv)
        return False

    async def _install_resolved(
        self,
        ctx: _Ctx,
        kind: str,
        key: str,
        venv: Path,
        marker: Path,
        offline: list[str],
        penv: dict[str, str],
    ) -> bool | None:
        """Install a requirement set resolved before without resolving it again: copy
        the app's kept install of it (True), or install it offline from the wheel
        caches (False).  None: neither worked; it must be resolved."""
        if kind == "plain" and await self._thread(self._has_kept_install, ctx, key):
            self._emit(ctx, "-----> Requirements unchanged: installing what the app's "
                            "previous build installed")
            problem = await self._thread(self._reuse_installed, ctx, key, venv)
            if problem is None:
                return True
            self._emit(ctx, f"       could not copy it ({problem}); running pip")
        if kind != "local" and marker.exists():
            self._emit(ctx, "-----> Installing requirements from the wheel cache (offline)")
            try:
                await self._run(
                    ctx, "pip install (offline)", offline, cwd=ctx.work, env=penv, soft=True
                )
                if kind == "plain":
                    await self._thread(self._keep_installed, ctx, key, venv)
                return False
            except _SoftFail:
                self._emit(
                    ctx, "       the wheel cache is missing something; resolving from the index"
                )
        return None

    async def _fill_wheel_cache(
        self,
        ctx: _Ctx,
        path: Path,
        kind: str,
        pip: list[str],
        links: list[str],
        new: Path,
        app_cache: Path,
        penv: dict[str, str],
    ) -> None:
        """Resolve the requirements at ``path`` with ``pip wheel`` into ``new`` (finding
        wheels at ``links``: the node's and the app's caches), then admit what it made
        to the node's cache or the app's own (:func:`_admit_wheels`)."""
        self._emit(ctx, "-----> Resolving requirements and filling the wheel cache")
        # build.index_url may carry credentials: pass it in pip's environment (readable
        # only by the build user and root), never in argv (visible to every user in ps)
        wheel_env = (
            dict(penv, PIP_INDEX_URL=self.settings.index_url) if self.settings.index_url else penv
        )
        fetched: set[str] = set()
        ran_code = False

        def watch(text: str) -> bool:
            nonlocal ran_code
            if _RUNS_CODE.search(text):
                ran_code = True
            m = _FETCHED.search(text)
            if m:
                where = m.group(2)
                if m.group(1) != "Processing" or not where.startswith(str(ctx.work)):
                    fetched.add(where.rsplit("/", 1)[-1])
            return False

        wheel_cmd = [*pip, "wheel", "--wheel-dir", str(new)]
        for link in links:
            wheel_cmd += ["--find-links", link]
        await self._run(
            ctx,
            "pip wheel",
            [*wheel_cmd, "-r", str(path)],
            cwd=ctx.work,
            env=wheel_env,
            on_line=watch,
        )
        # pip ran as the build user: its wheel dir must still be a real directory
        self._real_dir(ctx, new)
        if kind == "plain" and not ran_code:
            shared, own = await self._thread(
                _admit_wheels, new, self.wheels, app_cache, fetched, ctx.uid
            )
        elif kind in ("plain", "options"):
            # package code ran during this resolution (an sdist was prepared or built):
            # it could have altered any wheel of the run, so none is shared
            shared, own = await self._thread(
                _admit_wheels, new, self.wheels, app_cache, set(), ctx.uid
            )
        else:
            shared = own = 0
        self._emit(ctx, f"       {shared} new wheel(s) in the node's cache, {own} in the app's own")

    # ------------------------------------------------- the previous build's install

    def _own_caches(self, app: str, created: float) -> None:
        """Make the app's build caches (:func:`app_build_caches`) this app's: if they
        were filled for another app of the same name (its creation time, kept in
        ``cache/app-owners/<app>``, differs or is unknown) -- one purged while this
        runner did not answer -- delete them first, so nothing the earlier app's builds
        kept is installed into this one's.  Their loss costs one pip run."""
        owners = self.data_dir / CACHE_OWNERS
        mark = owners / _safe_name(app)
        want = repr(float(created))
        try:
            if not mark.is_symlink() and mark.read_text() == want:
                return
        except OSError:  # none yet (or not a file): whose the caches are is unknown
            pass
        stale = [c for c in app_build_caches(self.data_dir, app)
                 if c != mark and (c.exists() or c.is_symlink())]
        if stale:
            self.log.info("build of {app}: deleting build caches kept for an earlier app "
                          "of that name (or of unknown owner): {paths}", app=app,
                          paths=" ".join(str(c) for c in stale))
        for cache in stale + [mark]:
            remove_cache(cache)
        owners.mkdir(parents=True, mode=0o700, exist_ok=True)
        tmp = owners / f".{mark.name}.{os.urandom(4).hex()}"
        _write_nofollow(tmp, want)
        os.replace(tmp, mark)

    def _keep_installed(self, ctx: _Ctx, key: str, venv: Path) -> None:
        """Right after pip installed a plain requirements set (nothing but pip, from the
        wheel caches, has run in this build yet), keep a root-owned copy of what it
        installed -- site-packages and the scripts it put in ``venv/bin`` -- under
        ``cache/installed/<app>/<key>``, replacing the app's previous one.  The app's
        next build with the same set (same file, same Python: ``key``) copies it
        instead of running pip (:meth:`_reuse_installed`).  Kept per app: a copy made
        in one app's build is never installed into another's.  A failure only logs."""
        app_dir = self.installed / _safe_name(ctx.app)
        tmp = app_dir / f".{key}.{os.urandom(4).hex()}.tmp"
        try:
            sp = plat.site_packages(venv)
            bin_dir = venv / "bin"
            for d in (sp, bin_dir):
                if not stat.S_ISDIR(os.lstat(d).st_mode):
                    return  # not a real directory: nothing of it is kept
            self.installed.mkdir(mode=0o700, exist_ok=True)
            os.chmod(self.installed, 0o700)
            app_dir.mkdir(mode=0o700, exist_ok=True)
            shutil.copytree(sp, tmp / "site-packages", symlinks=True)
            if _links_leaving(tmp / "site-packages") is not None:
                _rmtree(tmp)
                return
            (tmp / "bin").mkdir()
            for entry in sorted(os.listdir(bin_dir)):
                src = bin_dir / entry
                st = os.lstat(src)
                if stat.S_ISREG(st.st_mode) and not entry.lower().startswith("activate"):
                    shutil.copyfile(src, tmp / "bin" / entry, follow_symlinks=False)
            _write_nofollow(tmp / "venv", str(venv))
            if os.geteuid() == 0:
                _chown_tree(tmp, 0, 0)
            for old in os.listdir(app_dir):
                if old != key and not old.startswith(f".{key}."):
                    _rmtree(app_dir / old)
            _rmtree(app_dir / key)
            os.replace(tmp, app_dir / key)
        except OSError as e:
            _rmtree(tmp)
            self.log.warn("build of {app}: its install is not kept for the next build: "
                          "{error}", app=ctx.app, error=str(e))

    def _keep_bytecode(self, ctx: _Ctx, key: str, sp: Path, tag: str) -> None:
        """Once the tree is root's again (after compileall), add to the app's kept
        install the bytecode of each kept module whose source is unchanged in this
        tree, once (a ``bytecode`` marker): a build that copies it compiles only the
        app and what lacks bytecode.  The files are checked-hash ``.pyc`` for the
        same Python and run-time path: what compileall would write again."""
        kept = self.installed / _safe_name(ctx.app) / key
        if not (kept / "site-packages").is_dir() or (kept / "bytecode").exists():
            return
        try:
            base = kept / "site-packages"
            for dirpath, dirnames, filenames in os.walk(sp):
                dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
                if os.path.basename(dirpath) != "__pycache__":
                    continue
                rel = Path(dirpath).relative_to(sp).parent
                for name in filenames:
                    if not name.endswith(f".{tag}.pyc") or name.count(".") != 2:
                        continue
                    source = rel / (name.split(".", 1)[0] + ".py")
                    src, mine = base / source, sp / source
                    if not src.is_file() or src.is_symlink() or mine.is_symlink() \
                            or src.read_bytes() != mine.read_bytes():
                        continue
                    pyc = Path(dirpath) / name
                    if not stat.S_ISREG(os.lstat(pyc).st_mode):
                        continue
                    (base / rel / "__pycache__").mkdir(mode=0o755, exist_ok=True)
                    shutil.copyfile(pyc, base / rel / "__pycache__" / name,
                                    follow_symlinks=False)
            _write_nofollow(kept / "bytecode", tag)
        except OSError as e:
            self.log.warn("build of {app}: bytecode not kept: {error}", app=ctx.app,
                          error=str(e))

    def _has_kept_install(self, ctx: _Ctx, key: str) -> bool:
        return (self.installed / _safe_name(ctx.app) / key / "site-packages").is_dir()

    def _reuse_installed(self, ctx: _Ctx, key: str, venv: Path) -> str | None:
        """Copy the app's kept install of this requirements set (same file, same
        Python) into the new virtualenv instead of running pip.  None when done; else
        why not (the venv is then as empty as before, and pip runs)."""
        kept = self.installed / _safe_name(ctx.app) / key
        sp = plat.site_packages(venv)
        bin_dir = venv / "bin"
        self._real_dir(ctx, sp)  # a fresh venv's: real directories, site-packages empty
        self._real_dir(ctx, bin_dir)
        if os.listdir(sp):
            return "site-packages is not empty"
        before = set(os.listdir(bin_dir))
        try:
            shutil.copytree(kept / "site-packages", sp, symlinks=True, dirs_exist_ok=True)
            old = (kept / "venv").read_text()
            for entry in sorted(os.listdir(kept / "bin")):
                if entry in before:
                    continue
                data = (kept / "bin" / entry).read_bytes()
                if data.startswith(b"#!" + old.encode()):
                    data = b"#!" + str(venv).encode() + data[2 + len(old.encode()):]
                fd = os.open(bin_dir / entry, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                             | os.O_NOFOLLOW, 0o755)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
            if ctx.uid is not None and os.geteuid() == 0:
                _chown_tree(sp, ctx.uid, ctx.gid if ctx.gid is not None else ctx.uid)
                for entry in set(os.listdir(bin_dir)) - before:
                    os.lchown(bin_dir / entry, ctx.uid,
                              ctx.gid if ctx.gid is not None else ctx.uid)
        except OSError as e:
            for entry in os.listdir(sp):  # as empty as before: pip installs everything
                if (sp / entry).is_dir() and not (sp / entry).is_symlink():
                    _rmtree(sp / entry)
                else:
                    os.unlink(sp / entry)
            for entry in set(os.listdir(bin_dir)) - before:
                os.unlink(bin_dir / entry)
            return str(e.strerror or e)
        return None

    # ------------------------------------------------------------------ tree

    def _finish_tree(self, root: Path, venv: Path, doc: dict[str, Any]) -> None:
        plat.relocate_scripts(venv / "bin", str(venv))
        plat.fix_records(venv)
        plat.clean_pyvenv_cfg(venv)
        _write_nofollow(
            root / "epio" / "manifest.json", json.dumps(doc, sort_keys=True, indent=1) + "\n"
        )
        for dirpath, dirnames, filenames in os.walk(root):
            for n in dirnames:
                p = os.path.join(dirpath, n)
                if not os.path.islink(p):
                    os.chmod(p, 0o755)
            for n in filenames:
                p = os.path.join(dirpath, n)
                st = os.lstat(p)
                if not os.path.islink(p):
                    os.chmod(p, 0o755 if st.st_mode & 0o100 else 0o644)
        os.chmod(root, 0o755)


_RUNS_CODE = re.compile(
    r"Preparing metadata|Building wheels? for|Installing build dependencies|"
    r"Getting requirements to build"
)
_FETCHED = re.compile(r"(Downloading|Using cached|Processing)\s+(\S+\.whl)\b")


def _cache_tag(version: str) -> str:
    """CPython's bytecode tag of a ``3.11.2`` interpreter: ``cpython-311``."""
    major, minor = version.split(".")[:2]
    return f"cpython-{major}{minor}"


def _lacking_bytecode(sp: Path, tag: str) -> list[str]:
    """The ``.py`` files under ``sp`` (symlinks not followed) with no ``tag`` bytecode
    beside them: what a build that copied a kept install still compiles."""
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(sp):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__"
                             and not os.path.islink(os.path.join(dirpath, d)))
        for name in sorted(filenames):
            if name.endswith(".py") and not os.path.exists(
                    os.path.join(dirpath, "__pycache__", f"{name[:-3]}.{tag}.pyc")):
                out.append(os.path.join(dirpath, name))
    return out


def _safe_name(app: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", app)[:60] or "_"


def app_build_caches(data_dir: Path, app: str) -> list[Path]:
    """What a node's builds keep per app under ``DATA_DIR/cache``: its kept install
    (``installed/<app>``) and the wheels built from source in its builds
    (``wheels-app/<app>``); and whose they are (``app-owners/<app>``: the app's
    creation time, :meth:`Builder._own_caches`).  Deleted when the app is purged
    (epio.runner.launcher.purge_app_data); a runner that missed the purge deletes them
    at the next build of a new app of that name: it never gets them."""
    return [Path(data_dir) / KEPT_INSTALLS / _safe_name(app),
            Path(data_dir) / APP_WHEELS / _safe_name(app),
            Path(data_dir) / CACHE_OWNERS / _safe_name(app)]


def remove_cache(path: Path) -> None:
    """Delete one of :func:`app_build_caches` (a directory or the owner file; a
    symlink, which root's cache never holds, is removed, never followed)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        unlock_tree(path)
        shutil.rmtree(path)


def _admit_wheels(
    new: Path, shared: Path, own: Path, trusted: set[str], owner: int | None = None
) -> tuple[int, int]:
    """Move a build's wheels into the caches (never overwriting): those in ``trusted``
    (downloaded by pip as wheels) to the node-wide ``shared`` cache, others to ``own``.

    ``new`` was written by build-user code: only regular files are admitted, opened
    with ``O_NOFOLLOW`` (a planted ``x.whl -> /node/secret`` is skipped, never copied
    into a world-readable cache), and, when ``owner`` is given, only files that uid
    owns (a hard link to someone else's file is skipped)."""
    counts = [0, 0]
    st = os.lstat(new)
    if not stat.S_ISDIR(st.st_mode) or (owner is not None and st.st_uid != owner):
        raise OSError(f"{new} is not the build's own directory")
    for w in sorted(new.glob("*.whl")):
        is_shared = w.name in trusted
        cache = shared if is_shared else own
        if (shared / w.name).exists() or (cache / w.name).exists():
            continue
        try:
            fd = os.open(w, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue  # a symlink (ELOOP) or gone
        with os.fdopen(fd, "rb") as src:
            fst = os.fstat(fd)
            if not stat.S_ISREG(fst.st_mode) or (owner is not None and fst.st_uid != owner):
                continue
            cache.mkdir(parents=True, exist_ok=True)
            tmp = cache / f".{w.name}.{os.urandom(6).hex()}.tmp"
            with open(tmp, "xb") as dst:
                shutil.copyfileobj(src, dst, 1024 * 1024)
        os.chmod(tmp, 0o644)
        os.replace(tmp, cache / w.name)
        counts[0 if is_shared else 1] += 1
    return counts[0], counts[1]


def symlink_data_dirs(symlinks: Mapping[str, str]) -> list[str]:
    """The data-directory paths ``[symlinks]`` point at that each instance creates (as
    the app's user) before its command: a link into a data directory that does not
    exist yet would dangle, and ``os.makedirs("media/cards")`` through it fails.

    A target is made as a directory when the link's name has no file extension
    (``media``, ``uploads/``); one with an extension (``db.sqlite3``) gets only its
    parent directories, for the app to create the file."""
    out: list[str] = []
    prefix = DATA_DIRECTORY + "/"
    for link, target in sorted(symlinks.items()):
        if not target.startswith(prefix):
            continue  # a link inside the app
        rel = PurePosixPath(target[len(prefix):])
        wanted = rel if not PurePosixPath(link).suffix else rel.parent
        if str(wanted) not in ("", ".") and str(wanted) not in out:
            out.append(str(wanted))
    return out


def _links_leaving(root: Path) -> tuple[str, str] | None:
    """The first symlink under ``root`` (name, target) that, resolved through the
    real file system, ends neither inside ``root`` nor under DATA_DIRECTORY (which
    only exists in the app's sandbox); None when there is none."""
    base = os.path.realpath(root)
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames.sort()
        for n in sorted(dirnames + filenames):
            p = os.path.join(dirpath, n)
            if not os.path.islink(p):
                continue
            target = os.readlink(p)
            if target.startswith("/") and _under_data(os.path.normpath(target)):
                continue  # [symlinks] media = %(data_directory)s/media: the sandbox's /data
            real = os.path.realpath(p)
            if real == base or real.startswith(base + os.sep):
                continue
            if _under_data(real):
                continue
            return os.path.relpath(p, base), target
    return None


def _inside(path: Path, root: Path) -> bool:
    """Whether ``path``, resolved through every symlink, is ``root`` or below it."""
    real, base = os.path.realpath(path), os.path.realpath(root)
    return real == base or real.startswith(base + os.sep)


def _under_data(path: str) -> bool:
    return path == DATA_DIRECTORY or path.startswith(DATA_DIRECTORY + "/")


def _write_nofollow(path: Path, text: str, mode: int = 0o644) -> None:
    """Write a file without following a symlink at ``path`` (one planted there fails)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    os.fchmod(fd, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    os.lchown(root, uid, gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            os.lchown(os.path.join(dirpath, n), uid, gid)


def _tree_size(root: Path) -> int:
    total = 0
    for dirpath, _dirnames, filenames in os.walk(root):
        for n in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, n)).st_blocks * 512
            except OSError:
                pass
    return total


def _rmtree(path: Path) -> None:
    if path.exists() or path.is_symlink():
        unlock_tree(path)
        shutil.rmtree(path, ignore_errors=True)


async def record_build(store: Any, deploy_id: str, outcome: BuildResult | BuildFailed) -> Any:
    """Record a build's outcome on its deploy in the store: ``built`` with the image
    digest and ``meta.manifest``/``meta.build`` (the facts), or ``failed`` with the
    reason; the log tail is appended to the deploy's log either way."""
    log = "".join(line + "\n" for line in outcome.log_tail)
    if isinstance(outcome, BuildResult):
        return await store.update_deploy(
            deploy_id,
            status="built",
            image=outcome.digest,
            append_log=log,
            meta={"manifest": outcome.manifest.to_dict(), "build": dict(outcome.facts)},
        )
    return await store.update_deploy(
        deploy_id, status="failed", reason=outcome.reason, append_log=log
    )
