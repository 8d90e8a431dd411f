"""`poller history --follow`: the tail's cursor logic on plain data, then the real command as a
subprocess over SQLite and PostgreSQL: backlog then new events, each once, in table, csv and jsonl;
a watch filter; Ctrl-C, SIGTERM and a closed pipe end it quietly; on PostgreSQL a row committed after
a higher id was printed is still printed, once; a database that refuses connections is reported once."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from conftest import ConfigFile, run_cli, wait_for
from pgserver import PgServer
from sqlalchemy import insert
from sqlalchemy.exc import OperationalError

from poller import follow
from poller.follow import IdCursor, Tail, name_matcher
from poller.model import ObjectState, PollResult, Watch
from poller.schema import etag_history
from poller.signals import Signal
from poller.store import Store
from poller.watchlist import WatchSpec

SCHEMA = json.loads(resources.files("poller").joinpath("event.schema.json").read_text(encoding="utf-8"))
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
NAMES = ("app-1", "app-2", "db-1", "other")
postgres_only = pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)


# --- the cursor and the tail, on plain data ---------------------------------------------------------


def test_cursor_takes_each_id_once_and_keeps_gaps_for_the_grace():
    cursor = IdCursor(top=10, grace=60.0)
    assert cursor.take([11, 12, 14], now=0.0) == {11, 12, 14}
    assert (cursor.top, list(cursor.gaps), cursor.floor()) == (14, [13], 12)
    # Asked again from the floor: 14 is not new; 13 committed late is, once.
    assert cursor.take([13, 14, 15], now=1.0) == {13, 15}
    assert cursor.take([13, 14, 15], now=2.0) == set() and cursor.floor() == 15
    # A gap that never fills (a rolled-back insert) lapses after the grace.
    cursor.take([17], now=3.0)
    assert cursor.floor() == 15
    cursor.expire(now=62.9)
    assert cursor.floor() == 15
    cursor.expire(now=63.0)
    assert (cursor.floor(), cursor.gaps) == (17, {})
    # Without a grace (SQLite: ids commit in order) a skipped id is never a gap.
    sqlite = IdCursor(top=0)
    assert sqlite.take([1, 3], now=0.0) == {1, 3} and sqlite.floor() == 3


def test_cursor_keeps_at_most_max_gaps():
    cursor = IdCursor(top=0, grace=60.0, max_gaps=100)
    cursor.take([1_000_000], now=0.0)
    assert len(cursor.gaps) == 100 and cursor.floor() == 999_899
    # What it gives up while it could still commit is counted (the CLI says so on stderr), not hidden.
    assert cursor.overflow == 999_899
    lapsed = IdCursor(top=0, grace=60.0, max_gaps=100)
    lapsed.take([5], now=0.0)
    lapsed.take([6], now=61.0)  # the gaps 1-4 lapsed: rolled back or burnt, not given up
    assert lapsed.overflow == 0


def test_follow_warns_when_ids_in_flight_are_given_up():
    import threading

    from poller.follow import Tail, run

    pages = iter([[{"history_id": 500, "event_id": None, "watch": "w"}]])
    tail = Tail(lambda a, b, n: next(pages, []), grace=60.0, clock=lambda: 0.0)
    tail.changes.max_gaps = 100
    stop, emitted, warned = threading.Event(), [], []
    run(tail, emitted.append, stop, interval=0.0, warn=warned.append, gone=lambda: len(emitted) == 1)
    assert [row["history_id"] for row in emitted] == [500] and warned == [399]


def test_cursor_does_not_reprint_the_backlog_and_does_not_skip_what_it_left_out():
    cursor = IdCursor(top=10)
    cursor.mark([9, 12])  # printed as the backlog; 11 committed too but was not in it
    assert cursor.take([11, 12, 13], now=0.0) == {11, 13}


class Log:
    """A fake database: rows become visible when "committed", ids taken before."""

    def __init__(self) -> None:
        self.committed: dict[tuple[str, int], dict[str, Any]] = {}
        self.asked: list[tuple[int, int, int]] = []

    def commit(self, table: str, id_: int, watch: str = "app-1") -> None:
        history_id, event_id = (id_, None) if table == "h" else (None, id_)
        self.committed[table, id_] = {
            "history_id": history_id,
            "event_id": event_id,
            "watch": watch,
            "time": datetime(2026, 11, 24, tzinfo=UTC) + timedelta(seconds=len(self.committed)),
        }

    def fetch(self, after_change: int, after_signal: int, limit: int) -> list[dict[str, Any]]:
        self.asked.append((after_change, after_signal, limit))
        changes = sorted((i, r) for (t, i), r in self.committed.items() if t == "h" and i > after_change)[:limit]
        signals = sorted((i, r) for (t, i), r in self.committed.items() if t == "e" and i > after_signal)[:limit]
        return sorted((r for _, r in changes + signals), key=lambda r: r["time"])


def ids(rows: Iterator[dict[str, Any]] | list[dict[str, Any]]) -> list[tuple[str, int]]:
    return [("h", r["history_id"]) if r["history_id"] is not None else ("e", r["event_id"]) for r in rows]


def test_tail_prints_out_of_order_commits_once_across_pages_and_tables():
    log, clock = Log(), [0.0]
    for i in (1, 2, 3):
        log.commit("h", i)
    log.commit("e", 1)
    tail = Tail(log.fetch, grace=60.0, page=2, clock=lambda: clock[0])
    tail.start((3, 1), window=10)
    assert list(tail.poll()) == []
    # Ids 4 and 6 taken, 5 still in flight; then 5 commits; a page of 2 rows at a time.
    for i in (4, 6, 7, 8):
        log.commit("h", i)
    log.commit("e", 2)
    # Each page in time order (as Store.events_after returns it), the pages in id order.
    assert ids(tail.poll()) == [("h", 4), ("h", 6), ("e", 2), ("h", 7), ("h", 8)]
    log.commit("h", 5)
    clock[0] = 30.0
    assert ids(tail.poll()) == [("h", 5)]
    assert ids(tail.poll()) == []
    # In flight at start (an id below the newest, not committed yet): printed when it commits.
    log2 = Log()
    log2.commit("h", 1)
    log2.commit("h", 3)
    late = Tail(log2.fetch, grace=60.0, clock=lambda: 0.0)
    late.start((3, 0), window=10)
    log2.commit("h", 2)
    assert ids(late.poll()) == [("h", 2)]


def test_tail_filters_after_taking_and_does_not_reprint_the_backlog():
    log = Log()
    log.commit("h", 1, "app-1")
    tail = Tail(log.fetch, match=lambda row: row["watch"].startswith("app-"))
    tail.start((1, 0))
    log.commit("h", 2, "app-2")
    tail.mark([log.committed["h", 2]])  # the backlog, read after start, had it
    log.commit("h", 3, "other")
    log.commit("h", 4, "app-1")
    assert ids(tail.poll()) == [("h", 4)]
    # Without a grace (SQLite) nothing below the cursor is asked again.
    assert ids(tail.poll()) == [] and log.asked[-1][0] == 4


class Waits(threading.Event):
    """A stop event that records each wait and returns at once (the loop's timing, without sleeping)."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float | None] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout)
        return self.is_set()


def test_run_reports_an_unreachable_database_once_and_its_return():
    reports: list[str] = []
    emitted: list[dict[str, Any]] = []
    stop = Waits()
    down = OperationalError("SELECT 1", {}, Exception("connection refused"))
    outcomes = iter([down, down, down, None, "stop"])

    class Flaky:
        overflow = 0

        def poll(self) -> Iterator[dict[str, Any]]:
            outcome = next(outcomes)
            if isinstance(outcome, Exception):
                raise outcome
            if outcome == "stop":
                stop.set()
            yield {"history_id": 1}

    report = lambda exc: reports.append("down" if exc else "up")  # noqa: E731
    follow.run(Flaky(), emitted.append, stop, interval=0.5, retry_interval=2.0, report=report)  # type: ignore[arg-type]
    assert reports == ["down", "up"] and len(emitted) == 2
    assert stop.waits == [2.0, 2.0, 2.0, 0.5, 0.5]


def test_run_ends_when_the_reader_left():
    log = Log()
    tail = Tail(log.fetch)
    follow.run(tail, lambda row: None, threading.Event(), gone=lambda: True)  # returns, no wait


@pytest.mark.parametrize(
    "pattern", ["app-1", "app-*", "*-1", "app-?", "?", "*", "ap", "APP-*", "app-[12]", "a%", "app_1", "db-1*"]
)
def test_the_name_filter_matches_like_the_store(store: Store, pattern: str):
    names = [*NAMES, "a%b", "app_1", "app-[12]", "APP-1"]
    store.sync_watches([WatchSpec(n, "bucket", f"key/{n}", 60.0, None) for n in names], datetime.now(UTC))
    assert sorted(filter(name_matcher(pattern), names)) == sorted(store.watch_names(pattern))


def test_reader_gone_sees_a_closed_pipe():
    import os

    read_end, write_end = os.pipe()
    with os.fdopen(write_end, "w") as stream:
        gone = follow.reader_gone(stream)
        assert not gone()
        os.close(read_end)
        assert gone()


def test_reader_gone_is_false_for_a_file(tmp_path: Path):
    with (tmp_path / "out").open("w") as stream:
        assert not follow.reader_gone(stream)()


# --- the real command --------------------------------------------------------------------------------


def now() -> datetime:
    return datetime.now(UTC)


class Events:
    """Records real events through the Store: first_seen of a watch's key, and stale signals."""

    def __init__(self, store: Store) -> None:
        self.store = store
        specs = [WatchSpec(n, "bucket", f"key/{n}", 60.0, None) for n in NAMES]
        self.watches: dict[str, Watch] = store.sync_watches(specs, now()).watches
        self.seq = 0

    def change(self, name: str, etag: str) -> None:
        """One ETag change (the key's next one) committed as one batch."""
        when = now()
        state = self.store.load_states().get(self.watches[name].id)
        event = "first_seen" if state is None else "modified"
        new = ObjectState(f'"{etag}"', when, when, None, 3, True)
        result = PollResult(self.watches[name], when, "modified", 200, 1.0, state, new, event, None)
        assert self.store.record([result]) == {}

    def stale(self, name: str) -> None:
        """One watch signal."""
        self.seq += 1
        watch = self.watches[name]
        detail = {"deadline": "2026-11-24T07:30:00.000Z", "last_change_at": None, "rule": "expect_change_within 26h"}
        signal_ = Signal(watch.id, name, watch.key, "stale", now(), f"d{self.seq}", detail=json.dumps(detail))
        assert self.store.record_signals([signal_])


@pytest.fixture
def events(store: Store) -> Events:
    return Events(store)


@pytest.fixture
def cfg(config: ConfigFile, db_url: str) -> ConfigFile:
    """The test config, pointing at the store fixture's database (SQLite or PostgreSQL)."""
    watches = [{"name": n, "bucket": "bucket", "key": f"key/{n}"} for n in NAMES]
    return config.write(watches=watches, database={"url": db_url})


class Follow:
    """`poller history --follow` as a subprocess; threads read its stdout and stderr lines into queues."""

    def __init__(self, cfg: ConfigFile, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "poller", "history", "--follow", "-c", str(cfg.path), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.errors: queue.Queue[str | None] = queue.Queue()
        self.stderr_seen = ""
        for stream, into in ((self.proc.stdout, self.lines), (self.proc.stderr, self.errors)):
            threading.Thread(target=self._read, args=(stream, into), daemon=True).start()

    @staticmethod
    def _read(stream: Any, into: queue.Queue[str | None]) -> None:
        for line in stream:
            into.put(line.rstrip("\n"))
        into.put(None)

    def next(self, timeout: float = 30.0) -> str:
        """The next stdout line, within a deadline."""
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line from history --follow within {timeout}s: {self.stderr_seen}") from None
        if line is None:
            self.proc.wait(10)
            raise AssertionError(f"history --follow ended ({self.proc.returncode}): {self.stderr(10)}")
        return line

    def take(self, n: int) -> list[str]:
        return [self.next() for _ in range(n)]

    def stderr_until(self, text: str, timeout: float = 30.0) -> str:
        """stderr so far, once it holds ``text`` (within a deadline)."""
        deadline = time.monotonic() + timeout
        while text not in self.stderr_seen:
            try:
                line = self.errors.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"{text!r} not on stderr within {timeout}s: {self.stderr_seen!r}") from None
            if line is None:
                break
            self.stderr_seen += line + "\n"
        return self.stderr_seen

    def stderr(self, timeout: float = 30.0) -> str:
        """All of stderr, once the process has ended."""
        while (line := self.errors.get(timeout=timeout)) is not None:
            self.stderr_seen += line + "\n"
        return self.stderr_seen

    def stop(self, sig: int = signal.SIGINT) -> tuple[int, str]:
        self.proc.send_signal(sig)
        code = self.proc.wait(30)
        return code, self.stderr()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def following() -> Iterator[list[Follow]]:
    started: list[Follow] = []
    yield started
    for f in started:
        f.kill()


def start(following: list[Follow], cfg: ConfigFile, *args: str) -> Follow:
    f = Follow(cfg, *args)
    following.append(f)
    return f


def columns(line: str) -> list[str]:
    return line.split()


def test_follow_prints_the_backlog_then_each_new_event_and_ends_on_ctrl_c(
    cfg: ConfigFile, events: Events, following: list[Follow]
):
    for n in range(12):
        events.change("app-1", f"old{n}")
    f = start(following, cfg)
    assert columns(f.next())[:5] == ["time", "watch", "key", "event", "etag"]
    # The last 10 (the --follow default), oldest first.
    assert [columns(line)[4] for line in f.take(10)] == [f'"old{n}"' for n in range(2, 12)]
    events.change("app-2", "new1")
    line = f.next()
    assert columns(line)[1:5] == ["app-2", "key/app-2", "first_seen", '"new1"']
    events.stale("db-1")
    events.change("app-1", "new2")
    got = [columns(f.next())[1:4] for _ in range(2)]
    assert got == [["db-1", "key/db-1", "stale"], ["app-1", "key/app-1", "modified"]]
    # Fixed-width columns: the event column starts at the same place on every line.
    assert line.index("first_seen") == len("".ljust(27 + 2 + 16 + 2 + 24 + 2))
    code, err = f.stop(signal.SIGINT)
    assert (code, err) == (130, "")


def test_follow_jsonl_prints_cloudevents_and_ends_on_sigterm(cfg: ConfigFile, events: Events, following: list[Follow]):
    events.change("app-1", "e1")
    f = start(following, cfg, "--format", "jsonl", "--limit", "5")
    backlog = json.loads(f.next())
    assert (backlog["type"], backlog["data"]["etag"]) == ("io.poller.object.first_seen", '"e1"')
    events.stale("app-1")
    events.change("app-1", "e2")
    documents = [backlog] + [json.loads(f.next()) for _ in range(2)]
    assert [d["type"] for d in documents[1:]] == ["io.poller.watch.stale", "io.poller.object.modified"]
    for document in documents:
        assert list(VALIDATOR.iter_errors(document)) == []
    assert len({d["id"] for d in documents}) == 3
    assert f.stop(signal.SIGTERM) == (143, "")


def test_follow_csv_has_one_header(cfg: ConfigFile, events: Events, following: list[Follow]):
    f = start(following, cfg, "--format", "csv", "--since", "0s")
    assert f.next().startswith("time,watch,key,event,etag,")
    events.change("other", "c1")
    assert f.next().split(",")[1:5] == ["other", "key/other", "first_seen", '"""c1"""']
    f.stop()


def test_follow_a_glob_prints_only_its_watches(cfg: ConfigFile, events: Events, following: list[Follow]):
    events.change("db-1", "before")
    events.change("app-1", "before")
    f = start(following, cfg, "app-*")
    f.next()  # header
    assert columns(f.next())[1] == "app-1"  # the backlog is filtered too
    events.change("db-1", "x")
    events.stale("other")
    events.change("app-2", "y")
    events.stale("app-1")
    assert [columns(f.next())[1:4] for _ in range(2)] == [
        ["app-2", "key/app-2", "first_seen"],
        ["app-1", "key/app-1", "stale"],
    ]
    f.stop()


def test_follow_shows_what_once_records_from_s3(config: ConfigFile, s3: Any, bucket: str, following: list[Follow]):
    s3.put_object(Bucket=bucket, Key="drop/data.csv", Body=b"1")
    config.write([{"name": "vendor", "bucket": bucket, "key": "drop/data.csv"}])
    assert run_cli("once", "-c", str(config.path)).returncode == 0
    f = start(following, config, "--format", "jsonl")
    first = json.loads(f.next())
    s3.put_object(Bucket=bucket, Key="drop/data.csv", Body=b"2")
    assert run_cli("once", "-c", str(config.path)).returncode == 0
    second = json.loads(f.next())
    assert [first["type"], second["type"]] == ["io.poller.object.first_seen", "io.poller.object.modified"]
    assert second["data"]["previous_etag"] == first["data"]["etag"] != second["data"]["etag"]
    assert second["source"] == "/poller/watches/vendor" and second["subject"] == "drop/data.csv"
    assert f.stop() == (130, "")


def test_follow_refuses_json_and_unknown_watches(cfg: ConfigFile, events: Events):
    refused = run_cli("history", "--follow", "--format", "json", "-c", str(cfg.path))
    assert refused.returncode == 2 and "--format jsonl" in refused.stderr and refused.stdout == ""
    unknown = run_cli("history", "--follow", "nope-*", "-c", str(cfg.path))
    assert unknown.returncode == 1 and "no watch matches 'nope-*'" in unknown.stderr


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_follow_into_head_exits_quietly(cfg: ConfigFile, events: Events):
    events.change("app-1", "e1")
    # An idle follow whose reader has its lines: it notices the closed pipe without another write.
    head = subprocess.run(
        ["bash", "-c", f'set -o pipefail; "{sys.executable}" -m poller history -f -c "{cfg.path}" | head -2'],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (head.returncode, head.stderr) == (0, "")
    assert head.stdout.splitlines()[1].split()[4] == '"e1"'


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_follow_writing_into_a_closed_pipe_exits_quietly(cfg: ConfigFile, store: Store, events: Events):
    # A backlog far bigger than a pipe's buffer: the write itself fails (EPIPE), not the idle check.
    watch = events.watches["other"]
    when = now()
    rows = [dict(watch_id=watch.id, key=watch.key, detected_at=when, event="modified", etag=f'"{n:040}"', seq=n)
            for n in range(1, 3001)]  # fmt: skip
    with store.engine.begin() as conn:
        conn.execute(insert(etag_history), rows)
    proc = subprocess.Popen(
        [sys.executable, "-m", "poller", "history", "-f", "--limit", "0", "-c", str(cfg.path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().startswith(b"time")
    proc.stdout.close()
    assert proc.wait(60) == 0
    assert proc.stderr.read() == b""


@postgres_only
def test_follow_on_postgresql_prints_a_row_committed_after_a_higher_id_once(
    cfg: ConfigFile, store: Store, events: Events, following: list[Follow]
):
    watch = events.watches["app-1"]
    seq = iter(range(1, 100))

    def row(etag: str) -> dict[str, Any]:
        return {"watch_id": watch.id, "key": watch.key, "detected_at": now(), "event": "modified",
                "etag": f'"{etag}"', "seq": next(seq)}  # fmt: skip

    def etags(f: Follow, n: int) -> list[str]:
        return [json.loads(f.next())["data"]["etag"] for _ in range(n)]

    # In flight when the follow starts: A takes an id, B takes the next and commits.
    a = store.engine.connect()
    a_tx = a.begin()
    a.execute(insert(etag_history).values(row("a1")))
    with store.engine.begin() as b:
        b.execute(insert(etag_history).values(row("b1")))
    f = start(following, cfg, "--format", "jsonl")
    assert etags(f, 1) == ['"b1"']  # the backlog
    a_tx.commit()
    assert etags(f, 1) == ['"a1"']
    # While following: the same, A's lower id commits after B's higher one was printed.
    a_tx = a.begin()
    a.execute(insert(etag_history).values(row("a2")))
    with store.engine.begin() as b:
        b.execute(insert(etag_history).values(row("b2")))
    assert etags(f, 1) == ['"b2"']
    a_tx.commit()
    a.close()
    assert etags(f, 1) == ['"a2"']
    # Nothing printed twice: the next line is the next event.
    events.stale("app-1")
    assert json.loads(f.next())["type"] == "io.poller.watch.stale"
    assert f.stop() == (130, "")
    id_of = {r["etag"]: r["history_id"] for r in store.events_after(0, 0) if r["history_id"]}
    assert id_of['"a1"'] < id_of['"b1"'] < id_of['"a2"'] < id_of['"b2"']  # A's rows hold the lower ids


@postgres_only
def test_follow_keeps_trying_while_postgresql_refuses_connections(
    cfg: ConfigFile, events: Events, following: list[Follow], pg_server: PgServer, db_url: str
):
    name = db_url.rsplit("/", 1)[1]
    f = start(following, cfg, "--format", "jsonl")
    events.change("app-1", "before")
    assert json.loads(f.next())["data"]["etag"] == '"before"'
    events.store.close()
    pg_server.admin(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
    try:
        pg_server.admin(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'")
        f.stderr_until("still following")
        # Reported once, not once per attempt: the follow asks again every 2 s meanwhile.
        wait_for(lambda: _refused(pg_server, name) >= 3, timeout=30, what="three refused attempts")
    finally:
        pg_server.admin(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
    f.stderr_until("answers again")
    events.change("app-1", "after")
    assert json.loads(f.next())["data"]["etag"] == '"after"'
    code, err = f.stop()
    assert code == 130 and "Traceback" not in err
    assert err.count("still following") == 1 and err.count("answers again") == 1
    # The first failure is the terminated session or the refused reconnect, as the timing falls.
    first = err.splitlines()[0]
    assert "not currently accepting connections" in first or "server closed the connection" in first, first


def _refused(pg_server: PgServer, name: str) -> int:
    """Connection attempts the server refused for database ``name``, from its log."""
    return pg_server.log.read_text(errors="replace").count(f'database "{name}" is not currently accepting connections')
