"""A tiny recursive DNS server for the ACME integration test (run as a process).

It stands for the public resolver a CA uses: every query goes to the "world's" DNS
(``--upstream``: pebble-challtestsrv, which holds the owners' records, CNAMEs
included), and when the answer ends in a CNAME into ``--zone`` (epio's DNS-01
zone), the target is asked of that zone's authoritative server (``--zone-server``:
epio's own) and its records appended, as a real resolver following the CNAME
would.  UDP only.

    python -m tests.integration.lb.dns_recursor --listen 127.0.0.1:P \\
        --upstream 127.0.0.1:Q --zone acme.epio.test --zone-server 127.0.0.1:R
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from twisted.internet import defer, reactor
from twisted.names import client, dns, server


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


class Recursor(server.DNSServerFactory):
    def __init__(self, upstream: tuple[str, int], zone: str,
                 zone_server: tuple[str, int]) -> None:
        super().__init__()
        self.upstream = client.Resolver(servers=[upstream], reactor=reactor)
        self.zone_server = client.Resolver(servers=[zone_server], reactor=reactor)
        self.zone = zone.lower().rstrip(".")
        self.canRecurse = True

    def _in_zone(self, name: str) -> bool:
        name = name.lower().rstrip(".")
        return name == self.zone or name.endswith("." + self.zone)

    async def _resolve(self, query: dns.Query) -> tuple[int, list[dns.RRHeader]]:
        name = query.name.name.decode()
        if self._in_zone(name):
            msg = await self.zone_server.queryUDP([query], timeout=(2, 4))
            return msg.rCode, list(msg.answers)
        msg = await self.upstream.queryUDP([query], timeout=(2, 4))
        answers = list(msg.answers)
        rcode = msg.rCode
        if query.type != dns.CNAME:
            targets = [str(rr.payload.name) for rr in answers if rr.type == dns.CNAME]
            have = {str(rr.name).lower() for rr in answers if rr.type == query.type}
            if targets and self._in_zone(targets[-1]) and targets[-1].lower() not in have:
                more = await self.zone_server.queryUDP([dns.Query(targets[-1], query.type)],
                                                       timeout=(2, 4))
                answers += list(more.answers)
                rcode = more.rCode
        return rcode, answers

    def handleQuery(self, message: dns.Message, protocol: Any, address: Any) -> Any:
        def reply(result: tuple[int, list[dns.RRHeader]]) -> None:
            rcode, answers = result
            self.sendReply(protocol, self._responseFromMessage(
                message=message, rCode=rcode, answers=answers), address)

        def failed(f: Any) -> None:
            sys.stderr.write(f"recursor: {message.queries[0]}: {f.getErrorMessage()}\n")
            self.sendReply(protocol, self._responseFromMessage(
                message=message, rCode=dns.ESERVER), address)

        return defer.ensureDeferred(self._resolve(message.queries[0])).addCallbacks(
            reply, failed)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--listen", required=True)
    p.add_argument("--upstream", required=True)
    p.add_argument("--zone", required=True)
    p.add_argument("--zone-server", required=True)
    a = p.parse_args()
    host, port = _addr(a.listen)
    factory = Recursor(_addr(a.upstream), a.zone, _addr(a.zone_server))
    reactor.listenUDP(port, dns.DNSDatagramProtocol(factory), interface=host)  # type: ignore[attr-defined]
    sys.stderr.write(f"recursor: listening on {a.listen}\n")
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
