"""Several daemons on one PostgreSQL database, end to end (issue 11): start them on one watch list,
overwrite, delete and re-create keys throughout, kill one with SIGKILL and start it again, then
compare what the database and a webhook receiver saw with what was done.

Shared by tests/test_cluster_daemons.py (CI size, moto) and bench/cluster.py (full size, rclone).
"""

from __future__ import annotations

import http.server
import itertools
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import text

from poller.cluster import shard_of
from poller.store import Store, open_engine
from poller.timetable import EPOCH, phase_of


@dataclass
class Plan:
    watches: int = 120
    interval: float = 1.0
    shards: int = 16
    lease: float = 3.0
    heartbeat: float = 1.0
    daemons: int = 3
    concurrency: int = 8
    mutate_seconds: float = 25.0
    mutation_rate: float = 6.0  # changes per second, over all keys
    kill_at: float = 5.0  # seconds into the mutation phase
    restart_at: float = 11.0
    settle: float = 30.0  # the longest wait for the history and the deliveries to catch up
    prefix: str = "cluster/"
    # Serve each daemon's Prometheus metrics on a port of its own, and sample them (run's ``scrape``)
    # at the edges of the steady windows: polls, skipped polls, lateness per daemon.
    metrics: bool = False
    progress: bool = False  # one line on stderr at each phase (a full-size run takes minutes)

    @property
    def steady_after(self) -> float:
        """Seconds from a balanced cluster to the steady window: the last claim's heartbeat has passed
        and the old holder's polls in flight have committed (2 intervals at a short interval)."""
        return max(2 * self.heartbeat, min(2 * self.interval, 10.0))

    @property
    def min_window_b(self) -> float:
        """The shortest steady window after the restart worth measuring."""
        return min(5 * self.interval, 30.0)

    @property
    def takeover_bound(self) -> float:
        """The documented bound: a dead daemon's lease runs out, a survivor's next heartbeat claims
        the shard, and the watch's next slot comes."""
        return self.lease + self.heartbeat + self.interval

    @property
    def key_gap(self) -> float:
        """Seconds between two changes of one key: every state stays long enough to be polled, even
        while its daemon is dead and not yet taken over."""
        return self.takeover_bound + self.interval + 2.0


class Receiver:
    """A webhook endpoint counting deliveries by event id, with the time of each."""

    def __init__(self) -> None:
        self.deliveries: dict[int, list[float]] = defaultdict(list)
        self._lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                # A CloudEvent (the default format): a change's data carries its etag_history id; the
                # check counts changes, so watch signals (no history id) are acknowledged and not counted.
                history_id = json.loads(body)["data"].get("history_id")
                with receiver._lock:
                    if history_id is not None:
                        receiver.deliveries[int(history_id)].append(time.time())
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def count(self) -> int:
        """How many distinct events were delivered."""
        with self._lock:
            return len(self.deliveries)

    def snapshot(self) -> dict[int, list[float]]:
        with self._lock:
            return {k: list(v) for k, v in self.deliveries.items()}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _toml(value: Any) -> str:
    return (
        json.dumps(value) if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)
    )


def write_config(
    path: Path, plan: Plan, endpoint: str, bucket: str, url: str, hook: str, metrics_port: int | None = None
) -> None:
    sections: dict[str, dict[str, Any]] = {
        "s3": {"endpoint_url": endpoint, "addressing_style": "path", "connect_timeout": "2s", "read_timeout": "5s"},
        "database": {"url": url},
        "schedule": {"interval": f"{plan.interval}s", "concurrency": plan.concurrency},
        "cluster": {"shards": plan.shards, "lease": f"{plan.lease}s", "heartbeat": f"{plan.heartbeat}s"},
    }
    if metrics_port is not None:
        sections["metrics"] = {"listen": f"127.0.0.1:{metrics_port}"}
    lines: list[str] = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml(v)}" for k, v in values.items()]
    for i in range(plan.watches):
        lines += ["[[watch]]", f'name = "w{i:05d}"', f'bucket = "{bucket}"', f'key = "{plan.prefix}k{i:05d}"']
    lines += ["[[notify]]", 'name = "hook"', 'type = "webhook"', f'url = "{hook}"', 'backoff = "0.5s"']
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    path.chmod(0o600)


