"""Reload and start-up soundness with a real daemon subprocess: a config boto3 would reject is refused
(old config kept, STATUS= says why), a re-added watch resumes from its stored state, an empty file is
not "stop watching everything", and one writer per SQLite database."""

from __future__ import annotations

import signal
import socket
from typing import Any

from conftest import ConfigFile, fail_once, run_cli, wait_for
from daemonproc import events, poll_count, query


def _active(config: ConfigFile) -> list[tuple[Any, ...]]:
    return query(config.db, "SELECT name FROM watches WHERE active ORDER BY name")


def _sighup(daemon: Any) -> str:
    """Send SIGHUP and return the READY=1 message that ends the reload (it carries STATUS=)."""
    mark = len(daemon.notify.drain())
    daemon.signal(signal.SIGHUP)
    daemon.notify.wait("RELOADING=1", after=mark)
    return str(daemon.notify.wait("READY=1", after=mark))


def test_sighup_with_a_config_boto3_rejects_keeps_the_old_config(config: ConfigFile, s3, bucket, start_daemon):
    s3.put_object(Bucket=bucket, Key="a", Body=b"1")
    config.write([{"name": "a", "bucket": bucket, "key": "a"}])
    daemon = start_daemon(config)
    daemon.notify.wait("READY=1")
    wait_for(lambda: poll_count(config.db, "a") >= 1, what="a polled")

    bad_configs = (
        ({"profile": "nosuch"}, "profile 'nosuch' is not defined"),
        ({"region": "us east 1"}, "region 'us east 1' is not a valid region name"),
        ({"endpoint_url": "http://[::1:9204"}, "cannot be parsed"),
        ({"endpoint_url": "http://127.0.0.1:92x4"}, "cannot be parsed"),
    )
    for s3_values, reason in bad_configs:
        # The new list names another watch: it must not reach the database either.
        good_s3 = dict(config.sections["s3"])
        config.write([{"name": "b", "bucket": bucket, "key": "a"}], s3=s3_values)
        ready = _sighup(daemon)
        assert "reload failed, old config kept" in ready and reason in ready, ready
        assert _active(config) == [("a",)], "nothing is synced before the new config is known good"
        polls = poll_count(config.db, "a")
        wait_for(lambda n=polls: poll_count(config.db, "a") >= n + 2, what="the old watch list still polled")
        assert daemon.proc.poll() is None

        # `poller check` refuses the same file, in one paragraph with exit 2.
        check = run_cli("check", "--config", str(config.path))
        assert check.returncode == 2 and reason in check.stderr and "Traceback" not in check.stderr
        assert len(check.stderr.strip().splitlines()) == 1
        config.sections["s3"] = good_s3

    # A good file afterwards applies and clears the note.
    config.write([{"name": "a", "bucket": bucket, "key": "a"}])
    ready = _sighup(daemon)
    assert "reload failed" not in ready
    assert daemon.stop() == 0
    assert "Traceback" not in daemon.log


def test_bad_s3_config_at_start_is_one_paragraph_exit_2(config: ConfigFile, bucket):
    every = (("run",), ("once",), ("check",), ("check", "--probe"), ("doctor", "--bucket", bucket))
    cases = (
        ({"profile": "nosuch"}, every[:2]),
        ({"region": "us east 1"}, every[:2]),
        ({"endpoint_url": "http://[::1:9204"}, every),
    )
    for s3_values, commands in cases:
        config.write([{"name": "a", "bucket": bucket, "key": "a"}], s3=s3_values)
        for args in commands:
            proc = run_cli(*args, "--config", str(config.path))
            assert proc.returncode == 2, (args, proc.stderr)
            assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        config.sections["s3"].pop(next(iter(s3_values)))
    assert not config.db.exists(), "nothing was written for a config that cannot be used"


def test_a_broken_credentials_source_is_a_config_error(config: ConfigFile, bucket, tmp_path):
    aws_config = tmp_path / "aws-config"
    aws_config.write_text(
        "[profile role]\nrole_arn = arn:aws:iam::123456789012:role/x\n\n"
        "[profile chained]\nrole_arn = arn:aws:iam::123456789012:role/x\nsource_profile = gone\n\n"
        "[profile proc]\ncredential_process = /nonexistent/get-creds --json\n\n"
        "[profile fine]\nregion = us-east-1\n"
    )
    env = {"AWS_CONFIG_FILE": str(aws_config)}
    expected = {
        "role": "role_arn needs source_profile",
        "chained": "source_profile 'gone' is not defined",
        "proc": "names no program that exists",
    }
    for profile, reason in expected.items():
        config.write([{"name": "a", "bucket": bucket, "key": "a"}], s3={"profile": profile})
        proc = run_cli("check", "--config", str(config.path), env=env)
        assert proc.returncode == 2 and reason in proc.stderr, proc.stderr
    config.write(s3={"profile": "fine"})
    assert run_cli("check", "--config", str(config.path), env=env).returncode == 0


