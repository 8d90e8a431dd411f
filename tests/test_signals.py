"""Watch signals (issue #12): the pure rules (deadlines, settling, failing) and how the store records
failing / recovered / access_lost once each, on both backends, across restarts and two writers."""

from __future__ import annotations

import json
import sqlite3
import urllib.request
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from conftest import ConfigFile, free_port, run_cli, wait_for
from daemonproc import query
from prometheus_client.parser import text_string_to_metric_families

from poller.events import cloudevent
from poller.model import ObjectState, PollResult, Watch
from poller.signalcheck import SignalCheck, Watched
from poller.signals import Rules, deadline, is_failing, is_settled, next_fire, previous_fire
from poller.store import Store
from poller.watchlist import WatchSpec

NOW = datetime(2026, 11, 24, 10, 0, 0, tzinfo=UTC)
SEC = timedelta(seconds=1)


# --- pure rules ---------------------------------------------------------------------------


def test_expect_change_within_is_due_that_long_after_the_last_change():
    rules = Rules(expect_change_within=26 * 3600)
    assert deadline(rules, NOW) == NOW + timedelta(hours=26)
    assert deadline(Rules(), NOW) is None


def test_expect_change_by_is_due_by_the_first_fire_after_the_last_change_plus_grace():
    rules = Rules(expect_change_by="0 7 * * *", expect_grace=1800)
    tomorrow = NOW.replace(hour=7, minute=30) + timedelta(days=1)
    # The 06:10 delivery counts for today's 07:00: the next one is due by tomorrow 07:30 (it was
    # due today 07:30, and a punctual feed was stale every morning).
    assert deadline(rules, NOW.replace(hour=6, minute=10)) == tomorrow
    # Within the grace (07:10): today's, on time.
    assert deadline(rules, NOW.replace(hour=7, minute=10)) == tomorrow
    # A late delivery (07:45) never counts for the next day: the next one is due tomorrow 07:30.
    assert deadline(rules, NOW.replace(hour=7, minute=45)) == tomorrow
    # Nearer the next fire than the missed due time (23:00): early for tomorrow's.
    assert deadline(rules, NOW.replace(hour=23)) == tomorrow + timedelta(days=1)
    # Before any delivery (watching began at 20:00): the first due time not yet passed, tomorrow's.
    six = Rules(expect_change_by="0 6 * * *", expect_grace=3600)
    evening = NOW.replace(hour=20)
    assert deadline(six, evening, delivered=False) == NOW.replace(hour=7) + timedelta(days=1)
    assert deadline(six, NOW.replace(hour=6, minute=30), delivered=False) == NOW.replace(hour=7)
    # Weekdays only: Friday's delivery at 06:00 makes Monday 07:30 the next due time.
    weekdays = Rules(expect_change_by="0 7 * * 1-5", expect_grace=1800)
    friday = datetime(2026, 11, 27, 6, 0, tzinfo=UTC)
    assert deadline(weekdays, friday) == datetime(2026, 11, 30, 7, 30, tzinfo=UTC)
    assert previous_fire("0 7 * * 1-5", datetime(2026, 11, 30, 7, 0, tzinfo=UTC)) == friday.replace(hour=7)
    # Exactly at the fire time: due at the next one.
    assert next_fire("0 7 * * *", NOW.replace(hour=7, minute=0)) == NOW.replace(hour=7) + timedelta(days=1)


def test_failing_by_count_or_by_duration():
    three = Rules(alert_after_errors=3)
    assert not is_failing(three, 2, NOW, NOW)
    assert is_failing(three, 3, NOW, NOW)
    ten_min = Rules(alert_after_errors=None, alert_after_seconds=600)
    assert not is_failing(ten_min, 50, NOW, NOW + timedelta(seconds=599))
    assert is_failing(ten_min, 2, NOW, NOW + timedelta(seconds=600))
    assert not is_failing(Rules(alert_after_errors=None), 1000, NOW, NOW + timedelta(days=1))


def test_settled_needs_a_successful_poll_that_late_and_that_found_no_change():
    change = NOW
    assert not is_settled(300, change, NOW + timedelta(seconds=299), "unchanged")
    assert is_settled(300, change, NOW + timedelta(seconds=300), "unchanged")
    assert is_settled(300, change, NOW + timedelta(seconds=400), "missing")
    # Time alone, a failed poll, or a poll that found a change confirm nothing.
    assert not is_settled(300, change, None, None)
    assert not is_settled(300, change, NOW + timedelta(hours=1), "error")
    assert not is_settled(300, change, NOW + timedelta(hours=1), "modified")


