"""Root-owned build code never follows a path of the uploaded (or build-user) tree:
wheel admission, the app's symlinks, Django's manage.py, the venv's scripts."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from epio.runner.build import platform as plat
from epio.runner.build.builder import _admit_wheels, _links_leaving

SECRET = b"s3cr3t-cluster-key-0123456789\n"


class _Tmp(SynchronousTestCase):
    def setUp(self) -> None:
        self.tmp = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.tmp)
        self.secret = self.tmp / "cluster-secret"
        self.secret.write_bytes(SECRET)
        os.chmod(self.secret, 0o600)


class AdmitWheelsTests(_Tmp):
    def test_planted_symlink_wheel_is_not_copied(self) -> None:
        """A ``*.whl`` symlink planted by build code (to a node secret) is skipped: the
        secret never lands in a world-readable cache; real wheels are admitted."""
        new, shared, own = self.tmp / "new", self.tmp / "shared", self.tmp / "own"
        for d in (new, shared, own):
            d.mkdir()
        (new / "good-1.0-py3-none-any.whl").write_bytes(b"PK wheel")
        (new / "evil-1.0-py3-none-any.whl").symlink_to(self.secret)
        names = {"good-1.0-py3-none-any.whl", "evil-1.0-py3-none-any.whl"}
        self.assertEqual(_admit_wheels(new, shared, own, names), (1, 0))
        self.assertEqual(sorted(p.name for p in shared.iterdir()), ["good-1.0-py3-none-any.whl"])
        self.assertEqual(list(own.iterdir()), [])

    def test_files_of_another_owner_are_not_copied(self) -> None:
        """With the build user's uid given, a file it does not own (e.g. a hard link to a
        root file) is skipped, and a wheel dir not owned by it is refused."""
        new, shared, own = self.tmp / "new", self.tmp / "shared", self.tmp / "own"
        for d in (new, shared, own):
            d.mkdir()
        (new / "mine-1.0-py3-none-any.whl").write_bytes(b"PK mine")
        os.link(self.secret, new / "theirs-1.0-py3-none-any.whl")
        me = os.getuid()
        other = 65534 if me != 65534 else 65533
        if me == 0:
            os.chown(new, other, -1)
            os.chown(new / "mine-1.0-py3-none-any.whl", other, -1)
            self.assertEqual(_admit_wheels(new, shared, own, set(), owner=other), (0, 1))
            self.assertEqual([p.name for p in own.iterdir()], ["mine-1.0-py3-none-any.whl"])
        with self.assertRaises(OSError):
            _admit_wheels(new, shared, own, set(), owner=other if me != 0 else 12345)
        for p in own.iterdir():
            self.assertNotEqual(p.read_bytes(), SECRET)


class AppLinksTests(_Tmp):
    def setUp(self) -> None:
        super().setUp()
        self.app = self.tmp / "builds" / "w" / "root" / "app"
        self.app.mkdir(parents=True)
        (self.app / "conf").mkdir()

    def test_inside_and_data_links_pass(self) -> None:
        """Links inside the app, chains through the top, and [symlinks]' /data targets pass."""
        (self.app / "top").symlink_to(".")
        (self.app / "c").symlink_to("top/conf")
        (self.app / "media").symlink_to("/data/media")
        (self.app / "conf" / "sub").symlink_to("../media/uploads")
        self.assertIsNone(_links_leaving(self.app))

    def test_a_new_link_that_redirects_an_old_one_is_caught(self) -> None:
        """``a -> d/../x`` was inside while ``d`` did not exist; once ``[symlinks] d = .``
        is made, ``a`` leads out of the app — the check of the whole tree finds it."""
        (self.app / "a").symlink_to("d/../x")
        self.assertIsNone(_links_leaving(self.app))
        (self.app / "d").symlink_to(".")
        self.assertEqual(_links_leaving(self.app), ("a", "d/../x"))

    def test_the_reviewers_chain(self) -> None:
        """The upload chain (each link looks inside) is caught here too."""
        (self.app / "d1" / "d2" / "d3").mkdir(parents=True)
        (self.app / "d1" / "d2" / "d3" / "up").symlink_to("../../..")
        (self.app / "m").symlink_to("d1/d2/d3/up/../../..")
        bad = _links_leaving(self.app)
        self.assertEqual(bad, ("m", "d1/d2/d3/up/../../.."))


class PlatformReadsTests(_Tmp):
    def test_symlinked_manage_py_is_not_read(self) -> None:
        """detect_settings_module does not read a manage.py that is a symlink (to a file
        outside the app whose text would match), nor one in a base dir leading out."""
        app = self.tmp / "app"
        app.mkdir()
        outside = self.tmp / "manage-out.py"
        outside.write_text('os.environ.setdefault("DJANGO_SETTINGS_MODULE", "leaked.value")\n')
        (app / "manage.py").symlink_to(outside)
        self.assertIsNone(plat.detect_settings_module(app, ""))
        (app / "manage.py").unlink()
        (app / "proj").symlink_to(self.tmp)
        os.rename(outside, self.tmp / "manage.py")
        self.assertIsNone(plat.detect_settings_module(app, "proj"))
        (app / "manage.py").write_text(
            'os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")\n'
        )
        self.assertEqual(plat.detect_settings_module(app, ""), "mysite.settings")

    def test_venv_files_are_not_written_through_symlinks(self) -> None:
        """relocate_scripts skips a script that is a symlink (never rewrites its target);
        clean_pyvenv_cfg refuses a symlinked pyvenv.cfg."""
        venv = self.tmp / "venv"
        (venv / "bin").mkdir(parents=True)
        victim = self.tmp / "victim"
        victim.write_bytes(b"#!/old/venv/bin/python\nprint(1)\n")
        (venv / "bin" / "tool").symlink_to(victim)
        (venv / "bin" / "real").write_bytes(b"#!/old/venv/bin/python\nprint(2)\n")
        self.assertEqual(plat.relocate_scripts(venv / "bin", "/old/venv"), 1)
        self.assertEqual(victim.read_bytes(), b"#!/old/venv/bin/python\nprint(1)\n")
        self.assertTrue((venv / "bin" / "real").read_bytes().startswith(b"#!/bin/sh\n"))
        (venv / "pyvenv.cfg").symlink_to(self.secret)
        with self.assertRaises(OSError):
            plat.clean_pyvenv_cfg(venv)
        self.assertEqual(self.secret.read_bytes(), SECRET)
