"""poller's benchmark: `python -m bench` (full) or `python -m bench --quick` (under 90 s).

`python -m bench --scale` (key watches at 100,000 to 1,000,000: bench/scale.py), `--latency` (the
client behind 20-80 ms of round trip: bench/latency.py), `--store-write` (the writer on SQLite and
PostgreSQL, side by side: bench/store_write.py) and `--cluster` (several daemons on one PostgreSQL:
bench/cluster.py; `--cluster-target` at the issue's size, 3 daemons x 30,000 watches at 60 s) run
those modes instead.

Sets up everything itself on 127.0.0.1, measures the poller and its peers on the same keys and
server (rclone checking every signature; peers: boto3 pools of 1, 4, 8 and 32 threads, botocore's
signer + a urllib3 pool on 1, 8 and 32 threads, and a bare loop of the daemon's own lean HEAD),
prints a table, and prints one JSON object as the last line of output.
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
import urllib.parse
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.profile import Spy, print_summary, profile_summary
from bench.servers import (
    AUTH,
    BUCKET,
    Server,
    client,
    free_port,
    start_moto_with_latency,
    start_rclone,
    use_bench_credentials,
)

if TYPE_CHECKING:
    from poller.lean import LeanHead

CONCURRENCY = 32
BOTO3_THREADS = (1, 4, 8, 32)  # boto3 pools measured; the best one is the boto3 peer
URLLIB3_THREADS = (1, 8, 32)  # botocore signer + urllib3 pools measured; the best one is that peer
TARGET_RATE = 100_000 / 60  # polls/s: 100,000 watches at a 60 s interval
SATURATION_RATE = 5_000  # polls/s demanded to find the ceiling (above what 2 cores reach)
# The cluster target: 3 daemons x 30,000 watches at 60 s (1,500 polls/s demanded).
CLUSTER_TARGET = ["--watches", "90000", "--interval", "60", "--seconds", "300", "--lease", "15", "--heartbeat", "3"]
CLUSTER_TARGET += ["--json-key", "cluster_target"]


# --- peers ------------------------------------------------------------------------------


def _conditional_head(s3: Any, server: Server, key: str) -> None:
    try:
        s3.head_object(Bucket=BUCKET, Key=key, IfNoneMatch=server.etags[key])
    except s3.exceptions.ClientError as exc:
        if exc.response["Error"]["Code"] != "304":
            raise


def head_cpu_us(server: Server, seconds: float) -> dict[str, float]:
    """CPU µs per conditional HEAD, one thread, boto3 against the lean path (same keys, same server)."""
    s3 = client(server.endpoint, 1)
    lean = _lean(server, 1)

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


def run_threads(one: Callable[[str], object], keys: list[str], seconds: float, threads: int) -> float:
    """Calls per second of ``one(key)`` from ``threads`` threads for ``seconds``, each taking the keys in turn."""
    counts = [0] * threads
    deadline = time.monotonic() + seconds

    def worker(n: int) -> None:
        i = n
        while time.monotonic() < deadline:
            one(keys[i % len(keys)])
            counts[n] += 1
            i += threads

    start = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(worker, range(threads)))
    return sum(counts) / (time.monotonic() - start)


def thread_pool(server: Server, seconds: float, threads: int = CONCURRENCY) -> float:
    """A bare boto3 thread pool sending conditional HEADs: no scheduling, no storage."""
    s3 = client(server.endpoint, threads + 4)
    return run_threads(lambda key: _conditional_head(s3, server, key), server.keys, seconds, threads)


def boto3_pools(server: Server, seconds: float, thread_counts: tuple[int, ...] = BOTO3_THREADS) -> dict[int, float]:
    """polls/s of a boto3 pool per thread count: boto3's best setup depends on the server and the GIL."""
    return {threads: round(thread_pool(server, seconds, threads), 1) for threads in thread_counts}


