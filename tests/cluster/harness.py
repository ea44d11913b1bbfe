"""A multi-host epio cluster on one machine: hosts are network namespaces.

Each "host" is a network namespace ``epioc-hN`` with one veth into the bridge
``epioc-br`` (no uplink: nothing leaves the machine) and its own address
``10.231.0.N/24``.  The root namespace has ``10.231.0.254`` on the bridge, so
this process, the ``epio`` CLI and a browser reach every host.  Each host runs
one ``twistd epio --role=...`` node as an operator would: its own TOML config
(written here), its own data dir, the shared cluster secret and the PostgreSQL
store.  The store is a private PostgreSQL (``initdb``/``pg_ctl`` of
/usr/lib/postgresql/15, as the ``postgres`` user) in the store host's
namespace, listening on that host's address, trust for the bridge subnet only,
with a streaming-replication standby (``pg_basebackup -R``) on a host of its own;
the store URL lists both with ``target_session_attrs=read-write``.

Processes enter their host with ``nsenter --net=/run/netns/NAME`` rather than
``ip netns exec``: the latter also remounts /sys, which hides the cgroup v1
hierarchies under /sys/fs/cgroup that the runner puts instances in.

Everything made here is named ``epioc-*`` (namespaces, bridge, veths, the
temp dir prefix) so a crashed earlier run is swept by name on the next
``up()``.  One run at a time holds ``/run/epioc.lock``.

Operator use (as root)::

    python -m tests.cluster.harness up      # start, print addresses; Ctrl-C stops
    python -m tests.cluster.harness down    # remove what a crashed run left
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tests.util import TWISTD, epio_env, to_toml

PREFIX = "epioc-"
BRIDGE = PREFIX + "br"
NET = "10.231.0"
ROOT_ADDR = f"{NET}.254"  # the root namespace's address on the bridge
LOCK_PATH = Path("/run/epioc.lock")
PG_BIN = Path("/usr/lib/postgresql/15/bin")
UIDS = (61000, 61999)  # app UIDs of this cluster: one range for every node (the api
# allocates from it, runners refuse others), apart from the default range other nodes
# of this machine use

# host name -> roles; the store host also runs the private PostgreSQL
LAYOUT: list[tuple[str, list[str]]] = [
    ("h1", ["api", "lb", "logger"]),
    ("h2", ["api", "lb", "logger"]),
    ("h3", ["nexus"]),
    ("h4", ["nexus"]),
    ("h5", ["runner"]),
    ("h6", ["runner"]),
    ("h7", ["runner"]),
    ("h8", ["backup"]),
    ("h9", ["api"]),  # a third api: one is left when the leader's host dies after h2
    ("h10", []),  # the store's standby PostgreSQL only (no epio node)
]
STORE_HOST = "h8"
STANDBY_HOST = "h10"

# [api]/[runner] settings the chaos figures depend on (docs/cluster.md quotes them)
API_SETTINGS: dict[str, object] = {
    "reconcile_interval": 1.0, "runner_dead_after": 5.0, "drain_seconds": 1.0,
    "stop_grace": 3.0, "rollout_timeout": 120.0, "status_timeout": 3.0,
}


AS_PG = ["runuser", "-u", "postgres", "--"]


def sh(*argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {r.returncode}: {r.stdout}{r.stderr}")
    return r


def in_ns(ns: str) -> list[str]:
    """The argv prefix that runs a command in network namespace ``ns`` only."""
    return ["nsenter", f"--net=/run/netns/{ns}"]


def ns_pids(ns: str) -> list[int]:
    r = sh("ip", "netns", "pids", ns, check=False)
    return [int(p) for p in r.stdout.split()] if r.returncode == 0 else []


def kill_ns(ns: str) -> None:
    """SIGKILL every process in namespace ``ns`` (until none is left, at most ~5 s)."""
    for _ in range(50):
        pids = ns_pids(ns)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def sweep(keep: Path | None = None) -> list[str]:
    """Remove every namespace, link and temp dir named ``epioc-*`` (a crashed run's
    leftovers).  Returns what it removed.  Call only while holding the lock."""
    removed = []
    r = sh("ip", "netns", "list", check=False)
    for line in r.stdout.splitlines():
        ns = line.split()[0] if line.split() else ""
        if ns.startswith(PREFIX):
            kill_ns(ns)
            sh("ip", "netns", "del", ns, check=False)
            removed.append(ns)
    r = sh("ip", "-o", "link", "show", check=False)
    for line in r.stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        if name.startswith(PREFIX):
            sh("ip", "link", "del", name, check=False)
            removed.append(name)
    removed += _remove_cgroups()
    tmp = Path(tempfile.gettempdir())
    for d in tmp.glob(PREFIX + "*"):
        if d.is_dir() and d != keep:
            _unmount_under(d)
            shutil.rmtree(d, ignore_errors=True)
            removed.append(str(d))
    return removed


def _remove_cgroups() -> list[str]:
    """Remove the runners' cgroups (``runner.cgroup_parent`` is ``epioc-hN``)."""
    removed = []
    for cg in Path("/sys/fs/cgroup").glob(f"*/{PREFIX}*"):
        for d in sorted((p for p in cg.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            _rmdir(d)
        _rmdir(cg)
        removed.append(str(cg))
    return removed


def _rmdir(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:  # still holds a process: kill_ns did not reach it; left for later
        pass


def _unmount_under(root: Path) -> None:
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mp = line.split()[4].replace("\\040", " ")
        if mp.startswith(str(root) + "/"):
            points.append(mp)
    for mp in sorted(points, key=len, reverse=True):
        sh("umount", "-l", mp, check=False)


def unavailable() -> str | None:
    """Why no cluster can start here, or None."""
    if os.geteuid() != 0:
        return "the cluster harness needs root (network namespaces, a bridge)"
    for tool in ("ip", "nsenter", "runuser", "psql"):
        if shutil.which(tool) is None:
            return f"the cluster harness needs {tool!r} on PATH"
    if not (PG_BIN / "initdb").exists() or not (PG_BIN / "pg_basebackup").exists():
        return f"the cluster harness needs PostgreSQL 15 in {PG_BIN}"
    return None


class Node:
    """One ``twistd -n epio`` process in a host's namespace."""

    def __init__(self, host: Host, roles: list[str],
                 config: dict[str, dict[str, object]] | None):
        """``config`` None: the host joined (``epio-admin join`` wrote its config, with
        its data dir in it), and the node starts with ``--config`` and ``--role`` only."""
        self.host = host
        self.roles = roles
        self.dir = host.dir
        self.data_dir = host.dir / "data"
        self.config_path = host.dir / "epio.toml"
        if config is not None:
            self.config_path.write_text(to_toml(config))
        self.log_path = host.dir / "node.log"
        self.argv = [*in_ns(host.ns), *TWISTD, "-n", "--pidfile=", "--logfile=-", "epio",
                     *(["--data-dir", str(self.data_dir)] if config is not None else []),
                     "--config", str(self.config_path), "--role=" + ",".join(roles)]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                         env=epio_env(), cwd=str(self.dir),
                                         start_new_session=True)
        finally:
            log.close()

    def output(self) -> str:
        try:
            return self.log_path.read_text("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, text: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output():
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"{self.host.name} exited ({self.proc.returncode}) "
                                     f"before {text!r}:\n{self.output()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.host.name}: {text!r} not logged after "
                                     f"{timeout}s:\n{self.output()[-4000:]}")
            time.sleep(0.1)


class Host:
    def __init__(self, cluster: Cluster, index: int, name: str, roles: list[str]):
        self.name = name
        self.roles = roles
        self.ns = PREFIX + name
        self.veth = PREFIX + name
        self.addr = f"{NET}.{index}"
        self.dir = cluster.root / name
        self.node: Node | None = None

    def create(self) -> None:
        sh("ip", "netns", "add", self.ns)
        sh("ip", "link", "add", self.veth, "type", "veth", "peer", "name", "eth0",
           "netns", self.ns)
        sh("ip", "link", "set", self.veth, "master", BRIDGE, "up")
        ns = ["ip", "netns", "exec", self.ns]
        sh(*ns, "ip", "addr", "add", f"{self.addr}/24", "dev", "eth0")
        sh(*ns, "ip", "link", "set", "eth0", "up")
        sh(*ns, "ip", "link", "set", "lo", "up")
        self.dir.mkdir(mode=0o711)

    def kill(self) -> None:
        """The host dies: its link goes down first (as a lost power supply looks from
        the network: no reset for open or new connections, only silence), then every
        process of it is SIGKILLed."""
        sh("ip", "link", "set", self.veth, "down", check=False)
        kill_ns(self.ns)
        if self.node is not None and self.node.proc is not None:
            self.node.proc.wait(10)

    def revive(self) -> None:
        """The host comes back after :meth:`kill` (power restored): its link up, its
        node started again with the same config and data dir (its log goes on in the
        same file)."""
        sh("ip", "link", "set", self.veth, "up")
        if self.node is not None:
            self.node.start()

    def is_up(self) -> bool:
        return "state UP" in sh("ip", "link", "show", self.veth, check=False).stdout


class Cluster:
    """The whole cluster; ``up()`` builds it, ``down()`` removes all of it."""

    def __init__(self, layout: Sequence[tuple[str, list[str]]] = LAYOUT) -> None:
        self.layout = list(layout)
        self.root = Path(tempfile.mkdtemp(prefix=PREFIX))
        os.chmod(self.root, 0o711)  # app and build users, postgres traverse it
        self.hosts = {name: Host(self, i + 1, name, roles)
                      for i, (name, roles) in enumerate(self.layout)}
        self.lock_fd: int | None = None
        self.store_url = ""
        self.pg_primary = STORE_HOST  # the host whose PostgreSQL takes writes
        self.token = ""

    # -- the parts -------------------------------------------------------------------

    def with_role(self, role: str) -> list[Host]:
        return [h for h in self.hosts.values() if role in h.roles]

    def api_url(self, host: Host | None = None) -> str:
        return f"http://{(host or self.with_role('api')[0]).addr}:8000"

    def log(self, message: str) -> None:
        sys.stderr.write(f"[cluster] {time.strftime('%H:%M:%S')} {message}\n")

    # -- up and down -----------------------------------------------------------------

    def acquire(self) -> None:
        LOCK_PATH.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RuntimeError(f"another cluster harness run holds {LOCK_PATH}") from None
        self.lock_fd = fd

    def up(self) -> None:
        self.acquire()
        left = sweep(keep=self.root)
        if left:
            self.log(f"swept leftovers of an earlier run: {left}")
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "addr", "add", f"{ROOT_ADDR}/24", "dev", BRIDGE)
        sh("ip", "link", "set", BRIDGE, "up")
        for host in self.hosts.values():
            host.create()
        self.start_store()
        secret = self.root / "cluster-secret"
        fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, secrets.token_hex(32).encode() + b"\n")
        os.close(fd)
        for host in self.hosts.values():
            if host.roles:
                host.node = Node(host, host.roles, self.config(host, secret))
                host.node.start()
        for host in self.hosts.values():
            if host.node is None:
                continue
            ready = {"api": "api ready", "nexus": " ready: ", "runner": "",
                     "lb": "router listening on", "logger": "", "backup": ""}
            for role in host.roles:
                if ready.get(role):
                    host.node.wait_for_log(ready[role], timeout=120)
        token_files = [h.dir / "data" / "admin-token" for h in self.with_role("api")]
        deadline = time.monotonic() + 30
        while not any(p.exists() for p in token_files):
            if time.monotonic() > deadline:
                raise AssertionError("no api wrote an admin token")
            time.sleep(0.1)
        self.token = next(p for p in token_files if p.exists()).read_text().strip()
        self.wait_runners(len(self.with_role("runner")))

    def add_host(self, name: str, roles: list[str]) -> Host:
        """A new bare host on the bridge (the next address), no node yet: a test joins
        it (``join``).  ``down`` removes it with the others."""
        index = max(int(h.addr.rsplit(".", 1)[1]) for h in self.hosts.values()) + 1
        host = Host(self, index, name, roles)
        self.hosts[name] = host
        host.create()
        return host

    def join(self, host: Host, token: str, sets: Sequence[str] = ()) -> str:
        """``epio-admin join`` in ``host``'s namespace with the store URL and ``token``
        (given on stdin, as an operator pipes it): the one command; returns its stdout."""
        argv = [*in_ns(host.ns), sys.executable, "-c", "from epio.admin import main; main()",
                "join", "--store", self.store_url, "--token", "-",
                "--role", ",".join(host.roles), "--data-dir", str(host.dir / "data"),
                "--config", str(host.dir / "epio.toml")]
        for item in sets:
            argv += ["--set", item]
        r = subprocess.run(argv, input=token + "\n", capture_output=True, text=True,
                           env=epio_env(), timeout=60)
        if r.returncode != 0:
            raise AssertionError(f"epio-admin join on {host.name} exited {r.returncode}: "
                                 f"{r.stdout}{r.stderr}")
        return r.stdout

    def runner_sets(self, host: Host) -> list[str]:
        """The ``--set`` items a joined runner host needs here that a real host would not
        (one kernel for all: its own cgroup parent and app port block; no uplink: the local
        package index), as ``config`` gives the runners of the layout."""
        k = len([h for h in self.hosts.values() if "runner" in h.roles
                 and h is not host and int(h.addr.rsplit(".", 1)[1]) < int(
                     host.addr.rsplit(".", 1)[1])])
        base = 21000 + 100 * k
        fence = "[" + ", ".join(f'"{h.addr}"' for h in self.hosts.values()) + "]"
        return [f"runner.port_min={base}", f"runner.port_max={base + 99}",
                f'runner.cgroup_parent="{PREFIX}{host.name}"', f"runner.fence_hosts={fence}",
                "runner.backoff_initial=0.2", 'build.index_url="file:///opt/pypi/simple"',
                'build.gunicorn="gunicorn"']

    def start_store(self) -> None:
        """The primary on STORE_HOST, then its standby on STANDBY_HOST (a base backup of
        the primary with ``-R``: it streams from the primary and answers reads only)."""
        host, standby = self.hosts[STORE_HOST], self.hosts[STANDBY_HOST]
        pgdata = host.dir / "pg"
        pgdata.mkdir(mode=0o700)
        shutil.chown(pgdata, "postgres", "postgres")
        sh(*AS_PG, str(PG_BIN / "initdb"), "-D", str(pgdata), "-A", "trust", "-U", "postgres",
           "--no-sync", timeout=120)
        with open(pgdata / "pg_hba.conf", "w") as f:
            f.write("local all all trust\n"
                    f"host all all {NET}.0/24 trust\n"
                    f"host replication all {NET}.0/24 trust\n")
        self.pg_ctl(host, "start")
        sh("psql", "-h", host.addr, "-U", "postgres", "-d", "postgres", "-q", "-c",
           "CREATE DATABASE epio")
        copy = standby.dir / "pg"
        copy.mkdir(mode=0o700)
        shutil.chown(copy, "postgres", "postgres")
        sh(*in_ns(standby.ns), *AS_PG, str(PG_BIN / "pg_basebackup"), "-h", host.addr,
           "-U", "postgres", "-D", str(copy), "-R", "-X", "stream", "--no-sync",
           "--checkpoint=fast", timeout=120)
        # the copy has the primary's unix socket lock (its socket dir is its data dir)
        (copy / ".s.PGSQL.5432.lock").unlink(missing_ok=True)
        self.pg_ctl(standby, "start")
        self.store_url = (f"postgresql://postgres@{host.addr}:5432,{standby.addr}:5432/epio"
                          "?target_session_attrs=read-write")

    def pg_ctl(self, host: Host, action: str) -> None:
        """``pg_ctl start`` or ``promote`` of the PostgreSQL in ``host``'s dir, in its
        namespace, as the postgres user."""
        pgdata = host.dir / "pg"
        opts = ["-l", str(pgdata / "postgres.log"), "-o",
                f"-c listen_addresses={host.addr} -c port=5432 "
                f"-c unix_socket_directories={pgdata} -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
                ] if action == "start" else []
        sh(*in_ns(host.ns), *AS_PG, str(PG_BIN / "pg_ctl"), "-D", str(pgdata), "-w",
           "-t", "60", *opts, action, timeout=90)

    def promote_standby(self) -> None:
        """What an HA manager does when the primary is gone: promote the standby."""
        self.pg_ctl(self.hosts[STANDBY_HOST], "promote")
        self.pg_primary = STANDBY_HOST

    def psql(self, sql: str, host: str | None = None) -> str:
        r = sh("psql", "-h", self.hosts[host or self.pg_primary].addr, "-U", "postgres",
               "-d", "epio", "-At", "-c", sql, check=False, timeout=20)
        return r.stdout

    def config(self, host: Host, secret: Path) -> dict[str, dict[str, object]]:
        a = host.addr
        nexus = [{"heartbeat": f"tcp://{n.addr}:7711", "router": f"tcp://{n.addr}:7712",
                  "publish": f"tcp://{n.addr}:7713"} for n in self.with_role("nexus")]
        loggers = self.with_role("logger")
        runners = [h.name for h in self.with_role("runner")]
        doc: dict[str, dict[str, object]] = {
            "node": {"id": host.name, "domain": "localhost"},
            "store": {"url": self.store_url},
            "cluster": {"secret_file": str(secret), "nexus": nexus,
                        "loggers": [f"tcp://{h.addr}:7721" for h in loggers]},
            "metrics": {"listen": f"tcp:9100:interface={a}"},
        }
        if "api" in host.roles:
            doc["api"] = {"listen": f"tcp:8000:interface={a}", **API_SETTINGS}
            doc["logger"] = {"peers": [{"router": f"tcp://{h.addr}:7722",
                                        "publish": f"tcp://{h.addr}:7723"} for h in loggers]}
            doc["backup"] = {"endpoints": [f"tcp://{h.addr}:7741"
                                           for h in self.with_role("backup")]}
        if "lb" in host.roles:
            doc["lb"] = {"listen": f"tcp:8080:interface={a}", "stats_interval": 2.0}
        if "nexus" in host.roles:
            doc["nexus"] = {"heartbeat_bind": f"tcp://{a}:7711", "router_bind": f"tcp://{a}:7712",
                            "publish_bind": f"tcp://{a}:7713"}
        if "logger" in host.roles:
            doc.setdefault("logger", {}).update({
                "pull_bind": f"tcp://{a}:7721", "router_bind": f"tcp://{a}:7722",
                "publish_bind": f"tcp://{a}:7723"})
        if "runner" in host.roles:
            k = runners.index(host.name)
            base = 21000 + 100 * k  # a port range of its own per runner host
            doc["runner"] = {
                "control_bind": f"tcp://{a}:7731", "advertise_host": a,
                "port_min": base, "port_max": base + 99,
                "uid_min": UIDS[0], "uid_max": UIDS[1],
                "cgroup_parent": f"{PREFIX}{host.name}",
                # every host one by one (a network such as 10.231.0.0/24 works too since
                # the fence's interval sets auto-merge)
                "fence_hosts": [h.addr for h in self.hosts.values()],
                "backoff_initial": 0.2,
            }
            # builds see no index but the machine's local one (no uplink); it has gunicorn 26
            doc["build"] = {"index_url": "file:///opt/pypi/simple", "gunicorn": "gunicorn"}
        else:
            # the api allocates app UIDs from this range too
            doc.setdefault("runner", {}).update({"uid_min": UIDS[0], "uid_max": UIDS[1]})
        if "backup" in host.roles:
            doc["backup"] = {"control_bind": f"tcp://{a}:7741",
                             "endpoints": [f"tcp://{a}:7741"]}
        return doc

    def down(self) -> None:
        """Kill every process of every host, remove namespaces, bridge and files.
        Without the lock (another run holds it) only this object's own temp dir."""
        if self.lock_fd is None:
            shutil.rmtree(self.root, ignore_errors=True)
            return
        for host in self.hosts.values():
            kill_ns(host.ns)
        for host in self.hosts.values():
            if host.node is not None and host.node.proc is not None:
                try:
                    host.node.proc.wait(10)
                except subprocess.TimeoutExpired:
                    pass
            sh("ip", "netns", "del", host.ns, check=False)
            sh("ip", "link", "del", host.veth, check=False)
        sh("ip", "link", "del", BRIDGE, check=False)
        _remove_cgroups()
        _unmount_under(self.root)
        shutil.rmtree(self.root, ignore_errors=True)
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None

    # -- asking the cluster ----------------------------------------------------------

    def api(self, method: str, path: str, body: Any = None, host: Host | None = None,
            timeout: float = 10) -> Any:
        req = urllib.request.Request(
            f"{self.api_url(host)}/api/v1/{path}", method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {self.token}",
                     "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())

    def wait_runners(self, n: int, timeout: float = 60) -> None:
        wait_until(f"{n} runners registered", lambda: (lambda nodes: nodes if len(
            [x for x in nodes if "runner" in x.get("roles", [])]) >= n else False)(
                self.api("GET", "nodes")), timeout=timeout)

    def leader(self) -> Host | None:
        """The live api host whose store session holds the scheduler's advisory lock (a
        log line would not do: after a re-election two apis have logged "elected")."""
        from epio.store.backend import lock_key

        addr = self.psql(
            "SELECT a.client_addr FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
            "WHERE l.locktype = 'advisory' AND l.granted "
            f"AND ((l.classid::bigint << 32) | l.objid::bigint) = {lock_key('epio.scheduler')}"
        ).strip()
        return next((h for h in self.with_role("api") if h.addr == addr and h.is_up()), None)

    def lock_holders(self) -> list[str]:
        """Client addresses of the store sessions holding advisory locks (leadership)."""
        return sorted(self.psql(
            "SELECT DISTINCT a.client_addr FROM pg_locks l JOIN pg_stat_activity a "
            "USING (pid) WHERE l.locktype = 'advisory' AND l.granted").split())

    def outputs(self, tail: int = 3000) -> str:
        return "\n".join(f"--- {h.name} ({','.join(h.roles)}) ---\n"
                         + (h.node.output()[-tail:] if h.node else "")
                         for h in self.hosts.values())


def wait_until(what: str, check: Callable[[], Any], timeout: float = 60.0,
               interval: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            result = check()
        except (OSError, ValueError, KeyError, AssertionError) as e:
            result, last = None, e
        else:
            last = result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not true after {timeout:g}s (last: {last!r})")
        time.sleep(interval)


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in ("up", "down"):
        print("usage: python -m tests.cluster.harness up|down", file=sys.stderr)
        return 2
    why = unavailable()
    if why:
        print(why, file=sys.stderr)
        return 1
    if argv[0] == "down":
        c = Cluster(layout=[])
        c.acquire()
        print("removed:", sweep(keep=c.root) or "nothing")
        c.down()
        return 0
    cluster = Cluster()
    try:
        try:
            cluster.up()
        except (AssertionError, RuntimeError, OSError):
            print(cluster.outputs(), file=sys.stderr)
            raise
        print(f"store  {cluster.store_url}")
        for h in cluster.hosts.values():
            print(f"{h.name:3} {h.addr:12} {','.join(h.roles) or 'standby':18} data {h.dir}/data "
                  f"config {h.dir}/epio.toml log {h.dir}/node.log")
        print(f"\nEPIO_API={cluster.api_url()} EPIO_TOKEN={cluster.token} epio apps\n"
              f"routers: " + " ".join(f"http://{h.addr}:8080/" for h in cluster.with_role("lb"))
              + "\nCtrl-C stops the cluster and removes it.")
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    finally:
        cluster.down()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
