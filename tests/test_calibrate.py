"""Calibration of conditional semantics (design.md section 1, rule 3).

Pure decisions first (no I/O), then the Prober against ``semserver`` (a real HTTP server that
implements each semantics), then the whole pipeline on a real SQLite file: the rollback, the
late-completing multipart and the timestamp-preserving copy are each exactly one ``modified`` event
on every semantics and both ``[s3] http_client`` values.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import ConfigFile, run_cli
from daemonproc import query
from semserver import MINUTE, SEMANTICS, T0, SemServer, semserver

from poller.calibrate import (
    ERROR_RUN,
    MAX_AGE,
    RETRY_AFTER,
    Book,
    Inconclusive,
    Measured,
    Semantics,
    choose_mode,
    describe,
    hiding_reason,
    measure,
    override_warning,
)
from poller.config import load_settings
from poller.model import Answer, ObjectState, Watch
from poller.pipeline import prepare
from poller.probe import prober_for
from poller.store import Store, open_engine

BUCKET, KEY = "cal", "dir/object.json"
EXPECTED = {  # semantics -> (precedence, etag_on_304, mode under "auto")
    "rfc": ("rfc", True, "both"),
    "either_etag": ("either", True, "both"),
    "either_noetag": ("either", False, "etag"),
    "ims_ignored": ("ims_ignored", True, "both"),
}

# --- pure: measure, choose_mode, Book ------------------------------------------------------

LM = T0
CUR = '"cur"'


def _answers(semantics: str) -> Measured:
    """What each semantics answers to the five calibration HEADs (as semserver implements them)."""

    def not_modified(inm: str | None, ims: bool) -> bool:
        match = inm == CUR
        if semantics == "rfc":
            return match if inm is not None else ims
        if semantics == "ims_ignored":
            return match
        return match or ims

    def answer(inm: str | None, ims: bool) -> Answer:
        if not_modified(inm, ims):
            return Answer(304) if semantics == "either_noetag" else Answer(304, etag=CUR, last_modified=LM)
        return Answer(200, etag=CUR, last_modified=LM)

    return Measured(
        current=Answer(200, etag=CUR, last_modified=LM),
        mismatch_and_since=answer('"other"', True),
        match=answer(CUR, False),
        since=answer(None, True),
        mismatch=answer('"other"', False),
    )


@pytest.mark.parametrize("semantics", SEMANTICS)
def test_measure_and_auto_mode_per_semantics(semantics):
    sem = measure(_answers(semantics))
    precedence, etag_on_304, mode = EXPECTED[semantics]
    assert (sem.precedence, sem.etag_on_304, choose_mode("auto", sem)) == (precedence, etag_on_304, mode)
    assert hiding_reason(choose_mode("auto", sem), sem) is None


def test_the_either_without_etag_server_is_described_as_the_log_says():
    sem = measure(_answers("either_noetag"))
    assert describe(sem, "auto") == (
        "If-Modified-Since overrides a non-matching If-None-Match (either-condition semantics), "
        "304s carry no ETag: polling with If-None-Match only"
    )


def test_overrides_are_kept_and_the_unsound_ones_warned_about():
    noetag = measure(_answers("either_noetag"))
    for setting in ("both", "etag", "timestamp"):
        assert choose_mode(setting, noetag) == setting  # an explicit setting stays an override
    assert "unsound" in (override_warning("both", noetag) or "")
    assert "rollback" in (override_warning("both", noetag) or "")
    assert "unsound" in (override_warning("timestamp", noetag) or "")
    assert override_warning("etag", noetag) is None
    assert override_warning("auto", noetag) is None
    for semantics in ("rfc", "either_etag", "ims_ignored"):
        sem = measure(_answers(semantics))
        assert all(override_warning(s, sem) is None for s in ("both", "etag", "timestamp")), semantics


def test_safe_mode_until_calibrated_and_broken_servers():
    assert choose_mode("auto", None) == "etag"
    assert choose_mode("both", None) == "both"
    broken = Semantics(inm_honoured=True, inm_false_304=True, ims_honoured=True, ims_overrides=True, etag_on_304=False)
    assert broken.precedence == "inm_broken" and choose_mode("auto", broken) == "none"
    ignored = Semantics(
        inm_honoured=False, inm_false_304=False, ims_honoured=True, ims_overrides=True, etag_on_304=False
    )
    assert ignored.precedence == "inm_ignored" and choose_mode("auto", ignored) == "etag"


def test_an_object_that_changes_during_calibration_is_inconclusive():
    honest = _answers("rfc")
    changed = Measured(
        honest.current,
        Answer(200, etag='"newer"', last_modified=LM + MINUTE),
        honest.match,
        honest.since,
        honest.mismatch,
    )
    with pytest.raises(Inconclusive):
        measure(changed)
    with pytest.raises(Inconclusive):
        measure(Measured(Answer(404), honest.mismatch_and_since, honest.match, honest.since, honest.mismatch))


def test_book_claims_once_retries_relearns_and_drops_after_an_error_run():
    now = [1000.0]
    book = Book(clock=lambda: now[0])
    sem = measure(_answers("either_noetag"))
    assert book.claim("b") and not book.claim("b")  # one measurement at a time
    book.failed("b")
    assert not book.claim("b")
    now[0] += RETRY_AFTER
    assert book.claim("b")
    assert book.learned("b", sem) and book.semantics("b") == sem
    assert not book.claim("b")
    book.relearn()  # a reload: measured again, and the known answer stays in use meanwhile
    assert book.semantics("b") == sem and book.claim("b")
    assert not book.learned("b", sem)  # unchanged
    now[0] += MAX_AGE
    assert book.claim("b")
    book.learned("b", sem)
    for _ in range(ERROR_RUN - 1):
        assert not book.polled(False)
    assert book.polled(True) is False and book.semantics("b") == sem  # a success ends the run
    for _ in range(ERROR_RUN - 1):
        book.polled(False)
    assert book.polled(False) and book.semantics("b") is None and book.claim("b")


# --- the Prober against each semantics over HTTP ------------------------------------------------


@pytest.fixture(params=["lean", "boto3"])
def http_client(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=SEMANTICS)
def server(request: pytest.FixtureRequest) -> Iterator[SemServer]:
    with semserver(request.param) as s:
        yield s


def _prober(server: SemServer, http_client: str, conditional: str = "auto") -> Any:
    from poller.config import S3Settings

    settings = S3Settings(
        endpoint_url=server.endpoint,
        addressing_style="path",
        http_client=http_client,
        conditional=conditional,
        max_attempts=1,
        connect_timeout=2,
        read_timeout=3,
    )
    return prober_for(settings, concurrency=2)


def test_calibration_is_read_only_and_learns_each_semantics(server, http_client):
    server.put(BUCKET, KEY, '"v1"', T0)
    prober = _prober(server, http_client)
    watch = Watch(1, "w", BUCKET, KEY)
    first = prober.probe(watch, None)
    assert first.event == "first_seen" and prober.book.semantics(BUCKET) is None  # nothing to condition on yet
    assert prober.mode_for(BUCKET) == "etag"  # safe until calibrated
    before = len(server.requests)
    again = prober.probe(watch, first.state)
    assert again.outcome == "unchanged"
    sem = prober.book.semantics(BUCKET)
    precedence, etag_on_304, mode = EXPECTED[server.semantics]
    assert (sem.precedence, sem.etag_on_304, prober.mode_for(BUCKET)) == (precedence, etag_on_304, mode)
    methods = {m for m, _, _ in server.requests[before:]}
    assert methods == {"HEAD"} and len(server.requests) - before == 9  # 8 calibration HEADs + the poll
    # Calibrated once: the next poll is one request.
    before = len(server.requests)
    prober.probe(watch, again.state)
    assert len(server.requests) - before == 1


def test_relearned_on_reload_when_the_server_changed(http_client):
    with semserver("rfc") as server:
        server.put(BUCKET, KEY, '"v1"', T0)
        prober = _prober(server, http_client)
        watch = Watch(1, "w", BUCKET, KEY)
        state = prober.probe(watch, None).state
        prober.probe(watch, state)
        assert prober.mode_for(BUCKET) == "both"
        server.semantics = "either_noetag"  # e.g. the endpoint now fronts another implementation
        prober.relearn()
        prober.probe(watch, state)
        assert prober.book.semantics(BUCKET).precedence == "either" and prober.mode_for(BUCKET) == "etag"


# --- end to end: the real pipeline on a real SQLite file ----------------------------------------


class Pipeline:
    """What `poller once`/`run` build (prepare: store, prober, writer thread), polling one watch."""

    def __init__(self, tmp_path: Path, server: SemServer, http_client: str, conditional: str = "auto") -> None:
        self.config = ConfigFile(tmp_path / "poller.toml", server.endpoint)
        self.config.write(
            [{"name": "w", "bucket": BUCKET, "key": KEY}],
            s3={"http_client": http_client, "conditional": conditional, "max_attempts": 1},
        )
        self.store = Store(open_engine(self.config.url))
        self.service, _, synced = prepare(load_settings(self.config.path), self.store, log_polls=False)
        self.watch = synced.watches["w"]

    def poll(self) -> Any:
        result = self.service.poll(self.watch)
        assert result is not None
        return result

    def events(self) -> list[tuple[str, str | None, str | None]]:
        rows = reversed(self.store.history(changes=True, limit=None))
        return [(r["event"], r["previous_etag"], r["etag"]) for r in rows]

    def close(self) -> None:
        self.service.recorder.close()
        self.store.close()


@pytest.fixture
def pipeline(tmp_path: Path, http_client: str) -> Iterator[Any]:
    made: list[Pipeline] = []

    def make(server: SemServer, conditional: str = "auto") -> Pipeline:
        made.append(Pipeline(tmp_path, server, http_client, conditional))
        return made[-1]

    yield make
    for p in made:
        p.close()


SCENARIOS = {
    # name: the new current version (ETag, Last-Modified) after v1 (T0) and v2 (T0 + 60 s) were seen
    "rollback": ('"v1"', T0),  # the newest version deleted: back to v1 and its older Last-Modified
    "late_multipart": ('"m-2"', T0 + MINUTE / 2),  # initiated before v2's PUT, completed after it
    "copy_keeping_timestamp": ('"c1"', T0 + MINUTE),  # same Last-Modified as v2, Date long after
}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_not_later_timestamp_is_exactly_one_modified(server, pipeline, scenario):
    p = pipeline(server)
    server.put(BUCKET, KEY, '"v1"', T0)
    assert p.poll().event == "first_seen"
    server.put(BUCKET, KEY, '"v2"', T0 + MINUTE)
    assert p.poll().event == "modified"  # this poll calibrated first
    assert p.service.prober.mode_for(BUCKET) == EXPECTED[server.semantics][2]
    assert [p.poll().outcome for _ in range(2)] == ["unchanged", "unchanged"]
    etag, last_modified = SCENARIOS[scenario]
    server.put(BUCKET, KEY, etag, last_modified)
    changed = p.poll()
    assert (changed.outcome, changed.event, changed.state.etag) == ("modified", "modified", etag)
    assert [p.poll().outcome for _ in range(3)] == ["unchanged"] * 3
    assert p.events() == [("first_seen", None, '"v1"'), ("modified", '"v1"', '"v2"'), ("modified", '"v2"', etag)]


def test_same_second_overwrite_still_detected(server, pipeline):
    t1 = T0 + timedelta(hours=1)
    server.clock = lambda: t1 + timedelta(milliseconds=500)  # Date within the second of the write
    p = pipeline(server)
    server.put(BUCKET, KEY, '"s1"', t1)
    assert p.poll().event == "first_seen"
    assert p.poll().outcome == "unchanged"
    server.put(BUCKET, KEY, '"s2"', t1)  # overwritten in the same second
    assert p.poll().event == "modified"
    server.clock = lambda: t1 + timedelta(seconds=30)
    assert [p.poll().outcome for _ in range(3)] == ["unchanged"] * 3
    assert [e for e, _, _ in p.events()] == ["first_seen", "modified"]


def test_no_invented_events_on_an_unchanged_object(server, pipeline):
    p = pipeline(server)
    server.put(BUCKET, KEY, '"u1"', T0)
    outcomes = [p.poll().outcome for _ in range(6)]
    assert outcomes == ["modified"] + ["unchanged"] * 5
    assert p.events() == [("first_seen", None, '"u1"')]
    rows = p.store.server_semantics()
    assert [(r["bucket"], r["precedence"], r["mode"]) for r in rows] == [
        ("", EXPECTED[server.semantics][0], EXPECTED[server.semantics][2])
    ]


def test_explicit_both_is_warned_about_and_really_misses_on_either_without_etag(pipeline, caplog):
    """The fixture reproduces the bug: the override stays an override, and is called unsound."""
    caplog.set_level(logging.INFO, logger="poller")
    with semserver("either_noetag") as server:
        p = pipeline(server, conditional="both")
        server.put(BUCKET, KEY, '"v1"', T0)
        p.poll()
        server.put(BUCKET, KEY, '"v2"', T0 + MINUTE)
        p.poll()
        server.put(BUCKET, KEY, '"v1"', T0)  # rollback
        assert p.poll().outcome == "unchanged"  # what "both" does here: missed
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and 'conditional = "both" is unsound' in warnings[0], warnings
        assert server.endpoint in warnings[0]
        infos = [r.getMessage() for r in caplog.records if "either-condition" in r.getMessage()]
        assert len(infos) == 1  # logged once
        (row,) = p.store.server_semantics()
        assert row["mode"] == "both" and "unsound" in row["detail"]


def test_relearned_after_a_run_of_errors(pipeline, caplog):
    with semserver("rfc") as server:
        p = pipeline(server)
        server.put(BUCKET, KEY, '"v1"', T0)
        p.poll()
        server.put(BUCKET, KEY, '"v2"', T0 + MINUTE)
        p.poll()
        assert p.service.prober.mode_for(BUCKET) == "both"
        # The endpoint fails, then comes back as another implementation.
        server.fail = ERROR_RUN
        assert [p.poll().outcome for _ in range(ERROR_RUN)] == ["error"] * ERROR_RUN
        assert p.service.prober.mode_for(BUCKET) == "etag"  # safe until measured again
        server.semantics = "either_noetag"
        server.put(BUCKET, KEY, '"v1"', T0)  # rollback
        assert p.poll().event == "modified"
        assert p.service.prober.mode_for(BUCKET) == "etag"
        assert [r["precedence"] for r in p.store.server_semantics()] == ["either"]


def test_a_bucket_that_differs_gets_its_own_row(tmp_path, http_client):
    with semserver("rfc") as server:
        p = Pipeline(tmp_path, server, http_client)
        try:
            server.put(BUCKET, KEY, '"v1"', T0)
            server.put("other", KEY, '"o1"', T0)
            other = Watch(p.watch.id, "w", "other", KEY)
            state = p.service.prober.probe(p.watch, None).state
            p.service.prober.probe(p.watch, state)
            server.semantics = "either_noetag"  # a gateway routing one bucket elsewhere
            p.service.prober.probe(other, ObjectState('"o1"', T0, T0 + MINUTE, None, 1, True))
            rows = {r["bucket"]: r["precedence"] for r in p.store.server_semantics()}
            assert rows == {"": "rfc", "other": "either"}
            assert p.service.prober.mode_for("other") == "etag" and p.service.prober.mode_for(BUCKET) == "both"
        finally:
            p.close()


# --- version ids on deleted events, and what status says ----------------------------------------


@pytest.mark.parametrize("on_404", [True, False])
def test_version_id_on_404_is_learned_from_the_first_deletion(tmp_path, http_client, on_404):
    with semserver("rfc", version_id_on_404=on_404) as server:
        p = Pipeline(tmp_path, server, http_client)
        try:
            server.put(BUCKET, KEY, '"v1"', T0, version_id="ver-1")
            p.poll()
            p.poll()
            server.delete(BUCKET, KEY, marker="marker-1")
            gone = p.poll()
            assert gone.event == "deleted" and gone.state.version_id == ("marker-1" if on_404 else None)
            (row,) = p.store.server_semantics()
            assert row["version_id_on_404"] is on_404 and row["precedence"] == "rfc"
        finally:
            p.close()
        status = run_cli("status", "--config", str(p.config.path))
        assert status.returncode == 0, status.stderr
        assert server.endpoint in status.stdout
        assert "If-None-Match takes precedence" in status.stdout
        expected = "deleted events carry version ids" if on_404 else "deleted events carry NO version id"
        assert expected in status.stdout


def test_poller_once_calibrates_and_status_shows_it(tmp_path):
    """Through the real entry point: each `poller once` is a new process that measures anew."""
    with semserver("either_noetag") as server:
        config = ConfigFile(tmp_path / "poller.toml", server.endpoint)
        config.write([{"name": "w", "bucket": BUCKET, "key": KEY}], s3={"max_attempts": 1})
        versions = [('"v1"', T0), ('"v2"', T0 + MINUTE), ('"v1"', T0), ('"v1"', T0)]
        lines = []
        for etag, last_modified in versions:
            server.put(BUCKET, KEY, etag, last_modified)
            proc = run_cli("once", "--config", str(config.path))
            assert proc.returncode == 0, proc.stderr
            lines.append(proc.stdout)
        assert "first seen" in lines[0] and " modified " in lines[1] and " modified " in lines[2]
        assert "unchanged" in lines[3]
        status = run_cli("status", "--config", str(config.path))
        assert status.returncode == 0, status.stderr
        assert (
            "If-Modified-Since overrides a non-matching If-None-Match (either-condition semantics), "
            "304s carry no ETag: polling with If-None-Match only"
        ) in status.stdout
        store = Store(open_engine(config.url, readonly=True))
        try:
            events = [r["event"] for r in reversed(store.history(changes=True, limit=None))]
        finally:
            store.close()
        assert events == ["first_seen", "modified", "modified"]


def test_learned_at_is_timezone_aware(tmp_path, http_client):
    with semserver("rfc") as server:
        p = Pipeline(tmp_path, server, http_client)
        try:
            server.put(BUCKET, KEY, '"v1"', T0)
            p.poll()
            p.poll()
            (row,) = p.store.server_semantics()
            assert isinstance(row["learned_at"], datetime) and row["learned_at"].utcoffset() == timedelta(0)
        finally:
            p.close()


def test_a_daemon_reload_measures_again(tmp_path, http_client):
    """SIGHUP's reload(): with [s3] unchanged the prober measures again; with [s3] changed a new one learns."""
    from poller.daemon import Daemon
    from poller.sdnotify import Notifier

    with semserver("rfc") as server:
        config = ConfigFile(tmp_path / "poller.toml", server.endpoint)
        config.write([{"name": "w", "bucket": BUCKET, "key": KEY}], s3={"http_client": http_client, "max_attempts": 1})
        server.put(BUCKET, KEY, '"v1"', T0)
        daemon = Daemon(config.path, load_settings(config.path), Notifier(""))
        daemon.start(paused=True)
        try:
            watch = daemon.current.watches["w"]
            daemon.service.poll(watch)
            daemon.service.poll(watch)
            assert daemon.service.prober.mode_for(BUCKET) == "both"
            server.semantics = "either_noetag"
            assert daemon.reload()
            server.put(BUCKET, KEY, '"v0"', T0 - MINUTE)  # an older version restored
            assert daemon.service.poll(watch).event == "modified"
            assert daemon.service.prober.mode_for(BUCKET) == "etag"
            server.semantics = "rfc"
            config.write(s3={"read_timeout": "4s"})  # [s3] changed: a new prober, still recording
            assert daemon.reload()
            daemon.service.poll(watch)
            assert daemon.service.prober.mode_for(BUCKET) == "both"
            assert [r["precedence"] for r in daemon.store.server_semantics()] == ["rfc"]
        finally:
            daemon.shutdown()
        events = query(config.db, "SELECT event FROM etag_history ORDER BY id")
        assert [e for (e,) in events] == ["first_seen", "modified"]


