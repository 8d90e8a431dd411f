"""Secrets never leak: a marker secret in every place it could come from, checked everywhere it could go."""

from __future__ import annotations

import json
import os
import signal
import tomllib
from pathlib import Path
from typing import Any

import pytest
from conftest import SECRET, ConfigFile, free_port, run_cli, wait_for
from daemonproc import poll_count

SESSION_TOKEN = "poller-TEST-SESSION-TOKEN-5e55i0n"
URL_SECRET = "poller-TEST-URL-PASSWORD-u7l"


def assert_clean(*texts: str) -> None:
    for text in texts:
        for marker in (SECRET, SESSION_TOKEN, URL_SECRET):
            assert marker not in text, f"{marker} leaked into: {text[:500]}"


def database_bytes(db: Path) -> str:
    return "".join(p.read_bytes().decode("latin-1") for p in db.parent.glob(db.name + "*"))


def test_credential_bearing_endpoint_url_never_leaks(config: ConfigFile, start_daemon):
    endpoint = f"http://AKIAUSER:{URL_SECRET}@127.0.0.1:{free_port()}"
    config.write([{"name": "a", "bucket": "bucket", "key": "k"}], s3={"endpoint_url": endpoint, "max_attempts": 1})
    env = {"AWS_SESSION_TOKEN": SESSION_TOKEN}
    once = run_cli("once", "--config", str(config.path), "--log-level", "DEBUG", env=env)
    assert once.returncode == 1
    daemon = start_daemon(config, env=env)
    daemon.notify.wait("READY=1")
    wait_for(lambda: poll_count(config.db, "a") >= 2, what="error polls recorded")
    outputs = [
        run_cli(cmd, "--config", str(config.path), "--format", fmt)
        for cmd in ("status", "history")
        for fmt in ("table", "json", "csv")
    ]
    daemon.signal(signal.SIGTERM)
    assert daemon.proc.wait(20) == 0
    assert_clean(
        once.stdout,
        once.stderr,
        daemon.log,
        database_bytes(config.db),
        *daemon.notify.messages,
        *(o.stdout + o.stderr for o in outputs),
    )


def test_malformed_secret_url_in_config_error_is_redacted(tmp_path: Path):
    path = tmp_path / "c.toml"
    path.write_text(f'[s3]\nendpoint_url = "ftp://user:{URL_SECRET}@host"\n')
    proc = run_cli("check", "--config", str(path))
    assert proc.returncode == 2 and "endpoint_url" in proc.stderr
    assert_clean(proc.stderr, proc.stdout)


def test_redact_hides_userinfo_with_a_slash_and_password_parameters():
    from poller.redact import redact

    text = redact("db postgresql://u:pa/ss@h/db?host=/run&password=pw1&sslmode=require and https://x?token=t0k")
    assert "pa/ss" not in text and "pw1" not in text and "t0k" not in text
    assert "postgresql://***@h/db?host=/run&password=***&sslmode=require" in text
    # An '@' in a key is not userinfo: the host stays readable.
    assert redact("https://bucket.s3.amazonaws.com/inbox/ann@example.com.csv") == (
        "https://bucket.s3.amazonaws.com/inbox/ann@example.com.csv"
    )
    assert redact("https://user@host/x") == "https://***@host/x"


def test_database_url_password_never_leaks(tmp_path: Path):
    path = tmp_path / "c.toml"
    path.write_text(f'[database]\nurl = "postgresql://poller:{URL_SECRET}@127.0.0.1:{free_port()}/poller"\n')
    for command in (["status"], ["history"], ["once"], ["db", "upgrade"]):
        proc = run_cli(*command, "--config", str(path))
        assert proc.returncode in (1, 2), proc.stderr
        assert "Traceback" not in proc.stderr
        assert_clean(proc.stderr, proc.stdout)
    broken = tmp_path / "d.toml"
    broken.write_text(f'[database]\nurl = "not a url {URL_SECRET}"\n')
    proc = run_cli("status", "--config", str(broken))
    assert proc.returncode in (1, 2) and "Traceback" not in proc.stderr
    assert_clean(proc.stderr, proc.stdout)


