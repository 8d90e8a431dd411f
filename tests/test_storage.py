"""The run-length poll log (poller.runs, Store.record, migration 0007) on every backend."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from conftest import wait_for
from sqlalchemy import Engine, event, text

from poller.model import ObjectState, PollResult, Watch
from poller.runs import Poll, from_ms, segments, to_ms
from poller.store import Store, migrate, migrations_dir, open_engine
from poller.watchlist import WatchSpec
from poller.writeturns import WriteTurns

NOW = datetime(2026, 11, 24, 10, 0, 0, 123000, tzinfo=UTC)
A = (0, 304, '"a"', None, None)
B = (1, 200, '"b"', None, None)


def watch_of(store: Store, name: str = "w", key: str = "k") -> Watch:
    return store.sync_watches([WatchSpec(name, "bucket", key, 60.0, None)], NOW).watches[name]


def poll(watch: Watch, at: datetime, outcome: str = "unchanged", etag: str = '"e1"', error: str | None = None,
         ms: float = 2.0) -> PollResult:  # fmt: skip
    """A poll of a key whose stored state is ``etag`` (a change for "modified")."""
    state = ObjectState(etag, NOW, at, None, 10, True)
    if outcome == "error":
        return PollResult(watch, at, "error", 503, ms, state, None, None, error or "HTTP 503")
    if outcome == "modified":
        return PollResult(watch, at, "modified", 200, ms, None, state, "first_seen", None)
    return PollResult(watch, at, "unchanged", 304, ms, state, state, None, None)


def runs(store: Store) -> list[tuple[Any, ...]]:
    """(outcome, count, first, last, error) of every run, oldest first, through the `polls` view."""
    with store.engine.connect() as conn:
        rows = conn.execute(
            text("SELECT outcome, count, first_polled_at, polled_at, error FROM polls ORDER BY first_polled_at, id")
        ).all()
    return [(r[0], r[1], _time(r[2]), _time(r[3]), r[4]) for r in rows]


def _time(value: Any) -> datetime:
    return value.astimezone(UTC) if isinstance(value, datetime) else datetime.fromisoformat(value)


def at(seconds: float) -> datetime:
    return NOW + timedelta(seconds=seconds)


# --- pure folding ---------------------------------------------------------------------------


def test_segments_fold_a_batch_per_key_in_order():
    polls = [
        Poll(1, "k", None, A, 1000, 10),
        Poll(2, "q", None, A, 1001, 30),
        Poll(1, "k", None, A, 2000, 20),
        Poll(1, "k", None, B, 3000, 5),
        Poll(1, "k", None, A, 4000, 7),
    ]
    got = [(s.watch_id, s.identity, s.count, s.first_at, s.last_at, s.may_extend, s.opens) for s in segments(polls)]
    assert got == [
        (1, A, 2, 1000, 2000, True, False),  # continues key 1's open run if that has identity A
        (2, A, 1, 1001, 1001, True, True),
        (1, B, 1, 3000, 3000, False, False),
        (1, A, 1, 4000, 4000, False, True),  # A again after B: a new run, key 1's open run afterwards
    ]
    first = segments(polls)[0]
    assert (first.duration_min, first.duration_sum, first.duration_max) == (10, 30, 20)
    assert first.samples == [(1000, 10), (2000, 20)]


def test_every_poll_of_a_large_batch_has_its_sample(store: Store):
    """Batches large enough for PostgreSQL's staged path, where the UPDATE that extends a run of one
    poll writes that poll's sample itself: each poll has exactly one sample, with its time and duration."""
    ws = [
        store.sync_watches([WatchSpec(f"w{i}", "bucket", f"k{i}", 60.0, None) for i in range(20)], NOW).watches[f"w{i}"]
        for i in range(20)
    ]
    made: list[tuple[int, int, int]] = []  # (watch id, epoch ms, duration µs) of every poll
    for b in range(4):
        batch = [
            poll(w, at(60 * b + i / 100), "modified" if b == 0 else "unchanged", ms=1 + i) for i, w in enumerate(ws)
        ]
        if b == 3:  # one key twice in a batch: a segment of two polls
            batch.append(poll(ws[0], at(60 * b + 30), ms=7.5))
        store.record(batch)
        made += [(r.watch.id, to_ms(r.polled_at), round(r.duration_ms * 1000)) for r in batch]
    with store.engine.connect() as conn:
        stored = conn.execute(
            text(
                "SELECT r.watch_id, s.polled_at, s.duration_us FROM poll_samples s JOIN poll_runs r ON r.id = s.run_id"
            )
        ).all()
    assert sorted(tuple(int(v) for v in row) for row in stored) == sorted(made)


