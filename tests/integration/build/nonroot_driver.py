"""Run one build as a non-root node would (used by test_nonroot.py as another user).

python nonroot_driver.py APP_DIR DATA_DIR  -> prints one JSON line
"""

import json
import sys
from pathlib import Path

from twisted.internet import defer, task


async def main(reactor, app_dir, data_dir, cfg):  # type: ignore[no-untyped-def]
    from epio.appdir import make_tarball
    from epio.config import validate
    from epio.pipeline import MemoryLogSink
    from epio.runner.build import Builder, BuildFailed

    Path(data_dir).mkdir(mode=0o711, exist_ok=True)
    sink = MemoryLogSink()
    b = Builder(reactor, Path(data_dir), validate({"build": cfg}).settings.build, sink)
    tb = make_tarball(app_dir, Path(data_dir) / "upload.tar.gz")
    try:
        r = await b.build("nonroot", tb, {})
        out = {
            "digest": r.digest,
            "format": b.images.format(r.digest),
            "path": str(b.images.path(r.digest)),
        }
    except BuildFailed as e:
        out = {"failed": e.reason}
    out["log"] = [rec.text for rec in sink.lines]
    print(json.dumps(out))


if __name__ == "__main__":
    task.react(
        lambda r: defer.Deferred.fromCoroutine(
            main(r, sys.argv[1], sys.argv[2], json.loads(sys.argv[3]) if len(sys.argv) > 3 else {})
        )
    )
