"""Cron schedules: the five-field crontab syntax and the ``@daily`` macros, in UTC.

Shared floor: the manifest parser validates ``[cron]`` schedules with it (a bad one
is refused with ``file:line``), the api's cron runner computes when entries are due.

Syntax (Vixie cron's, as ep.io and every crontab used it)::

    MIN HOUR DAY-OF-MONTH MONTH DAY-OF-WEEK
    0-59 0-23 1-31        1-12  0-7 (0 and 7 are Sunday)

A field is a comma-separated list of ``*``, ``N``, ``N-M``, each optionally
followed by ``/STEP`` (``*/15``; ``5/15`` means ``5-59/15``).  Months and week
days may be written by name (``jan``..``dec``, ``sun``..``sat``, any case).  When
both day fields are restricted (neither starts with ``*``), a day matches if
EITHER matches (crontab(5)); otherwise both must.  Macros: ``@yearly``
(``@annually``), ``@monthly``, ``@weekly``, ``@daily`` (``@midnight``),
``@hourly``.  ``@reboot`` has no meaning on a platform whose nodes restart
independently and is refused.

Times are UTC (the platform's nodes may sit in any zone; say so to users).
"""

from __future__ import annotations

import calendar
import datetime as dt

from attrs import frozen

__all__ = ["MACROS", "CronError", "CronSpec", "parse_schedule"]

MACROS = {
    "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_MONTHS = {name.lower(): i for i, name in enumerate(calendar.month_abbr) if name}
_DAYS = {"sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6}
# (name, low, high, names)
_FIELDS: tuple[tuple[str, int, int, dict[str, int]], ...] = (
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day of month", 1, 31, {}),
    ("month", 1, 12, _MONTHS),
    ("day of week", 0, 7, _DAYS),
)
_MONTH_DAYS = {1: 31, 2: 29, 3: 31, 4: 30, 5: 31, 6: 30, 7: 31, 8: 31, 9: 30, 10: 31,
               11: 30, 12: 31}
#: How far back or ahead a slot is searched (days): the longest gap of any valid
#: schedule is a 29 February on a given weekday (28 years); past this, "none".
SEARCH_DAYS = 366 * 29


class CronError(ValueError):
    """A schedule that is not valid cron syntax, or that can never run."""


def _value(text: str, low: int, high: int, names: dict[str, int], what: str) -> int:
    key = text.lower()
    if key in names:
        return names[key]
    if not text.isdigit():
        raise CronError(f"{what}: {text!r} is not a number"
                        + (f" or a name ({', '.join(names)})" if names else ""))
    n = int(text)
    if not low <= n <= high:
        raise CronError(f"{what}: {n} is out of range {low}-{high}")
    return n


def _field(text: str, low: int, high: int, names: dict[str, int], what: str) -> frozenset[int]:
    out: set[int] = set()
    for part in text.split(","):
        if not part:
            raise CronError(f"{what}: empty item in {text!r}")
        rng, slash, step_text = part.partition("/")
        step = 1
        if slash:
            if not step_text.isdigit() or int(step_text) < 1:
                raise CronError(f"{what}: step {step_text!r} must be a positive number")
            step = int(step_text)
        if rng == "*":
            a, b = low, high
        elif "-" in rng:
            x, _, y = rng.partition("-")
            a, b = _value(x, low, high, names, what), _value(y, low, high, names, what)
            if a > b:
                raise CronError(f"{what}: range {rng!r} goes backwards")
        else:
            a = _value(rng, low, high, names, what)
            b = high if slash else a
        out.update(range(a, b + 1, step))
    return frozenset(out)


@frozen
class CronSpec:
    """A parsed schedule; times are POSIX seconds, matched in UTC to the minute."""

    text: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday .. 6
    days_any: bool
    weekdays_any: bool

    def day_matches(self, d: dt.date) -> bool:
        if d.month not in self.months:
            return False
        dom = d.day in self.days
        dow = (d.weekday() + 1) % 7 in self.weekdays
        if self.days_any or self.weekdays_any:
            return dom and dow
        return dom or dow

    def matches(self, t: float) -> bool:
        """Is the minute containing ``t`` a slot of this schedule?"""
        u = dt.datetime.fromtimestamp(t, dt.UTC)
        return (u.minute in self.minutes and u.hour in self.hours
                and self.day_matches(u.date()))

    def latest(self, t: float) -> float | None:
        """The start of the most recent slot at or before ``t`` (None: none found)."""
        u = dt.datetime.fromtimestamp(t, dt.UTC)
        minutes = sorted(self.minutes, reverse=True)
        for back in range(SEARCH_DAYS):
            day = u.date() - dt.timedelta(days=back)
            if not self.day_matches(day):
                continue
            for h in sorted(self.hours, reverse=True):
                if back == 0 and h > u.hour:
                    continue
                bound = u.minute if back == 0 and h == u.hour else 59
                m = next((m for m in minutes if m <= bound), None)
                if m is not None:
                    return _at(day, h, m)
        return None

    def next_after(self, t: float) -> float | None:
        """The start of the first slot strictly after ``t`` (None: none found)."""
        u = dt.datetime.fromtimestamp(t, dt.UTC)
        minutes = sorted(self.minutes)
        for ahead in range(SEARCH_DAYS):
            day = u.date() + dt.timedelta(days=ahead)
            if not self.day_matches(day):
                continue
            for h in sorted(self.hours):
                if ahead == 0 and h < u.hour:
                    continue
                first = ahead == 0 and h == u.hour
                m = next((m for m in minutes if not first or m > u.minute), None)
                if m is not None:
                    return _at(day, h, m)
        return None


def _at(day: dt.date, hour: int, minute: int) -> float:
    return dt.datetime(day.year, day.month, day.day, hour, minute, tzinfo=dt.UTC).timestamp()


def parse_schedule(text: str) -> CronSpec:
    """Parse five cron fields or a macro; raises :class:`CronError` saying why."""
    src = " ".join(text.split())
    expanded = MACROS.get(src.lower(), src) if src.startswith("@") else src
    if expanded.startswith("@"):
        raise CronError(f"unknown macro {src!r} (known: {', '.join(sorted(MACROS))})")
    parts = expanded.split()
    if len(parts) != 5:
        raise CronError(f"{src!r} has {len(parts)} fields; a schedule has 5 "
                        "(MIN HOUR DAY MONTH WEEKDAY) or is a macro like @daily")
    sets = [_field(p, lo, hi, names, what) for p, (what, lo, hi, names) in zip(parts, _FIELDS,
                                                                               strict=True)]
    weekdays = frozenset(d % 7 for d in sets[4])
    spec = CronSpec(src, sets[0], sets[1], sets[2], sets[3], weekdays,
                    days_any=parts[2].startswith("*"), weekdays_any=parts[4].startswith("*"))
    if spec.weekdays_any and not any(d <= _MONTH_DAYS[m] for m in spec.months
                                     for d in spec.days):
        # the day of month decides alone: it must exist in one of the months
        raise CronError(f"{src!r} never runs: none of its months has that day")
    return spec
