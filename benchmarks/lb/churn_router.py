#!/usr/bin/env python3
"""An epio router process whose route table churns: N routes replaced every second.

Used by ``run.py --churn``: it serves ``bench.example.com`` -> the backend, plus
``--routes`` other apps; every second a delta re-points ``--churn`` of them at a
new backend port (built and applied the way the nexus feed does, in slices of
250 routes per reactor turn).  Prints ``READY <port>`` when listening.

    python benchmarks/lb/churn_router.py --backend 8081 --routes 10000 --churn 10000
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", type=int, required=True)
    ap.add_argument("--routes", type=int, default=10000)
    ap.add_argument("--churn", type=int, default=10000, help="routes changed per second")
    args = ap.parse_args()

    from twisted.internet import reactor
    from twisted.internet.task import LoopingCall

    from epio.config import load_config
    from epio.lb.service import LBService, RouterProcess
    from epio.routing import Backend, Route, RouteDelta, StaticRouteSource

    bench = Route("bench", ["bench.example.com"], [Backend("127.0.0.1", args.backend)])

    def app_route(i: int, gen: int) -> Route:
        return Route(f"app{i}", [f"app{i}.example.com", f"www.app{i}.example.org"],
                     [Backend("127.0.0.1", 20000 + (i + gen) % 1000, instance_id=f"i{i}-{gen}")])

    routes = [bench] + [app_route(i, 0) for i in range(args.routes)]
    settings = load_config(None, {"lb": {"listen": "tcp:0:interface=127.0.0.1",
                                         "access_log": "off"}}).settings.lb
    svc = LBService(reactor, settings, "localhost", StaticRouteSource(routes))
    svc.startService()
    RouterProcess(reactor, svc).startService()  # GC tuned as in any router process
    gen = [0]
    building: list[int] = []

    def build_slice() -> None:
        # construct Route objects 250 per turn, like a well-behaved feed
        batch = []
        for _ in range(min(250, len(building))):
            batch.append(app_route(building.pop(), gen[0]))
        svc.table.apply(RouteDelta(upsert=tuple(batch)))
        if building:
            reactor.callLater(0, build_slice)

    def churn() -> None:
        gen[0] += 1
        building.extend(range(args.churn))
        build_slice()

    def ready(ports: list) -> None:
        print(f"READY {ports[0].getHost().port}", flush=True)
        if args.churn:
            LoopingCall(churn).start(1.0, now=False)

    svc.whenReady().addCallback(ready)
    reactor.run()


if __name__ == "__main__":
    main()
