"""A separate OS process that writes to a store as fast as it can.

Usage: python writer.py STORE_URL PREFIX N

Creates user PREFIX and N apps PREFIX-<i>, each with two releases, then prints
``DONE <seconds>``.
"""

from __future__ import annotations

import sys

from twisted.internet import defer, task


async def main(reactor: object, url: str, prefix: str, n: int) -> None:
    from epio.store import open_store

    store = await open_store(url, reactor)
    start = reactor.seconds()  # type: ignore[attr-defined]
    user = await store.create_user(prefix)
    for i in range(n):
        name = f"{prefix}-{i}"
        await store.create_app(name, user.id)
        await store.create_release(name, "c" * 64, processes={"web": "w"})
        await store.set_config_and_release(name, {"I": str(i)}, description="Set I")
    print(f"DONE {reactor.seconds() - start:.2f}", flush=True)  # type: ignore[attr-defined]
    await store.close()


if __name__ == "__main__":
    task.react(lambda r: defer.ensureDeferred(main(r, sys.argv[1], sys.argv[2], int(sys.argv[3]))))
