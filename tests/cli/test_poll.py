"""How often ``epio deploy`` looks at a deploy (epio.cli.commands.PollPace)."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from epio.cli.commands import POLL_FIRST, PollPace


class PollPaceTests(SynchronousTestCase):
    def test_starts_fast_and_backs_off_to_the_ceiling(self) -> None:
        """Quiet looks wait 0.1 s, then 1.5x longer each time, never more than the
        ceiling (--poll)."""
        pace = PollPace(1.0)
        waits = [pace.next(False) for _ in range(8)]
        self.assertEqual(waits[0], POLL_FIRST)
        self.assertAlmostEqual(waits[1], 0.15)
        self.assertEqual(waits[-1], 1.0)
        self.assertEqual(waits, sorted(waits))
        self.assertLessEqual(max(waits), 1.0)

    def test_a_change_starts_again_fast(self) -> None:
        """A look that shows new log lines or a new status brings the wait back to
        0.1 s: the end of a deploy is seen about a tenth of a second late."""
        pace = PollPace(1.0)
        for _ in range(10):
            pace.next(False)
        self.assertEqual(pace.next(True), POLL_FIRST)
        self.assertAlmostEqual(pace.next(False), POLL_FIRST * 1.5)

    def test_a_ceiling_below_the_first_wait_wins(self) -> None:
        """--poll 0.05 (tests) polls every 0.05 s."""
        pace = PollPace(0.05)
        self.assertEqual([pace.next(c) for c in (False, True, False)], [0.05] * 3)
