"""Every command through its real entry point (`python -m poller`) against moto and a real SQLite file."""

from __future__ import annotations

import csv
import io
import json
import os
import sqlite3
import time
from pathlib import Path

import pytest
from conftest import SECRET, ConfigFile, free_port, run_cli

from poller.cli import build_parser

COMMANDS = [
    ["run"],
    ["once"],
    ["check"],
    ["status"],
    ["history"],
    ["db", "upgrade"],
    ["doctor"],
    ["notify", "list"],
    ["notify", "retry"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help(command):
    proc = run_cli(*command, "--help")
    assert proc.returncode == 0
    assert "--config" in proc.stdout
    text = proc.stdout.split("options:")[0]
    assert len(text.strip().splitlines()) >= 3, "the command's docstring is its help"


def test_parser_lists_every_documented_command():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    parser = build_parser()
    choices = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for name in choices:
        assert f"poller {name}" in readme, f"README does not document `poller {name}`"


def test_python_dash_m_and_version():
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("poller ")


def test_once_records_and_exit_codes(config: ConfigFile, s3, bucket):
    s3.put_object(Bucket=bucket, Key="a b+c%.json", Body=b"1")
    config.write([{"name": "app", "bucket": bucket, "key": "a b+c%.json"}])
    first = run_cli("once", "--config", str(config.path))
    assert first.returncode == 0, first.stderr
    assert "app s3://" in first.stdout and "modified (first seen)" in first.stdout
    second = run_cli("once", "--config", str(config.path))
    assert second.returncode == 0 and "unchanged (304)" in second.stdout
    s3.put_object(Bucket=bucket, Key="a b+c%.json", Body=b"2")
    third = run_cli("once", "--config", str(config.path))
    assert third.returncode == 0 and " -> " in third.stdout
    rows = sqlite3.connect(config.db).execute("SELECT event FROM etag_history ORDER BY id").fetchall()
    assert rows == [("first_seen",), ("modified",)]


def test_once_exits_1_when_a_poll_fails(config: ConfigFile, s3, bucket):
    s3.put_object(Bucket=bucket, Key="k", Body=b"1")
    config.write(
        [{"name": "good", "bucket": bucket, "key": "k"}, {"name": "bad", "bucket": "no-such-bucket-here", "key": "k"}]
    )
    proc = run_cli("once", "--config", str(config.path))
    assert proc.returncode == 1
    assert "good" in proc.stdout and "bucket not found" in proc.stdout
    status = run_cli("status", "--config", str(config.path), "--format", "json")
    by_name = {r["name"]: r for r in json.loads(status.stdout)}
    assert by_name["bad"]["consecutive_errors"] == 1 and by_name["good"]["last_outcome"] == "modified"


def test_once_against_unreachable_endpoint(config: ConfigFile, tmp_path):
    config.write(
        [{"name": "x", "bucket": "bkt", "key": "k"}],
        s3={"endpoint_url": f"http://127.0.0.1:{free_port()}", "max_attempts": 1},
    )
    proc = run_cli("once", "--config", str(config.path))
    assert proc.returncode == 1 and "cannot connect" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_history_formats_and_filters(config: ConfigFile, s3, bucket):
    s3.put_object(Bucket=bucket, Key="k", Body=b"1")
    config.write(
        [{"name": "app-config", "bucket": bucket, "key": "k"}, {"name": "other", "bucket": bucket, "key": "missing"}]
    )
    assert run_cli("once", "--config", str(config.path)).returncode == 0
    args = ["--config", str(config.path)]
    table = run_cli("history", *args)
    assert table.returncode == 0 and table.stdout.splitlines()[0].split()[:6] == [
        "time",
        "first",
        "count",
        "watch",
        "key",
        "outcome",
    ]
    as_json = json.loads(run_cli("history", "app-config", "--format", "json", *args).stdout)
    assert [r["watch"] for r in as_json] == ["app-config"]
    assert as_json[0]["time"].endswith("Z") and as_json[0]["outcome"] == "modified"
    changes = list(csv.DictReader(io.StringIO(run_cli("history", "--changes", "--format", "csv", *args).stdout)))
    assert [(r["watch"], r["event"]) for r in changes] == [("app-config", "first_seen")]
    assert json.loads(run_cli("history", "app-*", "--since", "1h", "--format", "json", *args).stdout)
    assert json.loads(run_cli("history", "--since", "2999-01-01T00:00:00Z", "--format", "json", *args).stdout) == []
    assert len(json.loads(run_cli("history", "--limit", "1", "--format", "json", *args).stdout)) == 1
    bad = run_cli("history", "--since", "yesterday", *args)
    assert bad.returncode == 2 and "--since" in bad.stderr and "Traceback" not in bad.stderr
    # The real cause, not "expected a duration" nor a database error; a negative limit never reaches SQL.
    for argv, said in (
        (["--since", "400d"], "at most 366 days"),
        (["--changes", "--since", "0001-01-01T00:00:00+01:00"], "out of range"),
        (["--limit", "-5"], "argument --limit: must be 0 (all) or more"),
    ):
        bad = run_cli("history", *argv, *args)
        assert bad.returncode == 2 and said in bad.stderr and "database" not in bad.stderr, (argv, bad.stderr)
    bad = run_cli("notify", "list", "--limit", "-5", *args)
    assert bad.returncode == 2 and "must be 0 (all) or more" in bad.stderr


def test_status_and_history_before_any_database(config: ConfigFile):
    config.write([{"name": "x", "bucket": "bkt", "key": "k"}])
    proc = run_cli("status", "--config", str(config.path))
    assert proc.returncode == 1 and "poller db upgrade" in proc.stderr and "Traceback" not in proc.stderr


def test_db_upgrade(config: ConfigFile):
    config.write([])
    proc = run_cli("db", "upgrade", "--config", str(config.path))
    assert proc.returncode == 0, proc.stderr
    tables = {
        r[0]
        for r in sqlite3.connect(config.db).execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")
    }
    assert {"watches", "object_state", "polls", "etag_history", "alembic_version"} <= tables


def test_check_and_probe(config: ConfigFile, s3, bucket):
    s3.put_object(Bucket=bucket, Key="k", Body=b"1")
    config.write([{"name": "x", "bucket": bucket, "key": "k"}])
    ok = run_cli("check", "--config", str(config.path))
    assert ok.returncode == 0 and "configuration OK, 1 watches" in ok.stdout
    probe = run_cli("check", "--probe", "--config", str(config.path))
    assert probe.returncode == 0 and '"' in probe.stdout
    assert not config.db.exists(), "check must not write history"


def test_config_env_lookup_and_override(config: ConfigFile, s3, bucket, tmp_path):
    s3.put_object(Bucket=bucket, Key="k", Body=b"1")
    config.write([{"name": "x", "bucket": bucket, "key": "k"}])
    other_db = tmp_path / "env.db"
    proc = run_cli("once", env={"POLLER_CONFIG": str(config.path), "POLLER_DATABASE__URL": f"sqlite:///{other_db}"})
    assert proc.returncode == 0, proc.stderr
    assert other_db.exists() and not config.db.exists()


CONFIG_ERRORS = [
    # (toml, expected fragments)
    ('[[watch]]\nbucket = "b"\nkey = "k"\nbogus = 1\n', ["watch #1", "'b/k'", "bogus", "unknown key"]),
    (
        '[[watch]]\nname = "a"\nbucket = "b"\nkey = "k"\n[[watch]]\nname = "a"\nbucket = "b"\nkey = "k2"\n',
        ["watch #2", "'a'", "name", "duplicate"],
    ),
    ('[[watch]]\nname = "neg"\nbucket = "b"\nkey = "k"\ninterval = "-5s"\n', ["watch #1", "'neg'", "interval"]),
    (
        '[[watch]]\nname = "zero"\nbucket = "b"\nkey = "k"\ninterval = 0\n',
        ["watch #1", "'zero'", "interval", "greater than zero"],
    ),
    ('[[watch]]\nname = "e"\nbucket = ""\nkey = "k"\n', ["watch #1", "'e'", "bucket", "empty"]),
    ('[[watch]]\nname = "e"\nbucket = "b"\nkey = ""\n', ["watch #1", "'e'", "key", "empty"]),
    ('[[watch]]\nname = "c"\nbucket = "b"\nkey = "k"\ncron = "61 * * * *"\n', ["watch #1", "'c'", "cron"]),
    ('[[watch]]\nname = "m"\nbucket = "b"\n', ["watch #1", "'m'", "key", "missing"]),
    ('[s3]\nconditional = "maybe"\n', ["[s3]", "conditional"]),
    ("[schedule]\nconcurrency = 0\n", ["[schedule]", "concurrency"]),
    ('[database]\nmax_db_size = "2 parsecs"\n', ["[database]", "max_db_size", "500MB"]),
    ('[database]\nsample_retention = "-1h"\n', ["[database]", "sample_retention", "duration"]),
    ('[schedul]\ninterval = "1s"\n', ["schedul", "unknown key"]),
    ('[[watch]\nbucket = "b"\n', ["TOML syntax error", "line 1"]),
    ("x = " + "[" * 1000 + "]" * 1000 + "\n", ["TOML syntax error", "nested too deep"]),
    ("[database]\nmax_db_size = inf\n", ["[database]", "max_db_size", "out of range"]),
    ('[database]\nmax_db_size = "1' + "0" * 400 + '"\n', ["[database]", "max_db_size", "out of range"]),
    ('[database]\nurl = "postgresql://poller@db:5432x/poller"\n', ["[database]", "url", "cannot be read"]),
    ('[database]\nurl = "mysql://db/poller"\n', ["[database]", "url", "'mysql' is not supported"]),
    ('[[watch]]\nname = "c"\nbucket = "b"\nkey = "k"\ncron = "0 0 30 2 *"\n', ["'c'", "cron", "never fires"]),
    ('[[watch]]\nname = "n\\u0000"\nbucket = "b"\nkey = "k"\n', ["watch #1", "name", "NUL character"]),
    ('[[watch]]\nname = "n"\nbucket = "b"\nkey = "k\\u0000"\n', ["watch #1", "key", "NUL character"]),
]


@pytest.mark.parametrize(("text", "fragments"), CONFIG_ERRORS)
def test_config_errors_exit_2_and_name_the_field(tmp_path, text, fragments):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    proc = run_cli("check", "--config", str(path))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    message = proc.stderr.strip()
    assert len(message.splitlines()) == 1, message
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://poller:s3cret@db:5432x/poller",  # not a port: refused at load
        "postgresql://poller:s3/cret@127.0.0.1:1/poller",  # a raw '/' in the password
        "postgresql://poller@127.0.0.1:1/poller?password=s3cret",  # libpq's password parameter
    ],
)
def test_a_database_password_is_in_no_message(tmp_path, url):
    path = tmp_path / "c.toml"
    path.write_text(f'[database]\nurl = "{url}"\n')
    path.chmod(0o600)
    for command in (("check",), ("status",), ("db", "upgrade")):
        proc = run_cli(*command, "--config", str(path))
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
        assert "s3cret" not in proc.stdout + proc.stderr and "cret" not in proc.stderr, proc.stderr


