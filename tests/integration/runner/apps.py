"""Source of the tiny apps the runner's integration tests run (plain Python scripts)."""

PROBE = r'''
import json, os, signal, sys

checks = json.loads(os.environ["PROBE"])
out = {"uid": os.getuid(), "gid": os.getgid(), "euid": os.geteuid(),
       "groups": os.getgroups(), "pid": os.getpid(), "home": os.environ.get("HOME")}

def can_read(path):
    try:
        if os.path.isdir(path):
            os.listdir(path)
        else:
            with open(path, "rb") as f:
                f.read(1)
        return True
    except OSError as e:
        return type(e).__name__

out["read"] = {p: can_read(p) for p in checks.get("read", [])}
out["proc_pids"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
kills = {}
for pid in checks.get("kill", []):
    try:
        os.kill(pid, signal.SIGTERM)
        kills[str(pid)] = True
    except OSError as e:
        kills[str(pid)] = type(e).__name__
out["kill"] = kills
data = os.environ["EPIO_DATA_DIR"]
try:
    with open(os.path.join(data, "mine.txt"), "w") as f:
        f.write("hello")
    out["write_data"] = True
except OSError as e:
    out["write_data"] = type(e).__name__
try:
    with open("/app/app/evil.txt", "w") as f:
        f.write("x")
    out["write_image"] = True
except OSError as e:
    out["write_image"] = type(e).__name__
try:
    with open("/tmp/t", "w") as f:
        f.write("x")
    out["write_tmp"] = True
except OSError as e:
    out["write_tmp"] = type(e).__name__
print("RESULT " + json.dumps(out), flush=True)
import time
time.sleep(600)
'''

SLEEPER = r'''
import os, time
print("sleeper up", os.getpid(), flush=True)
time.sleep(600)
'''

WEB = r'''
import os, signal, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class H(BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("hello from %s %s\n" % (os.environ["EPIO_PROCESS"], os.environ.get("EPIO_RELEASE"))).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass

def term(*a):
    print("got SIGTERM", flush=True)
    if os.environ.get("IGNORE_TERM") != "1":
        sys.exit(0)

signal.signal(signal.SIGTERM, term)
srv = ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), H)
print("listening on", os.environ["PORT"], flush=True)
srv.serve_forever()
'''

HOG = r'''
import time
chunks = []
print("allocating", flush=True)
for i in range(64):
    chunks.append(bytearray(16 * 1024 * 1024))  # touches the pages
    print("have", (i + 1) * 16, "MiB", flush=True)
time.sleep(600)
'''

CRASH = r'''
print("starting and dying", flush=True)
raise SystemExit(3)
'''
