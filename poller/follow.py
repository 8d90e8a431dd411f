"""`poller history --follow`: print events as they are committed, like `tail -f` or `journalctl -f`.

The tail asks the database every ``interval`` for events whose ids are above a cursor per table
(``Store.events_after``: etag_history and watch_events). On SQLite one writer commits at a time and
ids grow in commit order, so the cursor is the highest id seen. On PostgreSQL an id is taken at
INSERT, before COMMIT: with several writers (or daemons) a lower id can commit after a higher one that
was already printed. Each id skipped below the cursor is kept as a *gap* for ``grace`` seconds and
asked again until its row appears (printed then, once) or the gap lapses: rolled-back inserts and
``ON CONFLICT DO NOTHING`` burn ids for good, so a gap cannot be kept forever. Memory is the open gaps
only (at most ``max_gaps``), not the ids printed.
"""

from __future__ import annotations

import os
import re
import select
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

from sqlalchemy.exc import InterfaceError, OperationalError

# (history_id floor, event_id floor, limit) -> event rows with ids above the floors (Store.events_after).
Fetch = Callable[[int, int, int], list[dict[str, Any]]]

INTERVAL = 0.5  # seconds between two looks at the database
RETRY_INTERVAL = 2.0  # while the database cannot be reached
# PostgreSQL: how long an id below the cursor may stay uncommitted and still be printed. A writer's
# transaction commits within a batch (milliseconds to a few seconds); a minute is far past that.
PG_GRACE = 60.0
START_WINDOW = 1000  # PostgreSQL: ids below the newest at start that may still be in flight
PAGE = 1000
# Errors a database restart, a lost connection or a held lock raise: reported once, then retried.
TRANSIENT: tuple[type[BaseException], ...] = (OperationalError, InterfaceError)


@dataclass
class IdCursor:
    """One table's ids: the highest seen (``top``), the gaps below it that may still commit, and the
    ids above it already printed some other way (the backlog)."""

    top: int
    grace: float = 0.0
    max_gaps: int = 100_000
    gaps: dict[int, float] = field(default_factory=dict)  # id -> when it was first missed; ids ascending
    done: set[int] = field(default_factory=set)
    # Ids given up while they could still commit (more than max_gaps in flight): said, not hidden.
    overflow: int = 0

    def floor(self) -> int:
        """Ask for ids above this one: just below the oldest open gap, else the top."""
        return next(iter(self.gaps)) - 1 if self.gaps else self.top

    def take(self, ids: Iterable[int], now: float) -> set[int]:
        """The ids among ``ids`` never taken before; each id is taken once."""
        ids = list(ids)
        fresh = {i for i in ids if (i > self.top and i not in self.done) or i in self.gaps}
        for i in fresh:
            self.gaps.pop(i, None)
        high = max((i for i in ids if i > self.top), default=self.top)
        self.advance(high, now, fresh)
        return fresh

    def advance(self, high: int, now: float, present: set[int] | frozenset[int] = frozenset()) -> None:
        """Move the top to ``high``; ids passed over and not ``present`` become gaps (with a grace)."""
        if high <= self.top:
            self.expire(now)
            return
        if self.grace > 0:
            first = max(self.top + 1, high - self.max_gaps)
            self.overflow += first - (self.top + 1)
            # New gaps are all above the old top, so the dict stays in id order (and in time order).
            for i in range(first, high):
                if i not in present and i not in self.done:
                    self.gaps[i] = now
        self.top = high
        self.done = {i for i in self.done if i > high}
        self.expire(now)

    def mark(self, ids: Iterable[int]) -> None:
        """Ids already printed (the backlog): never printed again."""
        for i in ids:
            if i > self.top:
                self.done.add(i)
            else:
                self.gaps.pop(i, None)

    def expire(self, now: float) -> None:
        """Drop gaps older than the grace (their transaction rolled back, or burnt the id), and the
        oldest beyond ``max_gaps``."""
        while self.gaps:
            first = next(iter(self.gaps))
            if now - self.gaps[first] < self.grace and len(self.gaps) <= self.max_gaps:
                return
            if now - self.gaps[first] < self.grace:
                self.overflow += 1
            del self.gaps[first]


