"""Hostname squatting over real HTTP: a second user cannot take IP literals,
localhost, the platform domain or names under another user's claim, and every
refusal is the answer of a malformed name (it does not tell who owns a name)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.util import NodeProcess, isolated_config, to_toml, wait_for_port

PLATFORM = "apps.example.test"
START_TIMEOUT = 60.0


class HostnameSquattingTests(SynchronousTestCase):
    """One api node (SQLite store) for the whole class."""

    node: NodeProcess
    api: str

    @classmethod
    def setUpClass(cls) -> None:
        doc, ports = isolated_config()
        cls.node = NodeProcess(["--role=api", "--domain", PLATFORM], config=to_toml(doc))
        try:
            wait_for_port("127.0.0.1", ports[8000], timeout=START_TIMEOUT)
            cls.node.wait_for_log("api ready", timeout=START_TIMEOUT)
        except BaseException:
            cls.node.cleanup()
            raise
        cls.api = f"http://127.0.0.1:{ports[8000]}/api/v1"

    @classmethod
    def tearDownClass(cls) -> None:
        cls.node.stop()
        cls.node.cleanup()

    def call(self, method: str, path: str, token: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.api}/{path}", data=data, method=method,
                                     headers={"Authorization": f"Bearer {token}",
                                              "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def user(self, name: str) -> str:
        admin = (self.node.data_dir / "admin-token").read_text().strip()
        status, body = self.call("POST", "users", admin, {"name": name})
        self.assertEqual(status, 201, body)
        return str(body["token"])

    def test_second_user_cannot_squat(self) -> None:
        """Alice claims *.tenant.example and shop.example.net; Bob's attempts at
        127.0.0.1, ::1, localhost, the platform domain, another app's platform name, a
        sibling under Alice's wildcard, its apex, Alice's exact name and a wildcard
        above it all get 400 validation_failed with exactly the body of a malformed
        name; Bob's own unrelated name is 201; nothing Bob tried is in Alice's or
        Bob's domain list."""
        alice, bob = self.user("alice"), self.user("bob")
        self.assertEqual(self.call("POST", "apps", alice, {"name": "one"})[0], 201)
        self.assertEqual(self.call("POST", "apps", bob, {"name": "two"})[0], 201)
        for host in ["*.tenant.example", "shop.example.net"]:
            self.assertEqual(self.call("POST", "apps/one/domains", alice,
                                       {"hostname": host})[0], 201, host)
        status, malformed = self.call("POST", "apps/two/domains", bob,
                                      {"hostname": "not_a_name"})
        self.assertEqual((status, malformed["error"]["code"]), (400, "validation_failed"))
        attempts = ["127.0.0.1", "::1", "localhost", PLATFORM, f"one.{PLATFORM}",
                    "www.tenant.example", "tenant.example", "shop.example.net",
                    "*.example.net"]
        for host in attempts:
            self.assertEqual(self.call("POST", "apps/two/domains", bob, {"hostname": host}),
                             (400, malformed), host)
        self.assertEqual(self.call("POST", "apps/two/domains", bob,
                                   {"hostname": "www.bob.example"})[0], 201)
        listed = {d["hostname"] for app, token in (("one", alice), ("two", bob))
                  for d in self.call("GET", f"apps/{app}/domains", token)[1]}
        self.assertEqual(listed, {f"one.{PLATFORM}", f"two.{PLATFORM}", "*.tenant.example",
                                  "shop.example.net", "www.bob.example"})
