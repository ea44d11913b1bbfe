"""The message registry: declarations, validation, and docs/messages.md coverage."""

from __future__ import annotations

from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from epio.bus.messages import REGISTRY, MessageType, Registry

DOCS = Path(__file__).resolve().parents[2] / "docs" / "messages.md"


class RegistryTests(SynchronousTestCase):
    def test_every_type_documented(self) -> None:
        """docs/messages.md's type table is exactly the registry's (regenerate it with
        ``python -m epio.bus.docs --write`` after declaring a type)."""
        from epio.bus import docs

        text = DOCS.read_text("utf-8")
        self.assertEqual(text, docs.render(text),
                         "docs/messages.md is stale: run python -m epio.bus.docs --write")
        for mtype in REGISTRY:
            self.assertIn(f"| `{mtype.name}` |", text)

    def test_names_are_dotted(self) -> None:
        """Type names are lower-case ``area.name``."""
        for mtype in REGISTRY:
            self.assertRegex(mtype.name, r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")

    def test_duplicate_refused(self) -> None:
        """Declaring a type twice is an error."""
        self.assertRaises(ValueError, Registry, [MessageType("a.b", 1, "push", "x"),
                                                 MessageType("a.b", 1, "push", "y")])

    def test_bad_declarations_refused(self) -> None:
        """Unknown patterns and inverted version ranges are refused."""
        self.assertRaises(ValueError, MessageType, "a.b", 1, "broadcast", "x")
        self.assertRaises(ValueError, MessageType, "a.b", 1, "push", "x", min_version=2)

    def test_field_types(self) -> None:
        """Required fields must exist with their type; optional ones are typed when present."""
        t = MessageType("a.b", 1, "push", "x", fields={"n": int, "f": (int, float)},
                        optional={"s": str, "o": (str, type(None))})
        self.assertIsNone(t.check_body({"n": 1, "f": 2.5}))
        self.assertIsNone(t.check_body({"n": 1, "f": 2, "s": "x", "o": None}))
        self.assertIsNotNone(t.check_body({"n": 1}))
        self.assertIsNotNone(t.check_body({"n": 1.5, "f": 1}))
        self.assertIsNotNone(t.check_body({"n": False, "f": 1}))
        self.assertIsNotNone(t.check_body({"n": 1, "f": 1, "s": 3}))
        self.assertIsNotNone(t.check_body({"n": 1, "f": None}))

    def test_test_types_stay_out_of_production(self) -> None:
        """The test.* types are only in the test registry, which also knows every
        production type."""
        from epio.bus.testing import TEST_REGISTRY

        self.assertNotIn("test.echo", REGISTRY)
        self.assertEqual(TEST_REGISTRY["test.echo"].pattern, "request")
        self.assertIs(TEST_REGISTRY["log.line"], REGISTRY["log.line"])
        self.assertRaises(KeyError, TEST_REGISTRY.__getitem__, "no.such")
        self.assertRaises(ValueError, Registry, [MessageType("log.line", 1, "push", "x")],
                          parent=REGISTRY)

    def test_log_types_declared(self) -> None:
        """The log pipeline's types exist as push messages."""
        self.assertEqual(REGISTRY["log.line"].pattern, "push")
        self.assertEqual(REGISTRY["stats.sample"].pattern, "push")
        self.assertEqual(REGISTRY["bus.ping"].pattern, "request")


class ImportTests(SynchronousTestCase):
    def test_importing_the_bus_installs_no_reactor(self) -> None:
        """Importing epio.bus, its registry, its test double and epio.pipeline neither
        imports txzmq nor installs a reactor (twistd's plugin discovery must stay clean)."""
        import subprocess
        import sys

        from tests.util import epio_env

        code = ("import sys, epio.bus, epio.bus.messages, epio.bus.testing, epio.pipeline; "
                "print('txzmq' in sys.modules, 'twisted.internet.reactor' in sys.modules)")
        out = subprocess.run([sys.executable, "-c", code], env=epio_env(), capture_output=True,
                             text=True, timeout=60, check=True)
        self.assertEqual(out.stdout.split(), ["False", "False"])