def botocore_urllib3(server: Server, seconds: float, threads: int) -> float:
    """What a user writes to go faster than boto3: botocore's SigV4 signer (frozen credentials, one
    signer) and one urllib3 connection pool, sending the same conditional HEADs from ``threads`` threads."""
    import boto3
    import urllib3
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest

    credentials = boto3.Session().get_credentials()
    assert credentials is not None, "the bench sets AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    signer = S3SigV4Auth(credentials.get_frozen_credentials(), "s3", "us-east-1")
    pool = urllib3.connection_from_url(server.endpoint, maxsize=threads, block=True, retries=False)

    def head(key: str) -> None:
        path = f"/{BUCKET}/{urllib.parse.quote(key)}"
        request = AWSRequest("HEAD", server.endpoint + path, headers={"If-None-Match": server.etags[key]})
        signer.add_auth(request)
        status = pool.request("HEAD", path, headers=dict(request.headers.items())).status
        if status not in (200, 304):
            raise RuntimeError(f"botocore + urllib3 peer: HEAD s3://{BUCKET}/{key} answered {status}")

    return run_threads(head, server.keys, seconds, threads)


def botocore_urllib3_pools(server: Server, seconds: float) -> dict[int, float]:
    """polls/s of the botocore signer + urllib3 peer per thread count."""
    return {threads: round(botocore_urllib3(server, seconds, threads), 1) for threads in URLLIB3_THREADS}


def _lean(server: Server, concurrency: int) -> LeanHead:
    from poller.config import S3Settings
    from poller.probe import prober_for

    settings = S3Settings(endpoint_url=server.endpoint, addressing_style="path", max_attempts=1)
    lean = prober_for(settings, concurrency).lean
    assert lean is not None, "the lean HEAD path is on by default"
    return lean


def lean_loop(server: Server, seconds: float, threads: int = CONCURRENCY) -> float:
    """The daemon's own HEAD with nothing around it: the lean path on ``threads`` threads, no
    scheduler, no storage (the daemon at saturation is measured against this)."""
    lean = _lean(server, threads)

    def head(key: str) -> None:
        lean.head(BUCKET, key, {"IfNoneMatch": server.etags[key]})

    return run_threads(head, server.keys, seconds, threads)


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


def lateness_quantile(
    before: dict[str, float], after: dict[str, float], q: float, skipped: float = 0.0, interval: float = 0.0
) -> tuple[float | None, bool]:
    """A quantile of schedule lateness from the delta of the daemon's histogram (linear within a
    bucket), each skipped slot counted as a poll at least ``interval`` late: it never ran, and its
    watch's next chance is one interval later. Returns (seconds, True) when the quantile falls in the
    open top bucket, where the figure is only a lower bound."""
    prefix = 'poller_schedule_lateness_seconds_bucket{le="'
    finite: list[tuple[float, float]] = []
    above = 0.0
    for metric, value in after.items():
        if metric.startswith(prefix):
            edge, count = metric[len(prefix) :].split('"', 1)[0], value - before.get(metric, 0.0)
            if edge == "+Inf":
                above = count
            else:
                finite.append((float(edge), count))
    finite.sort()
    total = above + skipped
    if not total:
        return None, False
    rank, lower, below = q * total, 0.0, 0.0
    for le, count in finite:
        if count >= rank:
            inside = count - below
            return lower + (le - lower) * ((rank - below) / inside if inside else 0), False
        lower, below = le, count
    # Fewer than `rank` polls were observed under the top edge: the quantile is one of the polls
    # over that edge or a skipped one, so it is at least the smaller of the two bounds present.
    bounds = ([lower] if above > below else []) + ([interval] if skipped else [])
    return min(bounds), True


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


def _polls(metrics: dict[str, float]) -> float:
    return sum(v for k, v in metrics.items() if k.startswith("poller_polls_total{"))


