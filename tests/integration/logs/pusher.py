"""A log producer in its own OS process: numbered lines through the real BusLogSink.

Usage: ``python pusher.py JSON`` with keys ``secret`` (hex), ``endpoints`` (logger
PULL endpoints), ``app``, ``sources`` (list), ``count`` (lines per source),
``rate`` (lines per second over all sources; 0 = one burst), ``node``,
``stats`` (router stats samples to send after the lines, dated ``stats_age`` s ago),
``pad`` (that many extra characters after the number).
BusLogSink sends the lines of one reactor turn as one ``log.batch``, so a burst
travels in batches of up to 500 lines and a paced run in small ones.

Line i of source S has the text ``S line i`` (i from 1).  It writes JSON lines to
stdout: ``{"event": "ready"}`` once its sockets exist, ``{"event": "sent", "sent": N,
"dropped": D}`` when every line was handed to the sink, and exits when stdin closes
(lingering so ZeroMQ can deliver what is queued).
"""

from __future__ import annotations

import json
import sys
import time

from twisted.internet import reactor, stdio
from twisted.internet.protocol import Protocol

from epio.bus import Bus, bus_settings
from epio.pipeline import BusLogSink


def out(**kw: object) -> None:
    sys.stdout.write(json.dumps(kw) + "\n")
    sys.stdout.flush()


class Stdin(Protocol):
    def connectionLost(self, reason: object = None) -> None:
        reactor.callLater(0.5, reactor.stop)


def main() -> None:
    args = json.loads(sys.argv[1])
    bus = Bus(reactor, bytes.fromhex(args["secret"]), args.get("node", "pusher"),
              bus_settings(high_water_mark=args.get("hwm", 10000)))
    sink = BusLogSink(bus, args["endpoints"])
    sink.startService()
    app, sources, count = args["app"], args["sources"], args["count"]
    rate = args.get("rate", 0)
    order = [(s, i) for i in range(1, count + 1) for s in sources]
    state: dict = {"pos": 0}
    pad = " " + "x" * args["pad"] if args.get("pad") else ""

    def finish() -> None:
        # stats samples dated ``stats_age`` seconds back, so their 10 s bucket is complete
        if args.get("stats"):
            class Past:
                def seconds(self) -> float:
                    return reactor.seconds() - args.get("stats_age", 20)

            stats = BusLogSink(bus, args["endpoints"], clock=Past())
            stats.startService()
            for _ in range(args["stats"]):
                stats.emit_stats(app, "router", {"requests": 10, "status_2xx": 9,
                                                 "status_5xx": 1, "latency_le_5ms": 10})
        out(event="sent", sent=len(order), dropped=sink.counters["dropped"],
            start=state.get("start"), end=time.time())

    def burst() -> None:
        state["start"] = time.time()
        for s, i in order:
            sink.emit(app, s, f"{s} line {i}{pad}", reactor.seconds())
        finish()

    def paced() -> None:
        # every ~5 ms, send what the rate allows for the time elapsed since the start
        now = time.time()
        t0 = state.setdefault("start", now)
        pos = state["pos"]
        due = min(len(order), int((now - t0) * rate) + 1)
        for s, i in order[pos:due]:
            sink.emit(app, s, f"{s} line {i}{pad}", reactor.seconds())
        state["pos"] = due
        if due >= len(order):
            finish()
        else:
            reactor.callLater(0.005, paced)

    def start() -> None:
        out(event="ready")
        reactor.callLater(args.get("delay", 0.3), burst if not rate else paced)

    stdio.StandardIO(Stdin())
    reactor.callWhenRunning(start)
    reactor.run()
    sink.stopService()


if __name__ == "__main__":
    main()
