"""Writer throughput: `Store.record` batches of synthetic poll results, SQLite vs PostgreSQL.

`python -m bench.store_write [--batches 30] [--batch-size 1000]` prints rows/s (wall clock) and
the client's CPU per row (this process: SQLAlchemy, the driver, and for SQLite the database engine
itself; PostgreSQL's server runs in its own processes). The PostgreSQL server is a throwaway one
from Debian's initdb/pg_ctl (tests/pgserver.py), durable (fsync on) like a real deployment.
Each batch is what the daemon's writer commits: 1% changes with a history event, the rest unchanged
(each watch keeps its ETag, so its unchanged polls extend one run of the run-length log). The
databases take turns batch by batch, so the machine's drift in speed falls on both alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path

from poller.model import ObjectState, PollResult, Watch
from poller.store import Store, migrate, open_engine
from poller.watchlist import WatchSpec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from pgserver import PgServer, find_bindir

CHANGE_EVERY = 100  # 1% of polls find a change


def batches(watches: list[Watch], count: int, size: int) -> list[list[PollResult]]:
    """``count`` batches of ``size`` results over ``watches``, built before timing starts: each watch
    keeps its ETag (its polls extend one run) until one of its polls finds a change."""
    start = datetime(2026, 11, 26, tzinfo=UTC)
    current: dict[int, ObjectState] = {}
    out = []
    n = 0
    for b in range(count):
        batch = []
        for i in range(size):
            watch = watches[(b * size + i) % len(watches)]
            when = start + timedelta(milliseconds=n)
            previous = current.get(watch.id)
            if previous is None or n % CHANGE_EVERY == 0:
                state = ObjectState(f'"{n:032x}"', when, when, None, 1024 + n, True)
                event = "first_seen" if previous is None else "modified"
                batch.append(PollResult(watch, when, "modified", 200, 3.2, previous, state, event, None))
                current[watch.id] = state
            else:
                batch.append(PollResult(watch, when, "unchanged", 304, 1.7, previous, previous, None, None))
            n += 1
        out.append(batch)
    return out


class Writer:
    """One database's store, its watches synced and warmed up, and its timed batches still to record."""

    def __init__(self, url: str, count: int, size: int, warmup: int = 3, copy: bool = True, stage: bool = True) -> None:
        self.store = Store(open_engine(url))
        if not copy:
            self.store._copy = False  # the pipelined executemany path, for comparison
        if not stage:
            self.store._stage_states = False  # object_state upserts row by row (pipelined executemany)
        self.wall = self.cpu = 0.0
        self.rows = 0
        try:
            migrate(self.store.engine)
            specs = [WatchSpec(f"w{i}", "bench", f"keys/{i}", 60.0, None) for i in range(size)]
            watches = list(self.store.sync_watches(specs, datetime.now(UTC)).watches.values())
            work = batches(watches, warmup + 1 + count, size)
            # Every watch's first sighting, then the warm-up batches, before the clock starts.
            warm = 1 + warmup  # the watches are one batch long
            for batch in work[:warm]:
                self.store.record(batch)
        except BaseException:
            self.store.close()
            raise
        self._todo = iter(work[warm:])

    def step(self) -> None:
        """Record the next timed batch."""
        batch = next(self._todo)
        wall, cpu = time.perf_counter(), time.process_time()
        self.store.record(batch)
        self.wall += time.perf_counter() - wall
        self.cpu += time.process_time() - cpu
        self.rows += len(batch)

    def figures(self) -> dict[str, float]:
        return {"rows": self.rows, "rows_per_s": self.rows / self.wall, "cpu_us_per_row": self.cpu * 1e6 / self.rows}


def measure_paired(writers: list[Writer], count: int) -> list[dict[str, float]]:
    """Time ``count`` batches of each writer, taking turns batch by batch (the order alternating), so
    this shared machine's drift in speed, tens of percent within seconds, falls on every database alike."""
    for b in range(count):
        for writer in writers if b % 2 == 0 else writers[::-1]:
            writer.step()
    return [writer.figures() for writer in writers]