def write_config(
    run: Path, server: Server, n_watches: int, interval: float, concurrency: int | None, metrics_port: int
) -> Path:
    """The daemon's TOML in ``run``: ``n_watches`` key watches over the server's keys (1,000,000 in seconds)."""
    keys = server.keys
    settings = [
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
    config = run / "poller.toml"
    with config.open("w") as out:
        out.write("\n".join(settings) + "\n")
        out.writelines(
            f'[[watch]]\nname = "w{i}"\nbucket = "{BUCKET}"\nkey = "{keys[i % len(keys)]}"\n' for i in range(n_watches)
        )
    return config


def notify_socket() -> tuple[socket.socket, Path]:
    """A bound NOTIFY_SOCKET in a directory of its own under /tmp: a path under a test's tmp_path can
    pass the 108 bytes a unix socket's path may have (pytest-xdist's are long)."""
    path = Path(tempfile.mkdtemp(prefix="poller-notify-")) / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    return sock, path


def close_notify_socket(sock: socket.socket, path: Path) -> None:
    sock.close()
    shutil.rmtree(path.parent, ignore_errors=True)


class Daemon:
    """`poller run` as a child process with a NOTIFY_SOCKET, as systemd starts it; ``tag`` names its files."""

    def __init__(self, config: Path, tag: str) -> None:
        run = config.parent
        self.notify, self._notify_path = notify_socket()
        self.notify.settimeout(1.0)
        self.log_path = run / f"daemon-{tag}.log"
        self._log = self.log_path.open("wb")
        # The bench's dummy credentials, the ones rclone checks (--auth-key), whoever calls this.
        env = {**os.environ, "NOTIFY_SOCKET": str(self._notify_path)}
        env.update(AWS_ACCESS_KEY_ID=AUTH[0], AWS_SECRET_ACCESS_KEY=AUTH[1])
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "poller", "run", "--config", str(config), "--log-level", "WARNING"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )

    def wait_ready(self, timeout: float) -> float:
        """Seconds from the start to READY=1; then STATUS= lines are read on, as systemd does (a queue
        left full makes each of the daemon's sends wait)."""
        while True:
            try:
                if b"READY=1" in self.notify.recv(65536):
                    break
            except TimeoutError:
                self._check_alive(timeout, "READY=1")
        ready = time.monotonic() - self.started
        threading.Thread(target=_drain, args=(self.notify,), daemon=True).start()
        return ready

    def wait_first_poll(self, port: int, timeout: float) -> float:
        """Seconds from the start to the first committed poll (``poller_polls_total`` above 0)."""
        while not _polls(_scrape(port)):
            self._check_alive(timeout, "a first poll")
            time.sleep(0.05)
        return time.monotonic() - self.started

    def _check_alive(self, timeout: float, what: str) -> None:
        if self.proc.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"poller exited ({self.proc.returncode}) before {what}; {self.log_path}:\n{tail}")
        if time.monotonic() - self.started > timeout:
            raise RuntimeError(f"poller gave no {what} within {timeout:.0f} s; log in {self.log_path}")

    def stop(self) -> float:
        """SIGTERM and wait: seconds to stop (a hang is dumped with py-spy, when installed, then killed)."""
        stopping = time.monotonic()
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
            dump = subprocess.run(
                [spy, "dump", "--pid", str(self.proc.pid)], capture_output=True, text=True, check=False
            )
            hang = self.log_path.with_suffix(".hang.txt")
            hang.write_text(dump.stdout + dump.stderr)
            print(f"poller did not stop within 60 s of SIGTERM; py-spy dump in {hang}:\n{dump.stdout}")
            self.proc.kill()
            self.proc.wait(10)
        stop_s = time.monotonic() - stopping
        close_notify_socket(self.notify, self._notify_path)
        self._log.close()
        return stop_s


