"""A node that is not root builds read-only directory images as its own user."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from twisted.trial.unittest import SkipTest, TestCase

from .helpers import EXAMPLES

CHECKOUT = Path(__file__).resolve().parents[3]
DRIVER = Path(__file__).with_name("nonroot_driver.py")


class NonRootBuildTests(TestCase):
    timeout = 180

    def test_nonroot_builds_dir_image(self) -> None:
        """Run as an unprivileged user (nobody), the builder falls back to a read-only
        directory image, says isolation is reduced and that it builds as the node's own
        user, and the image's venv imports the app; its memory limit (RLIMIT_AS, no
        cgroup) stops a build that grabs too much, with a clear message."""
        if os.geteuid() != 0 or shutil.which("runuser") is None:
            raise SkipTest("needs root to switch to another user")
        py = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")
        site = [p for p in sys.path if p.endswith("site-packages")]
        if not py.exists() or not site:
            raise SkipTest("no system interpreter of this version to run the node as nobody")
        self.data = Path(tempfile.mkdtemp(prefix="epio-nonroot-"))
        self.addCleanup(shutil.rmtree, self.data, True)
        os.chmod(self.data, 0o777)
        shutil.chown(self.data, "nobody")
        self.py, self.site = py, site[0]
        result = self.run_as_nobody(EXAMPLES / "wsgi", {})
        self.assertNotIn("failed", result, result.get("log"))
        self.assertEqual(result["format"], "dir")
        log = "\n".join(result["log"])
        self.assertIn("reduced isolation", log)
        self.assertIn("not root: builds run as the node's own user", log)
        image = Path(result["path"])
        self.assertEqual((image / "app").stat().st_uid, 65534)
        self.assertEqual((image / "app").stat().st_mode & 0o222, 0)
        check = subprocess.run(
            [str(image / "venv/bin/python"), "-c", "import app, gunicorn"],
            capture_output=True,
            text=True,
            cwd="/",
        )
        self.assertEqual(check.returncode, 0, check.stderr)

        # without a memory cgroup the limit is RLIMIT_AS: a package that grabs 1 GB at
        # interpreter start fails the build with the memory message
        from .test_builds import _fake_wheel

        hog = self.data / "hogapp"
        # site.py swallows exceptions of .pth code, so the hog reports and exits itself
        grab = (
            b"import sys; exec('try:\\n _ = bytes(1 << 30)\\nexcept MemoryError:\\n"
            b' print("MemoryError", file=sys.stderr); sys.exit(1)\')\n'
        )
        _fake_wheel(hog / "wheels", "epio_hog", "1.0", {"epio_hog.pth": grab})
        (hog / "Procfile").write_text("w: python w.py\n")
        (hog / "requirements.txt").write_text("--find-links ./wheels\nepio-hog==1.0\n")
        subprocess.run(["chown", "-R", "nobody", str(hog)], check=True)
        failed = self.run_as_nobody(hog, {"memory_mb": 300})
        self.assertIn("memory limit of 300 MB", failed.get("failed", ""), failed.get("log"))

    def run_as_nobody(self, app_src: Path, cfg: dict) -> dict:
        app = self.data / ("app-" + os.urandom(3).hex())
        shutil.copytree(app_src, app)
        subprocess.run(["chown", "-R", "nobody", str(app)], check=True)
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": str(self.data),
            "PYTHONPATH": f"{CHECKOUT}:{self.site}",
        }
        for k, v in os.environ.items():
            if k.startswith("PIP_") or k.lower().endswith("_proxy"):
                env[k] = v
        out = subprocess.run(
            [
                shutil.which("runuser") or "runuser",
                "-u",
                "nobody",
                "--",
                str(self.py),
                str(DRIVER),
                str(app),
                str(self.data / "node"),
                json.dumps(cfg),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=150,
            cwd="/",
        )
        if out.returncode != 0 and "No module named" in out.stderr:
            raise SkipTest(f"the node's packages do not import as nobody: {out.stderr[-200:]}")
        self.assertEqual(out.returncode, 0, out.stderr[-2000:])
        return json.loads(out.stdout.strip().splitlines()[-1])