# --- recorded by the writer ---------------------------------------------------------------


def _watch(store: Store, name: str = "a") -> Watch:
    return store.sync_watches([WatchSpec(name, "bucket", f"key/{name}", 60.0, None)], NOW).watches[name]


def _ok(watch: Watch, when: datetime, *, first: bool = False) -> PollResult:
    state = ObjectState('"e1"', NOW, when, None, 3, True)
    return PollResult(watch, when, "modified" if first else "unchanged", 200 if first else 304, 5.0,
                      None if first else state, state, "first_seen" if first else None)  # fmt: skip


def _error(watch: Watch, when: datetime, status: int | None = 503, text: str = "HTTP 503 from server") -> PollResult:
    return PollResult(watch, when, "error", status, 5.0, None, None, None, text)


SCHEMA = jsonschema.Draft202012Validator(
    json.loads(resources.files("poller").joinpath("event.schema.json").read_text(encoding="utf-8"))
)


def _signals(store: Store) -> list[dict[str, Any]]:
    """The watch signals recorded, oldest first; each one, as a CloudEvent, valid against the shipped schema."""
    rows = [r for r in reversed(store.history(changes=True, limit=None)) if r["event_id"] is not None]
    for row in rows:
        errors = [e.message for e in SCHEMA.iter_errors(cloudevent(row))]
        assert not errors, (row["event"], errors)
    return rows


def test_failing_once_after_alert_after_errors_then_recovered_once(store: Store):
    watch = _watch(store)
    store.record([_ok(watch, NOW, first=True)])
    store.record([_error(watch, NOW + SEC), _error(watch, NOW + 2 * SEC)])
    assert _signals(store) == []
    store.record([_error(watch, NOW + 3 * SEC)])
    store.record([_error(watch, NOW + 4 * SEC)])
    signals = _signals(store)
    assert [s["event"] for s in signals] == ["failing"]
    assert signals[0]["error"] == "HTTP 503 from server"
    assert signals[0]["detail"]["consecutive_errors"] == 3
    assert signals[0]["detail"]["since"] == "2026-11-24T10:00:01.000Z"
    store.record([_ok(watch, NOW + 5 * SEC), _ok(watch, NOW + 6 * SEC)])
    events = [s["event"] for s in _signals(store)]
    assert events == ["failing", "recovered"]
    # A short streak later (below alert_after): no signal.
    store.record([_error(watch, NOW + 7 * SEC), _ok(watch, NOW + 8 * SEC)])
    assert [s["event"] for s in _signals(store)] == ["failing", "recovered"]


def test_errors_in_one_batch_count_and_the_streak_starts_at_the_first(store: Store):
    watch = _watch(store)
    store.record([_error(watch, NOW + i * SEC) for i in range(1, 5)])
    [failing] = _signals(store)
    assert failing["detail"]["since"] == "2026-11-24T10:00:01.000Z"
    assert failing["detail"]["consecutive_errors"] == 4


def test_a_restarted_writer_still_recovers_and_never_raises_twice(store: Store):
    watch = _watch(store)
    store.record([_ok(watch, NOW, first=True)])
    store.record([_error(watch, NOW + i * SEC) for i in range(1, 4)])
    again = Store(store.engine)  # a restart: nothing in memory
    again.record([_error(watch, NOW + 4 * SEC)])
    again.record([_ok(watch, NOW + 5 * SEC)])
    assert [s["event"] for s in _signals(store)] == ["failing", "recovered"]
    # The first writer, stale, tries the same recovery: the database refuses the duplicate.
    store.record([_ok(watch, NOW + 6 * SEC)])
    assert [s["event"] for s in _signals(store)] == ["failing", "recovered"]