def test_since_is_a_second_after_last_modified_once_that_is_past():
    from poller.calibrate import since_for

    old = Answer(200, etag=CUR, last_modified=LM, server_date=LM + timedelta(hours=1))
    assert since_for(old) == LM + timedelta(seconds=1)
    fresh = Answer(200, etag=CUR, last_modified=LM, server_date=LM + timedelta(milliseconds=900))
    assert since_for(fresh) == LM  # a second later could be "in the future" for another node
    carried = Semantics(
        inm_honoured=False, inm_false_304=False, ims_honoured=True, ims_overrides=True, etag_on_304=True
    )
    assert carried.precedence == "inm_ignored" and choose_mode("auto", carried) == "both"


def test_a_server_that_counts_an_equal_date_as_modified_is_still_caught(pipeline):
    """Off by one: If-Modified-Since equal to Last-Modified answers 200, an older Last-Modified 304."""
    with semserver("either_noetag", strict_since=True) as server:
        p = pipeline(server)
        server.put(BUCKET, KEY, '"v1"', T0)
        p.poll()
        server.put(BUCKET, KEY, '"v2"', T0 + MINUTE)
        p.poll()
        assert p.service.prober.book.semantics(BUCKET).precedence == "either"
        server.put(BUCKET, KEY, '"v1"', T0)  # rollback to an older Last-Modified
        assert p.poll().event == "modified"
        assert [e for e, _, _ in p.events()] == ["first_seen", "modified", "modified"]


