"""The run-length poll log: how a batch of polls folds into runs (pure logic, no I/O).

Consecutive polls of one key with the same outcome, HTTP status, ETag, Last-Modified and error text
are one row of ``poll_runs`` (first and last time, count, duration min/sum/max); anything that
differs starts a new row. Times are integer epoch milliseconds and durations integer microseconds:
a quarter of the bytes of ISO text, and they still sort and subtract.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

OUTCOME_CODES = {"unchanged": 0, "modified": 1, "missing": 2, "error": 3}
OUTCOMES = {code: name for name, code in OUTCOME_CODES.items()}

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)

# (outcome code, http_status, etag, last_modified ms, error): what a run has in common
Identity = tuple[int, int | None, str | None, int | None, str | None]


def to_ms(value: datetime) -> int:
    """Epoch milliseconds of an aware datetime (floor, so the order of times is kept)."""
    if value.tzinfo is None:
        raise ValueError("naive datetime: poller stores only timezone-aware UTC times")
    return (value - _EPOCH) // _MS


def from_ms(value: int) -> datetime:
    """The aware UTC datetime of epoch milliseconds."""
    return _EPOCH + value * _MS


@dataclass(frozen=True, slots=True)
class Poll:
    """One poll as the run log sees it."""

    watch_id: int
    state_key: str  # the object_state key holding this key's open run
    run_key: str | None  # None: the watch's own key (not repeated in every run row)
    identity: Identity
    at_ms: int
    duration_us: int


@dataclass(slots=True)
class Segment:
    """Consecutive polls of one key with one identity, within one batch."""

    watch_id: int
    state_key: str
    run_key: str | None
    identity: Identity
    first_at: int
    last_at: int
    count: int
    duration_min: int
    duration_sum: int
    duration_max: int
    may_extend: bool  # the key's first segment in the batch: it continues the open run if identities match
    opens: bool = False  # the key's last segment in the batch: its run is the key's open run afterwards
    samples: list[tuple[int, int]] = field(default_factory=list)  # (at_ms, duration_us) of each poll

    def add(self, poll: Poll) -> None:
        self.first_at = min(self.first_at, poll.at_ms)
        self.last_at = max(self.last_at, poll.at_ms)
        self.count += 1
        self.duration_min = min(self.duration_min, poll.duration_us)
        self.duration_sum += poll.duration_us
        self.duration_max = max(self.duration_max, poll.duration_us)
        self.samples.append((poll.at_ms, poll.duration_us))


def segments(polls: Iterable[Poll]) -> list[Segment]:
    """Fold a batch, in commit order, into segments: per key, a new one each time the identity changes."""
    out: list[Segment] = []
    latest: dict[tuple[int, str], Segment] = {}
    for poll in polls:
        ident = (poll.watch_id, poll.state_key)
        current = latest.get(ident)
        if current is not None and current.identity == poll.identity and current.run_key == poll.run_key:
            current.add(poll)
            continue
        segment = Segment(
            watch_id=poll.watch_id,
            state_key=poll.state_key,
            run_key=poll.run_key,
            identity=poll.identity,
            first_at=poll.at_ms,
            last_at=poll.at_ms,
            count=1,
            duration_min=poll.duration_us,
            duration_sum=poll.duration_us,
            duration_max=poll.duration_us,
            may_extend=current is None,
            samples=[(poll.at_ms, poll.duration_us)],
        )
        out.append(segment)
        latest[ident] = segment
    for segment in latest.values():
        segment.opens = True
    return out
