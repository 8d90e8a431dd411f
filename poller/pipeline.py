"""The path of one poll: probe -> batched commit -> (only then) state cache, log line, counters.

A change counts as seen only once its transaction has committed: the in-memory state that
feeds the next conditional request is updated after the commit, never before, so a failed
commit means the next poll detects the change again.
"""

from __future__ import annotations

import functools
import logging
import math
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from datetime import UTC, datetime

from botocore.exceptions import BotoCoreError

from poller.config import ConfigError, Settings
from poller.listing import poll_prefix
from poller.metrics import Metrics
from poller.model import KeyChange, ObjectState, Outcome, PollResult, PrefixState, Watch
from poller.notify import make_route
from poller.probe import Prober, prober_for
from poller.safetext import iso, printable
from poller.store import Fenced, Retargeted, Route, Store, Superseded, SyncResult, describe_db_error, migrate
from poller.watchlist import WatchSpec, rules_from_settings, specs_from_settings

log = logging.getLogger(__name__)

MAX_BATCH = 1000  # rows a transaction aims at: a result is one, plus one per key its list pass changed
# How long a small batch waits for company (seconds). `once` waits for each commit, so its writer
# lingers briefly; the daemon's workers never wait for one, and a transaction costs more than its
# rows: at 500 polls/s on PostgreSQL its writer took 57% of the GIL with 20 ms, 37% with 200 ms (py-spy).
LINGER = 0.02
DAEMON_LINGER = 0.1
# Results polled but not yet committed, at most: past this, workers wait for the writer instead of
# sending HEADs whose results would only queue up (memory stays flat; the timetable counts the
# polls that could not start as skipped, watch by watch, so no watch starves).
MAX_PENDING = 8 * MAX_BATCH
_NOT_HELD = -1  # no lease epoch is negative: a watch whose shard this daemon does not hold now
FIRST_LIMIT = 32  # threads at most before any poll time is known


# Called in the writer thread once a result is committed (None) or could not be (the exception).
Committed = Callable[[BaseException | None], None]


