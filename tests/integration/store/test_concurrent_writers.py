"""Several OS processes writing one store at once: no lost or failed writes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from epio.store import open_store
from tests.store import pg
from tests.util import epio_env

WRITER = Path(__file__).with_name("writer.py")
PROCS = 3
APPS = 20


class ConcurrentWritersMixin:
    def url(self) -> str:
        raise NotImplementedError

    async def test_processes_write_concurrently(self) -> None:
        """Three processes migrate and write the same (fresh) store at the same time:
        all succeed, every app exists once with a distinct UID and versions 1..2."""
        url = self.url()
        procs = [subprocess.Popen([sys.executable, str(WRITER), url, f"w{i}", str(APPS)],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  env=epio_env()) for i in range(PROCS)]
        outs = []
        for p in procs:
            try:
                out, _ = p.communicate(timeout=60)
            finally:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            outs.append(out.decode("utf-8", "replace"))
            self.assertEqual(p.returncode, 0, outs[-1])  # type: ignore[attr-defined]
            self.assertIn("DONE", outs[-1])  # type: ignore[attr-defined]
        store = await open_store(url, reactor)
        self.addCleanup(store.close)  # type: ignore[attr-defined]
        apps = await store.list_apps()
        self.assertEqual(len(apps), PROCS * APPS)  # type: ignore[attr-defined]
        self.assertEqual(len({a.uid for a in apps}), PROCS * APPS)  # type: ignore[attr-defined]
        for app in apps[:: APPS // 2]:
            rels = await store.list_releases(app.name)
            self.assertEqual([r.version for r in rels], [2, 1])  # type: ignore[attr-defined]
            self.assertIn("I", rels[0].config)  # type: ignore[attr-defined]


class SqliteConcurrentWritersTests(ConcurrentWritersMixin, TestCase):
    """One SQLite file shared by several processes on one box."""

    def url(self) -> str:
        return f"sqlite:///{self.mktemp()}/store.sqlite3"


class PostgresConcurrentWritersTests(ConcurrentWritersMixin, TestCase):
    """One PostgreSQL database written by several nodes."""

    def url(self) -> str:
        return pg.fresh_database_for_test(self)
