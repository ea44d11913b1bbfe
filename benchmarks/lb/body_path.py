"""CPU per proxied request of the router's proxy core on fakes (MemoryReactorClock +
StringTransport, no sockets): a GET and a 1 KiB POST on a kept-alive client connection
and a pooled backend connection.  Compares code paths, not machines: run it on two
checkouts (``PYTHONPATH=CHECKOUT python benchmarks/lb/body_path.py``), it reports the
median of 7 runs of 20,000 requests.  Written to check that request body buffering
(docs/router.md "Request bodies") costs the small-request path nothing.
"""

import time

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from epio.lb.observe import Observer
from epio.lb.proxy import LB, LBFactory, Settings
from epio.routing import Backend, Route, RouteTable

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
def run(req: bytes, n: int) -> float:
    clock = MemoryReactorClock()
    table = RouteTable("localhost", [Route("a", ["a.example.com"], [Backend("10.0.0.1", 1)])])
    lb = LB(clock, table, Settings(), Observer(None, None, enabled=False))
    f = LBFactory(lb)
    c = f.buildProtocol(None)
    ct = StringTransport(hostAddress=IPv4Address("TCP", "127.0.0.1", 80),
                         peerAddress=IPv4Address("TCP", "10.1.2.3", 5555))
    c.makeConnection(ct)
    c.dataReceived(req)
    host, port, factory, _, _ = clock.tcpClients[0]
    bp = factory.buildProtocol(None)
    bt = StringTransport()
    bp.makeConnection(bt)
    bp.dataReceived(OK)
    t0 = time.process_time()
    for _ in range(n):
        c.dataReceived(req)
        bp.dataReceived(OK)
        if len(ct.io.getvalue()) > 1 << 20:
            ct.clear()
            bt.clear()
    return (time.process_time() - t0) / n * 1e6

GET = b"GET / HTTP/1.1\r\nHost: a.example.com\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n"
POST = (b"POST /x HTTP/1.1\r\nHost: a.example.com\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1024\r\n\r\n" + b"x" * 1024)

if __name__ == "__main__":
    for name, req in (("GET", GET), ("POST 1 KiB", POST)):
        runs = sorted(run(req, 20000) for _ in range(7))
        print(f"{name}: median {runs[3]:.2f} us/request (min {runs[0]:.2f})")
