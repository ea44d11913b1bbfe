#!/usr/bin/env python3
"""Router benchmark: epio's router vs HAProxy vs nginx in front of one fast backend.

Run by hand from the checkout (root not needed; haproxy, nginx, wrk, taskset from
Debian):

    /work/venv/bin/python benchmarks/lb/run.py [--duration 5] [--rounds 2]

What it does (see docs/router.md):

- backend: nginx (one worker) answering every request with a 100-byte body; if
  nginx is missing, a tiny asyncio server (slower; the ratio is still fair);
- proxies, each with equivalent settings (HTTP/1.1 keep-alive to the backend,
  one process, access log to a file for epio, none for the others):
  ``epio`` (``twistd -n epio --role=lb --routes ...``), ``haproxy`` and ``nginx``;
  plus ``direct`` (wrk straight at the backend) for reference;
- pinning: backend and proxy on CPU 0, the load generator on CPU 1;
- throughput: ``wrk -t1 -c50 -d<duration>s --latency`` per config, printing req/s,
  p50, p99, and the epio/HAProxy ratio of the same round;
- added latency: an open-loop client (below; wrk2 and h2load are not installed)
  sends exactly 1,000 req/s over 32 keep-alive connections for <duration>
  seconds and measures each response from its *scheduled* send time (no
  coordinated omission); added latency = proxied p50/p99 minus direct p50/p99.

The machine is shared: run two rounds and read the spread.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[2]
BODY = b"0123456789" * 10
HOST = "bench.example.com"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0, what: str = "", log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                tail = log.read_text()[-2000:] if log is not None and log.exists() else ""
                raise SystemExit(f"{what}: nothing listening on {port}\n{tail}") from None
            time.sleep(0.05)


# --workers N: the proxies get N processes/threads and CPUs 0..N-1 (the backend
# stays on CPU 0, the load generator on CPU 1)
WORKERS = 1


def pin(cpu: int | str) -> list[str]:
    return ["taskset", "-c", str(cpu)] if shutil.which("taskset") else []


def proxy_cpus() -> str:
    return ",".join(str(i) for i in range(WORKERS))


class Procs:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.last = 0

    def start(self, argv: list[str], **kw: object) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True, **kw)  # type: ignore[call-overload]
        self.procs.append(p)
        self.last = p.pid  # its process group (a new session)
        return p

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


ASYNC_BACKEND = r'''
import asyncio, sys
BODY = b"0123456789" * 10
RESP = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nContent-Type: text/plain\r\n\r\n" + BODY
class P(asyncio.Protocol):
    def connection_made(self, t): self.t = t; self.buf = b""
    def data_received(self, d):
        self.buf += d
        n = self.buf.count(b"\r\n\r\n")
        if n:
            self.buf = self.buf[self.buf.rfind(b"\r\n\r\n") + 4:]
            self.t.write(RESP * n)
async def main():
    srv = await asyncio.get_running_loop().create_server(P, "127.0.0.1", int(sys.argv[1]))
    await srv.serve_forever()
asyncio.run(main())
'''


def start_backend(procs: Procs, tmp: Path) -> tuple[int, str]:
    port = free_port()
    if shutil.which("nginx"):
        conf = tmp / "nginx-backend.conf"
        conf.write_text(f"""
