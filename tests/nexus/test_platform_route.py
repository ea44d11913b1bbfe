"""The platform's own route ("App ID 0 is special"): the api nodes heard from in
``api.heartbeat`` are the backends of app ``epio`` at ``api.hostname``."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from epio.config import load_config
from epio.domain import PLATFORM_APP
from epio.nexus.core import Nexus
from epio.nexus.service import platform_facts
from epio.nexus.table import AppFacts

from .helpers import heartbeat, instance, view

PLATFORM = AppFacts(name=PLATFORM_APP, hostnames=("epio.example.com",),
                    releases={0: {"max_body_size": 1000}})


def api_beat(node: str, port: int, seq: int = 1, boot: str = "b1",
             host: str = "10.0.0.1") -> dict[str, Any]:
    return {"node_id": node, "boot_id": boot, "seq": seq, "interval": 1.0, "host": host,
            "port": port}


class PlatformRouteTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.published: list[tuple[str, dict[str, Any]]] = []
        self.nexus = Nexus(self.clock, "nx1", lambda t, b: self.published.append((t, b)),
                           node_timeout=3.0, warmup=1.5, platform=PLATFORM)
        self.nexus.start()
        self.nexus.set_view(view("hello"))
        self.clock.advance(1.5)
        self.assertTrue(self.nexus.ready)

    def route(self) -> dict[str, Any]:
        return self.nexus.book.routes[PLATFORM_APP]

    def backends(self) -> list[tuple[str, int]]:
        return [(b["host"], b["port"]) for b in self.route()["backends"]]

    def test_first_table_has_the_platform_route_with_no_backend(self) -> None:
        """Before any api node is heard from, the platform's hostname is known (503, not
        404) with the platform's options, beside the store's apps."""
        snap = self.nexus.snapshot()
        self.assertEqual(sorted(r["app"] for r in snap["routes"]), [PLATFORM_APP, "hello"])
        self.assertEqual(self.route()["hostnames"], ["epio.example.com"])
        self.assertEqual(self.route()["options"], {"max_body_size": 1000})
        self.assertEqual(self.backends(), [])

    def test_every_live_api_node_is_a_backend_until_it_goes_silent(self) -> None:
        """Two api nodes are both backends; one that stops beating leaves the route after
        node_timeout, the other stays."""
        for seq in (1, 2, 3):
            self.nexus.api_heartbeat(api_beat("a", 8000, seq))
            if seq == 1:
                self.nexus.api_heartbeat(api_beat("b", 8001, seq, host="10.0.0.2"))
            self.clock.advance(1.0)
        # "b" last beat 3 s ago: expired; "a" beat 1 s ago
        self.assertEqual(self.backends(), [("10.0.0.1", 8000)])
        delta = [b for t, b in self.published if t == "nexus.delta"][-1]
        self.assertEqual(delta["changes"][0]["app"], PLATFORM_APP)

    def test_the_platform_is_not_counted_among_the_apps(self) -> None:
        """/metrics' apps by state (awake, asleep) count users' apps: the platform's own
        route, with its api backends, is not one of them."""
        self.nexus.api_heartbeat(api_beat("a", 8000, 1))
        self.clock.advance(1.0)
        self.assertEqual(self.backends(), [("10.0.0.1", 8000)])
        self.assertEqual(self.nexus.app_states(), {"awake": 0, "asleep": 0})

    def test_an_api_restart_replaces_its_backend(self) -> None:
        """A new boot id with another port moves the backend at once."""
        self.nexus.api_heartbeat(api_beat("a", 8000, 5))
        self.clock.advance(0)
        self.nexus.api_heartbeat(api_beat("a", 8002, 1, boot="b2"))
        self.clock.advance(0)
        self.assertEqual(self.backends(), [("10.0.0.1", 8002)])

    def test_a_draining_api_node_leaves_the_route_at_once(self) -> None:
        """A stopping api node's last heartbeat (draining) takes it out of the route in
        the same turn, not node_timeout later; the other node stays."""
        self.nexus.api_heartbeat(api_beat("a", 8000, 1))
        self.nexus.api_heartbeat(api_beat("b", 8001, 1, host="10.0.0.2"))
        self.clock.advance(0)
        self.assertEqual(len(self.backends()), 2)
        self.nexus.api_heartbeat(dict(api_beat("b", 8001, 2, host="10.0.0.2"), draining=True))
        self.clock.advance(0)
        self.assertEqual(self.backends(), [("10.0.0.1", 8000)])

    def test_runner_instances_of_an_app_named_epio_never_join(self) -> None:
        """A store app or runner instance named like the platform cannot take its route:
        the backends are the api nodes only; the nexus says so, once."""
        with capturedLogs() as events:
            self.nexus.set_view(view("hello", PLATFORM_APP))
            self.nexus.set_view(view("hello", PLATFORM_APP, loaded_at=1.0))
        warned = [e for e in events if "the platform's own name" in e.get("log_format", "")]
        self.assertEqual(len(warned), 1)
        self.nexus.heartbeat(heartbeat(instances=[instance("x", app=PLATFORM_APP, port=9)]))
        self.nexus.api_heartbeat(api_beat("a", 8000))
        self.clock.advance(0)
        self.assertEqual(self.backends(), [("10.0.0.1", 8000)])
        self.assertEqual(self.route()["hostnames"], ["epio.example.com"])

    def test_an_apps_custom_domain_never_takes_the_platform_hostname(self) -> None:
        """A custom domain equal to the platform hostname (added before it was reserved)
        is left out of the app's route: the hostname stays the platform's."""
        self.nexus.set_view(view("hello", extra_hosts={"hello": ["epio.example.com",
                                                                 "www.hello.example"]}))
        self.clock.advance(0)
        self.assertEqual(self.nexus.book.routes["hello"]["hostnames"],
                         ["hello.localhost", "www.hello.example"])
        self.assertEqual(self.route()["hostnames"], ["epio.example.com"])

    def test_where_the_platform_runs(self) -> None:
        """nexus.where {app: epio} answers with the api nodes, each routable."""
        self.nexus.api_heartbeat(api_beat("a", 8000))
        self.clock.advance(0.5)
        where = self.nexus.where_app(PLATFORM_APP)
        self.assertTrue(where["known"])
        self.assertEqual([(i["node"], i["port"], i["routable"]) for i in where["instances"]],
                         [("api@a", 8000, True)])
        self.assertEqual(where["age"], 0.5)
        self.assertEqual(where["route"], self.route())

    def test_malformed_api_heartbeats_are_counted_not_routed(self) -> None:
        """An api heartbeat without a host, or with a bad port, is refused and counted."""
        self.nexus.api_heartbeat({"node_id": "a", "boot_id": "b", "seq": 1, "port": 1})
        self.nexus.api_heartbeat(api_beat("a", 0))
        self.clock.advance(0)
        self.assertEqual(self.backends(), [])
        self.assertEqual(self.nexus.status()["api_heartbeats"]["invalid"], 2)

    def test_without_a_platform_route_api_heartbeats_are_ignored(self) -> None:
        """api.hostname = off: no platform route, heartbeats only counted."""
        nexus = Nexus(self.clock, "nx2", lambda t, b: None, warmup=0)
        nexus.set_view(view("hello"))
        self.assertEqual(nexus.api_heartbeat(api_beat("a", 8000)), "ignored")
        self.clock.advance(0)
        self.assertEqual(list(nexus.book.routes), ["hello"])


class PlatformFactsTests(SynchronousTestCase):
    def test_hostname_and_body_limit_come_from_the_api_section(self) -> None:
        """Default: epio.<node.domain>, a body limit that passes the largest upload;
        an explicit api.hostname wins; off: no route."""
        conf = load_config(None, {"node": {"domain": "Example.COM."},
                                  "api": {"max_upload_mb": 3}})
        facts = platform_facts(conf.settings.api, conf.settings.node.domain)
        assert facts is not None
        self.assertEqual(facts.hostnames, ("epio.example.com",))
        self.assertEqual(facts.releases[0]["max_body_size"], 4 << 20)
        self.assertEqual(facts.releases[0]["first_byte_timeout"], 300.0)
        conf = load_config(None, {"api": {"hostname": "API.example.org"}})
        facts = platform_facts(conf.settings.api, conf.settings.node.domain)
        assert facts is not None
        self.assertEqual(facts.hostnames, ("api.example.org",))
        conf = load_config(None, {"api": {"hostname": "off"}})
        self.assertIsNone(platform_facts(conf.settings.api, conf.settings.node.domain))
