"""Sandbox argv, isolation detection, cgroups (on a fake cgroupfs), users and ports."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from epio.runner.cgroups import CgroupSupport, InstanceCgroup, Limits, detect, own_cgroups
from epio.runner.ports import NoFreePort, PortAllocator
from epio.runner.sandbox import (
    Isolation,
    LaunchSpec,
    app_environment,
    build_argv,
    detect_isolation,
    image_facts,
    layout_for,
    python_prefix_of,
)
from epio.runner.service import BwrapTrial, bwrap_trial
from epio.runner.users import UserError, app_user

FULL = CgroupSupport({"memory": Path("/m"), "cpu": Path("/c"), "pids": Path("/p")}, {})
NONE = CgroupSupport({}, {"memory": "no memory controller"})


def spec(tmp: Path, **kw: object) -> LaunchSpec:
    base = dict(instance_id="i1", user=app_user("hello", 20001, 20000, 30000),
                image_root=tmp / "img", data_dir=tmp / "appdata" / "hello",
                scratch=tmp / "scratch", command="python app.py", nofile=1024,
                cgroup_procs=("/m/i1/cgroup.procs",), python_prefix="/opt/py")
    base.update(kw)
    return LaunchSpec(**base)  # type: ignore[arg-type]


class IsolationDetectionTests(SynchronousTestCase):
    def test_root_with_bwrap_and_cgroups_has_everything_but_network(self) -> None:
        """As root with bubblewrap, setpriv and cgroups only the network is shared."""
        iso = detect_isolation("auto", 0, "/usr/bin/bwrap", "/usr/bin/setpriv", FULL, True)
        self.assertEqual(iso.sandbox, "bwrap")
        self.assertTrue(iso.uid_switch)
        self.assertEqual(iso.namespaces, ("pid", "ipc", "uts", "mount"))
        self.assertEqual(iso.cgroups, ("memory", "cpu", "pids"))
        self.assertEqual(iso.off, {})
        self.assertEqual(iso.as_dict()["network"], "shared")

    def test_not_root_says_what_is_off(self) -> None:
        """Without root: no sandbox, no UID switch, no cgroups -- each named with a reason."""
        iso = detect_isolation("auto", 1000, "/usr/bin/bwrap", "/usr/bin/setpriv", NONE)
        self.assertEqual(iso.sandbox, "none")
        self.assertFalse(iso.uid_switch)
        for what in ("sandbox", "uid", "filesystem", "processes", "memory"):
            self.assertIn(what, iso.off)
        self.assertIn("not root", iso.off["sandbox"])

    def test_no_bwrap_or_failed_trial(self) -> None:
        """Missing bubblewrap, or a failed trial run, turns the sandbox off (UIDs still drop)."""
        a = detect_isolation("auto", 0, None, "/usr/bin/setpriv", FULL)
        self.assertEqual((a.sandbox, a.uid_switch), ("none", True))
        self.assertIn("not installed", a.off["sandbox"])
        b = detect_isolation("auto", 0, "/usr/bin/bwrap", "/usr/bin/setpriv", FULL, False)
        self.assertIn("trial run", b.off["sandbox"])
        c = detect_isolation("none", 0, "/usr/bin/bwrap", "/usr/bin/setpriv", FULL, True)
        self.assertEqual(c.sandbox, "none")


class ArgvTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.tmp = Path(self.mktemp())

    def test_bwrap_argv(self) -> None:
        """The sandbox unshares pid/ipc/uts (not net), dies with its parent, binds the image
        read-only at /app and the data dir at /data, never the data dir root, and
        drops to the app UID with setpriv; the shim enters the cgroups and sets nofile."""
        iso = detect_isolation("auto", 0, "/usr/bin/bwrap", "/usr/bin/setpriv", FULL, True)
        argv = build_argv(spec(self.tmp), iso, bwrap="/usr/bin/bwrap", setpriv="/usr/bin/setpriv",
                          app_shell="/bin/bash")
        self.assertEqual(argv[:2], ["/bin/sh", "-c"])
        self.assertIn("ulimit -n 1024", argv[2])
        self.assertIn("echo $$ > '/m/i1/cgroup.procs'", argv[2])
        for flag in ("--unshare-pid", "--unshare-ipc", "--unshare-uts", "--die-with-parent",
                     "--new-session"):
            self.assertIn(flag, argv)
        self.assertNotIn("--unshare-net", argv)
        self.assertNotIn("--unshare-all", argv)
        joined = " ".join(argv)
        self.assertIn(f"--ro-bind {self.tmp / 'img'} /app", joined)
        self.assertIn(f"--bind {self.tmp / 'appdata' / 'hello'} /data", joined)
        self.assertIn("--ro-bind /opt/py /opt/py", joined)
        self.assertIn("--tmpfs /tmp", joined)
        # a private, writable, bounded /dev/shm, mounted over bubblewrap's /dev
        self.assertIn("--perms 1777 --size 67108864 --tmpfs /dev/shm", joined)
        self.assertLess(argv.index("/dev"), argv.index("/dev/shm"))
        self.assertNotIn(f"--bind {self.tmp} ", joined)
        tail = argv[argv.index("--", argv.index("--chdir")) + 1:]
        self.assertEqual(tail, ["/usr/bin/setpriv", "--reuid", "20001", "--regid", "20001",
                                "--clear-groups", "--no-new-privs", "--", "/bin/bash", "-c",
                                "python app.py"])

    def test_dev_shm_without_size_support(self) -> None:
        """With a bubblewrap that has no --size (before 0.7.0) the sandbox still mounts
        a private, writable /dev/shm, without a size; with --size it is bounded by
        runner.shm_mb (shm_bytes)."""
        for sized, want in ((True, "--perms 1777 --size 1048576 --tmpfs /dev/shm"),
                            (False, "--perms 1777 --tmpfs /dev/shm")):
            iso = detect_isolation("auto", 0, "/usr/bin/bwrap", "/usr/bin/setpriv", FULL,
                                   True, shm_size=sized)
            self.assertEqual(iso.shm_size, sized)
            argv = build_argv(spec(self.tmp, shm_bytes=1 << 20), iso, bwrap="/usr/bin/bwrap",
                              setpriv="/usr/bin/setpriv", app_shell="/bin/bash")
            joined = " ".join(argv)
            self.assertIn(want, joined)
            self.assertEqual("--size" in argv, sized)
            self.assertLess(argv.index("/dev"), argv.index("/dev/shm"))

    def test_no_sandbox_argv_still_new_session_and_uid(self) -> None:
        """Without bubblewrap: a new session (for group signals), setpriv with a parent-death
        signal, then the command."""
        iso = detect_isolation("auto", 0, None, "/usr/bin/setpriv", FULL)
        argv = build_argv(spec(self.tmp), iso, bwrap=None, setpriv="/usr/bin/setpriv",
                          app_shell="/bin/bash")
        self.assertNotIn("--unshare-pid", argv)
        self.assertTrue(argv[4].endswith("setsid"))
        self.assertIn("--pdeathsig", argv)
        self.assertEqual(argv[-3:], ["/bin/bash", "-c", "python app.py"])

    def test_data_seed_is_copied_before_the_command(self) -> None:
        """An image whose facts seed data paths (a STATIC_ROOT in /data): the launched
        shell copies image/epio/data/<rel> into the data dir, keeping files the app wrote
        there, then runs the command (the real argv, run without a sandbox or UID switch);
        seed paths leaving the data dir are dropped from the facts."""
        import json
        import subprocess

        tmp = self.tmp.resolve()
        img = tmp / "img"
        (img / "epio" / "data" / "static" / "css").mkdir(parents=True)
        (img / "epio" / "data" / "static" / "css" / "a.css").write_text("new")
        (img / "epio" / "manifest.json").write_text(json.dumps({"build": {
            "data_seed": ["static", "../etc", "/abs", 3]}}))
        facts = image_facts(img)
        self.assertEqual(facts.data_seed, ("static",))
        data = tmp / "appdata" / "hello"
        (data / "static" / "CACHE").mkdir(parents=True)
        (data / "static" / "CACHE" / "made.css").write_text("by the app")
        (data / "static" / "css").mkdir()
        (data / "static" / "css" / "a.css").write_text("old release")
        iso = Isolation("none", False, (), (), True, {})
        argv = build_argv(spec(tmp, cgroup_procs=(), command="cat static/css/a.css",
                               data_seed=facts.data_seed), iso, bwrap=None, setpriv=None,
                          app_shell="/bin/bash")
        out = subprocess.run(argv, cwd=data, capture_output=True, text=True, timeout=10)
        self.assertEqual((out.returncode, out.stdout), (0, "new"), out.stderr)
        self.assertEqual((data / "static" / "CACHE" / "made.css").read_text(), "by the app")
        argv = build_argv(spec(self.tmp, cgroup_procs=(), command=("redis-server",),
                               data_seed=("static",)), iso, bwrap=None, setpriv=None)
        self.assertNotIn("cp", " ".join(argv))  # a service's argv command is left alone

    def test_symlink_targets_made_before_the_command(self) -> None:
        """[symlinks] into the data directory never dangle: the targets the build lists
        are made (as the app's user) before the command, so os.makedirs through the link
        works on a fresh data dir; a target named like a file gets only its parents."""
        import json
        import subprocess

        from epio.runner.build.builder import symlink_data_dirs

        self.assertEqual(symlink_data_dirs({
            "media": "/data/media", "uploads/avatars": "/data/u/avatars",
            "db.sqlite3": "/data/db/db.sqlite3", "static": "../static", "also": "/data/media",
        }), ["media", "db", "u/avatars"])
        tmp = self.tmp.resolve()
        img = tmp / "img"
        (img / "epio").mkdir(parents=True)
        (img / "epio" / "manifest.json").write_text(json.dumps({"build": {
            "data_dirs": ["media", "../etc", "/abs"]}}))
        facts = image_facts(img)
        self.assertEqual(facts.data_dirs, ("media",))
        data = tmp / "appdata" / "hello"
        data.mkdir(parents=True)
        app = tmp / "app"
        app.mkdir()
        (app / "media").symlink_to(data / "media")  # dangling until the instance starts
        iso = Isolation("none", False, (), (), True, {})
        argv = build_argv(spec(tmp, cgroup_procs=(), data_dirs=facts.data_dirs,
                               command=f"python3 -c 'import os; os.makedirs(\"{app}/media/cards\")'"),
                          iso, bwrap=None, setpriv=None, app_shell="/bin/bash")
        out = subprocess.run(argv, cwd=data, capture_output=True, text=True, timeout=10)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertTrue((data / "media" / "cards").is_dir())

    def test_settings_module_config_var_keeps_the_platform_settings(self) -> None:
        """A DJANGO_SETTINGS_MODULE config var on an image built with the platform settings
        becomes EPIO_APP_SETTINGS_MODULE (imported by them); DJANGO_SETTINGS_MODULE stays
        the platform module. Without platform settings the config var simply wins."""
        iso = Isolation("none", False, (), (), True, {})
        layout = layout_for(spec(self.tmp), iso)
        env = app_environment(layout, {}, {"DJANGO_SETTINGS_MODULE": "shop.settings.prod"},
                              {"DJANGO_SETTINGS_MODULE": "epio_settings"})
        self.assertEqual((env["DJANGO_SETTINGS_MODULE"], env["EPIO_APP_SETTINGS_MODULE"]),
                         ("epio_settings", "shop.settings.prod"))
        env = app_environment(layout, {}, {"DJANGO_SETTINGS_MODULE": "shop.settings.prod"},
                              {"DJANGO_SETTINGS_MODULE": "shop.settings"})
        self.assertEqual(env["DJANGO_SETTINGS_MODULE"], "shop.settings.prod")
        self.assertNotIn("EPIO_APP_SETTINGS_MODULE", env)

    def test_not_root_argv_has_no_uid_switch(self) -> None:
        """Not root: no setpriv at all (the app runs as the runner's user)."""
        iso = Isolation("none", False, (), (), True, {})
        argv = build_argv(spec(self.tmp, cgroup_procs=()), iso, bwrap=None, setpriv=None,
                          app_shell="/bin/sh")
        self.assertFalse(any("setpriv" in a for a in argv))

    def test_environment(self) -> None:
        """User config vars are passed; platform values (PORT, HOME, PATH...) win over them."""
        iso = detect_isolation("auto", 0, "/usr/bin/bwrap", "/usr/bin/setpriv", FULL, True)
        env = app_environment(layout_for(spec(self.tmp), iso), {"PORT": "20001"},
                              {"PORT": "1", "DATABASE_URL": "postgres://x", "HOME": "/evil"})
        self.assertEqual(env["PORT"], "20001")
        self.assertEqual(env["HOME"], "/home/app")
        self.assertEqual(env["EPIO_DATA_DIR"], "/data")
        self.assertEqual(env["DATABASE_URL"], "postgres://x")
        self.assertTrue(env["PATH"].startswith("/app/venv/bin:"))

    def test_python_prefix_from_pyvenv_cfg(self) -> None:
        """The Python install the image's venv points to is found from pyvenv.cfg."""
        venv = self.tmp / "img" / "venv"
        venv.mkdir(parents=True)
        (venv / "pyvenv.cfg").write_text("home = /opt/python3.11/bin\nversion = 3.11\n")
        self.assertEqual(python_prefix_of(self.tmp / "img"), "/opt/python3.11")
        self.assertIsNone(python_prefix_of(self.tmp / "nothing"))


class CgroupTests(SynchronousTestCase):
    def test_own_cgroups_parse(self) -> None:
        """/proc/self/cgroup lines map each v1 controller to our path."""
        f = Path(self.mktemp())
        f.write_text("4:memory:/a/b\n1:cpu,cpuacct:/\n0::/\n")
        self.assertEqual(own_cgroups(f), {"memory": "/a/b", "cpu": "/", "cpuacct": "/"})

    def test_detect_and_limits_on_a_fake_tree(self) -> None:
        """Controllers present get a parent cgroup under our own; limits are written;
        missing controllers are reported with a reason; OOM kills are read."""
        root = Path(self.mktemp())
        for ctrl in ("memory", "pids"):
            (root / ctrl / "x").mkdir(parents=True)
            (root / ctrl / "cgroup.procs").write_text("")
        me = Path(self.mktemp())
        me.write_text("4:memory:/x\n8:pids:/\n")
        # a fake cgroupfs has no kernel to create the control files: pre-create them
        for ctrl, probe in (("memory", "memory.limit_in_bytes"), ("pids", "pids.max")):
            base = root / ctrl / ("x" if ctrl == "memory" else "") / "epio"
            base.mkdir(parents=True)
            (base / probe).write_text("max")
            (base / "cgroup.procs").write_text("")
        support = detect(root, me, "epio")
        self.assertEqual(set(support.bases), {"memory", "pids"})
        self.assertEqual(support.bases["memory"], root / "memory" / "x" / "epio")
        self.assertIn("cpu", support.problems)
        cg = InstanceCgroup(support, "i1")
        self.assertEqual(cg.create(Limits(64, 512, 100, 1024)), [])
        self.assertEqual((support.bases["memory"] / "i1" / "memory.limit_in_bytes").read_text(),
                         str(64 * 1024 * 1024))
        self.assertEqual((support.bases["pids"] / "i1" / "pids.max").read_text(), "100")
        (support.bases["memory"] / "i1" / "memory.oom_control").write_text(
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
        self.assertEqual(cg.oom_kills(), 2)
        (support.bases["pids"] / "i1" / "cgroup.procs").write_text(f"{os.getpid()}\n")
        self.assertEqual(cg.pids(), {os.getpid()})
        # no cpuacct controller: no CPU time, and no isolation problem (it only counts)
        self.assertNotIn("cpuacct", support.problems)
        self.assertIn("cpuacct", support.accounting_off)
        self.assertIsNone(cg.cpu_usage_usec())

    def test_cpu_time_from_cpuacct(self) -> None:
        """With a cpuacct controller the instance gets a cgroup there too (its
        processes enter it with the others) and its CPU time is cpuacct.usage in µs."""
        root = Path(self.mktemp())
        me = Path(self.mktemp())
        me.write_text("3:cpuacct:/\n")
        base = root / "cpuacct" / "epio"
        base.mkdir(parents=True)
        (root / "cpuacct" / "cgroup.procs").write_text("")
        (base / "cpuacct.usage").write_text("0")
        (base / "cgroup.procs").write_text("")
        support = detect(root, me, "epio")
        self.assertEqual(set(support.bases), {"cpuacct"})
        cg = InstanceCgroup(support, "i1")
        self.assertEqual(cg.create(Limits(64, 512, 100, 1024)), [])
        self.assertIn(str(base / "i1" / "cgroup.procs"), cg.procs_files())
        (base / "i1" / "cpuacct.usage").write_text("2500123456\n")
        self.assertEqual(cg.cpu_usage_usec(), 2_500_123)


class UserTests(SynchronousTestCase):
    def test_uid_rules(self) -> None:
        """Never root, never outside the range, never a non-integer; names are path-safe."""
        self.assertEqual(app_user("hello", 20001, 20000, 30000).uid, 20001)
        for app, uid in (("hello", 0), ("hello", 19999), ("hello", 30001), ("hello", "20001"),
                         ("../etc", 20001), ("", 20001)):
            self.assertRaises(UserError, app_user, app, uid, 20000, 30000)

    def test_sandbox_passwd_names_only_the_app(self) -> None:
        """The sandbox's passwd has root, the app user and nobody -- no host accounts."""
        u = app_user("hello", 20001, 20000, 30000)
        names = [line.split(":")[0] for line in u.passwd().splitlines()]
        self.assertEqual(names, ["root", "app-hello", "nobody"])
        self.assertIn("app-hello:x:20001:", u.group())


class PortTests(SynchronousTestCase):
    def test_allocation_skips_busy_and_used_and_wraps(self) -> None:
        """Ports come from the range, skip busy ones, are not reused at once, and run out."""
        busy = {10}
        ports = PortAllocator(10, 13, lambda p: p not in busy)
        self.assertEqual([ports.allocate(), ports.allocate()], [11, 12])
        ports.release(11)
        self.assertEqual(ports.allocate(), 13)
        self.assertEqual(ports.allocate(), 11)
        self.assertRaises(NoFreePort, ports.allocate)
        self.assertFalse(ports.claim_if_free(12))
        self.assertFalse(ports.claim_if_free(99))


class ImageFactsTests(SynchronousTestCase):
    def test_facts_from_the_image_manifest(self) -> None:
        """workdir and env come from epio/manifest.json's build facts; a workdir outside
        app/ or missing, and non-string env entries, fall back or are dropped."""
        import json

        from epio.runner.sandbox import ImageFacts, image_facts

        root = Path(self.mktemp())
        (root / "epio").mkdir(parents=True)
        (root / "app" / "site").mkdir(parents=True)

        def facts(build: object) -> ImageFacts:
            (root / "epio" / "manifest.json").write_text(json.dumps({"build": build}))
            return image_facts(root)

        f = facts({"workdir": "app/site", "env": {"DJANGO_SETTINGS_MODULE": "s", "X": 1}})
        self.assertEqual((f.workdir, f.env), ("app/site", {"DJANGO_SETTINGS_MODULE": "s"}))
        for bad in ("../etc", "/etc", "app/../..", "app/missing", "venv", 3):
            self.assertEqual(facts({"workdir": bad}).workdir, "app", bad)
        self.assertEqual(image_facts(Path(self.mktemp())).workdir, "app")

    def test_image_env_is_below_user_and_platform_env(self) -> None:
        """Build env < user config vars < platform values."""
        iso = Isolation("bwrap", True, (), (), True, {})
        layout = layout_for(spec(Path(self.mktemp())), iso)
        env = app_environment(layout, {"PORT": "1"}, {"A": "user"},
                              {"A": "image", "B": "image", "PORT": "9"})
        self.assertEqual((env["A"], env["B"], env["PORT"]), ("user", "image", "1"))

    def test_every_platform_value_is_a_reserved_config_var(self) -> None:
        """Every name the platform sets over config vars (but LANG, a default only) is
        one the API refuses as a config var (epio.appenv), so none is silently ignored."""
        from epio.appenv import reserved_reason

        iso = Isolation("bwrap", True, (), (), True, {})
        layout = layout_for(spec(Path(self.mktemp())), iso)
        platform = {"EPIO_APP": "a", "EPIO_RELEASE": "1", "EPIO_PROCESS": "web.1",
                    "EPIO_INSTANCE": "i", "EPIO_NODE": "n", "PORT": "1"}
        probe = {k: "user" for k in app_environment(layout, platform, {})}
        env = app_environment(layout, platform, probe)
        overridden = sorted(k for k in probe if env[k] != "user")
        self.assertIn("PORT", overridden)
        for name in overridden:
            self.assertIsNotNone(reserved_reason(name), name)
        self.assertIsNone(reserved_reason("LANG"))
        self.assertEqual(env["LANG"], "user")


class FakeBwrap:
    """Stands for subprocess.run on a bubblewrap of a given version: before 0.7.0 it
    refuses --size as bubblewrap 0.6.1 does."""

    def __init__(self, has_size: bool, works: bool = True) -> None:
        self.has_size = has_size
        self.works = works
        self.calls: list[list[str]] = []

    def __call__(self, argv: list[str], **kw: Any) -> subprocess.CompletedProcess[bytes]:
        self.calls.append(argv)
        if "--size" in argv and not self.has_size:
            return subprocess.CompletedProcess(argv, 1, b"", b"bwrap: Unknown option --size\n")
        if not self.works:
            return subprocess.CompletedProcess(
                argv, 1, b"", b"bwrap: No permissions to creating new namespace\n")
        return subprocess.CompletedProcess(argv, 0, b"", b"")


class BwrapTrialTests(SynchronousTestCase):
    def test_trial_probes_the_dev_shm_options(self) -> None:
        """The trial mounts /dev/shm with the sandbox's exact options (size included);
        a bubblewrap without --size is tried again without it and recorded as
        working without a size; one that fails otherwise does not work."""
        new = FakeBwrap(has_size=True)
        self.assertEqual(bwrap_trial("/usr/bin/bwrap", 1 << 20, run=new), BwrapTrial(True, True))
        self.assertEqual(len(new.calls), 1)
        self.assertIn("--perms 1777 --size 1048576 --tmpfs /dev/shm", " ".join(new.calls[0]))
        old = FakeBwrap(has_size=False)
        self.assertEqual(bwrap_trial("/usr/bin/bwrap", 1 << 20, run=old),
                         BwrapTrial(True, False))
        self.assertEqual(len(old.calls), 2)
        self.assertIn("--perms 1777 --tmpfs /dev/shm --", " ".join(old.calls[1]))
        self.assertNotIn("--size", old.calls[1])
        self.assertFalse(bwrap_trial("/usr/bin/bwrap", run=FakeBwrap(True, works=False)).works)
        self.assertFalse(bwrap_trial("/usr/bin/bwrap", run=FakeBwrap(False, works=False)).works)

    def test_real_bubblewrap_of_this_host(self) -> None:
        """The real bubblewrap here (0.8.0) passes the trial with --size."""
        bwrap = shutil.which("bwrap")
        if bwrap is None or os.geteuid() != 0:
            self.skipTest("needs root and bubblewrap")
        self.assertEqual(bwrap_trial(bwrap), BwrapTrial(True, True))