class Daemon:
    def __init__(
        self, config: Path, log: Path, env: dict[str, str] | None = None, metrics_port: int | None = None
    ) -> None:
        self.log_path = log
        self.metrics_port = metrics_port  # as written in its config, if any
        self._log = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "poller", "run", "--config", str(config), "--log-level", "INFO"],
            stdout=self._log,
            stderr=self._log,
            env={**os.environ, **(env or {})},
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def _wait(condition: Callable[[], Any], timeout: float, what: str, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


@dataclass
class Sample:
    """Each live daemon's metrics and shards at one moment (the edge of a steady window)."""

    at: float  # time.monotonic()
    metrics: dict[int, dict[str, float]]  # by pid
    shards: dict[int, list[int]]  # by pid
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds so far, by process (run's ``cpu``)
    wall: float | None = None  # time.time() at ``at``: which schedule slots fall inside a window
    # time.time() as each daemon's metrics were read (scraping three loaded daemons takes a while)
    scraped: dict[int, float] = field(default_factory=dict)


@dataclass
class Report:
    figures: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    # (start, end) of each steady window, when the plan asked for metrics.
    windows: list[tuple[Sample, Sample]] = field(default_factory=list)


# Given {key: body}, creates the objects and returns {key: ETag}; the default PUTs them one by one.
Seed = Callable[[dict[str, bytes]], dict[str, str]]
Scrape = Callable[[int], dict[str, float]]
# Given the live daemons' pids, CPU seconds used so far by each process of interest (and the machine).
CpuProbe = Callable[[list[int]], dict[str, float]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(
    plan: Plan,
    s3: Any,
    endpoint: str,
    bucket: str,
    url: str,
    workdir: Path,
    env: dict[str, str] | None = None,
    *,
    seed: Seed | None = None,
    scrape: Scrape | None = None,
    cpu: CpuProbe | None = None,
) -> Report:
    """Run the whole scenario; the report's problems are empty when every guarantee held.

    ``seed`` creates the initial objects faster than one PUT each (the bench writes rclone's files);
    with ``plan.metrics``, ``scrape(port)`` reads a daemon's metrics at the steady windows' edges.
    """
    rng = random.Random(11)
    names = [f"w{i:05d}" for i in range(plan.watches)]
    keys = {name: f"{plan.prefix}k{i:05d}" for i, name in enumerate(names)}
    expected: dict[str, list[tuple[str, str | None]]] = {name: [] for name in names}
    present: dict[str, bool] = {}
    counter = Counter[str]()

    def put(name: str) -> str:
        counter[name] += 1
        body = f"{name}:{counter[name]}".encode()
        return str(s3.put_object(Bucket=bucket, Key=keys[name], Body=body)["ETag"])

    seeding = time.monotonic()
    if seed is None:
        for name in names:
            expected[name].append(("first_seen", put(name)))
    else:
        bodies = {}
        for name in names:
            counter[name] += 1
            bodies[keys[name]] = f"{name}:{counter[name]}".encode()
        etags = seed(bodies)
        for name in names:
            expected[name].append(("first_seen", etags[keys[name]]))
    present.update(dict.fromkeys(names, True))
    seeded_s = time.monotonic() - seeding

    receiver = Receiver()
    configs: list[tuple[Path, int | None]] = []

    def new_config(label: str) -> tuple[Path, int | None]:
        # One file per daemon when each serves its metrics on its own port; else one shared file.
        if not plan.metrics and configs:
            return configs[0]
        port = _free_port() if plan.metrics else None
        path = workdir / (f"cluster-{label}.toml" if plan.metrics else "cluster.toml")
        write_config(path, plan, endpoint, bucket, url, receiver.url, port)
        configs.append((path, port))
        return path, port

    def start_daemon(label: str, log_name: str) -> Daemon:
        path, port = new_config(label)
        return Daemon(path, workdir / log_name, env, port)

    store = Store(open_engine(url))
    daemons: list[Daemon] = []
    report = Report()
    report.figures["seed_objects_s"] = round(seeded_s, 1)

    def sample() -> Sample:
        at, wall = time.monotonic(), time.time()
        holders = {r["pid"]: list(r["shards"]) for r in store.cluster_status() if r["heartbeat_age"] < plan.lease}
        metrics, scraped = {}, {}
        for d in daemons:
            if scrape is not None and d.metrics_port is not None and d.proc.poll() is None:
                asked = time.time()
                metrics[d.proc.pid] = scrape(d.metrics_port)
                scraped[d.proc.pid] = (asked + time.time()) / 2
        used = cpu([d.proc.pid for d in daemons if d.proc.poll() is None]) if cpu is not None else {}
        return Sample(at, metrics, {pid: holders.get(pid, []) for pid in metrics}, used, wall, scraped)

    measuring = plan.metrics and scrape is not None
    begun = time.monotonic()

    def note(what: str) -> None:
        if plan.progress:
            print(
                f"[clusterrun {time.monotonic() - begun:6.1f}s {datetime.now(UTC):%H:%M:%S}] {what}",
                file=sys.stderr,
                flush=True,
            )

    note(f"{plan.watches} objects seeded; starting {plan.daemons} daemons")
    try:
        # Every config is written before the first start: writing a large watch list is no start-up time.
        made = [new_config(str(i)) for i in range(plan.daemons)]
        started = time.monotonic()
        daemons = [Daemon(path, workdir / f"daemon{i}.log", env, port) for i, (path, port) in enumerate(made)]

        def balanced(count: int) -> list[dict[str, Any]] | None:
            rows = [r for r in store.cluster_status() if r["heartbeat_age"] < plan.lease]
            # Every daemon near its fair share: no handover left to make.
            fewest = plan.shards - (count - 1) * -(-plan.shards // count)
            if len(rows) != count or any(len(r["shards"]) < max(fewest, 1) for r in rows):
                return None
            return rows if sum(len(r["shards"]) for r in rows) == plan.shards else None

        def first_seen_all() -> bool:
            with store.engine.connect() as conn:
                n = conn.execute(text("SELECT count(*) FROM etag_history WHERE event = 'first_seen'")).scalar()
            return n == plan.watches

        # Each daemon parses the whole watch list first (~6 s per 100,000 watches on a free core).
        _wait(lambda: balanced(plan.daemons), 60 + plan.watches / 1000, f"{plan.daemons} daemons to split the shards")
        report.figures["start_to_balanced_s"] = round(time.monotonic() - started, 1)
        note("shards split")
        # A watch is first polled at its phase, up to one interval after its daemon claims it; each
        # first sighting is a recorded change, so this phase costs more than the steady one.
        # Counting a large history costs the shared cores too: look less often.
        every = min(max(plan.watches / 30_000, 0.1), 2.0)
        _wait(first_seen_all, 60 + 2 * plan.interval + plan.watches / 100, "every key's first sighting", every)
        report.figures["start_to_first_seen_all_s"] = round(time.monotonic() - started, 1)
        note("every first sighting recorded")
        # Their deliveries are start-up work too (one webhook call each): the steady window starts after.
        try:
            _wait(lambda: receiver.count() >= plan.watches, 60 + plan.watches / 100, "the first sightings' deliveries")
        except AssertionError as exc:
            report.problems.append(str(exc))
        report.figures["start_to_first_deliveries_s"] = round(time.monotonic() - started, 1)
        note("every first sighting delivered")
        time.sleep(plan.steady_after)  # let the last handover's watches reach their next slot
        steady_a = datetime.now(UTC)
        note("steady window A begins")
        window_a = sample() if measuring else None
        window_b: Sample | None = None

        last_change: dict[str, float] = {name: 0.0 for name in names}
        t0 = time.monotonic()
        killed_at: datetime | None = None
        victim_shards: list[int] = []
        restarted_at: float | None = None
        steady_b: datetime | None = None
        changes = 0
        next_change = t0

        def going(elapsed: float) -> bool:
            # Past the planned length, go on (up to 20 s more) until the steady window after the
            # restart is at least a few intervals long.
            if elapsed < plan.mutate_seconds:
                return True
            long_enough = steady_b is not None and datetime.now(UTC) - steady_b >= timedelta(seconds=plan.min_window_b)
            return not long_enough and elapsed < plan.mutate_seconds + 20 + plan.min_window_b

        while going(elapsed := time.monotonic() - t0):
            if killed_at is None and elapsed >= plan.kill_at:
                victim = daemons[1]
                rows = [r for r in store.cluster_status() if r["pid"] == victim.proc.pid]
                victim_shards = rows[0]["shards"] if rows else []
                if window_a is not None:
                    report.windows.append((window_a, sample()))
                victim.proc.send_signal(signal.SIGKILL)
                victim.proc.wait()
                killed_at = datetime.now(UTC)
                note("steady window A ends; daemon killed")
            if restarted_at is None and elapsed >= plan.restart_at:
                daemons.append(start_daemon("restarted", "daemon-restarted.log"))
                restarted_at = time.monotonic()
                note("daemon restarted")
            if steady_b is None and restarted_at is not None and balanced(plan.daemons):
                # After the rebalance's handover, and one interval on: the moved watches have had
                # their first slot with their new holder, and the restarted daemon its start-up.
                settle_b = plan.heartbeat + max(plan.steady_after, plan.interval)
                steady_b = datetime.now(UTC) + timedelta(seconds=settle_b)
            if measuring and window_b is None and steady_b is not None and datetime.now(UTC) >= steady_b:
                window_b = sample()
                note("steady window B begins")
            now = time.monotonic()
            if now < next_change:
                time.sleep(min(next_change - now, 0.05))
                continue
            next_change += 1.0 / plan.mutation_rate
            # Most keys are eligible: a few random draws, not a scan of every name 20 times a second
            # (at 90,000 watches that scan alone took a good share of a core from the daemons).
            drawn = (rng.choice(names) for _ in range(32))
            name = next((n for n in drawn if now - last_change[n] >= plan.key_gap), "")
            if not name:
                eligible = [n for n in names if now - last_change[n] >= plan.key_gap]
                if not eligible:
                    continue
                name = rng.choice(eligible)
            if not present[name]:
                expected[name].append(("created", put(name)))
                present[name] = True
            elif rng.random() < 0.3:
                s3.delete_object(Bucket=bucket, Key=keys[name])
                expected[name].append(("deleted", None))
                present[name] = False
            else:
                expected[name].append(("modified", put(name)))
            last_change[name] = time.monotonic()
            changes += 1
        mutation_end = datetime.now(UTC)
        note("steady window B ends; checking")
        if window_b is not None:
            report.windows.append((window_b, sample()))
        if steady_b is None:
            steady_b = mutation_end
            report.problems.append("the restarted daemon did not get a share of the shards before the end")
        total = sum(len(v) for v in expected.values())
        report.figures.update(changes=changes, expected_history_rows=total)

        def history_rows() -> int:
            with store.engine.connect() as conn:
                return int(conn.execute(text("SELECT count(*) FROM etag_history")).scalar_one())

        try:
            _wait(lambda: history_rows() >= total, plan.settle, "the history to catch up")
        except AssertionError as exc:
            report.problems.append(str(exc))

        def delivered_all() -> bool:
            with store.engine.connect() as conn:
                ids = {r[0] for r in conn.execute(text("SELECT id FROM etag_history"))}
            return ids <= set(receiver.snapshot())

        try:
            _wait(delivered_all, plan.settle, "every event's delivery")
        except AssertionError as exc:
            report.problems.append(str(exc))
        for d in daemons:
            d.stop()
        daemons = []
        _check(plan, store, names, expected, receiver.snapshot(), report, steady_a, killed_at, steady_b, mutation_end)
        _check_takeover(plan, store, names, victim_shards, killed_at, report)
    finally:
        for d in daemons:
            d.proc.kill()
            d.stop()
        receiver.close()
        store.close()
    return report


def _check(
    plan: Plan,
    store: Store,
    names: list[str],
    expected: dict[str, list[tuple[str, str | None]]],
    deliveries: dict[int, list[float]],
    report: Report,
    steady_a: datetime,
    killed_at: datetime | None,
    steady_b: datetime,
    mutation_end: datetime,
) -> None:
    with store.engine.connect() as conn:
        ids = {r[0]: r[1] for r in conn.execute(text("SELECT id, name FROM watches"))}
        recorded: dict[str, list[tuple[str, str | None]]] = defaultdict(list)
        history_ids: list[int] = []
        for watch_id, event, etag, hid in conn.execute(
            text("SELECT watch_id, event, etag, id FROM etag_history ORDER BY watch_id, seq")
        ):
            recorded[ids[watch_id]].append((event, etag))
            history_ids.append(hid)
        dup_rows = conn.execute(
            text(
                "SELECT count(*) FROM (SELECT watch_id, key, event, etag, previous_etag FROM etag_history "
                "GROUP BY watch_id, key, event, etag, previous_etag HAVING count(*) > 1) AS d"
            )
        ).scalar_one()
        polls: dict[str, list[datetime]] = defaultdict(list)
        for watch_id, polled_at in conn.execute(
            text("SELECT watch_id, polled_at FROM poll_samples_view ORDER BY polled_at")
        ):
            polls[ids[watch_id]].append(polled_at)
    # rclone serve s3 can answer a HEAD racing a DELETE with 200 and ETag "" (the file went between
    # its stat and its hash): a state the server did report, counted apart, not a poller change.
    blips = 0
    for name, rows in recorded.items():
        kept = [r for i, r in enumerate(rows) if not _empty_etag_blip(rows, i)]
        blips += len(rows) - len(kept)
        recorded[name] = kept
    report.figures["server_empty_etag_blips"] = blips
    missing = sum(max(len(expected[n]) - len(recorded.get(n, [])), 0) for n in names)
    wrong = [n for n in names if recorded.get(n, []) != expected[n]]
    extra = sum(max(len(recorded.get(n, [])) - len(expected[n]), 0) for n in names)
    report.figures.update(
        history_rows=len(history_ids),
        duplicate_history_rows=int(dup_rows),
        missing_changes=missing,
        extra_changes=extra,
    )
    if dup_rows or missing or extra or wrong:
        sample = wrong[0] if wrong else ""
        report.problems.append(
            f"history differs from the changes made: {dup_rows} duplicated, {missing} missing, {extra} extra, "
            f"{len(wrong)} keys differ"
            + (f" (e.g. {sample}: made {expected[sample]}, recorded {recorded.get(sample)})" if sample else "")
        )
    # No key polled twice in one interval while the daemons are steady. A watch's slots are its
    # phase plus k intervals (poller/timetable.py); a poll starts at or after its slot, and the next
    # slot's poll is skipped while one is still queued: one daemon puts at most one poll in a slot.
    windows = [(steady_a, killed_at or mutation_end), (steady_b, mutation_end)]
    report.figures["steady_windows_s"] = [round(max((e - s).total_seconds(), 0.0), 1) for s, e in windows]
    doubled: set[str] = set()
    gaps: list[float] = []
    polled = 0
    for start, end in windows:
        if end <= start:
            continue
        for name in names:
            inside = [t for t in polls[name] if start <= t < end]
            polled += len(inside)
            phase = phase_of(name, plan.interval)
            slots = Counter(math.floor(((t - EPOCH).total_seconds() - phase) / plan.interval + 1e-3) for t in inside)
            if any(n > 1 for n in slots.values()):
                doubled.add(name)
            gaps += [(b - a).total_seconds() for a, b in itertools.pairwise(inside)]
    gaps.sort()
    report.figures.update(
        keys_polled_twice_in_an_interval=len(doubled),
        steady_min_gap_s=round(gaps[0], 3) if gaps else None,
        steady_p99_gap_s=round(gaps[int(len(gaps) * 0.99)], 3) if gaps else None,
        steady_polls_per_s=round(polled / max(sum((e - s).total_seconds() for s, e in windows if e > s), 1e-9)),
        demanded_polls_per_s=round(plan.watches / plan.interval),
    )
    if doubled:
        report.problems.append(
            f"{len(doubled)} keys polled twice in one interval in steady state, e.g. {sorted(doubled)[:3]}"
        )
    # Every event delivered; more than once only if the killed daemon had it in hand.
    kill_ts = killed_at.timestamp() if killed_at else float("inf")
    undelivered = [h for h in history_ids if h not in deliveries]
    twice = {h: times for h, times in deliveries.items() if len(times) > 1}
    unexplained = [h for h, times in twice.items() if not times[0] <= kill_ts]
    report.figures.update(
        events_delivered=len([h for h in history_ids if h in deliveries]),
        undelivered=len(undelivered),
        delivered_twice_across_the_kill=len(twice) - len(unexplained),
        delivered_twice_in_steady_state=len(unexplained),
    )
    if undelivered:
        report.problems.append(f"{len(undelivered)} events never delivered")
    if unexplained:
        report.problems.append(f"{len(unexplained)} events delivered more than once outside the kill")


def _empty_etag_blip(rows: list[tuple[str, str | None]], i: int) -> bool:
    """A change to ETag "" right before a deletion (the deletion seen half done)."""
    return rows[i] == ("modified", '""') and i + 1 < len(rows) and rows[i + 1][0] == "deleted"


def _check_takeover(
    plan: Plan, store: Store, names: list[str], shards: list[int], killed_at: datetime | None, report: Report
) -> None:
    if killed_at is None:
        report.problems.append("no daemon was killed")
        return
    orphans = [n for n in names if shard_of(n, plan.shards) in set(shards)]
    with store.engine.connect() as conn:
        firsts = dict(
            conn.execute(
                text(
                    "SELECT w.name, min(p.polled_at) FROM poll_samples_view p JOIN watches w ON w.id = p.watch_id "
                    "WHERE p.polled_at > :t GROUP BY w.name"
                ),
                {"t": killed_at},
            ).all()
        )
    delays = sorted((firsts[n] - killed_at).total_seconds() for n in orphans if n in firsts)
    never = len(orphans) - len(delays)
    worst = delays[-1] if delays else None
    report.figures.update(
        killed_daemon_watches=len(orphans),
        takeover_max_s=round(worst, 2) if worst is not None else None,
        takeover_bound_s=plan.takeover_bound,
    )
    if not orphans:
        report.problems.append("the killed daemon held no watches")
    if never:
        report.problems.append(f"{never} of the killed daemon's watches were never polled again")
    # A second of slack: the claim's own transaction, the poll itself, a loaded machine.
    if worst is not None and worst > plan.takeover_bound + 1.0:
        report.problems.append(f"takeover took {worst:.2f}s, beyond the bound of {plan.takeover_bound:.1f}s")
