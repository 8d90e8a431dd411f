"""Shared fixtures: a real moto S3 server process on a free loopback port, a bucket per test,
config files in tmp_path, and helpers that wait on conditions with deadlines (never fixed sleeps)."""

from __future__ import annotations

import contextlib
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from pgserver import PgServer, find_bindir

# A marker secret: tests assert it never reaches logs, the database or CLI output.
SECRET = "poller-TEST-SECRET-d0n0tl3ak-7f3a9c"
ACCESS_KEY = "AKIAPOLLERTESTKEY01"

os.environ.update(
    {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
)
for _var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "POLLER_CONFIG", "NOTIFY_SOCKET", "JOURNAL_STREAM", "WATCHDOG_USEC"):
    os.environ.pop(_var, None)


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    """The whole suite (`pytest` with no paths) runs on one xdist worker per CPU; named files or tests
    run in this process, unless -n says otherwise."""
    # Most of the suite's time is CPU (each `python -m poller` costs ~1 s of imports), so a worker
    # per core. Each worker is its own session: its own moto server and PostgreSQL server.
    if not config.pluginmanager.hasplugin("xdist") or hasattr(config, "workerinput"):
        return
    if config.option.numprocesses is None and config.args_source == pytest.Config.ArgsSource.TESTPATHS:
        config.option.numprocesses = "auto"
        if config.option.dist == "no":
            config.option.dist = "worksteal"  # tests vary from 1 ms to 50 s: idle workers take over the rest


@contextlib.contextmanager
def serving(handler: type[http.server.BaseHTTPRequestHandler], tls: Any = None) -> Iterator[int]:
    """A real HTTP(S) server on 127.0.0.1 answering with ``handler``; yields its port."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fail_once(
    monkeypatch: pytest.MonkeyPatch, target: Any, name: str, message: str = "database is locked"
) -> list[BaseException]:
    """Make ``target.name`` raise a database error (OperationalError) on its first call only; the
    list returned holds it once raised."""
    from sqlalchemy.exc import OperationalError

    real = getattr(target, name)
    raised: list[BaseException] = []

    def flaky(*args: Any, **kwargs: Any) -> Any:
        if not raised:
            raised.append(OperationalError("SELECT", {}, Exception(message)))
            raise raised[0]
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, flaky)
    return raised


def wait_for(condition: Callable[[], Any], timeout: float = 15.0, interval: float = 0.05, what: str = "") -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto server subprocess on 127.0.0.1 (tests/motoserver.py), one per session: one per xdist worker."""
    workdir = tmp_path_factory.mktemp("moto")
    log, port_file = workdir / "moto.log", workdir / "port"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("motoserver.py")), str(port_file)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )

    def up() -> str | None:
        if proc.poll() is not None:
            raise AssertionError(f"moto server exited: {log.read_text()}")
        if not port_file.exists():
            return None
        endpoint = f"http://127.0.0.1:{port_file.read_text()}"
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1).close()
        except OSError:
            return None
        return endpoint

    endpoint = str(wait_for(up, timeout=30, what="moto server"))
    yield endpoint
    proc.terminate()
    proc.wait(10)


def make_client(endpoint: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, retries={"mode": "standard", "max_attempts": 1}),
    )


@pytest.fixture(scope="session")
def s3(s3_endpoint: str) -> Any:
    return make_client(s3_endpoint)


@pytest.fixture
def bucket(s3: Any) -> str:
    name = f"t-{uuid.uuid4().hex[:20]}"
    s3.create_bucket(Bucket=name)
    return name


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def render_config(
    sections: dict[str, dict[str, Any]], watches: list[dict[str, Any]], notify: list[dict[str, Any]] | None = None
) -> str:
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
        lines.append("")
    for table, entries in (("watch", watches), ("notify", notify or [])):
        for entry in entries:
            lines.append(f"[[{table}]]")
            lines += [f"{k} = {toml_value(v)}" for k, v in entry.items()]
            lines.append("")
    return "\n".join(lines)


class ConfigFile:
    """A poller config in tmp_path pointing at the test S3 server and a fresh SQLite file."""

    def __init__(self, path: Path, endpoint: str) -> None:
        self.path = path
        self.db = path.parent / "poller.db"
        self.sections: dict[str, dict[str, Any]] = {
            "s3": {
                "endpoint_url": endpoint,
                "addressing_style": "path",
                "connect_timeout": "2s",
                "read_timeout": "5s",
                "max_attempts": 2,
            },
            "database": {"url": f"sqlite:///{self.db}"},
            "schedule": {"interval": "1s", "concurrency": 8},
        }
        self.watches: list[dict[str, Any]] = []
        self.notify: list[dict[str, Any]] = []

    def write(
        self,
        watches: list[dict[str, Any]] | None = None,
        notify: list[dict[str, Any]] | None = None,
        **sections: dict[str, Any],
    ) -> ConfigFile:
        if watches is not None:
            self.watches = watches
        if notify is not None:
            self.notify = notify
        for name, values in sections.items():
            self.sections.setdefault(name, {}).update(values)
        self.path.write_text(render_config(self.sections, self.watches, self.notify), encoding="utf-8")
        return self

    @property
    def url(self) -> str:
        return str(self.sections["database"]["url"])


@pytest.fixture
def config(tmp_path: Path, s3_endpoint: str) -> ConfigFile:
    return ConfigFile(tmp_path / "poller.toml", s3_endpoint)


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 60) -> Any:
    """Run the real `python -m poller` entry point as a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "poller", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """A real PostgreSQL server for the session (tests/pgserver.py); skipped only outside CI."""
    bindir = find_bindir()
    if bindir is None:
        reason = "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): apt-get install postgresql"
        if os.environ.get("CI"):
            pytest.fail(f"CI must test PostgreSQL: {reason}")
        pytest.skip(reason)
    server = PgServer(bindir)
    try:
        server.start()
    except Exception:
        server.stop()
        raise
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The store contract runs over every backend: a fresh SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'p.db'}"
        return
    server: PgServer = request.getfixturevalue("pg_server")
    with server.database() as url:
        yield url


@pytest.fixture
def store(db_url: str) -> Iterator[Any]:
    """A migrated ``poller.store.Store`` over ``db_url``: the store contract, on every backend."""
    from poller.store import Store, migrate, open_engine

    engine = open_engine(db_url)
    migrate(engine)
    s = Store(engine)
    yield s
    s.close()


# The daemon-as-a-subprocess fixture lives with its helpers; imported last (it imports from here).
from daemonproc import start_daemon  # noqa: E402, F401
