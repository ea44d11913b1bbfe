"""What a build's manifest puts in a release reaches the router as route options."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from epio.api.state import release_facts
from epio.manifest import parse_manifest
from epio.nexus.storeview import options_of


class ReleaseFactsTests(SynchronousTestCase):
    def test_http_limits_become_route_options(self) -> None:
        """[http] timeout, idle_timeout and max_body_size in epio.ini end up as the
        router's per-app first-byte timeout, idle timeout and body limit."""
        manifest = parse_manifest(
            "[wsgi]\nentrypoint = app:application\n"
            "[http]\nhealth_check = /health\ntimeout = 12\nidle_timeout = 40\n"
            "max_body_size = 2048\n",
            None, {"requirements.txt"},
        )
        facts = release_facts(manifest.to_dict())
        self.assertEqual(facts["health_check"], "/health")
        self.assertEqual(
            options_of(facts),
            {"first_byte_timeout": 12, "idle_timeout": 40, "max_body_size": 2048},
        )

    def test_request_buffering_travels_to_the_route(self) -> None:
        """[http] request_buffering = false reaches the nexus's route options and, over
        the wire, the router's Route; a bad value is refused with file:line."""
        from epio.manifest import ManifestError
        from epio.routefeed import route_from_wire

        manifest = parse_manifest(
            "[wsgi]\nentrypoint = app:application\n[http]\nrequest_buffering = false\n",
            None, {"requirements.txt"})
        self.assertIs(manifest.http.request_buffering, False)
        options = options_of(release_facts(manifest.to_dict()))
        self.assertEqual(options, {"request_buffering": False})
        route = route_from_wire({"app": "a", "hostnames": ["a.example"], "backends": [],
                                 "options": options})
        self.assertIs(route.request_buffering, False)
        default = parse_manifest("[wsgi]\nentrypoint = app:application\n", None,
                                 {"requirements.txt"})
        self.assertIsNone(default.http.request_buffering)
        with self.assertRaises(ManifestError) as cm:
            parse_manifest("[wsgi]\nentrypoint = app:application\n[http]\n"
                           "request_buffering = sometimes\n", None, {"requirements.txt"})
        self.assertIn("epio.ini:4: [http] request_buffering: must be true or false",
                      "\n".join(cm.exception.errors))

    def test_no_http_section(self) -> None:
        """Without [http] the release carries no route overrides."""
        manifest = parse_manifest("[wsgi]\nentrypoint = app:application\n", None,
                                  {"requirements.txt"})
        self.assertEqual(options_of(release_facts(manifest.to_dict())), {})


class IdleSleepTests(SynchronousTestCase):
    def test_idle_sleep_units_reach_the_release(self) -> None:
        """[http] idle_sleep takes 2s, 30m, 1h, a bare number of seconds, or off (0: never
        sleeps); it reaches the release's facts (the runner's, not a route option)."""
        for value, seconds in (("2s", 2.0), ("30m", 1800.0), ("1h", 3600.0), ("90", 90.0),
                               ("off", 0.0)):
            manifest = parse_manifest(
                f"[wsgi]\nentrypoint = app:application\n[http]\nidle_sleep = {value}\n",
                None, {"requirements.txt"})
            self.assertEqual(manifest.http.idle_sleep, seconds, value)
            facts = release_facts(manifest.to_dict())
            self.assertEqual(facts["idle_sleep"], seconds)
            self.assertEqual(options_of(facts), {})
        manifest = parse_manifest("[wsgi]\nentrypoint = app:application\n", None,
                                  {"requirements.txt"})
        self.assertIsNone(manifest.http.idle_sleep)
        self.assertNotIn("idle_sleep", release_facts(manifest.to_dict()))

    def test_bad_idle_sleep_is_refused(self) -> None:
        """A value that is no duration, or under 1 s, or over 30 days, is refused with
        the file and line."""
        from epio.manifest import ManifestError

        for value in ("soon", "0.5s", "31d", "-2s", "5 minutes"):
            with self.assertRaises(ManifestError) as e:
                parse_manifest(f"[wsgi]\nentrypoint = app:application\n[http]\n"
                               f"idle_sleep = {value}\n", None, {"requirements.txt"})
            self.assertIn("epio.ini:4", str(e.exception))
            self.assertIn("[http] idle_sleep", str(e.exception))