def test_missing_config_file(tmp_path):
    proc = run_cli("status", "--config", str(tmp_path / "absent.toml"))
    assert proc.returncode == 2 and "not found" in proc.stderr and "Traceback" not in proc.stderr


def test_no_config_anywhere(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "POLLER_CONFIG"}
    proc = run_cli("status", cwd=tmp_path, env=env)
    assert proc.returncode == 2 and "--config" in proc.stderr


def test_a_config_with_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "bom.toml"
    path.write_bytes(b'\xef\xbb\xbf[[watch]]\nname = "w"\nbucket = "bucket"\nkey = "k"\n')
    proc = run_cli("check", "--config", str(path))
    assert proc.returncode == 0, proc.stderr


def test_non_utf8_config(tmp_path):
    path = tmp_path / "bin.toml"
    path.write_bytes(b'[s3]\nregion = "\xff\xfe"\n')
    proc = run_cli("check", "--config", str(path))
    assert proc.returncode == 2 and "UTF-8" in proc.stderr and "line 2" in proc.stderr


def test_usage_error_exit_2():
    proc = run_cli("frobnicate")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_world_readable_config_with_credentials_warns(tmp_path):
    path = tmp_path / "creds.toml"
    path.write_text(f'watch = []\n# aws_secret_access_key = "{SECRET}"\n')
    path.chmod(0o644)
    proc = run_cli("check", "--config", str(path))
    assert proc.returncode == 0 and "chmod 600" in proc.stderr
    assert SECRET not in proc.stderr + proc.stdout
    path.chmod(0o600)
    assert "chmod 600" not in run_cli("check", "--config", str(path)).stderr
    hook = tmp_path / "hook.toml"
    hook.write_text('watch = []\n[[notify]]\ntype = "webhook"\nurl = "http://h/"\nsecret = "s3cr3t"\n')
    hook.chmod(0o644)
    assert "chmod 600" in run_cli("check", "--config", str(hook)).stderr
    example = Path(__file__).parent.parent / "config.example.toml"
    assert "chmod 600" not in run_cli("check", "--config", str(example)).stderr  # secret = "" holds nothing


