"""Files the build generates: Django platform settings, bundle_config, relocatable scripts."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from epio.runner.build import platform as plat

PROBE = (
    "import json, epio_settings as s; print(json.dumps({k: getattr(s, k) for k in "
    "('DATABASES', 'CACHES', 'ALLOWED_HOSTS', 'SECRET_KEY', 'STATIC_ROOT', 'STATIC_URL', 'DEBUG', 'FROM_LOCAL',"
    " 'LOGGING', 'PROD')"
    " if hasattr(s, k)} | {'overrides': s._epio_overrides}, default=str))"
)


class SettingsModuleTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.root)
        self.sp = self.root / "venv/lib/python3.11/site-packages"
        self.sp.mkdir(parents=True)
        self.app = self.root / "app"
        pkg = self.app / "mysite" / "settings"
        pkg.mkdir(parents=True)
        (self.app / "mysite" / "__init__.py").write_text("")
        (pkg / "__init__.py").write_text(
            "from .base import *\ntry:\n    from .local_settings import *\nexcept ImportError:\n    pass\n"
        )
        (pkg / "base.py").write_text(
            "DEBUG = True\nSECRET_KEY = 'dev'\nALLOWED_HOSTS = ['mine.example']\n"
            "DATABASES = {'default': {'ENGINE': 'django.db.backends.sqlite3', 'NAME': 'db.sqlite3'},"
            " 'other': {'ENGINE': 'x'}}\nSTATIC_URL = '/assets/'\n"
        )
        (pkg / "local_settings.py").write_text("DEBUG = False\nFROM_LOCAL = 1\n")
        (self.sp / "epio_settings.py").write_text(
            plat.settings_module_source("mysite.settings", None)
        )

    def probe(self, **env: str) -> dict:
        out = subprocess.run(
            [sys.executable, "-c", PROBE],
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{self.sp}:{self.app}", **env},
            capture_output=True,
            text=True,
            check=True,
            cwd="/",
        )
        return json.loads(out.stdout)

    def test_settings_package_with_local_settings_and_no_platform_env(self) -> None:
        """Without platform variables the app's own settings (package + local_settings) stand."""
        s = self.probe()
        self.assertEqual(s["DEBUG"], False)
        self.assertEqual(s["FROM_LOCAL"], 1)
        self.assertEqual(s["DATABASES"]["default"]["NAME"], "db.sqlite3")
        self.assertEqual(s["SECRET_KEY"], "dev")
        self.assertEqual(s["ALLOWED_HOSTS"], ["mine.example"])
        self.assertEqual(s["STATIC_URL"], "/assets/")
        self.assertEqual(s["STATIC_ROOT"], str(self.root / "epio" / "static"))

    def test_static_root_follows_the_data_directory(self) -> None:
        """STATIC_ROOT: [static] for STATIC_URL in the data directory wins (and the app's
        other STATIC_ROOT is reported as overridden); an own STATIC_ROOT under the data
        directory (as the build's EPIO_DATA_DIR, or written as /data) is kept, rebased on
        EPIO_DATA_DIR; one elsewhere goes to the image, with an override line."""
        base = self.app / "mysite" / "settings" / "base.py"
        text = base.read_text()

        def settings(own: str | None, static_data: dict[str, str], **env: str) -> dict:
            base.write_text(text + (f"STATIC_ROOT = {own!r}\n" if own else ""))
            (self.sp / "epio_settings.py").write_text(
                plat.settings_module_source("mysite.settings", None, static_data))
            return self.probe(**env)

        s = settings(None, {"/assets": "static"}, EPIO_DATA_DIR="/stage")
        self.assertEqual((s["STATIC_ROOT"], s["overrides"]), ("/stage/static", []))
        s = settings("/srv/www", {"/assets": "static"}, EPIO_DATA_DIR="/stage")
        self.assertEqual(s["STATIC_ROOT"], "/stage/static")
        self.assertIn("STATIC_ROOT '/srv/www' -> /stage/static ([static] /assets",
                      s["overrides"][0])
        s = settings("/data/collected", {})
        self.assertEqual((s["STATIC_ROOT"], s["overrides"]), ("/data/collected", []))
        s = settings("/data/collected", {}, EPIO_DATA_DIR="/stage")
        self.assertEqual(s["STATIC_ROOT"], "/stage/collected")
        s = settings("/srv/www", {"/other": "x"})
        self.assertEqual(s["STATIC_ROOT"], str(self.root / "epio" / "static"))
        self.assertEqual(len(s["overrides"]), 1)
        self.assertIn("'/srv/www' -> the image's epio/static", s["overrides"][0])

    def test_caches_are_merged(self) -> None:
        """REDIS_URL sets only LOCATION of an app's own Redis cache (options, prefix and
        timeout kept); another backend becomes Django's RedisCache keeping KEY_PREFIX and
        TIMEOUT, with an override line; other caches are untouched."""
        base = self.app / "mysite" / "settings" / "base.py"
        text = base.read_text()
        base.write_text(text + "CACHES = {'default': {'BACKEND': 'django_redis.cache.RedisCache',"
                        " 'LOCATION': 'redis://localhost', 'KEY_PREFIX': 'shop', 'TIMEOUT': 60,"
                        " 'OPTIONS': {'CLIENT_CLASS': 'x.Client'}}, 'local': {'BACKEND': 'l'}}\n")
        s = self.probe(REDIS_URL="redis://:pw@10.0.0.5:6380/0")
        self.assertEqual(s["CACHES"], {
            "default": {"BACKEND": "django_redis.cache.RedisCache",
                        "LOCATION": "redis://:pw@10.0.0.5:6380/0", "KEY_PREFIX": "shop",
                        "TIMEOUT": 60, "OPTIONS": {"CLIENT_CLASS": "x.Client"}},
            "local": {"BACKEND": "l"}})
        self.assertEqual(s["overrides"], [])
        base.write_text(text + "CACHES = {'default': {'BACKEND': "
                        "'django.core.cache.backends.locmem.LocMemCache', 'KEY_PREFIX': 'shop',"
                        " 'TIMEOUT': 60, 'OPTIONS': {'MAX_ENTRIES': 5}}}\n")
        s = self.probe(REDIS_URL="redis://:pw@h:1/0")
        self.assertEqual(s["CACHES"]["default"], {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": "redis://:pw@h:1/0", "KEY_PREFIX": "shop", "TIMEOUT": 60})
        self.assertIn("BACKEND 'django.core.cache.backends.locmem.LocMemCache' -> Django's "
                      "RedisCache", s["overrides"][0])

    def test_django_errors_are_logged_to_stderr(self) -> None:
        """Without logging of its own for django.request the app gets an ERROR stderr
        handler there (500s appear in epio logs); an app that configures the django
        logger itself keeps exactly its own."""
        s = self.probe()
        self.assertEqual(s["LOGGING"]["loggers"]["django.request"],
                         {"handlers": ["epio_stderr"], "level": "ERROR"})
        self.assertEqual(s["LOGGING"]["handlers"]["epio_stderr"]["class"],
                         "logging.StreamHandler")
        base = self.app / "mysite" / "settings" / "base.py"
        own = {"version": 1, "loggers": {"django": {"handlers": [], "level": "WARNING"}}}
        base.write_text(base.read_text() + f"LOGGING = {own!r}\n")
        self.assertEqual(self.probe()["LOGGING"], own)

    def test_settings_module_config_var(self) -> None:
        """EPIO_APP_SETTINGS_MODULE (the runner's name for a DJANGO_SETTINGS_MODULE config
        var) picks the app's module; the platform values still apply on top."""
        (self.app / "mysite" / "settings" / "production.py").write_text(
            "from .base import *\nPROD = True\nDEBUG = False\n")
        s = self.probe(EPIO_APP_SETTINGS_MODULE="mysite.settings.production",
                       SECRET_KEY="from-config")
        self.assertEqual((s["PROD"], s["SECRET_KEY"]), (True, "from-config"))
        self.assertNotIn("FROM_LOCAL", s)  # not the package's __init__

    def test_platform_values(self) -> None:
        """DATABASE_URL, REDIS_URL, EPIO_HOSTNAMES and SECRET_KEY are applied on top."""
        s = self.probe(
            DATABASE_URL="postgres://app1:p%40ss@db.internal:5433/app1db?sslmode=require",
            REDIS_URL="redis://:pw@10.0.0.5:6380/0",
            EPIO_HOSTNAMES="app1.example.com, www.app1.test",
            SECRET_KEY="from-config",
        )
        self.assertEqual(
            s["DATABASES"]["default"],
            {
                "ENGINE": "django.db.backends.postgresql",
                "NAME": "app1db",
                "USER": "app1",
                "PASSWORD": "p@ss",
                "HOST": "db.internal",
                "PORT": "5433",
                "CONN_MAX_AGE": 60,
                "OPTIONS": {"sslmode": "require"},
            },
        )
        self.assertEqual(s["DATABASES"]["other"], {"ENGINE": "x"})
        self.assertEqual(s["CACHES"]["default"]["LOCATION"], "redis://:pw@10.0.0.5:6380/0")
        self.assertEqual(
            s["ALLOWED_HOSTS"][:3], ["mine.example", "app1.example.com", "www.app1.test"]
        )
        self.assertEqual(s["SECRET_KEY"], "from-config")

    def test_bundle_config(self) -> None:
        """ep.io's bundle_config exposes data_directory and the database/redis credentials."""
        (self.sp / "bundle_config.py").write_text(plat.bundle_config_source("/data"))
        out = subprocess.run(
            [sys.executable, "-c", "import json, bundle_config as b; print(json.dumps(b.config))"],
            env={
                "PYTHONPATH": str(self.sp),
                "DATABASE_URL": "postgres://u:pw@h:5432/d",
                "REDIS_URL": "redis://:rp@rh:6379",
            },
            capture_output=True,
            text=True,
            check=True,
        )
        cfg = json.loads(out.stdout)
        self.assertEqual(cfg["core"]["data_directory"], "/data")
        self.assertEqual(
            cfg["postgres"],
            {"host": "h", "port": 5432, "username": "u", "password": "pw", "database": "d"},
        )
        self.assertEqual(cfg["redis"], {"host": "rh", "port": 6379, "password": "rp"})


class DetectTests(SynchronousTestCase):
    def test_detect_settings_module(self) -> None:
        """manage.py's DJANGO_SETTINGS_MODULE wins; else settings.py / <pkg>/settings."""
        d = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, d)
        (d / "proj" / "settings").mkdir(parents=True)
        (d / "proj" / "settings" / "__init__.py").write_text("")
        self.assertEqual(plat.detect_settings_module(d, ""), "proj.settings")
        (d / "manage.py").write_text(
            'os.environ.setdefault("DJANGO_SETTINGS_MODULE", "proj.settings.prod")\n'
        )
        self.assertEqual(plat.detect_settings_module(d, ""), "proj.settings.prod")
        (d / "old").mkdir()
        (d / "old" / "settings.py").write_text("")
        self.assertEqual(plat.detect_settings_module(d, "old"), "proj.settings.prod")
        (d / "manage.py").unlink()
        self.assertEqual(plat.detect_settings_module(d, "old"), "settings")


class RelocateTests(SynchronousTestCase):
    def test_scripts_and_records(self) -> None:
        """Console scripts get the /bin/sh polyglot header, run from anywhere, and RECORD
        hashes follow; activate scripts are dropped."""
        d = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, d)
        venv = d / "venv"
        (venv / "bin").mkdir(parents=True)
        sp = venv / "lib/python3.11/site-packages"
        (sp / "tool-1.0.dist-info").mkdir(parents=True)
        os.symlink(sys.executable, venv / "bin" / "python")
        (venv / "bin" / "tool").write_text(
            f"#!{venv}/bin/python\nimport sys\nprint('tool ran', sys.argv[1:])\n"
        )
        (venv / "bin" / "activate").write_text(f"VIRTUAL_ENV={venv}\n")
        (sp / "tool-1.0.dist-info" / "RECORD").write_text(
            "../../../bin/tool,sha256=old,10\ntool/__init__.py,,\n"
        )
        self.assertEqual(plat.relocate_scripts(venv / "bin", str(venv)), 1)
        plat.fix_records(venv)
        self.assertFalse((venv / "bin" / "activate").exists())
        moved = d / "elsewhere"
        os.rename(venv, moved)
        out = subprocess.run(
            [str(moved / "bin" / "tool"), "a b"], capture_output=True, text=True, check=True
        )
        self.assertEqual(out.stdout, "tool ran ['a b']\n")
        data = (moved / "bin" / "tool").read_bytes()
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record = (moved / "lib/python3.11/site-packages/tool-1.0.dist-info/RECORD").read_text()
        self.assertIn(f"../../../bin/tool,sha256={digest},{len(data)}", record)
