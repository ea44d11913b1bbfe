"""An ep.io-era Django app with no ``[wsgi] entrypoint`` builds and serves.

ep.io ran such an app through Django's own WSGI handler; epio's generated web
command is gunicorn with the factory ``django.core.wsgi:get_wsgi_application()``.
Real builds (directory images, the session's shared wheel cache: Django and
gunicorn at the example's pins), and each image's web command run exactly as the
runner runs it (``bash -c``, as an unprivileged user), answering through the
platform settings:

* a flat 2011-style project without a wsgi module (ep.io's case) -- always;
* a ``startproject`` layout with its own wsgi module (not used: the same command)
  -- a second Django build (~20 s), opt-in with EPIO_SLOW_TESTS=1 like
  examples/django's run test.
"""

from __future__ import annotations

import http.client
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from twisted.trial.unittest import SkipTest

from tests.util import free_port, wait_for_port

from .helpers import EXAMPLES, write_app
from .test_builds import _Base, _tarball

# the example's pins: a session that built examples/django has them in its cache
REQUIREMENTS = "\n".join(line for line in (EXAMPLES / "django" / "requirements.txt")
                         .read_text().splitlines() if line.startswith(("Django", "gunicorn")))
VIEW = ("from django.http import HttpResponse\n"
        "from django.urls import path\n"
        "def hello(request):\n"
        "    return HttpResponse('hello from %s' % __name__)\n"
        "urlpatterns = [path('', hello)]\n")
SETTINGS = ("SECRET_KEY = 'x'\nDEBUG = False\nROOT_URLCONF = '{urls}'\n"
            "INSTALLED_APPS = ['django.contrib.staticfiles']\nSTATIC_URL = '/static/'\n")
MANAGE = ("import os, sys\n"
          "os.environ.setdefault('DJANGO_SETTINGS_MODULE', '{settings}')\n"
          "from django.core.management import execute_from_command_line\n"
          "execute_from_command_line(sys.argv)\n")

APPS = {
    # 2011: manage.py, settings.py and urls.py side by side, no wsgi.py
    "flat": {
        "epio.ini": "[django]\nappend_settings = true\n",
        "manage.py": MANAGE.format(settings="settings"),
        "settings.py": SETTINGS.format(urls="urls"),
        "urls.py": VIEW,
    },
    # startproject: a package with its own wsgi module (which epio need not use)
    "package": {
        "epio.ini": "[django]\nbase = .\n",
        "manage.py": MANAGE.format(settings="mysite.settings"),
        "mysite/__init__.py": "",
        "mysite/settings.py": SETTINGS.format(urls="mysite.urls"),
        "mysite/urls.py": VIEW,
        "mysite/wsgi.py": ("import os\n"
                           "os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'mysite.settings')\n"
                           "from django.core.wsgi import get_wsgi_application\n"
                           "application = get_wsgi_application()\n"),
    },
}


class DjangoWithoutEntrypointTests(_Base):
    async def test_generated_web_command_serves_with_and_without_wsgi_module(self) -> None:
        """The project gets web = gunicorn with Django's WSGI factory (quoted for the
        shell), and run by bash as the runner does, answers its page through the
        platform settings (the app's hostname allowed); with EPIO_SLOW_TESTS=1 the
        startproject layout with its own wsgi module does too."""
        if os.geteuid() != 0:
            raise SkipTest("runs the app as an unprivileged user: needs root")
        b, _ = self.builder(image_format="dir")
        apps = APPS if os.environ.get("EPIO_SLOW_TESTS") else {"flat": APPS["flat"]}
        for name, files in apps.items():
            d = write_app(Path(tempfile.mkdtemp()), {**files,
                                                     "requirements.txt": REQUIREMENTS + "\n"})
            self.addCleanup(shutil.rmtree, d)
            result = await b.build(name, _tarball(self, d), {})
            web = result.manifest.processes["web"]
            self.assertEqual(web, "gunicorn --bind 0.0.0.0:$PORT "
                                  "'django.core.wsgi:get_wsgi_application()'")
            root = b.images.path(result.digest)
            port = free_port()
            env = {"PATH": f"{root}/venv/bin:/usr/bin:/bin", "HOME": "/tmp", "PORT": str(port),
                   "EPIO_HOSTNAMES": f"{name}.example.test", **result.facts["env"]}
            proc = subprocess.Popen(
                ["/usr/sbin/runuser", "-u", "nobody", "--", "/bin/bash", "-c",
                 web.replace("0.0.0.0", "127.0.0.1")],
                cwd=root / result.facts["workdir"], env=env, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, start_new_session=True)
            self.addCleanup(lambda p=proc: (os.killpg(p.pid, 9), p.wait()))
            try:
                wait_for_port("127.0.0.1", port, timeout=30)
            except TimeoutError:
                os.killpg(proc.pid, 9)
                self.fail(f"{name}: gunicorn did not listen:\n"
                          f"{proc.communicate(timeout=10)[0].decode()}")
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/", headers={"Host": f"{name}.example.test"})
            resp = conn.getresponse()
            body = resp.read().decode()
            conn.close()
            self.assertEqual((resp.status, body),
                             (200, "hello from " + ("urls" if name == "flat" else "mysite.urls")))