def test_403_on_a_readable_object_is_access_lost_at_once_not_a_deletion(store: Store):
    watch = _watch(store)
    store.record([_ok(watch, NOW, first=True)])
    store.record([_error(watch, NOW + SEC, 403, "HTTP 403 Forbidden: access denied")])
    signals = _signals(store)
    assert [s["event"] for s in signals] == ["access_lost"]
    assert signals[0]["detail"] == {"since": "2026-11-24T10:00:01.000Z", "http_status": 403}
    assert signals[0]["etag"] == '"e1"'
    store.record([_error(watch, NOW + i * SEC, 403, "HTTP 403") for i in range(2, 5)])
    assert [s["event"] for s in _signals(store)] == ["access_lost", "failing"]
    store.record([_ok(watch, NOW + 6 * SEC)])
    signals = _signals(store)
    assert [s["event"] for s in signals] == ["access_lost", "failing", "recovered"]
    assert signals[-1]["detail"]["signals"] == ["access_lost", "failing"]
    assert not [r for r in store.history(changes=True, limit=None) if r["event"] == "deleted"]


def test_403_before_any_success_is_no_access_lost(store: Store):
    watch = _watch(store)
    store.record([_error(watch, NOW + SEC, 403, "HTTP 403")])
    assert _signals(store) == []


def test_alert_after_a_duration_and_off(store: Store):
    watch = _watch(store)
    store.rules = {watch.id: Rules(alert_after_errors=None, alert_after_seconds=60)}
    store.record([_error(watch, NOW + i * 10 * SEC) for i in range(6)])  # 0 .. 50 s
    assert _signals(store) == []
    store.record([_error(watch, NOW + 60 * SEC)])
    assert [s["event"] for s in _signals(store)] == ["failing"]
    other = _watch(store, "b")
    store.rules[other.id] = Rules(alert_after_errors=None)
    store.record([_error(other, NOW + i * SEC) for i in range(20)])
    assert [s["watch"] for s in _signals(store)] == ["a"]


def test_signals_are_queued_for_the_sinks_that_route_them(store: Store):
    watch = _watch(store)

    def route(name: str, event: str) -> list[str]:
        return ["ops"] if event in ("failing", "recovered") else []

    store.record([_error(watch, NOW + i * SEC) for i in range(3)], route)
    store.record([_ok(watch, NOW + 4 * SEC)], route)
    due = store.due_notifications(NOW + timedelta(minutes=1))
    assert [(d["event"], d["sink"], d["history_id"], d["watch"]) for d in due] == [
        ("failing", "ops", None, "a"),
        ("recovered", "ops", None, "a"),
    ]
    assert due[0]["event_id"] is not None and due[0]["detail"]["consecutive_errors"] == 3
    assert [r["event"] for r in store.notification_rows()] == ["recovered", "failing"]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_signal_counts_for_metrics(store: Store):
    watch = _watch(store)
    store.record([_error(watch, NOW + i * SEC) for i in range(5)])
    assert store.signal_counts == {"failing": 1}


# --- time-driven signals: SignalCheck with an injectable clock ---------------------------------


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def _change(watch: Watch, when: datetime, old: str, new: str) -> PollResult:
    before = ObjectState(old, NOW, when, None, 3, True)
    after = ObjectState(new, when, when, None, 4, True)
    return PollResult(watch, when, "modified", 200, 5.0, before, after, "modified")


def _check(store: Store, watch: Watch, rules: Rules, at: datetime) -> tuple[SignalCheck, Clock]:
    clock = Clock(at)
    check = SignalCheck(store, clock)
    check.set_watches([Watched(watch.id, watch.name, watch.key, rules)])
    return check, clock


def _first_seen_at_ten_to(store: Store, watch: Watch) -> None:
    """The object first seen at NOW, written ten minutes before (its Last-Modified is 09:50)."""
    first = PollResult(watch, NOW, "modified", 200, 5.0, None,
                       ObjectState('"e1"', NOW - timedelta(minutes=10), NOW, None, 3, True), "first_seen")  # fmt: skip
    store.record([first])


def _events(store: Store) -> list[str]:
    return [s["event"] for s in _signals(store)]


