"""Seed a node's SQLite store with a release on a prepared image (no build needed).

``python -m tests.integration.run.seed STORE_URL APP DIGEST`` creates a release of
APP on image DIGEST (a directory image the test made in the node's data dir with
:func:`tests.integration.runner.helpers.make_image`) through the Store API.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.internet import task


async def seed(reactor: Any, url: str, app: str, digest: str) -> None:
    from epio.store import open_store

    store = await open_store(url, reactor)
    try:
        await store.create_release(app, digest, processes={}, description="seeded image",
                                   created_by="test")
    finally:
        await store.close()


def main(reactor: Any, url: str, app: str, digest: str) -> Any:
    from twisted.internet.defer import ensureDeferred

    return ensureDeferred(seed(reactor, url, app, digest))


if __name__ == "__main__":
    task.react(main, sys.argv[1:4])
