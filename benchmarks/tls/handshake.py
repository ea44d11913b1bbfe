#!/usr/bin/env python3
"""TLS handshake benchmark: epio's router vs HAProxy vs nginx, same certificate.

Run by hand from the checkout (haproxy, nginx, openssl, taskset from Debian):

    .venv/bin/python benchmarks/tls/handshake.py [--time 5] [--rounds 2] [--workers 2]

For each proxy (one process each, pinned to CPU 0; the client on CPU 1) it
terminates TLS for one hostname with the same ECDSA P-256 certificate and a
backend behind it (nginx, 100-byte body), and measures with ``openssl s_time``:

- **new**: full handshakes per second (``-new``: a new session every connection,
  one HTTP/1.0 GET each) -- the cost of a first visit;
- **reuse**: resumed handshakes per second (``-reuse``: the session from the first
  connection offered again) -- what a returning client costs; a proxy that does
  not resume shows about the same figure as ``new``.

It prints connections/s per proxy and the epio/HAProxy ratio of the same round.
``--workers N`` runs epio with ``lb.workers = N`` (all its processes on CPU 0, the
CPU figure summed over them): the share resumed then shows whether a session from
one router process resumes on another; ``--affinity client`` sets
``lb.tls_affinity = "client"`` (the one client then meets one process).
The machine is shared: run two rounds and read the spread.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lb"))
from run import (  # noqa: E402  (benchmarks/lb/run.py: the same procs, backend, pinning)
    CHECKOUT,
    HOST,
    Procs,
    free_port,
    group_cpu,
    pin,
    start_backend,
    wait_port,
)


def make_cert(tmp: Path) -> Path:
    """One self-signed ECDSA P-256 certificate for HOST: key + certificate in one PEM
    (the format of epio's lb.tls_cert_dir, HAProxy's crt and nginx's both)."""
    key, crt = tmp / "key.pem", tmp / "crt.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj",
                    f"/CN={HOST}", "-addext", f"subjectAltName=DNS:{HOST}",
                    "-keyout", str(key), "-out", str(crt)], check=True, capture_output=True)
    certs = tmp / "certs"
    certs.mkdir()
    pem = certs / f"{HOST}.pem"
    pem.write_bytes(key.read_bytes() + crt.read_bytes())
    return pem


def start_epio(procs: Procs, tmp: Path, backend: int, pem: Path, workers: int = 1,
               affinity: str = "none") -> int:
    port, tls = free_port(), free_port()
    (tmp / "routes.toml").write_text(
        f'[apps.bench]\nhostnames = ["{HOST}"]\nbackends = ["127.0.0.1:{backend}"]\n')
    (tmp / "epio.toml").write_text(
        f'[lb]\nworkers = {workers}\ntls_listen = "tcp:{tls}:interface=127.0.0.1"\n'
        f'tls_cert_dir = "{pem.parent}"\ntls_affinity = "{affinity}"\n')
    env = {"PYTHONPATH": str(CHECKOUT), "PATH": "/usr/bin:/bin"}
    procs.start([*pin(0), sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                 "-n", "--pidfile=", "--logfile", str(tmp / "epio.log"), "epio", "--role=lb",
                 "--config", str(tmp / "epio.toml"), "--routes", str(tmp / "routes.toml"),
                 "--lb-listen", f"tcp:{port}:interface=127.0.0.1",
                 "--data-dir", str(tmp / "epio-data")], env=env, cwd=str(tmp))
    wait_port(tls, what="epio tls", log=tmp / "epio.log")
    deadline = time.monotonic() + 30
    while (tmp / "epio.log").read_text().count("router listening on") < 2 * workers:
        if time.monotonic() > deadline:
            raise SystemExit("epio's workers did not start:\n"
                             + (tmp / "epio.log").read_text()[-3000:])
        time.sleep(0.1)
    return tls


def start_haproxy(procs: Procs, tmp: Path, backend: int, pem: Path) -> int | None:
    if not shutil.which("haproxy"):
        return None
    port = free_port()
    conf = tmp / "haproxy.cfg"
    conf.write_text(f"""
global
  maxconn 4096
  nbthread 1
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend fe
  bind 127.0.0.1:{port} ssl crt {pem}
  default_backend be
backend be
  http-reuse always
  server s1 127.0.0.1:{backend}
""")
    procs.start([*pin(0), "haproxy", "-f", str(conf), "-db"])
    wait_port(port, what="haproxy")
    return port