def test_example_config_is_valid_and_complete():
    from poller.config import (
        DatabaseSettings,
        MetricsSettings,
        NotifySettings,
        S3Settings,
        ScheduleSettings,
        WatchSettings,
        load_settings,
    )

    path = Path(__file__).parent.parent / "config.example.toml"
    settings = load_settings(path)
    assert len(settings.watch) == 4
    text = path.read_text()
    for model in (S3Settings, DatabaseSettings, ScheduleSettings, MetricsSettings, WatchSettings, NotifySettings):
        for field in model.model_fields:
            assert f"\n{field} = " in text, f"config.example.toml does not show {model.__name__}.{field}"


def test_doctor_against_moto(config: ConfigFile, s3, bucket):
    config.write([])
    proc = run_cli("doctor", "--bucket", bucket, "--config", str(config.path))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "If-None-Match, same ETag" in out and "If-Modified-Since = Last-Modified" in out
    assert "both headers after a same-second overwrite" in out
    # moto lets the timestamp win over a changed ETag but sends the new ETag on the 304: sound with "both".
    assert "either-condition semantics" in out and "304s carry the ETag" in out
    assert 'recommended: [s3] conditional = "auto"' in out and 'polls this server with "both"' in out
    assert "cross-check" in out
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount") == 0, "doctor deletes what it wrote"