def test_stale_once_at_the_deadline_fresh_at_the_next_delivery_then_stale_again(store: Store):
    watch = _watch(store)
    _first_seen_at_ten_to(store, watch)
    rules = Rules(expect_change_within=3600)
    check, clock = _check(store, watch, rules, NOW + timedelta(minutes=49))
    assert check.run_once() == []  # due 50 min after the object's Last-Modified
    clock.now = NOW + timedelta(minutes=51)
    [stale] = check.run_once()
    assert (stale.event, stale.dedup) == ("stale", "2026-11-24T10:50:00.000Z")
    assert check.stale == 1
    clock.now += timedelta(minutes=5)
    assert check.run_once() == []  # one signal per missed deadline
    # A restarted daemon knows it is stale already.
    again, clock2 = _check(store, watch, rules, clock.now + timedelta(minutes=1))
    assert again.run_once() == [] and again.stale == 1
    store.record([_change(watch, NOW + timedelta(minutes=70), '"e1"', '"e2"')])
    clock2.now = NOW + timedelta(minutes=71)
    [fresh] = again.run_once()
    assert (fresh.event, fresh.dedup, fresh.etag) == ("fresh", "2026-11-24T10:50:00.000Z", '"e2"')
    assert again.stale == 0
    clock2.now = NOW + timedelta(minutes=131)
    assert [s.event for s in again.run_once()] == ["stale"]
    signals = _signals(store)
    assert [s["event"] for s in signals] == ["stale", "fresh", "stale"]
    assert signals[0]["detail"] == {
        "deadline": "2026-11-24T10:50:00.000Z",
        "last_change_at": "2026-11-24T09:50:00.000Z",
        "rule": "expect_change_within 1h",
    }


def test_a_daemon_taking_a_watch_over_reads_its_signals_again(store: Store):
    """Daemon B loaded its caches, then A held the watch and raised stale; B takes it back and the
    delivery comes: B must say fresh (with its start's caches it knew of no stale, and never did)."""
    watch = _watch(store)
    _first_seen_at_ten_to(store, watch)
    rules = Rules(expect_change_within=3600)
    b, clock_b = _check(store, watch, rules, NOW + timedelta(minutes=1))
    assert b.run_once() == []
    a, _clock_a = _check(store, watch, rules, NOW + timedelta(minutes=51))
    assert [s.event for s in a.run_once()] == ["stale"]
    store.record([_change(watch, NOW + timedelta(minutes=70), '"e1"', '"e2"')])
    b.taken_over([watch.id])
    clock_b.now = NOW + timedelta(minutes=71)
    assert [s.event for s in b.run_once()] == ["fresh"]
    assert _events(store) == ["stale", "fresh"]


def test_a_late_delivery_recorded_before_any_check_saw_its_deadline_is_stale_then_fresh(store: Store):
    """`poller once` from cron polls, then checks: a delivery 20 minutes late was recorded first, and
    the deadline the last check saw in force (watch_signals) was never raised. Once, whoever looks."""
    watch = _watch(store)
    _first_seen_at_ten_to(store, watch)
    rules = Rules(expect_change_within=3600)  # due at 10:50
    running, clock = _check(store, watch, rules, NOW + timedelta(minutes=40))
    assert running.run_once() == []
    store.record([_change(watch, NOW + timedelta(minutes=70), '"e1"', '"e2"')])
    once, _clock = _check(store, watch, rules, NOW + timedelta(minutes=71))
    missed = "2026-11-24T10:50:00.000Z"
    assert [(s.event, s.dedup) for s in once.run_once()] == [("stale", missed), ("fresh", missed)]
    clock.now = NOW + timedelta(minutes=72)
    assert running.run_once() == []  # the same deadline: refused by the database
    again, _clock = _check(store, watch, rules, NOW + timedelta(minutes=73))
    assert again.run_once() == []
    # On time (the next delivery within the hour): nothing.
    store.record([_change(watch, NOW + timedelta(minutes=100), '"e2"', '"e3"')])
    clock.now = NOW + timedelta(minutes=101)
    assert running.run_once() == []
    assert _events(store) == ["stale", "fresh"]


def test_no_late_stale_is_invented_from_deliveries_between_two_checks_or_changed_rules(store: Store):
    """Two deliveries between checks, the first in time: the deadline was met. And a check under other
    rules than those that set the stored deadline judges nothing by them."""
    watch = _watch(store)
    _first_seen_at_ten_to(store, watch)
    rules = Rules(expect_change_within=3600)  # due at 10:50
    check, clock = _check(store, watch, rules, NOW + timedelta(minutes=40))
    assert check.run_once() == []
    store.record([_change(watch, NOW + timedelta(minutes=45), '"e1"', '"e2"')])  # in time
    store.record([_change(watch, NOW + timedelta(minutes=55), '"e2"', '"e3"')])  # after 10:50: fine
    clock.now = NOW + timedelta(minutes=56)
    assert check.run_once() == []
    # The stored deadline is now 11:55; a stricter rule (due 30 minutes after) does not re-judge it.
    store.record([_change(watch, NOW + timedelta(minutes=180), '"e3"', '"e4"')])
    stricter, _clock = _check(store, watch, Rules(expect_change_within=1800), NOW + timedelta(minutes=181))
    assert [s.event for s in stricter.run_once()] == []
    assert _events(store) == []