def test_readded_watches_resume_from_their_stored_state(config: ConfigFile, s3, bucket, start_daemon):
    names = ["w1", "w2", "w3"]
    for name in [*names, "keeper"]:
        s3.put_object(Bucket=bucket, Key=name, Body=b"v1")
    keeper = {"name": "keeper", "bucket": bucket, "key": "keeper"}
    watched = [{"name": n, "bucket": bucket, "key": n} for n in names]
    config.write([*watched, keeper])
    daemon = start_daemon(config)
    daemon.notify.wait("READY=1")
    wait_for(lambda: all(events(config.db, n) == ["first_seen"] for n in names), what="first_seen of each")

    config.write([keeper])
    assert "reload failed" not in _sighup(daemon)
    for name in names:
        s3.put_object(Bucket=bucket, Key=name, Body=b"v2 changed while out of the config")
    config.write([*watched, keeper])
    assert "reload failed" not in _sighup(daemon)
    wait_for(
        lambda: all(events(config.db, n) == ["first_seen", "modified"] for n in names),
        what="one modified per re-added watch",
    )
    counts = {n: poll_count(config.db, n) for n in names}
    wait_for(lambda: all(poll_count(config.db, n) >= counts[n] + 2 for n in names), what="more polls")
    for name in names:
        assert events(config.db, name) == ["first_seen", "modified"], name
    previous = query(
        config.db,
        "SELECT count(*) FROM etag_history h JOIN watches w ON w.id = h.watch_id "
        "WHERE h.event = 'modified' AND h.previous_etag IS NOT NULL AND h.previous_etag != h.etag",
    )
    assert previous == [(3,)], "each modified names the stored ETag it replaced"
    assert daemon.stop() == 0


def test_an_empty_config_on_reload_is_refused_unless_it_says_so(config: ConfigFile, s3, bucket, start_daemon):
    s3.put_object(Bucket=bucket, Key="a", Body=b"1")
    config.write([{"name": "a", "bucket": bucket, "key": "a"}])
    daemon = start_daemon(config)
    daemon.notify.wait("READY=1")
    wait_for(lambda: poll_count(config.db, "a") >= 1, what="a polled")

    for text in ("", "[s3]\n", '# truncated\n[schedule]\ninterval = "1s"\n'):
        config.path.write_text(text)
        ready = _sighup(daemon)
        assert "reload failed" in ready and "no [[watch]] entries" in ready and "watch = []" in ready, ready
        assert _active(config) == [("a",)]
    polls = poll_count(config.db, "a")
    wait_for(lambda: poll_count(config.db, "a") >= polls + 2, what="still polling a")

    # Said explicitly: the daemon runs on with no watches.
    config.path.write_text("watch = []\n" + config.path.read_text())
    ready = _sighup(daemon)
    assert "reload failed" not in ready and "STATUS=watching 0 keys" in ready, ready
    assert _active(config) == []
    assert daemon.stop() == 0


def test_an_empty_config_at_start(config: ConfigFile):
    config.path.write_text("")
    for command in ("run", "once", "check"):
        proc = run_cli(command, "--config", str(config.path))
        assert proc.returncode == 2 and "no [[watch]] entries" in proc.stderr and "Traceback" not in proc.stderr
    assert not config.db.exists()
    config.path.write_text("watch = []\n")
    proc = run_cli("check", "--config", str(config.path))
    assert proc.returncode == 0 and "configuration OK, 0 watches" in proc.stdout
    proc = run_cli("once", "--config", str(config.path))
    assert proc.returncode == 0, proc.stderr