class Tail:
    """New events, in commit order as far as the database shows it, each once, matching ``match``."""

    def __init__(
        self,
        fetch: Fetch,
        *,
        grace: float = 0.0,
        page: int = PAGE,
        clock: Callable[[], float] = time.monotonic,
        match: Callable[[dict[str, Any]], bool] = lambda row: True,
    ) -> None:
        self._fetch, self._page, self._clock, self._match = fetch, page, clock, match
        self.changes = IdCursor(0, grace)
        self.signals = IdCursor(0, grace)

    def start(self, tops: tuple[int, int], window: int = START_WINDOW) -> None:
        """Begin after the newest ids (``Store.last_event_ids``); with a grace (PostgreSQL), ids in the
        ``window`` below them that are not committed yet become gaps, printed if they commit."""
        now = self._clock()
        if self.changes.grace <= 0 or window <= 0:
            self.changes.top, self.signals.top = tops
            return
        self.changes.top, self.signals.top = max(0, tops[0] - window), max(0, tops[1] - window)
        for rows in self._pages(self.changes.top, self.signals.top):
            # Rows above the tops committed after the tops were read: left for the first poll.
            self.changes.take([i for i in _ids(rows, "history_id") if i <= tops[0]], now)
            self.signals.take([i for i in _ids(rows, "event_id") if i <= tops[1]], now)
        self.changes.advance(tops[0], now)
        self.signals.advance(tops[1], now)

    @property
    def overflow(self) -> int:
        """Ids given up while they might still commit (IdCursor.overflow), both tables."""
        return self.changes.overflow + self.signals.overflow

    def mark(self, rows: Iterable[dict[str, Any]]) -> None:
        """Rows already printed (the backlog, read after ``start``): not printed again."""
        rows = list(rows)
        self.changes.mark(_ids(rows, "history_id"))
        self.signals.mark(_ids(rows, "event_id"))

    def poll(self) -> Iterator[dict[str, Any]]:
        """The matching rows committed since the last poll; a page's rows are yielded before the next
        page is asked, so a database error mid-way loses nothing."""
        for rows in self._pages(self.changes.floor(), self.signals.floor()):
            now = self._clock()
            fresh_changes = self.changes.take(_ids(rows, "history_id"), now)
            fresh_signals = self.signals.take(_ids(rows, "event_id"), now)
            for row in rows:
                new = (
                    row["history_id"] in fresh_changes
                    if row["history_id"] is not None
                    else (row["event_id"] in fresh_signals)
                )
                if new and self._match(row):
                    yield row
        now = self._clock()
        self.changes.expire(now)
        self.signals.expire(now)

    def _pages(self, after_change: int, after_signal: int) -> Iterator[list[dict[str, Any]]]:
        while True:
            rows = self._fetch(after_change, after_signal, self._page)
            yield rows
            changes, signals = _ids(rows, "history_id"), _ids(rows, "event_id")
            if len(changes) < self._page and len(signals) < self._page:
                return
            after_change = max(changes, default=after_change)
            after_signal = max(signals, default=after_signal)


def _ids(rows: Iterable[dict[str, Any]], column: str) -> list[int]:
    return [row[column] for row in rows if row[column] is not None]


def name_matcher(pattern: str | None) -> Callable[[str], bool]:
    """A watch-name test with the store's semantics: an exact name, or a case-sensitive glob of ``*``
    and ``?`` (nothing else is special, like the SQL filter of ``history WATCH``)."""
    if pattern is None:
        return lambda name: True
    if not any(ch in pattern for ch in "*?"):
        return lambda name: name == pattern
    regex = re.compile("".join(".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in pattern), re.S)
    return lambda name: regex.fullmatch(name) is not None


def reader_gone(stream: TextIO) -> Callable[[], bool]:
    """For a pipe or socket: a test that is true once the reading end is closed (`| head -3` has its
    lines), so an idle follow exits then instead of at its next write, as `tail -f` does."""
    try:
        fd = stream.fileno()
        mode = os.fstat(fd).st_mode
    except (OSError, ValueError):
        return lambda: False
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
        return lambda: False
    watcher = select.poll()
    watcher.register(fd, 0)  # no events asked: poll reports POLLERR/POLLHUP regardless

    def gone() -> bool:
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in watcher.poll(0))

    return gone


def run(
    tail: Tail,
    emit: Callable[[dict[str, Any]], None],
    stop: threading.Event,
    *,
    interval: float = INTERVAL,
    retry_interval: float = RETRY_INTERVAL,
    report: Callable[[BaseException | None], None] = lambda exc: None,
    gone: Callable[[], bool] = lambda: False,
    warn: Callable[[int], None] = lambda ids: None,
) -> None:
    """Emit what ``tail`` finds every ``interval`` until ``stop`` is set or the reader left. A database
    that cannot be reached is reported once (``report(exc)``) and asked again; ``report(None)`` when it
    answers again. ``warn(n)``: n ids were given up while they might still commit (see IdCursor)."""
    failing = False
    warned = 0
    while not stop.is_set():
        try:
            for row in tail.poll():
                emit(row)
            overflow = tail.overflow
            if overflow > warned:
                warn(overflow - warned)
                warned = overflow
        except TRANSIENT as exc:
            if not failing:
                report(exc)
            failing = True
        else:
            if failing:
                report(None)
            failing = False
        if gone():
            return
        stop.wait(retry_interval if failing else interval)