def run_poller(
    server: Server,
    n_watches: int,
    seconds: float,
    workdir: Path,
    rate: float = TARGET_RATE,
    saturated: bool = False,
    concurrency: int | None = CONCURRENCY,
    restart: bool = False,
    ready_timeout: float = 900.0,
    profile: Path | None = None,
) -> dict[str, Any]:
    """Run `poller run` with ``n_watches`` watches at a dense schedule (``rate`` polls/s demanded) and measure.

    ``concurrency`` None leaves the config's default ceiling (threads start as the work needs them).
    ``restart``: then start it again on the same database and config, and time READY=1 and the first poll.
    ``profile``: after the measured window, py-spy (``--gil``) records the daemon into that directory for
    a window of its own (sampling costs the daemon CPU), summarised under ``profile``.
    """
    interval = max(n_watches / rate, 0.2)
    run = workdir / f"poller-{n_watches}-{rate:.0f}-{concurrency or 'auto'}"
    run.mkdir()
    metrics_port = free_port()
    config = write_config(run, server, n_watches, interval, concurrency, metrics_port)
    daemon = Daemon(config, "fresh")
    try:
        startup = daemon.wait_ready(ready_timeout)
        at_ready = _threads(daemon.proc.pid)  # the daemon's own threads and its first 4 workers
        first_poll = daemon.wait_first_poll(metrics_port, ready_timeout)
        # Warm-up: every watch's first (unconditional) poll recorded, a first sighting each, which
        # costs several times a steady poll; the window below measures the steady state only.
        first_pass = _wait_first_pass(metrics_port, n_watches, max(900.0, 10 * interval), daemon.started + startup)
        time.sleep(min(interval, 5.0))
        before, cpu0, t0 = _scrape(metrics_port), _cpu_seconds(daemon.proc.pid), time.monotonic()
        time.sleep(seconds)
        after, cpu1, t1 = _scrape(metrics_port), _cpu_seconds(daemon.proc.pid), time.monotonic()
        rss = _peak_rss_mb(daemon.proc.pid)
        threads = _threads(daemon.proc.pid)
        spied = None
        if profile is not None:
            out = profile / f"{run.name}.txt"
            spy = Spy(daemon.proc.pid, out, gil=True)
            time.sleep(min(seconds, 20.0))
            spy.stop()
            spied = profile_summary(out) if out.exists() else None
    finally:
        stop_s = daemon.stop()
    done = _polls(after) - _polls(before)
    skipped = after.get("poller_skipped_polls_total", 0) - before.get("poller_skipped_polls_total", 0)
    p50, p50_over = lateness_quantile(before, after, 0.5, skipped, interval)
    p99, p99_over = lateness_quantile(before, after, 0.99, skipped, interval)
    figures = {
        "watches": n_watches,
        "interval_s": round(interval, 3),
        "demanded_polls_per_s": round(n_watches / interval, 1),
        "polls_per_s": round(done / (t1 - t0), 1),
        "cpu_s_per_1000_polls": round((cpu1 - cpu0) / done * 1000, 3) if done else None,
        "lateness_p50_s": _round(p50),
        "lateness_p50_lower_bound": p50_over,
        "lateness_p99_s": _round(p99),
        "lateness_p99_lower_bound": p99_over,
        "peak_rss_mb": round(rss, 1),
        "startup_s": round(startup, 2),
        "first_poll_s": round(first_poll, 2),
        "first_pass_s": None if first_pass is None else round(first_pass, 1),
        "stop_s": round(stop_s, 2),
        "errors": int(sum(v for k, v in after.items() if k.startswith("poller_errors_total{"))),
        "skipped": int(skipped),
        "threads": threads,
        "workers": threads - at_ready + 4,
        "concurrency": concurrency or "default",
        "saturation": saturated or rate >= SATURATION_RATE,
        "db": str(run / "poller.db"),
    }
    figures["meets_demand"] = meets_demand(figures)
    if spied is not None:
        figures["profile"] = spied
    if restart:
        figures.update(restart_figures(config, metrics_port, ready_timeout))
    return figures


def restart_figures(config: Path, metrics_port: int, ready_timeout: float) -> dict[str, Any]:
    """Start-up on the populated database a run left: the daemon started again with the same config."""
    daemon = Daemon(config, "restart")
    try:
        ready = daemon.wait_ready(ready_timeout)
        first_poll = daemon.wait_first_poll(metrics_port, ready_timeout)
        rss = _peak_rss_mb(daemon.proc.pid)
    finally:
        daemon.stop()
    return {
        "restart_startup_s": round(ready, 2),
        "restart_first_poll_s": round(first_poll, 2),
        "restart_peak_rss_mb": round(rss, 1),
    }


