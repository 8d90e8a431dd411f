"""Watch signals for data pipelines: freshness deadlines, settling, failing and recovery (pure logic).

A signal is a fact about a watch over time rather than about one poll: "no change arrived by its
deadline" (``stale``, then ``fresh``), "the burst of changes has been quiet for ``settle``"
(``settled``), "the watch keeps failing" (``failing``, then ``recovered``), "a readable object
answers 403" (``access_lost``). Everything here is computed from stored facts (the last change,
the last poll, the error streak), so a restarted daemon or a second one reaches the same answer;
the store records each signal once (a unique ``dedup`` key per watch and event).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any

from poller.crontab import trigger as cron_trigger

WATCH_EVENTS = ("stale", "fresh", "settled", "failing", "recovered", "access_lost")
# The changes that count as a delivery for a freshness deadline, and that open a burst to settle.
FRESH_EVENTS = ("modified", "created")
BURST_EVENTS = ("modified", "created", "deleted")
MAX_BURST_KEYS = 1000


@dataclass(frozen=True, slots=True)
class Rules:
    """One watch's signal rules, from its config (``[[watch]]`` over ``[schedule]``)."""

    expect_change_within: float | None = None  # seconds after the last change
    expect_change_by: str | None = None  # crontab (UTC): a change is due by each fire time ...
    expect_grace: float = 0.0  # ... plus this
    settle: float | None = None  # seconds of confirmed quiet after a burst of changes
    alert_after_errors: int | None = 3  # consecutive errors that make a watch failing
    alert_after_seconds: float | None = None  # or: failing for this long

    @property
    def has_deadline(self) -> bool:
        return self.expect_change_within is not None or self.expect_change_by is not None

    @property
    def describe_deadline(self) -> str:
        if self.expect_change_within is not None:
            return f"expect_change_within {_span(self.expect_change_within)}"
        grace = f" (grace {_span(self.expect_grace)})" if self.expect_grace else ""
        return f"expect_change_by {self.expect_change_by}{grace}"


@dataclass(frozen=True, slots=True)
class Signal:
    """One signal to record; the store writes it once per (watch, event, dedup)."""

    watch_id: int
    watch: str  # the name, for routing to sinks
    key: str
    event: str
    detected_at: datetime
    dedup: str
    etag: str | None = None
    error: str | None = None
    detail: str | None = None  # a JSON object (dumps)


def streak_signals(
    rules: Rules,
    *,
    watch_id: int,
    watch: str,
    key: str,
    now: datetime,
    consecutive_errors: int,
    error_since: datetime | None,
    last_error: str | None,
    http_status: int | None,
    was_present: bool | None,
    etag: str | None,
) -> list[Signal]:
    """The signals an error streak calls for after its latest poll: ``access_lost`` at once when a
    readable object answers 403, ``failing`` once the streak reaches ``alert_after``."""
    since = error_since or now
    out: list[Signal] = []
    if http_status == 403 and was_present:
        detail = dumps({"since": signal_time(since), "http_status": 403})
        out.append(Signal(watch_id, watch, key, "access_lost", now, signal_time(since), etag, last_error, detail))
    if is_failing(rules, consecutive_errors, since, now):
        detail = dumps(
            {"consecutive_errors": consecutive_errors, "since": signal_time(since), "http_status": http_status}
        )
        out.append(Signal(watch_id, watch, key, "failing", now, signal_time(since), etag, last_error, detail))
    return out


def _span(seconds: float) -> str:
    from poller.config import format_duration

    return format_duration(seconds)


def next_fire(expr: str, after: datetime) -> datetime | None:
    """The first fire time of crontab ``expr`` (UTC) strictly after ``after``."""
    # get_next_fire_time(None, t) may return t itself; a microsecond later makes it strict.
    fire = cron_trigger(expr).get_next_fire_time(None, after + timedelta(microseconds=1))
    return None if fire is None else fire.astimezone(UTC)


def previous_fire(expr: str, before: datetime) -> datetime | None:
    """The last fire time of crontab ``expr`` (UTC) strictly before ``before``; None within 8 years."""
    step = timedelta(minutes=1)
    while step < timedelta(days=8 * 366):
        fire = next_fire(expr, before - step)
        if fire is not None and fire < before:
            while (later := next_fire(expr, fire)) is not None and later < before:
                fire = later
            return fire
        step *= 2
    return None


