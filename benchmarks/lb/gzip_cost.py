"""CPU per proxied request of ``[http] gzip`` (epio.lb.compress) against the same
response sent uncompressed, in the same run: the router's proxy core on fakes
(MemoryReactorClock + StringTransport, no sockets), a kept-alive client connection and
a pooled backend connection, a Django-like HTML page of SIZE bytes answered with a
Content-Length.  Reports the median of 7 runs of N requests for each route (gzip on,
gzip off) and their ratio, and the compressed size.

    PYTHONPATH=. python benchmarks/lb/gzip_cost.py [SIZE] [N]
"""

import statistics
import sys
import time

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from epio.lb.observe import Observer
from epio.lb.proxy import LB, LBFactory, Settings
from epio.routing import Backend, Route, RouteTable

REQ = b"GET / HTTP/1.1\r\nHost: a.example.com\r\nAccept-Encoding: gzip, deflate, br\r\n\r\n"


def page(size: int) -> bytes:
    row = (b'<tr><td class="name">Entry %d</td><td>Lovely weather today, said the '
           b'visitor, and the food was good.</td><td>2026-12-07</td></tr>\n')
    out, i = [b"<!doctype html><html><body><table>\n"], 0
    while sum(map(len, out)) < size:
        out.append(row % i)
        i += 1
    return b"".join(out)[:size]


def run(gzip_on: bool, response: bytes, n: int) -> tuple[float, int]:
    clock = MemoryReactorClock()
    table = RouteTable("localhost", [Route("a", ["a.example.com"], [Backend("10.0.0.1", 1)],
                                           gzip=gzip_on)])
    lb = LB(clock, table, Settings(), Observer(None, None, enabled=False))
    c = LBFactory(lb).buildProtocol(None)
    ct = StringTransport(hostAddress=IPv4Address("TCP", "127.0.0.1", 80),
                         peerAddress=IPv4Address("TCP", "10.1.2.3", 5555))
    c.makeConnection(ct)
    c.dataReceived(REQ)
    _, _, factory, _, _ = clock.tcpClients[0]
    bp = factory.buildProtocol(None)
    bt = StringTransport()
    bp.makeConnection(bt)
    bp.dataReceived(response)
    sent = len(ct.value())
    t0 = time.process_time()
    for _ in range(n):
        c.dataReceived(REQ)
        bp.dataReceived(response)
        if len(ct.io.getvalue()) > 1 << 22:
            ct.clear()
            bt.clear()
    return (time.process_time() - t0) / n, sent


def main() -> None:
    size = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 2_000
    body = page(size)
    response = (b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body) + body)
    results = {}
    for gz in (False, True):
        runs = [run(gz, response, n) for _ in range(7)]
        results[gz] = (statistics.median(r[0] for r in runs), runs[0][1])
    plain, gzipped = results[False][0], results[True][0]
    print(f"body {len(body)} B; {n} requests x 7 runs, median CPU per request:")
    print(f"  uncompressed: {plain * 1e6:8.1f} us  ({results[False][1]} B on the wire)")
    print(f"  gzip:         {gzipped * 1e6:8.1f} us  ({results[True][1]} B on the wire)")
    print(f"  ratio gzip/uncompressed: {gzipped / plain:.1f}x; gzip adds "
          f"{(gzipped - plain) * 1e6:.1f} us per request")


if __name__ == "__main__":
    main()
