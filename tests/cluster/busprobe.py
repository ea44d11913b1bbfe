"""A bus client for the cluster cases, run in a host's namespace (``nsenter``) or the
machine's own: one JSON line per result on stdout.

``where SECRET_FILE ENDPOINT APP [SECONDS [INTERVAL]]``
    ``nexus.where`` for APP to the nexus ROUTER at ENDPOINT as a cluster member (the
    bus of epio, keyed and signing with the cluster secret), every INTERVAL seconds for
    SECONDS (once when 0): ``{"t": epoch, "backends": [instance ids]}`` or
    ``{"t": ..., "error": "..."}``.

``outsider SECRET_FILE ENDPOINT PAYLOAD``
    Three ZeroMQ DEALERs that are not cluster members try ENDPOINT, each sending a
    frame holding PAYLOAD: ``null`` (no CurveZMQ), ``wrong-key`` (CurveZMQ with a
    random server key: no secret), ``server-key`` (the right server key, derived
    from the secret, but a random client key and an unsigned message).  One line
    each: ``{"client": ..., "handshake": "succeeded" | "failed" | "none",
    "reply": bool}`` after 2 s.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import sys
import time
from pathlib import Path
from typing import Any


def read_secret(path: str) -> bytes:
    return bytes.fromhex(Path(path).read_text().strip())


def where(secret_file: str, endpoint: str, app: str, seconds: float, interval: float) -> None:
    from twisted.internet import defer, reactor, task

    from epio.bus import Bus

    bus = Bus(reactor, read_secret(secret_file), "busprobe")
    dealer = bus.dealer([endpoint])

    async def main(_: Any) -> None:
        dealer.startService()
        end = time.time() + seconds
        while True:
            try:
                env = await dealer.request("nexus.where", {"app": app}, timeout=1.0)
                route = env.body.get("route") or {}
                line: dict[str, Any] = {"t": time.time(), "backends": [
                    b.get("instance_id") for b in route.get("backends") or []]}
            except Exception as e:  # a timeout while the nexus is unreachable
                line = {"t": time.time(), "error": str(e) or type(e).__name__}
            print(json.dumps(line), flush=True)
            if time.time() >= end:
                break
            await task.deferLater(reactor, interval, lambda: None)
        dealer.stopService()

    task.react(lambda r: defer.ensureDeferred(main(r)))


def outsider(secret_file: str, endpoint: str, payload: str) -> None:
    import zmq
    from zmq.utils import z85
    from zmq.utils.monitor import recv_monitor_message

    raw = hmac.new(read_secret(secret_file), b"epio-bus-curve-server", hashlib.sha256).digest()
    server_public = zmq.curve_public(z85.encode(raw))
    ctx = zmq.Context()
    for client in ("null", "wrong-key", "server-key"):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.IPV6, 1)
        if client != "null":
            pub, sec = zmq.curve_keypair()
            s.setsockopt(zmq.CURVE_PUBLICKEY, pub)
            s.setsockopt(zmq.CURVE_SECRETKEY, sec)
            s.setsockopt(zmq.CURVE_SERVERKEY,
                         server_public if client == "server-key" else zmq.curve_keypair()[0])
        mon = s.get_monitor_socket()
        s.connect(endpoint)
        s.send_multipart([b"", payload.encode()])
        handshake, reply = "none", False
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            if mon.poll(50):
                ev = recv_monitor_message(mon)["event"]
                if ev == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    handshake = "succeeded"
                elif ev in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                            zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
                            zmq.EVENT_HANDSHAKE_FAILED_AUTH) and handshake == "none":
                    handshake = "failed"
            if s.poll(0):
                s.recv_multipart()
                reply = True
        print(json.dumps({"client": client, "handshake": handshake, "reply": reply}),
              flush=True)
        s.disable_monitor()
        mon.close(0)
        s.close(0)
    ctx.term()


def main(argv: list[str]) -> int:
    if len(argv) >= 4 and argv[0] == "where":
        seconds = float(argv[4]) if len(argv) > 4 else 0.0
        interval = float(argv[5]) if len(argv) > 5 else 0.2
        where(argv[1], argv[2], argv[3], seconds, interval)
        return 0
    if len(argv) == 4 and argv[0] == "outsider":
        outsider(argv[1], argv[2], argv[3])
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