def meets_demand(run: dict[str, Any]) -> bool:
    """Sustained what was demanded: at least 99% of the demanded polls/s, and not one slot skipped."""
    return bool(run["polls_per_s"] >= 0.99 * run["demanded_polls_per_s"] and not run["skipped"])


def _drain(sock: socket.socket) -> None:
    while True:
        try:
            sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:  # closed at the end of the run
            return


def _wait_first_pass(port: int, n_watches: int, timeout: float, since: float) -> float | None:
    """Seconds from ``since`` (monotonic) until every watch's first sighting is committed (None: not
    within ``timeout``)."""
    while time.monotonic() - since < timeout:
        seen = _scrape(port).get('poller_changes_total{event="first_seen"}', 0.0)
        if seen >= n_watches:
            return time.monotonic() - since
        time.sleep(0.2)
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
    parser.add_argument("--quick", action="store_true", help="a spot check in under 90 s (client-bound regime only)")
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
    parser.add_argument(
        "--scale",
        action="store_true",
        help="instead: key watches at 100,000, 300,000 and 1,000,000: start-up, RSS, sustained rate (bench.scale)",
    )
    parser.add_argument("--sizes", help="with --scale: watch counts, comma-separated (e.g. 10000,30000)")
    parser.add_argument("--prefix", action="store_true", help="instead: 10 prefixes x 100,000 keys (bench.prefix)")
    parser.add_argument(
        "--profile", metavar="DIR", help="after each daemon's measured window, record it with py-spy --gil into DIR"
    )
    args = parser.parse_args()
    if args.sizes and not args.scale:
        parser.error("--sizes goes with --scale")
    if args.store_write or args.cluster or args.cluster_target or args.latency or args.scale or args.prefix:
        modes = [
            argv
            for argv, on in (
                (["bench.scale", *(["--sizes", args.sizes] if args.sizes else [])], args.scale),
                (["bench.latency"], args.latency),
                (["bench.prefix"], args.prefix),
                (["bench.store_write"], args.store_write),
                (["bench.cluster"], args.cluster),
                (["bench.cluster", *CLUSTER_TARGET], args.cluster_target),
            )
            if on
        ]
        raise SystemExit(run_modes(modes))
    use_bench_credentials()
    profile = Path(args.profile).resolve() if args.profile else None
    if profile is not None:
        profile.mkdir(parents=True, exist_ok=True)
    sizes = [1000] if args.quick else [1000, 10_000, 100_000]
    window = 5.0 if args.quick else 20.0
    peer_window = 2.0 if args.quick else 10.0  # per peer and thread count
    history_rows = 200_000 if args.quick else 10_000_000
    result: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "quick": args.quick,
        "concurrency": CONCURRENCY,
        "regimes": {},
    }
    with tempfile.TemporaryDirectory(prefix="poller-bench-") as tmp:
        workdir = Path(tmp)
        regimes: list[tuple[str, Callable[[], Server]]] = [
            ("client_bound", lambda: start_rclone(workdir, max(sizes), auth=AUTH))
        ]
        if not args.quick:  # moto caps the rate here: the latency regime that measures the client is --latency
            regimes.append(("latency_bound", lambda: start_moto_with_latency(2000)))
        for label, start in regimes:
            server = start()
            regime_dir = workdir / label
            regime_dir.mkdir()
            try:
                if label == "client_bound":
                    figures = client_bound(server, sizes, window, peer_window, workdir, regime_dir, profile)
                else:
                    figures = {"server": server.name, **peer_figures(boto3_pools(server, peer_window))}
                    figures["poller"] = [
                        run_poller(server, len(server.keys), window, regime_dir, saturated=True, profile=profile)
                    ]
                figures.update(poller_ratios(figures))
                figures.update(db_figures(Path(figures["poller"][-1]["db"])))
                for r in figures["poller"]:
                    r.pop("db")
                result["regimes"][label] = figures
            finally:
                server.close()
        result["history"] = history_latency(workdir, history_rows)
        result["signatures"] = signature_check(workdir / "signed", 200)
    print_table(result)
    print(json.dumps(result, separators=(",", ":")))


