"""Backpressure (issue #13): a bounded number of uncommitted results; workers wait for the writer."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pytest
from conftest import wait_for

from poller.model import KeyChange, ObjectState, PollResult, Watch
from poller.pipeline import Recorder

NOW = datetime(2026, 11, 24, 10, 0, 0, tzinfo=UTC)


class GatedStore:
    """A store whose commits wait for the test to open a gate; it records what it was given."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.recorded: list[PollResult] = []

    def record(self, results: Sequence[PollResult], route: Any = None, epochs: Any = None) -> dict[int, Exception]:
        self.gate.wait()
        self.recorded.extend(results)
        return {}


def _result(i: int) -> PollResult:
    state = ObjectState('"e"', NOW, NOW, None, 1, True)
    return PollResult(Watch(i, f"w{i}", "bucket", f"k{i}"), NOW, "unchanged", 304, 1.0, state, state)


def test_workers_wait_once_max_pending_results_are_uncommitted():
    store = GatedStore()
    recorder = Recorder(store, max_batch=2, max_pending=4)  # type: ignore[arg-type]
    committed: list[int] = []
    submitted = threading.Event()

    def worker() -> None:
        for i in range(10):
            recorder.submit_nowait(_result(i), lambda exc, i=i: committed.append(i))
        submitted.set()

    thread = threading.Thread(target=worker)
    thread.start()
    wait_for(lambda: recorder.waits == 1, what="the fifth submission waiting for room")
    assert not submitted.is_set() and committed == []
    store.gate.set()  # the writer catches up: the worker goes on
    assert submitted.wait(10)
    thread.join(10)
    recorder.close()
    assert sorted(committed) == list(range(10))
    assert [r.watch.id for r in store.recorded] == list(range(10))


def test_a_failed_commit_gives_its_room_back():
    class Failing(GatedStore):
        def record(self, results: Sequence[PollResult], route: Any = None, epochs: Any = None) -> dict[int, Exception]:
            raise RuntimeError("database is locked")

    recorder = Recorder(Failing(), max_batch=2, max_pending=2)  # type: ignore[arg-type]
    errors: list[BaseException | None] = []
    for i in range(6):  # three times the room: only possible if failed commits release it
        recorder.submit_nowait(_result(i), errors.append)
    recorder.close()
    assert len(errors) == 6 and all(isinstance(e, RuntimeError) for e in errors)


def test_a_list_pass_with_many_changed_keys_is_a_transaction_of_its_own():
    # A batch aims at max_batch rows, not results: a first pass over a new prefix brings a row per
    # key, and a million keys in one transaction held the writer (and every other watch) for minutes.
    class Batches(GatedStore):
        def __init__(self) -> None:
            super().__init__()
            self.batches: list[list[int]] = []

        def record(self, results: Sequence[PollResult], route: Any = None, epochs: Any = None) -> dict[int, Exception]:
            self.gate.wait()
            self.batches.append([r.watch.id for r in results])
            return {}

    store = Batches()
    recorder = Recorder(store, max_batch=10, max_pending=100, linger=0)  # type: ignore[arg-type]
    state = ObjectState('"e"', NOW, NOW, None, 1, True)
    changes = tuple(KeyChange(f"p/{k}", "first_seen", None, state) for k in range(12))
    listed = PollResult(
        Watch(99, "p", "bucket", "p/", prefix=True), NOW, "modified", 200, 1.0, None, state, changes=changes
    )
    for item in [_result(0), listed, *[_result(i) for i in range(1, 12)]]:
        recorder.submit_nowait(item, lambda exc: None)
    store.gate.set()
    recorder.close()
    (with_pass,) = [b for b in store.batches if 99 in b]
    assert with_pass[-1] == 99  # its 13 rows filled the batch: nothing joined it after
    assert sorted(i for b in store.batches for i in b) == [*range(12), 99]
    assert max(len(b) for b in store.batches) <= 10


def test_the_writer_gathers_for_its_linger_but_not_past_a_whole_batch_or_a_stop():
    """Results arriving within the linger are one transaction; a whole batch waiting, or close(),
    ends the gathering at once (the linger here is an hour: waiting it out would hang the test)."""

    class Batches(GatedStore):
        def __init__(self) -> None:
            super().__init__()
            self.batches: list[list[int]] = []

        def record(self, results: Sequence[PollResult], route: Any = None, epochs: Any = None) -> dict[int, Exception]:
            self.batches.append([r.watch.id for r in results])
            return {}

    store = Batches()
    recorder = Recorder(store, max_batch=10, max_pending=100, linger=3600.0)  # type: ignore[arg-type]
    committed: list[BaseException | None] = []
    recorder.submit_nowait(_result(0), committed.append)
    wait_for(lambda: recorder._queue.qsize() == 0, what="the writer holding the first result")
    for i in range(1, 4):
        recorder.submit_nowait(_result(i), committed.append)
    assert store.batches == []  # gathering
    for i in range(4, 10):  # now a whole batch is waiting
        recorder.submit_nowait(_result(i), committed.append)
    wait_for(lambda: len(committed) == 10, what="the whole batch committed")
    assert store.batches == [list(range(10))]
    recorder.submit_nowait(_result(10), committed.append)
    recorder.close()  # commits what is queued without waiting out the linger
    assert store.batches == [list(range(10)), [10]] and committed == [None] * 11