class Recorder:
    """A single writer thread that commits many poll results per transaction."""

    def __init__(
        self,
        store: Store,
        route: Route | None = None,
        max_batch: int = MAX_BATCH,
        max_pending: int = MAX_PENDING,
        linger: float = LINGER,
    ) -> None:
        self._store = store
        self.linger = linger  # replaced on reload (writer_linger); read once per batch
        self.route = route  # replaced on reload; read once per batch
        self.on_events: Callable[[], None] | None = None  # e.g. wake the notification dispatcher
        self._max_batch = max_batch
        self._room = threading.Semaphore(max_pending)  # taken by submit, given back after the commit
        self.waits = 0  # submissions that had to wait for room (the writer is the bottleneck)
        # (result, what to call after the commit, the lease epoch its poll was made under)
        self._queue: queue.SimpleQueue[tuple[PollResult, Committed, int | None] | None] = queue.SimpleQueue()
        # Set when a whole batch is waiting, or to stop: the writer then stops gathering at once.
        self._hurry = threading.Event()
        self._thread = threading.Thread(target=self._run, name="poller-writer", daemon=True)
        self._thread.start()

    def _wait_for_room(self) -> None:
        if not self._room.acquire(blocking=False):
            self.waits += 1
            self._room.acquire()

    def submit(self, result: PollResult, epoch: int | None = None) -> Future[None]:
        """Queue a result; the future completes once it is committed (or fails with the reason).
        Waits while ``max_pending`` results are uncommitted. ``epoch``: see ``submit_nowait``."""
        future: Future[None] = Future()

        def done(exc: BaseException | None) -> None:
            if exc is None:
                future.set_result(None)
            else:
                future.set_exception(exc)

        self._put((result, done, epoch))
        return future

    def submit_nowait(self, result: PollResult, then: Committed, epoch: int | None = None) -> None:
        """Queue a result; ``then`` runs in the writer thread after the commit (or its failure).
        Returns at once unless ``max_pending`` results are uncommitted: then it waits for room.
        ``epoch`` (several daemons): the lease epoch of the watch's shard when the poll began; the
        commit is refused (Fenced) at any other."""
        self._put((result, then, epoch))

    def _put(self, item: tuple[PollResult, Committed, int | None]) -> None:
        self._wait_for_room()
        self._queue.put(item)
        if self._queue.qsize() >= self._max_batch - 1:  # with the one the writer holds: a whole batch
            self._hurry.set()

    def close(self) -> None:
        """Commit what is queued, then stop the writer thread."""
        self._queue.put(None)
        self._hurry.set()
        self._thread.join()

    def _run(self) -> None:
        stopping = False
        while not stopping:
            item = self._queue.get()
            # A batch gathers for `linger` from its first result (a transaction costs more than its
            # rows, and nobody blocks on it: workers move on, `once` waits a few ms at most). The
            # writer sleeps meanwhile rather than wake for each result: at 500 polls/s on PostgreSQL
            # those wake-ups were 9% of the interpreter's time (py-spy --gil).
            if item is not None and self.linger > 0:
                self._hurry.wait(self.linger)
            self._hurry.clear()
            batch: list[tuple[PollResult, Committed, int | None]] = []
            rows = 0  # a list pass over a new prefix brings thousands: it is a transaction of its own
            while True:
                if item is None:
                    stopping = True
                    break
                batch.append(item)
                rows += 1 + len(item[0].changes)
                if rows >= self._max_batch:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                self._commit(batch)

    def _commit(self, batch: list[tuple[PollResult, Committed, int | None]]) -> None:
        try:
            self._record(batch)
        finally:
            self._room.release(len(batch))

    def _record(self, batch: list[tuple[PollResult, Committed, int | None]]) -> None:
        try:
            epochs = [e for _, _, e in batch]
            refused = self._store.record([r for r, _, _ in batch], self.route, epochs)
        except Exception as exc:
            if len(batch) > 1:
                # One bad row must not sink the others: retry each on its own.
                for pair in batch:
                    self._record([pair])
                return
            _call(batch[0][1], exc)
            return
        for i, (_, then, _) in enumerate(batch):
            _call(then, refused.get(i))
        if self.on_events is not None and any(r.event or r.changes for r, _, _ in batch):
            self.on_events()


def _call(then: Committed, exc: BaseException | None) -> None:
    try:
        then(exc)
    except Exception:
        # A bug after the commit must not stop the writer: the row is safe, say what broke.
        log.exception("after recording a poll result")


