"""The path of one poll: probe -> batched commit -> (only then) state cache, log line, counters.

A change counts as seen only once its transaction has committed: the in-memory state that
feeds the next conditional request is updated after the commit, never before, so a failed
commit means the next poll detects the change again.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from datetime import UTC, datetime

from poller.config import Settings
from poller.listing import KeyChange, PrefixState, poll_prefix
from poller.metrics import Metrics
from poller.notify import make_route
from poller.probe import ObjectState, Outcome, PollResult, Prober, Watch, prober_for
from poller.store import Route, Store, SyncResult, describe_db_error, migrate
from poller.watchlist import WatchSpec, specs_from_settings

log = logging.getLogger(__name__)

MAX_BATCH = 1000


class Recorder:
    """A single writer thread that commits many poll results per transaction."""

    def __init__(self, store: Store, route: Route | None = None, max_batch: int = MAX_BATCH) -> None:
        self._store = store
        self.route = route  # replaced on reload; read once per batch
        self.on_events: Callable[[], None] | None = None  # e.g. wake the notification dispatcher
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[tuple[PollResult, Future[None]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="poller-writer", daemon=True)
        self._thread.start()

    def submit(self, result: PollResult) -> Future[None]:
        """Queue a result; the future completes once it is committed (or fails with the reason)."""
        future: Future[None] = Future()
        self._queue.put((result, future))
        return future

    def close(self) -> None:
        """Commit what is queued, then stop the writer thread."""
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        stopping = False
        while not stopping:
            item = self._queue.get()
            batch: list[tuple[PollResult, Future[None]]] = []
            if item is None:
                stopping = True
            else:
                batch.append(item)
            while len(batch) < self._max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            if batch:
                self._commit(batch)

    def _commit(self, batch: list[tuple[PollResult, Future[None]]]) -> None:
        try:
            self._store.record([r for r, _ in batch], self.route)
        except Exception as exc:
            if len(batch) > 1:
                # One bad row must not sink the others: retry each on its own.
                for pair in batch:
                    self._commit([pair])
                return
            batch[0][1].set_exception(exc)
            return
        for _, future in batch:
            future.set_result(None)
        if self.on_events is not None and any(r.event or r.changes for r, _ in batch):
            self.on_events()


class Stats:
    """Outcome counts over the last minute, in one-second buckets (for systemd STATUS=)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[int, Counter[str]] = {}
        self._lock = threading.Lock()
        self.last_error = ""

    def add(self, outcome: str) -> None:
        second = int(self._clock())
        with self._lock:
            self._buckets.setdefault(second, Counter())[outcome] += 1

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

    def poll(self, watch: Watch) -> PollResult | None:
        """Probe, commit, then report; returns None when the result could not be committed."""
        if self._stopping.is_set():
            return None
        if watch.prefix:
            listed = self.prefix_states.get(watch.id, PrefixState())
            result = poll_prefix(self.prober, watch, listed)
        else:
            result = self.prober.probe(watch, self.states.get(watch.id))
        try:
            self.recorder.submit(result).result()
        except Exception as exc:
            reason = describe_db_error(exc, self.url)
            self.stats.add("error")
            self.stats.last_error = f"database: {reason}"
            if self.metrics is not None:
                self.metrics.observe_unrecorded()
            log.error(
                "%s %s poll result NOT recorded (%s); any change will be detected again on the next poll",
                watch.name,
                printable(watch.url),
                reason,
            )
            return None
        if watch.prefix:
            if result.outcome != "error":
                self.prefix_states[watch.id] = listed.apply(result.changes)
        elif result.state is not None:
            self.states[watch.id] = result.state
        self.stats.add(result.outcome)
        self.last_outcome[watch.id] = result.outcome
        if self.metrics is not None:
            self.metrics.observe(result)
        if not self.log_polls:
            return result
        if result.outcome == "error":
            self.stats.last_error = f"{watch.name}: {result.error}"
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
        return result


def prepare(
    settings: Settings, store: Store, *, log_polls: bool = True
) -> tuple[PollService, dict[str, WatchSpec], SyncResult]:
    """What `run` and `once` both do before polling: migrate, sync the watch list, start the writer."""
    migrate(store.engine)
    specs = specs_from_settings(settings)
    synced = store.sync_watches(list(specs.values()), datetime.now(UTC))
    recorder = Recorder(store, make_route(settings.notify) if settings.notify else None)
    prober = prober_for(settings.s3, settings.schedule.concurrency)
    return PollService(store, prober, recorder, settings.database.url, log_polls=log_polls), specs, synced


def printable(text: str) -> str:
    """Escape control characters so an S3 key cannot forge or split log lines."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def iso(value: datetime | None) -> str:
    """UTC ISO-8601 with a Z, seconds precision (for logs and CLI output)."""
    if value is None:
        return "-"
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def describe_result(r: PollResult) -> str:
    """The one-line description of a poll used in logs and by `poller once`."""
    head = f"{r.watch.name} {printable(r.watch.url)}"
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
