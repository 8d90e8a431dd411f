"""Prefix watches at scale: `python -m bench.prefix` (also `python -m bench --prefix`).

Creates ``--prefixes`` x ``--keys-per-prefix`` objects (default 10 x 100,000 = 1,000,000) as files
in a directory that ``rclone serve s3`` serves (bucket = top directory, key = path; `--auth-key`, so
every signature is checked), and runs the real daemon (`python -m poller run`) with one prefix watch
per prefix at ``--interval`` (default 10 min). The watches' names are chosen so that their phases
coincide: every pass of every prefix starts at the same slot, and the bench changes files on disk
in the quiet time between two slots.

Passes measured: the first (every key's first sighting), a steady one with 0 changes, one with
``--changes`` (default 1,000: a third modified, a third created, a third deleted), and, after a
restart on the populated database, one more with 0 changes. For each: the time from the slot to the
last prefix's commit, the daemon's own list time, requests (counted by a pipe in front of rclone),
lateness of each pass start against its slot (from the committed ``last_polled_at``), the daemon's
CPU, bytes it wrote (write syscalls, its log excluded: the SQLite WAL and checkpoints), and the
history rows it added checked against the changes made (each exactly once, nothing else).

rclone's ListObjectsV2 lists the whole prefix for every page it answers (cmd/serve/s3/backend.go:
entryListR, then pager), so one pass over n keys costs it O(n^2 / 1,000): the bench measures its
pages/s at the chosen size before starting and says so when rclone, not the daemon, will set the
pass time. rclone keeps its directory listing cached (`--dir-cache-time`); after changing files the
bench refreshes it through rclone's remote control (`vfs/refresh`), so a listing never mixes states.
Measured on 2 cores: 0.69 pages/s at 100,000 keys per prefix (145 s to list one prefix alone, so
~1,450 s of rclone per round at 10 x 100,000: beyond a 10-min interval, slots are skipped and the run
takes over an hour), 4 pages/s at 10,000 keys; `--prefixes 100 --keys-per-prefix 10000` keeps
1,000,000 keys with ~250 s of rclone per round, so the daemon's own figures show.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
from botocore.exceptions import ClientError

from bench.__main__ import _cpu_seconds, _drain, _peak_rss_mb, _scrape, close_notify_socket, notify_socket
from bench.profile import Spy, print_summary, profile_summary
from bench.servers import BUCKET, client, free_port, wait_http
from poller.timetable import EPOCH, phase_of

AUTH = ("bench", "bench-secret")
PHASE_WINDOW = 0.5  # seconds: every watch's slot falls within this much of the round's slot
FIRST_SLOT_LEAD = 20.0  # seconds from launching the daemon to the first slot (its start-up fits in it)


# --- the layout on disk ---------------------------------------------------------------------


def prefix_of(p: int) -> str:
    return f"p{p:02d}/"


def key_of(p: int, i: int) -> str:
    return f"{prefix_of(p)}key-{i:06d}.json"


def body_of(p: int, i: int, version: int) -> bytes:
    """The object's content; a new version has the same size and another MD5 (rclone's ETag), so only
    the ETag tells the change."""
    return f'{{"p": {p}, "i": {i:06d}, "v": {version:03d}}}'.encode()


def create_keys(bucket_dir: Path, prefixes: int, keys_per_prefix: int) -> None:
    """Write every object as a file in the served directory (far faster than PUTs)."""
    for p in range(prefixes):
        d = bucket_dir / prefix_of(p)
        d.mkdir(parents=True, exist_ok=True)
        for i in range(keys_per_prefix):
            (d / f"key-{i:06d}.json").write_bytes(body_of(p, i, 0))


@dataclass
class ChangePlan:
    """The keys one round changes: modified (same size, new content), created, deleted."""

    modified: list[tuple[int, int]] = field(default_factory=list)  # (prefix, index)
    deleted: list[tuple[int, int]] = field(default_factory=list)
    created: list[str] = field(default_factory=list)  # keys

    def expected(self) -> dict[str, str]:
        """The history event each changed key must get, by key."""
        out = {key_of(p, i): "modified" for p, i in self.modified}
        out.update((key_of(p, i), "deleted") for p, i in self.deleted)
        out.update((key, "created") for key in self.created)
        return out


def plan_changes(prefixes: int, keys_per_prefix: int, n: int, round_no: int, seed: int = 13) -> ChangePlan:
    """``n`` changes spread over the prefixes: a third modified, a third deleted (never the same key),
    the rest created, at keys drawn at random (deterministically) among the original ones."""
    plan = ChangePlan()
    n_modified, n_deleted = n // 3, n // 3
    n_created = n - n_modified - n_deleted
    rng = random.Random(seed + round_no)
    for p in range(prefixes):
        share_m = n_modified // prefixes + (p < n_modified % prefixes)
        share_d = n_deleted // prefixes + (p < n_deleted % prefixes)
        share_c = n_created // prefixes + (p < n_created % prefixes)
        if share_m + share_d > keys_per_prefix:
            raise ValueError(f"{n} changes do not fit in {prefixes} prefixes of {keys_per_prefix} keys")
        picked = rng.sample(range(keys_per_prefix), share_m + share_d)
        plan.modified += [(p, i) for i in picked[:share_m]]
        plan.deleted += [(p, i) for i in picked[share_m:]]
        plan.created += [f"{prefix_of(p)}new-r{round_no}-{j:06d}.json" for j in range(share_c)]
    return plan


def apply_changes(bucket_dir: Path, plan: ChangePlan, round_no: int) -> None:
    """Make the planned changes on disk; a modified file also gets a later mtime."""
    later = time.time() + 1
    for p, i in plan.modified:
        path = bucket_dir / key_of(p, i)
        path.write_bytes(body_of(p, i, round_no))
        os.utime(path, (later, later))
    for p, i in plan.deleted:
        (bucket_dir / key_of(p, i)).unlink()
    for key in plan.created:
        (bucket_dir / key).write_bytes(key.encode())


def check_history(expected: dict[str, str], recorded: list[tuple[str, str]]) -> dict[str, int]:
    """Recorded (key, event) rows against the expected event per key: ``exact`` is 1 when every
    expected change is recorded exactly once and nothing else is."""
    seen: dict[str, int] = {}
    unexpected = 0
    for key, event in recorded:
        if expected.get(key) != event:
            unexpected += 1
            continue
        seen[key] = seen.get(key, 0) + 1
    missing = sum(1 for key in expected if key not in seen)
    duplicates = sum(n - 1 for n in seen.values())
    return {
        "expected": len(expected),
        "recorded": len(recorded),
        "missing": missing,
        "duplicates": duplicates,
        "unexpected": unexpected,
        "exact": int(missing == duplicates == unexpected == 0),
    }


def aligned_names(prefixes: int, interval: float, first_slot: float) -> list[str]:
    """Watch names whose phase (poller.timetable.phase_of) puts their slot within PHASE_WINDOW after
    ``first_slot`` (epoch seconds, modulo the interval): every prefix's passes start together."""
    target = (first_slot - EPOCH.timestamp()) % interval
    names = []
    for p in range(prefixes):
        n = 0
        while True:
            name = f"prefix-{p:02d}-{n}"
            if (phase_of(name, interval) - target) % interval < min(PHASE_WINDOW, interval / 10):
                names.append(name)
                break
            n += 1
    return names