def test_a_server_that_answers_304_only_to_the_exact_date_is_still_caught(pipeline):
    """If-Modified-Since a second later answers 200 there; the poll's own date (equal) answers 304."""
    with semserver("either_noetag", exact_since=True) as server:
        p = pipeline(server)
        server.put(BUCKET, KEY, '"v1"', T0)
        p.poll()
        server.put(BUCKET, KEY, '"v2"', T0 + MINUTE)
        p.poll()
        assert p.service.prober.book.semantics(BUCKET).precedence == "either"
        assert p.service.prober.mode_for(BUCKET) == "etag"
        server.put(BUCKET, KEY, '"c1"', T0 + MINUTE)  # a copy that keeps the Last-Modified
        assert p.poll().event == "modified"
        assert [e for e, _, _ in p.events()] == ["first_seen", "modified", "modified"]


def test_an_object_written_under_2_s_ago_is_not_measured_at_one_date_only(http_client):
    """Only the equal date is safe to send then, and it would make an off-by-one server look RFC-compliant."""
    with semserver("either_noetag", strict_since=True) as server:
        server.clock = lambda: T0 + timedelta(milliseconds=1500)
        server.put(BUCKET, KEY, '"v1"', T0)
        prober = _prober(server, http_client)
        watch = Watch(1, "w", BUCKET, KEY)
        state = prober.probe(watch, None).state
        before = len(server.requests)
        assert prober.probe(watch, state).outcome == "unchanged"
        assert len(server.requests) - before == 2  # the unconditional HEAD, then the poll
        assert prober.book.semantics(BUCKET) is None and prober.mode_for(BUCKET) == "etag"


