"""Small bus/store tools for the nexus integration tests (run as subprocesses).

``python tool.py create-app STORE_URL APP``
    creates a user, APP and its release 1 (the release the stand-in runners
    announce: the nexus routes only releases whose options it read) in the store.
``python tool.py ask SECRET_FILE ROUTER_ENDPOINT TYPE [JSON_BODY]``
    sends one request to a nexus and prints the reply body as JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from twisted.internet import defer, task


async def create_app(reactor: Any, url: str, app: str) -> None:
    from epio.store import open_store

    store = await open_store(url, reactor)
    try:
        user = await store.create_user("nexus-test")
        await store.create_app(app, user.id)
        await store.create_release(app, processes={"web": "serve"})
    finally:
        await store.close()


async def ask(reactor: Any, secret_file: str, endpoint: str, type: str, body: str) -> None:
    from epio.bus import Bus

    secret = bytes.fromhex(Path(secret_file).read_text().strip())
    bus = Bus(reactor, secret, "nexus-test-tool")
    dealer = bus.dealer([endpoint])
    dealer.startService()
    try:
        reply = await dealer.request(type, json.loads(body), timeout=5.0)
        print(json.dumps({"type": reply.type, "body": reply.body}))
    finally:
        dealer.stopService()


def main(reactor: Any) -> Any:
    cmd, *args = sys.argv[1:]
    if cmd == "create-app":
        return defer.Deferred.fromCoroutine(create_app(reactor, *args))
    if cmd == "ask":
        body = args[3] if len(args) > 3 else "{}"
        return defer.Deferred.fromCoroutine(ask(reactor, args[0], args[1], args[2], body))
    raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    task.react(main)
