"""Fakes and a tiny HTTP driver for the static file server's unit tests."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from attrs import define, field
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from epio.routing import static_token
from epio.runner.static import StaticServer

SECRET = b"s" * 32
DIGEST1 = "1" * 64
DIGEST2 = "2" * 64


class SyncPool:
    """A thread pool that runs the work at once, in the caller's thread."""

    def callInThreadWithCallback(self, on_result: Any, func: Any, *a: Any, **kw: Any) -> None:
        try:
            result = func(*a, **kw)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)


class FakeReactor(task.Clock):
    """A Clock with a synchronous thread pool (deferToThreadPool completes at once)."""

    def getThreadPool(self) -> SyncPool:
        return SyncPool()

    def callFromThread(self, f: Any, *a: Any, **kw: Any) -> None:
        f(*a, **kw)


class FakeImages:
    """``mount``/``unmount`` like the runner's image store, counting references."""

    def __init__(self, roots: dict[str, Path]) -> None:
        self.roots = roots
        self.refs: Counter[str] = Counter()

    async def mount(self, digest: str) -> Path:
        if digest not in self.roots:
            raise LookupError(f"image {digest} is not on this node")
        self.refs[digest] += 1
        return self.roots[digest]

    async def unmount(self, digest: str, force: bool = False) -> None:
        self.refs[digest] -= 1


@define
class Spec:
    app: str
    release: int
    image_digest: str
    uid: int
    process_type: str = "web"


@define
class Inst:
    spec: Spec
    state: str = "healthy"


def make_image(root: Path, static: dict[str, str], expires: dict[str, int] | None = None,
               files: dict[str, bytes] | None = None) -> Path:
    """An image tree: epio/manifest.json with build facts ``static`` and ``files``."""
    (root / "epio").mkdir(parents=True)
    doc = {"manifest": {"http": {"expires": expires or {}, "gzip": False}},
           "build": {"static": static, "workdir": "app"}}
    (root / "epio" / "manifest.json").write_text(json.dumps(doc))
    for rel, data in (files or {}).items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


@define
class Response:
    status: int
    headers: dict[str, str]
    body: bytes
    raw: bytes = field(repr=False)


def parse_response(raw: bytes) -> Response:
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers: dict[str, str] = {}
    for ln in lines[1:]:
        k, _, v = ln.partition(":")
        headers[k.strip().lower()] = v.strip()
    if "content-length" in headers:
        body = rest[: int(headers["content-length"])]
    elif headers.get("transfer-encoding") == "chunked":
        body = b""
        while rest:
            size_s, _, rest = rest.partition(b"\r\n")
            size = int(size_s, 16)
            if size == 0:
                break
            body += rest[:size]
            rest = rest[size + 2:]
    else:
        body = rest
    return Response(status, headers, body, raw)


class Driver:
    """Sends one request at a time to a StaticServer's site over a StringTransport."""

    def __init__(self, server: StaticServer) -> None:
        self.server = server
        self.site = server.site()

    def request(self, method: str, path: str, headers: dict[str, str] | None = None,
                app: str | None = "hello", token: str | None = None,
                body: bytes = b"") -> Response:
        proto = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 7000))
        t = StringTransport()
        proto.makeConnection(t)
        hdrs = {"Host": "hello.localhost", "Connection": "close"}
        if app is not None:
            hdrs["X-Epio-Static"] = f"{app} {token or static_token(SECRET, app)}"
        hdrs.update(headers or {})
        if body:
            hdrs["Content-Length"] = str(len(body))
        head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items())
        proto.dataReceived(head.encode("latin-1") + b"\r\n" + body)
        for _ in range(10000):  # drive pull producers (file bodies)
            producer = t.producer
            if producer is None or t.streaming:
                break
            producer.resumeProducing()
        resp = parse_response(t.value())
        proto.connectionLost(Failure(ConnectionError("done")))
        return resp


def make_server(tmp: Path, roots: dict[str, Path], instances: list[Inst],
                **kw: Any) -> tuple[StaticServer, FakeImages, FakeReactor]:
    reactor = FakeReactor()
    images = FakeImages(roots)
    kw.setdefault("uid_check", False)
    server = StaticServer(reactor, SECRET, images, tmp / "data", lambda: list(instances),
                          listen="tcp:0:interface=127.0.0.1", advertise_host="127.0.0.1",
                          **kw)
    server.running = True  # serve without listening: requests come through Driver
    server.endpoint = "127.0.0.1:7000"
    server.refresh()
    return server, images, reactor


def data_dir(tmp: Path, app: str = "hello") -> Path:
    d = tmp / "data" / "appdata" / app
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    return d
