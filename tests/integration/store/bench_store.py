"""Store throughput on both backends (run by hand, not a test).

    python tests/integration/store/bench_store.py

Sequential awaits of real domain calls in one process; PostgreSQL uses a fresh
database on the test server (see tests/store/pg.py), dropped afterwards.
"""

import sys
import time
from pathlib import Path

from twisted.internet import defer, task

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from epio.store import open_store  # noqa: E402
from tests.store import pg  # noqa: E402


async def bench(reactor, url, label):
    store = await open_store(url, reactor)
    u = await store.create_user("bench")
    tok = await store.create_token(u.id)
    await store.create_app("b", u.id)
    for name, fn, n in [
        ("get_app", lambda i: store.get_app("b"), 2000),
        ("user_for_token", lambda i: store.user_for_token(tok.token), 2000),
        ("create_release", lambda i: store.create_release("b", "a"*64), 500),
    ]:
        t = time.perf_counter()
        for i in range(n):
            await fn(i)
        dt = time.perf_counter() - t
        print(f"{label:10} {name:16} sequential {n/dt:8.0f} ops/s  ({dt/n*1e3:.2f} ms/op)")
    # concurrency: 20 in flight
    t = time.perf_counter()
    await defer.gatherResults([defer.ensureDeferred(store.get_app("b")) for _ in range(2000)])
    dt = time.perf_counter() - t
    print(f"{label:10} get_app          2000 concurrent {2000/dt:8.0f} ops/s")
    await store.close()

async def main(reactor):
    import tempfile
    d = tempfile.mkdtemp()
    await bench(reactor, f"sqlite:///{d}/s.db", "sqlite")
    url = pg.create_database()
    try:
        await bench(reactor, url, "postgresql")
    finally:
        pg.drop_database(url)

task.react(lambda r: defer.ensureDeferred(main(r)))
