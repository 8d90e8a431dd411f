"""The time-driven signals (stale, fresh, settled), checked every few seconds from what is committed.

A deadline or a quiet period passes without any poll result to react to, so these are not the
writer's (failing/recovered/access_lost are). Every check reads the stored facts again (each
watch's last delivery, its own key's last change and last poll, the signals already recorded), so a
daemon restarted after a deadline still raises it, and the store's unique (watch, event, dedup)
makes sure that happens once however many daemons or restarts try.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from poller.model import Watch
from poller.signals import Rules, Signal, burst_detail, deadline, dumps, is_settled, signal_time
from poller.store import Route, Store

log = logging.getLogger(__name__)

# A burst that ended before a watch had ever settled is reported only if it is this recent: adding
# `settle` to a watch does not announce last year's changes.
FIRST_BURST_LOOKBACK = timedelta(days=7)
# Changes are re-read this far behind the last check: a slow writer's commit may carry an earlier time.
RESCAN_MARGIN = timedelta(minutes=5)


@dataclass(frozen=True, slots=True)
class Watched:
    """A watch as the check needs it: its id, name, own key (or prefix), and rules."""

    id: int
    name: str
    key: str
    rules: Rules


def watched_from(watches: Mapping[str, Watch], rules: Mapping[int, Rules]) -> list[Watched]:
    """The check's view of a synced watch list and its rules by watch id (``Store.rules``)."""
    # Only watches the check has work for: a million watches without deadlines cost nothing here.
    return [
        Watched(w.id, name, w.key, r)
        for name, w in watches.items()
        if (r := rules.get(w.id)) is not None and _checked(r)
    ]


def _checked(rules: Rules) -> bool:
    return rules.has_deadline or rules.settle is not None


def _due(w: Watched, created_at: datetime, last: datetime | None) -> datetime | None:
    """The deadline after the last delivery, or, before any, after the watch was added."""
    return deadline(w.rules, created_at, delivered=False) if last is None else deadline(w.rules, last)


