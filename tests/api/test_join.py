"""Joining a host (epio.cluster, epio.joining): the join token's rules, the api that
makes tokens, ``epio-admin join``, and the endpoint lists every node follows -- on a
real PostgreSQL store (docs/cluster.md, "Joining a host")."""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import TestCase

from epio.cluster import (
    CACHE_NAME,
    MAX_TTL,
    ClusterDirectory,
    EndpointLists,
    JoinError,
    JoinIssuer,
    make_join_token,
    merge,
    read_cache,
    redeem,
)
from epio.config import load_config, validate
from epio.joining import join, parse_sets
from epio.store import InvalidValue, Store, open_store
from tests.api.support import Harness
from tests.store import pg
from tests.util import epio_env

SECRET = bytes(range(32))
SHARED = {"node": {"domain": "apps.example"}, "runner": {"uid_min": 61000, "uid_max": 61999},
          "bus": {"encrypt": True}}


class PgStoreCase(TestCase):
    timeout = 30

    async def store(self) -> Store:
        store = await open_store(pg.pg_url_for_test(self), reactor)
        self.addCleanup(store.close)
        return store

    def tmp(self) -> Path:
        path = Path(tempfile.mkdtemp(prefix="epio-join-"))
        self.addCleanup(shutil.rmtree, path, True)
        return path


def at(store: Store, seconds: float) -> Store:
    """The same store read with a clock ``seconds`` ahead of the reactor's."""
    clock = task.Clock()
    clock.advance(reactor.seconds() + seconds)
    return Store(store.backend, clock)


class JoinTokenRuleTests(PgStoreCase):
    async def test_admits_once_and_is_hashed_at_rest(self) -> None:
        """A token grants its node id, the cluster secret and the shared settings once;
        the second use is refused saying it was used.  The store holds neither the
        token nor the secret in the clear.  A ttl is above 0 and at most a day; a node
        id is a host name."""
        store = await self.store()
        new = await make_join_token(store, SECRET, SHARED, "h11", 600, "user admin")
        self.assertTrue(new.token.startswith("epiojoin_"))
        rows = await store.fetch_all("SELECT * FROM join_tokens")
        self.assertEqual(len(rows), 1)
        self.assertNotIn(new.token, str(rows))
        self.assertNotIn(SECRET.hex(), str(rows))
        grant = await redeem(store, new.token, "epio-admin on h11")
        self.assertEqual((grant.node_id, grant.secret, grant.shared), ("h11", SECRET, SHARED))
        with self.assertRaises(JoinError) as cm:
            await redeem(store, new.token, "again")
        self.assertIn("was used already", str(cm.exception))
        row = (await store.fetch_all("SELECT used, used_by FROM join_tokens"))[0]
        self.assertEqual(row["used_by"], "epio-admin on h11")
        # the limits: a ttl above 0 and at most MAX_TTL (a day); a node id is a host name
        for ttl in (0, -1, MAX_TTL + 1):
            with self.assertRaises(InvalidValue):
                await make_join_token(store, SECRET, SHARED, None, ttl, "user admin")
        for bad in ("", "-x", "a b", "x" * 64, "h/1"):
            with self.assertRaises(InvalidValue):
                await make_join_token(store, SECRET, SHARED, bad, 60, "user admin")
        await make_join_token(store, SECRET, SHARED, "ok.h-1", MAX_TTL, "user admin")

    async def test_expired_wrong_and_malformed_are_refused_clearly(self) -> None:
        """Past its ttl a token is refused as expired (and stays unused); a token the
        store does not know, and a string that is no join token, each get their own
        sentence.  Two joins racing with one token: exactly one gets the secret."""
        store = await self.store()
        new = await make_join_token(store, SECRET, SHARED, None, 60, "user admin")
        with self.assertRaises(JoinError) as cm:
            await redeem(at(store, 61), new.token, "late")
        self.assertIn("expired", str(cm.exception))
        with self.assertRaises(JoinError) as cm:
            await redeem(store, new.token[:-4] + "AAAA", "typo")
        self.assertIn("not known", str(cm.exception))
        with self.assertRaises(JoinError) as cm:
            await redeem(store, "epio_0123456789abcdef0123456789", "api token")
        self.assertIn("not a join token", str(cm.exception))
        grant = await redeem(store, new.token, "in time")  # none of the above used it up
        self.assertTrue(grant.node_id.startswith("node-"))
        # two joins racing with one token: exactly one gets the secret
        new = await make_join_token(store, SECRET, SHARED, "h12", 600, "user admin")
        results = await defer.DeferredList(
            [ensureDeferred(redeem(store, new.token, f"racer {i}")) for i in range(2)],
            consumeErrors=True)
        won = [r for ok, r in results if ok]
        lost = [r for ok, r in results if not ok]
        self.assertEqual(len(won), 1, results)
        self.assertEqual(won[0].secret, SECRET)
        self.assertTrue(lost[0].check(JoinError))