def test_the_recorded_detail_of_a_key_with_a_line_break_stays_one_line(http_client):
    """`poller status` prints the detail: a crafted key must not forge a line there."""

    class Sink:
        def __init__(self) -> None:
            self.details: list[str] = []

        def save_semantics(self, endpoint, bucket, sem, mode, learned_at, detail):
            self.details.append(detail)

        def forget_semantics(self, endpoint, bucket):
            pass

        def note_version_id_on_404(self, endpoint, value, now):
            pass

    key = "dir/a\nERROR forged"
    with semserver("rfc") as server:
        server.put(BUCKET, key, '"v1"', T0)
        prober = _prober(server, http_client)
        prober.sink = sink = Sink()
        watch = Watch(1, "w", BUCKET, key)
        prober.probe(watch, prober.probe(watch, None).state)
        (detail,) = sink.details
        assert "\n" not in detail and "a\\nERROR forged" in detail


def test_the_same_bytes_written_again_during_calibration_make_it_inconclusive():
    """A rewrite keeps the ETag and moves Last-Modified: every If-Modified-Since then answers 200 and
    an either-condition server without ETags on its 304s would read as `ims_ignored` (mode "both"),
    missing a rollback for hours. Any answer's later Last-Modified, or the closing unconditional
    HEAD's, shows it (a 304 without headers cannot)."""
    either = _answers("either_noetag")
    rewritten = Answer(200, etag=CUR, last_modified=LM + MINUTE)
    with pytest.raises(Inconclusive, match="written again"):
        measure(replace(either, mismatch_and_since=rewritten, since=rewritten))
    with pytest.raises(Inconclusive, match="written again"):
        measure(replace(either, after=rewritten))
    assert measure(replace(either, after=either.current)).precedence == "either"