def slot_before(name: str, interval: float, at: datetime) -> datetime:
    """The latest slot of watch ``name`` at or before ``at``: the scheduled start of the pass started at ``at``."""
    anchor = EPOCH.timestamp() + phase_of(name, interval)
    k = (at.timestamp() - anchor) // interval
    return datetime.fromtimestamp(anchor + k * interval, UTC)


# --- rclone and the request count ------------------------------------------------------------


class CountingPipe:
    """A TCP pipe in front of rclone that counts the HTTP requests going through it.

    The tests' fault proxy reads whole responses by Content-Length; rclone answers lists chunked,
    so this one relays bytes as they come and counts request lines (`` HTTP/1.1\\r\\n``) upstream.
    """

    MARK = b" HTTP/1.1\r\n"

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.requests = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="counting-pipe", daemon=True)
        self._thread.start()
        self.port = free_port()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", self.port), self._loop
        ).result(10)
        self.endpoint = f"http://127.0.0.1:{self.port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pump(reader, up_writer, True), self._pump(up_reader, writer, False))

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, count: bool) -> None:
        tail = b""
        try:
            while data := await src.read(1 << 16):
                if count:
                    # The tail is shorter than the mark: no mark is counted twice, none split is lost.
                    self.requests += (tail + data).count(self.MARK)
                    tail = data[-(len(self.MARK) - 1) :]
                dst.write(data)
                await dst.drain()
        except ConnectionError:
            pass
        finally:
            dst.close()

    def close(self) -> None:
        async def shutdown() -> None:
            # Pumps ended here, on the running loop: left to the garbage collector, they would close
            # their streams on a closed loop (an unraisable RuntimeError in whatever test runs then).
            self._server.close()
            pumps = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


