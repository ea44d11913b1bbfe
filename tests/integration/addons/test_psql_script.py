"""``epio psql``'s script (what the ``epio run`` session executes in the sandbox), run by
the real /bin/sh with the host's real psql against the machine's PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import time

from twisted.trial.unittest import SynchronousTestCase

from epio.cli.addons import PSQL

PASSWORD = "s3cr@t'w\\rd% x"
ENCODED = "s3cr%40t%27w%5Crd%25%20x"  # as the add-on code writes it (quote(safe=''))


class PsqlScriptTests(SynchronousTestCase):
    def run_psql(self, url: str | None, *args: str) -> subprocess.Popen[bytes]:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        if url is not None:
            env["DATABASE_URL"] = url
        proc = subprocess.Popen(["/bin/sh", "-c", PSQL, "psql", *args], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        return proc

    def test_password_not_in_psql_argv(self) -> None:
        """The running psql's /proc/PID/cmdline has the URL without the password; the
        decoded password is in its environment as PGPASSWORD (readable only by its own
        user), DATABASE_URL is not; psql connects and runs the extra arguments."""
        url = f"postgresql://postgres:{ENCODED}@127.0.0.1:5432/test?application_name=epsql"
        proc = self.run_psql(url, "-At", "-c", "SELECT pg_sleep(1.5), 'ok'")
        cmdline = b""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # sh execs psql in place: same pid
            try:
                cmdline = open(f"/proc/{proc.pid}/cmdline", "rb").read()
                environ = open(f"/proc/{proc.pid}/environ", "rb").read().split(b"\0")
            except OSError:
                break
            if cmdline.split(b"\0")[0].endswith(b"psql"):
                break
            time.sleep(0.02)
        argv = cmdline.split(b"\0")
        self.assertTrue(argv[0].endswith(b"psql"), argv)
        self.assertEqual(argv[1], b"postgresql://postgres@127.0.0.1:5432/test"
                                  b"?application_name=epsql")
        for secret in (b"s3cr", ENCODED.encode()):
            self.assertNotIn(secret, cmdline)
        self.assertIn(b"PGPASSWORD=" + PASSWORD.encode(), environ)
        self.assertFalse([e for e in environ if e.startswith(b"DATABASE_URL=")])
        out, err = proc.communicate(timeout=20)
        self.assertEqual((proc.returncode, out.strip()), (0, b"|ok"), err)

    def test_ipv6_url_without_password(self) -> None:
        """A URL without a password (and an IPv6 host) is passed on unchanged, with no
        PGPASSWORD."""
        proc = self.run_psql("postgresql://postgres@[::1]:5432/test", "-At", "-c",
                             "SELECT 2")
        out, err = proc.communicate(timeout=20)
        if proc.returncode != 0 and b"::1" in err:
            self.skipTest("PostgreSQL does not listen on ::1 here")
        self.assertEqual((proc.returncode, out.strip()), (0, b"2"), err)

    def test_no_database_url(self) -> None:
        """Without DATABASE_URL the script says how to get one and exits 1."""
        proc = self.run_psql(None)
        _, err = proc.communicate(timeout=20)
        self.assertEqual(proc.returncode, 1)
        self.assertIn(b"epio addons create postgres", err)
