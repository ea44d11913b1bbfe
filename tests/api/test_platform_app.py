"""App 0 in the API: the platform's reserved name and hostname, and its access log for
admins (epio.domain.PLATFORM_APP)."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import SynchronousTestCase, TestCase

from epio.api.settings import ApiSettings
from epio.config import load_config
from epio.domain import platform_hostname, reserved_app_name_problem
from tests.api.support import Harness


class PlatformAppTests(TestCase):
    timeout = 30

    def setUp(self) -> Any:
        self.h = Harness(ApiSettings(domain="example.com", platform_hostname="shop.example.com",
                                     drain_seconds=0.0, route_settle=0.0))
        self.addCleanup(lambda: ensureDeferred(self.h.stop()))
        return ensureDeferred(self.h.start())

    def call(self, *args: Any, **kw: Any) -> Any:
        return ensureDeferred(self.h.call(*args, **kw))

    async def test_reserved_names_cannot_be_created(self) -> None:
        """No user, admins included, may create the platform's app or an app whose own
        hostname is the platform's (409, the reason given); the app list never shows it."""
        for name, why in [("epio", "reserved"), ("api", "reserved"),
                          ("shop", "shop.example.com is the platform's own hostname")]:
            for token in (self.h.alice_token, self.h.admin_token):
                status, body, _ = await self.call("POST", "apps", token=token,
                                                  body={"name": name})
                self.assertEqual(status, 409, body)
                self.assertIn(why, body["error"]["message"])
        _, apps, _ = await self.call("GET", "apps", token=self.h.admin_token)
        self.assertEqual(apps, [])

    async def test_the_platform_hostname_cannot_be_claimed(self) -> None:
        """The platform hostname, names under it and wildcards covering it are refused
        as custom domains (like any refused name: 400 validation_failed)."""
        await self.call("POST", "apps", token=self.h.alice_token, body={"name": "one"})
        for host in ["shop.example.com", "a.shop.example.com", "*.shop.example.com"]:
            status, body, _ = await self.call("POST", "apps/one/domains",
                                              token=self.h.alice_token,
                                              body={"hostname": host})
            self.assertEqual((status, body["error"]["code"]), (400, "validation_failed"),
                             host)

    async def test_only_admins_read_the_platforms_log(self) -> None:
        """An admin may name the platform on the log and stats endpoints (here: 503
        logs_unavailable, no logger in this harness), and only there; a user gets 404."""
        for path in ("apps/epio/logs", "apps/epio/stats"):
            status, body, _ = await self.call("GET", path, token=self.h.admin_token)
            self.assertEqual((status, body["error"]["code"]), (503, "logs_unavailable"), path)
            status, body, _ = await self.call("GET", path, token=self.h.alice_token)
            self.assertEqual(status, 404, path)
        status, _, _ = await self.call("GET", "apps/epio", token=self.h.admin_token)
        self.assertEqual(status, 404)
        status, _, _ = await self.call("POST", "apps/epio/deploys", token=self.h.admin_token,
                                       raw=b"x", content_type="application/gzip")
        self.assertEqual(status, 404)


class VocabularyTests(SynchronousTestCase):
    def test_platform_hostname(self) -> None:
        """epio.<domain> by default, the configured name normalised, off: none."""
        self.assertEqual(platform_hostname("", "Example.com."), "epio.example.com")
        self.assertEqual(platform_hostname("API.Example.org.", "example.com"), "api.example.org")
        self.assertEqual(platform_hostname("off", "example.com"), "")

    def test_reserved_app_names(self) -> None:
        """The reserved names, and the label of a platform hostname under the domain."""
        self.assertIsNotNone(reserved_app_name_problem("epio"))
        self.assertIsNotNone(reserved_app_name_problem("www"))
        self.assertIsNone(reserved_app_name_problem("hello", "epio.example.com", "example.com"))
        self.assertIsNotNone(reserved_app_name_problem("ctl", "ctl.example.com", "example.com"))

    def test_config_checks_hostname_and_advertise(self) -> None:
        """api.hostname must be a hostname (or off); api.advertise HOST:PORT."""
        from epio.config import ConfigError

        with self.assertRaises(ConfigError) as caught:
            load_config(None, {"api": {"hostname": "https://x.example/",
                                       "advertise": "10.0.0.1"}})
        text = str(caught.exception)
        self.assertIn("api.hostname", text)
        self.assertIn("api.advertise", text)
        conf = load_config(None, {"api": {"hostname": "x.example", "advertise": "[::1]:8000"}})
        self.assertEqual(conf.settings.api.advertise, "[::1]:8000")
        self.assertEqual(ApiSettings.from_config(conf).platform_hostname, "x.example")

    def test_platform_url(self) -> None:
        """The routed API URL printed at first start: the app URL template with the
        platform hostname (default: epio.<domain> on lb.listen's port); none when off."""
        url = ApiSettings.from_config(load_config(None, {"lb": {"listen": "tcp:8080"}}))
        self.assertEqual(url.platform_url(), "http://epio.localhost:8080")
        conf = load_config(None, {"api": {"hostname": "api.example.org",
                                          "app_url": "https://{app}.{domain}/"}})
        self.assertEqual(ApiSettings.from_config(conf).platform_url(), "https://api.example.org")
        conf = load_config(None, {"api": {"hostname": "off"}})
        self.assertIsNone(ApiSettings.from_config(conf).platform_url())