def test_doctor_on_a_versioned_bucket_leaves_nothing(config: ConfigFile, s3, bucket):
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    config.write([])
    proc = run_cli("doctor", "--bucket", bucket, "--config", str(config.path))
    assert proc.returncode == 0 and "versioned bucket: yes" in proc.stdout
    assert "deleted events carry version ids (the 404 names the delete marker)" in proc.stdout
    listing = s3.list_object_versions(Bucket=bucket)
    assert not listing.get("Versions") and not listing.get("DeleteMarkers")


def test_doctor_missing_bucket(config: ConfigFile):
    config.write([])
    proc = run_cli("doctor", "--bucket", "no-such-bucket-doctor", "--config", str(config.path))
    assert proc.returncode == 1 and "s3://no-such-bucket-doctor" in proc.stderr and "Traceback" not in proc.stderr


def test_doctor_recommendations():
    from poller.calibrate import Semantics
    from poller.doctor import recommend

    def sem(overrides: bool, etag: bool | None, ims: bool = True) -> Semantics:
        return Semantics(True, False, ims, overrides, etag)

    rfc, either_etag, either_noetag = sem(False, True), sem(True, True), sem(True, False)
    assert recommend(rfc, rfc, "auto")[0] == "auto"
    mode, reasons, warnings = recommend(either_etag, either_etag, "both")
    assert mode == "auto" and not warnings and any("cross-check" in r for r in reasons)
    mode, reasons, warnings = recommend(either_noetag, either_noetag, "both")
    assert mode == "auto" and any('with "etag"' in r for r in reasons)
    assert len(warnings) == 1 and 'conditional = "both" is unsound' in warnings[0]
    # Only the same-second overwrite (a write) showed the timestamp winning: say what to set.
    assert recommend(rfc, either_noetag, "auto")[0] == "etag"


@pytest.mark.parametrize("fmt", ["table", "csv"])
def test_status_text_prints_as_the_generic_table_does(capsys: pytest.CaptureFixture[str], fmt: str):
    """`poller status` formats text rows at C speed (Store.status_text): same bytes as the generic
    path for the same rows, escaping included (a line break in a key would forge a row)."""
    from poller.cli import STATUS_COLUMNS, _emit, _emit_text

    values = [
        ("a", "b", "k", "unchanged", '"e"', "2026-11-24T10:00:00Z", "2026-11-24T10:00:00.5Z", 0, None, "", None),
        ("long-name", "b", "evil\nkey", "error", None, None, None, 3, "503\r\nx", "failing", "2026-11-25T07:00:00Z"),
    ]
    dicts = [dict(zip(STATUS_COLUMNS, row, strict=True)) for row in values]
    texts = [tuple("" if v is None else str(v) for v in row) for row in values]
    _emit(dicts, STATUS_COLUMNS, fmt)
    generic = capsys.readouterr().out
    _emit_text(texts, STATUS_COLUMNS, fmt)
    assert capsys.readouterr().out == generic
    assert "evil\\nkey" in generic and "\r" not in generic
    _emit_text([], STATUS_COLUMNS, fmt)  # no watches: the header alone
    assert capsys.readouterr().out.splitlines()[0].split("," if fmt == "csv" else None) == list(STATUS_COLUMNS)


def test_db_upgrade_is_refused_under_a_running_writer(config: ConfigFile):
    """A schema upgrade under a running daemon made its commits fail until it was restarted (it
    migrates at its own start anyway)."""
    from poller.dblock import acquire_writer_lock

    config.write([])
    lock = acquire_writer_lock(config.url, "poller run")
    try:
        began = time.monotonic()
        proc = run_cli("db", "upgrade", "--config", str(config.path))
        assert proc.returncode == 1 and "is in use by poller run" in proc.stderr
        assert time.monotonic() - began < 20  # at once: it waits for another upgrade, never a daemon
    finally:
        assert lock is not None
        lock.release()
    assert run_cli("db", "upgrade", "--config", str(config.path)).returncode == 0
