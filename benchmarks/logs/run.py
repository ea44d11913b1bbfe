"""Log pipeline benchmark: line -> websocket tail latency, and logger throughput.

Run from the checkout::

    /work/venv/bin/python benchmarks/logs/run.py [--quick]

What runs: a real logger (``twistd epio --role=logger``, its own process), pusher
processes (tests/integration/logs/pusher.py: the real BusLogSink over the real
bus), and in this process the api side (LogClient + epio.api.logtail served over
HTTP) with a websocket client.

1. Latency: pushers send numbered lines at 1k and at 50k lines/s for a few
   seconds; each line's timestamp is taken when it is emitted; a websocket
   client in its own process (benchmarks/logs/wsclient.py, where the CLI would
   be) records when it arrives.  p50/p99 of (arrival - emit), all on one
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
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXTRA: dict = {}
sys.path.insert(0, str(HERE.parent.parent))

from twisted.internet import defer, reactor, task  # noqa: E402
from twisted.internet.protocol import ProcessProtocol  # noqa: E402

from epio.logclient import LogClient  # noqa: E402
from tests.integration.logs.helpers import (  # noqa: E402
    LoggerNode,
    Pusher,
    all_lines,
    make_bus,
    peer,
    serve_tail,
    write_secret,
)
from tests.util import epio_env  # noqa: E402


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


class WSClient(ProcessProtocol):
    """benchmarks/logs/wsclient.py in its own process."""

    def __init__(self) -> None:
        self.buf = b""
        self.ready: defer.Deferred[dict] = defer.Deferred()
        self.done: defer.Deferred[dict] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.buf += data
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            msg = json.loads(line)
            d = self.ready if msg["event"] == "ready" else self.done
            if not d.called:
                d.callback(msg)


async def latency(client: LogClient, http_port: int, node: LoggerNode, secret: bytes, app: str,
                  rate: int, seconds: float, pushers: int) -> dict:
    per = rate // pushers
    count = int(per * seconds)
    total = count * pushers
    ws = WSClient()
    url = f"ws://127.0.0.1:{http_port}/api/v1/apps/{app}/logs?n=0"
    reactor.spawnProcess(ws, sys.executable, [sys.executable, str(HERE / "wsclient.py"), url,
                                              str(total), str(seconds * 10 + 40)],
                         env=epio_env())
    await ws.ready.addTimeout(30, reactor)
    ps = [Pusher.spawn(secret=secret.hex(), endpoints=[node.pull], app=app, node=f"{app}-{i}",
                       sources=[f"web.{i + 1}"], count=count, rate=per, delay=0.5)
          for i in range(pushers)]
    sent = [await p.events["sent"].addTimeout(seconds * 10 + 30, reactor) for p in ps]
    send_time = max(s["end"] for s in sent) - min(s["start"] for s in sent)
    result = await ws.done
    for p in ps:
        await p.close()
    del result["event"]
    return {"rate": rate, "lines": total, "achieved_send_rate": round(total / send_time),
            "dropped_at_sender": sum(s["dropped"] for s in sent), **result}


def written_total(node: LoggerNode, app: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{node.metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    for fam in text_string_to_metric_families(text):
        if fam.name == "epio_log_lines_written":
            return sum(s.value for s in fam.samples
                       if s.name == "epio_log_lines_written_total" and s.labels["app"] == app)
    return 0.0


async def capacity(client: LogClient, node: LoggerNode, secret: bytes, app: str, lines: int,
                   pushers: int) -> dict:
    """Pushers send ``lines`` as fast as they can (deep sender queues, nothing
    dropped); the rate is lines / (time the logger had written them all - time
    the first was sent).  Senders and logger share the machine's cores, so this
    is a lower bound of the logger's capacity; ``send_lines_per_s`` shows whether
    the senders were the limit."""
    from twisted.internet.threads import deferToThread

    per = lines // pushers
    ps = [Pusher.spawn(secret=secret.hex(), endpoints=[node.pull], app=app, node=f"{app}-{i}",
                       sources=[f"web.{i + 1}"], count=per, rate=0, delay=0.5, hwm=2_000_000)
          for i in range(pushers)]
    total = per * pushers
    done_at = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        w = await deferToThread(written_total, node, app)
        if w >= total:
            done_at = time.time()
            break
        await task.deferLater(reactor, 0.05, lambda: None)
    sent = [await p.events["sent"].addTimeout(60, reactor) for p in ps]
    for p in ps:
        await p.close()
    stored = await all_lines(client, app)
    lost = sum(ln.lost for ln in stored if ln.lost)
    n_stored = len([ln for ln in stored if not ln.lost])
    t0 = min(s["start"] for s in sent)
    send_end = max(s["end"] for s in sent)
    return {"lines": total, "stored": n_stored,
            "lost": lost, "dropped_at_sender": sum(s["dropped"] for s in sent),
            "zero_loss": n_stored == total and lost == 0,
            "send_lines_per_s": round(total / (send_end - t0)),
            "stored_lines_per_s": round(total / (done_at - t0)) if done_at else None}


async def main(quick: bool, only: str) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="epio-logbench-"))
    secret_file, secret = write_secret(tmp)
    node = LoggerNode(tmp, secret_file, {"logger": {"flush_interval": 0.2, **EXTRA,
                                                    "query_max_lines": 100_000}})
    node.start()
    results: dict = {"latency": [], "capacity": []}
    try:
        client = LogClient(make_bus(secret, "bench-api"), [peer(node)], reactor, timeout=30)
        client.startService()
        runs = [(1000, 1), (50_000, 2)]
        port, http_port = serve_tail(client, {f"lat{r}" for r, _ in runs})
        secs = 2.0 if quick else 4.0
        for rate, pushers in runs if only in ("", "latency") else []:
            r = await latency(client, http_port, node, secret, f"lat{rate}", rate, secs, pushers)
            print(json.dumps({"latency": r}), flush=True)
            results["latency"].append(r)
        n = 100_000 if quick else 300_000
        for pushers in (2,) if only in ("", "capacity") else ():
            r = await capacity(client, node, secret, "cap", n, pushers)
            print(json.dumps({"capacity": r}), flush=True)
            results["capacity"].append(r)
        print(json.dumps({"summary": {
            "latency_p50_p99_ms": {r["rate"]: (r["p50_ms"], r["p99_ms"]) for r in results["latency"]},
            "capacity_lines_per_s": [r["stored_lines_per_s"] for r in results["capacity"]
                                     if r["zero_loss"]]}}), flush=True)
        await port.stopListening()
        await client.stopService()
    finally:
        node.stop()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=["latency", "capacity"], default="")
    ap.add_argument("--chunk-max-bytes", type=int, default=0,
                    help="logger.chunk_max_bytes for the run (default: the config default)")
    opts = ap.parse_args()
    if opts.chunk_max_bytes:
        EXTRA["chunk_max_bytes"] = opts.chunk_max_bytes

    def run() -> defer.Deferred:
        d = defer.Deferred.fromCoroutine(main(opts.quick, opts.only))
        d.addErrback(lambda f: print(f.getTraceback(), flush=True))
        d.addBoth(lambda _: reactor.stop())
        return d

    reactor.callWhenRunning(run)
    reactor.run()
