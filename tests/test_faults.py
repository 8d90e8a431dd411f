"""Fault injection: the daemon survives outages, hangs, throttling and database trouble with nothing lost.

The S3 traffic of the daemon goes through FaultProxy (tests/faultproxy.py) in front of the moto
server; each test asserts on the database and on the daemon's liveness.
"""

from __future__ import annotations

import random
import re
import signal
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
from conftest import ConfigFile, wait_for
from daemonproc import events, poll_count, query
from faultproxy import FaultProxy


@pytest.fixture
def proxy(s3_endpoint: str) -> Iterator[FaultProxy]:
    p = FaultProxy(int(urlparse(s3_endpoint).port or 0))
    yield p
    p.close()


def via(config: ConfigFile, proxy: FaultProxy, watches: list[dict[str, Any]], **s3: Any) -> ConfigFile:
    return config.write(watches, s3={"endpoint_url": proxy.endpoint, **s3})


def state(db: Path, watch: str) -> tuple[Any, ...]:
    (row,) = query(
        db,
        "SELECT s.last_outcome, s.consecutive_errors, s.etag, s.last_error FROM object_state s "
        "JOIN watches w ON w.id = s.watch_id WHERE w.name = ?",
        watch,
    )
    return row


def outcomes(db: Path, watch: str) -> list[str]:
    try:
        return [
            r[0]
            for r in query(
                db,
                "SELECT p.outcome FROM poll_samples_view p JOIN watches w ON w.id = p.watch_id "
                "WHERE w.name = ? ORDER BY p.id",
                watch,
            )
        ]
    except sqlite3.OperationalError:
        return []


def errors_of(db: Path, watch: str) -> list[str]:
    return [
        r[0]
        for r in query(
            db,
            "SELECT p.error FROM poll_samples_view p JOIN watches w ON w.id = p.watch_id "
            "WHERE w.name = ? AND p.outcome = 'error' ORDER BY p.id",
            watch,
        )
    ]


def test_endpoint_down_at_start_and_mid_run(config, s3, bucket, proxy, start_daemon):
    s3.put_object(Bucket=bucket, Key="k", Body=b"v1")
    via(config, proxy, [{"name": "a", "bucket": bucket, "key": "k"}], max_attempts=1)
    proxy.set("refuse")
    daemon = start_daemon(config)
    daemon.notify.wait("READY=1")
    wait_for(lambda: outcomes(config.db, "a")[-3:] == ["error"] * 3, what="errors while the endpoint is down")
    assert "cannot connect" in errors_of(config.db, "a")[0]
    assert state(config.db, "a")[1] >= 3  # consecutive_errors rising
    wait_for(
        lambda: "errors" in daemon.notify.wait("STATUS=") and any("last error: a:" in m for m in daemon.notify.drain()),
        what="error shown in STATUS=",
    )

    proxy.set("pass")
    wait_for(lambda: events(config.db, "a") == ["first_seen"], what="recovery")
    wait_for(lambda: outcomes(config.db, "a")[-2:] == ["unchanged", "unchanged"], what="unchanged polls")
    assert state(config.db, "a")[1] == 0

    proxy.set("refuse")  # down again, mid-run
    wait_for(lambda: outcomes(config.db, "a")[-2:] == ["error", "error"], what="errors mid-run")
    proxy.set("pass")
    wait_for(lambda: outcomes(config.db, "a")[-2:] == ["unchanged", "unchanged"], what="second recovery")
    assert events(config.db, "a") == ["first_seen"], "recovery must not invent a change"
    assert daemon.stop() == 0


