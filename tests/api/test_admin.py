"""First start: the admin user and its 0600 token file."""

from __future__ import annotations

import shutil
import stat
import tempfile
from pathlib import Path

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from epio.api.domain import ensure_admin
from epio.store import open_store


class EnsureAdminTests(TestCase):
    async def test_creates_once(self) -> None:
        """An empty store gets an admin whose token (in a 0600 file) authenticates; a
        second start changes nothing."""
        tmp = Path(tempfile.mkdtemp(prefix="epio-admin-"))
        self.addCleanup(shutil.rmtree, tmp, True)
        store = await open_store(f"sqlite:///{tmp / 's.db'}", reactor)
        try:
            path = await ensure_admin(store, tmp)
            self.assertEqual(path, tmp / "admin-token")
            assert path is not None
            self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)
            user = await store.user_for_token(path.read_text().strip())
            assert user is not None
            self.assertEqual((user.name, user.is_admin), ("admin", True))
            before = path.read_text()
            self.assertIsNone(await ensure_admin(store, tmp))
            self.assertEqual(path.read_text(), before)
            self.assertEqual([p.name for p in tmp.iterdir() if p.name.startswith(".")], [])
        finally:
            await store.close()