class JoinTokenApiTests(TestCase):
    """POST/GET /api/v1/cluster/join-tokens (the api's SQLite harness; the store
    functions are the same on both backends)."""

    timeout = 30

    def setUp(self) -> Any:
        self.h = Harness(joins=JoinIssuer(SECRET, SHARED))
        self.addCleanup(lambda: ensureDeferred(self.h.stop()))
        return ensureDeferred(self.h.start())

    def call(self, *args: Any, **kw: Any) -> Any:
        return ensureDeferred(self.h.call(*args, **kw))

    async def test_admin_only_and_shown_once(self) -> None:
        """Only an admin makes a token (401 without a token, 403 for a user); the token
        is in the 201 answer only, never in the list; a ttl above a day is refused."""
        status, _, _ = await self.call("POST", "cluster/join-tokens", body={})
        self.assertEqual(status, 401)
        status, body, _ = await self.call("POST", "cluster/join-tokens",
                                          token=self.h.alice_token, body={})
        self.assertEqual((status, body["error"]["code"]), (403, "forbidden"))
        status, body, _ = await self.call("POST", "cluster/join-tokens",
                                          token=self.h.admin_token,
                                          body={"node_id": "h11", "ttl": 600})
        self.assertEqual(status, 201, body)
        token = body["token"]
        self.assertEqual((body["info"]["node_id"], body["info"]["used"]), ("h11", None))
        self.assertEqual(body["info"]["created_by"], "user admin")
        status, listed, _ = await self.call("GET", "cluster/join-tokens",
                                            token=self.h.admin_token)
        self.assertEqual((status, [t["id"] for t in listed]), (200, [body["info"]["id"]]))
        self.assertNotIn(token, json.dumps(listed))
        status, _, _ = await self.call("GET", "cluster/join-tokens", token=self.h.bob_token)
        self.assertEqual(status, 403)
        status, body, _ = await self.call("POST", "cluster/join-tokens",
                                          token=self.h.admin_token, body={"ttl": 86401})
        self.assertEqual((status, body["error"]["code"]), (400, "validation_failed"))
        grant = await redeem(self.h.store, token, "test")
        self.assertEqual((grant.node_id, grant.secret), ("h11", SECRET))

    async def test_no_join_on_a_single_box(self) -> None:
        """An api whose store is not PostgreSQL makes no join token: 409 not_a_cluster."""
        h = Harness()
        await h.start()
        self.addCleanup(lambda: ensureDeferred(h.stop()))
        status, body, _ = await h.call("POST", "cluster/join-tokens", token=h.admin_token,
                                       body={})
        self.assertEqual((status, body["error"]["code"]), (409, "not_a_cluster"))


