"""Storage over a year's scale: the run-length poll log next to the per-poll table it replaced.

`python -m bench.storage [--watches 100000] [--history-watches 5000] [--days 30] [--postgresql]`
(SQLite; with ``--postgresql`` the same steps again on a local PostgreSQL server, durable):

1. **Writer**: the same workload (each watch keeps its ETag; 1% of polls find a change, 0.1% an
   error) recorded by `Store.record` of this tree and of the last per-poll release (commit
   ``01ef6c6``, checked out into a temporary directory), each in its own process: CPU per poll.
2. **Size**: a database built synthetically for ``--watches`` watches polled every 60 s for
   ``--days`` days: every watch's state and open run, and the full history of runs and changes of
   ``--history-watches`` of them, scaled up linearly to all watches; the per-poll table's bytes per
   row are measured on 1,000,000 rows of it and scaled to the same number of polls.
3. **Queries** on that database, through the real CLI (a new process each, as an operator runs
   them): `poller status`, `poller history --since 1h`, `poller history WATCH --limit 0` (30 days).
4. **Pruning**: one pass that removes the oldest day: the longest it held the write lock, and the
   longest a concurrent write waited meanwhile (the daemon's own writer and another process's).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

OLD_RELEASE = "01ef6c6"
ROOT = Path(__file__).resolve().parent.parent
INTERVAL_MS = 60_000
CHANGE_RATE = 0.01
ERROR_RATE = 0.001

# --- 1. writer cost, this tree vs the per-poll release --------------------------------------

WRITER = r"""
import json, sys, time
from datetime import UTC, datetime, timedelta
from poller.model import ObjectState, PollResult
from poller.store import Store, migrate, open_engine
from poller.watchlist import WatchSpec
url, watches_n, batches_n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
store = Store(open_engine(url)); migrate(store.engine)
specs = [WatchSpec(f"w{i}", "bench", f"keys/{i}", 60.0, None) for i in range(watches_n)]
watches = list(store.sync_watches(specs, datetime.now(UTC)).watches.values())
start = datetime(2026, 11, 26, tzinfo=UTC)
etags = {}
work, n = [], 0
for b in range(batches_n):
    batch = []
    for i in range(size):
        w = watches[n % watches_n]
        when = start + timedelta(milliseconds=n)
        old = etags.get(w.id)
        prev = None if old is None else ObjectState(old, start, start, None, 1024, True)
        if old is None or n % 100 == 50:
            etags[w.id] = f'"{n:032x}"'
            state = ObjectState(etags[w.id], when, when, None, 1024, True)
            event = "first_seen" if old is None else "modified"
            batch.append(PollResult(w, when, "modified", 200, 3.2, prev, state, event, None))
        elif n % 1000 == 7:
            batch.append(PollResult(w, when, "error", 503, 9.1, prev, None, None, "HTTP 503 SlowDown"))
        else:
            batch.append(PollResult(w, when, "unchanged", 304, 1.7, prev, prev, None, None))
        n += 1
    work.append(batch)
