"""When each watch is due: one heap for all watches, one thread handing due polls to the workers.

APScheduler keeps a Job, a trigger and a jobstore round trip per watch, and its main loop walks
them under a lock: at 100,000 watches the daemon peaked at 559 MB, with that loop a large share of
its CPU (py-spy; README "Benchmarks"). Here a watch is one heap entry. The times still come from
triggers: APScheduler's CronTrigger for cron watches (read as crontab reads them: poller.crontab),
PhasedIntervalTrigger for intervals.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import random
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from apscheduler.triggers.base import BaseTrigger

from poller.config import format_duration
from poller.crontab import trigger as cron_trigger
from poller.model import Watch
from poller.safetext import printable
from poller.watchlist import WatchSpec

log = logging.getLogger(__name__)

EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_EPOCH_TS = EPOCH.timestamp()
MAX_BATCH = 1000  # due polls handed over per lock hold, so a reload never waits long


def phase_of(name: str, interval: float) -> float:
    """A stable offset in [0, interval) per watch name, so first runs spread out and survive reloads."""
    return (zlib.crc32(name.encode("utf-8", "surrogatepass")) / 2**32) * interval


class PhasedIntervalTrigger(BaseTrigger):  # type: ignore[misc]
    """Fires at ``EPOCH + phase + k*interval``, plus an optional jitter that never accumulates.

    APScheduler's IntervalTrigger adds jitter to a fire time that already holds jitter, so the
    schedule drifts (design.md section 7); here every run is anchored to the unjittered grid.
    The arithmetic is on epoch seconds (``next_ts``): the timetable computes a million of these.
    """

    __slots__ = ("anchor_ts", "interval", "jitter")

    def __init__(self, interval: float, phase: float, jitter: float = 0.0) -> None:
        self.interval = interval
        # Whole microseconds, as a datetime holds them: both forms name the same instants.
        self.anchor_ts = _EPOCH_TS + round(phase * 1e6) / 1e6
        self.jitter = min(jitter, interval * 0.5)

    def next_ts(self, previous: float | None, now: float) -> float:
        """The next fire time after ``previous`` (None: the first at or after ``now``), in epoch seconds."""
        if previous is None:
            slot = math.ceil((now - self.anchor_ts) / self.interval)
        else:
            # floor() drops the jitter; the epsilon absorbs the microsecond rounding of a fire time
            # ~10^9 slots after the anchor, which would otherwise return the same time again.
            slot = math.floor((previous - self.anchor_ts) / self.interval + 1e-4) + 1
        base = self.anchor_ts + slot * self.interval
        return base + random.uniform(0, self.jitter) if self.jitter else base

    def get_next_fire_time(self, previous_fire_time: datetime | None, now: datetime) -> datetime:
        previous = None if previous_fire_time is None else previous_fire_time.timestamp()
        return datetime.fromtimestamp(self.next_ts(previous, now.timestamp()), UTC)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PhasedIntervalTrigger) and (self.interval, self.anchor_ts, self.jitter) == (
            other.interval,
            other.anchor_ts,
            other.jitter,
        )

    def __hash__(self) -> int:
        return hash((self.interval, self.anchor_ts, self.jitter))

    def __str__(self) -> str:
        return f"every {format_duration(self.interval)}"


def next_ts(trigger: BaseTrigger, previous: float | None, now: float) -> float | None:
    """A trigger's next fire time in epoch seconds: phased intervals directly, others through datetimes."""
    if type(trigger) is PhasedIntervalTrigger:
        return trigger.next_ts(previous, now)
    last = None if previous is None else datetime.fromtimestamp(previous, UTC)
    fire: datetime | None = trigger.get_next_fire_time(last, datetime.fromtimestamp(now, UTC))
    return None if fire is None else fire.timestamp()


def trigger_for(spec: WatchSpec | Watch, jitter: float) -> BaseTrigger:
    """The trigger of a watch: phased interval, or crontab in UTC."""
    if spec.cron is not None:
        return cron_trigger(spec.cron)
    assert spec.interval_seconds is not None
    return PhasedIntervalTrigger(spec.interval_seconds, phase_of(spec.name, spec.interval_seconds), jitter)


@dataclass(slots=True, eq=False)
class Entry:
    """One watch in the timetable; a replaced entry is marked dead and skipped when its heap slot pops."""

    watch: Watch
    trigger: BaseTrigger
    due_ts: float  # epoch seconds
    alive: bool = True

    @property
    def due(self) -> datetime:
        return datetime.fromtimestamp(self.due_ts, UTC)


# Hands a due watch to the workers with its scheduled time; False if its previous poll is not done yet.
Submit = Callable[[Watch, datetime], bool]