def test_a_daemon_started_after_the_deadline_raises_it_once(store: Store):
    watch = _watch(store)
    store.record([_ok(watch, NOW, first=True)])
    rules = Rules(expect_change_by="0 7 * * *", expect_grace=1800)
    for _ in range(3):  # three restarts, days later
        check, _clock = _check(store, watch, rules, NOW + timedelta(days=3))
        check.run_once()
    signals = _signals(store)
    assert [s["event"] for s in signals] == ["stale"]
    # The first sighting's Last-Modified is NOW (10:00): due the next day at 07:00 + 30 min.
    assert signals[0]["dedup"] == "2026-11-25T07:30:00.000Z"
    assert signals[0]["detail"]["rule"] == "expect_change_by 0 7 * * * (grace 30m)"


def test_a_watch_that_never_saw_its_object_is_due_from_when_it_was_added(store: Store):
    watch = _watch(store)  # created at NOW, never polled successfully
    store.record([PollResult(watch, NOW, "missing", 404, 5.0, None, ObjectState(present=False), None)])
    check, _clock = _check(store, watch, Rules(expect_change_within=600), NOW + timedelta(minutes=11))
    [stale] = check.run_once()
    assert stale.dedup == "2026-11-24T10:10:00.000Z"


def test_settled_after_a_confirming_poll_with_the_keys_of_the_burst(store: Store):
    watch = _watch(store)
    store.record([_ok(watch, NOW, first=True)])
    check, clock = _check(store, watch, Rules(settle=300), NOW + timedelta(minutes=10))
    assert check.run_once() == [] and check.settling == 0  # a first sighting is no burst
    t1, t2 = NOW + timedelta(minutes=11), NOW + timedelta(minutes=12)
    store.record([_change(watch, t1, '"e1"', '"e2"'), _change(watch, t2, '"e2"', '"e3"')])
    unchanged = ObjectState('"e3"', t2, t2, None, 4, True)

    def poll(at: datetime) -> None:
        store.record([PollResult(watch, at, "unchanged", 304, 5.0, unchanged, unchanged, None)])

    poll(t2 + timedelta(seconds=200))
    clock.now = t2 + timedelta(seconds=400)  # the time has passed, but no poll has confirmed it yet
    assert check.run_once() == [] and check.settling == 1
    store.record([_error(watch, t2 + timedelta(seconds=420))])
    assert check.run_once() == []  # a failed poll confirms nothing
    poll(t2 + timedelta(seconds=480))
    [settled] = check.run_once()
    assert settled.event == "settled" and check.settling == 0
    detail = _signals(store)[-1]["detail"]
    assert detail["keys"] == ["key/a"] and detail["changes"] == 2
    assert detail["burst_started_at"] == "2026-11-24T10:11:00.000Z"
    assert detail["last_change_at"] == "2026-11-24T10:12:00.000Z"
    clock.now += timedelta(minutes=10)
    poll(clock.now)
    assert check.run_once() == []
    # A restart does not settle the same burst again; the next burst settles with its own keys.
    again, clock2 = _check(store, watch, Rules(settle=300), clock.now)
    assert again.run_once() == []
    t3 = clock.now + timedelta(minutes=1)
    store.record([_change(watch, t3, '"e3"', '"e4"')])
    after = ObjectState('"e4"', t3, t3, None, 4, True)
    store.record([PollResult(watch, t3 + timedelta(minutes=6), "unchanged", 304, 5.0, after, after, None)])
    clock2.now = t3 + timedelta(minutes=7)
    [second] = again.run_once()
    assert second.event == "settled" and _signals(store)[-1]["detail"]["changes"] == 1
    assert _events(store) == ["settled", "settled"]


def test_watches_without_rules_are_not_checked(store: Store):
    watch = _watch(store)
    check, _clock = _check(store, watch, Rules(), NOW + timedelta(days=30))
    assert check.watched == {} and check.run_once() == []