class Rclone:
    """``rclone serve s3`` over ``root`` checking signatures, with its remote control for refreshes."""

    def __init__(self, root: Path, log: Path) -> None:
        binary = shutil.which("rclone") or str(Path(sys.executable).with_name("rclone"))
        self.port, self.rc_port = free_port(), free_port()
        argv = [binary, "serve", "s3", "--addr", f"127.0.0.1:{self.port}", "--config", "/dev/null"]
        argv += ["--auth-key", ",".join(AUTH)]
        # The listing stays cached until the bench refreshes it (vfs/refresh) after its changes: a
        # cache expiring in the middle of a pass would shift page boundaries under the daemon.
        argv += ["--dir-cache-time", "10000h", "--rc", "--rc-addr", f"127.0.0.1:{self.rc_port}", "--rc-no-auth"]
        self.log = log.open("wb")
        self.proc = subprocess.Popen([*argv, str(root)], stdout=self.log, stderr=self.log)
        self.endpoint = f"http://127.0.0.1:{self.port}"
        wait_http(self.endpoint + "/")

    def refresh(self, dirs: list[str]) -> None:
        """Make rclone read these directories again (it caches listings)."""
        for d in dirs:
            body = json.dumps({"dir": d, "recursive": "true"}).encode()
            req = urllib.request.Request(
                f"http://127.0.0.1:{self.rc_port}/vfs/refresh", data=body, headers={"Content-Type": "application/json"}
            )
            answer = json.loads(urllib.request.urlopen(req, timeout=600).read())
            if answer.get("result", {}).get(d) != "OK":
                raise RuntimeError(f"rclone vfs/refresh {d}: {answer}")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()