class Timetable:
    """Every watch's next due time; a thread submits each when due and computes its next time."""

    def __init__(self, submit: Submit, on_skipped: Callable[[int], None] | None = None) -> None:
        self._submit = submit
        self._on_skipped = on_skipped or (lambda n: None)
        self._entries: dict[str, Entry] = {}
        self._heap: list[tuple[float, int, Entry]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # --- the watch list ---------------------------------------------------------------

    def add(self, name: str, watch: Watch, trigger: BaseTrigger, now: datetime | None = None) -> None:
        """Schedule a watch (replacing any entry of that name) at its trigger's next time."""
        self.add_many([(name, watch, trigger)], now or datetime.now(UTC))

    def add_many(self, watches: Iterable[tuple[str, Watch, BaseTrigger]], now: datetime) -> None:
        """Schedule many watches at once (a start): pushed one by one, or heapified together."""
        now_ts = now.timestamp()
        with self._cond:
            added: list[tuple[float, int, Entry]] = []
            for name, watch, trigger in watches:
                due = next_ts(trigger, None, now_ts)
                old = self._entries.pop(name, None)
                if old is not None:
                    old.alive = False
                    # Rescheduled (a reload's new interval, cron or jitter): the slot already due comes
                    # first, or the watch could go up to two intervals unpolled, no skip counted.
                    if due is not None and now_ts <= old.due_ts < due:
                        due = old.due_ts
                if due is not None:
                    entry = self._entries[name] = Entry(watch, trigger, due)
                    added.append((due, next(self._seq), entry))
            if len(added) < 64:
                for item in added:
                    heapq.heappush(self._heap, item)
            else:
                self._heap += added
                heapq.heapify(self._heap)
            self._cond.notify()

    def remove(self, name: str) -> None:
        with self._cond:
            entry = self._entries.pop(name, None)
            if entry is not None:
                entry.alive = False

    def retarget(self, name: str, watch: Watch) -> None:
        """Point a watch at another object or id; its schedule stays as it is."""
        with self._cond:
            self._entries[name].watch = watch

    def get(self, name: str) -> Entry | None:
        return self._entries.get(name)

    def snapshot(self) -> dict[str, tuple[datetime, BaseTrigger, Watch]]:
        """Each watch's next due time, trigger and target (for tests and status)."""
        with self._cond:
            return {name: (e.due, e.trigger, e.watch) for name, e in self._entries.items()}

    def __len__(self) -> int:
        return len(self._entries)

    # --- the thread ---------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="poller-timetable", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while True:
            try:
                if not self._hand_out():
                    return
            except Exception:
                # A flaw in one watch's times must not end every watch's polling: logged, and the
                # rest go on (the daemon stops, to be restarted, only if this thread ends).
                log.exception("timetable: handing out due polls failed; going on")
                with self._cond:
                    self._cond.wait(1.0)

    def _hand_out(self) -> bool:
        """Wait for the next due time and hand out what is due; False once stopping."""
        while True:
            with self._cond:
                while not self._stopping:
                    if not self._heap:
                        self._cond.wait()
                        continue
                    delay = self._heap[0][0] - time.time()
                    if delay <= 0:
                        break
                    self._cond.wait(delay)
                if self._stopping:
                    return False
                # Handed over under the lock: a reload that holds, re-points or removes a watch (under
                # this lock) then never meets a poll of it taken before and submitted after.
                for watch, scheduled in self._take_due(time.time()):
                    if not self._submit(watch, scheduled):
                        self._on_skipped(1)

    def _take_due(self, now_ts: float) -> list[tuple[Watch, datetime]]:
        """Pop what is due (under the lock) and push each watch's next time."""
        out: list[tuple[Watch, datetime]] = []
        while self._heap and self._heap[0][0] <= now_ts and len(out) < MAX_BATCH:
            _, _, entry = heapq.heappop(self._heap)
            if not entry.alive:
                continue
            scheduled = entry.due_ts
            out.append((entry.watch, datetime.fromtimestamp(scheduled, UTC)))
            missed = 0
            try:
                following = next_ts(entry.trigger, scheduled, now_ts)
                # Behind by more than an interval: run once now, not once per missed slot (coalesce).
                while following is not None and following <= now_ts:
                    missed += 1
                    after = next_ts(entry.trigger, following, now_ts)
                    if after is not None and after <= following:  # a trigger that fails to advance must not spin
                        after = next_ts(entry.trigger, None, now_ts + 1e-6)
                    following = after
            except Exception:
                # Out of the heap, the watch would never be polled again: it stays, a minute later.
                name = printable(entry.watch.name)
                log.exception("%s: its next poll time cannot be computed; trying again in a minute", name)
                following = now_ts + 60.0
            if missed:
                self._on_skipped(missed)
            if following is None:
                entry.alive = False
                continue
            entry.due_ts = following
            heapq.heappush(self._heap, (following, next(self._seq), entry))
        return out
