"""Pure logic, no I/O: classification table, request conditions, durations, watch-list diff, trigger."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poller.config import format_duration, parse_duration
from poller.model import Answer, ObjectState, ProtocolError
from poller.probe import classify, request_conditions
from poller.schema import to_text
from poller.timetable import PhasedIntervalTrigger, phase_of
from poller.watchlist import WatchSpec, diff_watch_lists

T0 = datetime(2026, 11, 24, 10, 0, 3, tzinfo=UTC)
E1, E2 = '"aaa"', '"bbb"'
SEEN = ObjectState(etag=E1, last_modified=T0, observed_server_date=T0 + timedelta(seconds=30), size=3, present=True)
GONE = ObjectState(present=False, observed_server_date=T0)


# (name, stored state, answer, outcome, event, needs_full_head) -- design.md section 1, row for row.
CLASSIFICATION = [
    ("304 without ETag", SEEN, Answer(304), "unchanged", None, False),
    ("304 with equal ETag", SEEN, Answer(304, etag=E1), "unchanged", None, False),
    ("304 with another ETag (same-second overwrite)", SEEN, Answer(304, etag=E2), "modified", "modified", True),
    ("200 with equal ETag (condition ignored)", SEEN, Answer(200, etag=E1, last_modified=T0), "unchanged", None, False),
    ("200 with no stored state", None, Answer(200, etag=E1, last_modified=T0), "modified", "first_seen", False),
    ("200 with another ETag", SEEN, Answer(200, etag=E2, last_modified=T0), "modified", "modified", False),
    ("200 after a stored 404", GONE, Answer(200, etag=E2, last_modified=T0), "modified", "created", False),
    ("404, object was present", SEEN, Answer(404), "missing", "deleted", False),
    ("404, object already absent", GONE, Answer(404), "missing", None, False),
    ("404, never seen", None, Answer(404), "missing", None, False),
]


@pytest.mark.parametrize(
    ("state", "answer", "outcome", "event", "full"), [c[1:] for c in CLASSIFICATION], ids=[c[0] for c in CLASSIFICATION]
)
def test_classification_table(state, answer, outcome, event, full):
    verdict = classify(state, answer)
    assert (verdict.outcome, verdict.event, verdict.needs_full_head) == (outcome, event, full)


def test_304_keeps_stored_values_and_advances_the_confirming_date():
    later = T0 + timedelta(minutes=5)
    verdict = classify(SEEN, Answer(304, server_date=later))
    assert verdict.state.etag == E1 and verdict.state.last_modified == T0
    assert verdict.state.observed_server_date == later
    # Every other field is carried over, including any added to ObjectState later.
    from dataclasses import replace

    versioned = replace(SEEN, version_id="v1")
    assert classify(versioned, Answer(304, server_date=later)).state == replace(versioned, observed_server_date=later)


def test_200_with_new_state_records_metadata():
    answer = Answer(200, etag=E2, last_modified=T0, server_date=T0, version_id="v2", size=9)
    state = classify(SEEN, answer).state
    assert state == ObjectState(E2, T0, T0, "v2", 9, True)


def test_304_to_an_unconditional_request_is_rejected():
    with pytest.raises(ValueError):
        classify(None, Answer(304))
    # A known state polled without conditions (the HEAD after a 304 with a new ETag, a risky state in
    # timestamp mode): a 304 answers nothing that was asked, and taken as an answer it would record
    # a `modified` to the ETag already stored, or miss a change.
    for answer in (Answer(304, etag=E2), Answer(304, etag=E1), Answer(304)):
        with pytest.raises(ProtocolError, match="304 Not Modified to a HEAD without conditions"):
            classify(SEEN, answer, conditional=False)


@pytest.mark.parametrize("state", [None, SEEN, GONE], ids=["never seen", "seen", "gone"])
def test_200_without_an_etag_is_an_error_not_a_change(state):
    """Recorded, it would be a `modified` to no ETag, then (the next poll unconditional) a second
    `modified` back; and without ETags a later change would read as `unchanged`."""
    with pytest.raises(ProtocolError, match="200 without an ETag"):
        classify(state, Answer(200, last_modified=T0))


def test_deleted_state_forgets_the_etag():
    assert classify(SEEN, Answer(404)).state.etag is None


@pytest.mark.parametrize(
    ("state", "mode", "expected"),
    [
        (None, "both", {}),
        (GONE, "both", {}),
        (SEEN, "both", {"IfNoneMatch": E1, "IfModifiedSince": T0}),
        (SEEN, "etag", {"IfNoneMatch": E1}),
        (SEEN, "timestamp", {"IfModifiedSince": T0}),
        # Same-second guard: Date within 2 s of Last-Modified -> the timestamp is not safe.
        (ObjectState(E1, T0, T0 + timedelta(seconds=1), present=True), "both", {"IfNoneMatch": E1}),
        (ObjectState(E1, T0, T0 + timedelta(seconds=1), present=True), "timestamp", {}),
        (ObjectState(E1, T0, None, present=True), "both", {"IfNoneMatch": E1}),
        (
            ObjectState(E1, T0, T0 + timedelta(seconds=2), present=True),
            "both",
            {"IfNoneMatch": E1, "IfModifiedSince": T0},
        ),
    ],
)
def test_request_conditions(state, mode, expected):
    assert request_conditions(state, mode) == expected


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30),
        ("5m", 300),
        ("1h", 3600),
        ("1d", 86400),
        ("1h30m", 5400),
        ("250ms", 0.25),
        (15, 15),
        ("2.5s", 2.5),
        ("60", 60),
    ],  # as an environment variable gives it: seconds, as `interval = 60` in TOML
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "-5", "-5s", "5 s", "5x", "s", "1e999s", True, None, [1]])
def test_parse_duration_rejects(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def test_format_duration_round_trips():
    for seconds in (1, 59, 60, 90, 3600, 86400 + 61):
        assert parse_duration(format_duration(seconds)) == seconds


def spec(name, bucket="b", key="k", interval=60.0, cron=None):
    return WatchSpec(name, bucket, key, interval, cron)


def test_diff_watch_lists():
    old = {n: spec(n) for n in ("keep", "gone", "slower", "moved")}
    new = {
        "keep": spec("keep"),
        "slower": spec("slower", interval=120.0),
        "moved": spec("moved", key="k2"),
        "fresh": spec("fresh"),
    }
    diff = diff_watch_lists(old, new)
    assert diff.added == ["fresh"]
    assert diff.removed == ["gone"]
    assert diff.rescheduled == ["slower"]
    assert diff.retargeted == ["moved"]
    assert diff_watch_lists(new, dict(new)).empty


def test_phase_is_stable_and_spread():
    phases = [phase_of(f"watch-{i}", 60.0) for i in range(1000)]
    assert phases == [phase_of(f"watch-{i}", 60.0) for i in range(1000)]
    assert all(0 <= p < 60 for p in phases)
    # Spread over the interval, not bunched at the start.
    assert len({int(p) for p in phases}) == 60


def test_jitter_never_accumulates():
    trigger = PhasedIntervalTrigger(60.0, phase=7.0, jitter=10.0)
    now = datetime(2026, 11, 24, tzinfo=UTC)
    fire = trigger.get_next_fire_time(None, now)
    first = fire
    for _ in range(1000):
        fire = trigger.get_next_fire_time(fire, fire)
    drift = (fire - first).total_seconds() - 1000 * 60
    assert -10 <= drift <= 10
    assert (first - now).total_seconds() < 60 + 10


def test_trigger_without_jitter_is_on_grid():
    trigger = PhasedIntervalTrigger(30.0, phase=3.0)
    now = datetime(2026, 11, 24, 0, 0, 4, tzinfo=UTC)
    fire = trigger.get_next_fire_time(None, now)
    assert fire == datetime(2026, 11, 24, 0, 0, 33, tzinfo=UTC)
    assert trigger.get_next_fire_time(fire, fire) == fire + timedelta(seconds=30)


def test_timetable_hands_out_due_watches_in_order_and_coalesces_missed_slots():
    from poller.model import Watch
    from poller.timetable import Timetable

    skipped: list[int] = []
    table = Timetable(lambda watch, scheduled: True, skipped.append)
    start = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)
    for i, phase in enumerate([5.0, 1.0, 3.0]):
        table.add(f"w{i}", Watch(i, f"w{i}", "b", f"k{i}"), PhasedIntervalTrigger(10.0, phase), start)
    due = table._take_due((start + timedelta(seconds=4)).timestamp())
    assert [(w.name, s.second) for w, s in due] == [("w1", 1), ("w2", 3)]
    assert table.get("w1").due == start + timedelta(seconds=11)
    # At 40 s each watch runs once for its oldest due slot; the slots that passed meanwhile are skipped.
    due = table._take_due((start + timedelta(seconds=40)).timestamp())
    assert sorted(w.name for w, _ in due) == ["w0", "w1", "w2"]
    assert all(e.due > start + timedelta(seconds=40) for e in (table.get(n) for n in ("w0", "w1", "w2")))
    assert sum(skipped) == 3 + 2 + 2  # counted, not run in a late burst


def test_timetable_replace_and_remove_leave_no_stale_run():
    from poller.model import Watch
    from poller.timetable import Timetable

    table = Timetable(lambda watch, scheduled: True)
    start = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)
    table.add("a", Watch(1, "a", "b", "k"), PhasedIntervalTrigger(10.0, 1.0), start)
    table.add("a", Watch(1, "a", "b", "k"), PhasedIntervalTrigger(10.0, 6.0), start)  # rescheduled
    table.add("gone", Watch(2, "gone", "b", "k"), PhasedIntervalTrigger(10.0, 2.0), start)
    table.remove("gone")
    table.retarget("a", Watch(1, "a", "b", "elsewhere"))
    due = table._take_due((start + timedelta(seconds=9)).timestamp())
    # Once, at the slot already due (test_a_rescheduled_watch_keeps_the_slot_already_due), then the new grid.
    assert [(w.key, s.second) for w, s in due] == [("elsewhere", 1)]
    assert table.get("a").due == start + timedelta(seconds=16)  # type: ignore[union-attr]
    assert len(table) == 1


def test_a_trigger_that_fails_keeps_its_watch_in_the_timetable(caplog):
    """Popped from the heap and not pushed back, a watch would never be polled again."""
    from apscheduler.triggers.base import BaseTrigger

    from poller.model import Watch
    from poller.timetable import Timetable

    class Flaky(BaseTrigger):
        calls = 0

        def get_next_fire_time(self, previous_fire_time, now):  # type: ignore[no-untyped-def]
            Flaky.calls += 1
            if Flaky.calls > 1:
                raise OverflowError("date value out of range")
            return now

    table = Timetable(lambda watch, scheduled: True)
    start = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)
    table.add("a", Watch(1, "a", "b", "k"), Flaky(), start)
    due = table._take_due(start.timestamp() + 1)
    assert [w.name for w, _ in due] == ["a"]
    assert table.get("a").due == start + timedelta(seconds=61)  # type: ignore[union-attr]
    assert "a: its next poll time cannot be computed" in caplog.text


def test_a_rescheduled_watch_keeps_the_slot_already_due():
    """A reload that changes the jitter (or the interval) re-adds the watch: its next slot on the
    new grid may be nearly two intervals after the last poll, with no skip counted."""
    from poller.model import Watch
    from poller.timetable import Timetable

    table = Timetable(lambda watch, scheduled: True)
    start = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)
    table.add("a", Watch(1, "a", "b", "k"), PhasedIntervalTrigger(60.0, 5.0), start)
    assert table.get("a").due == start + timedelta(seconds=5)  # type: ignore[union-attr]
    table.add("a", Watch(1, "a", "b", "k"), PhasedIntervalTrigger(60.0, 50.0), start + timedelta(seconds=1))
    assert table.get("a").due == start + timedelta(seconds=5)  # type: ignore[union-attr]
    due = table._take_due((start + timedelta(seconds=5)).timestamp())
    assert [w.name for w, _ in due] == ["a"]
    assert table.get("a").due == start + timedelta(seconds=50)  # type: ignore[union-attr]  # then the new grid


def test_timetable_hands_a_due_watch_over_under_its_lock():
    """A reload holds, re-points or removes a watch under the timetable's lock: a poll taken from the
    heap before that and handed to the workers after would probe the old object with the new one's
    state (an invented first_seen). Taking and handing over happen under one hold of the lock."""
    import threading

    from poller.model import Watch
    from poller.timetable import Timetable

    locked_during_submit: list[bool] = []
    handed = threading.Event()

    def submit(watch: Watch, scheduled: datetime) -> bool:
        def try_lock() -> None:
            taken = table._cond.acquire(blocking=False)
            locked_during_submit.append(not taken)
            if taken:
                table._cond.release()

        probe = threading.Thread(target=try_lock)
        probe.start()
        probe.join()
        handed.set()
        return True

    table = Timetable(submit)
    table.add("a", Watch(1, "a", "b", "k"), PhasedIntervalTrigger(3600.0, 0.0), datetime(2026, 1, 1, tzinfo=UTC))
    table.start()
    try:
        assert handed.wait(10)
    finally:
        table.stop()
    assert locked_during_submit[0] is True


@pytest.mark.parametrize("interval", [0.2, 0.3, 0.7, 1.1, 59.9])
def test_trigger_always_advances_even_with_tiny_intervals(interval):
    # Regression: 10^9 slots after the anchor, float rounding returned the same fire time forever.
    trigger = PhasedIntervalTrigger(interval, phase=phase_of("w1", interval))
    fire = trigger.get_next_fire_time(None, datetime(2026, 11, 25, 12, 0, 0, 123456, tzinfo=UTC))
    for _ in range(20_000):
        following = trigger.get_next_fire_time(fire, fire)
        assert timedelta(seconds=interval * 0.99) < following - fire < timedelta(seconds=interval * 1.01)
        fire = following


def test_workers_never_hand_out_a_watch_whose_poll_is_not_committed():
    import queue

    from poller.model import Watch
    from poller.pipeline import Workers

    handed: queue.Queue = queue.Queue()

    class Service:  # stands in for PollService: records the "committed" callback of each poll
        def start_poll(self, watch, done, probed=None):
            handed.put((watch.name, done))

        def stop(self):
            pass

    workers = Workers(Service(), 2)  # type: ignore[arg-type]
    due = datetime.now(UTC)
    a, b = Watch(1, "a", "bkt", "k1"), Watch(2, "b", "bkt", "k2")
    try:
        assert workers.submit(a, due)
        name, committed_a = handed.get(timeout=5)
        assert name == "a"
        assert not workers.submit(a, due), "probed but not committed: the next poll would use stale state"
        assert workers.submit(b, due), "other watches are not held up"
        handed.get(timeout=5)
        committed_a()
        assert workers.submit(a, due)
        handed.get(timeout=5)
    finally:
        workers.stop()


def test_a_held_watch_is_drained_and_not_handed_out_until_released():
    """A reload that re-points a watch holds it: the poll of the old object in flight commits first."""
    import queue
    import threading

    from poller.model import Watch
    from poller.pipeline import Workers

    handed: queue.Queue = queue.Queue()

    class Service:
        def start_poll(self, watch, done, probed=None):
            handed.put((watch.name, done))

        def stop(self):
            pass

    workers = Workers(Service(), 2)  # type: ignore[arg-type]
    due = datetime.now(UTC)
    a = Watch(1, "a", "bkt", "k1")
    try:
        assert workers.submit(a, due)
        _, committed = handed.get(timeout=5)
        assert not workers.hold({1}, 0.05), "still in flight: the hold reports it"
        result: list[bool] = []
        waiter = threading.Thread(target=lambda: result.append(workers.hold({1}, 10)))
        waiter.start()
        committed()  # the old object's poll commits: the hold is then satisfied
        waiter.join(timeout=10)
        assert result == [True]
        assert not workers.submit(a, due), "held: not handed out while the reload re-points it"
        workers.release({1})
        assert workers.submit(a, due)
        handed.get(timeout=5)
    finally:
        workers.stop()


def test_http_dates_read_by_slicing_agree_with_the_email_parser():
    from email.utils import format_datetime, parsedate_to_datetime

    from poller.model import _http_date

    start = datetime(1970, 1, 1, tzinfo=UTC)
    for seconds in range(0, 5_000_000_000, 49_999_991):
        moment = start + timedelta(seconds=seconds)
        text = format_datetime(moment, usegmt=True)
        assert _http_date(text) == parsedate_to_datetime(text) == moment, text
    # Other formats, impossible dates and non-ASCII digits go to the general parser, which decides.
    assert _http_date("Sunday, 06-Nov-94 08:49:37 GMT") == datetime(1994, 11, 6, 8, 49, 37, tzinfo=UTC)
    assert _http_date("Sun Nov  6 08:49:37 1994") == datetime(1994, 11, 6, 8, 49, 37, tzinfo=UTC)
    # The answers of one second share one Date: one datetime for all the states that keep it.
    assert _http_date("Thu, 26 Nov 2026 22:00:00 GMT") is _http_date("Thu, 26 Nov 2026 22:00:00 GMT")
    assert _http_date("Thu, 01 Jan 2026 00:00:00 +0100") == datetime(2025, 12, 31, 23, tzinfo=UTC)
    assert _http_date("Tue, 31 Feb 2026 00:00:00 GMT") is None
    odd_digits = "Thu, \u0661\u0662 Jan 2026 00:00:00 GMT"
    assert _http_date(odd_digits) == parsedate_to_datetime(odd_digits)


def test_an_unquoted_head_etag_is_stored_in_the_quoted_form_the_listing_and_migration_0005_use():
    from poller.model import answer_from_headers

    # Migration 0005 quoted every stored ETag; a server that answers HEAD with bare ETags must not
    # then look changed on the first poll after the upgrade.
    stored = ObjectState('"abc"', T0, T0 + timedelta(hours=1), None, 3, True)
    answer = answer_from_headers(200, {"etag": "abc", "last-modified": "Thu, 01 Jan 2026 00:00:00 GMT"})
    assert answer.etag == '"abc"'
    assert classify(stored, answer).event is None
    assert answer_from_headers(304, {"etag": 'W/"w"'}).etag == 'W/"w"'


def test_watches_share_rules_objects_but_never_errors_with_seconds() -> None:
    from poller.config import settings_from_mapping
    from poller.watchlist import rules_from_settings

    watches = [{"bucket": "bkt", "key": f"k{i}", "alert_after": 3} for i in range(3)]
    watches += [{"bucket": "bkt", "key": "s", "alert_after": "3s"}, {"bucket": "bkt", "key": "d"}]
    rules = rules_from_settings(settings_from_mapping({"watch": watches}, "t.toml"))
    assert rules["bkt/k0"] is rules["bkt/k2"] and rules["bkt/k0"].alert_after_errors == 3
    assert rules["bkt/s"].alert_after_seconds == 3.0 and rules["bkt/s"].alert_after_errors is None
    assert rules["bkt/d"].alert_after_errors == 3  # the [schedule] default


@settings(max_examples=300, deadline=None)
@given(
    when=st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(9998, 12, 31)),
    digits=st.integers(min_value=0, max_value=9),
    offset=st.sampled_from(["Z", "+00:00", "+02:00", "-05:30", "", "+0100", "z"]),
    sep=st.sampled_from(["T", " "]),
)
def test_the_fast_timestamp_parser_reads_what_botocores_reads(
    when: datetime, digits: int, offset: str, sep: str
) -> None:
    """A prefix watch's LastModified goes through the standard library; the instant must be botocore's."""
    from botocore.utils import parse_timestamp as botocore_parse

    from poller.s3client import parse_timestamp

    text = when.strftime(f"%Y-%m-%d{sep}%H:%M:%S") + (("." + f"{when.microsecond:06d}987"[:digits]) if digits else "")
    text += offset
    try:
        expected: object = botocore_parse(text)
    except ValueError:
        expected = ValueError
    try:
        got: object = parse_timestamp(text)
    except ValueError:
        got = ValueError
    assert got == expected


@given(
    st.datetimes(
        min_value=datetime(1000, 1, 2),
        max_value=datetime(9999, 12, 30),
        timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30)), timezone(-timedelta(hours=8))]),
    )
)
def test_stored_time_text_is_isoformat_in_utc(value: datetime):
    # to_text formats the fields itself (for speed): the same text as isoformat, so stored rows
    # written before and after compare and sort alike.
    assert to_text(value) == value.astimezone(UTC).isoformat(timespec="microseconds")


def test_a_naive_time_is_refused_before_it_is_stored():
    with pytest.raises(ValueError, match="naive datetime"):
        to_text(datetime(2026, 11, 26, 12))
