#!/usr/bin/env python3
"""Where the router's Python time per proxied request goes, piece by piece.

    PYTHONPATH=CHECKOUT python benchmarks/lb/breakdown.py

Runs the proxy core on fakes (MemoryReactorClock and a transport whose write does
nothing, so no socket and no buffer cost is counted) with the exact bytes of the
benchmark: wrk's request head and nginx's response head with a 100-byte body. Prints
the median of 7 runs (CPU time, ``time.process_time``) for the whole exchange and for
its parts timed alone, so the rest (routing, balancing, head building, state, log)
is the difference. Run it on two checkouts in turn to compare code paths: the
figures are per-request Python costs, not machine throughput (docs/router.md).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock

from epio.lb.http import parse_request, parse_response
from epio.lb.observe import Observer
from epio.lb.proxy import LB, LBFactory, Settings
from epio.routing import Backend, Route, RouteTable

HOST = "bench.example.com"
REQ = b"GET / HTTP/1.1\r\nHost: bench.example.com\r\n\r\n"
RESP_HEAD = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Mon, 07 Dec 2026 17:00:00 GMT"
             b"\r\nContent-Type: text/plain\r\nContent-Length: 100\r\nConnection: keep-alive")
RESP = RESP_HEAD + b"\r\n\r\n" + b"0123456789" * 10


class NullTransport:
    """Just what the proxy calls on a transport; writes go nowhere."""

    connected = True
    disconnecting = False
    producer: Any = None

    def __init__(self) -> None:
        self.n = 0

    def write(self, data: bytes) -> None:
        self.n += 1

    def writeSequence(self, seq: list[bytes]) -> None:
        self.n += 1

    def getPeer(self) -> IPv4Address:
        return IPv4Address("TCP", "10.1.2.3", 5555)

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 80)

    def setTcpNoDelay(self, on: bool) -> None:
        pass

    def registerProducer(self, p: Any, streaming: bool) -> None:
        self.producer = p

    def unregisterProducer(self) -> None:
        self.producer = None

    def loseConnection(self) -> None:
        raise AssertionError("the benchmark's connections stay open")

    abortConnection = loseConnection


def per_call(fn: Callable[[], Any], n: int) -> float:
    t0 = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - t0) / n * 1e6


def exchange(n: int, log: bool) -> float:
    clock = MemoryReactorClock()
    table = RouteTable("localhost", [Route("a", [HOST], [Backend("10.0.0.1", 1)])])
    lb = LB(clock, table, Settings(), Observer(None, None, enabled=log))
    c = LBFactory(lb).buildProtocol(None)
    ct = NullTransport()
    c.makeConnection(ct)
    c.dataReceived(REQ)
    factory = clock.tcpClients[0][2]
    bp = factory.buildProtocol(None)
    bp.makeConnection(NullTransport())
    bp.dataReceived(RESP)
    cd, bd = c.dataReceived, bp.dataReceived
    t0 = time.process_time()
    for i in range(n):
        cd(REQ)
        bd(RESP)
        if log and not i % 1000:
            lb.observer.pending.clear()
    dt = (time.process_time() - t0) / n * 1e6
    assert ct.n == n + 1, "every request answered"
    return dt


def main() -> None:
    rows: dict[str, list[float]] = {}
    head_req = REQ[:-4]
    for _ in range(7):
        rows.setdefault("whole exchange (access log on)", []).append(exchange(20000, True))
        rows.setdefault("whole exchange (access log off)", []).append(exchange(20000, False))
        rows.setdefault("  parse_request", []).append(per_call(lambda: parse_request(head_req), 50000))
        rows.setdefault("  parse_response", []).append(per_call(lambda: parse_response(RESP_HEAD), 50000))
    med = {k: statistics.median(v) for k, v in rows.items()}
    for k, v in med.items():
        print(f"{k:34s} {v:6.2f} us  (min {min(rows[k]):.2f})")
    rest = med["whole exchange (access log on)"] - med["  parse_request"] - med["  parse_response"]
    print(f"{'  the rest (route, balance, heads, state, log)':34s} {rest:6.2f} us")


if __name__ == "__main__":
    main()
