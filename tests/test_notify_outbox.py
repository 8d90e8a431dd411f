"""The dispatcher against the outbox on both backends: a pass's deliveries are marked in one
transaction, only after their sinks took them; a crash before that mark delivers again, never loses."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from conftest import serving, wait_for
from sqlalchemy import event, select

from poller.config import NotifySettings
from poller.model import ObjectState, PollResult
from poller.notify import Dispatcher
from poller.schema import notifications
from poller.store import Store
from poller.watchlist import WatchSpec

NOW = datetime(2026, 11, 26, 9, 0, 0, tzinfo=UTC)


class Hooks:
    """Two real webhook receivers on one server: /ok answers 204, /down answers 503."""

    def __init__(self) -> None:
        self.received: list[tuple[str, str]] = []  # (X-Poller-Delivery, watch) of each 2xx answered
        lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                ok = self.path == "/ok"
                if ok:
                    with lock:
                        outer.received.append((self.headers["X-Poller-Delivery"], body["data"]["watch"]))
                self.send_response(204 if ok else 503)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.handler = Handler


@pytest.fixture
def hooks() -> Iterator[tuple[Hooks, list[NotifySettings]]]:
    h = Hooks()
    with serving(h.handler) as port:
        sinks = [
            NotifySettings(type="webhook", name=name, url=f"http://127.0.0.1:{port}/{name}", backoff=60.0)
            for name in ("ok", "down")
        ]
        yield h, sinks


def first_sightings(store: Store, count: int) -> None:
    """``count`` watches' first sightings, each routed to both sinks."""
    names = [f"w{i}" for i in range(count)]
    watches = store.sync_watches([WatchSpec(n, "bucket", f"key/{n}", 60.0, None) for n in names], NOW).watches
    state = ObjectState('"e1"', NOW, NOW, None, 3, True)
    results = [PollResult(w, NOW, "modified", 200, 1.0, None, state, "first_seen") for w in watches.values()]
    assert store.record(results, lambda name, event: ["ok", "down"]) == {}


def outbox(store: Store) -> dict[str, list[tuple[Any, ...]]]:
    n = notifications.c
    query = select(n.sink, n.status, n.attempts, n.last_error, n.delivered_at).order_by(n.id)
    rows: dict[str, list[tuple[Any, ...]]] = {}
    with store.engine.connect() as conn:
        for sink, *row in conn.execute(query):
            rows.setdefault(sink, []).append(tuple(row))
    return rows


def test_a_pass_marks_its_deliveries_in_one_transaction(store: Store, hooks: tuple[Hooks, list[NotifySettings]]):
    received, sinks = hooks
    first_sightings(store, 6)
    updates: list[tuple[str, bool]] = []

    def seen(conn: Any, cursor: Any, sql: str, params: Any, context: Any, executemany: bool) -> None:
        if sql.startswith("UPDATE notifications"):
            updates.append((sql, executemany))

    dispatcher = Dispatcher(store, sinks, "test")
    event.listen(store.engine, "before_cursor_execute", seen)
    before = datetime.now(UTC)
    try:
        assert dispatcher.run_once(NOW + timedelta(seconds=1)) == 12
    finally:
        event.remove(store.engine, "before_cursor_execute", seen)
        dispatcher.stop()
    after = datetime.now(UTC)
    rows = outbox(store)
    assert sorted(watch for _, watch in received.received) == [f"w{i}" for i in range(6)]
    assert [row[:3] for row in rows["ok"]] == [("delivered", 1, None)] * 6
    assert all(before <= row[3] <= after for row in rows["ok"])  # each at its own success
    assert [row[:2] for row in rows["down"]] == [("pending", 1)] * 6
    assert all("503" in row[2] and row[3] is None for row in rows["down"])
    # Six failed attempts row by row (failures are rare), the six successes in one statement.
    marks = [(sql, many) for sql, many in updates if "delivered_at" in sql]
    assert len(marks) == 1 and marks[0][1], marks
    assert len(updates) == 7


