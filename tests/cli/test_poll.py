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


class ScriptedApi:
    """The deploy endpoint as the CLI's ``Client.get`` sees it: each look answers the
    next scripted deploy after its delay (a waiting API holds its answer)."""

    def __init__(self, answers: list[tuple[float, str, str]]) -> None:
        self.answers = answers
        self.asked: list[dict[str, object]] = []

    def get(self, path: str, **query: object) -> dict[str, object]:
        import time

        self.asked.append(query)
        delay, status, log = self.answers.pop(0)
        time.sleep(delay)
        return {"id": "d1" * 16, "status": status, "log": log, "reason": None,
                "log_offset": len(log), "image": "x",
                "release": 2, "url": "http://hello.localhost/"}


class FollowDeployTests(SynchronousTestCase):
    def args(self) -> object:
        import argparse

        return argparse.Namespace(json=False, timeout=60.0, poll=1.0)

    def test_asks_the_api_to_wait_for_the_next_line(self) -> None:
        """Without a build log to print, each look asks the API to hold its answer for
        the deploy's next line (wait=5) and the CLI asks again at once: "Deployed" is
        seen the moment the API has it, with no sleep of the CLI's own between."""
        import io
        import time
        from contextlib import redirect_stdout

        from epio.cli.commands import DEPLOY_WAIT, follow_deploy

        api = ScriptedApi([(0.0, "deploying", "Release v2\n"), (0.6, "deploying", ""),
                           (0.1, "succeeded", "Deployed v2\n")])
        started = time.monotonic()
        with redirect_stdout(io.StringIO()):
            d = follow_deploy(api, "hello", "d1", self.args())  # type: ignore[arg-type]
        self.assertLess(time.monotonic() - started, 0.7 + 0.25)
        self.assertEqual(d["status"], "succeeded")
        self.assertEqual([q.get("wait") for q in api.asked], [DEPLOY_WAIT] * 3)

    def test_an_api_that_does_not_wait_is_polled_at_the_pace(self) -> None:
        """An (older) API that answers at once with nothing new is looked at again
        after PollPace's waits (0.1, 0.15 s, ...), not in a tight loop."""
        import io
        import time
        from contextlib import redirect_stdout

        from epio.cli.commands import follow_deploy

        api = ScriptedApi([(0.0, "deploying", "Release v2\n"), (0.0, "deploying", ""),
                           (0.0, "deploying", ""), (0.0, "succeeded", "Deployed v2\n")])
        started = time.monotonic()
        with redirect_stdout(io.StringIO()):
            follow_deploy(api, "hello", "d1", self.args())  # type: ignore[arg-type]
        self.assertGreaterEqual(time.monotonic() - started, 0.1 + 0.15)