def test_a_rewrite_during_calibration_over_the_wire_does_not_hide_a_rollback():
    """End to end: the same bytes PUT again right after calibration's first HEAD, then the object
    rolled back to an older version with an older Last-Modified."""
    from poller.config import S3Settings

    with semserver("either_noetag") as server:
        server.put(BUCKET, KEY, '"v1"', T0)
        server.put(BUCKET, KEY, '"v2"', T0 + MINUTE)
        settings = S3Settings(endpoint_url=server.endpoint, addressing_style="path", max_attempts=1)
        prober = prober_for(settings, 2)
        watch = Watch(1, "w", BUCKET, KEY)
        state = prober.probe(watch, None).state
        answer, heads = server.answer, [0]

        def rewrite_after_first_head(method: str, path: str, headers: Any) -> Any:
            reply = answer(method, path, headers)
            if method == "HEAD" and path.count("/") >= 2:
                heads[0] += 1
                if heads[0] == 1:
                    server.put(BUCKET, KEY, '"v2"', T0 + 30 * MINUTE)
            return reply

        server.answer = rewrite_after_first_head
        result = prober.probe(watch, state)
        server.answer = answer
        assert prober.book.semantics(BUCKET) is None  # inconclusive: nothing learned
        assert prober.mode_for(BUCKET) == "etag"
        server.put(BUCKET, KEY, '"v1"', T0)  # the newest version deleted: v1 is current again
        after = prober.probe(watch, result.state or state)
        assert (after.outcome, after.state.etag if after.state else None) == ("modified", '"v1"')