# Timed from the steady state: every watch's first sighting and its first unchanged poll (which
# opens the watch's run in the run-length log) are written before timing starts.
warm = 2 * (watches_n // size + 1)
for batch in work[:warm]:
    store.record(batch)
wall, cpu = time.perf_counter(), time.process_time()
for batch in work[warm:]:
    store.record(batch)
wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
rows = (batches_n - warm) * size
print(json.dumps({"polls": rows, "polls_per_s": rows / wall, "cpu_us_per_poll": cpu * 1e6 / rows}))
"""


def writer_cost(
    source: Path, workdir: Path, watches: int, batches: int, size: int, url: str | None = None
) -> dict[str, float]:
    url = url or f"sqlite:///{workdir / f'writer-{source.name}.db'}"
    env = {**os.environ, "PYTHONPATH": str(source)}
    out = subprocess.run(
        [sys.executable, "-c", WRITER, url, str(watches), str(batches), str(size)],
        env=env, capture_output=True, text=True, check=True, cwd=workdir,
    )  # fmt: skip
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def old_release(workdir: Path) -> Path:
    """The per-poll release's package and migrations, checked out beside the benchmark."""
    target = workdir / "per-poll"
    target.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", OLD_RELEASE, "poller", "migrations"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


# --- 2. a synthetic database --------------------------------------------------------------


class _Sink:
    """Rows straight into the database, as fast as its driver takes them: executemany on SQLite
    (no sync while building), COPY on PostgreSQL."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.pg = url.startswith("postgresql")
        if self.pg:
            import psycopg

            self.conn: Any = psycopg.connect(plain_pg_url(url))
        else:
            self.conn = sqlite3.connect(url.removeprefix("sqlite:///"))
            self.conn.execute("PRAGMA journal_mode = WAL")
            self.conn.execute("PRAGMA synchronous = OFF")  # building, not measuring durability

    def write(self, table: str, columns: str, rows: list[tuple[Any, ...]]) -> None:
        if not rows:
            return
        if self.pg:
            with self.conn.cursor() as cur, cur.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
        else:
            marks = ",".join("?" * len(rows[0]))
            self.conn.executemany(f"INSERT INTO {table} ({columns}) VALUES ({marks})", rows)

    def close(self) -> None:
        self.conn.commit()
        if self.pg:
            # Statistics as a long-running database would have them.
            self.conn.autocommit = True
            self.conn.execute("VACUUM ANALYZE")
        else:
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.conn.close()


def plain_pg_url(url: str) -> str:
    """A SQLAlchemy PostgreSQL URL as libpq takes it."""
    return "postgresql://" + url.split("://", 1)[1]


def build(
    url: str,
    watches: int,
    history_watches: int,
    days: int,
    now_ms: int,
    seed: int = 7,
    change_rate: float = CHANGE_RATE,
    error_rate: float = ERROR_RATE,
) -> dict[str, int]:
    """Write the run log a daemon would have left: states and open runs of every watch, the
    full history of ``history_watches``. Returns how many runs and changes it wrote."""
    from poller.store import Store, migrate, open_engine
    from poller.watchlist import WatchSpec

    store = Store(open_engine(url))
    migrate(store.engine)
    start = datetime.fromtimestamp(now_ms / 1000 - days * 86400, UTC)
    store.sync_watches(
        [WatchSpec(f"w{i:06d}", "bench", f"data/part-{i:06d}.parquet", 60.0, None) for i in range(watches)], start
    )
    store.close()
    rng = random.Random(seed)
    sink = _Sink(url)
    first_ms = now_ms - days * 86_400_000
    polls_per_watch = days * 86_400_000 // INTERVAL_MS
    changes_n = 0
    run_id = 0
    run_rows: list[tuple[Any, ...]] = []
    history_rows: list[tuple[Any, ...]] = []
    state_rows: list[tuple[Any, ...]] = []

    def iso(ms: int) -> str:
        return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="microseconds")

    def run(*row: Any, ended: bool = True) -> None:
        nonlocal run_id
        run_id += 1
        run_rows.append((run_id, *row, row[8] if ended else None))

    def flush() -> None:
        sink.write(
            "poll_runs",
            "id, watch_id, key, outcome, http_status, etag, last_modified, error, first_at, last_at, count, "
            "duration_min_us, duration_sum_us, duration_max_us, ended_at",
            run_rows,
        )
        sink.write(
            "etag_history",
            "watch_id, key, detected_at, event, etag, previous_etag, last_modified, version_id, size, seq",
            history_rows,
        )
        sink.write(
            "object_state",
            "watch_id, key, etag, last_modified, observed_server_date, version_id, size, present, last_polled_at, "
            "last_outcome, consecutive_errors, last_error, last_changed_at, seq, run_id",
            state_rows,
        )
        sink.conn.commit()
        run_rows.clear()
        history_rows.clear()
        state_rows.clear()

    for w in range(1, watches + 1):
        key = f"data/part-{w - 1:06d}.parquet"
        etag = f'"{rng.getrandbits(128):032x}"'
        seq = 1
        if w <= history_watches:
            # Poll numbers at which this watch saw a change or an error, then the runs between them.
            events = sorted(
                [(p, "change") for p in rng.sample(range(1, polls_per_watch), int(polls_per_watch * change_rate))]
                + [(p, "error") for p in rng.sample(range(1, polls_per_watch), int(polls_per_watch * error_rate))]
            )
            history_rows.append((w, key, iso(first_ms), "first_seen", etag, None, iso(first_ms), None, 4096, 1))
            run(w, None, 1, 200, etag, first_ms, None, first_ms, first_ms, 1, 9000, 9000, 9000)
            previous = 0
            for p, kind in events:
                if p - previous > 1:  # the unchanged polls before this event
                    a, b, n = (
                        first_ms + (previous + 1) * INTERVAL_MS,
                        first_ms + (p - 1) * INTERVAL_MS,
                        p - previous - 1,
                    )
                    run(w, None, 0, 304, etag, first_ms, None, a, b, n, 4000, 8000 * n, 30000)
                at = first_ms + p * INTERVAL_MS
                if kind == "change":
                    new = f'"{rng.getrandbits(128):032x}"'
                    seq += 1
                    history_rows.append((w, key, iso(at), "modified", new, etag, iso(at), None, 4096, seq))
                    etag = new
                    changes_n += 1
                    run(w, None, 1, 200, etag, at, None, at, at, 1, 9000, 9000, 9000)
                else:
                    run(w, None, 3, 503, etag, first_ms, "HTTP 503 SlowDown", at, at, 1, 20000, 20000, 20000)
                previous = p
            open_from = first_ms + (previous + 1) * INTERVAL_MS
        else:
            open_from = now_ms - rng.randrange(1, 3 * 86_400_000)  # an open run that began lately
            history_rows.append((w, key, iso(open_from), "first_seen", etag, None, iso(open_from), None, 4096, 1))
        changes_n += 1  # the first sighting
        count = max(1, (now_ms - open_from) // INTERVAL_MS)
        last = now_ms - rng.randrange(INTERVAL_MS)
        run(w, None, 0, 304, etag, first_ms, None, open_from, last, count, 4000, 8000 * count, 30000, ended=False)
        state_rows.append(
            (
                w,
                key,
                etag,
                iso(first_ms),
                iso(last),
                None,
                4096,
                True,
                iso(last),
                "unchanged",
                0,
                None,
                None,
                seq,
                run_id,
            )
        )
        if len(run_rows) >= 50_000 or w == watches:
            flush()
    if sink.pg:  # later inserts (a writer) go on from the ids written here
        sink.conn.execute("SELECT setval(pg_get_serial_sequence('poll_runs', 'id'), max(id)) FROM poll_runs")
    sink.close()
    return {"runs": run_id, "changes": changes_n}


def table_bytes(url: str) -> dict[str, int]:
    """Bytes per table, indexes included: dbstat on SQLite, pg_total_relation_size on PostgreSQL."""
    if url.startswith("postgresql"):
        import psycopg

        with psycopg.connect(plain_pg_url(url)) as pg:
            rows = pg.execute(
                "SELECT relname, pg_total_relation_size(relid) FROM pg_stat_user_tables WHERE schemaname = 'public'"
            ).fetchall()
        return {name: int(size) for name, size in rows}
    conn = sqlite3.connect(url.removeprefix("sqlite:///"))
    try:
        rows = conn.execute(
            "SELECT m.tbl_name, sum(d.pgsize) FROM dbstat d JOIN sqlite_master m ON m.name = d.name GROUP BY m.tbl_name"
        ).fetchall()
    finally:
        conn.close()
    return {name: int(size) for name, size in rows}


def per_poll_bytes(url: str, rows: int = 1_000_000) -> float:
    """Bytes per row of the per-poll table (01ef6c6's types, its two indexes), on ``rows`` rows."""
    pg = url.startswith("postgresql")
    ddl = (
        "CREATE TABLE polls (id {pk}, watch_id {int} NOT NULL, key TEXT NOT NULL, polled_at {time} NOT NULL, "
        "outcome VARCHAR(16) NOT NULL, http_status INTEGER, etag TEXT, last_modified {time}, duration_ms {float}, "
        "error TEXT)"
    ).format(
        pk="BIGSERIAL PRIMARY KEY" if pg else "INTEGER PRIMARY KEY",
        int="BIGINT" if pg else "INTEGER",
        time="TIMESTAMPTZ" if pg else "VARCHAR(32)",
        float="DOUBLE PRECISION" if pg else "FLOAT",
    )
    sink = _Sink(url)
    for statement in (
        ddl,
        "CREATE INDEX ix_polls_watch_id_polled_at ON polls (watch_id, polled_at)",
        "CREATE INDEX ix_polls_polled_at ON polls (polled_at)",
    ):
        sink.conn.execute(statement)
    start = datetime(2026, 11, 1, tzinfo=UTC)
    rng = random.Random(3)
    etag = f'"{rng.getrandbits(128):032x}"'
    lm = start.isoformat(timespec="microseconds")
    batch: list[tuple[Any, ...]] = []
    columns = "watch_id, key, polled_at, outcome, http_status, etag, last_modified, duration_ms, error"
    for n in range(rows):
        when = (start + timedelta(milliseconds=600 * n)).isoformat(timespec="microseconds")
        batch.append(
            (
                n % 100_000 + 1,
                f"data/part-{n % 100_000:06d}.parquet",
                when,
                "unchanged",
                304,
                etag,
                lm,
                1.7 + n % 7,
                None,
            )
        )
        if len(batch) == 100_000:
            sink.write("polls", columns, batch)
            batch.clear()
    sink.write("polls", columns, batch)
    sink.close()
    return table_bytes(url)["polls"] / rows


# --- 3. queries and 4. pruning ---------------------------------------------------------------


def cli_seconds(config: Path, *args: str, repeat: int = 3) -> float:
    """The best of ``repeat`` wall times of `poller ARGS` in a new process, output discarded."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "poller", *args, "--config", str(config)], check=True,
                       stdout=subprocess.DEVNULL, cwd=config.parent)  # fmt: skip
        best = min(best, time.perf_counter() - t)
    return best


def query_ms(url: str, now: datetime, repeat: int = 3) -> dict[str, float]:
    """The same operator queries in-process (the Store's own calls, without Python's start-up)."""
    from poller.store import Store, open_engine

    store = Store(open_engine(url, readonly=True))
    calls = {
        "status (every watch, as text)": store.status_text,
        "history --since 1h": lambda: store.history(since=now - timedelta(hours=1)),
        "history WATCH (30 days, all rows)": lambda: store.history(watch="w000001", limit=None),
        "history WATCH --since 1h": lambda: store.history(watch="w000001", since=now - timedelta(hours=1)),
    }
    out = {}
    for name, call in calls.items():
        best = float("inf")
        for _ in range(repeat):
            t = time.perf_counter()
            call()
            best = min(best, time.perf_counter() - t)
        out[name] = round(best * 1000, 1)
    store.close()
    return out


def prune_lock_ms(url: str, before: datetime, *, other_process: bool = False) -> dict[str, float]:
    """One pruning pass: runs removed, the longest its write transactions held the lock (ms), total
    seconds, and the longest a concurrent write took meanwhile, its wait included (ms): the daemon's
    own writer (same Store, as in the daemon), and with ``other_process`` also another process's (a
    plain connection, e.g. a CLI command, which SQLite's busy handler makes everyone poll for)."""
    from poller.store import Store, open_engine

    store = Store(open_engine(url))
    pg = url.startswith("postgresql")
    longest = [0.0]
    plain = store._tx

    @contextmanager
    def timed_turn(*, background: bool = False):  # type: ignore[no-untyped-def]
        # SQLite: how long pruning holds the write lock, its turn (transaction and commit; the
        # WAL checkpoint after it runs outside, beside the writer).
        with turn(background=background):
            t = time.perf_counter()
            yield
            if background:
                longest[0] = max(longest[0], (time.perf_counter() - t) * 1000)

    @contextmanager
    def timed_tx(*, background: bool = False):  # type: ignore[no-untyped-def]
        # PostgreSQL: a pruning transaction, commit included (row locks: a writer waits only for
        # the rows it touches).
        t = time.perf_counter()
        with plain(background=background) as conn:
            yield conn
        if background:
            longest[0] = max(longest[0], (time.perf_counter() - t) * 1000)

    if store._turns is not None:
        turn = store._turns.turn
        store._turns.turn = timed_turn  # type: ignore[method-assign]
    else:
        store._tx = timed_tx  # type: ignore[method-assign]
    waits = {"daemon": 0.0, "other": 0.0}
    stop = threading.Event()

    def own_writer() -> None:
        # The daemon's writer path: a write transaction of the same Store (what `record` opens).
        while not stop.is_set():
            t = time.perf_counter()
            with plain() as conn:
                conn.exec_driver_sql("UPDATE watches SET active = active WHERE id = 1")
                waits["daemon"] = max(waits["daemon"], (time.perf_counter() - t) * 1000)
            stop.wait(0.005)

    def other_writer() -> None:
        if pg:
            import psycopg

            with psycopg.connect(plain_pg_url(url)) as pgconn:
                while not stop.is_set():
                    t = time.perf_counter()
                    pgconn.execute("UPDATE watches SET active = active WHERE id = 2")
                    waits["other"] = max(waits["other"], (time.perf_counter() - t) * 1000)
                    pgconn.commit()
                    stop.wait(0.05)
            return
        # Its connection never checkpoints, so its own commits carry no checkpoint's cost.
        conn = sqlite3.connect(url.removeprefix("sqlite:///"), timeout=60, isolation_level=None)
        conn.execute("PRAGMA wal_autocheckpoint = 0")
        while not stop.is_set():
            t = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("UPDATE watches SET active = active WHERE id = 2")
            waits["other"] = max(waits["other"], (time.perf_counter() - t) * 1000)
            conn.execute("COMMIT")
            stop.wait(0.05)
        conn.close()

    writers = (own_writer, other_writer) if other_process else (own_writer,)
    probes = [threading.Thread(target=f, daemon=True) for f in writers]
    for probe in probes:
        probe.start()
    t = time.perf_counter()
    pruned = store.prune_polls(before, before)
    total = time.perf_counter() - t
    stop.set()
    for probe in probes:
        probe.join()
    store.close()
    return {
        "runs_removed": pruned.runs,
        "longest_tx_ms": longest[0],
        "seconds": total,
        "writer_wait_ms": waits["daemon"],
        "other_writer_wait_ms": waits["other"],
    }


def measure(url: str, work: Path, old: Path, args: argparse.Namespace, new_url: Callable[[], str]) -> dict[str, Any]:
    """Every figure of one backend: ``url`` is the database to build; ``new_url`` gives empty ones."""
    out: dict[str, Any] = {}
    pg = url.startswith("postgresql")
    if not args.skip_writer:
        # The two trees take turns, a fresh database each (this VM's speed drifts within minutes).
        costs: dict[str, list[dict[str, float]]] = {"per-poll": [], "runs": []}
        for _ in range(args.writer_rounds):
            for name, source in (("per-poll", old), ("runs", ROOT)):
                costs[name].append(writer_cost(source, work, 10_000, args.writer_batches, 1000, new_url()))
        for name, rounds in costs.items():
            out[f"writer_{name}"] = {field: statistics.median(r[field] for r in rounds) for field in rounds[0]}
    if args.writer_only:
        return out
    now = datetime.now(UTC).replace(microsecond=0)
    now_ms = int(now.timestamp() * 1000)
    t = time.perf_counter()
    built = build(
        url, args.watches, args.history_watches, args.days, now_ms,
        change_rate=args.change_rate, error_rate=args.error_rate,
    )  # fmt: skip
    out["build_s"] = time.perf_counter() - t
    # The build writes without syncing: flush it now, or the first fsync of a measured commit
    # (a checkpoint's) would carry the whole file (seen: 1.9 s).
    os.sync()
    sizes = table_bytes(url)
    scale = args.watches / args.history_watches
    others = args.watches - args.history_watches  # one run and one change each, already full-scale
    runs_bytes_per_row = sizes["poll_runs"] / built["runs"]
    history_bytes_per_row = sizes["etag_history"] / built["changes"]
    full_runs = (built["runs"] - others) * scale
    full_changes = (built["changes"] - others) * scale
    fixed = sum(v for k, v in sizes.items() if k not in ("poll_runs", "etag_history", "poll_samples"))
    samples_bytes = 3600_000 // INTERVAL_MS * args.watches * 21  # 1 h of samples, 21 bytes each (measured)
    out["runs_db"] = {
        "runs": int(full_runs),
        "changes": int(full_changes),
        "bytes_per_run": runs_bytes_per_row,
        "bytes_per_change": history_bytes_per_row,
        "poll_log_bytes": int(full_runs * runs_bytes_per_row + samples_bytes),
        "history_bytes": int(full_changes * history_bytes_per_row),
        "other_bytes": fixed,
    }
    polls_total = args.watches * args.days * 86_400_000 // INTERVAL_MS
    # A million rows measure a row's bytes at full size; a small run (the test's) needs far fewer.
    sample_rows = min(1_000_000, max(10_000, 10 * args.watches))
    per_poll = per_poll_bytes(new_url() if pg else f"sqlite:///{work / 'per-poll.db'}", sample_rows)
    out["per_poll_db"] = {
        "polls": polls_total,
        "bytes_per_poll": per_poll,
        "poll_log_bytes": int(polls_total * per_poll),
    }
    config = work / "config.toml"
    # The watch list the database holds, as an operator's file has it: reading commands must not pay for it.
    with config.open("w") as handle:
        handle.write(f'[database]\nurl = "{url}"\n')
        handle.writelines(
            f'[[watch]]\nname = "w{i:06d}"\nbucket = "bench"\nkey = "data/part-{i:06d}.parquet"\n'
            for i in range(args.watches)
        )
    config.chmod(0o600)
    out["cli_s"] = {
        "status": cli_seconds(config, "status", repeat=args.cli_repeat),
        "history --since 1h": cli_seconds(config, "history", "--since", "1h", repeat=args.cli_repeat),
        "history WATCH (30 days, all rows)": cli_seconds(
            config, "history", "w000001", "--limit", "0", repeat=args.cli_repeat
        ),
        "--version (start-up alone)": cli_seconds(config, "--version", repeat=args.cli_repeat),
    }
    out["query_ms"] = query_ms(url, now)
    # The oldest day with the daemon's writer alone, then the next day with another process writing too.
    out["prune"] = prune_lock_ms(url, now - timedelta(days=args.days - 1))
    out["prune_other"] = prune_lock_ms(url, now - timedelta(days=args.days - 2), other_process=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.storage", description=__doc__.splitlines()[0])
    parser.add_argument("--watches", type=int, default=100_000)
    parser.add_argument("--history-watches", type=int, default=5_000, help="watches given their full history")
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--writer-batches", type=int, default=60)
    parser.add_argument("--change-rate", type=float, default=CHANGE_RATE, help="share of polls that see a change")
    parser.add_argument("--error-rate", type=float, default=ERROR_RATE, help="share of polls that fail")
    parser.add_argument("--skip-writer", action="store_true", help="sizes and queries only")
    parser.add_argument("--writer-only", action="store_true", help="the writer's cost only (no database built)")
    parser.add_argument(
        "--writer-rounds", type=int, default=1, help="writer measurements per tree, taking turns (the median is kept)"
    )
    parser.add_argument("--cli-repeat", type=int, default=3, help="runs of each CLI command (the best is kept)")
    parser.add_argument(
        "--postgresql", action="store_true", help="also on a local PostgreSQL server (tests/pgserver.py)"
    )
    parser.add_argument("--json", action="store_true", help="one JSON line instead of the table")
    args = parser.parse_args()
    out: dict[str, Any] = {
        "watches": args.watches,
        "days": args.days,
        "history_watches": args.history_watches,
        "change_rate": args.change_rate,
        "error_rate": args.error_rate,
        "backends": {},
    }
    with tempfile.TemporaryDirectory(prefix="poller-storage-") as tmp:
        work = Path(tmp)
        old = old_release(work)
        counter = iter(range(1_000_000))
        out["backends"]["SQLite"] = measure(
            f"sqlite:///{work / 'runs.db'}", work, old, args, lambda: f"sqlite:///{work / f'w{next(counter)}.db'}"
        )
        if args.postgresql:
            sys.path.insert(0, str(ROOT / "tests"))
            from pgserver import PgServer, find_bindir

            bindir = find_bindir()
            if bindir is None:
                parser.error("PostgreSQL is not installed (no initdb): apt-get install postgresql")
            server = PgServer(bindir, durable=True).start()
            try:
                out["backends"]["PostgreSQL"] = measure(
                    server.url(server.create_database()), work, old, args,
                    lambda: server.url(server.create_database()),
                )  # fmt: skip
            finally:
                server.stop()
    if args.json:
        print(json.dumps(out))
    else:
        for backend, figures in out["backends"].items():
            report(out, backend, figures)
    return 0


def report(run: dict[str, Any], backend: str, out: dict[str, Any]) -> None:
    gb = 1e9
    if "runs_db" not in out:  # --writer-only
        print(f"writer ({backend}, 10,000 watches, 1% changes, median of the rounds): per-poll (01ef6c6) -> runs")
        wo, wn = out["writer_per-poll"], out["writer_runs"]
        print(f"  CPU per poll {wo['cpu_us_per_poll']:.1f} -> {wn['cpu_us_per_poll']:.1f} us (target: no higher)")
        print(f"  polls/s      {wo['polls_per_s']:,.0f} -> {wn['polls_per_s']:,.0f}")
        return
    r, p = out["runs_db"], out["per_poll_db"]
    print(
        f"storage: {run['watches']:,} watches every 60 s for {run['days']} days, {run['change_rate']:.2%} of polls "
        f"changes, {run['error_rate']:.2%} errors ({backend})"
    )
    print(
        f"  full history built for {run['history_watches']:,} watches and scaled linearly; build {out['build_s']:.0f} s"
    )
    print(f"  {'':32} {'per-poll (01ef6c6)':>20} {'run-length (this tree)':>24}")
    print(f"  {'rows for every poll':32} {p['polls']:>20,} {r['runs']:>24,}")
    print(f"  {'bytes per row (with indexes)':32} {p['bytes_per_poll']:>20.0f} {r['bytes_per_run']:>24.0f}")
    print(f"  {'poll log on disk':32} {p['poll_log_bytes'] / gb:>19.1f}G {r['poll_log_bytes'] / gb:>23.2f}G")
    print(f"  {'etag_history (same in both)':32} {r['history_bytes'] / gb:>19.2f}G {r['history_bytes'] / gb:>23.2f}G")
    total_old = p["poll_log_bytes"] + r["history_bytes"] + r["other_bytes"]
    total_new = r["poll_log_bytes"] + r["history_bytes"] + r["other_bytes"]
    print(f"  {'total':32} {total_old / gb:>19.1f}G {total_new / gb:>23.2f}G   (target < 2 GB)")
    if "writer_runs" in out:
        wo, wn = out["writer_per-poll"], out["writer_runs"]
        print(
            f"  {'writer CPU per poll':32} {wo['cpu_us_per_poll']:>18.1f}us {wn['cpu_us_per_poll']:>22.1f}us"
            "   (target: no higher; 10,000 watches, 1% changes)"
        )
        print(f"  {'writer polls/s':32} {wo['polls_per_s']:>20,.0f} {wn['polls_per_s']:>24,.0f}")
    for name, seconds in out["cli_s"].items():
        print(f"  CLI {name:40} {seconds * 1000:>8.0f} ms")
    for name, ms in out.get("query_ms", {}).items():
        print(f"  in-process {name:33} {ms:>8.1f} ms")
    for key, label in (("prune", "daemon's writer alone"), ("prune_other", "and another process writing")):
        pr = out[key]
        other = f", another process's {pr['other_writer_wait_ms']:.0f} ms" if key == "prune_other" else ""
        print(
            f"  prune pass ({label}): {pr['runs_removed']:,} runs in {pr['seconds']:.1f} s, the write lock held "
            f"{pr['longest_tx_ms']:.0f} ms at most (a chunk and its commit); the daemon's writer waited "
            f"{pr['writer_wait_ms']:.0f} ms at most (target < 50 ms){other}"
        )


if __name__ == "__main__":
    raise SystemExit(main())