# --- end to end: the daemon against the S3 server -------------------------------------------


def _watch_events(db: Path, watch: str) -> list[tuple[str, str | None, str | None]]:
    sql = (
        "SELECT e.event, e.detail, e.error FROM watch_events e JOIN watches w ON w.id = e.watch_id "
        "WHERE w.name = ? ORDER BY e.id"
    )
    try:
        return [tuple(r) for r in query(db, sql, watch)]  # type: ignore[misc]
    except sqlite3.OperationalError:
        return []


def _kinds(db: Path, watch: str) -> list[str]:
    return [e[0] for e in _watch_events(db, watch)]


def test_daemon_raises_stale_fresh_settled_failing_recovered(config: ConfigFile, s3, bucket, start_daemon):
    s3.put_object(Bucket=bucket, Key="feed.csv", Body=b"v1")
    s3.put_object(Bucket=bucket, Key="drop/a", Body=b"a1")
    missing_bucket = f"{bucket}-later"
    config.write(
        [
            {"name": "feed", "bucket": bucket, "key": "feed.csv", "settle": "2s", "expect_change_within": "4s"},
            {"name": "parts", "bucket": bucket, "prefix": "drop/", "settle": "2s"},
            {"name": "gone", "bucket": missing_bucket, "key": "x", "alert_after": 2},
        ],
        metrics={"listen": f"127.0.0.1:{free_port()}"},
    )
    daemon = start_daemon(config)
    daemon.notify.wait("READY=1")
    wait_for(lambda: _kinds(config.db, "gone") == ["failing"], what="failing after two errors")
    wait_for(lambda: _kinds(config.db, "feed")[:1] == ["stale"], what="stale 4 s after the object's Last-Modified")
    assert "stale" not in _kinds(config.db, "parts")  # no deadline set there
    metrics = _scrape(config)
    assert metrics["poller_failing_watches"] == 1 and metrics["poller_stale_watches"] == 1
    status = run_cli("status", "--format", "json", "--config", str(config.path))
    assert status.returncode == 0, status.stderr
    by_name = {row["name"]: row for row in json.loads(status.stdout)}
    assert by_name["gone"]["signals"] == "failing" and by_name["gone"]["deadline"] is None
    assert by_name["feed"]["signals"].startswith("stale") and by_name["feed"]["deadline"].endswith("Z")
    assert by_name["parts"]["signals"] == ""
    s3.put_object(Bucket=bucket, Key="feed.csv", Body=b"v2")
    # The next deadline (4 s after v2) may pass before the quiet period is confirmed: a second stale
    # may come between them.
    wait_for(
        lambda: [k for k in _kinds(config.db, "feed") if k != "stale"][:2] == ["fresh", "settled"],
        what="fresh, then settled",
    )
    assert _kinds(config.db, "feed")[:2] == ["stale", "fresh"]
    s3.put_object(Bucket=bucket, Key="drop/b", Body=b"b1")
    s3.put_object(Bucket=bucket, Key="drop/c", Body=b"c1")
    wait_for(lambda: "settled" in _kinds(config.db, "parts"), what="the prefix settled")
    [(_, detail, _)] = [e for e in _watch_events(config.db, "parts") if e[0] == "settled"]
    assert json.loads(detail or "{}")["keys"] == ["drop/b", "drop/c"]
    s3.create_bucket(Bucket=missing_bucket)
    s3.put_object(Bucket=missing_bucket, Key="x", Body=b"x")
    wait_for(lambda: _kinds(config.db, "gone") == ["failing", "recovered"], what="recovered")
    wait_for(lambda: _scrape(config)["poller_failing_watches"] == 0, what="failing gauge back to 0")
    assert daemon.stop() == 0
    assert "gone failing: x" in daemon.log
    history = run_cli("history", "--changes", "--config", str(config.path))
    assert history.returncode == 0 and "recovered" in history.stdout and "settled" in history.stdout


def _scrape(config: ConfigFile) -> dict[str, float]:
    url = f"http://{config.sections['metrics']['listen']}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.labels
    }


# --- configuration --------------------------------------------------------------------------