def server_check(endpoint: str, keys_per_prefix: int, pages: int = 3) -> dict[str, Any]:
    """rclone's own pace at this size: seconds per 1,000-key page of one prefix (the first ``pages``),
    and proof that it lists the files and checks signatures (a wrong secret is refused)."""
    os.environ.update(AWS_ACCESS_KEY_ID=AUTH[0], AWS_SECRET_ACCESS_KEY=AUTH[1])
    s3 = client(endpoint, 4)
    listed, token, started, done = 0, None, time.perf_counter(), 0
    while done < pages:
        done += 1
        kwargs: dict[str, Any] = {"Bucket": BUCKET, "Prefix": prefix_of(0), "MaxKeys": 1000}
        if token:
            kwargs["ContinuationToken"] = token
        page = s3.list_objects_v2(**kwargs)
        listed += len(page.get("Contents", []))
        token = page.get("NextContinuationToken")
        if not token:
            break
    seconds = time.perf_counter() - started
    # A session of its own: boto3's default session keeps the credentials it resolved first.
    wrong = boto3.session.Session(aws_access_key_id=AUTH[0], aws_secret_access_key="not-the-secret")
    try:
        wrong.client("s3", endpoint_url=endpoint, region_name="us-east-1").list_objects_v2(
            Bucket=BUCKET, Prefix=prefix_of(0), MaxKeys=1
        )
        refused: int | None = None
    except ClientError as exc:
        refused = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    expect = min(keys_per_prefix, pages * 1000)
    if listed != expect:
        raise RuntimeError(f"rclone listed {listed} keys of {prefix_of(0)} in {done} pages, expected {expect}")
    per_page = seconds / done
    return {
        "rclone_s_per_page": round(per_page, 3),
        "rclone_pages_per_s": round(1 / per_page, 2),
        "rclone_s_per_prefix_pass": round(per_page * -(-keys_per_prefix // 1000), 1),
        "wrong_secret_status": refused,
    }


# --- the daemon -------------------------------------------------------------------------------


def write_config(run: Path, endpoint: str, names: list[str], interval: float, max_keys: int, metrics_port: int) -> Path:
    lines = [
        "[s3]",
        f'endpoint_url = "{endpoint}"',
        'addressing_style = "path"',
        # rclone answers a page of a large prefix slowly (it lists the whole prefix for each page).
        'read_timeout = "900s"',
        "[database]",
        f'url = "sqlite:///{run / "poller.db"}"',
        "[metrics]",
        f'listen = "127.0.0.1:{metrics_port}"',
    ]
    for p, name in enumerate(names):
        lines += ["[[watch]]", f'name = "{name}"', f'bucket = "{BUCKET}"', f'prefix = "{prefix_of(p)}"']
        lines += [f"max_keys = {max_keys}", f'interval = "{interval:g}s"']
    path = run / "poller.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


class Daemon:
    """`python -m poller run` as a subprocess with a NOTIFY_SOCKET and a metrics port."""

    def __init__(self, run: Path, config: Path, metrics_port: int, label: str) -> None:
        self.run, self.metrics_port = run, metrics_port
        self.notify, self._notify_path = notify_socket()
        self.notify.settimeout(1800)
        env = {**os.environ, "NOTIFY_SOCKET": str(self._notify_path)}
        env.update(AWS_ACCESS_KEY_ID=AUTH[0], AWS_SECRET_ACCESS_KEY=AUTH[1])
        self.log_path = run / "daemon.log"
        self.log = self.log_path.open("ab")
        started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "poller", "run", "--config", str(config), "--log-level", "WARNING"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=self.log,
        )
        while b"READY=1" not in self.notify.recv(65536):
            pass
        self.startup_s = time.monotonic() - started
        self.rss_at_ready_mb = _rss_mb(self.proc.pid)
        # Keep reading STATUS= lines, as systemd does: a queue left full makes each send wait.
        threading.Thread(target=_drain, args=(self.notify,), daemon=True).start()

    def counters(self) -> dict[str, float]:
        """What the bench compares before and after a round."""
        metrics = _scrape(self.metrics_port)
        polls = sum(v for k, v in metrics.items() if k.startswith("poller_polls_total{"))
        errors = metrics.get('poller_polls_total{outcome="error"}', 0.0)
        return {
            "t": time.monotonic(),
            "cpu": _cpu_seconds(self.proc.pid),
            "wchar": _wchar(self.proc.pid) - self.log_path.stat().st_size,
            "polls": polls,
            "errors": errors,
            "duration_sum": metrics.get("poller_poll_duration_seconds_sum", 0.0),
            "skipped": metrics.get("poller_skipped_polls_total", 0.0),
        }

    def stop(self) -> float:
        """SIGTERM; seconds until it exited."""
        started = time.monotonic()
        self.proc.terminate()
        try:
            self.proc.wait(300)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        close_notify_socket(self.notify, self._notify_path)
        self.log.close()
        return time.monotonic() - started


def _wchar(pid: int) -> int:
    """Bytes the process handed to write syscalls (files and pipes; socket sends are not counted)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    return 0


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


# --- the database, read-only ----------------------------------------------------------------------


def _db(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)


def pass_starts(db: Path) -> dict[str, datetime | None]:
    """The committed start of each prefix watch's latest pass, by watch name."""
    conn = _db(db)
    try:
        rows = conn.execute(
            "SELECT w.name, s.last_polled_at FROM watches w LEFT JOIN object_state s "
            "ON s.watch_id = w.id AND s.key = w.key WHERE w.kind = 'prefix' AND w.active"
        ).fetchall()
    finally:
        conn.close()
    return {name: None if at is None else _utc(at) for name, at in rows}


def _utc(text: str) -> datetime:
    at = datetime.fromisoformat(text)
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def last_history_id(db: Path) -> int:
    conn = _db(db)
    try:
        return int(conn.execute("SELECT COALESCE(max(id), 0) FROM etag_history").fetchone()[0])
    finally:
        conn.close()


def history_since(db: Path, after_id: int) -> list[tuple[str, str]]:
    conn = _db(db)
    try:
        return [(k, e) for k, e in conn.execute("SELECT key, event FROM etag_history WHERE id > ?", (after_id,))]
    finally:
        conn.close()


def first_sightings_since(db: Path, after_id: int) -> dict[str, int]:
    """Counts of a first pass's history rows, without holding a million keys in memory."""
    conn = _db(db)
    try:
        rows, distinct, firsts = conn.execute(
            "SELECT count(*), count(DISTINCT watch_id || '/' || key), sum(event = 'first_seen') "
            "FROM etag_history WHERE id > ?",
            (after_id,),
        ).fetchone()
    finally:
        conn.close()
    return {"rows": rows, "distinct_keys": distinct, "first_seen": firsts or 0}


def db_files_mb(db: Path) -> float:
    return round(sum(p.stat().st_size for p in db.parent.glob(db.name + "*") if p.is_file()) / 2**20, 1)


# --- one round ----------------------------------------------------------------------------------


def wait_round(daemon: Daemon, db: Path, names: list[str], after: datetime, timeout: float) -> dict[str, datetime]:
    """Wait until every prefix watch has committed a pass started after ``after``; their starts."""
    deadline = time.monotonic() + timeout
    while True:
        if daemon.proc.poll() is not None:
            raise RuntimeError(f"the daemon exited ({daemon.proc.returncode}); see {daemon.log_path}")
        starts = pass_starts(db)
        done = {n: at for n, at in starts.items() if at is not None and at >= after}
        if len(done) == len(names):
            return done
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(done)}/{len(names)} prefixes listed within {timeout:.0f} s")
        time.sleep(0.5)