def client_bound(
    server: Server,
    sizes: list[int],
    window: float,
    peer_window: float,
    workdir: Path,
    regime_dir: Path,
    profile: Path | None = None,
) -> dict[str, Any]:
    """rclone checking every signature: the peers, then the daemon at the target rate per size
    (restarted on its database after each) and at saturation."""
    figures: dict[str, Any] = {"server": server.name, **peer_figures(boto3_pools(server, peer_window))}
    figures["botocore_urllib3_per_s"] = botocore_urllib3_pools(server, peer_window)
    figures["botocore_urllib3_best"] = max(figures["botocore_urllib3_per_s"].values())
    figures["lean_loop_per_s"] = round(lean_loop(server, peer_window), 1)
    figures.update(head_cpu_us(server, peer_window))
    # wrk sends unsigned HEADs: the server's ceiling is measured on an anonymous rclone, same files.
    anonymous = start_rclone(workdir, max(sizes))
    try:
        figures["wrk_per_s"] = wrk_ceiling(anonymous, window, regime_dir)
    finally:
        anonymous.close()
    runs = [run_poller(server, n, window, regime_dir, restart=True, profile=profile) for n in sizes]
    # The ceiling: more demanded than the poller can do, so polls/s is its maximum.
    runs.append(run_poller(server, min(sizes[-1], 10_000), window, regime_dir, rate=SATURATION_RATE, profile=profile))
    figures["poller"] = runs
    return figures


def peer_figures(pools: dict[int, float]) -> dict[str, Any]:
    """The boto3 pools by thread count, the best of them (THE boto3 peer), and the old keys."""
    return {
        "boto3_pools_per_s": pools,
        "boto3_best": max(pools.values()),
        "boto3_best_threads": max(pools, key=pools.__getitem__),
        "sequential_boto3_per_s": pools[1],
        "boto3_pool_per_s": pools[CONCURRENCY],
    }


def poller_ratios(figures: dict[str, Any]) -> dict[str, float]:
    """The poller's best sustained polls/s over each peer's best, and its saturation over the bare lean loop."""
    runs = figures["poller"]
    best = max(r["polls_per_s"] for r in runs)
    ratios = {
        "poller_vs_best_boto3": round(best / figures["boto3_best"], 2),
        "poller_vs_pool": round(best / figures["boto3_pool_per_s"], 2),
        "poller_vs_sequential": round(best / figures["sequential_boto3_per_s"], 2),
    }
    if figures.get("botocore_urllib3_best"):
        ratios["poller_vs_botocore_urllib3"] = round(best / figures["botocore_urllib3_best"], 2)
    saturated = [r["polls_per_s"] for r in runs if r["saturation"]]
    if figures.get("lean_loop_per_s") and saturated:
        ratios["saturation_vs_lean_loop"] = round(max(saturated) / figures["lean_loop_per_s"], 2)
    if figures.get("wrk_per_s"):
        ratios["poller_vs_wrk"] = round(best / figures["wrk_per_s"], 3)
    return ratios


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


def seconds_text(value: float | None, lower_bound: bool = False, digits: int = 3) -> str:
    """A figure in seconds for a table: "-" when not measured, ">x" when only a lower bound is known."""
    return "-" if value is None else f"{'>' if lower_bound else ''}{value:.{digits}f}"


LEGEND = """\
  met: polls/s >= 0.99 x demanded and nothing skipped. Lateness counts each skipped slot as a poll at
  least one interval late (>x: the quantile is among those, only a lower bound is known).
  ready, 1st poll: seconds from the start to READY=1 and to the first committed poll, fresh database;
  re-ready, re-1st: the same, the daemon started again on the database its run left."""


def by_threads(rates: dict[int, float]) -> str:
    return ", ".join(f"{threads} threads {rate:.0f}/s" for threads, rate in rates.items())