class JoinCommandTests(PgStoreCase):
    async def test_join_writes_a_node_that_follows_the_store(self) -> None:
        """``epio-admin join`` writes the secret (0600), the config (0600, valid, empty
        hand lists, the shared settings, listeners on the host's address) and the lists
        read from the store; a second join on the same host is refused before it uses a
        token, and so is an unknown --set key."""
        url = pg.pg_url_for_test(self)
        store = await open_store(url, reactor)
        self.addCleanup(store.close)
        from epio.store.cluster import register_endpoints

        nexus = {"heartbeat": "tcp://10.9.0.3:7711", "router": "tcp://10.9.0.3:7712",
                 "publish": "tcp://10.9.0.3:7713"}
        await register_endpoints(store, "n3", "nexus", nexus)
        await register_endpoints(store, "l1", "logger", {
            "pull": "tcp://10.9.0.1:7721", "router": "tcp://10.9.0.1:7722",
            "publish": "tcp://10.9.0.1:7723"})
        new = await make_join_token(store, SECRET, SHARED, "h11", 600, "user admin")
        tmp = self.tmp()
        data, config = tmp / "data", tmp / "etc" / "epio.toml"
        joined = await join(reactor, store_url=url, token=new.token, roles=["runner"],
                            data_dir=data, config_path=config, address="10.9.0.11",
                            sets=parse_sets(["runner.port_min=21300", "runner.port_max=21399",
                                             "build.gunicorn=gunicorn"]), used_by="test")
        self.assertEqual(joined.node_id, "h11")
        self.assertEqual(stat.S_IMODE((data / "cluster-secret").stat().st_mode), 0o600)
        self.assertEqual((data / "cluster-secret").read_text().strip(), SECRET.hex())
        self.assertEqual(stat.S_IMODE(config.stat().st_mode), 0o600)
        conf = load_config(config).settings
        self.assertEqual((conf.node.id, conf.node.domain, conf.store.url),
                         ("h11", "apps.example", url))
        self.assertEqual((conf.cluster.nexus, conf.cluster.loggers), ((), ()))
        self.assertEqual((conf.runner.uid_min, conf.runner.port_min, conf.build.gunicorn),
                         (61000, 21300, "gunicorn"))
        self.assertEqual((conf.runner.control_bind, conf.runner.advertise_host),
                         ("tcp://10.9.0.11:7731", "10.9.0.11"))
        self.assertEqual(read_cache(data), EndpointLists((nexus,), ("tcp://10.9.0.1:7721",)))
        self.assertNotIn(SECRET.hex(), config.read_text())
        again = await make_join_token(store, SECRET, SHARED, "h12", 600, "user admin")
        with self.assertRaises(JoinError) as cm:
            await join(reactor, store_url=url, token=again.token, roles=["runner"],
                       data_dir=data, config_path=config, address="10.9.0.11", sets={},
                       used_by="test")
        self.assertIn("exists", str(cm.exception))
        with self.assertRaises(JoinError) as cm:
            await join(reactor, store_url=url, token=again.token, roles=["runner"],
                       data_dir=tmp / "d2", config_path=tmp / "c2.toml", address="10.9.0.12",
                       sets=parse_sets(["runner.no_such_key=1"]), used_by="test")
        self.assertIn("runner.no_such_key", str(cm.exception))
        grant = await redeem(store, again.token, "still unused")
        self.assertEqual(grant.node_id, "h12")

    def test_cli_refuses_a_used_token_in_one_sentence(self) -> None:
        """The real ``epio-admin join`` with a token that was used: exit 1, one line
        saying so, nothing written, no traceback, no token in the output."""
        url = pg.pg_url_for_test(self)

        async def setup() -> str:
            store = await open_store(url, reactor)
            try:
                new = await make_join_token(store, SECRET, SHARED, "h13", 600, "user admin")
                await redeem(store, new.token, "first")
                return new.token
            finally:
                await store.close()

        def run(token: str) -> None:
            tmp = self.tmp()
            proc = subprocess.run(
                [sys.executable, "-c", "from epio.admin import main; main()", "join",
                 "--store", url, "--token", "-", "--role", "runner", "--data-dir",
                 str(tmp / "data"), "--address", "127.0.0.1"],
                input=token + "\n", capture_output=True, text=True, env=epio_env(),
                timeout=60)
            self.assertEqual(proc.returncode, 1, proc.stderr)
            self.assertIn("was used already", proc.stderr)
            self.assertNotIn("Traceback", proc.stderr)
            self.assertNotIn(token, proc.stdout + proc.stderr)
            self.assertFalse((tmp / "data").exists())

        return ensureDeferred(setup()).addCallback(run)


class NodeConfigTests(TestCase):
    def test_every_role_listens_on_the_host_address(self) -> None:
        """A joined api+logger+nexus node binds on its address (IPv6 in brackets), its
        api asks its own logger and then those the store listed; --set wins; the result
        is a valid configuration."""
        from epio.joining import node_config

        peer = {"router": "tcp://10.9.0.1:7722", "publish": "tcp://10.9.0.1:7723"}
        doc = node_config(node_id="h4", data_dir=Path("/var/lib/epio"),
                          store_url="postgresql://db/epio", address="fd00::4",
                          roles=["api", "logger", "nexus", "lb"], shared=SHARED,
                          sets={"lb": {"listen": "tcp:80"}}, logger_peers=[peer])
        s = validate(doc).settings
        self.assertEqual(s.logger.peers, ({"router": "tcp://[fd00::4]:7722",
                                           "publish": "tcp://[fd00::4]:7723"}, peer))
        self.assertEqual((s.nexus.router_bind, s.api.listen, s.lb.listen),
                         ("tcp://[fd00::4]:7712", "tcp6:8000:interface=fd00\\:\\:4",
                          "tcp:80"))
        from twisted.internet.endpoints import serverFromString

        serverFromString(reactor, s.api.listen)  # a valid endpoint string
        self.assertEqual((s.node.domain, s.cluster.nexus, s.cluster.secret_file),
                         ("apps.example", (), "/var/lib/epio/cluster-secret"))