def test_hung_bucket_does_not_block_the_others(config, s3, proxy, start_daemon):
    healthy, hung = [f"t-iso-{n}-{id(proxy) % 10000}" for n in ("ok", "hang")]
    for b in (healthy, hung):
        s3.create_bucket(Bucket=b)
        s3.put_object(Bucket=b, Key="k", Body=b"v")
    watches = [{"name": f"{b}-{i}", "bucket": b, "key": "k"} for b in (healthy, hung) for i in range(3)]
    via(config, proxy, watches, read_timeout="1s", max_attempts=1)
    config.write(schedule={"concurrency": 4})
    proxy.set("hang", prefix=f"/{hung}/")
    daemon = start_daemon(config)
    daemon.notify.wait("READY=1")
    wait_for(
        lambda: all(outcomes(config.db, f"{hung}-{i}").count("error") >= 2 for i in range(3)),
        what="hung polls time out",
    )
    assert "read timeout" in errors_of(config.db, f"{hung}-0")[0]
    # Three hung watches hold three of four workers for a second at a time; the healthy ones keep going.
    before = poll_count(config.db, f"{healthy}-0")
    wait_for(lambda: poll_count(config.db, f"{healthy}-0") >= before + 3, what="healthy watch keeps polling")
    assert all(o != "error" for i in range(3) for o in outcomes(config.db, f"{healthy}-{i}"))
    assert daemon.stop() == 0


def test_503_burst_is_retried_with_a_bounded_request_count(config, s3, bucket, proxy, start_daemon):
    s3.put_object(Bucket=bucket, Key="k", Body=b"v1")
    via(config, proxy, [{"name": "a", "bucket": bucket, "key": "k"}], max_attempts=3)
    daemon = start_daemon(config)
    daemon.notify.wait("READY=1")
    wait_for(lambda: events(config.db, "a") == ["first_seen"], what="first poll")

    proxy.set("error", prefix=f"/{bucket}/", status=503, fraction=1.0)
    wait_for(lambda: outcomes(config.db, "a").count("error") >= 3, what="errors after retries")
    daemon.signal(signal.SIGSTOP)  # freeze it to read a consistent request count
    try:
        failed_polls = outcomes(config.db, "a").count("error")
        # Every failed poll is exactly max_attempts requests: retried, but no storm.
        assert proxy.failed[bucket] in range(failed_polls * 3, failed_polls * 3 + 4)
        assert "throttled" in errors_of(config.db, "a")[0]
    finally:
        daemon.signal(signal.SIGCONT)

    # Half the requests fail: retries absorb it, and nothing is invented.
    proxy.set("error", prefix=f"/{bucket}/", status=500, fraction=0.5)
    start = len(outcomes(config.db, "a"))
    wait_for(lambda: len(outcomes(config.db, "a")) >= start + 24, 60, what="polls under a 50% error rate")
    recent = outcomes(config.db, "a")[start:]
    # A poll fails only when all 3 attempts do (1 in 8); 24 polls keep chance out of the verdict.
    assert recent.count("unchanged") > 2 * recent.count("error")
    proxy.set("pass")
    assert events(config.db, "a") == ["first_seen"]
    assert daemon.stop() == 0


def test_connection_reset_mid_response(config, s3, bucket, proxy, start_daemon):
    s3.put_object(Bucket=bucket, Key="k", Body=b"v1")
    via(config, proxy, [{"name": "a", "bucket": bucket, "key": "k"}], max_attempts=1)
    proxy.set("reset", prefix=f"/{bucket}/")
    daemon = start_daemon(config)
    daemon.notify.wait("READY=1")
    wait_for(lambda: outcomes(config.db, "a").count("error") >= 2, what="errors on reset")
    proxy.set("pass")
    wait_for(lambda: events(config.db, "a") == ["first_seen"], what="recovery after resets")
    assert daemon.stop() == 0


