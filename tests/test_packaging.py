"""The wheel carries the migrations: `poller db upgrade` works from an installed package, not only a checkout."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.mark.slow
def test_wheel_ships_migrations_and_they_run(tmp_path: Path):
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "dist").glob("poller-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "poller/_migrations/env.py" in names
    assert "poller/_migrations/versions/0001_initial.py" in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    db = tmp_path / "w.db"
    code = (
        "import sys, poller.store as s; d = s.migrations_dir(); "
        "assert str(d).startswith(sys.argv[1]), d; "
        "e = s.open_engine(sys.argv[2]); s.migrate(e); print(d)"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, str(site), f"sqlite:///{db}"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(site)},
        cwd=tmp_path,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    tables = {
        r[0] for r in sqlite3.connect(db).execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")
    }
    assert {"watches", "object_state", "polls", "etag_history"} <= tables