class SignalCheck:
    """Raises stale/fresh/settled for the watches it is given; ``run_once`` is one pass."""

    def __init__(self, store: Store, clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.store = store
        self.clock = clock
        self.watched: dict[int, Watched] = {}
        self._loaded = False
        self._fresh: dict[int, tuple[datetime, str | None]] = {}  # last delivery per watch
        self._open_stale: dict[int, tuple[str, datetime]] = {}  # stale not yet fresh: (dedup, raised)
        self._settled: dict[int, datetime] = {}  # the last change of the latest settled burst
        self._bursts: dict[int, tuple[datetime, list[tuple[str, datetime]]]] = {}  # pending, by last change
        self._scanned: datetime | None = None
        self._shown: dict[int, tuple[datetime | None, ...]] = {}  # what watch_signals holds per watch
        self.settling = 0  # watches with an unsettled burst at the last pass (a gauge)
        self._mine: set[int] = set()  # the watches checked by the last pass
        self._taken_over: set[int] = set()  # watches whose cached state the next pass reads again
        self._saved_due: dict[int, datetime] = {}  # deadlines in force at the last check, as stored
        self._taken_lock = threading.Lock()

    def taken_over(self, watch_ids: Iterable[int]) -> None:
        """Watches this daemon now checks after another did (a shard gained): the next pass reads
        their deliveries, open stale and settled bursts from the database again, as the other
        daemon left them (cached from this daemon's start, a fresh or a settled burst went wrong)."""
        with self._taken_lock:
            self._taken_over.update(watch_ids)

    def set_watches(self, watched: Collection[Watched]) -> None:
        """The watches to check (those with a deadline or settle rule); the others are ignored."""
        self.watched = {w.id: w for w in watched if _checked(w.rules)}

    @property
    def stale(self) -> int:
        """Watches of the last pass (this daemon's) that are stale now."""
        mine = self._mine
        return sum(1 for watch_id in list(self._open_stale) if watch_id in mine)

    def run_once(self, route: Route | None = None, owned: Callable[[str], bool] | None = None) -> list[Signal]:
        """Check every watch (``owned`` ones only, with several daemons) once; record and return the new signals."""
        now = self.clock()
        with self._taken_lock:
            taken, self._taken_over = self._taken_over, set()
        if taken:
            for cache in (self._fresh, self._bursts, self._shown):
                for watch_id in taken:
                    cache.pop(watch_id, None)
            self._loaded = False
        if not self._loaded:
            self._saved_due = self.store.saved_deadlines()
            self._open_stale, settled = self.store.timed_signals()
            self._settled = {w: _parse(dedup) for w, dedup in settled.items()}
            self._loaded = True
        self._scan(now)
        mine = [w for w in self.watched.values() if owned is None or owned(w.name)]
        self._mine = {w.id for w in mine}
        inputs = self.store.signal_inputs([w.id for w in mine])
        signals: list[Signal] = []
        settling = 0
        changed: list[dict[str, object]] = []
        for w in mine:
            row = inputs.get(w.id)
            if row is None:
                continue
            due = since = None
            if w.rules.has_deadline:
                found, due = self._deadline(w, row["created_at"], now)
                signals += found
            if w.rules.settle is not None:
                found, since = self._settle(w, w.rules.settle, row, now)
                signals += found
                settling += since is not None
            opened = self._open_stale.get(w.id)
            shown = (due, None if opened is None else opened[1], since)
            if self._shown.get(w.id) != shown:
                changed.append({"watch_id": w.id, "deadline_at": due, "stale_since": shown[1], "settling_since": since})
                self._shown[w.id] = shown
        self.settling = settling
        recorded = self.store.record_signals(signals, route)
        try:
            self.store.save_watch_signals(changed)
        except Exception:
            for row in changed:  # written again next pass
                self._shown.pop(int(str(row["watch_id"])), None)
            raise
        return recorded

    def _scan(self, now: datetime) -> None:
        """Take in the deliveries committed since the last pass (the watches already known)."""
        if self._scanned is not None:
            for watch_id, at, etag in self.store.fresh_changes_since(self._scanned - RESCAN_MARGIN):
                known = self._fresh.get(watch_id)
                if known is not None and at > known[0]:
                    self._fresh[watch_id] = (at, etag)
        self._scanned = now

    def _deadline(self, w: Watched, created_at: datetime, now: datetime) -> tuple[list[Signal], datetime | None]:
        """(stale or fresh if due, the deadline now in force)."""
        if w.id not in self._fresh:
            found = self.store.last_fresh_change(w.id)
            if found is not None:
                self._fresh[w.id] = found
        last, etag = self._fresh.get(w.id, (None, None))
        opened = self._open_stale.get(w.id)
        signals: list[Signal] = []
        shown = self._shown.get(w.id)
        in_force = shown[0] if shown is not None else self._saved_due.get(w.id)
        if opened is None and in_force is not None and last is not None and in_force < last and in_force <= now:
            signals += self._missed(w, in_force, created_at, etag, now)
        if opened is not None:
            stale_deadline = _parse(opened[0])
            if last is None or last <= stale_deadline:
                return [], stale_deadline  # still stale: one signal per missed deadline
            del self._open_stale[w.id]
            detail = dumps({"stale_deadline": opened[0], "stale_at": signal_time(opened[1])})
            signals.append(Signal(w.id, w.name, w.key, "fresh", now, opened[0], etag, None, detail))
        due = _due(w, created_at, last)
        if due is None or now < due:
            return signals, due
        dedup = signal_time(due)
        self._open_stale[w.id] = (dedup, now)
        detail = dumps(
            {
                "deadline": dedup,
                "last_change_at": None if last is None else signal_time(last),
                "rule": w.rules.describe_deadline,
            }
        )
        signals.append(Signal(w.id, w.name, w.key, "stale", now, dedup, etag, None, detail))
        return signals, due

    def _missed(
        self, w: Watched, in_force: datetime, created_at: datetime, etag: str | None, now: datetime
    ) -> list[Signal]:
        """stale and fresh for the deadline the last check saw in force, when the delivery after it
        came later and no check saw the deadline pass (the daemon down, `poller once` polling before
        it checks). Only if the deliveries up to it still set that deadline under the rules now: a
        delivery in time before it, or rules changed since, and nothing is raised. The database
        refuses a second pair for one deadline (another daemon, a restart)."""
        before = self.store.last_fresh_change(w.id, before=in_force + timedelta(microseconds=1))
        if _due(w, created_at, None if before is None else before[0]) != in_force:
            return []
        dedup = signal_time(in_force)
        stale = {
            "deadline": dedup,
            "last_change_at": None if before is None else signal_time(before[0]),
            "rule": w.rules.describe_deadline,
        }
        late = {"stale_deadline": dedup, "stale_at": signal_time(now), "late_delivery": True}
        return [
            Signal(w.id, w.name, w.key, "stale", now, dedup, etag, None, dumps(stale)),
            Signal(w.id, w.name, w.key, "fresh", now, dedup, etag, None, dumps(late)),
        ]

    def _burst(self, watch_id: int, before: datetime, last_change: datetime) -> list[tuple[str, datetime]]:
        """The burst ending at ``last_change``, read once per last change (a pending one is asked every pass)."""
        cached = self._bursts.get(watch_id)
        if cached is None or cached[0] != last_change:
            cached = (last_change, self.store.burst(watch_id, before, last_change))
            self._bursts[watch_id] = cached
        return cached[1]

    def _settle(
        self, w: Watched, settle: float, row: dict[str, object], now: datetime
    ) -> tuple[list[Signal], datetime | None]:
        """(the settled signal if due, the start of a burst still waiting to settle)."""
        last_change = row["last_changed_at"]
        if not isinstance(last_change, datetime):
            return [], None
        before = self._settled.get(w.id) or now - FIRST_BURST_LOOKBACK
        if last_change <= before:
            return [], None
        polled = row["last_polled_at"]
        outcome = row["last_outcome"]
        changes = self._burst(w.id, before, last_change)
        if not changes:
            return [], None  # only first sightings: nothing was written, nothing to settle
        if not is_settled(settle, last_change, polled if isinstance(polled, datetime) else None, str(outcome)):
            return [], changes[0][1]
        self._settled[w.id] = last_change
        del self._bursts[w.id]
        keys = [key for key, _at in changes]
        detail = burst_detail(keys, len(changes), changes[0][1], last_change, settle)
        etag = row["etag"] if isinstance(row["etag"], str) else None
        return [
            Signal(w.id, w.name, w.key, "settled", now, signal_time(last_change, exact=True), etag, None, detail)
        ], None


def _parse(stamp: str) -> datetime:
    """A dedup time (``signal_time``) back to a datetime."""
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).astimezone(UTC)
