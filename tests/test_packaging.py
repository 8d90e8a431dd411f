"""The wheel and sdist carry the migrations and the event schema: `poller db upgrade` works from an installed
package, not only a checkout, and `poller/event.schema.json` is readable as a resource."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import tarfile
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
    assert {"watches", "object_state", "polls", "etag_history", "watch_events"} <= tables
    # The event schema (README "Notifications") comes with the package too, readable as a resource.
    code = "from importlib import resources; print(resources.files('poller').joinpath('event.schema.json').read_text())"
    run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(site)},
        cwd=tmp_path,
        timeout=60,
    )
    assert run.returncode == 0 and json.loads(run.stdout) == json.loads((ROOT / "poller/event.schema.json").read_text())


@pytest.mark.slow
def test_sdist_ships_the_event_schema_and_migrations(tmp_path: Path):
    code = "import sys; from hatchling.build import build_sdist; print(build_sdist(sys.argv[1]))"
    build = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert build.returncode == 0, build.stderr
    with tarfile.open(tmp_path / build.stdout.strip()) as sdist:
        names = sdist.getnames()
        [member] = [m for m in sdist.getmembers() if m.name.endswith("/poller/event.schema.json")]
        shipped = sdist.extractfile(member)
        assert shipped is not None
        assert json.loads(shipped.read()) == json.loads((ROOT / "poller/event.schema.json").read_text())
    assert any(name.endswith("/migrations/versions/0008_watch_events.py") for name in names)