def test_one_writer_per_sqlite_database(config: ConfigFile, s3, bucket, start_daemon):
    s3.put_object(Bucket=bucket, Key="a", Body=b"1")
    config.write([{"name": "a", "bucket": bucket, "key": "a"}])
    daemon = start_daemon(config)
    daemon.notify.wait("READY=1")
    wait_for(lambda: events(config.db, "a") == ["first_seen"], what="first_seen")
    pid = daemon.proc.pid

    for command in ("once", "run"):
        proc = run_cli(command, "--config", str(config.path))
        assert proc.returncode == 1, proc.stderr
        assert f"database {config.db} is in use by poller run (pid {pid})" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    # Readers work alongside.
    history = run_cli("history", "a", "--changes", "--config", str(config.path))
    assert history.returncode == 0 and "first_seen" in history.stdout
    assert run_cli("status", "--config", str(config.path)).returncode == 0

    # The lock dies with the process, even by SIGKILL.
    daemon.proc.kill()
    daemon.proc.wait(20)
    s3.put_object(Bucket=bucket, Key="a", Body=b"2")
    proc = run_cli("once", "--config", str(config.path))
    assert proc.returncode == 0 and " -> " in proc.stdout, proc.stderr
    assert events(config.db, "a") == ["first_seen", "modified"]


def test_metrics_port_in_use_is_one_clear_line_before_ready(config: ConfigFile, s3, bucket, start_daemon):
    s3.put_object(Bucket=bucket, Key="a", Body=b"1")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config.write([{"name": "a", "bucket": bucket, "key": "a"}], metrics={"listen": f"127.0.0.1:{port}"})
        daemon = start_daemon(config)
        code = daemon.proc.wait(30)
    assert code == 1
    log = daemon.log
    assert f"cannot serve metrics on 127.0.0.1:{port} ([metrics] listen)" in log and "Traceback" not in log, log
    assert not any("READY=1" in m for m in daemon.notify.drain())
    assert poll_count(config.db, "a") == 0, "no worker started"


def test_a_readded_prefix_watch_resumes_from_its_stored_listing(config: ConfigFile, s3, bucket):
    from poller.config import load_settings
    from poller.daemon import Daemon
    from poller.sdnotify import Notifier

    for key in ("p/a", "p/b", "keep"):
        s3.put_object(Bucket=bucket, Key=key, Body=b"v1")
    keeper = {"name": "keeper", "bucket": bucket, "key": "keep"}
    prefix = {"name": "p", "bucket": bucket, "prefix": "p/"}
    config.write([keeper, prefix])
    daemon = Daemon(config.path, load_settings(config.path), Notifier(""))
    daemon.start(paused=True)
    try:
        first = daemon.service.poll(daemon.current.watches["p"])
        assert first is not None and sorted(c.event or "" for c in first.changes) == ["first_seen", "first_seen"]
        config.write([keeper])
        assert daemon.reload()
        s3.put_object(Bucket=bucket, Key="p/a", Body=b"v2 while out of the config")
        config.write([keeper, prefix])
        assert daemon.reload()
        again = daemon.service.poll(daemon.current.watches["p"])
        assert again is not None
        assert [(c.key, c.event) for c in again.changes if c.event] == [("p/a", "modified")]
    finally:
        daemon.shutdown()
    assert events(config.db, "p") == ["first_seen", "first_seen", "modified"]


def test_the_writers_linger_follows_a_reload(config: ConfigFile, s3, bucket):
    # A watch with a short interval added by a reload must not skip slots while its result waits
    # for company: the linger is a quarter of the shortest interval in the running config.
    from poller.config import load_settings
    from poller.daemon import Daemon
    from poller.pipeline import DAEMON_LINGER
    from poller.sdnotify import Notifier

    s3.put_object(Bucket=bucket, Key="k", Body=b"v1")
    config.write([{"name": "slow", "bucket": bucket, "key": "k", "interval": "60s"}])
    daemon = Daemon(config.path, load_settings(config.path), Notifier(""))
    daemon.start(paused=True)
    try:
        assert daemon.recorder.linger == DAEMON_LINGER
        config.write(
            [
                {"name": "slow", "bucket": bucket, "key": "k", "interval": "60s"},
                {"name": "fast", "bucket": bucket, "key": "k", "interval": "0.2s"},
            ]
        )
        assert daemon.reload()
        assert daemon.recorder.linger == 0.05
    finally:
        daemon.shutdown()