def _config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "poller.toml"
    path.write_text(f'[database]\nurl = "sqlite:///{tmp_path}/p.db"\n' + body, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("body", "fragments"),
    [
        ('[[watch]]\nname = "w1"\nbucket = "b"\nkey = "k"\nexpect_change_by = "0 7 * *"\n',
         ["watch #1 ('w1')", "expect_change_by", "'0 7 * *'"]),
        ('[[watch]]\nname = "w1"\nbucket = "b"\nkey = "k"\nexpect_change_by = "0 7 * * *"\n'
         'expect_change_within = "1h"\n',
         ["watch #1 ('w1')", "either expect_change_within or expect_change_by"]),
        ('[[watch]]\nname = "w1"\nbucket = "b"\nkey = "k"\nsettle = "0s"\n', ["watch #1 ('w1')", "settle"]),
        ('[[watch]]\nname = "w1"\nbucket = "b"\nkey = "k"\nalert_after = "soon"\n',
         ["watch #1 ('w1')", "alert_after", "consecutive errors", "'soon'"]),
        ('[schedule]\nalert_after = 2.5\n[[watch]]\nbucket = "b"\nkey = "k"\n', ["[schedule]", "alert_after"]),
        ('[schedule]\nexpect_grace = "-1m"\n[[watch]]\nbucket = "b"\nkey = "k"\n', ["[schedule]", "expect_grace"]),
    ],
)  # fmt: skip
def test_a_wrong_signal_rule_is_a_one_paragraph_exit_2_naming_the_watch_and_field(
    tmp_path: Path, body: str, fragments: list[str]
):
    result = run_cli("check", "--config", str(_config(tmp_path, body)))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
    for fragment in fragments:
        assert fragment in result.stderr


def test_a_watchs_own_rules_replace_the_defaults(tmp_path: Path):
    from poller.config import load_settings
    from poller.watchlist import rules_from_settings

    path = _config(
        tmp_path,
        '[schedule]\nexpect_change_within = "26h"\nsettle = "5m"\nalert_after = "10m"\n'
        '[[watch]]\nname = "plain"\nbucket = "bkt"\nkey = "k"\n'
        '[[watch]]\nname = "nightly"\nbucket = "bkt"\nkey = "n"\nexpect_change_by = "0 7 * * *"\nexpect_grace = "30m"\n'
        "alert_after = 0\n"
        '[[watch]]\nname = "count"\nbucket = "bkt"\nkey = "c"\nalert_after = 5\nsettle = "1m"\n',
    )
    rules = rules_from_settings(load_settings(path))
    assert rules["plain"] == Rules(expect_change_within=26 * 3600, settle=300, alert_after_errors=None,
                                   alert_after_seconds=600)  # fmt: skip
    assert rules["nightly"] == Rules(expect_change_by="0 7 * * *", expect_grace=1800, settle=300,
                                     alert_after_errors=None)  # fmt: skip
    assert rules["count"] == Rules(expect_change_within=26 * 3600, settle=60, alert_after_errors=5)
    assert rules["plain"] is not rules["nightly"]


def test_a_reload_applies_new_signal_rules_and_a_bad_one_keeps_the_old(config: ConfigFile, bucket):
    from poller.config import load_settings
    from poller.daemon import Daemon
    from poller.sdnotify import Notifier

    config.write([{"name": "a", "bucket": bucket, "key": "k"}, {"name": "b", "bucket": bucket, "key": "k2"}])
    daemon = Daemon(config.path, load_settings(config.path), Notifier(""))
    daemon.start(paused=True)
    try:
        ids = {name: w.id for name, w in daemon.current.watches.items()}
        assert daemon.store.rules[ids["a"]] == Rules() and daemon.signals.watched == {}
        config.write(
            [
                {"name": "a", "bucket": bucket, "key": "k", "settle": "1m", "alert_after": 7},
                {"name": "b", "bucket": bucket, "key": "k2"},
            ],
            schedule={"expect_change_within": "2h"},
        )
        assert daemon.reload()
        assert daemon.store.rules[ids["a"]] == Rules(expect_change_within=7200, settle=60, alert_after_errors=7)
        assert set(daemon.signals.watched) == {ids["a"], ids["b"]}
        config.write(schedule={"expect_change_by": "not cron"})
        assert not daemon.reload()
        assert daemon.store.rules[ids["b"]] == Rules(expect_change_within=7200)
    finally:
        daemon.shutdown()


