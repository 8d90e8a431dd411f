"""The single-writer lock on a SQLite database: a real flock on a real sidecar file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import run_cli

from poller.dblock import DatabaseInUse, acquire_writer_lock, lock_path


def test_lock_path_only_for_sqlite_files(tmp_path: Path):
    assert lock_path(f"sqlite:///{tmp_path}/p.db") == tmp_path / "p.db.lock"
    assert lock_path("sqlite:///relative.db") == Path("relative.db.lock")
    assert lock_path("sqlite://") is None
    assert lock_path("sqlite:///:memory:") is None
    assert lock_path("postgresql+psycopg://u:pw@localhost/poller") is None
    assert acquire_writer_lock("postgresql+psycopg://u:pw@localhost/poller", "poller run") is None


def test_a_second_writer_is_refused_naming_the_holder(tmp_path: Path):
    url = f"sqlite:///{tmp_path}/p.db"
    held = acquire_writer_lock(url, "poller run")
    assert held is not None
    assert (tmp_path / "p.db.lock").read_text() == f"{os.getpid()} poller run\n"
    # flock belongs to the open file description: a second open in this process conflicts too.
    with pytest.raises(DatabaseInUse) as refused:
        acquire_writer_lock(url, "poller once")
    assert f"database {tmp_path}/p.db is in use by poller run (pid {os.getpid()})" in str(refused.value)
    held.release()
    again = acquire_writer_lock(url, "poller once")
    assert again is not None
    assert (tmp_path / "p.db.lock").read_text() == f"{os.getpid()} poller once\n"
    again.release()


def test_a_missing_directory_is_left_to_the_database_open(tmp_path: Path):
    assert acquire_writer_lock(f"sqlite:///{tmp_path}/nowhere/p.db", "poller once") is None


def test_a_database_reached_through_a_symlink_takes_the_same_lock(tmp_path: Path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "p.db").touch()
    (tmp_path / "p.db").symlink_to(tmp_path / "real" / "p.db")
    assert lock_path(f"sqlite:///{tmp_path}/p.db") == tmp_path / "real" / "p.db.lock"
    held = acquire_writer_lock(f"sqlite:///{tmp_path}/real/p.db", "poller run")
    assert held is not None
    with pytest.raises(DatabaseInUse, match="in use by poller run"):
        acquire_writer_lock(f"sqlite:///{tmp_path}/p.db", "poller once")
    held.release()


def test_a_deleted_lock_file_lets_no_second_writer_in(tmp_path: Path):
    """An operator deleting the lock file as "stale": the next writer would lock a new file beside the
    held one. The holder sees it (intact) and locks the new file (renew); a writer that gets there
    first is refused from then on, and the holder is told."""
    url = f"sqlite:///{tmp_path}/p.db"
    held = acquire_writer_lock(url, "poller run")
    assert held is not None and held.intact()
    (tmp_path / "p.db.lock").unlink()
    assert not held.intact()
    held.renew()
    assert held.intact()
    with pytest.raises(DatabaseInUse, match="in use by poller run"):
        acquire_writer_lock(url, "poller once")
    (tmp_path / "p.db.lock").unlink()
    other = acquire_writer_lock(url, "poller once")  # in before the holder noticed
    assert other is not None
    with pytest.raises(DatabaseInUse, match="in use by poller once"):
        held.renew()
    other.release()
    held.release()


def test_a_sqlite_uri_filename_is_refused_at_load(tmp_path: Path):
    """sqlite:///file:p.db?uri=true took no writer lock (its options decide where the data goes)."""
    from poller.config import database_url_problem

    assert "SQLite URI filenames" in (database_url_problem("sqlite:///file:p.db?uri=true") or "")
    assert database_url_problem(f"sqlite:///{tmp_path}/p.db") is None
    config = tmp_path / "poller.toml"
    config.write_text('[database]\nurl = "sqlite:///file:p.db?uri=true"\n')
    proc = run_cli("check", "--config", str(config))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "[database]" in proc.stderr and "url" in proc.stderr and "SQLite URI filenames" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_short_chore_waits_for_the_lock_but_not_for_a_daemon(tmp_path: Path, monkeypatch):
    import threading
    import time

    from conftest import wait_for

    import poller.dblock

    url = f"sqlite:///{tmp_path}/p.db"
    upgrade = acquire_writer_lock(url, "poller db upgrade")
    assert upgrade is not None
    got: list[object] = []
    waits: list[float] = []
    sleep = time.sleep
    monkeypatch.setattr(poller.dblock.time, "sleep", lambda s: (waits.append(s), sleep(s)))
    waiter = threading.Thread(target=lambda: got.append(acquire_writer_lock(url, "poller db upgrade", wait=30)))
    waiter.start()
    wait_for(lambda: waits, what="the second upgrade refused once, and waiting")
    upgrade.release()  # the first upgrade ends: the second goes on
    waiter.join(30)
    assert got and got[0] is not None
    got[0].release()  # type: ignore[attr-defined]
    daemon = acquire_writer_lock(url, "poller run")
    assert daemon is not None
    with pytest.raises(DatabaseInUse, match="in use by poller run"):
        acquire_writer_lock(url, "poller db upgrade", wait=30)  # at once: a daemon does not end soon
    daemon.release()
