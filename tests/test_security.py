"""Secrets never leak: a marker secret in every place it could come from, checked everywhere it could go."""

from __future__ import annotations

import os
import signal
from pathlib import Path

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