def test_every_signal_through_real_polls_of_the_s3_server_with_an_injected_clock(
    config: ConfigFile, s3, bucket, s3_endpoint
):
    """The issue's acceptance run: real polls of the S3 server (through a fault proxy for the errors
    and the 403), recorded by the real pipeline, time driven by an injected clock."""
    from faultproxy import FaultProxy

    from poller.config import load_settings
    from poller.pipeline import poll_all, prepare
    from poller.signalcheck import watched_from
    from poller.store import open_engine

    proxy = FaultProxy(int(s3_endpoint.rsplit(":", 1)[1]))
    for key in ("nightly.csv", "guarded", "drop/a"):
        s3.put_object(Bucket=bucket, Key=key, Body=b"v1")
    config.sections["s3"]["endpoint_url"] = proxy.endpoint
    config.write(
        [
            {"name": "nightly", "bucket": bucket, "key": "nightly.csv", "expect_change_within": "1h"},
            {"name": "drop", "bucket": bucket, "prefix": "drop/", "settle": "5m"},
            {"name": "guarded", "bucket": bucket, "key": "guarded"},
            {"name": "flaky", "bucket": bucket, "key": "flaky"},
        ]
    )
    settings = load_settings(config.path)
    store = Store(open_engine(config.url))
    try:
        service, _specs, synced = prepare(settings, store, log_polls=False)
        t0 = datetime.now(UTC)
        clock = Clock(t0)
        service.prober.now = clock
        watched = watched_from(synced.watches, store.rules)
        check = SignalCheck(store, clock)
        check.set_watches(watched)
        watches = list(synced.watches.values())

        def step(minutes: float) -> list[str]:
            """Poll every watch at t0 + minutes, then check: the signals raised, as 'watch event'."""
            clock.now = t0 + timedelta(minutes=minutes)
            poll_all(service, watches, 4)
            check.run_once()
            return [f"{s['watch']} {s['event']}" for s in _signals(store)]

        # 3 errors -> one failing; a success -> one recovered.
        proxy.set("error", prefix=f"/{bucket}/flaky", status=503)
        assert step(0) == [] and step(1) == []
        assert step(2) == ["flaky failing"]
        assert step(3) == ["flaky failing"]  # once per streak
        proxy.set("pass")
        assert step(4) == ["flaky failing", "flaky recovered"]  # 404: an answer, so a success
        # 403 on an object it could read -> access_lost at once, not a deletion.
        proxy.set("error", prefix=f"/{bucket}/guarded", status=403)
        assert step(5)[-1] == "guarded access_lost"
        proxy.set("pass")
        assert step(6)[-1] == "guarded recovered"
        assert not [r for r in store.history(changes=True, limit=None) if r["event"] == "deleted"]
        # The nightly file's deadline: 1 h after its Last-Modified (about t0).
        before = step(55)
        assert "nightly stale" not in before
        after = step(62)
        assert after.count("nightly stale") == 1
        # A restart after the missed deadline: still exactly one stale.
        restarted = SignalCheck(store, clock)
        restarted.set_watches(watched)
        restarted.run_once()
        assert [s["event"] for s in _signals(store) if s["watch"] == "nightly"] == ["stale"]
        # Met: the file arrives, fresh; its next deadline is an hour later, and is met in time.
        s3.put_object(Bucket=bucket, Key="nightly.csv", Body=b"v2")
        assert step(70)[-1] == "nightly fresh"
        s3.put_object(Bucket=bucket, Key="nightly.csv", Body=b"v3")
        step(120)
        assert step(125).count("nightly stale") == 1  # the second deadline (t0+180 min) is not due
        # A burst of writes to the prefix: no settled during it, exactly one after 5 quiet minutes.
        s3.put_object(Bucket=bucket, Key="drop/b", Body=b"b")
        assert "drop settled" not in step(130)
        s3.put_object(Bucket=bucket, Key="drop/c", Body=b"c")
        for minutes in (131, 133, 135.5):  # 0, 2 and 4.5 min after the last change
            assert "drop settled" not in step(minutes)
        assert step(136.5).count("drop settled") == 1
        assert step(140).count("drop settled") == 1
        [settled] = [s for s in _signals(store) if s["event"] == "settled"]
        assert settled["detail"]["keys"] == ["drop/b", "drop/c"] and settled["detail"]["changes"] == 2
        service.recorder.close()
    finally:
        store.close()
        proxy.close()
