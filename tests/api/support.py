"""Test support for the api: a real SQLite store, the Klein app under StubTreq,
a fake runner cluster implementing IRunnerControl, and response validation
against the OpenAPI document for EVERY call.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from zope.interface import implementer

from epio.api.control import IRunnerControl
from epio.api.deploys import Deployer
from epio.api.domain import Platform
from epio.api.jsonschema import validate
from epio.api.scheduler import Scheduler
from epio.api.settings import ApiSettings, derive_app_secret
from epio.api.spec import PREFIX, openapi_document
from epio.api.web import OPERATIONS, Api
from epio.bus import RemoteError, RequestTimeout
from epio.store import open_store

DIGEST = "a" * 64
DIGEST2 = "b" * 64

DOC = openapi_document(OPERATIONS)


def find_operation(method: str, path: str) -> Any:
    path = path.split("?")[0]
    for op in OPERATIONS:
        pattern = "^" + re.sub(r"\\\{\w+\\\}", "[^/]+", re.escape(PREFIX + op.path)) + "/?$"
        if op.method == method and re.match(pattern, path):
            return op
    return None


def check_response(method: str, path: str, status: int, body: Any) -> None:
    """Validate a response against the OpenAPI document (raises on mismatch)."""
    op = find_operation(method, path)
    if op is None:
        validate(body, {"$ref": "#/components/schemas/Error"}, DOC)
        return
    entry = DOC["paths"][PREFIX + op.path][method.lower()]["responses"]
    assert str(status) in entry, f"{method} {path}: status {status} not documented"
    content = entry[str(status)].get("content")
    if content is None:
        return
    if "application/json" not in content:
        return  # a file download: bytes, not JSON
    validate(body, content["application/json"]["schema"], DOC)


@implementer(IRunnerControl)
class FakeRunners:
    """Runners that answer control requests in memory (keyed by endpoint).

    Started instances become healthy on the next runner.status unless the
    runner's ``fail_apps``/``crash`` says otherwise; ``down`` endpoints time out.
    """

    def __init__(self) -> None:
        self.instances: dict[str, dict[str, dict[str, Any]]] = {}
        self.down: set[str] = set()
        self.purged: list[tuple[str, str, int]] = []  # runner.purge_app: (endpoint, app, uid)
        self.requests: list[tuple[str, str, dict[str, Any]]] = []
        self.fail_health: set[int] = set()  # releases whose instances fail
        self.tails: dict[int, list[str]] = {}  # release -> output lines of its instances
        self.build_error: str | None = None
        # when set, runner.build answers only once this fires (a build still running)
        self.build_gate: Deferred[None] | None = None
        self.manifest: dict[str, Any] = {"processes": {"web": "gunicorn app:app"}}
        self.digests = [DIGEST, DIGEST2]
        self.ports = 20000
        self.load: dict[str, dict[str, float]] = {}
        # a nexus at endpoint "nexus": which instance ids each app's route lists, as
        # backends and (an asleep app, docs/nexus.md) in its "asleep" entry
        self.routed: dict[str, set[str]] = {}
        self.routed_asleep: dict[str, set[str]] = {}
        self.clock: Any = reactor  # the harness's scheduler runs on the real reactor
        self.booting = False  # while set, started instances keep reporting "starting"

    def add(self, endpoint: str) -> None:
        self.instances.setdefault(endpoint, {})

    async def request(self, endpoint: str, type: str, body: dict[str, Any],
                      timeout: float | None = None) -> dict[str, Any]:
        self.requests.append((endpoint, type, body))
        if type == "nexus.where" and endpoint == "nexus" and endpoint not in self.down:
            # the instances as their runners' heartbeats tell the nexus: what the next
            # runner.status will report (the store learns it only then)
            seen = [dict(i, state=self._reported(i)) for i in self.running(body["app"])]
            route: dict[str, Any] = {"backends": [
                {"instance_id": i} for i in sorted(self.routed.get(body["app"], ()))]}
            if self.routed_asleep.get(body["app"]):
                route["asleep"] = {"since": 1.0, "wake": ["r1"],
                                   "instances": sorted(self.routed_asleep[body["app"]])}
            return {"nexus_id": "n1", "age": 0.1, "app": body["app"], "instances": seen,
                    "route": route}
        if endpoint in self.down or endpoint not in self.instances:
            raise RequestTimeout(type, endpoint, timeout or 1.0)
        mine = self.instances[endpoint]
        if type == "runner.status":
            for inst in mine.values():
                if inst["state"] == "starting":
                    inst["state"] = self._reported(inst)
                    inst["since"] = self.clock.seconds()  # as a runner reports state changes
                    if inst["state"] == "failed":
                        inst["reason"] = "health check /health failed 3 times"
            out = [dict(i) for i in mine.values()]
            for i in out:  # as runner.status: the last lines of one that is not healthy
                if i["state"] != "healthy" and self.tails.get(i["release"]):
                    i["tail"] = list(self.tails[i["release"]])
            return {"node_id": endpoint, "boot_id": "b", "load": self.load.get(endpoint, {}),
                    "instances": out}
        if type == "runner.start":
            self.ports += 1
            mine[body["instance_id"]] = {
                "instance_id": body["instance_id"], "app": body["app"],
                "release": body["release"], "process_type": body["process_type"],
                "host": "127.0.0.1", "port": self.ports, "state": "starting", "since": 1.0,
                "restarts": 0, "env": body["env"],
                "addon_ports": body.get("addon_ports"),
                "asleep_after_boot": body.get("asleep_after_boot") is True}
            return {"instance_id": body["instance_id"], "host": "127.0.0.1", "port": self.ports}
        if type == "runner.stop":
            mine.pop(body["instance_id"], None)
            return {"instance_id": body["instance_id"]}
        if type == "runner.drain":
            if body["instance_id"] in mine:
                mine[body["instance_id"]]["state"] = "draining"
            return {"instance_id": body["instance_id"]}
        if type == "runner.purge_app":
            if any(i["app"] == body["app"] for i in mine.values()):
                raise RemoteError("app_running", f"{body['app']} still runs here")
            self.purged.append((endpoint, body["app"], body["uid"]))
            return {"app": body["app"], "deleted": True}
        if type == "runner.build":
            if self.build_gate is not None:
                await self.build_gate
            if self.build_error:
                raise RemoteError("build_failed", self.build_error)
            digest = self.digests.pop(0) if self.digests else "c" * 64
            return {"build_id": body["build_id"], "digest": digest, "manifest": self.manifest,
                    "duration": 1.5}
        raise RemoteError("unknown_type", type)

    def _reported(self, inst: dict[str, Any]) -> str:
        if inst["state"] != "starting" or self.booting:
            return str(inst["state"])
        return "failed" if inst["release"] in self.fail_health else (
            # a new release of an asleep app: healthy once, asleep at once
            "asleep" if inst["asleep_after_boot"] else "healthy")

    def running(self, app: str | None = None) -> list[dict[str, Any]]:
        return [i for m in self.instances.values() for i in m.values()
                if app is None or i["app"] == app]


async def settle(d: Deferred[Any], stub: StubTreq | None = None, timeout: float = 10.0) -> Any:
    """Wait for ``d`` with the real reactor (the store runs in a thread), flushing StubTreq."""
    done: list[Any] = []
    d.addBoth(lambda r: done.append(r) or r)
    waited = 0.0
    while not done:
        if stub is not None:
            stub.flush()
        await deferLater(reactor, 0.002, lambda: None)
        waited += 0.002
        if waited > timeout:
            raise AssertionError("request did not complete")
    if stub is not None:
        stub.flush()
    return await d


class Harness:
    """One api over a fresh SQLite store, with fake runners and a scheduler."""

    def __init__(self, settings: ApiSettings | None = None, joins: Any = None,
                 make_certs: Any = None) -> None:
        self.joins = joins  # an epio.cluster.JoinIssuer: the api makes join tokens
        # store -> epio.certs.api.Certs (the certificate routes and the DNS check of
        # `domains add`); None: the api has none, as without an acme section
        self.make_certs = make_certs
        self.tmp = Path(tempfile.mkdtemp(prefix="epio-api-test-"))
        # no nexus here and no settle time: routing waits are tested on their own
        self.settings = settings or ApiSettings(drain_seconds=0.0, reconcile_interval=0.05,
                                                rollout_timeout=5.0, max_json_bytes=4096,
                                                max_upload_bytes=64 * 1024, route_settle=0.0)
        self.runners = FakeRunners()

    async def start(self) -> None:
        self.store = await open_store(f"sqlite:///{self.tmp / 'store.sqlite3'}", reactor)
        self.scheduler = Scheduler(self.store, self.runners, reactor, self.settings,
                                   app_secret=partial(derive_app_secret, b"s" * 32))
        # the api process running deploys: registered, so the leader knows it is alive
        await self.store.upsert_node("api1", ["api"], None, "boot-1")
        self.deployer = Deployer(self.store, self.runners, reactor, self.settings,
                                 scheduler=self.scheduler, owner={"node": "api1",
                                                                  "boot": "boot-1"})
        self.platform = Platform(self.store, self.settings, reactor, deployer=self.deployer,
                                 scheduler=self.scheduler, joins=self.joins)
        self.api = Api(self.platform, max_json_bytes=self.settings.max_json_bytes,
                       max_upload_bytes=self.settings.max_upload_bytes,
                       api_url=self.settings.platform_url(),
                       certs=self.make_certs(self.store) if self.make_certs else None)
        self.stub = StubTreq(self.api.resource())
        admin = await self.store.create_user("admin", None, is_admin=True)
        self.admin_token = (await self.store.create_token(admin.id)).token
        alice = await self.store.create_user("alice")
        self.alice_token = (await self.store.create_token(alice.id)).token
        bob = await self.store.create_user("bob")
        self.bob_token = (await self.store.create_token(bob.id)).token

    async def stop(self) -> None:
        self.scheduler.lose_leadership()
        await self.deployer.stop()
        for _ in range(500):  # each running deploy ends at its next step
            if not self.deployer.running:
                break
            await deferLater(reactor, 0.01, lambda: None)
        while self.scheduler._busy:
            await deferLater(reactor, 0.01, lambda: None)
        await self.store.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    async def add_runner(self, node_id: str) -> str:
        endpoint = f"tcp://{node_id}:7731"
        self.runners.add(endpoint)
        await self.store.upsert_node(node_id, ["runner"], endpoint, "boot")
        return endpoint

    async def call(self, method: str, path: str, token: str | None = None, body: Any = None,
                   raw: bytes | None = None, content_type: str | None = None,
                   check: bool = True) -> tuple[int, Any, dict[str, list[str]]]:
        """One request; returns (status, decoded JSON body, headers); validates the body."""
        headers: dict[bytes, list[bytes]] = {}
        if token is not None:
            headers[b"Authorization"] = [b"Bearer " + token.encode()]
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            content_type = content_type or "application/json"
        if content_type is not None:
            headers[b"Content-Type"] = [content_type.encode()]
        url = "http://api.test" + (path if path.startswith("/") else PREFIX + "/" + path)
        resp = await settle(self.stub.request(method, url, headers=headers, data=data),
                            self.stub)
        content = await settle(self.stub.content(resp), self.stub)
        hdrs = {k.decode().lower(): [v.decode() for v in vs]
                for k, vs in resp.headers.getAllRawHeaders()}
        text = content.decode("utf-8")
        decoded = json.loads(text) if text.strip() and "json" in hdrs.get(
            "content-type", [""])[0] else text
        if check and url.split("api.test")[1].startswith(PREFIX):
            check_response(method, url.split("api.test")[1], resp.code, decoded)
        return resp.code, decoded, hdrs
