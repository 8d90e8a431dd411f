"""The store contract on both backends (a real SQLite file and a real PostgreSQL server): migrations,
recording, sync, pruning, history filters; SQLite's pragmas and WAL readers; the CLI and the daemon
end to end on PostgreSQL, row for row against SQLite."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.exc import IntegrityError

from poller.model import ObjectState, PollResult, Watch
from poller.schema import metadata
from poller.store import Store, StoreError, migrate, migrations_dir, open_engine
from poller.watchlist import WatchSpec

NOW = datetime(2026, 11, 24, 10, 0, 0, tzinfo=UTC)


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    engine = open_engine(db_url)
    migrate(engine)
    s = Store(engine)
    yield s
    s.close()


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
    store.record([result(watch, "unchanged", None, when=NOW - timedelta(days=d)) for d in range(10)])
    assert store.prune_polls(NOW - timedelta(days=4, hours=12)) == 5
    assert len(store.history(limit=None)) == 5


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
