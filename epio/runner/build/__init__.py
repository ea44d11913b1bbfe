"""Builds: from an uploaded app directory to an immutable, content-addressed image.

Public API (the runner and the api use these names)::

    builder = Builder(reactor, data_dir, settings.build, log_sink, images=store)
    result = await builder.build(app, tarball_path, env)   # BuildResult or BuildFailed
    store = ImageStore(data_dir, reactor)
    store.has(digest); store.path(digest); await store.mount(digest); await store.unmount(digest)
    store.gc(keep_digests(releases, settings.build.keep_releases))

See docs/builds.md.
"""

from epio.runner.build.builder import Builder, BuildFailed, BuildResult, record_build
from epio.runner.build.images import (
    ImageError,
    ImageStore,
    ImageWriter,
    collect_garbage,
    keep_digests,
    tree_digest,
)
from epio.runner.build.unpack import UnpackError, safe_unpack

__all__ = [
    "BuildFailed",
    "BuildResult",
    "Builder",
    "ImageError",
    "ImageStore",
    "ImageWriter",
    "UnpackError",
    "collect_garbage",
    "keep_digests",
    "record_build",
    "safe_unpack",
    "tree_digest",
]
