"""Images move between runners over the real bus, verified against their digest."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from attrs import frozen
from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from epio.bus import Bus
from epio.runner.build.images import ImageStore, tree_digest
from epio.runner.images import FetchError, FetchingImages, ImageServer
from epio.runner.ports import PortAllocator
from epio.runner.service import RunnerService
from epio.runner.supervisor import Settings, Supervisor
from tests.util import free_port

SECRET = b"f" * 32


@frozen
class Env:
    type: str
    body: dict[str, Any]


def image_tree(root: Path) -> Path:
    (root / "app").mkdir(parents=True)
    (root / "venv").mkdir()
    (root / "epio").mkdir()
    (root / "app" / "app.py").write_text("print('hi')\n")
    (root / "app" / "blob.bin").write_bytes(os.urandom(300_000))
    (root / "epio" / "manifest.json").write_text("{}")
    return root


class FetchTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        base = Path(self.mktemp())
        self.a = ImageStore(base / "a", reactor)
        self.b = ImageStore(base / "b", reactor)
        self.server = ImageServer(reactor, self.a, chunk_bytes=64 * 1024)
        self.addCleanup(self.server.close)
        sup = Supervisor(reactor, None, None, None,
                         PortAllocator(20000, 20001, lambda p: True), Settings())
        svc = RunnerService(reactor=reactor, supervisor=sup,
                            isolation=None, cgroups=None, images=self.a,  # type: ignore[arg-type]
                            data_dir=base / "a", node_id="a", boot_id="x",
                            image_server=self.server)
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        bus = Bus(reactor, SECRET, "a")
        router = bus.router(self.endpoint, svc.handle)
        router.startService()
        self.addCleanup(router.stopService)
        client = Bus(reactor, SECRET, "b")
        self.dealer = client.dealer([self.endpoint])
        self.dealer.startService()
        self.addCleanup(self.dealer.stopService)
        self.base = base

    async def request(self, endpoint: str, type: str, body: dict[str, Any],
                      timeout: float) -> dict[str, Any]:
        env = await self.dealer.request(type, body, timeout=timeout)
        return dict(env.body)

    def fetching(self, peers: list[str]) -> FetchingImages:
        async def endpoints() -> list[str]:
            return peers

        return FetchingImages(reactor, self.b, endpoints, self.request, timeout=10)

    async def test_squashfs_and_directory_images_are_fetched_and_verified(self) -> None:
        """A runner lacking an image gets it from a peer in chunks (SquashFS file and
        directory image) and installs it under the same digest; concurrent waiters share
        one transfer."""
        tree = image_tree(self.base / "t1")
        sq = self.base / "img.squashfs"
        subprocess.run(["mksquashfs", str(tree), str(sq), "-quiet", "-noappend"], check=True)
        sq_digest = self.a.add_squashfs(sq)
        dir_digest = self.a.add_tree(image_tree(self.base / "t2"))
        f = self.fetching([self.endpoint])
        await f.fetch(sq_digest)
        self.assertEqual(self.b.path(sq_digest).read_bytes(), self.a.path(sq_digest).read_bytes())
        self.assertTrue(self.b.verify(sq_digest))
        d1, d2 = f.fetch(dir_digest), f.fetch(dir_digest)
        await d1
        await d2
        self.assertEqual(tree_digest(self.b.path(dir_digest)), dir_digest)
        self.assertGreater(self.server.served_bytes, 2 * 300_000)

    async def test_missing_everywhere_is_a_clear_error(self) -> None:
        """No peer has the image: FetchError names the digest and what each peer said."""
        f = self.fetching([self.endpoint])
        digest = "cd" * 32
        with self.assertRaises(FetchError) as cm:
            await f.fetch(digest)
        self.assertIn(digest, str(cm.exception))
        self.assertIn(self.endpoint, str(cm.exception))
        self.assertFalse(self.b.has(digest))
        with self.assertRaises(FetchError):
            await self.fetching([]).fetch(digest)

    async def test_wrong_bytes_are_rejected(self) -> None:
        """A peer serving other bytes under a digest cannot plant an image."""
        tree = image_tree(self.base / "t3")
        sq = self.base / "img3.squashfs"
        subprocess.run(["mksquashfs", str(tree), str(sq), "-quiet", "-noappend"], check=True)
        real = self.a.add_squashfs(sq)
        fake = "ef" * 32
        os.replace(self.a.path(real), self.a.images_dir / f"{fake}.squashfs")
        with self.assertRaises(FetchError):
            await self.fetching([self.endpoint]).fetch(fake)
        self.assertFalse(self.b.has(fake))
        self.assertEqual([p.name for p in self.b.images_dir.iterdir()], [])