def measure_round(
    label: str,
    daemon: Daemon,
    db: Path,
    pipe: CountingPipe,
    names: list[str],
    interval: float,
    after: datetime,
    history_from: int,
    profile: Path | None,
) -> dict[str, Any]:
    """Everything about the first round of passes started after ``after`` (counters from now on)."""
    before, requests0 = daemon.counters(), pipe.requests
    out = profile / (re.sub(r"[^a-z0-9]+", "-", label).strip("-") + ".txt") if profile is not None else None
    spy = Spy(daemon.proc.pid, out, gil=True, nonblocking=True) if out is not None else None
    try:
        starts = wait_round(daemon, db, names, after, timeout=max(3 * interval, 3600.0))
    finally:
        if spy is not None:
            spy.stop()
    done, requests1 = daemon.counters(), pipe.requests
    spied = profile_summary(out) if out is not None and out.exists() else None
    lateness = [(at - slot_before(n, interval, at)).total_seconds() for n, at in starts.items()]
    slot = min(slot_before(n, interval, at) for n, at in starts.items())
    passes = done["polls"] - before["polls"]
    return {
        "pass": label,
        "slot_to_commit_s": round(time.time() - slot.timestamp(), 1),
        "list_s_mean": round((done["duration_sum"] - before["duration_sum"]) / passes, 2) if passes else None,
        "passes": int(passes),
        "requests": requests1 - requests0,
        "lateness_max_s": round(max(lateness), 3),
        "lateness_mean_s": round(sum(lateness) / len(lateness), 3),
        "cpu_s": round(done["cpu"] - before["cpu"], 1),
        "db_bytes_written": int(done["wchar"] - before["wchar"]),
        "errors": int(done["errors"] - before["errors"]),
        "skipped": int(done["skipped"] - before["skipped"]),
        "peak_rss_mb": round(_peak_rss_mb(daemon.proc.pid), 1),
        "history_from": history_from,
        **({"profile": spied} if spied is not None else {}),
    }


