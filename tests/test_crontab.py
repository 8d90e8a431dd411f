"""Crontab expressions fire when cron(8) would: weekday numbers from Sunday, day of month OR weekday."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from poller.crontab import trigger, weekdays

# Friday 27 November 2026, 00:00 UTC.
FRI = datetime(2026, 11, 27, tzinfo=UTC)


def fires(expr: str, start: datetime = FRI, n: int = 6) -> list[str]:
    out, now = [], start
    for _ in range(n):
        fire = trigger(expr).get_next_fire_time(None, now)
        assert fire is not None
        out.append(fire.astimezone(UTC).strftime("%a %d %H:%M"))
        now = fire + timedelta(seconds=1)
    return out


def test_weekday_numbers_count_from_sunday_as_in_crontab():
    # APScheduler 3's from_crontab read 1-5 as Tuesday to Saturday.
    assert fires("0 7 * * 1-5") == ["Fri 27 07:00", "Mon 30 07:00", "Tue 01 07:00", "Wed 02 07:00", "Thu 03 07:00",
                                    "Fri 04 07:00"]  # fmt: skip
    assert fires("0 7 * * 0", n=2) == ["Sun 29 07:00", "Sun 06 07:00"]
    assert fires("0 7 * * 7", n=1) == ["Sun 29 07:00"]
    assert fires("0 7 * * sat,sun", n=3) == ["Sat 28 07:00", "Sun 29 07:00", "Sat 05 07:00"]
    assert fires("0 7 * * mon-fri", n=2) == ["Fri 27 07:00", "Mon 30 07:00"]


@pytest.mark.parametrize(
    ("field", "days"),
    [("*", [0, 1, 2, 3, 4, 5, 6]), ("1-5", [1, 2, 3, 4, 5]), ("0,7", [0]), ("*/2", [0, 2, 4, 6]),
     ("1-5/2", [1, 3, 5]), ("5-7", [0, 5, 6]), ("Mon,wed", [1, 3]), ("sat-sat", [6]), ("1/2", [0, 1, 3, 5]),
     ("mon/2", [0, 1, 3, 5])],
)  # fmt: skip
def test_weekday_fields(field: str, days: list[int]):
    assert weekdays(field) == days


@pytest.mark.parametrize("field", ["8", "mon-", "5-1", "x", "1-5/0", "last"])
def test_weekday_fields_refused(field: str):
    with pytest.raises(ValueError, match="day of week"):
        weekdays(field)


def test_a_restricted_day_and_weekday_fire_when_either_matches():
    # cron(8): the 1st of the month, and every Monday; APScheduler alone needed both at once.
    assert fires("0 7 1 * 1", n=4) == ["Mon 30 07:00", "Tue 01 07:00", "Mon 07 07:00", "Mon 14 07:00"]
    # A '*' in either (here "*/2" days) keeps them ANDed, as cron(8) does.
    assert fires("0 7 */2 * 1", n=2) == ["Mon 07 07:00", "Mon 21 07:00"]


def test_a_wrong_expression_is_a_value_error():
    with pytest.raises(ValueError, match="wrong number of fields"):
        trigger("0 7 * *")
    with pytest.raises(ValueError):
        trigger("61 * * * *")
