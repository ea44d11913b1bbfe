"""First start: the admin user and its 0600 token file; ``epio-admin token create``."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from epio.admin import AdminError, mint_admin_token, store_url
from epio.api.domain import ensure_admin, write_token_file
from epio.config import load_config
from epio.store import open_store
from tests.store import pg


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


class WriteTokenFileTests(TestCase):
    def test_planted_symlinks_are_never_followed(self) -> None:
        """A data dir owned by another user, with symlinks planted at every plausible
        temporary name (and at the final name) pointing at a file outside: the token
        file is written as a regular 0600 file owned by the data dir's owner, and the
        symlinks' target keeps its content, mode and owner."""
        tmp = Path(tempfile.mkdtemp(prefix="epio-admin-"))
        self.addCleanup(shutil.rmtree, tmp, True)
        data = tmp / "data"
        data.mkdir()
        target = tmp / "shadow"
        target.write_text("root:secret\n")
        target.chmod(0o644)
        before = target.stat()
        pid = os.getpid()
        planted = [f".admin-token.{pid}", f".admin-token.{pid}.tmp", ".admin-token.tmp",
                   "admin-token.tmp", ".admin-token", f".admin-token.{pid + 1}",
                   "admin-token"]
        for name in planted:
            (data / name).symlink_to(target)
        if os.geteuid() == 0:
            os.chown(data, 65534, 65534)
        path = write_token_file(data, "tok-123")
        self.assertEqual(target.read_text(), "root:secret\n")
        after = target.stat()
        self.assertEqual((after.st_mode, after.st_uid, after.st_gid),
                         (before.st_mode, before.st_uid, before.st_gid))
        self.assertFalse(path.is_symlink())
        self.assertEqual(path.read_text(), "tok-123\n")
        st = path.lstat()
        self.assertEqual(stat.S_IMODE(st.st_mode), 0o600)
        if os.geteuid() == 0:
            self.assertEqual((st.st_uid, st.st_gid), (65534, 65534))
        for name in planted[:-1]:
            self.assertTrue((data / name).is_symlink())


class MintAdminTokenTests:
    """``epio-admin token create``'s work, on a real store (both backends)."""

    def url(self, tmp: Path) -> str:
        raise NotImplementedError

    async def open(self) -> tuple[Any, Path]:
        tmp = Path(tempfile.mkdtemp(prefix="epio-admin-"))
        self.addCleanup(shutil.rmtree, tmp, True)  # type: ignore[attr-defined]
        store = await open_store(self.url(tmp), reactor)
        self.addCleanup(store.close)  # type: ignore[attr-defined]
        return store, tmp

    async def test_mints_for_locked_out_admin(self) -> None:
        """With the admin's token file gone, a minted token authenticates the admin,
        lands in a 0600 file, and is audited in its stored description (who, where);
        the old token keeps working (nothing else changes)."""
        store, tmp = await self.open()
        await ensure_admin(store, tmp)
        old = (tmp / "admin-token").read_text().strip()
        (tmp / "admin-token").unlink()
        minted = await mint_admin_token(store, tmp, None)
        self.assertEqual(minted.path, tmp / "admin-token")
        self.assertEqual(stat.S_IMODE(minted.path.stat().st_mode), 0o600)
        token = minted.path.read_text().strip()
        self.assertNotEqual(token, old)
        user = await store.user_for_token(token)
        assert user is not None
        self.assertEqual((user.name, user.is_admin, minted.created_user), ("admin", True, False))
        infos = await store.list_tokens(user.id)
        mine = next(i for i in infos if i.id == minted.token_id)
        self.assertIn("epio-admin", mine.description)
        self.assertIn(socket.gethostname(), mine.description)
        self.assertNotIn(token, repr(minted))
        self.assertIsNotNone(await store.user_for_token(old))
        self.assertEqual([p.name for p in tmp.iterdir() if p.name.startswith(".")], [])

    async def test_recreates_admin_and_refuses_non_admin(self) -> None:
        """On a store without the default admin, it is created again; naming a user
        who is not an admin, or nobody, is refused and writes no file."""
        store, tmp = await self.open()
        await store.create_user("alice")
        with self.assertRaises(AdminError) as cm:
            await mint_admin_token(store, tmp, "alice")
        self.assertIn("not an admin", str(cm.exception))
        with self.assertRaises(AdminError):
            await mint_admin_token(store, tmp, "nobody")
        self.assertFalse((tmp / "admin-token").exists())
        minted = await mint_admin_token(store, tmp, None)
        self.assertTrue(minted.created_user)
        user = await store.user_for_token(minted.path.read_text().strip())
        assert user is not None
        self.assertTrue(user.is_admin)


class MintSqliteTests(MintAdminTokenTests, TestCase):
    def url(self, tmp: Path) -> str:
        return f"sqlite:///{tmp / 's.db'}"


class MintPostgresTests(MintAdminTokenTests, TestCase):
    def url(self, tmp: Path) -> str:
        return pg.pg_url_for_test(self)


class StoreUrlTests(TestCase):
    def test_missing_sqlite_store_refused(self) -> None:
        """A data dir without a store (a mistyped --data-dir) is refused, never given a
        fresh empty store."""
        tmp = Path(tempfile.mkdtemp(prefix="epio-admin-"))
        self.addCleanup(shutil.rmtree, tmp, True)
        with self.assertRaises(AdminError) as cm:
            store_url(load_config(None, {"node": {"data_dir": str(tmp)}}), tmp)
        self.assertIn("no store at", str(cm.exception))
        self.assertEqual(list(tmp.iterdir()), [])
