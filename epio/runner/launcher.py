"""The real :class:`~epio.runner.supervisor.ILauncher`: images, dirs, cgroups, sandbox.

Host layout of one node (``DATA_DIR``, mode 0711)::

    appdata/<app>/                 the app's persistent data dir (0700, app UID),
                                   /data in the sandbox ($EPIO_DATA_DIR)
    runner/instances/<instance>/   per-instance scratch, removed after the process
        home/                      HOME (app UID); /home/app in the sandbox; home/data is
                                   a symlink to the data dir (ep.io's ~/data)
        tmp/                       TMPDIR without a sandbox (the sandbox has a tmpfs)
        etc/passwd, etc/group      the sandbox's user database
    mounts/<digest>/               SquashFS images, mounted once per node (build's ImageStore)
    images/<digest>[.squashfs]     the images themselves
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.internet import defer, task
from twisted.logger import Logger
from zope.interface import implementer

from epio.addons import btrfs
from epio.addons.services import SERVICE_PROCESS_TYPES
from epio.runner.cgroups import CgroupSupport, InstanceCgroup
from epio.runner.ports import listening_ports, process_tree
from epio.runner.sandbox import (
    DATA,
    DEFAULT_SHM_BYTES,
    Isolation,
    LaunchSpec,
    app_environment,
    build_argv,
    image_facts,
    launch_cwd,
    layout_for,
    python_prefix_of,
)
from epio.runner.snapshots import DEDICATED_DIR
from epio.runner.supervisor import ILauncher, InstanceSpec, Launch
from epio.runner.users import AppUser, check_app_name

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from epio.runner.images import FetchingImages



def proc_start_time(pid: int, proc: Path = Path("/proc")) -> int | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks), or None if gone."""
    try:
        text = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    try:
        return int(text.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def signal_group(pgid: int | None, sig: int) -> bool:
    if pgid is None or pgid <= 1:
        return False
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def purge_app_data(data_dir: Path, app: str, uid: int, uid_switch: bool) -> bool:
    """Delete a purged app's data on this node for good: ``appdata/<app>`` (its files
    and its dedicated servers' data dirs, btrfs subvolumes deleted as such), the
    read-only snapshots of those in ``snapshots/<app>/`` (epio.runner.snapshots) and
    what its builds kept here (epio.runner.build.builder.app_build_caches: the kept
    install of its requirements, its own wheels).

    Only an ``appdata/<app>`` owned by ``uid`` (when UIDs are switched) is the purged
    app's: when an app of the same name with another UID owns it, nothing else is
    touched.  The build caches go in any case: a cache deleted costs the next build
    one pip run, a cache kept could hand the purged app's install to a later app of
    the same name.  Returns whether something was deleted.
    """
    from epio.runner.build.builder import app_build_caches, remove_cache

    check_app_name(app)
    deleted = False
    for cache in app_build_caches(data_dir, app):
        if cache.exists() or cache.is_symlink():
            remove_cache(cache)
            deleted = True
    data = data_dir / "appdata" / app
    try:
        st = data.lstat()
    except FileNotFoundError:
        st = None
    if st is not None and uid_switch and st.st_uid != uid:
        return False  # a live app of the same name: its snapshots are its own too
    if st is not None:
        for entry in list(os.scandir(data)):
            path = Path(entry.path)
            if entry.is_dir(follow_symlinks=False) and btrfs.is_subvolume(path):
                btrfs.delete_snapshot(path)  # a dedicated server's data dir
        shutil.rmtree(data)
        deleted = True
    snapshots = data_dir / "snapshots" / app
    if snapshots.is_dir() and not snapshots.is_symlink():
        for series in list(snapshots.iterdir()):
            if series.is_dir() and not series.is_symlink():
                for snap in list(series.iterdir()):
                    if btrfs.is_subvolume(snap):
                        btrfs.delete_snapshot(snap)
        shutil.rmtree(snapshots)
        deleted = True
    return deleted


@implementer(ILauncher)
class SandboxLauncher:
    """Prepares and tears down everything an instance runs in."""

    log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        data_dir: Path,
        isolation: Isolation,
        cgroups: CgroupSupport,
        images: FetchingImages,
        *,
        bwrap: str | None,
        setpriv: str | None,
        node_id: str = "",
        shm_bytes: int = DEFAULT_SHM_BYTES,
    ) -> None:
        self.reactor = reactor
        self.shm_bytes = shm_bytes
        self.data_dir = Path(data_dir)
        self.isolation = isolation
        self.cgroups = cgroups
        self.images = images
        self.bwrap = bwrap
        self.setpriv = setpriv
        self.node_id = node_id
        self.instances_dir = self.data_dir / "runner" / "instances"
        self.appdata_dir = self.data_dir / "appdata"

    # -- prepare ---------------------------------------------------------------

    def _own(self, path: Path, uid: int, gid: int, mode: int) -> None:
        if self.isolation.uid_switch:
            os.chown(path, uid, gid)
        os.chmod(path, mode)

    def _retire_foreign_data(self, data: Path, uid: int) -> None:
        """Move aside data dirs an app must not get: its own name's dir owned by another
        UID (a deleted app of the same name), and any other name's dir owned by its UID
        (an earlier holder of a reused UID: the store reuses a UID once its app is gone,
        never for an app of the same name).

        Without a sandbox, file modes are all that keeps a new holder of a UID out of
        the earlier holder's files.  They go to ``appdata/.retired/`` (0700, root
        only) for the operator.
        """
        if not self.isolation.uid_switch:
            return  # without UID switching every dir has the runner's owner
        try:
            owner = data.lstat().st_uid
        except FileNotFoundError:
            pass
        else:
            if owner != uid:
                self._retire(data, owner, uid)
        for entry in os.scandir(self.appdata_dir):
            if entry.name == data.name or entry.name.startswith("."):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if st.st_uid == uid:
                self._retire(Path(entry.path), uid, uid)

    def _retire(self, data: Path, owner: int, uid: int) -> None:
        retired = self.appdata_dir / ".retired"
        retired.mkdir(mode=0o700, exist_ok=True)
        os.chmod(retired, 0o700)
        target = retired / f"{data.name}.uid{owner}.{int(self.reactor.seconds())}"
        os.rename(data, target)
        self.log.warn("data dir of an earlier app named {app} (uid {old}) moved to {path}; "
                      "the new holder of uid {uid} never sees it", app=data.name, old=owner,
                      path=str(target), uid=uid)

    def _service_data_dir(self, spec: InstanceSpec, data: Path, user: AppUser) -> None:
        """A dedicated server's data dir (``$EPIO_SERVICE_DIR``): made here, as root, so
        it is a btrfs subvolume where the app data dir is on btrfs (epio.addons.btrfs);
        left to the server's wrapper (a plain mkdir) when it cannot be."""
        name = spec.env.get("EPIO_SERVICE_DIR", "")
        if spec.process_type not in SERVICE_PROCESS_TYPES or not DEDICATED_DIR.match(name):
            return
        path = data / name
        if path.exists() or path.is_symlink():
            return
        try:
            subvolume = btrfs.make_data_dir(path)
        except (OSError, btrfs.BtrfsError) as e:
            self.log.warn("instance {i}: data dir {path} not made: {error}; the server "
                          "makes a plain directory", i=spec.instance_id, path=str(path),
                          error=str(e))
            return
        self._own(path, user.uid, user.gid, 0o700)
        self.log.info("instance {i}: data dir {path} made ({what})", i=spec.instance_id,
                      path=str(path), what="btrfs subvolume" if subvolume else "directory")

    def prepare(self, spec: InstanceSpec, port: int | None) -> defer.Deferred[Launch]:
        return defer.Deferred.fromCoroutine(self._prepare(spec, port))

    async def _prepare(self, spec: InstanceSpec, port: int | None) -> Launch:
        if not spec.image_digest:  # a dedicated server before the app's first build
            return self._prepare_local(spec, port, self._no_image())
        image_root = Path(await self.images.mount(spec.image_digest))
        try:
            return self._prepare_local(spec, port, image_root)
        except BaseException:
            await self.images.unmount(spec.image_digest)
            raise

    def _no_image(self) -> Path:
        """The empty image (``DATA_DIR/runner/no-image``: only ``app/``, root-owned,
        read-only for the app) a dedicated database server runs on when the app has no
        image yet: add-ons are provisioned before the first build (docs/databases.md)."""
        root = self.data_dir / "runner" / "no-image"
        (self.data_dir / "runner").mkdir(mode=0o711, exist_ok=True)
        for d in (root, root / "app"):
            d.mkdir(mode=0o755, exist_ok=True)
            if d.is_symlink() or not d.is_dir():
                raise OSError(f"{d} is not a directory")
            os.chmod(d, 0o755)
        return root

    def _prepare_local(self, spec: InstanceSpec, port: int | None, image_root: Path) -> Launch:
        user = AppUser(app=spec.app, uid=spec.uid, gid=spec.uid)
        for d in (self.data_dir / "runner", self.instances_dir, self.appdata_dir):
            d.mkdir(mode=0o711, exist_ok=True)
        data = self.appdata_dir / spec.app
        self._retire_foreign_data(data, user.uid)
        if not data.exists():
            data.mkdir(mode=0o700)
        self._own(data, user.uid, user.gid, 0o700)
        self._service_data_dir(spec, data, user)
        scratch = self.instances_dir / spec.instance_id
        if scratch.exists():
            shutil.rmtree(scratch)
        scratch.mkdir(mode=0o711)
        for name in ("home", "tmp"):
            (scratch / name).mkdir()
            self._own(scratch / name, user.uid, user.gid, 0o700)
        # ep.io's ~/data: a symlink to the data dir (as the app sees it)
        sandboxed = self.isolation.sandbox == "bwrap"
        os.symlink(DATA if sandboxed else str(data), scratch / "home" / "data")
        etc = scratch / "etc"
        etc.mkdir(mode=0o755)
        (etc / "passwd").write_text(user.passwd())
        (etc / "group").write_text(user.group())
        os.chmod(etc / "passwd", 0o644)
        os.chmod(etc / "group", 0o644)
        cgroup = None
        if self.cgroups.bases:
            cgroup = InstanceCgroup(self.cgroups, spec.instance_id)
            for problem in cgroup.create(spec.limits):
                self.log.warn("instance {i}: cgroup limit not set: {problem}",
                              i=spec.instance_id, problem=problem)
        facts = image_facts(image_root)
        launch_spec = LaunchSpec(
            instance_id=spec.instance_id, user=user, image_root=image_root, data_dir=data,
            scratch=scratch, command=spec.command, nofile=spec.limits.nofile,
            cgroup_procs=tuple(cgroup.procs_files()) if cgroup else (),
            python_prefix=python_prefix_of(image_root), workdir=facts.workdir,
            shm_bytes=self.shm_bytes, data_seed=facts.data_seed, data_dirs=facts.data_dirs,
        )
        info_fd = 3 if sandboxed else None
        argv = build_argv(launch_spec, self.isolation, bwrap=self.bwrap, setpriv=self.setpriv,
                          info_fd=info_fd)
        platform = {
            "EPIO_APP": spec.app,
            "EPIO_RELEASE": str(spec.release),
            "EPIO_PROCESS": spec.source,
            "EPIO_INSTANCE": spec.instance_id,
            "EPIO_NODE": self.node_id,
        }
        if port is not None:
            platform["PORT"] = str(port)
        env = app_environment(layout_for(launch_spec, self.isolation), platform, spec.env,
                              facts.env)
        child_fds: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        if info_fd is not None:
            child_fds[info_fd] = "r"
        return Launch(
            argv=argv, env=env, cwd=launch_cwd(launch_spec, self.isolation),
            child_fds=child_fds, info_fd=info_fd, cgroup=cgroup, scratch=str(scratch),
            image=spec.image_digest or None,
        )

    # -- running -----------------------------------------------------------------

    def spawned(self, launch: Launch, pid: int) -> None:
        launch.pid = pid
        launch.start_time = proc_start_time(pid)
        if self.isolation.sandbox != "bwrap":
            launch.group = pid  # setsid made it the leader of its own group

    def signal(self, launch: Launch, sig: int) -> None:
        """Signal the app's process group; before bubblewrap has told us its child's
        pid, signal bubblewrap itself (its death kills the sandbox: --die-with-parent)."""
        if launch.group is not None and signal_group(launch.group, sig):
            return
        if launch.pid is not None:
            try:
                os.kill(launch.pid, sig)
            except ProcessLookupError:
                pass

    def kill_all(self, launch: Launch) -> None:
        self.signal(launch, signal.SIGKILL)
        if launch.pid is not None and self.isolation.sandbox == "bwrap":
            try:
                os.kill(launch.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if launch.cgroup is not None:
            launch.cgroup.signal_all(signal.SIGKILL)

    def oom_kills(self, launch: Launch) -> int:
        return launch.cgroup.oom_kills() if launch.cgroup is not None else 0

    def listening_ports(self, launch: Launch, host: str | None = None) -> list[int]:
        pids = set(launch.cgroup.pids()) if launch.cgroup is not None else set()
        if launch.pid is not None:
            pids |= process_tree([launch.pid])
        return listening_ports(pids, host=host)

    def cleanup(self, launch: Launch) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._cleanup(launch))

    async def _cleanup(self, launch: Launch) -> None:
        if launch.cgroup is not None:
            # the kernel frees a cgroup a moment after its last process exits
            for _ in range(20):
                launch.cgroup.signal_all(signal.SIGKILL)
                if launch.cgroup.remove():
                    break
                await task.deferLater(self.reactor, 0.1, lambda: None)
            else:
                self.log.warn("cgroup {name} still busy; removed at the next start",
                              name=launch.cgroup.name)
        if launch.scratch:
            shutil.rmtree(launch.scratch, ignore_errors=True)
        if launch.image:
            try:
                await self.images.unmount(launch.image)
            except Exception as e:
                self.log.warn("unmounting image {digest} failed: {error}",
                              digest=launch.image, error=str(e))
