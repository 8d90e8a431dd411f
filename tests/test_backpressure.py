"""Backpressure (issue #13): a bounded number of uncommitted results; workers wait for the writer."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from conftest import wait_for

from poller.model import ObjectState, PollResult, Watch
from poller.pipeline import Recorder

NOW = datetime(2026, 11, 24, 10, 0, 0, tzinfo=UTC)


class GatedStore:
    """A store whose commits wait for the test to open a gate; it records what it was given."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.recorded: list[PollResult] = []

    def record(self, results: Sequence[PollResult], route: Any = None) -> dict[int, Exception]:
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
        def record(self, results: Sequence[PollResult], route: Any = None) -> dict[int, Exception]:
            raise RuntimeError("database is locked")

    recorder = Recorder(Failing(), max_batch=2, max_pending=2)  # type: ignore[arg-type]
    errors: list[BaseException | None] = []
    for i in range(6):  # three times the room: only possible if failed commits release it
        recorder.submit_nowait(_result(i), errors.append)
    recorder.close()
    assert len(errors) == 6 and all(isinstance(e, RuntimeError) for e in errors)