# --- concurrency that follows the work ----------------------------------------------------------


class BlockingService:
    """Stands in for PollService: each poll holds its thread until the test opens the gate."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.running = 0
        self.done = 0
        self.lock = threading.Lock()

    def start_poll(self, watch: Watch, committed: Any, probed: Any = None) -> None:
        with self.lock:
            self.running += 1
        self.gate.wait()
        with self.lock:
            self.running -= 1
            self.done += 1
        committed()

    def stop(self) -> None:
        self.gate.set()


def test_threads_are_started_as_polls_wait_up_to_the_ceiling():
    from poller.pipeline import Workers

    service = BlockingService()
    workers = Workers(service, 6, first_threads=2)  # type: ignore[arg-type]
    try:
        assert workers.threads == 2
        for i in range(10):
            assert workers.submit(Watch(i, f"w{i}", "bucket", f"k{i}"), NOW)
        # Every thread is held by a slow poll: one more per poll due, but never past the ceiling.
        wait_for(lambda: service.running == 6, what="six polls in flight")
        assert workers.threads == 6
        service.gate.set()
        wait_for(lambda: service.done == 10, what="all ten polls")
        # Idle threads take new work: no new thread for polls that find one waiting.
        for i in range(10, 13):
            assert workers.submit(Watch(i, f"w{i}", "bucket", f"k{i}"), NOW)
        wait_for(lambda: service.done == 13, what="three more")
        assert workers.threads == 6
    finally:
        workers.stop()


def test_fast_polls_need_few_threads():
    from poller.pipeline import Workers

    service = BlockingService()
    service.gate.set()  # every poll returns at once
    workers = Workers(service, 64, first_threads=2)  # type: ignore[arg-type]
    try:
        for i in range(200):
            workers.submit(Watch(i, f"w{i}", "bucket", f"k{i}"), NOW)
            wait_for(lambda i=i: service.done == i + 1, what=f"poll {i}")
        assert workers.threads <= 8  # a thread may not be waiting yet when the next poll comes
    finally:
        workers.stop()


def test_in_flight_target_follows_rate_times_a_fast_poll_within_the_ceiling():
    from poller.pipeline import FIRST_LIMIT, in_flight_target

    assert in_flight_target(1667, 0.050, 256) == 130  # Little's law x1.5, +4
    assert in_flight_target(1667, 0.002, 256) == 10
    assert in_flight_target(1667, 0.500, 256) == 256  # never past the ceiling
    assert in_flight_target(0.0, 0.050, 256) == 256  # demand unknown: the ceiling
    assert in_flight_target(1667, 0.0, 256) == FIRST_LIMIT  # nothing timed yet
    assert in_flight_target(1667, 0.0, 8) == 8


def test_demand_of_a_watch_list():
    from poller.watchlist import WatchSpec, demand

    specs = [WatchSpec(f"w{i}", "bucket", f"k{i}", 60.0, None) for i in range(600)]
    specs.append(WatchSpec("nightly", "bucket", "n", None, "0 7 * * *"))
    assert demand(specs) == pytest.approx(10 + 1 / 60)


def test_the_thread_limit_follows_the_timed_polls():
    from poller.pipeline import Workers

    service = BlockingService()
    service.gate.set()
    workers = Workers(service, 256, first_threads=1)  # type: ignore[arg-type]
    try:
        workers.demand = 1000.0
        assert workers.limit == 32  # before any poll is timed
        for i in range(32):
            workers.submit(Watch(i, f"w{i}", "bucket", f"k{i}"), NOW)
            wait_for(lambda i=i: service.done == i + 1, what=f"poll {i}")
        # Polls that return at once: a handful of threads covers 1,000 polls/s.
        wait_for(lambda: workers.limit < 32, what="the first estimate")
        assert workers.limit == 5
    finally:
        workers.stop()


def test_the_daemons_writer_lingers_at_most_a_quarter_of_the_shortest_interval() -> None:
    from poller.pipeline import DAEMON_LINGER, writer_linger
    from poller.watchlist import WatchSpec

    assert writer_linger([WatchSpec("a", "b", "k", 60.0, None)]) == DAEMON_LINGER
    # A watch every 0.2 s must not skip slots while its result waits for company.
    assert writer_linger([WatchSpec("a", "b", "k", 60.0, None), WatchSpec("f", "b", "k", 0.2, None)]) == 0.05
    assert writer_linger([WatchSpec("c", "b", "k", None, "*/5 * * * *")]) == DAEMON_LINGER


def test_a_poll_committing_after_its_watch_was_removed_counts_no_outcome() -> None:
    # The daemon's writer commits up to its linger after a poll: a reload may remove the watch between.
    from poller.pipeline import PollService

    class NoStates:
        def load_states(self) -> dict[int, object]:
            return {}

        def load_prefix_states(self) -> dict[int, object]:
            return {}

    service = PollService(NoStates(), None, None, "sqlite://")  # type: ignore[arg-type]
    service._set_outcome(1, "error")
    service._set_outcome(2, "unchanged")
    service.drop_outcome(1)
    service._set_outcome(1, "error")  # the removed watch's last poll, committed late
    assert service.outcome_counts() == {"unchanged": 1}
    service.resume_from([1], ({}, {}))  # added back: its polls count again
    service._set_outcome(1, "unchanged")
    assert service.outcome_counts() == {"unchanged": 2}


def test_polls_hung_on_one_endpoint_do_not_queue_the_others_behind_them():
    """The thread limit follows fast polls (five threads cover 1,000 polls/s of 2 ms ones): watches of
    a hung endpoint, each holding a thread for read_timeout x attempts, must not take them all. A
    thread on one poll longer than STUCK_AFTER does not count against the limit."""
    import threading

    from poller.pipeline import Workers

    now = [1000.0]
    hung = threading.Event()
    done: list[str] = []

    class Service:
        def start_poll(self, watch: Watch, committed: Any, probed: Any = None) -> None:
            if watch.bucket == "dead":
                hung.wait()
            done.append(watch.name)
            committed()

        def stop(self) -> None:
            hung.set()

    workers = Workers(Service(), 64, first_threads=1, clock=lambda: now[0])  # type: ignore[arg-type]
    try:
        workers.demand = 1000.0
        workers._fast_poll = 0.002  # as timed
        assert workers.limit == 7
        dead = [Watch(100 + i, f"dead{i}", "dead", "k") for i in range(7)]
        for watch in dead:
            assert workers.submit(watch, NOW)
        wait_for(lambda: workers.threads == 7 and sum(1 for b in workers._began if b) == 7, what="7 hung polls")
        now[0] += Workers.STUCK_AFTER + 0.1  # they have been on their poll for longer than a slow endpoint explains
        for i in range(20):
            assert workers.submit(Watch(i, f"w{i}", "bucket", f"k{i}"), NOW)
        wait_for(lambda: len(done) == 20, what="the healthy polls, beside the hung ones")
        assert 7 < workers.threads <= 7 + 7
    finally:
        hung.set()
        workers.stop()


def test_a_thread_the_system_refuses_is_not_joined_and_the_pool_goes_on(monkeypatch, caplog):
    import threading

    from poller.pipeline import Workers

    service = BlockingService()
    workers = Workers(service, 4, first_threads=1)  # type: ignore[arg-type]
    try:

        def refuse(self: threading.Thread) -> None:
            raise RuntimeError("can't start new thread")

        monkeypatch.setattr(threading.Thread, "start", refuse)
        assert workers.submit(Watch(1, "w1", "bucket", "k1"), NOW)
        assert workers.submit(Watch(2, "w2", "bucket", "k2"), NOW)
        monkeypatch.undo()
        assert workers.threads == 1 and "cannot start worker thread 2" in caplog.text
        service.gate.set()
        wait_for(lambda: service.done == 2, what="both polls, on the one thread")
    finally:
        workers.stop()  # joins only threads that started


def test_polls_waiting_for_the_writer_are_not_stuck_on_their_endpoint():
    """A writer stall (a PostgreSQL failover) holds every thread after its answer came: counting those
    as stuck started a thread per poll, up to the ceiling, for good."""
    import threading

    from poller.pipeline import Workers

    now = [1000.0]
    writer = threading.Event()
    waiting: list[int] = []

    class Service:
        def start_poll(self, watch: Watch, committed: Any, probed: Any = None) -> None:
            probed()  # the server answered at once
            waiting.append(watch.id)
            writer.wait()  # waiting for room at the writer
            committed()

        def stop(self) -> None:
            writer.set()

    workers = Workers(Service(), 64, first_threads=1, clock=lambda: now[0])  # type: ignore[arg-type]
    try:
        workers.demand, workers._fast_poll = 1000.0, 0.002
        for i in range(7):
            assert workers.submit(Watch(i, f"w{i}", "bucket", f"k{i}"), NOW)
        wait_for(lambda: len(waiting) == 7, what="seven polls waiting for the writer")
        now[0] += 10.0
        for i in range(7, 30):
            assert workers.submit(Watch(i, f"w{i}", "bucket", f"k{i}"), NOW)
        assert workers.threads == 7  # no thread per poll queued behind the writer
    finally:
        writer.set()
        workers.stop()
