"""poller's benchmark: `python -m bench` (full) or `python -m bench --quick` (under 2 minutes).

`python -m bench --store-write` (the writer on SQLite and PostgreSQL, side by side: bench/store_write.py)
and `--cluster` (several daemons on one PostgreSQL: bench/cluster.py; `--cluster-target` at the
issue's size, 3 daemons x 30,000 watches at 60 s) run those modes instead.

Sets up everything itself on 127.0.0.1, measures the poller and its peers on the same keys and
server, prints a table, and prints one JSON object as the last line of output.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench.servers import BUCKET, Server, client, free_port, start_moto_with_latency, start_rclone

CONCURRENCY = 32
TARGET_RATE = 100_000 / 60  # polls/s: 100,000 watches at a 60 s interval
SATURATION_RATE = 5_000  # polls/s demanded to find the ceiling (above what 2 cores reach)
# The issue's cluster target: 3 daemons x 30,000 watches at 60 s (1,500 polls/s demanded).
CLUSTER_TARGET = ["--watches", "90000", "--interval", "60", "--seconds", "300", "--lease", "15", "--heartbeat", "3"]
CLUSTER_TARGET += ["--json-key", "cluster_target"]


# --- peers ------------------------------------------------------------------------------


def _conditional_head(s3: Any, server: Server, key: str) -> None:
    try:
        s3.head_object(Bucket=BUCKET, Key=key, IfNoneMatch=server.etags[key])
    except s3.exceptions.ClientError as exc:
        if exc.response["Error"]["Code"] != "304":
            raise


def sequential_loop(server: Server, seconds: float) -> float:
    """What a user writes by hand: one boto3 client, one conditional HEAD after another."""
    s3 = client(server.endpoint, 1)
    done, deadline, i = 0, time.monotonic() + seconds, 0
    start = time.monotonic()
    while time.monotonic() < deadline:
        _conditional_head(s3, server, server.keys[i % len(server.keys)])
        done, i = done + 1, i + 1
    return done / (time.monotonic() - start)


def head_cpu_us(server: Server, seconds: float) -> dict[str, float]:
    """CPU µs per conditional HEAD, one thread, boto3 against the lean path (same keys, same server)."""
    from poller.config import S3Settings
    from poller.probe import prober_for

    s3 = client(server.endpoint, 1)
    lean = prober_for(S3Settings(endpoint_url=server.endpoint, addressing_style="path", max_attempts=1), 1).lean
    assert lean is not None

    def measure(one: Any) -> float:
        done, i = 0, 0
        cpu0, deadline = time.process_time(), time.monotonic() + seconds / 2
        while time.monotonic() < deadline:
            one(server.keys[i % len(server.keys)])
            done, i = done + 1, i + 1
        return round((time.process_time() - cpu0) / done * 1e6, 1)

    return {
        "boto3_head_cpu_us": measure(lambda key: _conditional_head(s3, server, key)),
        "lean_head_cpu_us": measure(lambda key: lean.head(BUCKET, key, {"IfNoneMatch": server.etags[key]})),
    }


def thread_pool(server: Server, seconds: float, threads: int = CONCURRENCY) -> float:
    """The raw ceiling: a bare boto3 thread pool, no scheduling, no storage."""
    s3 = client(server.endpoint, threads + 4)
    counts = [0] * threads
    deadline = time.monotonic() + seconds

    def worker(n: int) -> None:
        i = n
        while time.monotonic() < deadline:
            _conditional_head(s3, server, server.keys[i % len(server.keys)])
            counts[n] += 1
            i += threads

    start = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(worker, range(threads)))
    return sum(counts) / (time.monotonic() - start)


WRK_SCRIPT = """
local paths = {}
local etags = {}
for line in io.lines("%s") do
  local p, e = line:match("([^\\t]+)\\t(.+)")
  paths[#paths + 1] = p
  etags[#etags + 1] = e
end
local i = 0
request = function()
  i = i %% #paths + 1
  return wrk.format("HEAD", paths[i], {["If-None-Match"] = etags[i]})
end
"""


def wrk_ceiling(server: Server, seconds: float, workdir: Path) -> float | None:
    """The server's own ceiling: wrk sending the same conditional HEADs (None if wrk is missing)."""
    import shutil

    if shutil.which("wrk") is None:
        return None
    table = workdir / "wrk-paths.tsv"
    table.write_text("".join(f"/{BUCKET}/{k}\t{server.etags[k]}\n" for k in server.keys[:10_000]))
    script = workdir / "wrk.lua"
    script.write_text(WRK_SCRIPT % table)
    out = subprocess.run(
        ["wrk", "-t2", f"-c{CONCURRENCY}", f"-d{max(int(seconds), 1)}s", "-s", str(script), server.endpoint],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
    ).stdout
    for line in out.splitlines():
        if line.startswith("Requests/sec:"):
            return float(line.split()[1])
    return None


# --- the poller ---------------------------------------------------------------------------


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("poller_") and " " in line:
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def _quantile(before: dict[str, float], after: dict[str, float], name: str, q: float) -> float | None:
    """A quantile from the delta of a Prometheus histogram (linear within the bucket)."""
    buckets = []
    for metric, value in after.items():
        if metric.startswith(f"{name}_bucket{{le="):
            le = metric.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), value - before.get(metric, 0.0)))
    buckets.sort()
    total = buckets[-1][1] if buckets else 0
    if not total:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == float("inf"):
                return lower
            inside = count - below
            return lower + (le - lower) * ((rank - below) / inside if inside else 0)
        lower, below = le, count
    return lower


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run_poller(
    server: Server,
    n_watches: int,
    seconds: float,
    workdir: Path,
    rate: float = TARGET_RATE,
    saturated: bool = False,
    concurrency: int | None = CONCURRENCY,
) -> dict[str, Any]:
    """Run `poller run` with ``n_watches`` watches at a dense schedule (``rate`` polls/s demanded) and measure.

    ``concurrency`` None leaves the config's default ceiling (threads start as the work needs them).
    """
    interval = max(n_watches / rate, 0.2)
    run = workdir / f"poller-{n_watches}-{rate:.0f}-{concurrency or 'auto'}"
    run.mkdir()
    metrics_port = free_port()
    keys = server.keys
    lines = [
        "[s3]",
        f'endpoint_url = "{server.endpoint}"',
        'addressing_style = "path"',
        "max_attempts = 1",
        "[database]",
        f'url = "sqlite:///{run / "poller.db"}"',
        "[schedule]",
        f'interval = "{interval:.3f}s"',
        *([f"concurrency = {concurrency}"] if concurrency else []),
        "[metrics]",
        f'listen = "127.0.0.1:{metrics_port}"',
    ]
    for i in range(n_watches):
        lines += ["[[watch]]", f'name = "w{i}"', f'bucket = "{BUCKET}"', f'key = "{keys[i % len(keys)]}"']
    (run / "poller.toml").write_text("\n".join(lines) + "\n")
    notify_path = run / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(600)
    env = {
        **os.environ,
        "NOTIFY_SOCKET": str(notify_path),
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench-secret",
    }
    started = time.monotonic()
    log = (run / "daemon.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "poller", "run", "--config", str(run / "poller.toml"), "--log-level", "WARNING"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    try:
        while b"READY=1" not in notify.recv(65536):
            pass
        startup = time.monotonic() - started
        # Keep reading STATUS= lines, as systemd does: a queue left full makes each send wait.
        threading.Thread(target=_drain, args=(notify,), daemon=True).start()
        at_ready = _threads(proc.pid)  # the daemon's own threads and its first 4 workers
        # Warm-up: every watch's first (unconditional) poll recorded, a first sighting each, which
        # costs several times a steady poll; the window below measures the steady state only.
        first_pass = _wait_first_pass(metrics_port, n_watches, timeout=max(900.0, 10 * interval))
        time.sleep(min(interval, 5.0))
        before, cpu0, t0 = _scrape(metrics_port), _cpu_seconds(proc.pid), time.monotonic()
        time.sleep(seconds)
        after, cpu1, t1 = _scrape(metrics_port), _cpu_seconds(proc.pid), time.monotonic()
        rss = _peak_rss_mb(proc.pid)
        threads = _threads(proc.pid)
    finally:
        stopping = time.monotonic()
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            # Say where it hangs (py-spy, when installed) rather than only that it did.
            spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
            dump = subprocess.run([spy, "dump", "--pid", str(proc.pid)], capture_output=True, text=True, check=False)
            (run / "hang.txt").write_text(dump.stdout + dump.stderr)
            print(f"poller did not stop within 60 s of SIGTERM; py-spy dump in {run / 'hang.txt'}:\n{dump.stdout}")
            proc.kill()
            proc.wait(10)
        stop_s = time.monotonic() - stopping
        notify.close()
        log.close()

    def polls(m: dict[str, float]) -> float:
        return sum(v for k, v in m.items() if k.startswith("poller_polls_total{"))

    done = polls(after) - polls(before)
    errors = sum(v for k, v in after.items() if k.startswith("poller_errors_total{"))
    db = run / "poller.db"
    return {
        "watches": n_watches,
        "interval_s": round(interval, 3),
        "demanded_polls_per_s": round(n_watches / interval, 1),
        "polls_per_s": round(done / (t1 - t0), 1),
        "cpu_s_per_1000_polls": round((cpu1 - cpu0) / done * 1000, 3) if done else None,
        "lateness_p50_s": _round(_quantile(before, after, "poller_schedule_lateness_seconds", 0.5)),
        "lateness_p99_s": _round(_quantile(before, after, "poller_schedule_lateness_seconds", 0.99)),
        "peak_rss_mb": round(rss, 1),
        "startup_s": round(startup, 2),
        "first_pass_s": None if first_pass is None else round(first_pass, 1),
        "stop_s": round(stop_s, 2),
        "errors": int(errors),
        "skipped": int(after.get("poller_skipped_polls_total", 0) - before.get("poller_skipped_polls_total", 0)),
        "threads": threads,
        "workers": threads - at_ready + 4,
        "concurrency": concurrency or "default",
        "saturation": saturated or rate > TARGET_RATE,
        "db": str(db),
    }


def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(65536):
            pass
    except OSError:  # closed at the end of the run
        return


def _wait_first_pass(port: int, n_watches: int, timeout: float) -> float | None:
    """Seconds until every watch's first sighting is committed (None: not within ``timeout``)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        seen = _scrape(port).get('poller_changes_total{event="first_seen"}', 0.0)
        if seen >= n_watches:
            return time.monotonic() - started
        time.sleep(1.0)
    return None


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def signature_check(workdir: Path, n_keys: int) -> dict[str, Any]:
    """The lean HEAD path against rclone checking SigV4 (``--auth-key``): every poll must be accepted,
    and a wrong secret must be refused (proof that the server really checks)."""
    from poller.config import S3Settings
    from poller.model import Watch
    from poller.probe import prober_for

    server = start_rclone(workdir, n_keys, auth=("bench", "bench-secret"))
    try:
        settings = S3Settings(endpoint_url=server.endpoint, addressing_style="path", max_attempts=1)
        prober = prober_for(settings, 4)
        results = [prober.probe(Watch(i, f"w{i}", BUCKET, key), None) for i, key in enumerate(server.keys)]
        accepted = sum(r.http_status == 200 for r in results)
        os.environ["AWS_SECRET_ACCESS_KEY"] = "not-the-secret"
        try:
            refused = prober_for(settings, 1).probe(Watch(0, "w", BUCKET, server.keys[0]), None).http_status
        finally:
            os.environ["AWS_SECRET_ACCESS_KEY"] = "bench-secret"
    finally:
        server.close()
    return {"lean_signed_heads": len(results), "lean_signed_heads_accepted": accepted, "wrong_secret_status": refused}


# --- database figures -------------------------------------------------------------------


def table_bytes(db: Path, tables: dict[str, tuple[str, ...]]) -> dict[str, int]:
    """Bytes on disk per table, its indexes included (SQLite's dbstat)."""
    conn = sqlite3.connect(db)
    try:
        sizes = dict(conn.execute("SELECT name, sum(pgsize) FROM dbstat GROUP BY name").fetchall())
    finally:
        conn.close()
    return {t: sum(int(sizes.get(n, 0)) for n in (t, *idx)) for t, idx in tables.items()}


def db_figures(db: Path) -> dict[str, Any]:
    """Bytes of the poll log (runs and samples) per 1,000,000 polls, and per history event, measured
    on a benchmark run's database."""
    conn = sqlite3.connect(db)
    try:
        n_polls = conn.execute("SELECT COALESCE(sum(count), 0) FROM poll_runs").fetchone()[0]
        n_events = conn.execute("SELECT count(*) FROM etag_history").fetchone()[0]
    finally:
        conn.close()
    sizes = table_bytes(
        db,
        {
            "poll_runs": ("ix_poll_runs_watch_id_first_at", "ix_poll_runs_ended_at", "ix_poll_runs_open"),
            "poll_samples": (),
            "etag_history": ("ix_etag_history_watch_id_detected_at", "ix_etag_history_detected_at"),
        },
    )
    poll_log = sizes["poll_runs"] + sizes["poll_samples"]
    return {
        "db_mb_per_million_polls": round(poll_log / max(n_polls, 1) * 1_000_000 / 2**20, 1),
        "db_bytes_per_history_event": round(sizes["etag_history"] / max(n_events, 1)),
        "polls_measured": n_polls,
    }


def history_latency(workdir: Path, rows: int) -> dict[str, Any]:
    """`poller history --since 1h` on a database with ``rows`` poll runs spread over 30 days (ended
    ones: each stands for a change or an error and the polls around it)."""
    from poller.store import Store, migrate, open_engine

    db = workdir / "history.db"
    engine = open_engine(f"sqlite:///{db}")
    migrate(engine)
    engine.dispose()
    conn = sqlite3.connect(db)
    now = datetime.now(UTC)
    conn.executemany(
        "INSERT INTO watches (id, name, bucket, key, kind, active, created_at) VALUES (?, ?, 'b', ?, 'key', 1, ?)",
        [(i, f"w{i}", f"k{i}", now.isoformat()) for i in range(1, 1001)],
    )
    step_ms = 30 * 86_400_000 // rows
    now_ms = int(now.timestamp() * 1000)
    # Spread the runs over the last 30 days, newest last, each 3 polls long.
    conn.execute(
        """
        WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < ? - 1)
        INSERT INTO poll_runs (watch_id, outcome, http_status, etag, first_at, last_at, ended_at, count,
                               duration_min_us, duration_sum_us, duration_max_us)
        SELECT 1 + i % 1000, 0, 304, '"0123456789abcdef0123456789abcdef"',
               ? - (? - i) * ?, ? - (? - i) * ? + 2, ? - (? - i) * ? + 2, 3, 4200, 12600, 4200
        FROM n
        """,
        (rows, now_ms, rows, step_ms, now_ms, rows, step_ms, now_ms, rows, step_ms),
    )
    conn.commit()
    conn.close()
    config = workdir / "history.toml"
    config.write_text(f'[database]\nurl = "sqlite:///{db}"\n')
    store = Store(open_engine(f"sqlite:///{db}", readonly=True))
    timings = []
    for _ in range(5):
        t = time.perf_counter()
        got = store.history(since=now - timedelta(hours=1), limit=100)
        timings.append(time.perf_counter() - t)
    store.close()
    t = time.perf_counter()
    cli = subprocess.run(
        [sys.executable, "-m", "poller", "history", "--since", "1h", "--config", str(config)],
        capture_output=True,
        text=True,
    )
    cli_s = time.perf_counter() - t
    assert cli.returncode == 0, cli.stderr
    return {
        "history_rows": rows,
        "history_query_ms": round(min(timings) * 1000, 1),
        "history_rows_returned": len(got),
        "history_cli_ms": round(cli_s * 1000),
        "history_db_mb": round(db.stat().st_size / 2**20),
    }


# --- main ---------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a spot check in under 2 minutes")
    parser.add_argument(
        "--store-write", action="store_true", help="instead: Store.record on SQLite and PostgreSQL (bench.store_write)"
    )
    parser.add_argument(
        "--cluster", action="store_true", help="instead: 3 daemons on one PostgreSQL, kill -9 (bench.cluster)"
    )
    parser.add_argument(
        "--latency",
        action="store_true",
        help="instead: 100,000 watches at 60 s against rclone behind 20/50/80 ms of netem round trip (bench.latency)",
    )
    parser.add_argument(
        "--cluster-target",
        action="store_true",
        help="instead: 3 daemons x 30,000 watches at 60 s on one PostgreSQL: sustained rate, lateness (bench.cluster)",
    )
    parser.add_argument("--prefix", action="store_true", help="instead: 10 prefixes x 100,000 keys (bench.prefix)")
    args = parser.parse_args()
    if args.store_write or args.cluster or args.cluster_target or args.latency or args.prefix:
        modes = [
            argv
            for argv, on in (
                (["bench.latency"], args.latency),
                (["bench.prefix"], args.prefix),
                (["bench.store_write"], args.store_write),
                (["bench.cluster"], args.cluster),
                (["bench.cluster", *CLUSTER_TARGET], args.cluster_target),
            )
            if on
        ]
        raise SystemExit(run_modes(modes))
    # Local servers only: dummy credentials, never real ones (and never an AWS endpoint).
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench-secret", AWS_DEFAULT_REGION="us-east-1")
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        os.environ.pop(var, None)
    sizes = [1000] if args.quick else [1000, 10_000, 100_000]
    window = 5.0 if args.quick else 20.0
    history_rows = 200_000 if args.quick else 10_000_000
    result: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "quick": args.quick,
        "concurrency": CONCURRENCY,
        "regimes": {},
    }
    with tempfile.TemporaryDirectory(prefix="poller-bench-") as tmp:
        workdir = Path(tmp)
        regimes = [
            ("client_bound", lambda: start_rclone(workdir, max(sizes))),
            ("latency_bound", lambda: start_moto_with_latency(1000 if args.quick else 2000)),
        ]
        for label, start in regimes:
            server = start()
            regime_dir = workdir / label
            regime_dir.mkdir()
            try:
                figures: dict[str, Any] = {"server": server.name}
                figures["sequential_boto3_per_s"] = round(sequential_loop(server, window / 2), 1)
                figures["boto3_pool_per_s"] = round(thread_pool(server, window), 1)
                if label == "client_bound":
                    figures.update(head_cpu_us(server, window / 2))
                figures["wrk_per_s"] = wrk_ceiling(server, window, regime_dir) if label == "client_bound" else None
                runs = []
                for n in sizes if label == "client_bound" else [len(server.keys)]:
                    # moto answers at most ~600/s here: 1,667/s demanded saturates the latency-bound regime.
                    runs.append(run_poller(server, n, window, regime_dir, saturated=label == "latency_bound"))
                if label == "client_bound":
                    # The ceiling: more demanded than the poller can do, so polls/s is its maximum.
                    n = min(sizes[-1], 10_000)
                    runs.append(run_poller(server, n, window, regime_dir, rate=SATURATION_RATE))
                figures["poller"] = runs
                best = max(r["polls_per_s"] for r in runs)
                figures["poller_vs_pool"] = round(best / figures["boto3_pool_per_s"], 2)
                figures["poller_vs_sequential"] = round(best / figures["sequential_boto3_per_s"], 2)
                if figures["wrk_per_s"]:
                    figures["poller_vs_wrk"] = round(best / figures["wrk_per_s"], 3)
                figures.update(db_figures(Path(runs[-1].pop("db"))))
                for r in runs[:-1]:
                    r.pop("db")
                result["regimes"][label] = figures
            finally:
                server.close()
        result["history"] = history_latency(workdir, history_rows)
        result["signatures"] = signature_check(workdir / "signed", 200)
    print_table(result)
    print(json.dumps(result, separators=(",", ":")))


def run_modes(modes: list[list[str]]) -> int:
    """Run each mode (a module and its arguments) as its own process (each starts its own PostgreSQL),
    pass its table through, and print their JSON objects merged as the last line."""
    merged: dict[str, Any] = {}
    status = 0
    for module, *argv in modes:
        proc = subprocess.run([sys.executable, "-m", module, *argv], stdout=subprocess.PIPE, text=True, check=False)
        lines = proc.stdout.rstrip("\n").splitlines()
        print("\n".join(lines[:-1]) + "\n")
        try:
            merged.update(json.loads(lines[-1]))
        except (IndexError, ValueError):
            merged[module] = {"failed": proc.returncode}
        status = status or proc.returncode
    print(json.dumps(merged, separators=(",", ":")))
    return status


def print_table(result: dict[str, Any]) -> None:
    print(f"machine: {result['machine']}; concurrency {result['concurrency']}")
    for label, f in result["regimes"].items():
        print(f"\n[{label}] {f['server']}")
        if f.get("wrk_per_s"):
            wrk = f"{f['wrk_per_s']:.0f}/s"
        else:
            wrk = "not measured (client-bound regime only; needs Debian's wrk)"
        print(
            f"  peers: sequential boto3 {f['sequential_boto3_per_s']:.0f}/s, boto3 pool {f['boto3_pool_per_s']:.0f}/s,"
            f" wrk {wrk}"
        )
        print(
            f"  {'watches':>8} {'demand/s':>9} {'polls/s':>8} {'cpu s/1k':>8} {'late p50':>8} {'late p99':>8}"
            f" {'RSS MB':>7} {'start s':>7} {'errors':>6}"
        )
        for r in f["poller"]:
            print(
                f"  {r['watches']:>8}{'*' if r['saturation'] else ' '}{r['demanded_polls_per_s']:>9} "
                f"{r['polls_per_s']:>8} "
                f"{r['cpu_s_per_1000_polls']!s:>8} {r['lateness_p50_s']!s:>8} {r['lateness_p99_s']!s:>8} "
                f"{r['peak_rss_mb']:>7} {r['startup_s']:>7} {r['errors']:>6}"
            )
        if "lean_head_cpu_us" in f:
            print(
                f"  CPU per conditional HEAD, one thread: boto3 {f['boto3_head_cpu_us']} µs, "
                f"lean path {f['lean_head_cpu_us']} µs"
            )
        ratios = f"poller/pool {f['poller_vs_pool']}, poller/sequential {f['poller_vs_sequential']}"
        if f.get("poller_vs_wrk"):
            ratios += f", poller/wrk {f['poller_vs_wrk']}"
        if any(r["saturation"] for r in f["poller"]):
            print("  * saturation run: more polls demanded than the poller can do; polls/s is its ceiling")
        print(f"  ratios (poller's best polls/s): {ratios}")
        print(
            f"  database: {f['db_mb_per_million_polls']} MB per 1,000,000 polls, "
            f"{f['db_bytes_per_history_event']} bytes per history event"
        )
    sig = result["signatures"]
    print(
        f"\nlean path vs rclone checking SigV4: {sig['lean_signed_heads_accepted']}/{sig['lean_signed_heads']} "
        f"signed HEADs accepted; a wrong secret gets {sig['wrong_secret_status']}"
    )
    h = result["history"]
    print(
        f"\nhistory --since 1h on {h['history_rows']:,} poll runs ({h['history_db_mb']} MB): "
        f"query {h['history_query_ms']} ms, whole CLI {h['history_cli_ms']} ms"
    )


if __name__ == "__main__":
    main()
