"""Which hostnames an app may claim (epio.api.domain.hostname_refused)."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from epio.api.domain import hostname_refused

PLATFORM = "apps.example.com"
OTHERS = ["*.tenant.example", "shop.example.net", "www.corp.example"]


class HostnameRuleTests(SynchronousTestCase):
    def refused(self, host: str) -> bool:
        return hostname_refused(host, "one", PLATFORM, OTHERS)

    def test_ip_literals_localhost_and_single_labels(self) -> None:
        """IPv4 literals, all-numeric last labels, IPv6 (a colon), localhost and
        names under it, and single-label names are refused."""
        for host in ["127.0.0.1", "10.1.2.3", "1.2.3", "*.0.0.1", "::1", "localhost",
                     "a.localhost", "*.localhost", "com", "intranet"]:
            self.assertTrue(self.refused(host), host)

    def test_the_platform_domain(self) -> None:
        """The platform domain, names under it other than under the app's own name,
        and wildcards above it are refused; under the app's own name is allowed."""
        for host in [PLATFORM, "two.apps.example.com", "x.two.apps.example.com",
                     "*.apps.example.com", "*.example.com"]:
            self.assertTrue(self.refused(host), host)
        for host in ["www.one.apps.example.com", "*.one.apps.example.com"]:
            self.assertFalse(self.refused(host), host)

    def test_other_accounts_claims(self) -> None:
        """A name equal to, under, or covering another account's claim is refused (a
        wildcard claims its root and everything under it); siblings and unrelated
        names are allowed."""
        for host in ["a.tenant.example", "tenant.example", "*.tenant.example",
                     "x.y.tenant.example", "shop.example.net", "a.shop.example.net",
                     "*.example.net", "example.net", "corp.example", "*.corp.example"]:
            self.assertTrue(self.refused(host), host)
        for host in ["blog.example.net", "www.example.org", "*.example.org",
                     "mail.corp2.example", "tenant2.example"]:
            self.assertFalse(self.refused(host), host)