# --- main -------------------------------------------------------------------------------------


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    prefixes, kpp, interval = args.prefixes, args.keys_per_prefix, args.interval
    root = workdir / "rclone"
    bucket_dir = root / BUCKET
    result: dict[str, Any] = {"prefixes": prefixes, "keys_per_prefix": kpp, "keys": prefixes * kpp}
    result["interval_s"] = interval
    t = time.perf_counter()
    create_keys(bucket_dir, prefixes, kpp)
    result["create_s"] = round(time.perf_counter() - t, 1)
    rclone = Rclone(root, workdir / "rclone.log")
    pipe = CountingPipe(rclone.port)
    daemon: Daemon | None = None
    try:
        result["server"] = server_check(rclone.endpoint, kpp)
        run_dir = workdir / "poller"
        run_dir.mkdir()
        db = run_dir / "poller.db"
        metrics_port = free_port()
        first_slot = time.time() + FIRST_SLOT_LEAD
        names = aligned_names(prefixes, interval, first_slot)
        max_keys = kpp + args.changes + 1000
        config = write_config(run_dir, pipe.endpoint, names, interval, max_keys, metrics_port)
        profile = Path(args.profile).resolve() if args.profile else None
        if profile is not None:
            profile.mkdir(parents=True, exist_ok=True)
        rounds: list[dict[str, Any]] = []

        daemon = Daemon(run_dir, config, metrics_port, "fresh")
        result["startup_fresh_s"] = round(daemon.startup_s, 2)
        result["rss_at_ready_fresh_mb"] = round(daemon.rss_at_ready_mb, 1)
        if time.time() > first_slot:
            print(f"note: start-up passed the first slot; the first pass waits one interval ({interval:g} s)")
        launched = datetime.fromtimestamp(time.time() - daemon.startup_s, UTC)

        # 1: the first pass, every key a first sighting.
        mark = last_history_id(db)
        first = measure_round("first", daemon, db, pipe, names, interval, launched, mark, profile)
        first["launch_to_commit_s"] = round(time.time() - launched.timestamp(), 1)
        first["history"] = first_sightings_since(db, mark)
        first["history"]["exact"] = int(
            first["history"]["rows"]
            == first["history"]["distinct_keys"]
            == first["history"]["first_seen"]
            == prefixes * kpp
        )
        rounds.append(first)

        # 2: nothing changed.
        mark = last_history_id(db)
        steady = measure_round("steady, 0 changes", daemon, db, pipe, names, interval, _now(), mark, profile)
        steady["history"] = check_history({}, history_since(db, mark))
        rounds.append(steady)

        # 3: changes made on disk between two slots.
        plan = plan_changes(prefixes, kpp, args.changes, 1)
        mark = last_history_id(db)
        apply_changes(bucket_dir, plan, 1)
        rclone.refresh([f"{BUCKET}/{prefix_of(p).rstrip('/')}" for p in range(prefixes)])
        changed = measure_round(f"{args.changes} changes", daemon, db, pipe, names, interval, _now(), mark, profile)
        changed["history"] = check_history(plan.expected(), history_since(db, mark))
        rounds.append(changed)

        # 4: restart on the populated database, then a pass that must find nothing new.
        result["stop_s"] = round(daemon.stop(), 2)
        daemon = Daemon(run_dir, config, metrics_port, "restart")
        result["startup_restart_s"] = round(daemon.startup_s, 2)
        result["rss_at_ready_restart_mb"] = round(daemon.rss_at_ready_mb, 1)
        if not args.no_restart_pass:
            mark = last_history_id(db)
            again = measure_round("after restart, 0 changes", daemon, db, pipe, names, interval, _now(), mark, profile)
            again["history"] = check_history({}, history_since(db, mark))
            rounds.append(again)
        result["rounds"] = rounds
        result["db_mb"] = db_files_mb(db)
        result["peak_rss_mb"] = max(r["peak_rss_mb"] for r in rounds)
        result["stop_restart_s"] = round(daemon.stop(), 2)
        daemon = None
    finally:
        if daemon is not None:
            daemon.stop()
        pipe.close()
        rclone.close()
    return result