class Stats:
    """Outcome counts over the last minute, in one-second buckets (for systemd STATUS=)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[int, Counter[str]] = {}
        self._lock = threading.Lock()
        self.last_error = ""

    def add(self, outcome: str, count: int = 1) -> None:
        second = int(self._clock())
        with self._lock:
            self._buckets.setdefault(second, Counter())[outcome] += count

    def last_minute(self) -> Counter[str]:
        horizon = int(self._clock()) - 60
        total: Counter[str] = Counter()
        with self._lock:
            for second in [s for s in self._buckets if s <= horizon]:
                del self._buckets[second]
            for counts in self._buckets.values():
                total.update(counts)
        return total


class PollService:
    """Polls a watch against its committed state and records the result; shared by `run` and `once`."""

    def __init__(self, store: Store, prober: Prober, recorder: Recorder, url: str, log_polls: bool = True) -> None:
        self.store = store
        self.log_polls = log_polls
        self.prober = prober
        self.recorder = recorder
        self.url = url
        self.states: dict[int, ObjectState] = store.load_states()
        self.prefix_states: dict[int, PrefixState] = store.load_prefix_states()
        self.last_outcome: dict[int, str] = {}
        # Watches by last outcome, kept as outcomes change: the metrics gauge reads it at every scrape;
        # counting a million watches there held the GIL for half a second each time (py-spy).
        self._outcome_counts: dict[str, int] = {}
        self._outcomes_lock = threading.Lock()
        # Watches a reload removed: a poll of theirs committing after the removal counts no outcome.
        self._dropped: set[int] = set()
        self._retargeted: set[int] = set()  # watches whose results were dropped as re-pointed (logged once)
        self.stats = Stats()
        self.metrics: Metrics | None = None
        self._stopping = threading.Event()

    def stop(self) -> None:
        """Refuse new polls: under overload the scheduler's pool holds a queue of submitted ones,
        and shutdown must not wait for all of them to run."""
        self._stopping.set()

    def forget(self, watch_id: int) -> None:
        """Drop the cached state of a watch that was removed or now points at another object."""
        self.states.pop(watch_id, None)
        self.prefix_states.pop(watch_id, None)
        self._retargeted.discard(watch_id)  # re-pointed here too: a later mismatch is told again

    def drop_outcome(self, watch_id: int) -> None:
        """A watch removed from the list: its last outcome no longer counts, nor that of a poll of it
        still in flight (until the watch is added back: ``resume_from``)."""
        with self._outcomes_lock:
            self._dropped.add(watch_id)
        self._set_outcome(watch_id, None)

    def _set_outcome(self, watch_id: int, outcome: str | None) -> None:
        """Record (or with None forget) a watch's last outcome, and move it between the counts."""
        with self._outcomes_lock:
            if outcome is not None and watch_id in self._dropped:
                return
            before = self.last_outcome.pop(watch_id, None) if outcome is None else self.last_outcome.get(watch_id)
            if outcome is not None:
                self.last_outcome[watch_id] = outcome
            if before != outcome:
                if before is not None:
                    self._outcome_counts[before] -= 1
                if outcome is not None:
                    self._outcome_counts[outcome] = self._outcome_counts.get(outcome, 0) + 1

    def outcome_counts(self) -> dict[str, int]:
        """How many watches had each last outcome (polled watches only)."""
        with self._outcomes_lock:
            return {outcome: n for outcome, n in self._outcome_counts.items() if n}

    def resume(self, watch_ids: Sequence[int]) -> None:
        """Read back the committed state of watches (re-)added by a reload: the database, not the cache,
        holds what the last poll saw, whatever happened while the watch was out of the config."""
        if watch_ids:
            self.resume_from(watch_ids, self.store.load_states_for(watch_ids))

    def resume_from(
        self, watch_ids: Sequence[int], loaded: tuple[dict[int, ObjectState], dict[int, PrefixState]]
    ) -> None:
        """Like ``resume``, with the states already read (a reload reads them before it switches over)."""
        keyed, prefixed = loaded
        with self._outcomes_lock:
            self._dropped.difference_update(watch_ids)
        for watch_id in watch_ids:
            self.forget(watch_id)
        self.states.update(keyed)
        self.prefix_states.update(prefixed)

    def poll(self, watch: Watch) -> PollResult | None:
        """Probe, commit, then report; returns None when the result could not be committed."""
        if self._stopping.is_set():
            return None
        epoch = self._epoch(watch)
        if epoch == _NOT_HELD:
            return None
        result, listed = self._probe(watch)
        try:
            self.recorder.submit(result, epoch).result()
        except Exception as exc:
            self._unrecorded(result, exc)
            return None
        self._recorded(result, listed)
        return result

    def start_poll(self, watch: Watch, done: Callable[[], None], probed: Callable[[], None] | None = None) -> None:
        """Probe, queue the commit and return: ``done`` runs once the result is committed (or failed),
        so the caller can keep the watch from being polled again against a state not yet committed;
        ``probed`` as soon as the server has answered (what follows may wait for the writer)."""
        epoch = self._epoch(watch)
        if self._stopping.is_set() or epoch == _NOT_HELD:
            done()
            return
        result, listed = self._probe(watch)
        if probed is not None:
            probed()

        def then(exc: BaseException | None) -> None:
            try:
                if exc is None:
                    self._recorded(result, listed)
                else:
                    self._unrecorded(result, exc)
            finally:
                done()

        self.recorder.submit_nowait(result, then, epoch)

    def _epoch(self, watch: Watch) -> int | None:
        """Several daemons: the epoch this one holds the watch's shard at, read before the poll
        observes anything (_NOT_HELD: not held now, or the leases may have lapsed: no poll)."""
        fence = self.store.fence
        if fence is None:
            return None
        epoch = fence.epoch_of(watch.name)
        return _NOT_HELD if epoch is None else epoch

    def _probe(self, watch: Watch) -> tuple[PollResult, PrefixState | None]:
        if watch.prefix:
            listed = self.prefix_states.get(watch.id, PrefixState())
            return poll_prefix(self.prober, watch, listed), listed
        return self.prober.probe(watch, self.states.get(watch.id)), None

    def _unrecorded(self, result: PollResult, exc: BaseException) -> None:
        watch = result.watch
        if isinstance(exc, Fenced):
            self.stats.add("fenced")
            if not isinstance(exc, Retargeted):
                # Another daemon holds this watch now and polls it from the committed state.
                log.info("%s %s poll result dropped: %s", printable(watch.name), printable(watch.url), exc)
            elif watch.id not in self._retargeted:
                # Every poll of it is dropped until this daemon reloads: say so once, loudly.
                self._retargeted.add(watch.id)
                log.warning(
                    "%s %s: %s (`systemctl reload` this daemon, or check that every host has the same config)",
                    printable(watch.name),
                    printable(watch.url),
                    exc,
                )
            return
        if isinstance(exc, Superseded):
            # Lost a race to another writer: read back what is committed, so the next poll is
            # conditioned on it (a change it did not record yet is detected then).
            self.resume([watch.id])
            log.warning("%s; its state was read back from the database", exc)
            return
        reason = describe_db_error(exc, self.url)
        self.stats.add("error")
        self.stats.last_error = f"database: {reason}"
        if self.metrics is not None:
            self.metrics.observe_unrecorded()
        log.error(
            "%s %s poll result NOT recorded (%s); any change will be detected again on the next poll",
            printable(watch.name),
            printable(watch.url),
            printable(reason),
        )

    def _recorded(self, result: PollResult, listed: PrefixState | None) -> None:
        """After the commit, and only then: the state the next poll conditions on, counters, the log line."""
        watch = result.watch
        if listed is not None:
            if result.outcome != "error":
                self.prefix_states[watch.id] = listed.apply(result.changes, result.filters)
        elif result.state is not None:
            self.states[watch.id] = result.state
        self.stats.add(result.outcome)
        self._set_outcome(watch.id, result.outcome)
        if self.metrics is not None:
            self.metrics.observe(result)
        if not self.log_polls:
            return
        if result.outcome == "error":
            self.stats.last_error = printable(f"{watch.name}: {result.error}")
            log.warning("%s", describe_result(result))
        elif result.event is not None:
            log.info("%s", describe_result(result))
        elif result.changes:
            log.info("%s", describe_result(result))
            for change in result.changes:
                if change.event is not None:
                    log.info("%s", describe_change(watch, change, result.duration_ms))
        elif log.isEnabledFor(logging.DEBUG):
            # Most polls are unchanged: do not format their line unless it will be shown.
            log.debug("%s", describe_result(result))