worker_processes 1;
daemon off;
pid {tmp}/nginx-backend.pid;
error_log {tmp}/nginx-backend.err;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 100000000;
  keepalive_timeout 300s;
  server {{
    listen 127.0.0.1:{port};
    location / {{ default_type text/plain; return 200 "{BODY.decode()}"; }}
  }}
}}
""")
        procs.start([*pin(0), "nginx", "-c", str(conf)])
        kind = "nginx (1 worker, 100-byte body)"
    else:
        script = tmp / "backend.py"
        script.write_text(ASYNC_BACKEND)
        procs.start([*pin(0), sys.executable, str(script), str(port)])
        kind = "asyncio (100-byte body)"
    wait_port(port)
    return port, kind


def start_epio(procs: Procs, tmp: Path, backend: int, checkout: Path = CHECKOUT,
               name: str = "epio", workers: int | None = None) -> int:
    """The real router (``twistd epio --role=lb --routes``) of ``checkout``, with
    ``lb.workers`` = ``workers`` (default: ``--workers``)."""
    workers = WORKERS if workers is None else workers
    port = free_port()
    (tmp / f"{name}-routes.toml").write_text(
        f'[apps.bench]\nhostnames = ["{HOST}"]\nbackends = ["127.0.0.1:{backend}"]\n')
    (tmp / f"{name}.toml").write_text(
        f'[lb]\naccess_log = "{tmp}/{name}-access.log"\nworkers = {workers}\n')
    env = dict(os.environ)
    env["PYTHONPATH"] = str(checkout)
    procs.start([*pin(proxy_cpus() if workers > 1 else 0), sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                 "-n", "--pidfile=", "--logfile", str(tmp / f"{name}.log"), "epio", "--role=lb",
                 "--config", str(tmp / f"{name}.toml"), "--routes", str(tmp / f"{name}-routes.toml"),
                 "--lb-listen", f"tcp:{port}:interface=127.0.0.1",
                 "--data-dir", str(tmp / f"{name}-data")], env=env, cwd=str(tmp))
    wait_port(port, what=name, log=tmp / f"{name}.log")
    if workers > 1:
        wait_listeners(port, workers, name, tmp / f"{name}.log")
    return port


def listeners(port: int) -> set[str]:
    """The pids with a listening socket on ``port`` (``ss``)."""
    out = subprocess.run(["ss", "-ltnpH", f"( sport = :{port} )"], capture_output=True,
                         text=True).stdout
    return set(re.findall(r"pid=(\d+)", out))


def wait_listeners(port: int, n: int, what: str, log: Path, timeout: float = 60.0) -> None:
    """Wait until ``n`` processes listen on ``port``: the router's parent listens first and
    its workers a second or more later (a Python interpreter each); connections opened
    before would all go to the parent and measure one process, not ``n``."""
    if not shutil.which("ss"):
        time.sleep(5)
        return
    deadline = time.monotonic() + timeout
    while len(listeners(port)) < n:
        if time.monotonic() > deadline:
            raise SystemExit(f"{what}: {len(listeners(port))} of {n} processes listening\n"
                             f"{log.read_text()[-2000:] if log.exists() else ''}")
        time.sleep(0.1)


def start_haproxy(procs: Procs, tmp: Path, backend: int, threads: int | None = None
                  ) -> int | None:
    """HAProxy with ``nbthread`` = ``threads`` (default: ``--workers``) on as many CPUs."""
    if not shutil.which("haproxy"):
        return None
    threads = WORKERS if threads is None else threads
    port = free_port()
    conf = tmp / f"haproxy{threads}.cfg"
    conf.write_text(f"""
global
  maxconn 4096
  nbthread {threads}
defaults
  mode http
  timeout connect 5s
  timeout client 75s
  timeout server 55s
  timeout http-request 10s
  option http-keep-alive
frontend fe
  bind 127.0.0.1:{port}
  acl host_bench hdr(host) -i {HOST}
  use_backend be if host_bench
backend be
  http-reuse always
  option forwardfor
  server s1 127.0.0.1:{backend}
""")
    procs.start([*pin(proxy_cpus() if threads > 1 else 0), "haproxy", "-f", str(conf), "-db"])
    wait_port(port, what="haproxy")
    return port


def start_nginx_proxy(procs: Procs, tmp: Path, backend: int) -> int | None:
    if not shutil.which("nginx"):
        return None
    port = free_port()
    conf = tmp / "nginx-proxy.conf"
    conf.write_text(f"""