@pytest.mark.parametrize("http_client", ["lean", "boto3"])
def test_a_server_without_a_date_whose_if_none_match_is_broken_is_polled_unconditionally(http_client):
    """Over the wire: no Date on any answer, and any If-None-Match answers 304 without headers. Left in
    the "etag" default (as a first version of today's no-Date rule did), every change reads
    `unchanged`; calibrated, polls go unconditional and the change is recorded."""
    from poller.config import S3Settings

    with semserver("rfc", send_date=False, broken_inm=True) as server:
        server.put(BUCKET, KEY, '"v1"', T0)
        prober = prober_for(S3Settings(endpoint_url=server.endpoint, addressing_style="path",
                                       http_client=http_client, max_attempts=1), 1)  # fmt: skip
        watch = Watch(1, "w", BUCKET, KEY)
        first = prober.probe(watch, None)
        assert first.state is not None and first.state.observed_server_date is None
        prober.probe(watch, first.state)  # calibrates
        assert prober.mode_for(BUCKET) == "none"
        server.put(BUCKET, KEY, '"v2"', T0 + MINUTE)
        changed = prober.probe(watch, first.state)
        assert (changed.event, changed.state.etag if changed.state else None) == ("modified", '"v2"')


def test_a_server_without_a_date_is_still_calibrated_where_that_is_sound():
    """No Date on the answers: If-Modified-Since can only be asked at the object's own date. A server
    whose non-matching If-None-Match answers 304 without an ETag must still be learned (polls go
    unconditional), or the safe default ("etag") misses every change; a result that would send the
    timestamp with nothing to cross-check is not trusted."""
    import types

    from poller.probe import Prober

    class NoDate:
        etag = '"v1"'
        broken = True

        def head(self, conditions: dict[str, Any]) -> Answer:
            if not conditions:
                return Answer(200, etag=self.etag, last_modified=LM, server_date=None, size=1)
            if self.broken or conditions.get("IfNoneMatch") == self.etag:
                return Answer(304)
            return Answer(200, etag=self.etag, last_modified=LM, server_date=None, size=1)

    server = NoDate()
    client = types.SimpleNamespace(meta=types.SimpleNamespace(endpoint_url="http://s3.local"))
    prober = Prober(client, "auto")  # type: ignore[arg-type]
    prober._head = lambda watch, conditions, fresh=False: server.head(conditions)  # type: ignore[method-assign]
    watch = Watch(1, "w", "b", "k")
    first = prober.probe(watch, None)
    prober.probe(watch, first.state)  # calibrates
    assert prober.mode_for("b") == "none"
    server.etag = '"v2"'
    assert prober.probe(watch, first.state).event == "modified"
    # An RFC-looking server without ETags on its 304s and no Date: not trusted with the timestamp.
    server.broken, server.etag = False, '"v1"'
    prober = Prober(client, "auto")  # type: ignore[arg-type]
    prober._head = lambda watch, conditions, fresh=False: server.head(conditions)  # type: ignore[method-assign]
    first = prober.probe(watch, None)
    prober.probe(watch, first.state)
    assert prober.book.semantics("b") is None and prober.mode_for("b") == "etag"
    assert not prober.book.claim("b")  # not measured again within the minute: such a server stays so