def in_flight_target(demand: float, fast_poll: float, ceiling: int) -> int:
    """How many polls may run at once: the demanded rate (polls/s) times the time of a fast poll
    (Little's law), with room for bursts (x1.5, +4), within ``ceiling``.

    ``fast_poll`` is a low percentile (the 2nd) of recent poll times, not their mean: when the CPU is the
    bottleneck every poll takes longer, and sizing by that time would add threads that only wait for
    the GIL (measured: 256 threads did 1,031 polls/s where 64 did 1,648, at twice the CPU per poll).
    """
    if demand <= 0:
        return ceiling
    if fast_poll <= 0:
        return min(ceiling, FIRST_LIMIT)  # until the first polls have been timed
    return max(1, min(ceiling, math.ceil(demand * fast_poll * 1.5) + 4))


class Workers:
    """The pool that runs due polls: at most one poll per watch in flight or queued.

    Threads are started as the work needs them: a poll due while every thread is busy starts
    another, up to ``in_flight_target`` of the demanded rate (``demand``, set from the watch list)
    and the recent poll times, and never past ``threads`` (``[schedule] concurrency``). 1,667 polls/s
    at a 50 ms round trip take ~130 threads, at 2 ms about ten.
    """

    SAMPLES = 512  # recent poll times kept for the low percentile
    # A poll running this long (or ten fast polls' time, if more) waits on a slow or hung endpoint,
    # not the CPU: its thread does not count against the limit, so the others' polls are not queued
    # behind it (a bucket whose endpoint hangs holds a thread per watch for read_timeout x attempts).
    STUCK_AFTER = 0.5

    def __init__(
        self,
        service: PollService,
        threads: int,
        on_start: Callable[[float], None] | None = None,
        *,
        first_threads: int = 4,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.service = service
        self._on_start = on_start  # gets the lateness (seconds after the scheduled time) of each poll
        self._queue: queue.SimpleQueue[tuple[Watch, datetime] | None] = queue.SimpleQueue()
        self._busy: set[int] = set()
        self._held: set[int] = set()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._ceiling = threads
        self.demand = 0.0  # polls/s the watch list asks for (0: unknown, the ceiling applies)
        self._times: list[float] = []  # recent poll times (seconds), a ring of SAMPLES
        self._fast_poll = 0.0  # their 2nd percentile, recomputed every SAMPLES polls
        self._free = threading.Semaphore(0)  # one count per thread waiting for work
        self._threads: list[threading.Thread] = []
        self._began: list[float] = []  # per thread: when its probe began (clock), 0.0 when not probing
        self._answered: list[float] = []  # per thread: when the server answered its poll (clock), 0.0 before
        self._probed: list[Callable[[], None]] = []  # per thread: notes the answer (_answered, _began)
        self._clock = clock
        self._stopping = False
        for _ in range(min(first_threads, threads)):
            if self._spawn():
                self._free.release()  # waiting from the start; a thread started for a poll is not
        if not self._threads:
            raise RuntimeError("cannot start any worker thread: the system's thread or process limit is reached")

    @property
    def threads(self) -> int:
        """How many worker threads have been started (a gauge of the concurrency the work needed)."""
        return len(self._threads)

    @property
    def limit(self) -> int:
        """The most threads the current demand and poll times call for."""
        return in_flight_target(self.demand, self._fast_poll, self._ceiling)

    def _timed(self, seconds: float) -> None:
        times = self._times
        times.append(seconds)
        if len(times) >= (self.SAMPLES if self._fast_poll else 32):
            self._fast_poll = sorted(times)[len(times) // 50]
            times.clear()

    def _answer_came(self, index: int) -> None:
        self._answered[index] = self._clock()
        self._began[index] = 0.0

    def _stuck(self) -> int:
        """How many threads have been on one poll longer than a slow endpoint explains (STUCK_AFTER)."""
        now, after = self._clock(), max(self.STUCK_AFTER, 10 * self._fast_poll)
        return sum(1 for began in self._began if began and now - began > after)

    def _spawn(self) -> bool:
        """Start one more thread; False if the system refuses one (a thread or process limit)."""
        index = len(self._threads)
        thread = threading.Thread(target=self._run, args=(index,), name=f"poller-worker-{index}", daemon=True)
        self._began.append(0.0)
        self._answered.append(0.0)
        self._probed.append(functools.partial(self._answer_came, index))
        try:
            thread.start()
        except RuntimeError as exc:  # "can't start new thread": the running ones carry on
            self._began.pop()
            self._answered.pop()
            self._probed.pop()
            log.error("cannot start worker thread %d (%s): polling goes on with %d", index + 1, exc, index)
            return False
        self._threads.append(thread)
        return True

    def submit(self, watch: Watch, scheduled: datetime) -> bool:
        """Queue a due poll; False (skipped) if this watch's previous poll is still queued or not committed."""
        with self._lock:
            if watch.id in self._busy or watch.id in self._held or self._stopping:
                return False
            self._busy.add(watch.id)
            # A waiting thread takes it; none waiting: one more thread, up to what the work needs,
            # not counting threads held by a hung endpoint's polls.
            if not self._free.acquire(blocking=False):
                started = len(self._threads)
                if started < self.limit or (started < self._ceiling and started < self.limit + self._stuck()):
                    self._spawn()
        self._queue.put((watch, scheduled))
        return True

    def hold(self, watch_ids: set[int], timeout: float) -> bool:
        """Hand out no poll of these watches until ``release``, and wait (up to ``timeout``) until none
        is queued or uncommitted: a reload that re-points a watch must not let a poll of the old object
        commit after the old object's state was dropped. False if polls were still in flight."""
        deadline = time.monotonic() + timeout
        with self._idle:
            self._held |= watch_ids
            while self._busy & watch_ids:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def release(self, watch_ids: set[int]) -> None:
        with self._lock:
            self._held -= watch_ids

    def stop(self) -> None:
        """Let running polls finish; queued ones are dropped (the service refuses them once stopped)."""
        self.service.stop()
        with self._lock:
            self._stopping = True  # no thread is started after this
            threads = list(self._threads)
        for _ in threads:
            self._queue.put(None)
        for thread in threads:
            thread.join()

    def _run(self, index: int) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            watch, scheduled = item
            began = self._began[index] = self._clock()
            self._answered[index] = 0.0
            try:
                if self._on_start is not None:
                    self._on_start(max(time.time() - scheduled.timestamp(), 0.0))
                # Stuck means on the server's answer, not waiting for room at the writer (a writer
                # stall must not start a thread per poll: they would stay, and thrash the GIL).
                self.service.start_poll(watch, functools.partial(self._done, watch.id), self._probed[index])
                # The poll's time is the server's: a wait for room at the writer would raise the limit.
                answered = self._answered[index] or self._clock()
                with self._lock:
                    self._timed(answered - began)
            except Exception:
                # The probe never raises for S3 trouble; anything else is a bug, but the pool goes on.
                log.exception("%s: poll failed", printable(watch.name))
                self._done(watch.id)
            self._began[index] = 0.0
            self._free.release()  # waiting again (ThreadPoolExecutor's idle count works the same way)

    def _done(self, watch_id: int) -> None:
        with self._idle:
            self._busy.discard(watch_id)
            self._idle.notify_all()


def prepare(
    settings: Settings, store: Store, *, log_polls: bool = True, daemon: bool = False
) -> tuple[PollService, dict[str, WatchSpec], SyncResult]:
    """What `run` and `once` both do before polling: build the client, migrate, sync the watch list,
    start the writer. The client comes first: nothing is written unless the config can be used.
    ``daemon``: the writer lingers longer for company (``writer_linger``)."""
    try:
        prober = prober_for(settings.s3, settings.schedule.concurrency, sink=store)
    except (BotoCoreError, ValueError) as exc:
        raise ConfigError(f"[s3]: cannot build the S3 client: {exc}") from None
    specs = specs_from_settings(settings)
    rules = rules_from_settings(settings)
    # From here on the watch list lives in `specs`: the entries of a million watches would add 160 MB
    # to the start's peak (a reload validates the file anew).
    settings.watch.clear()
    migrate(store.engine)
    synced = store.sync_watches(list(specs.values()), datetime.now(UTC))
    store.rules = {watch.id: rules[name] for name, watch in synced.watches.items()}
    linger = writer_linger(specs.values()) if daemon else LINGER
    recorder = Recorder(store, make_route(settings.notify) if settings.notify else None, linger=linger)
    return PollService(store, prober, recorder, settings.database.url, log_polls=log_polls), specs, synced


def writer_linger(specs: Iterable[WatchSpec | Watch]) -> float:
    """The daemon writer's linger: DAEMON_LINGER, or a quarter of the shortest interval if that is
    less (a watch is not polled again before its last result is committed: the linger must not
    make it skip its next slot)."""
    shortest = min((spec.interval_seconds for spec in specs if spec.interval_seconds), default=None)
    return DAEMON_LINGER if shortest is None else min(DAEMON_LINGER, shortest / 4)


def describe_result(r: PollResult) -> str:
    """The one-line description of a poll used in logs and by `poller once`.

    Escaped as a whole: watch names, keys, bucket names, ETags, version ids and error texts come from
    the config or from S3 answers, and none of them may split the line or forge another one.
    """
    return printable(_describe_result(r))


def _describe_result(r: PollResult) -> str:
    head = f"{r.watch.name} {r.watch.url}"
    ms = f"{r.duration_ms:.0f}ms"
    if r.outcome == "error":
        status = f" ({r.http_status})" if r.http_status else ""
        return f"{head} error{status}: {r.error} {ms}"
    if r.watch.prefix:
        counts: dict[str, int] = {}
        for c in r.changes:
            if c.event:
                counts[c.event] = counts.get(c.event, 0) + 1
        summary = ", ".join(f"{n} {e.replace('_', ' ')}" for e, n in sorted(counts.items()))
        return f"{head} {r.outcome} (list: {r.note}{'; ' + summary if summary else ''}) {ms}"
    state = r.state or ObjectState()
    previous = r.previous or ObjectState()
    note = f" [{r.note}]" if r.note else ""
    if r.outcome == "unchanged":
        return f"{head} unchanged ({r.http_status}) etag={state.etag} {ms}"
    if r.outcome == "missing":
        if r.event == "deleted":
            return f"{head} missing (deleted; was etag {previous.etag}) {ms}"
        return f"{head} missing (404) {ms}"
    version = f" version {state.version_id}" if state.version_id else ""
    tail = f"last-modified {iso(state.last_modified)}{version}{note} {ms}"
    if r.event == "modified":
        return f"{head} modified etag {previous.etag} -> {state.etag} {tail}"
    return f"{head} modified ({r.event.replace('_', ' ') if r.event else 'changed'}) etag {state.etag} {tail}"


def describe_change(watch: Watch, change: KeyChange, duration_ms: float) -> str:
    """The line of one key's change inside a prefix watch, in the same words as a key watch's."""
    as_key = Watch(watch.id, watch.name, watch.bucket, change.key)
    outcome: Outcome = "missing" if change.event == "deleted" else "modified"
    status = 404 if change.event == "deleted" else 200
    return describe_result(
        PollResult(as_key, datetime.now(UTC), outcome, status, duration_ms, change.previous, change.state, change.event)
    )


def poll_all(service: PollService, watches: Sequence[Watch], concurrency: int) -> list[PollResult | None]:
    """Poll every watch once with ``concurrency`` threads, in the order given."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(watches) or 1))) as pool:
        return list(pool.map(service.poll, watches))


def probe_all_unrecorded(prober: Prober, watches: Sequence[Watch], concurrency: int) -> list[PollResult]:
    """One unconditional HEAD per watch, nothing recorded (for `poller check --probe`)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(watches) or 1))) as pool:
        return list(
            pool.map(lambda w: poll_prefix(prober, w, PrefixState()) if w.prefix else prober.probe(w, None), watches)
        )
