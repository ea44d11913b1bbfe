"""Cron schedules (epio.cronspec): crontab(5) syntax, UTC slots, refusals with a reason."""

from __future__ import annotations

import datetime as dt

from twisted.trial.unittest import SynchronousTestCase

from epio.cronspec import CronError, parse_schedule


def t(text: str) -> float:
    """POSIX seconds of a UTC 'YYYY-MM-DD HH:MM[:SS]'."""
    fmt = "%Y-%m-%d %H:%M:%S" if text.count(":") == 2 else "%Y-%m-%d %H:%M"
    return dt.datetime.strptime(text, fmt).replace(tzinfo=dt.UTC).timestamp()


class ParseTests(SynchronousTestCase):
    def test_fields_lists_ranges_steps_names(self) -> None:
        """Lists, ranges, steps (also N/STEP), month and weekday names and 7 = Sunday
        expand to the crontab(5) sets."""
        s = parse_schedule("*/15 9-17/4 1,15 jan-mar,DEC 7")
        self.assertEqual(sorted(s.minutes), [0, 15, 30, 45])
        self.assertEqual(sorted(s.hours), [9, 13, 17])
        self.assertEqual(sorted(s.days), [1, 15])
        self.assertEqual(sorted(s.months), [1, 2, 3, 12])
        self.assertEqual(sorted(s.weekdays), [0])
        self.assertEqual(sorted(parse_schedule("5/20 * * * *").minutes), [5, 25, 45])

    def test_macros(self) -> None:
        """@daily and friends are the crontab lines they stand for."""
        self.assertEqual(parse_schedule("@hourly").minutes, frozenset({0}))
        weekly = parse_schedule("@weekly")
        self.assertEqual((weekly.weekdays, weekly.hours), (frozenset({0}), frozenset({0})))

    def test_refusals_say_why(self) -> None:
        """Bad schedules are refused with what is wrong; one that can never run too."""
        cases = {
            "* * * *": "has 4 fields",
            "61 * * * *": "minute: 61 is out of range 0-59",
            "* * * foo *": "month: 'foo' is not a number or a name",
            "*/0 * * * *": "step '0' must be a positive number",
            "5-1 * * * *": "goes backwards",
            "@reboot": "unknown macro '@reboot'",
            "0 0 31 2 *": "never runs",
            "1,,2 * * * *": "empty item",
        }
        for text, why in cases.items():
            with self.assertRaises(CronError, msg=text) as e:
                parse_schedule(text)
            self.assertIn(why, str(e.exception), text)


class SlotTests(SynchronousTestCase):
    def test_every_minute(self) -> None:
        """'* * * * *': the latest slot is the current minute's start, the next one the
        following minute."""
        s = parse_schedule("* * * * *")
        self.assertEqual(s.latest(t("2026-12-07 16:05:42")), t("2026-12-07 16:05"))
        self.assertEqual(s.next_after(t("2026-12-07 16:05")), t("2026-12-07 16:06"))

    def test_daily_across_days_and_years(self) -> None:
        """A 03:00 job before 03:00 was last due yesterday; 1 January rolls years."""
        s = parse_schedule("0 3 * * *")
        self.assertEqual(s.latest(t("2026-12-07 02:59")), t("2026-12-06 03:00"))
        self.assertEqual(s.next_after(t("2026-12-07 03:00")), t("2026-12-08 03:00"))
        y = parse_schedule("@yearly")
        self.assertEqual(y.latest(t("2026-12-07 00:00")), t("2026-01-01 00:00"))
        self.assertEqual(y.next_after(t("2026-12-07 00:00")), t("2027-01-01 00:00"))

    def test_day_of_month_or_weekday(self) -> None:
        """Both day fields restricted: either matches (crontab(5)); one restricted: it
        alone decides."""
        either = parse_schedule("0 0 13 * fri")
        self.assertTrue(either.matches(t("2026-12-11 00:00")))  # a Friday, not the 13th
        self.assertTrue(either.matches(t("2026-12-13 00:00")))  # the 13th, a Sunday
        self.assertFalse(either.matches(t("2026-12-12 00:00")))
        fridays = parse_schedule("0 0 * * 5")
        self.assertEqual(fridays.next_after(t("2026-12-07 00:00")), t("2026-12-11 00:00"))

    def test_leap_day(self) -> None:
        """29 February exists only in leap years: found four years apart."""
        s = parse_schedule("0 12 29 2 *")
        self.assertEqual(s.next_after(t("2026-12-07 00:00")), t("2028-02-29 12:00"))
        self.assertEqual(s.latest(t("2026-12-07 00:00")), t("2024-02-29 12:00"))
