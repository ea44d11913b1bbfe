"""A separate OS process that takes a store lock and holds it until killed.

Usage: python lock_holder.py STORE_URL LOCK_NAME

Prints ``WAITING`` after its first failed attempt, ``ACQUIRED <pid>`` once it
holds the lock, ``LOST`` if it loses it; then keeps holding until killed.
"""

from __future__ import annotations

import sys

from twisted.internet import defer, task


async def main(reactor: object, url: str, name: str) -> None:
    from epio.store.service import make_backend

    lock = make_backend(url, reactor).lock(name)
    if not await lock.acquire(block=False):
        print("WAITING", flush=True)
        await lock.acquire(block=True)
    print(f"ACQUIRED {__import__('os').getpid()}", flush=True)
    lock.when_lost().addCallback(lambda _: print("LOST", flush=True))
    await defer.Deferred()  # hold forever


if __name__ == "__main__":
    task.react(lambda r: defer.ensureDeferred(main(r, sys.argv[1], sys.argv[2])))
