"""Helper processes of the nexus benchmark (run by run.py, one subcommand each).

``procs.py store URL APPS``
    create APPS apps (``app-0000`` ...) plus ``probe`` and ``stable`` in the store.
``procs.py backend STATE_FILE NAME [NAME ...]``
    one HTTP server per NAME on 127.0.0.1 (free ports), each answering its NAME;
    writes ``{NAME: port}`` to STATE_FILE.
``procs.py churn SECRET_FILE NODES PER_NODE APPS CHANGES INTERVAL HB_ENDPOINT [HB_ENDPOINT ...]``
    NODES simulated runners, PER_NODE instances each spread over APPS apps,
    heartbeating every INTERVAL seconds to every nexus; while churning, each
    heartbeat flips CHANGES instances of the node between healthy and starting
    (route churn).  SIGUSR1 toggles churning; CHURN_START_OFF=1 starts without.
"""

from __future__ import annotations

import json
import os
import random
import sys
import uuid
from pathlib import Path
from typing import Any


def cmd_store(url: str, apps: str) -> None:
    from twisted.internet import defer, task

    async def run(reactor: Any) -> None:
        from epio.store import open_store

        store = await open_store(url, reactor)
        try:
            user = await store.create_user("bench")
            for name in ["probe", "stable", *(f"app-{i:04d}" for i in range(int(apps)))]:
                await store.create_app(name, user.id)
                # release 1, the one the stand-in runners announce (the nexus routes
                # only releases whose options it has read)
                await store.create_release(name, processes={"web": "serve"})
        finally:
            await store.close()

    task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor)))


def cmd_backend(state_file: str, *names: str) -> None:
    from twisted.internet import reactor
    from twisted.web import resource, server

    class Answer(resource.Resource):
        isLeaf = True

        def __init__(self, name: str) -> None:
            super().__init__()
            self.body = name.encode()

        def render(self, request: Any) -> bytes:
            return self.body

    ports = {}
    for name in names:
        site = server.Site(Answer(name))
        site.noisy = False
        ports[name] = reactor.listenTCP(0, site, interface="127.0.0.1").getHost().port
    tmp = state_file + ".tmp"
    Path(tmp).write_text(json.dumps(ports))
    os.replace(tmp, state_file)
    reactor.run()


def cmd_churn(secret_file: str, nodes: str, per_node: str, apps: str, changes: str,
              interval: str, *endpoints: str) -> None:
    from twisted.internet import reactor, task

    from epio.bus import Bus

    secret = bytes.fromhex(Path(secret_file).read_text().strip())
    bus = Bus(reactor, secret, "bench-churn")
    pub = bus.publisher(connect=list(endpoints))
    pub.startService()
    n_nodes, n_per, n_apps, n_changes = int(nodes), int(per_node), int(apps), int(changes)
    every = float(interval)
    rng = random.Random(4)
    fleet = []
    k = 0
    for n in range(n_nodes):
        insts = []
        for j in range(n_per):
            insts.append({
                "instance_id": f"i{n:03d}-{j:03d}", "app": f"app-{k % n_apps:04d}", "release": 1,
                "process_type": "web", "host": "127.0.0.1", "port": 20000 + k % 40000,
                "state": "healthy", "since": 0.0, "restarts": 0,
            })
            k += 1
        fleet.append({"node_id": f"bench-{n:03d}", "boot_id": uuid.uuid4().hex, "seq": 0,
                      "instances": insts})

    def beat(node: dict[str, Any]) -> None:
        insts = node["instances"]
        if churning["on"]:
            insts = [dict(i) for i in insts]
            for i in rng.sample(range(len(insts)), min(n_changes, len(insts))):
                insts[i]["state"] = "starting" if insts[i]["state"] == "healthy" else "healthy"
            node["instances"] = insts
        node["seq"] += 1
        pub.publish("runner.heartbeat", {
            "node_id": node["node_id"], "boot_id": node["boot_id"], "seq": node["seq"],
            "interval": every, "load": {"cpu": 0.0, "mem": 0.0, "instances": len(insts)},
            "control": "tcp://127.0.0.1:1", "advertise_host": "127.0.0.1",
            "instances": insts,
        }, topic=b"hb")

    churning = {"on": n_changes > 0 and os.environ.get("CHURN_START_OFF") != "1"}

    def toggle(*_: Any) -> None:
        churning["on"] = not churning["on"]

    import signal

    signal.signal(signal.SIGUSR1, lambda *a: reactor.callFromThread(toggle))
    # spread the nodes' heartbeats evenly over the interval
    for n, node in enumerate(fleet):
        loop = task.LoopingCall(beat, node)
        reactor.callLater(every * n / max(1, n_nodes), loop.start, every)
    reactor.run()


def main() -> None:
    cmd, *args = sys.argv[1:]
    {"store": cmd_store, "backend": cmd_backend, "churn": cmd_churn}[cmd](*args)


if __name__ == "__main__":
    main()