def test_database_locked_by_another_writer(config, s3, bucket, start_daemon):
    s3.put_object(Bucket=bucket, Key="k", Body=b"v1")
    config.write([{"name": "a", "bucket": bucket, "key": "k"}])
    daemon = start_daemon(config)
    daemon.notify.wait("READY=1")
    wait_for(lambda: events(config.db, "a") == ["first_seen"], what="first poll")

    blocker = sqlite3.connect(config.db, isolation_level=None, timeout=30)
    blocker.execute("BEGIN IMMEDIATE")  # holds the write lock longer than the daemon's busy_timeout
    try:
        s3.put_object(Bucket=bucket, Key="k", Body=b"v2")  # a change while nothing can be committed
        wait_for(lambda: "NOT recorded" in daemon.log, timeout=30, what="a clear error about the lock")
        assert "database" in daemon.log and "locked" in daemon.log
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    wait_for(lambda: events(config.db, "a") == ["first_seen", "modified"], what="change recorded after the lock")
    wait_for(lambda: outcomes(config.db, "a")[-2:] == ["unchanged", "unchanged"], what="polling goes on")
    assert events(config.db, "a") == ["first_seen", "modified"], "exactly once"
    assert daemon.stop() == 0


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MB tmpfs (needs root): a real filesystem that can fill up or turn read-only."""
    import subprocess

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.slow
def test_disk_full_mid_run(config, s3, bucket, tmpfs, start_daemon):
    import subprocess

    mnt = tmpfs
    db = mnt / "poller.db"
    s3.put_object(Bucket=bucket, Key="k", Body=b"v1")
    config.write([{"name": "a", "bucket": bucket, "key": "k"}], database={"url": f"sqlite:///{db}"})
    config.db = db
    daemon = start_daemon(config)
    daemon.notify.wait("READY=1")
    wait_for(lambda: events(db, "a") == ["first_seen"], what="first poll")
    wait_for(lambda: "unchanged" in outcomes(db, "a"), what="steady polling")
    filler = mnt / "filler"
    subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True)
    s3.put_object(Bucket=bucket, Key="k", Body=b"v2")  # a change that cannot be committed
    wait_for(lambda: "NOT recorded" in daemon.log, timeout=30, what="a clear error")
    assert re.search(r"disk|full", daemon.log), daemon.log[-2000:]
    assert daemon.proc.poll() is None, "the daemon keeps running"
    # Nothing was marked as seen: once there is space again, the change is recorded, once.
    filler.unlink()
    wait_for(lambda: events(db, "a") == ["first_seen", "modified"], timeout=30, what="change recorded after")
    wait_for(lambda: outcomes(db, "a")[-1:] == ["unchanged"], what="polling goes on")
    assert events(db, "a") == ["first_seen", "modified"]
    assert daemon.stop() == 0
    assert query(db, "PRAGMA integrity_check") == [("ok",)]


@pytest.mark.slow
def test_read_only_database_at_start_is_a_clear_error(config, s3, bucket, tmpfs):
    import subprocess

    from conftest import run_cli

    mnt = tmpfs
    db = mnt / "poller.db"
    s3.put_object(Bucket=bucket, Key="k", Body=b"v1")
    config.write([{"name": "a", "bucket": bucket, "key": "k"}], database={"url": f"sqlite:///{db}"})
    assert run_cli("once", "--config", str(config.path)).returncode == 0
    subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
    proc = run_cli("once", "--config", str(config.path))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "read-only" in proc.stderr, proc.stderr
    status = run_cli("status", "--config", str(config.path))
    assert "Traceback" not in status.stderr


@pytest.mark.slow
def test_kill_9_during_heavy_polling(config, s3, bucket, start_daemon):
    """20 kill -9 at random moments: integrity ok, no half-written result, every change recorded exactly once."""
    rng = random.Random(20261125)
    keys = [f"obj-{i:03d}" for i in range(120)]
    for key in keys:
        s3.put_object(Bucket=bucket, Key=key, Body=b"v0")
    config.write([{"name": k, "bucket": bucket, "key": k} for k in keys], schedule={"concurrency": 16})
    writes: dict[str, int] = {}  # overwrites made while the daemon was down, per key
    runs = []
    for attempt in range(20):
        daemon = start_daemon(config)
        daemon.notify.wait("READY=1")
        floor = len(query(config.db, "SELECT id FROM poll_samples")) if attempt else 0
        wait_for(
            lambda floor=floor: len(query(config.db, "SELECT id FROM poll_samples")) > floor + rng.randint(5, 150),
            what="heavy polling",
        )
        daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait(10)
        integrity = query(config.db, "PRAGMA integrity_check")
        assert integrity == [("ok",)], integrity
        # No half-written result: every history event has its poll row, in the same transaction.
        orphans = query(
            config.db,
            # (samples keep milliseconds: compare the times to the millisecond)
            "SELECT count(*) FROM etag_history h WHERE NOT EXISTS (SELECT 1 FROM poll_samples_view p "
            "WHERE p.watch_id = h.watch_id AND substr(p.polled_at, 1, 23) = substr(h.detected_at, 1, 23))",
        )
        assert orphans == [(0,)]
        # The object state agrees with the newest history event of each watch.
        mismatched = query(
            config.db,
            "SELECT count(*) FROM object_state s JOIN etag_history h ON h.id = "
            "(SELECT max(id) FROM etag_history WHERE watch_id = s.watch_id) "
            "WHERE s.etag IS NOT h.etag",
        )
        assert mismatched == [(0,)]
        runs.append(integrity[0][0])
        # A change made while the daemon is down, to a key already seen (a change before the first
        # sighting is, rightly, just first_seen) and not changed before (two overwrites between two
        # polls are, rightly, one change).
        seen = {r[0] for r in query(config.db, "SELECT w.name FROM etag_history h JOIN watches w ON w.id = h.watch_id")}
        key = rng.choice(sorted(seen - set(writes)))
        writes[key] = writes.get(key, 0) + 1
        s3.put_object(Bucket=bucket, Key=key, Body=f"{key}-{writes[key]}".encode())
    daemon = start_daemon(config)
    daemon.notify.wait("READY=1")

    def all_recorded() -> bool:
        return all(events(config.db, k).count("modified") >= n for k, n in writes.items())

    wait_for(all_recorded, timeout=60, what="every change made while down")
    assert daemon.stop() == 0
    for key in keys:
        history = events(config.db, key)
        assert history == ["first_seen"] + ["modified"] * writes.get(key, 0), (key, history)
    assert runs == ["ok"] * 20


def test_sigterm_under_overload_does_not_drain_the_backlog(config, s3, bucket, proxy, start_daemon):
    """Far more polls due than workers can run: SIGTERM ends the polls in flight, not the whole queue."""
    import time

    for i in range(3):
        s3.put_object(Bucket=bucket, Key=f"k{i}", Body=b"v")
    watches = [{"name": f"w{i}", "bucket": bucket, "key": f"k{i % 3}"} for i in range(60)]
    via(config, proxy, watches, read_timeout="1s", max_attempts=1)
    config.write(schedule={"concurrency": 2, "interval": "1s"})
    proxy.set("hang")  # every poll takes the full read timeout: a backlog of ~60 queued polls builds up
    daemon = start_daemon(config)
    daemon.notify.wait("READY=1")
    wait_for(
        lambda: len(outcomes(config.db, "w0") + outcomes(config.db, "w1")) >= 1 or poll_count(config.db, "w2"),
        timeout=30,
        what="the first timed-out polls",
    )
    # Overload is reported once, in STATUS=, not as one warning per skipped run.
    wait_for(
        lambda: any("polls skipped: more due than 2 workers" in m for m in daemon.notify.drain()),
        timeout=30,
        what="skipped polls shown in STATUS=",
    )
    started = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert daemon.proc.wait(20) == 0
    assert "maximum number of running instances" not in daemon.log
    # In-flight polls end within the read timeout; the ~58 queued ones are dropped, not run (would be ~30 s).
    assert time.monotonic() - started < 8