def deadline(rules: Rules, last_change_at: datetime, *, delivered: bool = True) -> datetime | None:
    """When the next change is due, given the last one (``delivered=False``: when watching began,
    no delivery yet): None without a rule.

    With ``expect_change_by`` each fire time plus the grace is a due time, and a change counts for
    the nearest one: up to the fire time, or within the grace after it, for that fire's; one that
    comes after a due time passed is late for it if that is nearer than the next fire time (a late
    delivery never counts for the next one), else early for the next. The next change is due by the
    due time after the one it counted for. Before any delivery, the first due time not yet passed.
    """
    if rules.expect_change_within is not None:
        return last_change_at + timedelta(seconds=rules.expect_change_within)
    if rules.expect_change_by is not None:
        return _cron_deadline(rules.expect_change_by, rules.expect_grace, last_change_at, delivered)
    return None


@lru_cache(maxsize=65536)  # every check asks for every watch; a watch's last change rarely moves
def _cron_deadline(expr: str, grace_seconds: float, last: datetime, delivered: bool) -> datetime | None:
    grace = timedelta(seconds=grace_seconds)
    upcoming = next_fire(expr, last - grace - timedelta(microseconds=1))  # its due time is not past at `last`
    if upcoming is None:
        return None
    if not delivered:
        return upcoming + grace
    if last < upcoming:
        previous = previous_fire(expr, upcoming)
        if previous is not None and last - (previous + grace) < upcoming - last:
            return upcoming + grace  # late for the previous due time: this one is still due
    following = next_fire(expr, upcoming)
    return None if following is None else following + grace


def is_failing(rules: Rules, consecutive_errors: int, error_since: datetime | None, now: datetime) -> bool:
    """True once an error streak reaches the watch's ``alert_after`` (a count or a duration)."""
    if consecutive_errors <= 0:
        return False
    if rules.alert_after_errors is not None and consecutive_errors >= rules.alert_after_errors:
        return True
    if rules.alert_after_seconds is not None and error_since is not None:
        return now - error_since >= timedelta(seconds=rules.alert_after_seconds)
    return False


def is_settled(
    settle: float, last_change_at: datetime, last_polled_at: datetime | None, last_outcome: str | None
) -> bool:
    """A burst is settled once a successful poll, ``settle`` or more after its last change, saw no change.

    The poll is the confirmation: waiting alone is not (a failed poll confirms nothing, and neither
    does a poll that itself found a change).
    """
    if last_polled_at is None or last_outcome not in ("unchanged", "missing"):
        return False
    return last_polled_at >= last_change_at + timedelta(seconds=settle)


def signal_time(value: datetime, *, exact: bool = False) -> str:
    """The dedup/detail form of a time: UTC, ``Z``, to the millisecond (``exact``: the microsecond,
    for a dedup that is read back as the lower bound of the next burst)."""
    spec = "microseconds" if exact else "milliseconds"
    return value.astimezone(UTC).isoformat(timespec=spec).replace("+00:00", "Z")


def burst_detail(keys: Iterable[str], changes: int, started: datetime, last: datetime, settle: float) -> str:
    """The ``detail`` JSON of a settled event: the keys changed in the burst (capped), and its span."""
    unique = sorted(set(keys))
    return dumps(
        {
            "keys": unique[:MAX_BURST_KEYS],
            "keys_truncated": len(unique) > MAX_BURST_KEYS,
            "changes": changes,
            "burst_started_at": signal_time(started),
            "last_change_at": signal_time(last),
            "settle_seconds": settle,
        }
    )


def dumps(detail: Mapping[str, Any]) -> str:
    """A signal's detail as stored (compact JSON, keys sorted)."""
    return json.dumps(detail, separators=(",", ":"), sort_keys=True, ensure_ascii=False)


def loads(detail: Any) -> Any:
    """A stored detail back as an object: JSON text parsed (text that is not JSON as ``{"text": ...}``,
    a bare value as ``{"value": ...}``); None or '' as None; anything already parsed as it is."""
    if not isinstance(detail, str):
        return detail
    if not detail:
        return None
    try:
        value = json.loads(detail)
    except ValueError:
        return {"text": detail}
    return value if isinstance(value, dict) else {"value": value}