def test_epoch_milliseconds_round_trip_and_floor():
    t = datetime(2026, 11, 24, 10, 0, 0, 123999, tzinfo=UTC)
    assert from_ms(to_ms(t)) == t.replace(microsecond=123000)
    with pytest.raises(ValueError, match="naive"):
        to_ms(datetime(2026, 1, 1))


# --- the store, on every backend -----------------------------------------------------------


def test_identical_polls_are_one_run_and_every_poll_is_counted(store: Store):
    w = watch_of(store)
    store.record([poll(w, at(0), "modified")])
    for n in range(1, 4):  # three batches of unchanged polls: one run
        store.record([poll(w, at(60 * n))])
    store.record([poll(w, at(240), "error", error="HTTP 503 SlowDown")])
    store.record([poll(w, at(300), "error", error="HTTP 503 SlowDown"), poll(w, at(330), "error", error="timeout")])
    store.record([poll(w, at(360)), poll(w, at(420))])  # recovery, then unchanged again in the same batch
    assert runs(store) == [
        ("modified", 1, at(0), at(0), None),
        ("unchanged", 3, at(60), at(180), None),
        ("error", 2, at(240), at(300), "HTTP 503 SlowDown"),
        ("error", 1, at(330), at(330), "timeout"),
        ("unchanged", 2, at(360), at(420), None),
    ]
    with store.engine.connect() as conn:
        samples = conn.execute(text("SELECT outcome, polled_at, duration_ms FROM poll_samples_view ORDER BY id")).all()
        durations = conn.execute(text("SELECT duration_ms, duration_min_ms, duration_max_ms FROM polls")).all()
    assert [(s[0], _time(s[1])) for s in samples][:3] == [
        ("modified", at(0)),
        ("unchanged", at(60)),
        ("unchanged", at(120)),
    ]
    assert len(samples) == 9 and all(float(s[2]) == 2.0 for s in samples)
    with store.engine.connect() as conn:
        # One open run per key; every other run ended at its last poll.
        assert conn.execute(text("SELECT count(*) FROM poll_runs WHERE ended_at IS NULL")).scalar() == 1
        assert conn.execute(text("SELECT count(*) FROM poll_runs WHERE ended_at <> last_at")).scalar() == 0
    assert {tuple(float(v) for v in d) for d in durations} == {(2.0, 2.0, 2.0)}
    history = store.history(limit=None)
    assert [(r["outcome"], r["count"], r["first"], r["time"]) for r in history][:2] == [
        ("unchanged", 2, at(360), at(420)),
        ("error", 1, at(330), at(330)),
    ]
    assert [r["time"] for r in store.history(since=at(300), limit=None)] == [at(420), at(330), at(300)]


def test_a_run_survives_a_new_store_and_a_stale_open_run_is_not_extended(store: Store, db_url: str):
    w = watch_of(store)
    store.record([poll(w, at(0), "modified")])
    store.record([poll(w, at(60))])
    # Another process (a restart) goes on with the same run through object_state.run_id.
    again = Store(open_engine(store.engine.url.render_as_string(hide_password=False)))
    again.record([poll(w, at(120))])
    # The open run disappears under the first store (pruned): its cached id must not be used.
    with store.engine.begin() as conn:
        conn.execute(text("DELETE FROM poll_runs WHERE outcome = 0"))
    store.record([poll(w, at(180))])
    again.close()
    assert runs(store) == [("modified", 1, at(0), at(0), None), ("unchanged", 1, at(180), at(180), None)]


