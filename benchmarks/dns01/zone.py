"""What the DNS-01 zone server (epio.certs.dns01) costs per query.

Starts one :class:`~epio.certs.dns01.Dns01Service` on an SQLite store with one label
and two TXT values (an order pending), then a client thread sends TXT queries over
UDP, one at a time, for ``--time`` seconds, and reports queries per second and the
server's CPU per query (the process's CPU minus the client thread's).

    python benchmarks/dns01/zone.py --time 3
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def client(port: int, name: str, seconds: float, out: dict[str, Any]) -> None:
    from twisted.names import dns

    q = dns.Message(id=1)
    q.queries = [dns.Query(name, dns.TXT)]
    wire = q.toStr()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    t_cpu = time.thread_time()
    n, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        s.sendto(wire, ("127.0.0.1", port))
        data, _ = s.recvfrom(4096)
        n += 1
    m = dns.Message()
    m.fromStr(data)
    out.update(n=n, client_cpu=time.thread_time() - t_cpu,
               answers=sorted(b"".join(a.payload.data) for a in m.answers))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--time", type=float, default=3.0)
    a = p.parse_args()
    from twisted.internet import defer, reactor, threads

    from epio.certs.dns01 import Dns01, Dns01Service, ZoneData
    from epio.certs.resolve import make_resolver
    from epio.store import open_store

    async def run() -> None:
        store = await open_store(f"sqlite:///{tempfile.mkdtemp()}/store.db", reactor)
        user = await store.create_user("bench")
        await store.create_app("bench", user.id)
        dns01 = Dns01(store, "acme.bench.test", make_resolver(reactor, "127.0.0.1:9"))
        rec = await dns01.record("bench", "*.bench.test")
        await dns01.publish("bench", "*.bench.test", ["a" * 43, "b" * 43], time.time() + 600)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        data = ZoneData(reactor, lambda: defer.succeed(store), 2.0)
        service = Dns01Service(reactor, f"127.0.0.1:{port}", "acme.bench.test", data)
        service.startService()
        await data.refresh()
        out: dict[str, Any] = {}
        before = resource.getrusage(resource.RUSAGE_SELF)
        await threads.deferToThread(client, port, rec.value, a.time, out)
        after = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        server_cpu = cpu - out["client_cpu"]
        print(f"{out['n'] / a.time:,.0f} queries/s, server CPU {server_cpu / out['n'] * 1e6:,.0f}"
              f" µs per query ({out['n']} queries, answers {len(out['answers'])} TXT), "
              f"pid {os.getpid()}")
        await service.stopService()
        await store.close()

    d = defer.ensureDeferred(run())
    d.addErrback(lambda f: f.printTraceback())
    d.addBoth(lambda _: reactor.stop())  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
