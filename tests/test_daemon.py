"""`poller run` as a real subprocess with a NOTIFY_SOCKET bound by the test, plus in-process reload checks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ACCESS_KEY, SECRET, ConfigFile, run_cli, wait_for
from daemonproc import events, poll_count, query

from poller.config import load_settings
from poller.daemon import Daemon
from poller.sdnotify import Notifier


def test_daemon_lifecycle_detects_changes_and_stops_cleanly(config: ConfigFile, s3, bucket, start_daemon):
    s3.put_object(Bucket=bucket, Key="conf/app.json", Body=b"v1")
    config.write([{"name": "app", "bucket": bucket, "key": "conf/app.json"}])
    daemon = start_daemon(config)
    ready = daemon.notify.wait("READY=1")
    assert "STATUS=watching 1 keys" in ready
    wait_for(lambda: events(config.db, "app") == ["first_seen"], what="first_seen recorded")
    wait_for(lambda: poll_count(config.db, "app") >= 2, what="a second poll")
    s3.put_object(Bucket=bucket, Key="conf/app.json", Body=b"v2")
    wait_for(lambda: events(config.db, "app") == ["first_seen", "modified"], what="modified recorded")
    s3.delete_object(Bucket=bucket, Key="conf/app.json")
    wait_for(lambda: events(config.db, "app")[-1:] == ["deleted"], what="deleted recorded")
    s3.put_object(Bucket=bucket, Key="conf/app.json", Body=b"v3")
    wait_for(lambda: events(config.db, "app")[-1:] == ["created"], what="created recorded")

    # The CLI reads while the daemon writes.
    for _ in range(3):
        hist = run_cli("history", "app", "--changes", "--config", str(config.path))
        assert hist.returncode == 0, hist.stderr
        assert "modified" in hist.stdout
        status = run_cli("status", "--config", str(config.path))
        assert status.returncode == 0 and "app" in status.stdout

    assert "unchanged (304)" in daemon.log
    assert 'modified etag "' in daemon.log and " -> " in daemon.log
    daemon.signal(signal.SIGTERM)
    assert daemon.proc.wait(20) == 0
    daemon.notify.wait("STOPPING=1")
    assert query(config.db, "PRAGMA integrity_check") == [("ok",)]
    assert events(config.db, "app") == ["first_seen", "modified", "deleted", "created"]


def test_status_line_counts_outcomes(config: ConfigFile, s3, bucket, start_daemon):
    s3.put_object(Bucket=bucket, Key="k", Body=b"v1")
    config.write([{"name": "a", "bucket": bucket, "key": "k"}])
    daemon = start_daemon(config, env={"WATCHDOG_USEC": "1000000"})
    daemon.notify.wait("READY=1")
    daemon.notify.wait("WATCHDOG=1")
    msg = daemon.notify.wait("STATUS=watching 1 keys; last minute: ", timeout=30)
    wait_for(
        lambda: any("unchanged," in m and " 0 unchanged" not in m for m in daemon.notify.drain()),
        timeout=30,
        what="a STATUS= with unchanged polls counted",
    )
    assert "errors" in msg
    assert daemon.stop() == 0


def test_sighup_adds_removes_and_survives_a_bad_config(config: ConfigFile, s3, bucket, start_daemon):
    for key in ("a", "b", "c"):
        s3.put_object(Bucket=bucket, Key=key, Body=key.encode())
    config.write([{"name": "a", "bucket": bucket, "key": "a"}, {"name": "b", "bucket": bucket, "key": "b"}])
    daemon = start_daemon(config)
    daemon.notify.wait("READY=1")
    wait_for(lambda: poll_count(config.db, "a") and poll_count(config.db, "b"), what="a and b polled")

    config.write([{"name": "a", "bucket": bucket, "key": "a"}, {"name": "c", "bucket": bucket, "key": "c"}])
    mark = len(daemon.notify.drain())
    daemon.signal(signal.SIGHUP)
    reloading = daemon.notify.wait("RELOADING=1", after=mark)
    assert "MONOTONIC_USEC=" in reloading
    daemon.notify.wait("READY=1", after=mark)
    wait_for(lambda: events(config.db, "c") == ["first_seen"], what="c polled after reload")
    assert query(config.db, "SELECT name, active FROM watches ORDER BY name") == [("a", 1), ("b", 0), ("c", 1)]
    b_polls = poll_count(config.db, "b")
    a_polls = poll_count(config.db, "a")
    wait_for(lambda: poll_count(config.db, "a") >= a_polls + 2, what="a keeps polling")
    assert poll_count(config.db, "b") == b_polls, "a removed watch is no longer polled"

    # A broken config: the old list keeps running, the error is logged and shown in STATUS=.
    config.path.write_text('[[watch]]\nname = "a"\nbucket = "x"\nkey = "k"\nbogus = 1\n')
    mark = len(daemon.notify.drain())
    daemon.signal(signal.SIGHUP)
    ready = daemon.notify.wait("READY=1", after=mark)
    assert "reload failed" in ready and "bogus" in ready
    assert "reload failed, keeping the running watch list" in daemon.log
    a_polls = poll_count(config.db, "a")
    wait_for(
        lambda: poll_count(config.db, "a") >= a_polls + 2 and poll_count(config.db, "c") > 1,
        what="old watch list still polled",
    )
    config.path.write_text("[[watch]\n")  # TOML syntax error
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: "TOML syntax error" in daemon.log, what="syntax error logged")
    config.write([{"name": "a", "bucket": bucket, "key": "a"}, {"name": "a", "bucket": bucket, "key": "c"}])
    mark = len(daemon.notify.drain())
    daemon.signal(signal.SIGHUP)
    assert "duplicate name" in daemon.notify.wait("READY=1", after=mark)
    c_polls = poll_count(config.db, "c")
    wait_for(lambda: poll_count(config.db, "c") >= c_polls + 2, what="old watch list still polled")
    assert daemon.stop() == 0
    assert "Traceback" not in daemon.log


def test_bad_config_at_start_exits_2(config: ConfigFile, tmp_path):
    config.path.write_text('[[watch]]\nbucket = "b"\n')
    proc = run_cli("run", "--config", str(config.path))
    assert proc.returncode == 2 and "watch #1" in proc.stderr and "Traceback" not in proc.stderr


def test_no_secret_in_logs_or_database(config: ConfigFile, s3, bucket, start_daemon):
    s3.put_object(Bucket=bucket, Key="k", Body=b"v1")
    config.write(
        [
            {"name": "a", "bucket": bucket, "key": "k"},
            {"name": "denied", "bucket": "no-such-bucket-secret-test", "key": "k"},
        ]
    )
    daemon = start_daemon(config)
    daemon.notify.wait("READY=1")
    wait_for(lambda: poll_count(config.db, "a") >= 2 and poll_count(config.db, "denied") >= 1, what="polls")
    outputs = [run_cli(cmd, "--config", str(config.path), "--format", "json") for cmd in ("status", "history")]
    assert daemon.stop() == 0
    files = [p for p in config.db.parent.iterdir() if p.name.startswith("poller.db")]
    blobs = (
        [p.read_bytes() for p in files]
        + [daemon.log.encode()]
        + [o.stdout.encode() + o.stderr.encode() for o in outputs]
    )
    blobs += [m.encode() for m in daemon.notify.messages]
    for blob in blobs:
        assert SECRET.encode() not in blob
        assert ACCESS_KEY.encode() not in blob


def test_journald_format(config: ConfigFile, s3, bucket, tmp_path):
    s3.put_object(Bucket=bucket, Key="k", Body=b"v1")
    config.write([{"name": "a", "bucket": bucket, "key": "k"}])
    log_path = tmp_path / "journal.log"
    with log_path.open("wb") as out:
        st = os.fstat(out.fileno())
        proc = subprocess.Popen(
            [sys.executable, "-m", "poller", "run", "--config", str(config.path)],
            stderr=out,
            stdout=out,
            env={**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"},
        )
        try:
            wait_for(lambda: events(config.db, "a"), what="first poll")
            wait_for(lambda: "first seen" in log_path.read_text(), what="log line")
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0
    lines = log_path.read_text().splitlines()
    assert lines and all(line[:3] in ("<6>", "<4>", "<3>", "<7>") for line in lines), lines
    assert not any(time.strftime("%Y-") in line for line in lines if "last-modified" not in line)


# --- in-process reload: exactly which timetable entries change ------------------------------------------


def test_reload_reschedules_only_what_changed(config: ConfigFile, s3, bucket):
    watches = [{"name": f"w{i}", "bucket": bucket, "key": f"k{i}", "interval": "1h"} for i in range(50)]
    config.write(watches)
    daemon = Daemon(config.path, load_settings(config.path), Notifier(""))
    daemon.start(paused=True)
    try:
        before = {name: (due, trigger) for name, (due, trigger, _) in daemon.timetable.snapshot().items()}
        changed = [dict(w) for w in watches]
        changed[3]["interval"] = "2h"  # rescheduled
        changed[7]["key"] = "elsewhere"  # retargeted
        del changed[9]  # removed
        changed.append({"name": "new", "bucket": bucket, "key": "new"})
        config.write(changed)
        assert daemon.reload()
        snapshot = daemon.timetable.snapshot()
        after = {name: (due, trigger) for name, (due, trigger, _) in snapshot.items()}
        assert set(after) == set(before) - {"w9"} | {"new"}
        different = {name for name in before if name in after and after[name] != before[name]}
        assert different == {"w3"}
        assert snapshot["w7"][2].key == "elsewhere"
        assert snapshot["w0"][2].key == "k0"
        # A bad config leaves every entry as it was.
        config.path.write_text("[[watch]]\nbogus = 1\n")
        assert not daemon.reload()
        assert daemon.timetable.snapshot() == snapshot
    finally:
        daemon.shutdown()


def test_a_watch_repointed_by_another_daemon_first_is_polled_afresh_here(config: ConfigFile, s3, bucket):
    """Daemons sharing a database reload one after the other: the first re-points the watch's row
    (and drops the old object's state), so this one's sync finds nothing to re-point. Its cached
    state of the old object must still go: the new object, a copy with the same ETag, would answer
    304 to it and its first sighting would never be recorded."""
    from datetime import UTC, datetime

    from poller.store import Store, open_engine
    from poller.watchlist import WatchSpec

    s3.put_object(Bucket=bucket, Key="a", Body=b"same")
    s3.put_object(Bucket=bucket, Key="b", Body=b"same")
    config.write([{"name": "w", "bucket": bucket, "key": "a"}])
    daemon = Daemon(config.path, load_settings(config.path), Notifier(""))
    daemon.start(paused=True)
    try:
        first = daemon.service.poll(daemon.current.watches["w"])
        assert first is not None and first.event == "first_seen"
        other = Store(open_engine(config.url))  # the other daemon's reload
        try:
            assert other.sync_watches([WatchSpec("w", bucket, "b", 60.0, None)], datetime.now(UTC)).retargeted
        finally:
            other.close()
        config.write([{"name": "w", "bucket": bucket, "key": "b"}])
        assert daemon.reload()
        polled = daemon.service.poll(daemon.current.watches["w"])
        assert polled is not None and (polled.outcome, polled.event) == ("modified", "first_seen"), polled
        assert polled.state.etag == first.state.etag  # the copy: only its first sighting tells it apart
    finally:
        daemon.shutdown()
    assert events(config.db, "w") == ["first_seen", "first_seen"]


def test_first_runs_are_spread_over_the_interval(config: ConfigFile, bucket):
    config.write([{"name": f"w{i}", "bucket": bucket, "key": f"k{i}", "interval": "60s"} for i in range(200)])
    daemon = Daemon(config.path, load_settings(config.path), Notifier(""))
    daemon.start(paused=True)
    try:
        times = sorted(due for due, _, _ in daemon.timetable.snapshot().values())
        span = (times[-1] - times[0]).total_seconds()
        assert span > 45, "first runs must spread over the interval, not bunch at start"
        seconds = {t.replace(microsecond=0) for t in times}
        assert len(seconds) > 40
    finally:
        daemon.shutdown()


@pytest.mark.slow
def test_fifty_thousand_watches_load_and_one_change_reschedules_one(config: ConfigFile):
    watches = [{"name": f"w{i}", "bucket": "bucket", "key": f"keys/{i}.json", "interval": "1h"} for i in range(50_000)]
    config.write(watches)
    daemon = Daemon(config.path, load_settings(config.path), Notifier(""))
    daemon.start(paused=True)
    try:
        before = {name: (due, trigger) for name, (due, trigger, _) in daemon.timetable.snapshot().items()}
        assert len(before) == 50_000
        watches[12345]["interval"] = "2h"
        config.write(watches)
        assert daemon.reload()
        after = {name: (due, trigger) for name, (due, trigger, _) in daemon.timetable.snapshot().items()}
        assert set(after) == set(before)
        assert {name for name in before if after[name] != before[name]} == {"w12345"}
        assert query(config.db, "SELECT count(*) FROM watches WHERE active") == [(50_000,)]
    finally:
        daemon.shutdown()


def test_scheduled_pruning_bounds_the_polls_table(config: ConfigFile, s3, bucket, start_daemon):
    s3.put_object(Bucket=bucket, Key="k", Body=b"v")
    config.write([{"name": "a", "bucket": bucket, "key": "k"}], database={"poll_retention": "2s"})
    daemon = start_daemon(config)
    daemon.notify.wait("READY=1")
    wait_for(lambda: "pruned" in daemon.log, timeout=30, what="the pruning job to run")
    assert query(config.db, "SELECT min(id) FROM polls")[0][0] > 1, "the oldest polls are gone"
    assert events(config.db, "a") == ["first_seen"], "ETag history is kept forever"
    assert daemon.stop() == 0


def test_sd_notify_to_a_peer_that_stopped_reading_never_blocks_the_daemon(tmp_path):
    """The adversary: a NOTIFY_SOCKET nobody reads. Its queue fills after a few datagrams; a blocking
    send would then freeze the main loop (no reload, no SIGTERM) for good."""
    import socket as socket_

    path = tmp_path / "notify.sock"
    deaf = socket_.socket(socket_.AF_UNIX, socket_.SOCK_DGRAM)
    deaf.bind(str(path))
    try:
        notifier = Notifier(str(path), timeout=0.05)
        sent = []
        started = time.monotonic()
        for i in range(40):
            sent.append(notifier.status(f"line {i}"))
        elapsed = time.monotonic() - started
        assert sent[0] is True and sent[-1] is False  # the queue filled: told, not hung
        assert elapsed < 40 * 0.05 + 2
        notifier.close()
    finally:
        deaf.close()


def test_a_line_break_inside_a_status_cannot_forge_an_assignment(tmp_path):
    """STATUS= carries the last error, and a PostgreSQL error spans lines ("...\nDETAIL: ..."): each
    line would reach systemd as an assignment of its own (READY=1, STOPPING=1, ...)."""
    import socket as socket_

    path = tmp_path / "notify.sock"
    manager = socket_.socket(socket_.AF_UNIX, socket_.SOCK_DGRAM)
    manager.bind(str(path))
    try:
        notifier = Notifier(str(path))
        assert notifier.status("database: duplicate key\nSTOPPING=1")
        assert manager.recv(4096).decode().splitlines() == ["STATUS=database: duplicate key STOPPING=1"]
        notifier.close()
    finally:
        manager.close()


def test_the_daemon_raises_its_open_file_limit_to_the_hard_one():
    """Each worker keeps up to lean.MAX_KEPT connections: 256 workers pass a soft limit of 1024."""
    import subprocess
    import sys

    code = (
        "import resource; from poller.daemon import _raise_descriptor_limit\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))\n"
        "_raise_descriptor_limit()\n"
        "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard or hard == resource.RLIM_INFINITY)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True", out