def test_a_reload_keeps_one_record_per_watch(config: ConfigFile, s3, bucket):
    """The running daemon keeps each watch once (with its schedule), shared with the timetable: a
    watch the reload left alone keeps its object, a changed one gets the new one in both places."""
    from poller.config import load_settings
    from poller.daemon import Daemon
    from poller.sdnotify import Notifier

    s3.put_object(Bucket=bucket, Key="k", Body=b"v1")
    first = [
        {"name": "same", "bucket": bucket, "key": "k", "interval": "60s"},
        {"name": "slower", "bucket": bucket, "key": "k", "interval": "60s"},
    ]
    config.write(first)
    daemon = Daemon(config.path, load_settings(config.path), Notifier(""))
    daemon.start(paused=True)
    try:
        before = dict(daemon.current.watches)
        assert before["slower"].schedule == (60.0, None)
        config.write([first[0], {**first[1], "interval": "120s"}])
        assert daemon.reload()
        after = daemon.current.watches
        assert after["same"] is before["same"]
        assert after["slower"].schedule == (120.0, None) and after["slower"].id == before["slower"].id
        for name in ("same", "slower"):
            entry = daemon.timetable.get(name)
            assert entry is not None and entry.watch is after[name]
        assert str(daemon.timetable.get("slower").trigger) == "every 2m"  # type: ignore[union-attr]
    finally:
        daemon.shutdown()


def test_a_reload_whose_state_read_fails_after_the_sync_is_tried_again(config: ConfigFile, s3, bucket, monkeypatch):
    """The sync committed the new list, then reading the added watches' state failed: the running list
    is not the stored one (the added watch unpolled), so the daemon tries the reload again by itself,
    and a re-pointed watch, whose old object's state the sync dropped, is not polled meanwhile."""

    from poller.config import load_settings
    from poller.daemon import Daemon
    from poller.sdnotify import Notifier

    s3.put_object(Bucket=bucket, Key="k", Body=b"v1")
    s3.put_object(Bucket=bucket, Key="other", Body=b"o1")
    first = [{"name": "a", "bucket": bucket, "key": "k"}, {"name": "r", "bucket": bucket, "key": "k"}]
    second = [*first[:1], {"name": "b", "bucket": bucket, "key": "k"}, {"name": "r", "bucket": bucket, "key": "other"}]
    config.write(first)
    daemon = Daemon(config.path, load_settings(config.path), Notifier(""))
    daemon.start(paused=True)
    try:
        daemon.service.poll(daemon.current.watches["r"])
        config.write(second)
        fail_once(monkeypatch, daemon.store, "load_states_for")
        assert not daemon.reload()
        assert [name for (name,) in _active(config)] == ["a", "b", "r"]  # the sync committed
        assert "b" not in daemon.current.watches and daemon._retry_reload_at > 0
        assert "the reload is tried again in 10 s" in daemon._status_note
        # r still points at "k" here, whose state the sync dropped: no poll of it until a reload succeeds.
        r_id = daemon.current.watches["r"].id
        assert daemon._ahead_held == {r_id}  # the workers hand out no poll of it (paused here: none run)
        config.write([{"name": "a", "bucket": bucket, "key": "k", "interval": "-1s"}])
        assert not daemon.reload()  # a bad config meanwhile: refused, and still tried again
        assert daemon._retry_reload_at > 0 and daemon._ahead_held == {r_id}
        config.write(second)
        pings: list[int] = []
        monkeypatch.setattr(daemon, "_alive", lambda: pings.append(1))
        assert daemon.reload()  # what the main loop does once RELOAD_RETRY has passed
        assert len(pings) >= 2  # WATCHDOG=1 between its steps (sync, state read)
        assert "b" in daemon.current.watches and daemon.timetable.get("b") is not None
        assert daemon._retry_reload_at == 0.0 and daemon.current.watches["r"].key == "other"
        assert daemon._ahead_held == set()
        again = daemon.service.poll(daemon.current.watches["r"])
        assert again is not None and again.event == "first_seen"
    finally:
        daemon.shutdown()
    rows = query(
        config.db,
        "SELECT h.key, h.event FROM etag_history h JOIN watches w ON w.id = h.watch_id "
        "WHERE w.name = 'r' ORDER BY h.id",
    )
    assert rows == [("k", "first_seen"), ("other", "first_seen")]


def test_a_reload_whose_sync_fails_is_tried_again(config: ConfigFile, s3, bucket, monkeypatch):
    from sqlalchemy.exc import OperationalError

    from poller.config import load_settings
    from poller.daemon import Daemon
    from poller.sdnotify import Notifier

    s3.put_object(Bucket=bucket, Key="k", Body=b"v1")
    config.write([{"name": "a", "bucket": bucket, "key": "k"}])
    daemon = Daemon(config.path, load_settings(config.path), Notifier(""))
    daemon.start(paused=True)
    try:
        config.write([{"name": "a", "bucket": bucket, "key": "k"}, {"name": "b", "bucket": bucket, "key": "k"}])

        def down(*_: Any) -> Any:
            raise OperationalError("INSERT", {}, Exception("database is locked"))

        monkeypatch.setattr(daemon.store, "sync_watches", down)
        assert not daemon.reload()
        # It may have committed all the same (the connection lost during COMMIT): tried again.
        assert [name for (name,) in _active(config)] == ["a"]
        assert daemon._retry_reload_at > 0 and "saving the new watch list to the database failed" in daemon._status_note
        monkeypatch.undo()
        assert daemon.reload() and daemon._retry_reload_at == 0.0 and "b" in daemon.current.watches
    finally:
        daemon.shutdown()


