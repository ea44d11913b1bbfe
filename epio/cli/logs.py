"""``epio logs [-f] [-n N] [--source S] [--grep RE] [--since T]`` and ``epio stats``.

Without ``-f`` one GET returns the last N matching lines.  With ``-f`` the CLI
opens the same URL as a websocket: the API sends the last N lines, then follows;
``{"type": "missed", "count": N}`` says a slow terminal lost lines (the API keeps
a bounded buffer per client), and the CLI prints that instead of hiding it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from epio.cli.client import USER_AGENT, Client, CliError
from epio.cli.commands import app_of, out, table
from epio.cli.wsclient import TEXT, WebSocket, WebSocketClosed


def _query(args: argparse.Namespace) -> dict[str, Any]:
    q: dict[str, Any] = {"n": args.num}
    if args.source:
        q["source"] = ",".join(args.source)
    if args.grep:
        q["grep"] = args.grep
    if args.since:
        q["since"] = args.since
    return q


def format_line(line: dict[str, Any]) -> str:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(float(line["timestamp"])))
    frac = f"{float(line['timestamp']) % 1:.3f}"[1:]
    text = f"{stamp}{frac}Z {line['source']}: {line['text']}"
    if line.get("lost"):
        text = f"{stamp}{frac}Z {line['source']}: [{line['lost']} lines lost] {line['text']}"
    return text


def cmd_logs(args: argparse.Namespace) -> int:
    name = app_of(args)
    client = Client.from_config()
    if not args.follow:
        result = client.get(f"apps/{name}/logs", **_query(args))
        if args.json:
            print(json.dumps(result, indent=2, sort_keys=True))
        else:
            for line in result.get("lines", []):
                print(format_line(line))
        return 0
    url = client.url(f"apps/{name}/logs", _query(args))
    url = "ws" + url[len("http"):] if url.startswith("http") else url
    ws = WebSocket.connect(url, {"Authorization": f"Bearer {client.token}",
                                 "User-Agent": USER_AGENT}, timeout=client.timeout)
    try:
        while True:
            try:
                messages = ws.receive()
            except WebSocketClosed as e:
                if e.code in (None, 1000, 1001):
                    return 0
                raise CliError(f"the log stream ended: {e.reason or e.code}") from None
            for opcode, payload in messages:
                if opcode != TEXT:
                    continue
                msg = json.loads(payload)
                kind = msg.get("type")
                if kind == "lines":
                    for line in msg["lines"]:
                        print(json.dumps(line) if args.json else format_line(line), flush=True)
                elif kind == "missed":
                    print(f"epio: {msg['count']} lines were not shown (this terminal was too "
                          "slow)", file=sys.stderr, flush=True)
                elif kind == "notice":
                    print(f"epio: {msg['message']}", file=sys.stderr, flush=True)
                elif kind == "error":
                    raise CliError(msg.get("message") or "the log stream failed")
    finally:
        try:
            ws.close()
        except OSError:
            pass  # the connection is already gone: nothing left to close politely


CHART_WIDTH = 32
"""Columns of the text chart `epio stats` draws of each series over the window."""

BLOCKS = "\u2581\u2582\u2583\u2584\u2585\u2586\u2587\u2588"  # ▁ .. █
ASCII_BLOCKS = "_.-=+*#@"


def _per_second(metric: str) -> bool:
    return metric in ("requests", "bytes_out", "client_closed") or metric.startswith(
        ("status_", "error_"))


def format_value(metric: str, value: float, resolution: int) -> str:
    """A stats value for people: counts per bucket as rates (req/s), latencies in ms,
    memory in MiB, CPU in percent of one core, bytes sent in KiB/s."""
    if metric == "bytes_out":
        return f"{value / resolution / 1024:.1f} KiB/s"
    if _per_second(metric):
        return f"{value / resolution:.2f} req/s"
    if metric.endswith("_ms"):
        return f"{value:.1f} ms" if value < 10 else f"{value:.0f} ms"
    if metric.startswith("memory"):
        return f"{value / (1024 * 1024):.1f} MiB"
    if metric == "cpu_percent":  # of one core: 250% is two and a half cores busy
        return f"{value:.1f}%"
    return f"{value:g}"


def chart(points: list[list[float]], since: float, until: float, width: int = CHART_WIDTH,
          blocks: str = BLOCKS) -> str:
    """The series as ``width`` columns over [since, until): each column the largest value
    in its slice, scaled from 0 to the series' maximum; a blank column has no data."""
    span = max(until - since, 1e-9)
    cols: list[float | None] = [None] * width
    for t, v in points:
        i = min(width - 1, max(0, int((float(t) - since) / span * width)))
        cols[i] = v if cols[i] is None else max(cols[i], v)  # type: ignore[type-var]
    top = max((c for c in cols if c is not None), default=0.0)
    out = []
    for c in cols:
        if c is None:
            out.append(" ")
        elif top <= 0:
            out.append(blocks[0])
        else:
            out.append(blocks[min(len(blocks) - 1, int(c / top * (len(blocks) - 1) + 0.5))])
    return "".join(out)