def _listening_inodes() -> dict[str, str]:
    found = {}
    for table in ("tcp", "tcp6", "udp", "udp6"):
        try:
            lines = Path(f"/proc/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            listening = parts[3] == "0A" if table.startswith("tcp") else parts[3] == "07"
            if listening:
                found[parts[9]] = f"{table} {parts[1]}"
    return found


def test_daemon_listens_on_no_network_port(config: ConfigFile, s3, bucket, start_daemon):
    s3.put_object(Bucket=bucket, Key="k", Body=b"v")
    config.write([{"name": "a", "bucket": bucket, "key": "k"}])
    daemon = start_daemon(config)
    daemon.notify.wait("READY=1")
    wait_for(lambda: poll_count(config.db, "a") >= 2, what="polling")
    fd_dir = Path(f"/proc/{daemon.proc.pid}/fd")
    sockets = set()
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            sockets.add(target[8:-1])
    listening = _listening_inodes()
    assert not [listening[i] for i in sockets if i in listening]
    assert daemon.stop() == 0


# --- the config file: who may write it, what it holds, re-checked on every reload ------------------


def check(path: Path, **env: str) -> Any:
    return run_cli("check", "--config", str(path), env=env)


def one_paragraph(proc: Any) -> str:
    message = proc.stderr.strip()
    assert proc.returncode == 2 and "Traceback" not in message, message
    assert len(message.splitlines()) == 1, message
    return message


@pytest.mark.parametrize(("mode", "who"), [(0o664, "its group"), (0o646, "all users"), (0o666, "its group and all")])
def test_config_writable_by_others_is_refused(tmp_path: Path, mode: int, who: str):
    path = tmp_path / "poller.toml"
    path.write_text('[[watch]]\nbucket = "my-bucket"\nkey = "k"\n')
    path.chmod(mode)
    message = one_paragraph(check(path))
    assert str(path) in message and f"writable by {who}" in message and "chmod go-w" in message, message
    path.chmod(0o644)
    assert check(path).returncode == 0


def test_config_in_a_world_writable_directory_needs_the_sticky_bit(tmp_path: Path):
    shared = tmp_path / "shared"
    shared.mkdir()
    path = shared / "poller.toml"
    path.write_text('[[watch]]\nbucket = "my-bucket"\nkey = "k"\n')
    shared.chmod(0o777)
    try:
        message = one_paragraph(check(path))
        assert "writable by all users without the sticky bit" in message and str(shared) in message
        shared.chmod(0o1777)  # like /tmp: others cannot rename over a file they do not own
        assert check(path).returncode == 0
        shared.chmod(0o775)  # group-writable directories are what a umask of 002 makes: allowed
        assert check(path).returncode == 0
    finally:
        shared.chmod(0o755)


SECRET_HOLDERS = [
    ("notify secret", f'[[notify]]\ntype = "webhook"\nurl = "http://h/"\nsecret = "{SECRET}"\n', "secret"),
    ("quoted AWS key", f'"aws_secret_access_key" = "{SECRET}"\n', "aws_secret_access_key"),
    ("inline table", f's3 = {{ region = "us-east-1", aws_session_token = "{SESSION_TOKEN}" }}\n', "aws_session_token"),
    ("webhook URL query token", f'[[notify]]\ntype = "webhook"\nurl = "https://h/x?token={URL_SECRET}"\n', "url"),
    ("webhook URL userinfo", f'[[notify]]\ntype = "webhook"\nurl = "https://bot:{URL_SECRET}@h/x"\n', "url"),
    ("endpoint_url password", f'[s3]\nendpoint_url = "http://minio:{URL_SECRET}@127.0.0.1:9000"\n', "endpoint_url"),
    ("database url password", f'[database]\nurl = "postgresql://poller:{URL_SECRET}@db/poller"\n', "[database] url"),
    (
        "command env token",
        f'[[notify]]\ntype = "command"\ncommand = ["x"]\nenv = {{ API_TOKEN = "{SECRET}" }}\n',
        "env",
    ),
    ("commented-out key", f'# aws_secret_access_key = "{SECRET}"\n', "comment"),
]


@pytest.mark.parametrize(("kind", "text", "where"), SECRET_HOLDERS, ids=[k for k, _, _ in SECRET_HOLDERS])
def test_world_readable_secret_warns_naming_the_place_not_the_value(tmp_path: Path, kind: str, text: str, where: str):
    path = tmp_path / "poller.toml"
    path.write_text(text)
    path.chmod(0o644)
    proc = check(path)
    assert "readable by every user" in proc.stderr and where in proc.stderr and "chmod 600" in proc.stderr, (
        kind,
        proc.stderr,
    )
    assert "Traceback" not in proc.stderr
    assert_clean(proc.stderr, proc.stdout)
    # 0640 (e.g. root:poller, the README's recommendation): the group may read it, others not: no warning.
    path.chmod(0o640)
    assert "readable by every user" not in check(path).stderr
    path.chmod(0o600)
    assert "readable by every user" not in check(path).stderr


def test_no_warning_without_secrets(tmp_path: Path):
    path = tmp_path / "poller.toml"
    path.write_text(
        'watch = []\n[s3]\nendpoint_url = "http://127.0.0.1:9000"\n[database]\nurl = "postgresql://poller@db/poller"\n'
        '[[notify]]\ntype = "webhook"\nurl = "https://h/hook?event=all"\nsecret = ""\n'
    )
    path.chmod(0o644)
    proc = check(path)
    assert proc.returncode == 0 and "readable" not in proc.stderr, proc.stderr


def test_find_secrets_reads_the_parsed_toml():
    from poller.config import find_secrets

    data = tomllib.loads(
        f'[s3]\n"aws_access_key_id" = "AKIA"\nx = {{ y = {{ aws_secret_access_key = "{SECRET}" }} }}\n'
        '[[watch]]\nname = "w"\nbucket = "b"\nkey = "secret"\n'  # a key *value* named secret is no secret
    )
    found = find_secrets(data)
    assert found == ["a credential ([s3] aws_access_key_id)", "a credential ([s3] x.y.aws_secret_access_key)"]
    assert find_secrets(tomllib.loads('[[notify]]\ntype = "webhook"\nurl = "https://h/x?page=2"\n')) == []


WATCH_LIST_SECRETS = [
    ('password = "x"', "a credential (watch #2 ('b') password)"),
    ('"pass\\u0077ord" = "x"', "a credential (watch #2 ('b') password)"),  # no "passw" in the text
    ('url = "https://bot:pw@h/x"', "a password (watch #2 ('b') url)"),
    ("# aws_secret_access_key = 'x'", "a credential in a comment (line 10)"),
]


@pytest.mark.parametrize(("line", "found"), WATCH_LIST_SECRETS)
def test_a_secret_inside_the_watch_list_is_found(line: str, found: str):
    """The watch list is skipped only when its text can hold no secret: one anywhere in it is found."""
    from poller.config import find_secrets

    text = (
        '[s3]\nendpoint_url = "http://127.0.0.1:9000"\n\n'
        '[[watch]]\nname = "a"\nbucket = "b"\nkey = "k1"\n\n'
        f'[[watch]]\n{line}\nname = "b"\nbucket = "b"\nkey = "k2"\n'
    )
    assert find_secrets(tomllib.loads(text), text) == [found]
    plain = text.replace(line + "\n", "")
    assert find_secrets(tomllib.loads(plain), plain) == []


def test_reload_refuses_a_writable_config_and_rechecks_secrets(config: ConfigFile, s3, bucket, caplog):
    from poller.config import load_settings
    from poller.daemon import Daemon
    from poller.sdnotify import Notifier

    config.write([{"name": "a", "bucket": bucket, "key": "a"}])
    config.path.chmod(0o600)
    daemon = Daemon(config.path, load_settings(config.path), Notifier(""))
    daemon.start(paused=True)
    try:
        before = daemon.timetable.snapshot()
        config.write([{"name": "a", "bucket": bucket, "key": "a"}, {"name": "b", "bucket": bucket, "key": "b"}])
        config.path.chmod(0o666)
        with caplog.at_level("WARNING"):
            assert not daemon.reload(), "a config others can write is refused on reload too"
        assert daemon.timetable.snapshot() == before, "the running watch list is kept"
        assert "reload failed, keeping the running watch list" in caplog.text and "writable by" in caplog.text
        # Fixed permissions, but now world-readable with a secret in it: applied, with a warning.
        caplog.clear()
        config.write(notify=[{"name": "hook", "type": "webhook", "url": "http://h/", "secret": SECRET}])
        config.path.chmod(0o644)
        with caplog.at_level("WARNING"):
            assert daemon.reload()
        assert set(daemon.timetable.snapshot()) == {"a", "b"}
        assert "readable by every user" in caplog.text and SECRET not in caplog.text
    finally:
        daemon.shutdown()


def test_sighup_with_a_group_writable_config_keeps_the_old_list(config: ConfigFile, s3, bucket, start_daemon):
    s3.put_object(Bucket=bucket, Key="a", Body=b"a")
    config.write([{"name": "a", "bucket": bucket, "key": "a"}])
    daemon = start_daemon(config)
    daemon.notify.wait("READY=1")
    config.write([{"name": "a", "bucket": bucket, "key": "a"}, {"name": "b", "bucket": bucket, "key": "a"}])
    config.path.chmod(0o664)
    mark = len(daemon.notify.drain())
    daemon.signal(signal.SIGHUP)
    ready = daemon.notify.wait("READY=1", after=mark)
    assert "reload failed" in ready and "writable by its group" in ready
    polls = poll_count(config.db, "a")
    wait_for(lambda: poll_count(config.db, "a") >= polls + 2, what="the old watch list still polled")
    assert poll_count(config.db, "b") == 0
    assert daemon.stop() == 0


# --- bucket names -----------------------------------------------------------------------------------


def test_check_refuses_a_bucket_name_with_a_header_injection(tmp_path: Path):
    path = tmp_path / "poller.toml"
    path.write_text('[[watch]]\nname = "evil"\nbucket = "bkt\\r\\nX-Evil: 1"\nkey = "k"\n')
    for env in ({}, {"POLLER_S3__STRICT_BUCKET_NAMES": "false"}):
        message = one_paragraph(check(path, **env))
        assert "watch #1 ('evil')" in message and "field 'bucket'" in message and "control character" in message
        assert "\\r\\n" in message, "the name is shown escaped"


@pytest.mark.parametrize(
    ("bucket", "strict_problem", "relaxed_ok"),
    [
        ("my-bucket", None, True),
        ("my.bucket.2026", None, True),
        ("ab", "3 to 63", True),
        ("a" * 64, "3 to 63", True),
        ("My_Bucket", "lowercase", True),
        ("-bucket", "begin and end", True),
        ("bucket-", "begin and end", True),
        ("my..bucket", "adjacent periods", True),
        ("192.168.5.4", "IP address", True),
        ("xn--bucket", "xn--", True),
        ("sthree-bucket", "sthree-", True),
        ("amzn-s3-demo-bucket", "amzn-s3-demo-", True),
        ("name.mrap", ".mrap", True),
        ("my-ap-hrzrlukc5m36ft7okagglf3gmwluquse1b-s3alias", None, True),  # an access point alias
        ("base--usw2-az1--x-s3", None, True),  # a directory bucket
        ("arn:aws:s3:us-east-1:123456789012:accesspoint/my-ap", None, True),
        ("a b", "whitespace", False),
        ("a/b", "'/'", False),
        ("a\tb", "control character", False),
        ("a\u2028b", "control character", False),
        ("b\u00fccket", "letters, digits", False),
        ("x" * 256, "1 to 255", False),
    ],
)
def test_bucket_name_rules(bucket: str, strict_problem: str | None, relaxed_ok: bool):
    from poller.config import bucket_name_problem

    strict = bucket_name_problem(bucket, strict=True)
    if strict_problem is None:
        assert strict is None
    else:
        assert strict is not None and strict_problem in strict, strict
    assert (bucket_name_problem(bucket, strict=False) is None) == relaxed_ok


def test_strict_bucket_names_opt_out(tmp_path: Path):
    path = tmp_path / "poller.toml"
    path.write_text('[[watch]]\nname = "legacy"\nbucket = "Legacy_Bucket"\nkey = "k"\n')
    message = one_paragraph(check(path))
    assert "watch #1 ('legacy')" in message and "strict_bucket_names = false" in message
    path.write_text("[s3]\nstrict_bucket_names = false\n" + path.read_text())
    assert check(path).returncode == 0


# --- control characters never forge a log line or a table row -----------------------------------------

FORGED = "\n2026-01-01T00:00:00.000Z ERROR poller: forged"


def test_crafted_names_and_keys_cannot_forge_lines(config: ConfigFile, s3, bucket, start_daemon):
    s3.put_object(Bucket=bucket, Key="k", Body=b"v1")
    watches = [
        {"name": "evil" + FORGED.replace("\n", "@NL@"), "bucket": bucket, "key": "k"},
        {"name": "missing", "bucket": bucket, "key": "nope" + FORGED.replace("\n", "@NL@")},
    ]
    config.write(watches)
    config.path.write_text(config.path.read_text().replace("@NL@", "\\n"))  # a TOML escape: a real newline
    once = run_cli("once", "--config", str(config.path))
    assert once.returncode == 0, once.stderr
    assert len(once.stdout.splitlines()) == 2, once.stdout
    assert "\\n2026-01-01T00:00:00.000Z ERROR poller: forged" in once.stdout
    for fmt in ("table", "csv"):
        for command in ("status", "history"):
            out = run_cli(command, "--config", str(config.path), "--format", fmt).stdout
            assert len(out.splitlines()) == 3, (command, fmt, out)  # a header and two rows
            assert not any(line.startswith("2026-01-01T00:00:00.000Z ERROR") for line in out.splitlines())
    rows = json.loads(run_cli("status", "--config", str(config.path), "--format", "json").stdout)
    assert {r["name"] for r in rows} == {"evil" + FORGED, "missing"}, "JSON keeps the raw value, JSON-escaped"
    daemon = start_daemon(config)
    daemon.notify.wait("READY=1")
    wait_for(lambda: poll_count(config.db, "missing") >= 3, what="a few daemon polls")
    assert daemon.stop() == 0
    assert "forged" in daemon.log
    assert not [line for line in daemon.log.splitlines() if line.lstrip("<0123456789>").startswith("2026-01-01")]


def test_describe_result_escapes_etags_and_errors():
    from datetime import UTC, datetime

    from poller.model import ObjectState, PollResult, Watch
    from poller.pipeline import describe_result

    watch = Watch(1, "w\r\nx", "bkt", "k\x1b[31m")
    now = datetime.now(UTC)
    lines = [
        describe_result(
            PollResult(watch, now, "modified", 200, 1.0, None, ObjectState(etag='"v1"\nINFO x'), "first_seen")
        ),
        describe_result(PollResult(watch, now, "error", 500, 1.0, None, None, None, error="boom\nERROR forged")),
        describe_result(PollResult(watch, now, "unchanged", 304, 1.0, None, ObjectState(etag="\u2028e"), None)),
    ]
    for line in lines:
        assert len(line.splitlines()) == 1 and "\x1b" not in line and line.isprintable(), line


def test_every_log_line_is_one_line():
    import logging

    from poller.logs import JournalFormatter, UTCFormatter

    record = logging.LogRecord("poller", logging.INFO, __file__, 1, "watch %s done", ("a\nERROR forged",), None)
    for formatter in (UTCFormatter("%(levelname)s %(message)s"), JournalFormatter("%(message)s")):
        assert len(formatter.format(record).splitlines()) == 1
