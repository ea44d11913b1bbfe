"""A websocket tail client in its own process (the CLI's place): measures line latency.

Usage: ``python wsclient.py URL TOTAL TIMEOUT``.  Prints ``{"event": "ready"}`` when
the tail says history is done, then, once TOTAL lines arrived (or TIMEOUT seconds
passed), ``{"event": "done", "received", "missed", "p50_ms", "p99_ms", "max_ms",
"p99_ms_per_tenth_of_run"}`` -- latency = arrival time - the line's timestamp.
"""

from __future__ import annotations

import json
import sys
import time
from array import array

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol, connectWS
from twisted.internet import reactor

URL, TOTAL, TIMEOUT = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
lat = array("d")
state = {"missed": 0, "done": False}


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))] if s else float("nan")


def finish() -> None:
    if state["done"]:
        return
    state["done"] = True
    ms = [v * 1000 for v in lat]
    step = max(1, len(ms) // 10)
    print(json.dumps({"event": "done", "received": len(ms), "missed": state["missed"],
                      "p50_ms": round(pct(ms, 50), 2), "p99_ms": round(pct(ms, 99), 2),
                      "max_ms": round(max(ms), 2) if ms else None,
                      "p99_ms_per_tenth_of_run": [round(pct(ms[i:i + step], 99), 1)
                                                  for i in range(0, len(ms), step)]}), flush=True)
    reactor.stop()


class Client(WebSocketClientProtocol):
    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        now = time.time()
        msg = json.loads(payload)
        if msg["type"] == "lines":
            lat.extend(now - ln["timestamp"] for ln in msg["lines"])
            if len(lat) + state["missed"] >= TOTAL:
                finish()
        elif msg["type"] == "ready":
            print(json.dumps({"event": "ready"}), flush=True)
        elif msg["type"] == "missed":
            state["missed"] += msg["count"]


factory = WebSocketClientFactory(URL)
factory.protocol = Client
connectWS(factory)
reactor.callLater(TIMEOUT, finish)
reactor.run()