def test_a_hanging_sink_does_not_hold_back_the_other_deliveries_marks(
    store: Store, hooks: tuple[Hooks, list[NotifySettings]], monkeypatch: pytest.MonkeyPatch
):
    """Marked only at the pass's end, the quick sink's deliveries would wait for the hanging one;
    past their claim (several daemons) another daemon would deliver them again."""
    import poller.notify

    received, sinks = hooks
    release = threading.Event()

    class Slow(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            release.wait(30)
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    monkeypatch.setattr(poller.notify, "MARK_EVERY", 0.1)
    waits = [0]
    real_wait = poller.notify.wait

    def counted(*args: Any, **kwargs: Any) -> Any:
        waits[0] += 1
        return real_wait(*args, **kwargs)

    monkeypatch.setattr(poller.notify, "wait", counted)
    with serving(Slow) as port:
        slow = NotifySettings(type="webhook", name="down", url=f"http://127.0.0.1:{port}/slow", timeout=30.0)
        first_sightings(store, 3)  # routed to "ok" and "down"
        dispatcher = Dispatcher(store, [sinks[0], slow], "test")
        passing = threading.Thread(target=dispatcher.run_once, args=(NOW + timedelta(seconds=1),))
        passing.start()
        try:
            wait_for(lambda: [r[0] for r in outbox(store)["ok"]] == ["delivered"] * 3, what="the quick sink's marks")
            assert passing.is_alive() and {r[0] for r in outbox(store)["down"]} == {"pending"}
            # Nothing left to mark while the sink hangs: the pass sleeps between looks, it does not spin.
            before = waits[0]
            threading.Event().wait(0.5)  # a stretch of the hang to count the pass's looks over
            assert waits[0] - before < 20, f"{waits[0] - before} looks in 0.5 s"
        finally:
            release.set()
            passing.join(30)
            dispatcher.stop()
    assert [r[0] for r in outbox(store)["down"]] == ["delivered"] * 3
    assert len(received.received) == 3


def test_no_attempt_starts_that_could_outlast_its_claim(
    store: Store, hooks: tuple[Hooks, list[NotifySettings]], monkeypatch: pytest.MonkeyPatch
):
    """A pass that has run for most of its rows' claim leaves the rest to the next pass, unattempted,
    rather than deliver what another daemon may have claimed and delivered meanwhile; the claim is
    long enough for the slowest sink's attempts to start at a pass's beginning."""
    import time

    import poller.notify
    from poller.notify import DEFERRED, claim_seconds

    received, sinks = hooks
    assert claim_seconds(sinks) == 600.0  # timeouts of 10 s
    slow = NotifySettings(type="webhook", name="slow", url="http://127.0.0.1:9/", timeout=400.0)
    assert claim_seconds([*sinks, slow]) == 2 * 400.0 + poller.notify.CLAIM_MARGIN
    first_sightings(store, 2)
    dispatcher = Dispatcher(store, sinks, "test")  # timeouts of 10 s
    try:
        (row, _) = (r for r in store.due_notifications(NOW + timedelta(seconds=1)) if r["sink"] == "ok")
        assert dispatcher._attempt(row, NOW, budget=time.monotonic() + 5.0) == DEFERRED
        assert received.received == [] and [r[:2] for r in outbox(store)["ok"]] == [("pending", 0)] * 2
        # A pass whose every row is deferred attempted nothing: the dispatcher's loop then waits.
        monkeypatch.setattr(poller.notify, "claim_seconds", lambda sinks: 20.0)
        assert dispatcher.run_once(NOW + timedelta(seconds=1)) == 0
        assert received.received == [] and {r[1] for r in outbox(store)["down"]} == {0}
        monkeypatch.setattr(poller.notify, "claim_seconds", claim_seconds)
        assert dispatcher.run_once(NOW + timedelta(seconds=2)) == 4
    finally:
        dispatcher.stop()
    assert [r[:2] for r in outbox(store)["ok"]] == [("delivered", 1)] * 2


def test_a_crash_before_the_mark_delivers_again_with_the_same_id(
    store: Store, hooks: tuple[Hooks, list[NotifySettings]], monkeypatch: pytest.MonkeyPatch
):
    received, sinks = hooks
    first_sightings(store, 3)
    dispatcher = Dispatcher(store, sinks[:1], "test")
    mark = store.delivered_many

    def crash(marks: Any) -> None:
        raise RuntimeError("killed between the webhook's answer and the commit")

    monkeypatch.setattr(store, "delivered_many", crash)
    try:
        with pytest.raises(RuntimeError, match="killed"):
            dispatcher.run_once(NOW + timedelta(seconds=1))
        assert len(received.received) == 3
        assert {row[0] for row in outbox(store)["ok"]} == {"pending"}  # never marked: still owed
        monkeypatch.setattr(store, "delivered_many", mark)
        assert dispatcher.run_once(NOW + timedelta(seconds=2)) == 3
        assert dispatcher.run_once(NOW + timedelta(seconds=3)) == 0  # marked now: delivered once more only
    finally:
        dispatcher.stop()
    first, again = received.received[:3], received.received[3:]
    assert sorted(again) == sorted(first)  # the same event ids: a receiver de-duplicates
    assert [row[:3] for row in outbox(store)["ok"]] == [("delivered", 1, None)] * 3
