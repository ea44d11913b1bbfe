"""[basic_auth] at the router: the check (epio.basicauth), the route it travels in
(nexus options -> route feed) and the proxy's 401 for every path of the app, on fakes
(MemoryReactorClock, StringTransport)."""

from __future__ import annotations

import base64

from twisted.trial.unittest import SynchronousTestCase

from epio.api.state import release_facts
from epio.basicauth import BasicAuth, hash_password
from epio.manifest import ManifestError, parse_manifest
from epio.nexus.storeview import options_of
from epio.routefeed import BadRoute, route_from_wire
from epio.routing import Backend, Route
from tests.lb.test_proxy import Harness

INI = "[wsgi]\nentrypoint = app:application\n[basic_auth]\nadmin = s3cret\nbob = pä:ss\n" \
      "_realm = Staging area\n"


def basic(user: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


def protected() -> BasicAuth:
    facts = release_facts(parse_manifest(INI, None, ["requirements.txt"]).to_dict())
    auth = BasicAuth.from_wire(options_of(facts)["basic_auth"])
    assert auth is not None
    return auth


class CheckTests(SynchronousTestCase):
    def test_manifest_keeps_only_salted_hashes(self) -> None:
        """Parsing [basic_auth] keeps a salted sha256 per user, never the password, and
        two parses salt differently; the release facts carry the realm and hashes."""
        m = parse_manifest(INI, None, ["requirements.txt"])
        self.assertNotIn("s3cret", m.to_json())
        self.assertTrue(m.basic_auth["admin"].startswith("sha256$"))
        again = parse_manifest(INI, None, ["requirements.txt"])
        self.assertNotEqual(again.basic_auth["admin"], m.basic_auth["admin"])
        facts = release_facts(m.to_dict())
        self.assertEqual(facts["basic_auth"]["realm"], "Staging area")
        self.assertEqual(set(facts["basic_auth"]["users"]), {"admin", "bob"})

    def test_allows_only_the_right_password(self) -> None:
        """The right user and password pass (a password may hold ':' and UTF-8); a wrong
        password, an unknown user, another scheme, bad base64, no colon, an empty or a
        repeated header (b"") do not."""
        auth = protected()
        self.assertTrue(auth.allows(basic("admin", "s3cret")))
        self.assertTrue(auth.allows(basic("bob", "pä:ss")))
        self.assertTrue(auth.allows(b"basic  " + base64.b64encode(b"admin:s3cret")))
        for bad in (basic("admin", "s3cret!"), basic("admin", ""), basic("eve", "s3cret"),
                    basic("Admin", "s3cret"), b"Bearer " + base64.b64encode(b"admin:s3cret"),
                    b"Basic not*base64", b"Basic " + base64.b64encode(b"admins3cret"),
                    b"", None, b"Basic"):
            self.assertFalse(auth.allows(bad), bad)
        self.assertIn(b'WWW-Authenticate: Basic realm="Staging area"', auth.challenge)

    def test_bad_sections_refused_with_line(self) -> None:
        """A realm that cannot go in a header, a user without a password and a realm
        without users are refused with epio.ini:LINE."""
        with self.assertRaises(ManifestError) as cm:
            parse_manifest('[wsgi]\nentrypoint = a:b\n[basic_auth]\n_realm = say "hi"\n'
                           "admin =\n", None, ["requirements.txt"])
        self.assertEqual(len(cm.exception.errors), 2, cm.exception.errors)
        self.assertIn("epio.ini:4: [basic_auth] _realm: 'say \"hi\"' must not contain",
                      cm.exception.errors[0])
        self.assertIn("epio.ini:5: [basic_auth] admin: needs a password",
                      cm.exception.errors[1])
        with self.assertRaises(ManifestError) as cm:
            parse_manifest("[wsgi]\nentrypoint = a:b\n[basic_auth]\n_realm = Area\n", None,
                           ["requirements.txt"])
        self.assertIn("epio.ini:4: [basic_auth] _realm: set, but no 'user = password'",
                      cm.exception.errors[0])

    def test_route_fails_closed(self) -> None:
        """A route whose basic_auth option cannot be read is refused (BadRoute), never
        routed unprotected; a good one becomes the Route's check."""
        wire = {"app": "a", "hostnames": ["a.example.com"], "backends": [],
                "options": {"basic_auth": {"realm": "R", "users": {"u": "plain"}}}}
        self.assertRaises(BadRoute, route_from_wire, wire)
        wire["options"] = {"basic_auth": {"realm": "R", "users": {"u": hash_password("p")}}}
        route = route_from_wire(wire)
        assert route.basic_auth is not None
        self.assertTrue(route.basic_auth.allows(basic("u", "p")))


class ProxyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness([Backend("10.0.0.1", 1)], static_secret=b"k" * 32)
        route = Route("a", ["a.example.com"], [Backend("10.0.0.1", 1)],
                      static_prefixes=("/static",),
                      static_backends=(Backend("10.0.0.9", 9),), basic_auth=protected())
        self.h.table.replace([route])

    def ask(self, path: bytes, authorization: bytes | None = None) -> bytes:
        c, t = self.h.client()
        auth = b"Authorization: " + authorization + b"\r\n" if authorization else b""
        c.dataReceived(b"GET " + path + b" HTTP/1.1\r\nHost: a.example.com\r\n" + auth + b"\r\n")
        return t.value()

    def test_401_for_app_and_static_paths(self) -> None:
        """Without credentials, or with a wrong password, the app's pages and its static
        files get 401 with WWW-Authenticate naming the realm, and no backend is asked."""
        for path in (b"/", b"/admin/", b"/static/app.css", b"/static"):
            for creds in (None, basic("admin", "nope")):
                out = self.ask(path, creds)
                self.assertTrue(out.startswith(b"HTTP/1.1 401 Unauthorized\r\n"), out)
                self.assertIn(b'\r\nWWW-Authenticate: Basic realm="Staging area", '
                              b'charset="UTF-8"\r\n', out)
        self.assertEqual(self.h.clock.tcpClients, [])
        self.assertEqual(self.h.observer.totals["unauthorized"], 8)

    def test_right_credentials_pass_and_are_not_logged(self) -> None:
        """The right credentials reach the app (with its Authorization header) and the
        static server; the access log records neither header nor password."""
        creds = basic("admin", "s3cret")
        self.ask(b"/page", creds)
        self.ask(b"/static/app.css", creds)
        self.assertEqual([c[:2] for c in self.h.clock.tcpClients],
                         [("10.0.0.1", 1), ("10.0.0.9", 9)])
        bp, bt, _ = self.h.accept()
        self.assertIn(b"\r\nAuthorization: " + creds + b"\r\n", bt.value())
        logged = repr(self.h.observer.pending)
        self.assertNotIn("s3cret", logged)
        self.assertNotIn(creds.decode()[6:], logged)