def _now() -> datetime:
    return datetime.now(UTC)


def print_table(r: dict[str, Any]) -> None:
    s = r["server"]
    print(
        f"prefix watches: {r['prefixes']} prefixes x {r['keys_per_prefix']:,} keys = {r['keys']:,} objects, "
        f"interval {r['interval_s']:g} s (files written in {r['create_s']} s)"
    )
    print(
        f"rclone serve s3 (--auth-key; a wrong secret gets {s['wrong_secret_status']}): "
        f"{s['rclone_pages_per_s']} list pages/s at this size, "
        f"{s['rclone_s_per_prefix_pass']} s to list one prefix alone"
    )
    serial = s["rclone_s_per_prefix_pass"] * r["prefixes"]
    verdict = (
        "rclone, not the daemon, sets the pass time: it lists the whole prefix for every page it answers "
        "(O(n^2/1000) per pass); fewer keys per prefix list faster"
        if serial > r["interval_s"] / 2
        else "within the interval"
    )
    print(f"  rclone alone needs ~{serial:.0f} s of listing per round ({r['prefixes']} prefixes): {verdict}")
    print(
        f"start-up (READY=1): fresh {r['startup_fresh_s']} s (RSS {r['rss_at_ready_fresh_mb']} MB), "
        f"restart on the populated database {r['startup_restart_s']} s (RSS {r['rss_at_ready_restart_mb']} MB); "
        f"stop {r['stop_s']} s"
    )
    head = (
        f"  {'pass':<26} {'slot->commit s':>14} {'list s':>8} {'requests':>8} {'late max s':>10} "
        f"{'CPU s':>7} {'µs/key':>6} {'DB bytes written':>16} {'history rows':>12} {'B/row':>6} {'exact':>5} "
        f"{'errors':>6} {'RSS MB':>7}"
    )
    print(head)
    for x in r["rounds"]:
        h = x["history"]
        rows = h.get("recorded", h.get("rows"))
        per_key = x["cpu_s"] / r["keys"] * 1e6
        per_row = f"{x['db_bytes_written'] / rows:.0f}" if rows else "-"
        print(
            f"  {x['pass']:<26} {x['slot_to_commit_s']:>14} {x['list_s_mean']!s:>8} {x['requests']:>8} "
            f"{x['lateness_max_s']:>10} {x['cpu_s']:>7} {per_key:>6.0f} {x['db_bytes_written']:>16,} {rows:>12,} "
            f"{per_row:>6} {h['exact']:>5} {x['errors']:>6} {x['peak_rss_mb']:>7}"
        )
    for x in r["rounds"]:
        if "profile" in x:
            print_summary(x["pass"], x["profile"])
    print(
        f"  (list s: the daemon's own time per prefix pass, list and diff; µs/key: the daemon's CPU per key "
        f"listed; B/row: bytes written per history row; DB bytes written: the daemon's write "
        f"syscalls, its log excluded; exact 1: every change recorded exactly once, nothing else); "
        f"database {r['db_mb']} MB, peak RSS {r['peak_rss_mb']} MB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.prefix", description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefixes", type=int, default=10)
    parser.add_argument("--keys-per-prefix", type=int, default=100_000)
    parser.add_argument("--interval", type=float, default=600.0, help="seconds between passes (default 600)")
    parser.add_argument("--changes", type=int, default=1000, help="changes made before the third pass")
    parser.add_argument("--no-restart-pass", action="store_true", help="measure the restart's start-up only")
    parser.add_argument("--profile", metavar="DIR", help="record each pass with py-spy (raw stacks) into DIR")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (files, database, logs)")
    args = parser.parse_args()
    if args.interval < 10:
        parser.error("--interval must be at least 10 s (the first slot is 20 s after launch)")
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        os.environ.pop(var, None)
    workdir = Path(tempfile.mkdtemp(prefix="poller-bench-prefix-"))
    try:
        result = run(args, workdir)
    finally:
        if args.keep:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print_table(result)
    print(json.dumps({"prefix": result}, separators=(",", ":")))


if __name__ == "__main__":
    main()
