"""Bus measurements between two processes (run by hand, not by pytest).

    /work/venv/bin/python tests/integration/bus/bench.py [--plain]

Prints request/reply round-trip latency (sequential requests, p50/p99) and
PUSH -> PULL throughput (messages/s until the peer has them all), over TCP on
127.0.0.1, with CurveZMQ encryption (default) or without (``--plain``).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))

from twisted.internet import defer, reactor, task  # noqa: E402

from epio.bus import Bus, bus_settings  # noqa: E402
from epio.bus.testing import TEST_REGISTRY  # noqa: E402


def main() -> None:
    plain = "--plain" in sys.argv
    secret = secrets.token_bytes(32)
    env = dict(os.environ, PYTHONPATH=str(HERE.parents[2]), EPIO_BUS_ENCRYPT="0" if plain else "1")
    peer = subprocess.Popen([sys.executable, str(HERE / "peer.py"), secret.hex(), "peer",
                             "127.0.0.1"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    ready = json.loads(peer.stdout.readline())
    bus = Bus(reactor, secret, "bench", bus_settings(encrypt=not plain, high_water_mark=100000), registry=TEST_REGISTRY)

    def ask(cmd: dict) -> dict:
        peer.stdin.write((json.dumps(cmd) + "\n").encode())
        peer.stdin.flush()
        return json.loads(peer.stdout.readline())

    async def run() -> None:
        dealer = bus.dealer([ready["router"]])
        dealer.startService()
        await dealer.request("bus.ping", {})
        lat = []
        for n in range(3000):
            t0 = time.perf_counter()
            await dealer.request("test.echo", {"n": n})
            lat.append(time.perf_counter() - t0)
        lat.sort()
        print(f"request/reply ({'plain' if plain else 'curve'}): n=3000 "
              f"p50={lat[1500] * 1e3:.3f} ms p99={lat[2970] * 1e3:.3f} ms "
              f"({3000 / sum(lat):.0f} sequential req/s)")
        push = bus.push([ready["pull"]])
        push.startService()
        await push.whenConnected()
        n = 50_000
        t0 = time.perf_counter()
        sent = 0
        for i in range(n):
            if push.send("test.job", {"n": i}):
                sent += 1
            if i % 1000 == 999:
                await task.deferLater(reactor, 0)  # let the reactor breathe
        t_send = time.perf_counter() - t0
        while ask({"cmd": "count"})["pulled"] < sent:
            await task.deferLater(reactor, 0.01)
        t_all = time.perf_counter() - t0
        print(f"push->pull ({'plain' if plain else 'curve'}): {sent}/{n} messages queued in "
              f"{t_send:.2f}s, all received after {t_all:.2f}s = {sent / t_all:.0f} msg/s "
              f"end to end")
        dealer.stopService()
        push.stopService()

    def go() -> None:
        d = defer.ensureDeferred(run())
        d.addErrback(lambda f: print(f.getTraceback()))
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(go)
    reactor.run()
    peer.stdin.close()
    peer.wait(5)


if __name__ == "__main__":
    main()