def test_a_pruned_open_run_is_not_extended_under_its_reused_id(store: Store):
    """A watch polled less often than poll_retention (a monthly cron) has its open run pruned, and
    SQLite gives the next run that id again (another key's): the watch's next poll opens its own."""
    both = [WatchSpec("v", "bucket", "v", 60.0, None), WatchSpec("w", "bucket", "k", 60.0, None)]
    ws = store.sync_watches(both, NOW).watches
    store.record([poll(ws["v"], at(0), "modified")])
    store.record([poll(ws["v"], at(60))])
    store.record([poll(ws["w"], at(1), "modified")])  # the newest run, open, last polled at 1 s
    store.prune_polls(at(30))
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT run_id FROM object_state WHERE key = 'k'")).scalar() is None
    store.record([poll(ws["v"], at(120), "error")])  # a new run, under the pruned run's id on SQLite
    for writer in (store, Store(open_engine(store.engine.url.render_as_string(hide_password=False)))):
        # Through the writer's cache of open runs, then through object_state (another process).
        writer.record([poll(ws["w"], at(130 + (writer is not store)), "error")])
        if writer is not store:
            writer.close()
    with store.engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT w.name, p.count, p.ended_at IS NULL FROM poll_runs p JOIN watches w ON w.id = p.watch_id "
                "WHERE p.error IS NOT NULL ORDER BY w.name"
            )
        ).all()
    assert [tuple(r) for r in rows] == [("v", 1, True), ("w", 2, True)]


def test_a_retargeted_watch_keeps_the_old_key_on_its_runs(store: Store):
    w = watch_of(store, key="old/key")
    store.record([poll(w, at(0), "modified"), poll(w, at(60))])
    w2 = watch_of(store, key="new/key")
    store.record([poll(w2, at(120), "modified")])
    with store.engine.connect() as conn:
        keys = conn.execute(text("SELECT key, count FROM polls ORDER BY id")).all()
        stored = conn.execute(text("SELECT key FROM poll_runs ORDER BY id")).scalars().all()
    assert [tuple(k) for k in keys] == [("old/key", 1), ("old/key", 1), ("new/key", 1)]
    assert stored == ["old/key", "old/key", None]  # the watch's own key is not repeated in its rows


def test_samples_can_be_turned_off(store: Store):
    store.keep_samples = False
    w = watch_of(store)
    store.record([poll(w, at(0), "modified"), poll(w, at(60))])
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM poll_samples")).scalar() == 0
    assert [r[1] for r in runs(store)] == [1, 1]


# --- migration 0007: the per-poll table folds into runs, resumably -----------------------------


def _upgrade_to(engine: Engine, revision: str) -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    with engine.connect() as conn, conn.begin():
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def _legacy_database(url: str, watches: int, polls_each: int) -> list[tuple[Any, ...]]:
    """A database as the per-poll release left it; returns the poll rows written."""
    engine = open_engine(url)
    _upgrade_to(engine, "0006")
    pg = engine.dialect.name == "postgresql"
    rows = []
    for w in range(1, watches + 1):
        for n in range(polls_each):
            when = NOW + timedelta(seconds=60 * n)
            # An error every 50th poll, a change every 20th: runs of 19 or fewer in between.
            if n % 50 == 49:
                outcome, status, etag, error = "error", 503, f'"e{n // 20}"', "HTTP 503"
            elif n % 20 == 0:
                outcome, status, etag, error = "modified", 200, f'"e{n // 20}"', None
            else:
                outcome, status, etag, error = "unchanged", 304, f'"e{n // 20}"', None
            stamp: Any = when if pg else when.isoformat(timespec="microseconds")
            modified: Any = NOW if pg else NOW.isoformat(timespec="microseconds")
            rows.append((w, f"k/{w}", stamp, outcome, status, etag, modified, 1.5, error))
    with engine.begin() as conn:
        for w in range(1, watches + 1):
            conn.execute(
                text("INSERT INTO watches (name, bucket, key, kind, active, created_at) "
                     "VALUES (:n, 'b', :k, 'key', :yes, :t)"),
                {"n": f"w{w}", "k": f"k/{w}", "yes": True, "t": rows[0][2]},
            )  # fmt: skip
        conn.execute(
            text(
                "INSERT INTO polls (watch_id, key, polled_at, outcome, http_status, etag, last_modified, duration_ms,"
                " error) VALUES (:w, :k, :t, :o, :s, :e, :lm, :d, :err)"
            ),
            [dict(zip(("w", "k", "t", "o", "s", "e", "lm", "d", "err"), r, strict=True)) for r in rows],
        )
    engine.dispose()
    return rows


