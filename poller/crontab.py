"""Crontab expressions read as cron(8) reads them, on APScheduler 3's CronTrigger (UTC).

APScheduler 3 differs from crontab in two ways its documentation admits (issue 286): a day-of-week
number counts from Monday (crontab's 1-5, Monday to Friday, ran Tuesday to Saturday), and a
restricted day of month and day of week must both match (crontab fires when either does: "0 7 1 * 1"
is the 1st and every Monday). Both are translated here; every cron of poller goes through this.
"""

from __future__ import annotations

import re
from datetime import UTC
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from apscheduler.triggers.base import BaseTrigger

# Crontab's day numbers: 0 (and 7) is Sunday. APScheduler takes the names unambiguously.
_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_DAY = r"([0-7]|sun|mon|tue|wed|thu|fri|sat)"
_TOKEN = re.compile(rf"(?:\*|{_DAY}(?:-{_DAY})?)(?:/([1-9][0-9]*))?", re.IGNORECASE)


def _day(text: str) -> int:
    """A day as crontab writes it, a number (7 kept: a range may end on it) or a name."""
    return int(text) if text.isdigit() else _NAMES.index(text.lower())


def weekdays(field: str) -> list[int]:
    """The crontab day-of-week field as day numbers (0 = Sunday), sorted; ValueError if unreadable."""
    days: set[int] = set()
    for token in field.split(","):
        match = _TOKEN.fullmatch(token.strip())
        if match is None:
            raise ValueError(f"day of week {field!r}: {token!r} is not a day (0-7 or sun-sat), range or step")
        first, last, step = match.groups()
        if first is None:  # "*" or "*/n"
            low, high = 0, 6
        else:
            low = _day(first)
            high = low if last is None else _day(last)
            if last is None and step is not None:
                high = 7  # "1/2" or "mon/2": from Monday to the end of the week, Sunday (7) included
            if high < low:
                raise ValueError(f"day of week {field!r}: the range {token!r} runs backwards")
        days.update(d % 7 for d in range(low, high + 1, int(step or 1)))
    return sorted(days)


@lru_cache(maxsize=1024)
def trigger(expr: str) -> BaseTrigger:
    """The trigger of crontab ``expr`` in UTC; ValueError (APScheduler's words, or ours) if it is not one."""
    from apscheduler.triggers.combining import OrTrigger
    from apscheduler.triggers.cron import CronTrigger

    fields = expr.split()
    if len(fields) != 5:
        raise ValueError(f"wrong number of fields: got {len(fields)}, expected 5 (minute hour day month weekday)")
    minute, hour, day, month, weekday = fields
    dow = weekday if weekday == "*" else ",".join(_NAMES[d] for d in weekdays(weekday))
    if not day.startswith("*") and not weekday.startswith("*"):
        return OrTrigger(
            [
                CronTrigger(minute=minute, hour=hour, day=day, month=month, timezone=UTC),
                CronTrigger(minute=minute, hour=hour, month=month, day_of_week=dow, timezone=UTC),
            ]
        )
    return CronTrigger(minute=minute, hour=hour, day=day, month=month, day_of_week=dow, timezone=UTC)
