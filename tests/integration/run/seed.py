"""Reach a node's store from a test through the Store API (no build, no SQL).

``python -m tests.integration.run.seed STORE_URL APP DIGEST`` creates a release of
APP on image DIGEST (a directory image the test made in the runner's data dir with
:func:`tests.integration.runner.helpers.make_image`);
``python -m tests.integration.run.seed STORE_URL APP --runs`` prints the app's
run-session audit as JSON.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from twisted.internet import task


async def seed(reactor: Any, url: str, app: str, digest: str) -> None:
    from epio.store import open_store

    store = await open_store(url, reactor)
    try:
        if digest == "--runs":
            from epio.store.runs import list_runs

            print(json.dumps([r.to_json() for r in await list_runs(store, app)]))
            return
        await store.create_release(app, digest, processes={}, description="seeded image",
                                   created_by="test")
    finally:
        await store.close()


def main(reactor: Any, url: str, app: str, digest: str) -> Any:
    from twisted.internet.defer import ensureDeferred

    return ensureDeferred(seed(reactor, url, app, digest))


if __name__ == "__main__":
    task.react(main, sys.argv[1:4])