def _expected_runs(polls_each: int) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    last: tuple[str, str] | None = None
    for n in range(polls_each):
        ident = ("error", "") if n % 50 == 49 else ("modified", str(n)) if n % 20 == 0 else ("unchanged", str(n // 20))
        if last == ident and ident[0] != "modified":
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((ident[0], 1))
        last = ident
    return out


def test_migration_folds_old_poll_rows_in_chunks_and_resumes(db_url: str):
    rows = _legacy_database(db_url, watches=3, polls_each=120)
    engine = open_engine(db_url)
    migrate(engine)
    store = Store(engine)
    try:
        assert store.has_legacy_polls()

        class Killed(Exception):
            pass

        def die_after_two(done: int, total: int) -> None:
            if done >= 2 * 37:
                raise Killed

        with pytest.raises(Killed):  # a crash between chunks: what committed is whole
            store.convert_legacy_polls(die_after_two, chunk=37)
        with engine.connect() as conn:
            folded = conn.execute(text("SELECT COALESCE(sum(count), 0) FROM poll_runs")).scalar()
            left = conn.execute(text("SELECT count(*) FROM polls_legacy")).scalar()
        assert (folded, folded + left) == (74, len(rows))
        assert store.convert_legacy_polls(chunk=37) == len(rows) - 74
        assert not store.has_legacy_polls()
        got = [(r["outcome"], r["count"]) for r in reversed(store.history(watch="w2", limit=None))]
        assert got == _expected_runs(120)  # runs split by the chunks were joined again
        with engine.connect() as conn:
            assert conn.execute(text("SELECT sum(count) FROM polls")).scalar() == len(rows)
        # The daemon goes on from here: the first poll opens a new run after the converted ones.
        watch = store.sync_watches([WatchSpec("w1", "b", "k/1", 60.0, None)], NOW).watches["w1"]
        store.record([poll(watch, NOW + timedelta(days=1), etag='"e5"')])
        assert store.history(watch="w1", limit=1)[0]["count"] == 1
    finally:
        store.close()


def test_a_fold_whose_earlier_run_was_pruned_meanwhile_loses_no_poll(db_url: str):
    """The run an earlier chunk left, pruned by another process before this chunk extends it (the
    extension then changes no row): the chunk's polls make a run of their own."""
    rows = _legacy_database(db_url, watches=2, polls_each=60)
    engine = open_engine(db_url)
    migrate(engine)
    store = Store(engine)
    try:
        store._run_sql.extend_converted += " AND 1 = 0"  # every extension finds its run gone
        assert store.convert_legacy_polls(chunk=7) == len(rows)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT sum(count) FROM polls")).scalar() == len(rows)
    finally:
        store.close()


def test_kill_9_during_db_upgrade_then_the_next_run_finishes(tmp_path: Path):
    db = tmp_path / "old.db"
    rows = _legacy_database(f"sqlite:///{db}", watches=20, polls_each=2500)
    config = tmp_path / "c.toml"
    config.write_text(f'watch = []\n[database]\nurl = "sqlite:///{db}"\n')
    config.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("POLLER_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "poller", "db", "upgrade", "--config", str(config)],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    assert proc.stderr is not None
    seen = b""
    while b"converting old poll rows" not in seen or seen.count(b"\r") < 3:
        chunk = proc.stderr.read1(256)  # type: ignore[attr-defined]
        assert chunk, f"db upgrade ended before converting: {seen.decode(errors='replace')}"
        seen += chunk
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    folded = conn.execute("SELECT COALESCE(sum(count), 0) FROM poll_runs").fetchone()[0]
    left = conn.execute("SELECT count(*) FROM polls_legacy").fetchone()[0]
    conn.close()
    assert folded > 0 and left > 0 and folded + left == len(rows), (folded, left)
    again = subprocess.run(
        [sys.executable, "-m", "poller", "db", "upgrade", "--config", str(config)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert f"converted {left:,} poll rows into runs" in again.stderr
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT sum(count) FROM polls").fetchone()[0] == len(rows)
    assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'polls_legacy'").fetchone()[0] == 0
    per_watch = conn.execute(
        "SELECT outcome, count FROM polls WHERE watch_id = 7 ORDER BY first_polled_at, id"
    ).fetchall()
    conn.close()
    assert per_watch == _expected_runs(2500)


def test_db_stats(config, tmp_path: Path):
    from conftest import run_cli

    config.write([])
    store = Store(open_engine(f"sqlite:///{config.db}"))
    migrate(store.engine)
    w = watch_of(store)
    store.record([poll(w, at(0), "modified"), poll(w, at(60)), poll(w, at(120), "error"), poll(w, at(180))])
    store.close()
    out = run_cli("db", "stats", "--config", str(config.path))
    assert out.returncode == 0, out.stderr
    assert "poll_runs" in out.stdout and "etag_history" in out.stdout and "in use" in out.stdout
    as_json = run_cli("db", "stats", "--format", "json", "--config", str(config.path))
    tables = {t["table"]: t for t in __import__("json").loads(as_json.stdout)}
    assert tables["poll_runs"]["rows"] == 4 and tables["poll_runs"]["bytes"] > 0
    assert tables["poll_samples"]["rows"] == 4 and tables["etag_history"]["rows"] == 1


def test_the_daemon_folds_old_poll_rows_in_the_background(config, s3, bucket, start_daemon):
    from conftest import wait_for
    from daemonproc import poll_count, query

    rows = _legacy_database(f"sqlite:///{config.db}", watches=3, polls_each=400)
    s3.put_object(Bucket=bucket, Key="k", Body=b"v")
    config.write([{"name": "a", "bucket": bucket, "key": "k"}])
    daemon = start_daemon(config)
    daemon.notify.wait("READY=1")
    wait_for(lambda: f"converted {len(rows)} old poll rows into runs" in daemon.log, timeout=60, what="conversion")
    assert query(config.db, "SELECT sum(count) FROM polls WHERE watch_id <= 3") == [(len(rows),)]
    before = poll_count(config.db, "a")
    wait_for(lambda: poll_count(config.db, "a") > before, what="polling goes on")
    assert daemon.stop() == 0


def test_large_batches_extend_runs_like_small_ones(store: Store):
    # On PostgreSQL a batch of 8 keys or more extends its runs through a COPY-staged UPDATE.
    synced = store.sync_watches([WatchSpec(f"w{i}", "bucket", f"k{i}", 60.0, None) for i in range(20)], NOW)
    ws = [synced.watches[f"w{i}"] for i in range(20)]
    store.record([poll(w, at(0), "modified") for w in ws])
    for n in range(1, 4):
        batch = [poll(w, at(60 * n)) for w in ws]
        if n == 2:
            batch += [poll(ws[3], at(60 * n + 1), "error"), poll(ws[3], at(60 * n + 2))]  # a key twice more
        store.record(batch)
    counts: dict[str, list[tuple[str, int]]] = {}
    for row in reversed(store.history(limit=None)):
        counts.setdefault(row["watch"], []).append((row["outcome"], row["count"]))
    assert counts["w0"] == [("modified", 1), ("unchanged", 3)]
    assert counts["w3"] == [("modified", 1), ("unchanged", 2), ("error", 1), ("unchanged", 2)]
    assert all(c == [("modified", 1), ("unchanged", 3)] for name, c in counts.items() if name != "w3")


@pytest.mark.parametrize("others", [0, 10])  # 10 more keys: PostgreSQL's staged path
def test_a_cached_open_run_that_another_writer_ended_is_not_extended(store: Store, db_url: str, others: int):
    # Two writers on one database (two daemons, a shard handed over and back): each caches the open
    # runs it wrote, and a cached run the other one ended must not swallow later polls.
    names = ["w", *[f"o{i}" for i in range(others)]]
    synced = store.sync_watches([WatchSpec(n, "bucket", f"k/{n}", 60.0, None) for n in names], NOW)
    w, rest = synced.watches["w"], [synced.watches[n] for n in names[1:]]
    other = Store(open_engine(store.engine.url.render_as_string(hide_password=False)))
    try:
        store.record([poll(w, at(0), "modified"), *[poll(o, at(0), "modified") for o in rest]])
        store.record([poll(w, at(60)), *[poll(o, at(60)) for o in rest]])  # cached: w's unchanged run
        other.record([poll(w, at(120), "error"), *[poll(o, at(120)) for o in rest]])
        other.record([poll(w, at(180)), *[poll(o, at(180)) for o in rest]])  # unchanged again: a new run
        store.record([poll(w, at(240)), *[poll(o, at(240)) for o in rest]])  # extends that one
    finally:
        other.close()
    got = [(r["outcome"], r["count"], r["first"], r["time"]) for r in reversed(store.history(watch="w", limit=None))]
    assert got == [
        ("modified", 1, at(0), at(0)),
        ("unchanged", 1, at(60), at(60)),
        ("error", 1, at(120), at(120)),
        ("unchanged", 2, at(180), at(240)),
    ]


# --- write turns: pruning yields to the writer ---------------------------------------------


def _queue_background_then_foreground(turns: WriteTurns) -> list[str]:
    """While a writer holds the turn, a background and then a foreground writer queue: who goes first."""
    order: list[str] = []
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with turns.turn():
            held.set()
            release.wait(10)

    def take(name: str, background: bool) -> None:
        with turns.turn(background=background):
            order.append(name)

    threads = [threading.Thread(target=holder)]
    threads[0].start()
    assert held.wait(10)
    threads.append(threading.Thread(target=take, args=("prune", True)))
    threads[-1].start()
    wait_for(lambda: turns.waiting() == (0, 1), what="the background turn waiting")
    threads.append(threading.Thread(target=take, args=("writer", False)))
    threads[-1].start()
    wait_for(lambda: turns.waiting() == (1, 1), what="the writer waiting")
    release.set()
    for t in threads:
        t.join(10)
    return order


def test_write_turns_serve_a_waiting_writer_before_background_work():
    turns = WriteTurns()
    # Thread wake-up order varies: the writer goes first every time, though the pruner queued first.
    for _ in range(20):
        assert _queue_background_then_foreground(turns) == ["writer", "prune"]
    with turns.turn(), turns.turn():  # a transaction inside another, same thread: no deadlock
        assert turns.waiting() == (0, 0)


def test_a_prune_pass_lets_the_daemons_writer_in_before_its_next_chunk(tmp_path: Path):
    """A write of the same Store that queues while a pruning transaction holds the lock goes
    before the pruner's next chunk (without the turns, the pruner takes the lock straight back)."""
    engine = open_engine(f"sqlite:///{tmp_path / 'p.db'}")
    migrate(engine)
    store = Store(engine)
    turns = store._turns
    assert turns is not None
    watch = watch_of(store)
    store.record([poll(watch, NOW - timedelta(days=9, minutes=3000 - n), "modified", f'"e{n}"') for n in range(3000)])
    with engine.connect() as conn:
        before = conn.execute(text("SELECT count(*) FROM poll_runs")).scalar_one()
    assert before >= 3000
    in_chunk = threading.Event()
    seen: list[int] = []
    first_chunk: list[int] = []

    def hold_first_chunk(_conn: Any, cursor: Any, statement: str, *_args: Any) -> None:
        # The first pruning transaction's delete (here the stale open run's, one row).
        if statement.startswith("DELETE FROM poll_runs") and not in_chunk.is_set():
            with sqlite3.connect(tmp_path / "p.db") as reader:  # what is committed before this chunk
                first_chunk.append(reader.execute("SELECT count(*) FROM poll_runs").fetchone()[0] - cursor.rowcount)
            in_chunk.set()
            wait_for(lambda: turns.waiting() == (1, 0), what="the writer queued behind the chunk")

    event.listen(engine, "after_cursor_execute", hold_first_chunk)

    def writer() -> None:
        assert in_chunk.wait(30)
        with store._tx() as conn:
            seen.append(conn.execute(text("SELECT count(*) FROM poll_runs")).scalar_one())

    first = threading.Thread(target=writer)
    first.start()
    store.prune_polls(NOW, NOW)
    first.join(10)
    assert seen == first_chunk  # exactly the one chunk that held the lock
    with engine.connect() as conn:
        # Every run went, the open one too (its watch not polled for longer than the retention).
        assert conn.execute(text("SELECT count(*) FROM poll_runs")).scalar() == 0
    store.close()
