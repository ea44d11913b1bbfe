"""What the api reads of an upload before its build: the manifest's ``[services]``.

Add-ons are provisioned *before* the build starts (docs/databases.md), so the build
(Django's ``collectstatic`` importing the app's settings, ``bundle_config``) and the
release phase see the same ``DATABASE_URL``/``REDIS_URL`` as the running app.  The
api therefore reads ``epio.ini`` and ``Procfile`` out of the uploaded tarball -- only
those two, only as regular files at the app's root, at most
:data:`MANIFEST_MAX_BYTES` each, scanning at most :data:`MAX_MEMBERS` entries -- and
parses them with the one manifest parser.  Anything odd (not a tarball, a symlinked
``epio.ini``, a manifest error) gives ``None``: nothing is provisioned early, and the
build reports the problem with ``file:line`` as it always does.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Mapping
from typing import Any

from epio.domain import UPLOAD_MAX_MEMBERS
from epio.manifest import INI_NAME, PROCFILE_NAME, ManifestError, parse_manifest

MANIFEST_MAX_BYTES = 1 << 20  # an epio.ini or Procfile larger than this is not read early
MAX_MEMBERS = UPLOAD_MAX_MEMBERS  # the unpacker's own limit (epio.runner.build.unpack)


def manifest_of_upload(tarball: bytes) -> Mapping[str, Any] | None:
    """The manifest (``Manifest.to_dict()``) of an upload, or None (see module doc).

    Blocking (it decompresses the stream): run it in a thread.
    """
    texts: dict[str, str] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(tarball), mode="r|*") as tar:
            for count, member in enumerate(tar):
                if count >= MAX_MEMBERS:
                    return None
                name = member.name.removeprefix("./")
                if name not in (INI_NAME, PROCFILE_NAME):
                    continue
                if not member.isfile() or member.size > MANIFEST_MAX_BYTES:
                    return None  # the build refuses or reports it
                f = tar.extractfile(member)
                if f is None:
                    return None
                texts[name] = f.read().decode("utf-8")
                if len(texts) == 2:
                    break
    except (tarfile.TarError, OSError, EOFError, UnicodeDecodeError):
        return None
    if not texts:
        return None
    try:
        manifest = parse_manifest(texts.get(INI_NAME), texts.get(PROCFILE_NAME))
    except ManifestError:
        return None
    return manifest.to_dict()