def start_nginx(procs: Procs, tmp: Path, backend: int, pem: Path) -> int | None:
    if not shutil.which("nginx"):
        return None
    port = free_port()
    conf = tmp / "nginx-tls.conf"
    conf.write_text(f"""
worker_processes 1;
daemon off;
pid {tmp}/nginx-tls.pid;
error_log {tmp}/nginx-tls.err;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  ssl_session_cache shared:tls:10m;
  upstream be {{ server 127.0.0.1:{backend}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port} ssl;
    server_name {HOST};
    ssl_certificate {pem};
    ssl_certificate_key {pem};
    location / {{
      proxy_pass http://be;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
    }}
  }}
}}
""")
    procs.start([*pin(0), "nginx", "-c", str(conf)])
    wait_port(port, what="nginx tls", log=tmp / "nginx-tls.err")
    return port


CLIENT = r"""
import socket, ssl, sys, time
port, mode, seconds, host = int(sys.argv[1]), sys.argv[2], float(sys.argv[3]), sys.argv[4]
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
req = b"GET / HTTP/1.1\r\nHost: " + host.encode() + b"\r\nConnection: close\r\n\r\n"
session, n, resumed = None, 0, 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    raw = socket.create_connection(("127.0.0.1", port))
    s = ctx.wrap_socket(raw, server_hostname=host, session=session if mode == "reuse" else None)
    s.sendall(req)
    while s.recv(65536):
        pass
    resumed += s.session_reused
    if mode == "reuse" and session is None:
        session = s.session
    s.close()
    n += 1
print(n, resumed)
"""


def s_time(port: int, mode: str, seconds: int, pgid: int | None) -> tuple[float, float, float]:
    """Handshakes per second one client completed (``mode``: new or reuse; one GET per
    connection, SNI = HOST), the share of them resumed, and the server's CPU
    microseconds per handshake (its process group's CPU time over the run)."""
    before = group_cpu(pgid) if pgid else 0.0
    t0 = time.monotonic()
    out = subprocess.run([*pin(1), sys.executable, "-c", CLIENT, str(port), mode,
                          str(seconds), HOST], capture_output=True, text=True,
                         timeout=seconds + 30)
    elapsed = time.monotonic() - t0
    if out.returncode != 0:
        raise SystemExit(f"client against {port} ({mode}) failed:\n{out.stderr}")
    n, resumed = (int(x) for x in out.stdout.split())
    cpu = (group_cpu(pgid) - before) if pgid else 0.0
    return n / elapsed, resumed / max(n, 1), cpu / max(n, 1) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--time", type=int, default=5, help="seconds per measurement")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1, help="epio's lb.workers")
    ap.add_argument("--affinity", default="none", choices=("none", "client"),
                    help="epio's lb.tls_affinity")
    args = ap.parse_args()
    procs = Procs()
    with tempfile.TemporaryDirectory(prefix="epio-tls-bench-") as d:
        tmp = Path(d)
        try:
            pem = make_cert(tmp)
            backend, kind = start_backend(procs, tmp)
            ports: dict[str, tuple[int, int]] = {}
            starters: tuple[tuple[str, Any], ...] = (
                ("epio", lambda *a: start_epio(*a, workers=args.workers,
                                                affinity=args.affinity)),
                ("haproxy", start_haproxy), ("nginx", start_nginx))
            for name, start in starters:
                port = start(procs, tmp, backend, pem)
                if port is not None:
                    ports[name] = (port, procs.last)
            print(f"backend: {kind}; certificate: ECDSA P-256; one Python client; "
                  f"epio lb.workers = {args.workers}, tls_affinity = {args.affinity}; "
                  f"{args.time}s per figure; cpu = the proxy's CPU per handshake")
            for r in range(1, args.rounds + 1):
                for mode in ("new", "reuse"):
                    got = {name: s_time(port, mode, args.time, pgid)
                           for name, (port, pgid) in ports.items()}
                    line = "  ".join(f"{n} {v:6.0f}/s ({int(100 * res)}% resumed, "
                                     f"cpu {cpu:5.0f} us)" for n, (v, res, cpu) in got.items())
                    ratio = ""
                    if "haproxy" in got:
                        ratio = (f"  epio/haproxy {got['epio'][0] / got['haproxy'][0]:.2f} "
                                 f"(by cpu {got['haproxy'][2] / got['epio'][2]:.2f})")
                    print(f"round {r} {mode:5}: {line}{ratio}", flush=True)
        finally:
            procs.stop()


if __name__ == "__main__":
    main()