def _blocks() -> str:
    encoding = (getattr(sys.stdout, "encoding", None) or "ascii").lower()
    return BLOCKS if "utf" in encoding else ASCII_BLOCKS


def cmd_stats(args: argparse.Namespace) -> int:
    name = app_of(args)
    query: dict[str, Any] = {}
    if args.metric:
        query["metric"] = args.metric
    if args.since:
        query["since"] = args.since
    if args.resolution:
        query["resolution"] = args.resolution
    result = Client.from_config().get(f"apps/{name}/stats", **query)

    def human() -> None:
        series = result.get("series") or {}
        if not series:
            print(f"no stats for {name} in that time range yet")
            return
        res = int(result.get("resolution") or 10)
        times = [float(t) for pts in series.values() for t, _ in pts]
        until = max(times) + res
        since = min(times)
        rows = []
        for key in sorted(series):
            metric, _, instance = key.partition(":")
            points = series[key]
            values = [float(v) for _, v in points]
            rows.append([metric + (f" {instance}" if instance else ""),
                         format_value(metric, values[-1], res),
                         format_value(metric, min(values), res),
                         format_value(metric, max(values), res),
                         chart(points, since, until, blocks=_blocks())])
        print(f"{name}: {res} s buckets, "
              f"{time.strftime('%H:%M', time.gmtime(since))}-"
              f"{time.strftime('%H:%M', time.gmtime(until))} UTC "
              f"(--json for the raw series)")
        table(rows, ["METRIC", "LAST", "MIN", "MAX", "CHART"])

    return out(args, result, human)


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("logs", parents=[common], help="show (and follow) an app's log",
                       description="Show the app's recent log lines; -f follows new ones.")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    p.add_argument("-n", "--num", type=int, default=100, metavar="N",
                   help="how many recent lines (default 100)")
    p.add_argument("--source", action="append", metavar="SOURCE",
                   help="only this source (web.1, worker, build, router, platform, run); "
                        "repeatable")
    p.add_argument("--grep", metavar="REGEX", help="only lines matching this regular expression")
    p.add_argument("--since", metavar="WHEN",
                   help="only lines since then: 90s, 15m, 1h, 2d, epoch seconds or ISO 8601")
    p.set_defaults(func=cmd_logs)
    q = sub.add_parser("stats", parents=[common], help="show an app's request and process stats",
                       description="Time series of the app's stats (requests by status class, "
                                   "latency, memory, CPU, restarts).")
    q.add_argument("--metric", metavar="NAME",
                   help="a metric name or prefix: requests, status_5xx, latency, memory, cpu, ...")
    q.add_argument("--since", metavar="WHEN", help="90s, 15m, 1h, 2d, epoch seconds or ISO 8601")
    q.add_argument("--resolution", type=int, choices=(10, 60), help="bucket seconds")
    q.set_defaults(func=cmd_stats)
