"""A user's grep pattern cannot stall a logger (RE2: linear time, no backtracking)."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from epio.logclient import BadFilter, LineFilter, compile_grep


class GrepTests(SynchronousTestCase):
    def test_catastrophic_pattern_is_harmless(self) -> None:
        """(a+)+$ against a long non-matching line answers at once (Python's re would
        backtrack for hours); the test would hang, not fail, without RE2."""
        rx = compile_grep("(a+)+$")
        self.assertIsNone(rx.search("a" * 20_000 + "b"))
        self.assertIsNotNone(rx.search("xaaa"))

    def test_ordinary_regexes_work(self) -> None:
        """Classes, anchors, alternation and case-insensitivity behave as users expect."""
        self.assertIsNotNone(compile_grep(r"line 1\d$").search("line 12"))
        self.assertIsNone(compile_grep(r"^GET /api").search("POST /api"))
        self.assertIsNotNone(compile_grep(r"(?i)error|warn").search("WARNING: disk"))

    def test_invalid_and_unsupported_patterns_are_clear_errors(self) -> None:
        """A bad pattern, or a backreference RE2 does not support, is a BadFilter with a
        readable message (never a crash)."""
        for pattern in ["(unclosed", r"(a)\1"]:
            with self.assertRaises(BadFilter) as cm:
                LineFilter(grep=pattern)
            self.assertIn("not a valid regular expression", str(cm.exception))
            self.assertNotIn("b'", str(cm.exception))
