"""The store contract on both backends (a real SQLite file and a real PostgreSQL server): migrations,
recording, sync, pruning, history filters; SQLite's pragmas and WAL readers; the CLI and the daemon
end to end on PostgreSQL, row for row against SQLite."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from conftest import ConfigFile, run_cli, wait_for
from pgserver import PgServer
from sqlalchemy import Engine, event, select, text
from sqlalchemy.exc import IntegrityError

from poller.config import ConfigError, load_settings
from poller.daemon import Daemon
from poller.model import Filters, KeyChange, ObjectState, PollResult, PrefixState, Watch
from poller.schema import etag_history, metadata, notifications, object_state, watches
from poller.sdnotify import Notifier
from poller.store import Store, StoreError, Superseded, _DriverMany, migrate, migrations_dir, open_engine
from poller.watchlist import WatchSpec

NOW = datetime(2026, 11, 24, 10, 0, 0, tzinfo=UTC)


sqlite_only = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


def specs(*names: str) -> list[WatchSpec]:
    return [WatchSpec(n, "bucket", f"key/{n}", 60.0, None) for n in names]


def result(watch: Watch, outcome="modified", event="first_seen", etag='"e1"', when=NOW, previous=None) -> PollResult:
    state = None if outcome == "error" else ObjectState(etag, when, when, None, 3, outcome != "missing")
    return PollResult(watch, when, outcome, 200, 12.5, previous, state, event, "boom" if outcome == "error" else None)


def test_migration_matches_the_models(store: Store):
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == []


def test_migration_is_idempotent_and_versioned(store: Store):
    migrate(store.engine)
    with store.engine.connect() as conn:
        version = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
    from alembic.script import ScriptDirectory

    assert version == ScriptDirectory(str(migrations_dir())).get_current_head()


@sqlite_only
def test_sqlite_pragmas(store: Store):
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL


def test_migrations_dir_is_found():
    assert (migrations_dir() / "versions" / "0001_initial.py").is_file()


def test_record_and_read_back(store: Store, tmp_path: Path):
    watch = store.sync_watches(specs("a"), NOW).watches["a"]
    store.record([result(watch)])
    later = NOW + timedelta(minutes=1)
    store.record([result(watch, "error", None, when=later)])
    state = store.load_states()[watch.id]
    assert state.etag == '"e1"' and state.present is True  # an error leaves state untouched
    (row,) = store.status()
    assert row["consecutive_errors"] == 1 and row["last_outcome"] == "error" and row["last_error"] == "boom"
    store.record([result(watch, "unchanged", None, when=later + timedelta(minutes=1))])
    assert store.status()[0]["consecutive_errors"] == 0
    assert store.history(limit=1)[0]["time"] == later + timedelta(minutes=1)
    assert store.history(limit=None)[-1]["time"] == NOW and NOW.tzinfo is UTC


@sqlite_only
def test_sqlite_times_are_iso_text(store: Store, tmp_path: Path):
    watch = store.sync_watches(specs("a"), NOW).watches["a"]
    store.record([result(watch)])
    # Times are ISO-8601 UTC text with offset, readable with plain sqlite3.
    raw = sqlite3.connect(tmp_path / "p.db").execute("SELECT polled_at FROM polls ORDER BY id LIMIT 1").fetchone()[0]
    assert raw == "2026-11-24T10:00:00.000000+00:00"


def test_history_event_is_committed_with_its_poll(store: Store):
    watch = store.sync_watches(specs("a"), NOW).watches["a"]
    store.record([result(watch)])
    changes = store.history(changes=True)
    assert [(c["watch"], c["event"], c["etag"]) for c in changes] == [("a", "first_seen", '"e1"')]


def test_failed_batch_commits_nothing(store: Store):
    watch = store.sync_watches(specs("a"), NOW).watches["a"]
    ghost = Watch(9999, "ghost", "bucket", "k")  # violates the foreign key
    with pytest.raises(IntegrityError):
        store.record([result(watch), result(ghost)])
    assert store.history() == [] and store.history(changes=True) == []


def test_sync_deactivates_removed_and_keeps_history(store: Store):
    synced = store.sync_watches(specs("a", "b"), NOW)
    store.record([result(synced.watches["b"])])
    again = store.sync_watches(specs("a"), NOW)
    assert set(again.watches) == {"a"}
    assert [r["name"] for r in store.status()] == ["a"]
    assert len(store.history(changes=True)) == 1  # b's history stays
    back = store.sync_watches(specs("a", "b"), NOW)
    assert back.watches["b"].id == synced.watches["b"].id


def test_sync_retarget_drops_old_state(store: Store):
    watch = store.sync_watches(specs("a"), NOW).watches["a"]
    store.record([result(watch)])
    moved = store.sync_watches([WatchSpec("a", "bucket", "elsewhere", 60.0, None)], NOW)
    assert moved.retargeted == {watch.id}
    assert watch.id not in store.load_states()


def test_prune(store: Store):
    watch = store.sync_watches(specs("a"), NOW).watches["a"]
    # A new ETag each day: ten runs, one a day, each with its sample.
    for d in range(9, -1, -1):
        store.record([result(watch, etag=f'"e{d}"', when=NOW - timedelta(days=d))])
    pruned = store.prune_polls(NOW - timedelta(days=4, hours=12), NOW - timedelta(days=1, hours=12))
    assert (pruned.runs, pruned.samples, pruned.for_size) == (5, 8, 0)
    assert [r["etag"] for r in store.history(limit=None)] == [f'"e{d}"' for d in range(5)]
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM poll_samples")).scalar() == 2


def test_prune_by_size_removes_the_oldest_runs_first(store: Store):
    watch = store.sync_watches(specs("a"), NOW).watches["a"]
    store.record([result(watch, etag=f'"e{n}"', when=NOW - timedelta(minutes=3000 - n)) for n in range(3000)])
    used = store.used_bytes()
    pruned = store.prune_polls(NOW - timedelta(days=30), NOW - timedelta(days=30), max_bytes=used // 2)
    assert 0 < pruned.for_size == pruned.runs < 3000
    left = store.history(limit=None)
    # What is left is the newest runs, without a gap.
    assert [r["etag"] for r in left] == [f'"e{n}"' for n in range(2999, 2999 - len(left), -1)]
    if store.engine.dialect.name == "sqlite":  # PostgreSQL's estimate settles over passes
        assert store.used_bytes() <= used // 2


def test_prune_by_size_removes_samples_before_runs(store: Store):
    """The per-poll samples are detail, the runs the accounting: over the size, samples go first."""
    watch = store.sync_watches(specs("a"), NOW).watches["a"]
    store.record([result(watch, etag=f'"e{n}"', when=NOW - timedelta(minutes=3000 - n)) for n in range(3000)])
    pruned = store.prune_polls(NOW - timedelta(days=30), NOW - timedelta(days=30), max_bytes=store.used_bytes() - 1)
    assert pruned.runs == 0 and len(store.history(limit=None)) == 3000
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM poll_samples")).scalar() < 3000


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("it's", ["it's"]),
        ('say "hi"', ['say "hi"']),
        ("100%", ["100%"]),
        ("a_b", ["a_b"]),
        ("x' OR '1'='1", ["x' OR '1'='1"]),
        ("'; DROP TABLE polls; --", ["'; DROP TABLE polls; --"]),
        ("a*", ["a_b", "aXb"]),
        ("*%", ["100%"]),
        ("a?b", ["a_b", "aXb"]),
        ("[x]*", ["[x] bracket"]),
        ("A*", []),
    ],
)
def test_history_filter_uses_parameters(store: Store, pattern: str, expected: list[str]):
    names = ["it's", 'say "hi"', "100%", "1000", "a_b", "aXb", "x' OR '1'='1", "'; DROP TABLE polls; --", "[x] bracket"]
    synced = store.sync_watches(specs(*names), NOW)
    store.record([result(w) for w in synced.watches.values()])
    got = sorted(r["watch"] for r in store.history(watch=pattern, limit=None))
    assert got == sorted(expected)
    assert len(store.history(limit=None)) == len(names)  # nothing was dropped


def test_readonly_open_of_missing_database_says_what_to_do(tmp_path: Path):
    with pytest.raises(StoreError, match="poller db upgrade"):
        open_engine(f"sqlite:///{tmp_path / 'nope.db'}", readonly=True)


def test_missing_directory_is_reported(tmp_path: Path):
    with pytest.raises(StoreError, match="does not exist"):
        open_engine(f"sqlite:///{tmp_path / 'no' / 'dir' / 'p.db'}")


@sqlite_only
def test_reads_do_not_queue_behind_the_writer(store: Store, tmp_path: Path) -> None:
    # The notification dispatcher and `poller status` read while the writer commits batch after batch.
    writer = sqlite3.connect(tmp_path / "p.db", isolation_level=None)
    writer.execute("PRAGMA busy_timeout = 0")
    writer.execute("BEGIN IMMEDIATE")
    try:
        assert store.status() == []
        assert store.due_notifications(datetime.now(UTC)) == []
    finally:
        writer.execute("ROLLBACK")
        writer.close()


# --- PostgreSQL as a first-class store ----------------------------------------------------------


def test_plain_postgresql_url_means_psycopg3():
    # SQLAlchemy 2.0 maps postgresql:// to psycopg2, which the postgres extra does not install.
    for url in ("postgresql://u:p@localhost/db", "postgresql+psycopg://u:p@localhost/db"):
        engine = open_engine(url)
        assert engine.dialect.driver == "psycopg"
        engine.dispose()


def _insert_big_ids(store: Store, watch: Watch, big: int) -> None:
    """Move every id past 2**31: sequences on PostgreSQL, a high rowid on SQLite."""
    with store.engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            for table in ("poll_runs", "etag_history", "notifications"):
                conn.execute(text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), {big})"))
            return
        when = "2026-01-01T00:00:00.000000+00:00"
        conn.execute(
            text(
                "INSERT INTO poll_runs (id, watch_id, outcome, first_at, last_at, count, duration_min_us,"
                " duration_sum_us, duration_max_us) VALUES (:id, :w, 0, 1, 1, 1, 1, 1, 1)"
            ),
            {"id": big, "w": watch.id},
        )
        conn.execute(
            text("INSERT INTO etag_history (id, watch_id, key, detected_at, event) VALUES (:id, :w, 'k', :t, 'x')"),
            {"id": big, "w": watch.id, "t": when},
        )
        conn.execute(
            text(
                "INSERT INTO notifications (id, history_id, sink, status, created_at, queued_at, next_attempt_at,"
                " attempts) VALUES (:id, :id, 's', 'delivered', :t, :t, :t, 1)"
            ),
            {"id": big, "t": when},
        )


def test_ids_and_sizes_are_64_bit(store: Store):
    watch = store.sync_watches(specs("a"), NOW).watches["a"]
    big, size = 2**31 + 5, 3 * 2**30  # past a 32-bit id; a 3 GiB object
    _insert_big_ids(store, watch, big)
    state = ObjectState('"e1"', NOW, NOW, "v1", size, True)
    store.record([PollResult(watch, NOW, "modified", 200, 1.0, None, state, "first_seen", None)], lambda n, e: ["hook"])
    assert store.load_states()[watch.id].size == size
    (change,) = [c for c in store.history(changes=True) if c["event"] == "first_seen"]
    assert change["size"] == size
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT max(id) FROM poll_runs")).scalar() == big + 1
        assert conn.execute(text("SELECT max(id) FROM etag_history")).scalar() == big + 1
        assert conn.execute(text("SELECT max(history_id) FROM notifications")).scalar() == big + 1
    (due,) = store.due_notifications(NOW)
    assert due["history_id"] == big + 1 and due["size"] == size


def test_times_are_timestamps_on_postgresql(store: Store):
    watch = store.sync_watches(specs("a"), NOW).watches["a"]
    for h in (0, 1, 2):
        store.record([result(watch, etag=f'"e{h}"', when=NOW + timedelta(hours=h))])
    with store.engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            kinds = dict(
                conn.execute(
                    text(
                        "SELECT table_name || '.' || column_name, data_type FROM information_schema.columns"
                        " WHERE column_name IN ('polled_at', 'detected_at', 'learned_at', 'created_at')"
                        " AND table_name <> 'poll_samples'"  # epoch ms; poll_samples_view has the timestamptz"
                    )
                ).all()
            )
            assert set(kinds.values()) == {"timestamp with time zone"}, kinds
            # Compares and does arithmetic as time, whatever the session's time zone.
            conn.execute(text("SET TIME ZONE 'America/New_York'"))
            n = conn.execute(text("SELECT count(*) FROM polls WHERE polled_at >= :t - interval '90 minutes'"),
                             {"t": NOW + timedelta(hours=2)}).scalar()  # fmt: skip
            assert n == 2
    # Read back as aware UTC on both backends (the session zone above does not leak into results).
    assert [r["time"] for r in store.history(limit=None)] == [NOW + timedelta(hours=h) for h in (2, 1, 0)]
    assert store.history(since=NOW + timedelta(minutes=30), limit=None)[-1]["time"] == NOW + timedelta(hours=1)


def _upgrade_to(engine: Engine, revision: str) -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    with engine.connect() as conn, conn.begin():
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def test_migration_0005_converts_existing_rows(db_url: str):
    # A database written by the previous release: text times, 32-bit ids, some ETags stored bare.
    engine = open_engine(db_url)
    _upgrade_to(engine, "0004")
    t0, t1 = "2026-11-24T10:00:00.000000+00:00", "2026-11-24T11:30:00.250000+00:00"
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO watches (name, bucket, key, kind, active, created_at)"
                 " VALUES ('a', 'b', 'k', 'key', :yes, :t0)"),
            {"yes": True, "t0": t0},
        )  # fmt: skip
        conn.execute(
            text("INSERT INTO object_state (watch_id, key, etag, last_modified, size, present, consecutive_errors)"
                 " VALUES ((SELECT id FROM watches), 'k', 'abc-2', :t1, 7, :yes, 0)"),
            {"yes": True, "t1": t1},
        )  # fmt: skip
        for i, etag in enumerate(["abc-2", '"q"', 'W/"w"', None, ""]):
            conn.execute(
                text("INSERT INTO polls (watch_id, key, polled_at, outcome, etag) VALUES (1, 'k', :t, 'x', :e)"),
                {"t": t1 if i == 0 else t0, "e": etag},
            )
        conn.execute(
            text("INSERT INTO etag_history (watch_id, key, detected_at, event, etag, previous_etag, size)"
                 " VALUES (1, 'k', :t1, 'modified', 'abc-2', '\"old\"', 7)"),
            {"t1": t1},
        )  # fmt: skip
        conn.execute(
            text("INSERT INTO notifications (history_id, sink, status, created_at, queued_at, next_attempt_at,"
                 " attempts) VALUES (1, 'hook', 'pending', :t1, :t1, :t1, 0)"),
            {"t1": t1},
        )  # fmt: skip
    migrate(engine)
    store = Store(engine)
    try:
        assert store.convert_legacy_polls() == 5 and not store.has_legacy_polls()
        when = datetime(2026, 11, 24, 11, 30, 0, 250000, tzinfo=UTC)
        assert store.load_states()[1].etag == '"abc-2"' and store.load_states()[1].last_modified == when
        (change,) = store.history(changes=True)
        assert (change["etag"], change["previous_etag"], change["time"]) == ('"abc-2"', '"old"', when)
        polls_etags = [r["etag"] for r in store.history(limit=None)]
        assert sorted(polls_etags, key=str) == sorted(['"abc-2"', '"q"', 'W/"w"', None, ""], key=str)
        assert [r["time"] for r in store.history(since=when, limit=None)] == [when]
        (due,) = store.due_notifications(when)
        assert due["etag"] == '"abc-2"'
        # New rows continue after the copied ids.
        watch = store.sync_watches([WatchSpec("a", "b", "k", 60.0, None)], NOW).watches["a"]
        store.record([result(watch, when=when + timedelta(minutes=1))])
        with engine.connect() as conn:
            assert conn.execute(text("SELECT max(id) FROM poll_runs")).scalar() == 6
            diff = compare_metadata(MigrationContext.configure(conn), metadata)
        assert diff == []
    finally:
        store.close()


def test_simultaneous_migrations_of_a_fresh_database(db_url: str):
    # Several daemons (or `poller db upgrade`s) started at once: each waits its turn, none fails.
    engines = [open_engine(db_url) for _ in range(4)]
    barrier = threading.Barrier(len(engines))

    def upgrade(engine: Engine) -> None:
        barrier.wait()
        migrate(engine)

    try:
        with ThreadPoolExecutor(len(engines)) as pool:
            for future in [pool.submit(upgrade, e) for e in engines]:
                future.result()
        with engines[0].connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), metadata) == []
    finally:
        for engine in engines:
            engine.dispose()


def test_simultaneous_first_syncs_agree(db_url: str):
    engine = open_engine(db_url)
    migrate(engine)
    engine.dispose()
    stores = [Store(open_engine(db_url)) for _ in range(4)]
    barrier = threading.Barrier(len(stores))
    names = [f"w{i:03}" for i in range(300)]

    def sync(store: Store) -> dict[str, int]:
        barrier.wait()
        return {name: w.id for name, w in store.sync_watches(specs(*names), NOW).watches.items()}

    try:
        with ThreadPoolExecutor(len(stores)) as pool:
            results = [f.result() for f in [pool.submit(sync, s) for s in stores]]
        assert all(r == results[0] for r in results) and len(results[0]) == len(names)
        assert sorted(r["name"] for r in stores[0].status()) == names
    finally:
        for s in stores:
            s.close()


def test_cli_reads_either_backend(db_url: str, tmp_path: Path):
    engine = open_engine(db_url)
    migrate(engine)
    store = Store(engine)
    try:
        watch = store.sync_watches(specs("app"), NOW).watches["app"]
        store.record([result(watch)], lambda name, event: ["hook"])
        store.record([result(watch, "unchanged", None, when=NOW + timedelta(seconds=1))])
    finally:
        store.close()
    config = ConfigFile(tmp_path / "poller.toml", "http://127.0.0.1:9")
    config.write([{"name": "app", "bucket": "bucket", "key": "key/app"}], database={"url": db_url})
    out = {}
    for name, args in {
        "status": ["status"],
        "polls": ["history"],
        "changes": ["history", "--changes"],
        "notify": ["notify", "list"],
    }.items():
        proc = run_cli(*args, "--format", "json", "--config", str(config.path))
        assert proc.returncode == 0, proc.stderr
        out[name] = json.loads(proc.stdout)
    assert [(r["name"], r["last_outcome"], r["etag"]) for r in out["status"]] == [("app", "unchanged", '"e1"')]
    assert [r["outcome"] for r in out["polls"]] == ["unchanged", "modified"]
    assert [(r["event"], r["etag"]) for r in out["changes"]] == [("first_seen", '"e1"')]
    assert [(r["sink"], r["status"], r["event"]) for r in out["notify"]] == [("hook", "pending", "first_seen")]
    assert out["changes"][0]["time"].startswith("2026-11-24T10:00:00")


# --- end to end: `poller once` and the daemon, PostgreSQL row for row against SQLite ---------------


def _rows(url: str, since: datetime | None = None) -> dict[str, list[tuple[object, ...]]]:
    """What a user reads back, without the columns that depend on when each poll ran."""
    store = Store(open_engine(url))
    try:
        return {
            "status": sorted(
                (r["name"], r["key"], r["last_outcome"], r["etag"], r["last_modified"], r["consecutive_errors"])
                for r in store.status()
            ),
            "changes": sorted(
                (r["watch"], r["key"], r["event"], r["etag"], r["previous_etag"], r["last_modified"], r["size"])
                for r in store.history(changes=True, limit=None)
            ),
            "polls": sorted(
                (
                    (r["watch"], r["key"], r["outcome"], r["http_status"], r["etag"], r["last_modified"])
                    for r in store.history(since=since, limit=None)
                ),
                key=str,
            ),
        }
    finally:
        store.close()


def test_once_and_daemon_record_the_same_rows_on_both_backends(
    pg_server: PgServer, s3: Any, bucket: str, tmp_path: Path, s3_endpoint: str
):
    s3.put_object(Bucket=bucket, Key="a", Body=b"a1")
    s3.put_object(Bucket=bucket, Key="b", Body=b"b1")
    s3.put_object(Bucket=bucket, Key="dir/x", Body=b"x1")
    watches = [
        {"name": "a", "bucket": bucket, "key": "a"},
        {"name": "b", "bucket": bucket, "key": "b"},
        {"name": "c", "bucket": bucket, "key": "c"},
        {"name": "dir", "bucket": bucket, "prefix": "dir/"},
    ]
    with pg_server.database() as pg_url:
        configs = {}
        for backend, url in (("sqlite", f"sqlite:///{tmp_path / 'p.db'}"), ("postgresql", pg_url)):
            (tmp_path / backend).mkdir()
            cfg = ConfigFile(tmp_path / backend / "poller.toml", s3_endpoint)
            configs[backend] = cfg.write(watches, database={"url": url}, schedule={"interval": "1s"})
            proc = run_cli("once", "--config", str(cfg.path))
            assert proc.returncode == 0, proc.stderr
        first = {backend: _rows(cfg.url) for backend, cfg in configs.items()}
        assert first["sqlite"] == first["postgresql"]
        assert {c[2] for c in first["postgresql"]["changes"]} == {"first_seen"}

        s3.put_object(Bucket=bucket, Key="a", Body=b"a2")
        s3.delete_object(Bucket=bucket, Key="b")
        s3.put_object(Bucket=bucket, Key="c", Body=b"c1")
        s3.put_object(Bucket=bucket, Key="dir/y", Body=b"y1")
        for cfg in configs.values():
            daemon = Daemon(cfg.path, load_settings(cfg.path), Notifier(""))
            daemon.start()
            try:
                wait_for(lambda cfg=cfg: len(_rows(cfg.url)["changes"]) >= 7, timeout=30, what="the daemon's cycle")
            finally:
                daemon.shutdown()
        # How many cycles each daemon ran depends on timing; one more `poller once` each ends both
        # histories in the same place, and its own poll rows must match too.
        since = datetime.now(UTC)
        for cfg in configs.values():
            proc = run_cli("once", "--config", str(cfg.path))
            assert proc.returncode == 0, proc.stderr
        second = {backend: _rows(cfg.url, since) for backend, cfg in configs.items()}
        assert len(second["postgresql"]["polls"]) == len(watches)
        assert second["sqlite"] == second["postgresql"]
        events = sorted((c[0], c[1], c[2]) for c in second["postgresql"]["changes"])
        assert events == [
            ("a", "a", "first_seen"),
            ("a", "a", "modified"),
            ("b", "b", "deleted"),
            ("b", "b", "first_seen"),
            ("c", "c", "created"),
            ("dir", "dir/x", "first_seen"),
            ("dir", "dir/y", "created"),
        ]


def test_awkward_keys_and_errors_round_trip(store: Store):
    # PostgreSQL receives poll rows by COPY: its text format must not bend tabs, newlines or backslashes.
    keys = ["tab\there", "new\nline", "back\\slash\\N", "\\.", "quote'\"", "ünïcödé/🙂", " lead and trail "]
    synced = store.sync_watches([WatchSpec(f"w{i}", "bucket", k, 60.0, None) for i, k in enumerate(keys)], NOW)
    store.record([result(w, "error", None) for w in synced.watches.values()])
    rows = store.history(limit=None)
    assert sorted(r["key"] for r in rows) == sorted(keys)
    assert {(r["outcome"], r["error"], r["etag"], r["time"]) for r in rows} == {("error", "boom", None, NOW)}


def test_missing_postgresql_driver_names_the_extra(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as on a machine without the postgres extra
    with pytest.raises(StoreError, match=r"driver is not installed .*pip install 'poller\[postgres\]'") as caught:
        open_engine("postgresql://poller:hunter2@db.example.com/poller")
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize("driver", ["psycopg2", "pg8000", "asyncpg", "psycopg_async"])
def test_other_postgresql_drivers_are_refused_at_load(driver: str, tmp_path: Path):
    """The writer's PostgreSQL paths are psycopg 3's: another driver is refused when the config is
    read (naming the field, the way to write the URL and the extra), and by open_engine."""
    url = f"postgresql+{driver}://poller:hunter2@db.example.com/poller"
    with pytest.raises(StoreError, match=r"psycopg 3 only.*pip install 'poller\[postgres\]'") as opened:
        open_engine(url)
    config = ConfigFile(tmp_path / "poller.toml", "http://127.0.0.1:9").write([], database={"url": url})
    with pytest.raises(ConfigError) as loaded:
        load_settings(config.path)
    message = str(loaded.value)
    assert "[database]" in message and "url" in message and driver in message and "psycopg 3 only" in message
    assert "hunter2" not in message + str(opened.value)


def test_simultaneous_db_upgrade_commands(db_url: str, tmp_path: Path):
    # The reproduction: `poller db upgrade` three times at once on a fresh database.
    url = db_url.replace("postgres@", "postgres:hunter2@")  # trust auth ignores it; output must not show it
    config = ConfigFile(tmp_path / "poller.toml", "http://127.0.0.1:9").write([], database={"url": url})
    command = [sys.executable, "-m", "poller", "db", "upgrade", "--config", str(config.path)]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outputs = [proc.communicate(timeout=60) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0], outputs
    assert all("up to date" in out and "hunter2" not in out + err for out, err in outputs), outputs


def test_status_on_an_empty_postgresql_database_says_what_to_do(pg_server: PgServer, tmp_path: Path):
    with pg_server.database() as url:
        url = url.replace("postgres@", "postgres:hunter2@")  # trust auth ignores it; output must not show it
        config = ConfigFile(tmp_path / "poller.toml", "http://127.0.0.1:9").write([], database={"url": url})
        proc = run_cli("status", "--config", str(config.path))
    assert proc.returncode == 1 and "no poller tables yet: run `poller db upgrade`" in proc.stderr, proc.stderr
    assert "hunter2" not in proc.stdout + proc.stderr


def test_batched_state_upserts_apply_as_row_by_row(store: Store):
    # On PostgreSQL a batch's object_state rows of 8 or more go through a staging table (COPY, then
    # one upsert): the result must be what applying them one by one gives, repeated keys included.
    names = [f"w{i}" for i in range(14)]
    keys = {"w12": "tab\there\\N", "w13": "ünï 'q'"}
    synced = store.sync_watches([WatchSpec(n, "bucket", keys.get(n, f"key/{n}"), 60.0, None) for n in names], NOW)
    w = synced.watches
    store.record([result(w[n]) for n in names[:12]])  # first_seen "e1"; w12 and w13 never stored
    t2, t3 = NOW + timedelta(minutes=1), NOW + timedelta(minutes=2)
    t3b = t3 + timedelta(seconds=1)
    e1, stale = (ObjectState(etag, NOW, NOW, None, 3, True) for etag in ('"e1"', '"e0"'))

    def unchanged(watch: Watch, state: ObjectState = e1, when: datetime = t2) -> PollResult:
        return PollResult(watch, when, "unchanged", 304, 1.0, state, state, None, None)

    def error(name: str, when: datetime) -> PollResult:
        return result(w[name], "error", None, when=when)

    # 9 unchanged (one with a stale ETag that must not overwrite "e1") and 8 errors, w12 four times.
    store.record(
        [unchanged(w[n]) for n in names[:8]]
        + [unchanged(w["w8"], stale), error("w9", t2), error("w9", t2 + timedelta(seconds=1)), error("w10", t2)]
        + [error("w12", t2)] * 4
        + [error("w13", t2)]
    )
    # w0 unchanged twice in one batch; then 8 errors, w9 twice.
    store.record([unchanged(w[n], when=t3) for n in (*names[:8], "w9", "w10")] + [unchanged(w["w0"], when=t3b)])
    store.record([error(n, t3) for n in ("w1", "w2", "w3", "w4", "w5", "w9", "w9", "w11")])
    cols = object_state.c
    query = select(watches.c.name, cols.key, cols.etag, cols.last_polled_at, cols.last_outcome)
    query = query.add_columns(cols.consecutive_errors, cols.last_error, cols.seq).join_from(object_state, watches)
    with store.engine.connect() as conn:
        got = {r[0]: tuple(r[1:]) for r in conn.execute(query)}
        staged = conn.info.get("poller_staging_tables")
    assert got == {
        "w0": ("key/w0", '"e1"', t3b, "unchanged", 0, None, 1),
        **{n: (f"key/{n}", '"e1"', t3, "error", 1, "boom", 1) for n in ("w1", "w2", "w3", "w4", "w5", "w11")},
        **{n: (f"key/{n}", '"e1"', t3, "unchanged", 0, None, 1) for n in ("w6", "w7", "w10")},
        "w8": ("key/w8", '"e1"', NOW, "modified", 0, None, 1),  # the stale "e0" did not overwrite "e1"
        "w9": ("key/w9", '"e1"', t3, "error", 2, "boom", 1),  # 2 errors, reset by t3's poll, 2 more
        "w12": ("tab\there\\N", None, t2, "error", 4, "boom", 0),
        "w13": ("ünï 'q'", None, t2, "error", 1, "boom", 0),
    }
    if store.engine.dialect.name == "postgresql":
        staged_paths = {"poller_stage_ok", "poller_stage_error", "poller_stage_runs", "poller_stage_first"}
        assert staged == staged_paths  # the staged paths ran (the first batch: 12 first sightings)


def test_a_batch_of_first_sightings_is_recorded_as_one_by_one(store: Store, monkeypatch: pytest.MonkeyPatch):
    # A batch's first sightings are one compare-and-set statement (on PostgreSQL COPY-staged); the
    # outcome must be row by row's: a key never stored is inserted (seq 1), one with only errors
    # stored is taken over (numbered past its row), one with history from before a retarget is
    # numbered past that, one another writer saw first is refused (Superseded: no history, no outbox
    # row), one changed twice in the batch goes row by row; a list pass's new keys are first
    # sightings like key watches', batched whatever else the pass holds, and one of them refused
    # supersedes its pass while the others, stored by the batch, keep their history rows.
    names = [f"f{i}" for i in range(10)]
    prefixes = [WatchSpec(p, "bucket", f"{p}/", 60.0, None, prefix=True) for p in ("dir", "solo", "many")]
    w = store.sync_watches([*specs(*names), *prefixes], NOW).watches
    store.record([result(w["f0"], "error", None)])  # f0: an error first, no object stored yet
    store.record([result(w["f1"], etag='"other"')])  # f1: another writer's first sighting
    e0 = ObjectState('"e0"', NOW, NOW, None, 3, True)
    pass0 = (KeyChange("dir/a", "first_seen", None, e0), KeyChange("dir/b", "first_seen", None, e0))
    store.record([PollResult(w["dir"], NOW, "modified", 200, 1.0, None, ObjectState(), changes=pass0)])
    other = (KeyChange("many/b", "first_seen", None, ObjectState('"other"', NOW, NOW, None, 3, True)),)
    store.record([PollResult(w["many"], NOW, "modified", 200, 1.0, None, ObjectState(), changes=other)])
    with store.engine.begin() as conn:
        # f0's row numbered past its history (history rows deleted by hand); f2: watched before,
        # retargeted away and back (history, no state row).
        conn.execute(object_state.update().where(object_state.c.watch_id == w["f0"].id).values(seq=5))
        conn.execute(
            etag_history.insert().values(
                watch_id=w["f2"].id, key="key/f2", detected_at=NOW, event="first_seen", etag='"old"', seq=3
            )
        )
    later, again = NOW + timedelta(minutes=1), NOW + timedelta(minutes=2)
    e1 = ObjectState('"e1"', later, later, None, 3, True)
    pass1 = (
        KeyChange("dir/a", "modified", e0, e1),
        KeyChange("dir/c", "created", None, e1),
        KeyChange("dir/d", "created", None, e1),
    )
    listed = PollResult(w["dir"], later, "modified", 200, 1.0, None, ObjectState(), changes=pass1)
    solo = (KeyChange("solo/x", "first_seen", None, e1),)
    listed_solo = PollResult(w["solo"], later, "modified", 200, 1.0, None, ObjectState(), changes=solo)
    twice = result(w["f3"], event="modified", etag='"e2"', when=again, previous=e1)
    new_keys = tuple(KeyChange(f"many/{k}", "first_seen", None, e1) for k in "abc")  # many/b: stored already
    listed_many = PollResult(w["many"], later, "modified", 200, 1.0, None, ObjectState(), changes=new_keys)
    batch = [result(w[n], when=later) for n in names] + [listed, listed_solo, twice, listed_many]
    statements: list[str] = []
    listen = ("before_cursor_execute", lambda conn, cursor, sql, *_: statements.append(sql))
    on_driver: list[tuple[str, int]] = []  # SQLite: (statement, rows) of each run on the driver
    returning = _DriverMany.returning

    def counted(self: _DriverMany, conn: Any, rows: Any) -> list[Any]:
        on_driver.append((" ".join(self.sql.split()[:3]), len(rows)))
        return returning(self, conn, rows)

    monkeypatch.setattr(_DriverMany, "returning", counted)
    event.listen(store.engine, *listen)
    try:
        refused = store.record(batch, lambda name, event: ["hook"])
    finally:
        event.remove(store.engine, *listen)
    assert sorted(refused) == [1, 13] and all(isinstance(e, Superseded) for e in refused.values())
    assert "many/b" in str(refused[13])
    h, n = etag_history.c, notifications.c
    with store.engine.connect() as conn:
        rows = conn.execute(
            select(watches.c.name, h.key, h.event, h.etag, h.seq, n.sink)
            .join_from(etag_history, watches)
            .outerjoin(notifications, n.history_id == h.id)
            .order_by(watches.c.name, h.key, h.seq)
        ).all()
        states = {
            (name, key): seq
            for name, key, seq in conn.execute(
                select(watches.c.name, object_state.c.key, object_state.c.seq).join_from(object_state, watches)
            )
        }
        staged = conn.info.get("poller_staging_tables", set())
    assert [tuple(r) for r in rows] == [
        ("dir", "dir/a", "first_seen", '"e0"', 1, None),
        ("dir", "dir/a", "modified", '"e1"', 2, "hook"),
        ("dir", "dir/b", "first_seen", '"e0"', 1, None),
        ("dir", "dir/c", "created", '"e1"', 1, "hook"),
        ("dir", "dir/d", "created", '"e1"', 1, "hook"),
        ("f0", "key/f0", "first_seen", '"e1"', 6, "hook"),
        ("f1", "key/f1", "first_seen", '"other"', 1, None),
        ("f2", "key/f2", "first_seen", '"old"', 3, None),
        ("f2", "key/f2", "first_seen", '"e1"', 4, "hook"),
        ("f3", "key/f3", "first_seen", '"e1"', 1, "hook"),
        ("f3", "key/f3", "modified", '"e2"', 2, "hook"),
        *[(name, f"key/{name}", "first_seen", '"e1"', 1, "hook") for name in names[4:]],
        ("many", "many/a", "first_seen", '"e1"', 1, "hook"),
        ("many", "many/b", "first_seen", '"other"', 1, None),
        ("many", "many/c", "first_seen", '"e1"', 1, "hook"),
        ("solo", "solo/x", "first_seen", '"e1"', 1, "hook"),
    ]
    assert states == {
        **{(name, f"key/{name}"): 1 for name in names},
        ("f0", "key/f0"): 6,
        ("f2", "key/f2"): 4,
        ("f3", "key/f3"): 2,
        **{("dir", key): seq for key, seq in (("dir/", 0), ("dir/a", 2), ("dir/b", 1), ("dir/c", 1), ("dir/d", 1))},
        ("solo", "solo/"): 0,
        ("solo", "solo/x"): 1,
        **{("many", key): seq for key, seq in (("many/", 0), ("many/a", 1), ("many/b", 1), ("many/c", 1))},
    }
    # The batched path did run: one statement for the 15 first sightings (the list passes' new keys
    # among them); row by row f3's three (UPDATE, INSERT; UPDATE) and dir/a's UPDATE; the list
    # passes' own rows (one upsert). On SQLite all of them run on the driver, the history rows too.
    pg = store.engine.dialect.name == "postgresql"
    upserts = sum(sql.startswith(("INSERT INTO object_state", "UPDATE object_state")) for sql in statements)
    if pg:
        assert upserts == 6 and on_driver == []
    else:
        assert upserts == 0
        assert sorted(on_driver) == sorted(
            [("INSERT INTO object_state", 15)]
            + [("UPDATE object_state SET", 1)] * 3
            + [("INSERT INTO object_state", 1)]
            + [("INSERT INTO etag_history", 16)]
        )
    assert sum(sql.startswith("INSERT INTO etag_history") for sql in statements) == 0
    if pg:
        assert "poller_stage_first" in staged


def test_a_prefix_stays_listed_through_an_error_pass(store: Store):
    """Read back after an error pass (a restart, a handover), a prefix listed before is still listed:
    a key new to it is `created`, not a `first_seen` that sinks routed on `created` never get."""
    w = store.sync_watches([WatchSpec("p", "bucket", "p/", 60.0, None, prefix=True)], NOW).watches["p"]
    listed = (KeyChange("p/a", "first_seen", None, ObjectState('"a"', NOW, None, None, 7, True)),)
    store.record([PollResult(w, NOW, "modified", 200, 1.0, None, ObjectState(present=True), changes=listed)])
    assert store.load_prefix_states()[w.id].listed
    store.record([PollResult(w, NOW, "error", 503, 1.0, None, None, error="HTTP 503 SlowDown")])
    assert store.load_prefix_states()[w.id].listed


def test_a_prefix_pass_stores_its_filters(store: Store):
    """The include/exclude pairs a prefix's passes listed with are read back with it (a reload that
    widens them lets in keys that are first seen, not created); an error pass listed nothing."""
    spec = WatchSpec("p", "bucket", "p/", 60.0, None, prefix=True, include=("*.csv",), exclude=("tmp/*",))
    w = store.sync_watches([spec], NOW).watches["p"]
    narrow: Filters = (("*.csv",), ("tmp/*",))
    passed = PollResult(w, NOW, "unchanged", 200, 1.0, None, ObjectState(present=True), filters=(narrow,))
    store.record([passed])
    assert store.load_prefix_states()[w.id].filters == (narrow,)
    wider = store.sync_watches([WatchSpec("p", "bucket", "p/", 60.0, None, prefix=True)], NOW).watches["p"]
    store.record([PollResult(wider, NOW, "error", 503, 1.0, None, None, error="HTTP 503 SlowDown")])
    assert store.load_prefix_states()[w.id].filters == (narrow,)
    both = (narrow, ((), ()))
    store.record([PollResult(wider, NOW, "unchanged", 200, 1.0, None, ObjectState(present=True), filters=both)])
    assert store.load_states_for([w.id])[1][w.id].filters == both


def test_states_read_back_are_the_states_recorded(store: Store, monkeypatch: pytest.MonkeyPatch):
    # A restart conditions every first request on these: the same values and the same types (a
    # `present` of 1 is not True to the probe; times are aware UTC), on both databases.
    micro = NOW + timedelta(microseconds=123456)
    w = store.sync_watches([*specs("k", "gone"), WatchSpec("p", "bucket", "p/", 60.0, None, prefix=True)], NOW).watches
    seen = ObjectState('"e1"', micro, micro, "v1", 2**40, True)
    store.record([PollResult(w["k"], NOW, "modified", 200, 1.0, None, seen, "first_seen")])
    store.record([result(w["gone"], "missing", "deleted")])
    listed = (KeyChange("p/a", "first_seen", None, ObjectState('"a"', micro, None, None, 7, True)),)
    store.record(
        [PollResult(w["p"], NOW, "modified", 200, 1.0, None, ObjectState(), changes=listed, filters=(((), ()),))]
    )
    keyed, prefixed = store.load_states_for([w["k"].id, w["gone"].id, w["p"].id])
    assert keyed == {w["k"].id: seen, w["gone"].id: ObjectState('"e1"', NOW, NOW, None, 3, False)}
    assert prefixed == {
        w["p"].id: PrefixState(True, {"p/a": ObjectState('"a"', micro, None, None, 7, True)}, (((), ()),))
    }
    assert (keyed, prefixed) == (store.load_states(), store.load_prefix_states())
    monkeypatch.setattr("poller.store.READ_CHUNK", 1)  # read back a row per fetch: the same states
    assert store.load_states_for([w["k"].id, w["gone"].id, w["p"].id]) == (keyed, prefixed)
    for state in [*keyed.values(), *prefixed[w["p"].id].objects.values()]:
        assert type(state.present) is bool
        assert state.last_modified is not None and state.last_modified.utcoffset() == timedelta(0)


def test_an_sqlite_library_too_old_is_a_clear_error(monkeypatch, tmp_path):
    """RETURNING (3.35) and UPDATE ... FROM (3.33) would fail later as bare syntax errors."""
    import sqlite3

    from poller.store import StoreError, open_engine

    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 31, 1))
    monkeypatch.setattr(sqlite3, "sqlite_version", "3.31.1")
    with pytest.raises(StoreError, match=r"SQLite library is 3\.31\.1; poller needs 3\.35 or later"):
        open_engine(f"sqlite:///{tmp_path / 'p.db'}")


def test_the_alembic_command_line_is_refused_for_poller_db_upgrade():
    """Without poller's connection (explicit BEGIN on SQLite, the PostgreSQL migration lock), a kill
    during a revision would leave it half applied."""
    from alembic import command
    from alembic.config import Config

    from poller.store import migrations_dir

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    with pytest.raises(SystemExit, match="poller db upgrade"):
        command.upgrade(cfg, "head")
