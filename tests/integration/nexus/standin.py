"""A runner stand-in: real HTTP backends and signed heartbeats to every nexus.

Usage::

    python standin.py --secret-file F --nexus tcp://127.0.0.1:P [--nexus ...]
        --app hello --node n1 --interval 1.0 --state-file S

It starts backend ``1`` (an HTTP server on --host, a free port) that
answers ``backend-1`` to every request, and heartbeats announcing it as a
healthy web instance of the app.  On SIGUSR1 it starts backend ``2`` and
announces only that one from then on (both keep serving).  It writes
``{"ports": {...}, "announced": "1"}`` to the state file after each change.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import uuid
from pathlib import Path
from typing import Any

from twisted.internet import reactor, task
from twisted.web import resource, server


class Answer(resource.Resource):
    isLeaf = True

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name.encode()

    def render(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        return self.name


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--secret-file", required=True)
    p.add_argument("--nexus", action="append", required=True)
    p.add_argument("--app", default="hello")
    p.add_argument("--node", default="standin")
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--state-file", required=True)
    p.add_argument("--host", default="127.0.0.1", help="backend address (127.0.0.1 or ::1)")
    args = p.parse_args()

    from epio.bus import Bus

    secret = bytes.fromhex(Path(args.secret_file).read_text().strip())
    bus = Bus(reactor, secret, args.node)
    pub = bus.publisher(connect=args.nexus)
    pub.startService()
    boot = uuid.uuid4().hex
    ports: dict[str, int] = {}
    state = {"announced": "1", "seq": 0}

    def listen(name: str) -> None:
        port = reactor.listenTCP(0, server.Site(Answer(f"backend-{name}")), interface=args.host)
        ports[name] = port.getHost().port

    def save() -> None:
        tmp = args.state_file + ".tmp"
        Path(tmp).write_text(json.dumps({"ports": ports, "announced": state["announced"],
                                         "pid": os.getpid()}))
        os.replace(tmp, args.state_file)

    def beat() -> None:
        state["seq"] += 1
        name = state["announced"]
        pub.publish("runner.heartbeat", {
            "node_id": args.node, "boot_id": boot, "seq": state["seq"],
            "interval": args.interval,
            "load": {"cpu": 0.0, "mem": 0.0, "instances": 1},
            "control": "tcp://127.0.0.1:1", "advertise_host": args.host,
            "instances": [{
                "instance_id": f"{args.app}-web-{name}", "app": args.app, "release": 1,
                "process_type": "web", "host": args.host, "port": ports[name],
                "state": "healthy", "since": 0.0, "restarts": 0,
            }],
        }, topic=b"hb")

    def switch() -> None:
        if "2" not in ports:
            listen("2")
        state["announced"] = "2"
        save()
        beat()

    listen("1")
    save()
    signal.signal(signal.SIGUSR1, lambda *_: reactor.callFromThread(switch))
    task.LoopingCall(beat).start(args.interval)
    reactor.run()


if __name__ == "__main__":
    main()