def directory(store: Store, node_id: str, data_dir: Path, roles: list[str],
              extra: dict[str, Any] | None = None) -> ClusterDirectory:
    doc: dict[str, Any] = {"node": {"id": node_id}, "cluster": {"nexus": [], "loggers": []}}
    for section, table in (extra or {}).items():
        doc.setdefault(section, {}).update(table)
    settings = validate(doc).settings
    return ClusterDirectory(reactor, lambda: defer.succeed(store), node_id, settings, roles,
                            data_dir)


class FollowTests(PgStoreCase):
    async def test_nodes_list_themselves_and_every_node_follows(self) -> None:
        """A nexus+logger node lists its endpoints on its first pass; another node
        sees them merged after its TOML entries (one observer call per change, none
        when nothing changed) and caches them; when the first node stops its entries
        are gone from the next read, and an entry not refreshed within endpoint_ttl
        is left out."""
        store = await self.store()
        a = directory(store, "n1", self.tmp(), ["nexus", "logger"], {
            "nexus": {"heartbeat_bind": "tcp://10.9.0.3:7711", "router_bind":
                      "tcp://10.9.0.3:7712", "publish_bind": "tcp://10.9.0.3:7713"},
            "logger": {"pull_bind": "tcp://10.9.0.3:7721", "router_bind":
                       "tcp://10.9.0.3:7722", "publish_bind": "tcp://10.9.0.3:7723"}})
        hand = {"heartbeat": "tcp://10.9.0.4:7711", "router": "tcp://10.9.0.4:7712",
                "publish": "tcp://10.9.0.4:7713"}
        b_dir = self.tmp()
        b = directory(store, "r1", b_dir, ["runner"], {"cluster": {"nexus": [hand]}})
        seen: list[EndpointLists] = []
        b.observe(seen.append)
        await a.tick()
        self.assertEqual(a.own.keys(), {"nexus", "logger"})
        await b.tick()
        self.assertEqual(b.current.nexus_endpoints("router"),
                         ["tcp://10.9.0.4:7712", "tcp://10.9.0.3:7712"])
        self.assertEqual(b.current.loggers, ("tcp://10.9.0.3:7721",))
        self.assertEqual(len(seen), 1)
        self.assertEqual(read_cache(b_dir).loggers, ("tcp://10.9.0.3:7721",))
        self.assertTrue((b_dir / CACHE_NAME).exists())
        await b.tick()
        self.assertEqual(len(seen), 1)  # no change, no call
        a.startService()
        await a.stopService()  # removes its rows
        await b.tick()
        self.assertEqual(b.current, EndpointLists((hand,), ()))  # the TOML entry stays
        self.assertEqual(len(seen), 2)
        await a.tick()  # listed again, then silent for longer than endpoint_ttl
        late = directory(at(store, b.ttl + 1), "r2", self.tmp(), ["runner"])
        await late.tick()
        self.assertEqual(late.current, EndpointLists())

    async def test_routers_list_their_addresses(self) -> None:
        """An lb node (or --role=all) lists its host's addresses as an lb row; a runner
        follows them (``routers``: deduplicated, in node order), caches them, and loses
        them when the router stops; a router host with no address lists nothing."""
        store = await self.store()
        lb1 = ClusterDirectory(reactor, lambda: defer.succeed(store), "lb-1",
                               validate({}).settings, ["lb"], self.tmp(),
                               addresses=lambda: ["10.9.0.2", "fd00::2"])
        lb2 = ClusterDirectory(reactor, lambda: defer.succeed(store), "lb-2",
                               validate({}).settings, ["all"], self.tmp(),
                               addresses=lambda: ["10.9.0.3", "10.9.0.2"])
        bare = ClusterDirectory(reactor, lambda: defer.succeed(store), "lb-3",
                                validate({}).settings, ["lb"], self.tmp(), addresses=lambda: [])
        run_dir = self.tmp()
        runner = directory(store, "r1", run_dir, ["runner"])
        seen: list[EndpointLists] = []
        runner.observe(seen.append)
        for d in (lb1, lb2, bare):
            await d.tick()
        self.assertEqual(bare._registered, set())
        await runner.tick()
        self.assertEqual(runner.current.routers, ("10.9.0.2", "fd00::2", "10.9.0.3"))
        self.assertEqual(read_cache(run_dir).routers, ("10.9.0.2", "fd00::2", "10.9.0.3"))
        self.assertEqual(len(seen), 1)
        lb1.startService()
        await lb1.stopService()
        await runner.tick()
        self.assertEqual(runner.current.routers, ("10.9.0.3", "10.9.0.2"))
        self.assertEqual(len(seen), 2)

    def test_a_change_moves_the_bus_links(self) -> None:
        """When the merged lists change, a node's log sink pushes to the new logger list,
        its heartbeat publisher connects to the new nexus list and its route feed follows
        the new nexuses (one left, one joined); the hand-written entry stays."""
        from epio.bus.testing import TEST_REGISTRY, MemoryBus
        from epio.cluster import follow_endpoints
        from epio.pipeline import BusLogSink
        from epio.routefeed import NexusRouteSource, TableSink
        from epio.routing import RouteTable

        clock = task.Clock()
        bus = MemoryBus(clock, "r1", registry=TEST_REGISTRY)
        n1 = {"heartbeat": "tcp://10.9.0.3:7711", "router": "tcp://10.9.0.3:7712",
              "publish": "tcp://10.9.0.3:7713"}
        n2 = {"heartbeat": "tcp://10.9.0.4:7711", "router": "tcp://10.9.0.4:7712",
              "publish": "tcp://10.9.0.4:7713"}
        d = directory(None, "r1", self.tmp(), ["runner"],  # type: ignore[arg-type]
                      {"cluster": {"nexus": [n1]}})
        sink = BusLogSink(bus, list(d.current.loggers), clock=clock)
        heartbeats = bus.publisher(connect=d.current.nexus_endpoints("heartbeat"),
                                   may_start_empty=True)
        source = NexusRouteSource(bus, list(d.current.nexus))
        follow_endpoints(d, sink, heartbeats)
        d.observe(lambda lists: source.set_nexuses(lists.nexus))
        for svc in (sink, heartbeats):
            svc.startService()
            self.addCleanup(svc.stopService)
        source.follow(TableSink(RouteTable("localhost")))
        self.addCleanup(source.stop)
        d.update(EndpointLists((n2,), ("tcp://10.9.0.1:7721",)))
        self.assertEqual(heartbeats.connects, ["tcp://10.9.0.3:7711", "tcp://10.9.0.4:7711"])
        self.assertEqual([p.connects for p in sink.pushes], [["tcp://10.9.0.1:7721"]])
        self.assertEqual([link.router for link in source.feed.links],
                         ["tcp://10.9.0.3:7712", "tcp://10.9.0.4:7712"])
        self.assertEqual(source._dealer.endpoints, ["tcp://10.9.0.3:7712",
                                                    "tcp://10.9.0.4:7712"])
        d.update(EndpointLists((), ()))  # the stored entries left; the hand one stays
        self.assertEqual(heartbeats.connects, ["tcp://10.9.0.3:7711"])
        self.assertEqual(sink.pushes, [])
        self.assertEqual([link.router for link in source.feed.links], ["tcp://10.9.0.3:7712"])
        self.assertEqual(source._dealer.endpoints, ["tcp://10.9.0.3:7712"])

    def test_merge_keeps_hand_lists_first(self) -> None:
        """TOML entries come first and are never dropped; store entries equal to one
        are not repeated."""
        n1 = {"heartbeat": "tcp://a:1", "router": "tcp://a:2", "publish": "tcp://a:3"}
        n2 = {"heartbeat": "tcp://b:1", "router": "tcp://b:2", "publish": "tcp://b:3"}
        got = merge(EndpointLists((n1,), ("tcp://l1:1",)),
                    EndpointLists((n2, n1), ("tcp://l2:1", "tcp://l1:1")))
        self.assertEqual(got, EndpointLists((n1, n2), ("tcp://l1:1", "tcp://l2:1")))

    def test_wildcard_and_port_zero_binds_are_not_listed(self) -> None:
        """A nexus bound on a wildcard address or port 0 names nothing another host can
        connect to: it is not listed (the operator lists it by hand)."""
        for bind in ("tcp://*:7711", "tcp://0.0.0.0:7711", "tcp://127.0.0.1:0"):
            d = directory(None, "n", Path("/nonexistent"), ["nexus"],  # type: ignore[arg-type]
                          {"nexus": {"heartbeat_bind": bind}})
            self.assertEqual(d.own, {}, bind)

