"""A bus peer in its own OS process, driven by the integration tests.

Usage: ``python peer.py SECRET_HEX NODE_ID HOST [ROUTER_PORT PULL_PORT PUB_PORT]``

It binds a ROUTER (answers ``test.echo`` with ``n + 1``; ``sleep`` delays the
answer, ``fail="remote"`` raises RemoteError, ``fail="crash"`` raises a bug), a
PULL (records ``test.job``) and a PUB, on HOST (ports 0 = free ports).  It
writes JSON lines to stdout -- first ``{"event": "ready", ...endpoints}`` --
and reads JSON commands from stdin:

- ``{"cmd": "publish", "topic": "a.x", "n": 1}``: publish ``test.event``;
- ``{"cmd": "state"}``: answers ``{"event": "state", "pulled": [...],
  "handled": [...], "counters": {...}}``;
- ``{"cmd": "count"}``: answers ``{"event": "count", "pulled": N}``;
- ``{"cmd": "exit"}`` (or stdin closing): stop every service and exit 0.
"""

from __future__ import annotations

import json
import os
import sys

from twisted.internet import defer, reactor, stdio, task
from twisted.protocols.basic import LineReceiver

from epio.bus import Bus, RemoteError, bus_settings
from epio.bus.testing import TEST_REGISTRY


def out(**kw: object) -> None:
    sys.stdout.write(json.dumps(kw) + "\n")
    sys.stdout.flush()


class Peer:
    def __init__(self, secret: bytes, node: str, host: str, ports: list[int]) -> None:
        encrypt = os.environ.get("EPIO_BUS_ENCRYPT", "1") != "0"
        self.bus = Bus(reactor, secret, node, bus_settings(max_skew=30.0, encrypt=encrypt), registry=TEST_REGISTRY)
        h = f"[{host}]" if ":" in host else host
        self.pulled: list[int] = []
        self.handled: list[int] = []
        self.router = self.bus.router(f"tcp://{h}:{ports[0]}", self.handle)
        self.pull = self.bus.pull(f"tcp://{h}:{ports[1]}", self.got_job)
        self.pub = self.bus.publisher(bind=f"tcp://{h}:{ports[2]}")
        self.services = [self.router, self.pull, self.pub]

    async def handle(self, env):
        self.handled.append(env.body["n"])
        if env.body.get("sleep"):
            await task.deferLater(reactor, env.body["sleep"])
        fail = env.body.get("fail")
        if fail == "remote":
            raise RemoteError("boom", "asked to fail")
        if fail == "crash":
            raise ZeroDivisionError("secret internal detail")
        return "test.echoed", {"n": env.body["n"] + 1}

    def got_job(self, env) -> None:
        self.pulled.append(env.body["n"])

    def start(self) -> None:
        for s in self.services:
            s.startService()
        out(event="ready", router=self.router.endpoint, pull=self.pull.endpoint,
            pub=self.pub.endpoint)

    def stop(self) -> None:
        for s in self.services:
            if s.running:
                s.stopService()

    def command(self, cmd: dict) -> None:
        if cmd["cmd"] == "publish":
            self.pub.publish("test.event", {"n": cmd["n"]}, topic=cmd["topic"].encode())
        elif cmd["cmd"] == "state":
            out(event="state", pulled=self.pulled, handled=self.handled,
                counters={
                    "router": self.router.counters.snapshot(),
                    "pull": self.pull.counters.snapshot(),
                    "bus": self.bus.counters.snapshot(),
                })
        elif cmd["cmd"] == "count":
            out(event="count", pulled=len(self.pulled))
        elif cmd["cmd"] == "exit":
            self.stop()
            reactor.stop()


class Commands(LineReceiver):
    delimiter = b"\n"

    def __init__(self, peer: Peer) -> None:
        self.peer = peer

    def lineReceived(self, line: bytes) -> None:
        self.peer.command(json.loads(line))

    def connectionLost(self, reason: object = None) -> None:
        if reactor.running:
            self.peer.stop()
            reactor.stop()


def main() -> None:
    secret = bytes.fromhex(sys.argv[1])
    ports = [int(p) for p in sys.argv[4:7]] or [0, 0, 0]
    peer = Peer(secret, sys.argv[2], sys.argv[3], ports)
    stdio.StandardIO(Commands(peer))
    reactor.callWhenRunning(peer.start)
    reactor.run()


if __name__ == "__main__":
    defer.setDebugging(False)
    main()
