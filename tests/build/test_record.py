"""A build's outcome is recorded on its deploy in the store (SQLite)."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from epio.manifest import parse_manifest
from epio.runner.build import BuildFailed, BuildResult, record_build
from epio.store import StoreService


class RecordBuildTests(TestCase):
    async def _store(self):  # type: ignore[no-untyped-def]
        svc = StoreService(f"sqlite:///{self.mktemp()}.sqlite3", reactor=reactor)
        svc.startService()
        self.addCleanup(svc.stopService)
        store = await svc.whenReady()
        user = await store.create_user("alice")
        await store.create_app("hello", user.id)
        return store

    async def test_success_records_digest_and_manifest(self) -> None:
        """A built image's digest, manifest and facts land on the deploy, status built."""
        store = await self._store()
        deploy = await store.create_deploy("hello")  # an upload starts pending
        deploy = await store.update_deploy(deploy.id, status="building")
        manifest = parse_manifest("[wsgi]\nentrypoint = app:application\n", None, [])
        result = BuildResult(
            "a" * 64, manifest, ["-----> Building hello", "done"], 1.5, {"workdir": "app"}
        )
        d = await record_build(store, deploy.id, result)
        self.assertEqual((d.status, d.image), ("built", "a" * 64))
        self.assertEqual(d.meta["manifest"], manifest.to_dict())
        self.assertEqual(d.meta["build"], {"workdir": "app"})
        self.assertIn("done\n", (await store.get_deploy(deploy.id)).log)

    async def test_failure_records_reason_and_log(self) -> None:
        """A failed build marks the deploy failed with the reason and the log tail."""
        store = await self._store()
        deploy = await store.create_deploy("hello")  # an upload starts pending
        deploy = await store.update_deploy(deploy.id, status="building")
        d = await record_build(
            store, deploy.id, BuildFailed("pip wheel failed (exit status 1)", ["ERROR: nope"])
        )
        self.assertEqual(d.status, "failed")
        self.assertEqual(d.reason, "pip wheel failed (exit status 1)")
        self.assertIn("ERROR: nope", d.log)
        self.assertIsNotNone(d.finished)


class StoreGcTests(TestCase):
    async def test_gc_against_store_releases(self) -> None:
        """Images of each app's newest N releases survive; older and orphaned ones go."""
        import os
        import tempfile
        from pathlib import Path

        from epio.runner.build import ImageStore, collect_garbage

        svc = StoreService(f"sqlite:///{self.mktemp()}.sqlite3", reactor=reactor)
        svc.startService()
        self.addCleanup(svc.stopService)
        store = await svc.whenReady()
        user = await store.create_user("bob")
        await store.create_app("app1", user.id)
        images = ImageStore(Path(tempfile.mkdtemp()), reactor)
        self.addCleanup(__import__("shutil").rmtree, images.data_dir)

        def image(content: bytes) -> str:
            f = images.data_dir / "tmp.img"
            f.write_bytes(content)
            return images.add_squashfs(f)

        v1, v2, v3, orphan = (image(b) for b in (b"one", b"two", b"three", b"orphan"))
        for d in (v1, v2, v3):
            await store.create_release("app1", d)
        later = os.stat(images.path(v1)).st_mtime + 10_000
        removed = await collect_garbage(store, images, 2, grace=3600, now=later)
        self.assertEqual(sorted(removed), sorted([v1, orphan]))
        self.assertEqual(images.digests(), {v2, v3})
