"""The api reads an upload's [services] before its build (epio.api.upload)."""

from __future__ import annotations

import io
import tarfile

from twisted.trial.unittest import SynchronousTestCase

from epio.api.upload import MANIFEST_MAX_BYTES, manifest_of_upload

INI = b"[wsgi]\nentrypoint = app:app\n\n[services]\npostgres = true\nredis = true\n\n" \
      b"[redis]\nmemory = 16\n"


def tarball(files: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return out.getvalue()


class ManifestOfUploadTests(SynchronousTestCase):
    def test_services_and_redis_memory_are_read(self) -> None:
        """epio.ini at the root (with or without ./) gives [services] and [redis] memory;
        a Procfile alone works too."""
        for name in ("epio.ini", "./epio.ini"):
            m = manifest_of_upload(tarball({"app.py": b"", name: INI}))
            assert m is not None
            self.assertEqual(m["services"], {"postgres": "shared", "redis": "dedicated"})
            self.assertEqual(m["redis_memory_mb"], 16)
        m = manifest_of_upload(tarball({"Procfile": b"web: gunicorn app:app\n"}))
        assert m is not None
        self.assertEqual(m["services"], {})

    def test_anything_odd_reads_nothing(self) -> None:
        """Not a tarball, no manifest, a symlinked or oversized epio.ini, one in a
        subdirectory only, or a manifest error: None (the build reports the problem)."""
        self.assertIsNone(manifest_of_upload(b"not a tarball"))
        self.assertIsNone(manifest_of_upload(tarball({"app.py": b""})))
        self.assertIsNone(manifest_of_upload(tarball({}, {"epio.ini": "/etc/passwd"})))
        self.assertIsNone(manifest_of_upload(tarball({"sub/epio.ini": INI})))
        self.assertIsNone(manifest_of_upload(
            tarball({"epio.ini": INI + b"#" * MANIFEST_MAX_BYTES})))
        self.assertIsNone(manifest_of_upload(tarball({"epio.ini": b"[services]\nmysql = 1\n"})))
        self.assertIsNone(manifest_of_upload(tarball({"epio.ini": b"\xff\xfe"})))
