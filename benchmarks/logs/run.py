"""Log pipeline benchmark: line -> websocket tail latency, and logger throughput.

Run from the checkout::

    /work/venv/bin/python benchmarks/logs/run.py [--quick]

What runs: a real logger (``twistd epio --role=logger``, its own process), pusher
processes (tests/integration/logs/pusher.py: the real BusLogSink over the real
bus), and in this process the api side (LogClient + epio.api.logtail served over
HTTP) with a websocket client.

1. Latency: pushers send numbered lines at 1k and at 50k lines/s for a few
   seconds; each line's timestamp is taken when it is emitted; the websocket
   client records when it arrives.  p50/p99 of (arrival - emit), all on one
   host clock.
2. Throughput: rates are stepped up; at each step the run counts lines stored
   by the logger, lost markers and sender-side drops.  The highest rate with
   zero loss (every line stored, no gap, nothing dropped) is reported.

Goals (issue 8): p99 <= 50 ms; >= 50k lines/s per logger.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from twisted.internet import defer, reactor, task  # noqa: E402

from epio.logclient import LogClient  # noqa: E402
from tests.integration.logs.helpers import (  # noqa: E402
    LoggerNode,
    Pusher,
    all_lines,
    connect_tail,
    make_bus,
    peer,
    serve_tail,
    write_secret,
)


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


async def latency(client: LogClient, http_port: int, node: LoggerNode, secret: bytes, app: str,
                  rate: int, seconds: float, pushers: int) -> dict:
    tail = connect_tail(http_port, app, "n=0")
    await tail.ready.addTimeout(20, reactor)
    per = rate // pushers
    count = int(per * seconds)
    ps = [Pusher.spawn(secret=secret.hex(), endpoints=[node.pull], app=app, node=f"bench{i}",
                       sources=[f"web.{i + 1}"], count=count, rate=per, delay=0.5)
          for i in range(pushers)]
    sent = [await p.events["sent"].addTimeout(seconds * 5 + 30, reactor) for p in ps]
    total = count * pushers
    try:
        await tail.wait_lines(total, 30)
    except defer.TimeoutError:
        pass
    lat = [(arr - ln["timestamp"]) * 1000 for ln, arr in zip(tail.lines, tail.arrivals, strict=True)]
    missed = sum(m["count"] for m in tail.messages if m["type"] == "missed")
    tail.protocol_instance.sendClose()
    for p in ps:
        await p.close()
    return {"rate": rate, "lines": total, "received": len(tail.lines), "missed": missed,
            "dropped_at_sender": sum(s["dropped"] for s in sent),
            "p50_ms": round(pct(lat, 50), 2), "p99_ms": round(pct(lat, 99), 2),
            "max_ms": round(max(lat), 2) if lat else None}


async def throughput(client: LogClient, node: LoggerNode, secret: bytes, app: str, rate: int,
                     seconds: float, pushers: int) -> dict:
    per = rate // pushers
    count = int(per * seconds)
    ps = [Pusher.spawn(secret=secret.hex(), endpoints=[node.pull], app=app, node=f"tp{i}",
                       sources=[f"web.{i + 1}"], count=count, rate=per, delay=0.5,
                       hwm=100_000)
          for i in range(pushers)]
    t0 = time.monotonic()
    sent = [await p.events["sent"].addTimeout(seconds * 5 + 30, reactor) for p in ps]
    send_time = time.monotonic() - t0 - 0.5
    total = count * pushers
    stored: list = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        stored = await all_lines(client, app)
        if len(stored) >= total:
            break
        await task.deferLater(reactor, 0.5, lambda: None)
    done = time.monotonic() - t0 - 0.5
    for p in ps:
        await p.close()
    lost = sum(ln.lost for ln in stored if ln.lost)
    lines = len([ln for ln in stored if not ln.lost])
    return {"rate": rate, "lines": total, "stored": lines, "lost": lost,
            "dropped_at_sender": sum(s["dropped"] for s in sent),
            "achieved_send_rate": round(total / send_time) if send_time > 0 else None,
            "stored_rate": round(lines / done) if done > 0 else None,
            "zero_loss": lines == total and lost == 0}


async def main(quick: bool) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="epio-logbench-"))
    secret_file, secret = write_secret(tmp)
    node = LoggerNode(tmp, secret_file, {"logger": {"flush_interval": 0.2,
                                                    "query_max_lines": 100_000}})
    node.start()
    results: dict = {"latency": [], "throughput": []}
    try:
        client = LogClient(make_bus(secret, "bench-api"), [peer(node)], reactor, timeout=30)
        client.startService()
        port, http_port = serve_tail(client, {f"lat{r}" for r in (1000, 50000)})
        secs = 2.0 if quick else 4.0
        for rate, pushers in ((1000, 1), (50_000, 2)):
            r = await latency(client, http_port, node, secret, f"lat{rate}", rate, secs, pushers)
            print(json.dumps({"latency": r}), flush=True)
            results["latency"].append(r)
        steps = (20_000, 40_000, 60_000) if quick else (20_000, 40_000, 50_000, 60_000, 80_000)
        for rate in steps:
            r = await throughput(client, node, secret, f"tp{rate}", rate, secs, 2)
            print(json.dumps({"throughput": r}), flush=True)
            results["throughput"].append(r)
        ok = [r["rate"] for r in results["throughput"] if r["zero_loss"]]
        results["max_zero_loss_rate"] = max(ok) if ok else 0
        print(json.dumps({"summary": {
            "latency": {r["rate"]: (r["p50_ms"], r["p99_ms"]) for r in results["latency"]},
            "max_zero_loss_lines_per_s": results["max_zero_loss_rate"]}}), flush=True)
        await port.stopListening()
        await client.stopService()
    finally:
        node.stop()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    opts = ap.parse_args()

    def run() -> defer.Deferred:
        d = defer.Deferred.fromCoroutine(main(opts.quick))
        d.addErrback(lambda f: (f.printTraceback(), None))
        d.addBoth(lambda _: reactor.stop())
        return d

    reactor.callWhenRunning(run)
    reactor.run()