worker_processes {WORKERS};
daemon off;
pid {tmp}/nginx-proxy.pid;
error_log {tmp}/nginx-proxy.err;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 100000000;
  upstream be {{ server 127.0.0.1:{backend}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port};
    server_name {HOST};
    location / {{
      proxy_pass http://be;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $remote_addr;
    }}
  }}
}}
""")
    procs.start([*pin(proxy_cpus()), "nginx", "-c", str(conf)])
    wait_port(port, what="nginx proxy", log=tmp / "nginx-proxy.err")
    return port


def group_cpu(pgid: int) -> float:
    """CPU seconds (user + system) used so far by the processes of group ``pgid``."""
    tck = os.sysconf("SC_CLK_TCK")
    total = 0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # pgrp
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tck


def to_ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    if not m:
        return float("nan")
    v, unit = float(m.group(1)), m.group(2)
    return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v


def run_wrk(port: int, duration: float, groups: tuple[int, ...] = ()
            ) -> tuple[float, float, float, list[float]]:
    """(req/s, p50 ms, p99 ms, CPU µs per request of each process group in ``groups``)."""
    before = [group_cpu(g) for g in groups]
    out = subprocess.run(
        [*pin(1), "wrk", "-t1", "-c50", f"-d{duration:g}s", "--latency", "-H", f"Host: {HOST}",
         f"http://127.0.0.1:{port}/"], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = to_ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = to_ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    n = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    cpu = [(group_cpu(g) - b) / max(n, 1) * 1e6 for g, b in zip(groups, before, strict=True)]
    if "Non-2xx" in out or "Socket errors" in out:
        print("   wrk reported errors:", " | ".join(
            ln.strip() for ln in out.splitlines() if "Non-2xx" in ln or "Socket errors" in ln))
    return rps, p50, p99, cpu


# -- the open-loop fixed-rate client (runs as a separate pinned process) -------------------
async def _open_loop(port: int, rate: float, duration: float, conns: int) -> list[float]:
    req = f"GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()
    queue: asyncio.Queue[float] = asyncio.Queue()
    lat: list[float] = []
    loop = asyncio.get_running_loop()

    async def worker() -> None:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        while True:
            t_sched = await queue.get()
            if t_sched < 0:
                w.close()
                return
            w.write(req)
            head = await r.readuntil(b"\r\n\r\n")
            m = re.search(rb"(?i)content-length:\s*(\d+)", head)
            await r.readexactly(int(m.group(1)) if m else 0)
            lat.append(loop.time() - t_sched)

    tasks = [asyncio.create_task(worker()) for _ in range(conns)]
    await asyncio.sleep(0.2)
    start = loop.time() + 0.05
    n = int(rate * duration)
    for i in range(n):
        t = start + i / rate
        delay = t - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        queue.put_nowait(t)
    for _ in tasks:
        queue.put_nowait(-1.0)
    await asyncio.wait_for(asyncio.gather(*tasks), 30)
    return lat


def open_loop_main(port: int, rate: float, duration: float) -> None:
    lat = sorted(asyncio.run(_open_loop(port, rate, duration, 32)))
    skip = lat[int(len(lat) * 0.0):]
    p50 = skip[len(skip) // 2] * 1000
    p99 = skip[int(len(skip) * 0.99)] * 1000
    print(f"{len(lat)} {p50:.3f} {p99:.3f}")


def run_fixed_rate(port: int, duration: float, rate: float = 1000.0) -> tuple[float, float]:
    out = subprocess.run([*pin(1), sys.executable, __file__, "--open-loop", str(port),
                          "--rate", str(rate), "--duration", str(duration)],
                         capture_output=True, text=True, check=True).stdout.split()
    return float(out[1]), float(out[2])


def start_churn_router(procs: Procs, backend: int, churn: int) -> int:
    p = subprocess.Popen(
        [*pin(0), sys.executable, str(Path(__file__).with_name("churn_router.py")),
         "--backend", str(backend), "--routes", "10000", "--churn", str(churn)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    procs.procs.append(p)  # type: ignore[arg-type]
    line = p.stdout.readline().decode()  # type: ignore[union-attr]
    if not line.startswith("READY"):
        raise SystemExit("churn router did not start")
    return int(line.split()[1])


def churn_main(args: argparse.Namespace) -> None:
    procs = Procs()
    tmp = Path(tempfile.mkdtemp(prefix="epio-lb-churn-"))
    try:
        backend, kind = start_backend(procs, tmp)
        print(f"backend: {kind}; router in-process with 10,000 routes; open loop at "
              f"{args.rate:g} req/s for {args.duration:g}s per run, pinned as above")
        results: dict[str, list[tuple[float, float]]] = {"still": [], "churn": []}
        ports = {"still": start_churn_router(procs, backend, 0),
                 "churn": start_churn_router(procs, backend, args.churn)}
        time.sleep(2.5)  # let the churn start
        for rnd in range(1, args.rounds + 1):
            for name, port in ports.items():
                p50, p99 = run_fixed_rate(port, args.duration, args.rate)
                results[name].append((p50, p99))
                label = "no churn" if name == "still" else f"{args.churn} routes/s churn"
                print(f"  round {rnd} {label:22s} p50 {p50:6.2f} ms   p99 {p99:6.2f} ms")
        for name, v in results.items():
            label = "no churn" if name == "still" else f"{args.churn} routes/s churn"
            print(f"median {label:22s} p50 {statistics.median(x[0] for x in v):6.2f} ms   "
                  f"p99 {statistics.median(x[1] for x in v):6.2f} ms")
    finally:
        procs.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of the whole set")
    ap.add_argument("--rate", type=float, default=1000.0, help="fixed rate for added latency")
    ap.add_argument("--configs", default="direct,epio,haproxy,nginx",
                    help="comma list of configs to run (direct is always measured for latency)")
    ap.add_argument("--no-latency", action="store_true", help="skip the fixed-rate latency runs")
    ap.add_argument("--churn", type=int, default=0, metavar="N",
                    help="instead: latency at --rate with N of 10k routes changing every second "
                         "vs no churn (in-process router, benchmarks/lb/churn_router.py)")
    ap.add_argument("--ref", metavar="CHECKOUT",
                    help="also run the router of another checkout (e.g. a git worktree of "
                         "the previous commit) as config 'ref', in the same rounds, and print "
                         "epio/ref")
    ap.add_argument("--workers", type=int, default=1, metavar="N",
                    help="N proxy processes/threads on CPUs 0..N-1: epio lb.workers = N, "
                         "HAProxy nbthread N, nginx worker_processes N; epio with one "
                         "worker is also run (config 'epio1') for the scaling ratio")
    ap.add_argument("--open-loop", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.open_loop:
        open_loop_main(args.open_loop, args.rate, args.duration)
        return
    if args.churn:
        churn_main(args)
        return
    global WORKERS
    WORKERS = args.workers
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    procs = Procs()
    tmp = Path(tempfile.mkdtemp(prefix="epio-lb-bench-"))
    try:
        backend, kind = start_backend(procs, tmp)
        wanted = set(args.configs.split(",")) | {"direct"}
        backend_group = procs.last
        starters = {"epio": start_epio, "haproxy": start_haproxy, "nginx": start_nginx_proxy}
        ports: dict[str, int | None] = {"direct": backend}
        groups: dict[str, int] = {"direct": 0}
        for name, fn in starters.items():
            if name in wanted:
                ports[name] = fn(procs, tmp, backend)
                groups[name] = procs.last
            if name == "epio" and args.workers > 1:
                ports["epio1"] = start_epio(procs, tmp, backend, CHECKOUT, "epio1", workers=1)
                groups["epio1"] = procs.last
            if name == "haproxy" and args.workers > 1:
                ports["haproxy1"] = start_haproxy(procs, tmp, backend, threads=1)
                groups["haproxy1"] = procs.last
            if name == "epio" and args.ref:
                ports["ref"] = start_epio(procs, tmp, backend, Path(args.ref), "ref")
                groups["ref"] = procs.last
        print(f"backend: {kind}; proxy on CPU(s) {proxy_cpus()}, backend on CPU 0, load on CPU 1; "
              f"wrk -t1 -c50 -d{args.duration:g}s keep-alive")
        for _name, port in ports.items():  # warm-up (and check each config answers)
            if port is not None:
                run_wrk(port, 1)
        all_rps: dict[str, list[float]] = {}
        all_ratio: list[float] = []
        all_cpu_ratio: list[float] = []
        all_added: dict[str, list[float]] = {}
        all_p99_ratio: list[float] = []
        all_ref: list[tuple[float, float, float]] = []
        all_scale: list[float] = []
        all_hscale: list[float] = []
        all_ratio1: list[float] = []
        for rnd in range(1, args.rounds + 1):
            print(f"\nround {rnd}: throughput (load average {os.getloadavg()[0]:.1f})")
            res: dict[str, tuple[float, float, float, list[float]]] = {}
            order = list(ports.items())
            if rnd % 2 == 0:
                order.reverse()  # A/B/B/A: neither config always runs first
            for name, port in order:
                if port is None:
                    print(f"  {name:8s} not installed")
                    continue
                if name == "direct" and "direct" not in args.configs.split(","):
                    continue
                gs = (groups[name], backend_group) if groups[name] else (backend_group,)
                res[name] = run_wrk(port, args.duration, gs)
                rps, p50, p99, cpu = res[name]
                cpu_text = (f"   CPU/req: proxy {cpu[0]:5.1f} us, backend {cpu[1]:5.1f} us"
                            if len(cpu) == 2 else f"   CPU/req: backend {cpu[0]:5.1f} us")
                print(f"  {name:8s} {rps:9.0f} req/s   p50 {p50:6.2f} ms   p99 {p99:6.2f} ms"
                      f"{cpu_text}   (load {os.getloadavg()[0]:.1f})")
            for name, r in res.items():
                all_rps.setdefault(name, []).append(r[0])
            if "haproxy" in res and "epio" in res:
                all_ratio.append(res["epio"][0] / res["haproxy"][0])
                print(f"  epio/haproxy ratio: {res['epio'][0] / res['haproxy'][0]:.2f}")
                (ce, be), (ch, bh) = res["epio"][3], res["haproxy"][3]
                cpu_ratio = (ch + bh) / (ce + be)
                all_cpu_ratio.append(cpu_ratio)
                print(f"  epio/haproxy by CPU per request (proxy + backend on one core): "
                      f"{cpu_ratio:.2f}")
            if "haproxy" in res and "epio" in res:
                p99r = res["epio"][2] / res["haproxy"][2]
                all_p99_ratio.append(p99r)
                print(f"  epio/haproxy p99 at saturation: {p99r:.2f}")
            if "epio1" in res and "epio" in res:
                all_scale.append(res["epio"][0] / res["epio1"][0])
                print(f"  epio {args.workers} workers / 1 worker: {all_scale[-1]:.2f}")
            if "haproxy1" in res and "haproxy" in res:
                all_hscale.append(res["haproxy"][0] / res["haproxy1"][0])
                print(f"  haproxy nbthread {args.workers} / nbthread 1: {all_hscale[-1]:.2f}")
            if "haproxy1" in res and "epio1" in res:
                all_ratio1.append(res["epio1"][0] / res["haproxy1"][0])
                print(f"  epio1/haproxy1 ratio (one worker, one thread): {all_ratio1[-1]:.2f}")
            if "ref" in res and "epio" in res:
                (ce, _), (cr, _) = res["epio"][3], res["ref"][3]
                all_ref.append((res["epio"][0] / res["ref"][0], ce / cr, res["epio"][2] / res["ref"][2]))
                print(f"  epio/ref: req/s {all_ref[-1][0]:.2f}, proxy CPU/req {all_ref[-1][1]:.2f}, "
                      f"p99 {all_ref[-1][2]:.2f}")
            if "nginx" in res and "epio" in res:
                print(f"  epio/nginx ratio:   {res['epio'][0] / res['nginx'][0]:.2f}")
            if args.no_latency:
                continue
            print(f"round {rnd}: latency at a fixed {args.rate:g} req/s (open loop)")
            lat: dict[str, tuple[float, float]] = {}
            for name, port in ports.items():
                if port is None:
                    continue
                lat[name] = run_fixed_rate(port, args.duration, args.rate)
                p50, p99 = lat[name]
                added = ""
                if name != "direct":
                    added = (f"   added p50 {p50 - lat['direct'][0]:+.2f} ms"
                             f"   added p99 {p99 - lat['direct'][1]:+.2f} ms")
                print(f"  {name:8s} p50 {p50:6.2f} ms   p99 {p99:6.2f} ms{added}")
                if name != "direct":
                    all_added.setdefault(name, []).append(p99 - lat["direct"][1])
        print(f"\nmedians over {args.rounds} rounds:")
        for name, v in all_rps.items():
            print(f"  {name:8s} {statistics.median(v):9.0f} req/s   (min {min(v):.0f}, max {max(v):.0f})")
        if all_ratio:
            print(f"  epio/haproxy ratio: median {statistics.median(all_ratio):.2f} "
                  f"(rounds: {', '.join(f'{r:.2f}' for r in all_ratio)})")
        if all_cpu_ratio:
            print(f"  epio/haproxy by CPU per request: median {statistics.median(all_cpu_ratio):.2f} "
                  f"(rounds: {', '.join(f'{r:.2f}' for r in all_cpu_ratio)})")
        if all_p99_ratio:
            print(f"  epio/haproxy p99 at saturation: median {statistics.median(all_p99_ratio):.2f} "
                  f"(rounds: {', '.join(f'{r:.2f}' for r in all_p99_ratio)})")
        if all_scale:
            print(f"  epio {args.workers} workers / 1 worker: median {statistics.median(all_scale):.2f} "
                  f"(rounds: {', '.join(f'{r:.2f}' for r in all_scale)})")
        if all_hscale:
            print(f"  haproxy nbthread {args.workers} / nbthread 1: median "
                  f"{statistics.median(all_hscale):.2f} "
                  f"(rounds: {', '.join(f'{r:.2f}' for r in all_hscale)})")
        if all_ratio1:
            print(f"  epio1/haproxy1 ratio: median {statistics.median(all_ratio1):.2f} "
                  f"(rounds: {', '.join(f'{r:.2f}' for r in all_ratio1)})")
        if all_ref:
            print("  epio/ref: req/s median {:.2f}, proxy CPU/req median {:.2f}, p99 median {:.2f} "
                  "(rounds: {})".format(
                      statistics.median(r[0] for r in all_ref), statistics.median(r[1] for r in all_ref),
                      statistics.median(r[2] for r in all_ref),
                      "; ".join(f"{a:.2f}/{b:.2f}/{c:.2f}" for a, b, c in all_ref)))
        for name, v in all_added.items():
            print(f"  {name:8s} added p99 at {args.rate:g} req/s: median {statistics.median(v):+.2f} ms "
                  f"(rounds: {', '.join(f'{x:+.2f}' for x in v)})")
    finally:
        procs.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