def test_a_vital_thread_that_dies_stops_the_daemon_with_exit_1(config: ConfigFile, s3, bucket, caplog):
    """WATCHDOG=1 and STATUS= came from the main loop whatever the other threads did: a dead timetable
    thread left a daemon that looked healthy and polled nothing. It now stops with exit status 1 (the
    service manager restarts it)."""
    import threading

    from poller.config import load_settings
    from poller.daemon import Daemon
    from poller.sdnotify import Notifier

    s3.put_object(Bucket=bucket, Key="k", Body=b"v1")
    config.write([{"name": "a", "bucket": bucket, "key": "k"}])
    daemon = Daemon(config.path, load_settings(config.path), Notifier(""))
    code: list[int] = []
    runner = threading.Thread(target=lambda: code.append(daemon.run()))
    runner.start()
    try:
        wait_for(lambda: getattr(daemon, "timetable", None) is not None and daemon.timetable._thread is not None,
                 what="the timetable running")  # fmt: skip
        ended = threading.Thread(target=lambda: None, name="poller-timetable")
        ended.start()
        ended.join()
        daemon.timetable.stop()
        daemon.timetable._thread = ended  # as if it had died
        daemon._wake.set()
        runner.join(60)
    finally:
        daemon.request_stop()
        runner.join(60)
    assert code == [1]
    assert "the poller-timetable thread has stopped" in caplog.text


def test_the_daemon_locks_a_replaced_writer_lock_file_anew(config: ConfigFile, s3, bucket, caplog):
    from poller.config import load_settings
    from poller.daemon import Daemon
    from poller.dblock import acquire_writer_lock
    from poller.sdnotify import Notifier

    config.write([{"name": "a", "bucket": bucket, "key": "k"}])
    lock = acquire_writer_lock(config.url, "poller run")
    assert lock is not None
    daemon = Daemon(config.path, load_settings(config.path), Notifier(""))
    daemon.writer_lock = lock
    daemon.start(paused=True)
    try:
        lock.path.unlink()
        daemon._check_writer_lock()  # what the main loop does at every turn
        assert lock.intact() and "locked anew" in caplog.text
        # Another writer got in first: said once, and the lock is taken back as soon as it is free.
        lock.path.unlink()
        intruder = acquire_writer_lock(config.url, "poller once")
        assert intruder is not None
        daemon._check_writer_lock()
        daemon._check_writer_lock()
        assert caplog.text.count("another process holds it") == 1 and not lock.intact()
        intruder.release()
        daemon._check_writer_lock()
        assert lock.intact()
    finally:
        daemon.shutdown()
        lock.release()


def test_the_main_loop_tries_a_failed_reload_again_by_itself(config: ConfigFile, s3, bucket, monkeypatch):
    """The retry is the main loop's: no SIGHUP needed after the state read failed behind a committed sync."""
    import threading

    import poller.daemon
    from poller.config import load_settings
    from poller.daemon import Daemon
    from poller.sdnotify import Notifier

    monkeypatch.setattr(poller.daemon, "STATUS_EVERY", 0.05)
    monkeypatch.setattr(poller.daemon, "RELOAD_RETRY", 0.0)
    s3.put_object(Bucket=bucket, Key="k", Body=b"v1")
    config.write([{"name": "a", "bucket": bucket, "key": "k"}])
    daemon = Daemon(config.path, load_settings(config.path), Notifier(""))
    raised = fail_once(monkeypatch, daemon.store, "load_states_for")
    runner = threading.Thread(target=daemon.run)
    runner.start()
    try:
        wait_for(lambda: daemon.timetable.get("a") is not None, what="the daemon running")
        config.write([{"name": "a", "bucket": bucket, "key": "k"}, {"name": "b", "bucket": bucket, "key": "k"}])
        daemon.request_reload()
        wait_for(lambda: "b" in daemon.current.watches, what="the reload tried again and applied")
        assert len(raised) == 1  # it failed once first
    finally:
        daemon.request_stop()
        runner.join(60)