def demand_text(run: dict[str, Any]) -> str:
    """Whether a run sustained its demand: "yes", "no", or "(max)" for a saturation run."""
    return "(max)" if run["saturation"] else "yes" if run["meets_demand"] else "no"


def print_table(result: dict[str, Any]) -> None:
    print(f"machine: {result['machine']}; concurrency {result['concurrency']}")
    for label, f in result["regimes"].items():
        print(f"\n[{label}] {f['server']}")
        pools = by_threads(f["boto3_pools_per_s"])
        print(f"  peer boto3 pools: {pools}; best {f['boto3_best']:.0f}/s ({f['boto3_best_threads']} threads)")
        if "botocore_urllib3_per_s" in f:
            pools = by_threads(f["botocore_urllib3_per_s"])
            print(f"  peer botocore signer + urllib3 pool: {pools}; best {f['botocore_urllib3_best']:.0f}/s")
            lean = f"{f['lean_loop_per_s']:.0f}/s"
            print(f"  bare lean HEAD loop, {CONCURRENCY} threads (no scheduler, no storage): {lean}")
        if "wrk_per_s" in f:
            wrk = f"{f['wrk_per_s']:.0f}/s" if f["wrk_per_s"] else "not measured (needs Debian's wrk)"
            print(f"  server ceiling, wrk on an anonymous rclone over the same files: {wrk}")
        print(
            f"  {'watches':>8} {'demand/s':>9} {'polls/s':>8} {'met':>5} {'skipped':>7} {'cpu s/1k':>8} "
            f"{'late p50':>8} {'late p99':>8} {'RSS MB':>7} {'ready s':>7} {'1st poll':>8} "
            f"{'re-ready':>8} {'re-1st':>7} {'errors':>6}"
        )
        for r in f["poller"]:
            print(
                f"  {r['watches']:>8}{'*' if r['saturation'] else ' '}{r['demanded_polls_per_s']:>8.0f} "
                f"{r['polls_per_s']:>8.0f} {demand_text(r):>5} {r['skipped']:>7} {r['cpu_s_per_1000_polls']!s:>8} "
                f"{seconds_text(r['lateness_p50_s'], r['lateness_p50_lower_bound']):>8} "
                f"{seconds_text(r['lateness_p99_s'], r['lateness_p99_lower_bound']):>8} "
                f"{r['peak_rss_mb']:>7.0f} {r['startup_s']:>7.2f} {r['first_poll_s']:>8.2f} "
                f"{seconds_text(r.get('restart_startup_s'), digits=2):>8} "
                f"{seconds_text(r.get('restart_first_poll_s'), digits=2):>7} "
                f"{r['errors']:>6}"
            )
        print(LEGEND)
        for r in f["poller"]:
            if "profile" in r:
                print_summary(f"{r['watches']:,} watches at {r['demanded_polls_per_s']:.0f}/s (--gil)", r["profile"])
        if any(r["saturation"] for r in f["poller"]):
            print("  * saturation run: more polls demanded than the poller can do; polls/s is its ceiling")
        if "lean_head_cpu_us" in f:
            print(
                f"  CPU per conditional HEAD, one thread: boto3 {f['boto3_head_cpu_us']} µs, "
                f"lean path {f['lean_head_cpu_us']} µs"
            )
        ratios = [f"/ best boto3 pool {f['poller_vs_best_boto3']}x (target >= 3)"]
        if "poller_vs_botocore_urllib3" in f:
            ratios.append(f"/ best botocore + urllib3 {f['poller_vs_botocore_urllib3']}x (target >= 2)")
        if "saturation_vs_lean_loop" in f:
            ratios.append(f"saturation / bare lean loop {f['saturation_vs_lean_loop']}x (target >= 0.7)")
        if f.get("poller_vs_wrk"):
            ratios.append(f"/ wrk {f['poller_vs_wrk']}x")
        print(f"  ratios, the poller's best polls/s: {'; '.join(ratios)}")
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