def _median(runs: list[dict[str, float]]) -> dict[str, float]:
    return {field: statistics.median(r[field] for r in runs) for field in runs[0]}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.store_write", description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=30, help="timed batches per database (default 30)")
    parser.add_argument("--batch-size", type=int, default=1000, help="results per batch (default 1000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each on fresh databases (default 3)")
    parser.add_argument(
        "--compare-executemany",
        action="store_true",
        help="also time PostgreSQL without COPY (samples by executemany, open runs extended row by row)",
    )
    parser.add_argument(
        "--compare-row-upserts",
        action="store_true",
        help="also time PostgreSQL with object_state upserted row by row (no staging table)",
    )
    args = parser.parse_args()
    bindir = find_bindir()
    if bindir is None:
        parser.error("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): apt-get install postgresql")
    # The two databases take turns, a fresh database each round: this shared machine's speed drifts
    # by tens of percent within minutes, so one run of each compares two different machines.
    rounds: list[dict[str, dict[str, float]]] = []
    server = PgServer(bindir, durable=True).start()
    try:
        for _ in range(args.rounds):
            variants = [("postgresql", True, True)]
            if args.compare_executemany:
                variants.append(("postgresql (executemany)", False, True))
            if args.compare_row_upserts:
                variants.append(("postgresql (row upserts)", True, False))
            # A fresh database of each kind every round: a dropped one's autovacuum cannot run
            # during the next round (on this VM's two hyperthreads SQLite then took 2x the CPU a row).
            with tempfile.TemporaryDirectory(prefix="poller-bench-") as tmp, ExitStack() as stack:
                urls = [f"sqlite:///{Path(tmp) / 'p.db'}"] + [stack.enter_context(server.database()) for _ in variants]
                writers: list[Writer] = []
                try:
                    writers.append(Writer(urls[0], args.batches, args.batch_size))
                    for url, (_, copy, stage) in zip(urls[1:], variants, strict=True):
                        writers.append(Writer(url, args.batches, args.batch_size, copy=copy, stage=stage))
                    figures = measure_paired(writers, args.batches)
                finally:
                    for writer in writers:
                        writer.store.close()
            names = ["sqlite"] + [name for name, _, _ in variants]
            rounds.append(dict(zip(names, figures, strict=True)))
    finally:
        server.stop()
    print(
        f"Store.record, {args.batches} batches of {args.batch_size} results (1% with a history event), "
        f"{args.rounds} rounds taking turns"
    )
    print(f"{'round':<7}{'database':<26}{'rows/s':>10}{'client CPU µs/row':>20}{'PostgreSQL / SQLite':>22}")
    ratios = []
    for n, one in enumerate(rounds, 1):
        ratio = one["postgresql"]["rows_per_s"] / one["sqlite"]["rows_per_s"]
        ratios.append(ratio)
        for name, r in one.items():
            shown = f"{ratio:.2f}x" if name == "postgresql" else ""
            print(f"{n:<7}{name:<26}{r['rows_per_s']:>10,.0f}{r['cpu_us_per_row']:>20.1f}{shown:>22}")
    results = {name: _median([one[name] for one in rounds]) for name in rounds[0]}
    ratio = statistics.median(ratios)
    print(f"median {'sqlite':<26}{results['sqlite']['rows_per_s']:>10,.0f}{results['sqlite']['cpu_us_per_row']:>20.1f}")
    pg = results["postgresql"]
    print(f"median {'postgresql':<26}{pg['rows_per_s']:>10,.0f}{pg['cpu_us_per_row']:>20.1f}{ratio:>21.2f}x")
    print(f"PostgreSQL / SQLite: {ratio:.2f}x (median of the rounds' ratios; target >= 0.8x)")
    print(json.dumps({"store_write": results, "rounds": rounds, "pg_over_sqlite": round(ratio, 3)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
