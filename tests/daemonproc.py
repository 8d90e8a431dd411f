"""Helpers to run `poller run` as a subprocess with a test-owned NOTIFY_SOCKET, and to read its database."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ConfigFile, wait_for


class NotifySocket:
    """The systemd side of sd_notify: a datagram socket the daemon writes its state lines to."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[str] = []

    def drain(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(65536).decode())
            except (TimeoutError, BlockingIOError):
                return self.messages

    def wait(self, needle: str, timeout: float = 20.0, after: int = 0) -> str:
        def seen() -> str | None:
            for msg in self.drain()[after:]:
                if needle in msg.split("\n") or any(line.startswith(needle) for line in msg.split("\n")):
                    return msg
            return None

        return str(wait_for(seen, timeout, what=f"sd_notify {needle!r}"))

    def close(self) -> None:
        self.sock.close()


class DaemonProcess:
    def __init__(self, config: ConfigFile, tmp: Path, env: dict[str, str] | None = None, name: str = "") -> None:
        self.config = config
        self.notify = NotifySocket(tmp / f"notify{name}.sock")
        self.log_path = tmp / f"daemon{name}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "poller", "run", "--config", str(config.path), "--log-level", "DEBUG"],
            stdout=self._log,
            stderr=self._log,
            env={**os.environ, "NOTIFY_SOCKET": str(self.notify.path), **(env or {})},
        )

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        finally:
            self._log.close()
            self.notify.close()


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Any]:
    started: list[DaemonProcess] = []

    def start(config: ConfigFile, env: dict[str, str] | None = None) -> DaemonProcess:
        d = DaemonProcess(config, tmp_path, env, name=str(len(started)))
        started.append(d)
        return d

    yield start
    for d in started:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()


def query(db: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(db, timeout=10)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def events(db: Path, watch: str) -> list[str]:
    """The ETag history events of a watch, oldest first ([] while the database is still being created)."""
    sql = "SELECT h.event FROM etag_history h JOIN watches w ON w.id = h.watch_id WHERE w.name = ? ORDER BY h.id"
    if not db.exists():
        return []
    try:
        return [r[0] for r in query(db, sql, watch)]
    except sqlite3.OperationalError:
        return []


def poll_count(db: Path, watch: str) -> int:
    if not db.exists():
        return 0
    try:
        return int(
            query(
                db,
                "SELECT COALESCE(sum(p.count), 0) FROM polls p JOIN watches w ON w.id = p.watch_id WHERE w.name = ?",
                watch,
            )[0][0]
        )
    except sqlite3.OperationalError:
        return 0
