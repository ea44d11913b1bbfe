"""The backup catalog on real files, and checksums computed off the reactor thread."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from epio.backup.catalog import BackupNotFound, BackupRecord, Catalog
from epio.backup.service import BackupManager
from epio.retention import RetentionPolicy


def record(app: str, id: str, created: float, kind: str = "postgres") -> BackupRecord:
    return BackupRecord(id=id, app=app, kind=kind, created=created, status="verified")


class CatalogTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.catalog = Catalog(Path(self.mktemp()))
        for r in (record("shop", "1-a", 1.0), record("shop", "2-b", 2.0, "redis"),
                  record("blog", "3-c", 3.0)):
            self.catalog.create(r)

    def test_get_reads_the_apps_directory_only(self) -> None:
        """get(id, app) finds the app's backup (any kind) from its own directory; another
        app's id, a path-like or glob-like id is not found; a record lying in another
        app's directory is not taken for this app's."""
        self.assertEqual(self.catalog.get("2-b", "shop").kind, "redis")
        self.assertEqual(self.catalog.get("3-c").app, "blog")
        for bad_id, app in (("3-c", "shop"), ("*", "shop"), ("../blog", "shop"),
                            ("1-a", "*"), ("1-a", "../shop")):
            with self.assertRaises(BackupNotFound):
                self.catalog.get(bad_id, app)
        stray = self.catalog.root / "blog" / "postgres" / "9-z"
        stray.mkdir()
        (stray / "meta.json").write_text(json.dumps(record("shop", "9-z", 9.0).to_json()))
        with self.assertRaises(BackupNotFound):
            self.catalog.get("9-z", "shop")
        self.assertEqual([r.id for r in self.catalog.list("shop")], ["2-b", "1-a"])
        self.assertEqual([r.id for r in self.catalog.list("shop", "postgres")], ["1-a"])
        self.assertEqual(self.catalog.list("*"), [])

    def test_read_chunk_does_not_scan_other_apps(self) -> None:
        """A download chunk of one app's backup reads that app's directory only: other
        apps' catalogs (here unreadable garbage) do not slow or break it."""
        manager = BackupManager(reactor, self.catalog, RetentionPolicy(1, 1, 1, 1, 60.0),
                                None, None)
        r = self.catalog.get("1-a", "shop")
        self.catalog.data_path(r).write_bytes(b"0123456789")
        other = self.catalog.root / "blog" / "postgres"
        for i in range(50):
            (other / f"x{i}").mkdir()
            (other / f"x{i}" / "meta.json").write_text("{not json")
        reads: list[str] = []
        real_read = Catalog._read

        def counting(catalog: Catalog, meta: Path) -> BackupRecord | None:
            reads.append(str(meta.relative_to(catalog.root)))
            return real_read(catalog, meta)

        self.catalog._read = counting.__get__(self.catalog)  # type: ignore[method-assign]
        chunk = manager.read_chunk("shop", "1-a", 4, 3)
        self.assertEqual((chunk["data"], chunk["size"], chunk["eof"]), (b"456", 10, False))
        self.assertEqual(reads, ["shop/postgres/1-a/meta.json"])


class ChecksumThreadTests(TestCase):
    timeout = 20

    async def test_sha256_runs_off_the_reactor_thread(self) -> None:
        """The checksum reads the file in a thread: here a FIFO whose data the reactor
        itself writes only later, which a hash on the reactor thread would wait for
        forever (a fallback thread then writes other data, so the test fails, not hangs)."""
        fifo = Path(self.mktemp())
        os.mkfifo(fifo)
        manager = BackupManager(reactor, Catalog(Path(self.mktemp())),
                                RetentionPolicy(1, 1, 1, 1, 60.0), None, None)

        def write(data: bytes) -> None:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # the reader is there
            os.write(fd, data)
            os.close(fd)

        fallback = threading.Timer(5.0, lambda: write(b"too late"))
        self.addCleanup(fallback.cancel)
        fallback.start()

        def from_reactor(tries: int = 40) -> None:
            try:
                write(b"from the reactor")
            except OSError:  # no reader yet (a busy machine): try again a little later
                if tries:
                    reactor.callLater(0.1, from_reactor, tries - 1)

        reactor.callLater(0.3, from_reactor)
        digest = await manager._sha256(fifo)
        fallback.cancel()
        self.assertEqual(digest, hashlib.sha256(b"from the reactor").hexdigest())
