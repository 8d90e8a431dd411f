"""bench/prefix.py: the change plan, the history check, the aligned phases, the counting pipe, and
one small end-to-end run of `python -m bench.prefix` (rclone, the real daemon, every round)."""

from __future__ import annotations

import http.client
import http.server
import json
import os
import subprocess
import sys
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import serving

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.prefix import (  # noqa: E402
    PHASE_WINDOW,
    CountingPipe,
    apply_changes,
    body_of,
    check_history,
    create_keys,
    key_of,
    plan_changes,
    slot_before,
)
from bench.prefix import aligned_names as aligned  # noqa: E402
from bench.profile import profile_summary  # noqa: E402
from poller.timetable import EPOCH, phase_of  # noqa: E402


def test_plan_changes_splits_three_ways_over_disjoint_keys() -> None:
    plan = plan_changes(prefixes=3, keys_per_prefix=500, n=1000, round_no=1)
    assert (len(plan.modified), len(plan.deleted), len(plan.created)) == (333, 333, 334)
    assert not set(plan.modified) & set(plan.deleted)
    expected = plan.expected()
    assert len(expected) == 1000
    assert {p for p, _ in plan.modified} == {0, 1, 2}
    assert plan_changes(3, 500, 1000, 1).expected() == expected  # deterministic
    assert plan_changes(3, 500, 1000, 2).expected() != expected
    with pytest.raises(ValueError, match="do not fit"):
        plan_changes(prefixes=1, keys_per_prefix=10, n=60, round_no=1)


def test_apply_changes_keeps_the_size_and_changes_the_content(tmp_path: Path) -> None:
    create_keys(tmp_path, prefixes=2, keys_per_prefix=20)
    plan = plan_changes(2, 20, 9, round_no=1)
    apply_changes(tmp_path, plan, 1)
    for p, i in plan.modified:
        now = (tmp_path / key_of(p, i)).read_bytes()
        assert now != body_of(p, i, 0) and len(now) == len(body_of(p, i, 0))
    assert not any((tmp_path / key_of(p, i)).exists() for p, i in plan.deleted)
    assert all((tmp_path / key).exists() for key in plan.created)
    assert sum(1 for _ in tmp_path.rglob("*.json")) == 40 - len(plan.deleted) + len(plan.created)


def test_check_history_wants_each_change_exactly_once() -> None:
    expected = {"a": "modified", "b": "deleted", "c": "created"}
    assert check_history(expected, [("a", "modified"), ("b", "deleted"), ("c", "created")])["exact"] == 1
    got = check_history(expected, [("a", "modified"), ("a", "modified"), ("b", "modified"), ("d", "created")])
    assert got == {"expected": 3, "recorded": 4, "missing": 2, "duplicates": 1, "unexpected": 2, "exact": 0}
    assert check_history({}, [])["exact"] == 1
    assert check_history({}, [("x", "first_seen")])["unexpected"] == 1


@pytest.mark.parametrize("interval", [10.0, 60.0, 600.0])
def test_aligned_names_share_one_slot(interval: float) -> None:
    first = datetime(2026, 11, 26, 12, 0, 7, tzinfo=UTC).timestamp()
    names = aligned(5, interval, first)
    assert len(set(names)) == 5
    for name in names:
        offset = (phase_of(name, interval) - (first - EPOCH.timestamp())) % interval
        assert offset < PHASE_WINDOW
        # A pass started 1.5 s after this slot is 1.5 s late against it, whatever k.
        slot = datetime.fromtimestamp(first + offset + 3 * interval, UTC)
        assert slot_before(name, interval, slot + timedelta(seconds=1.5)) == slot


def test_profile_summary_leaves_out_waiting_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mod.py").write_text("item = queue.get()\nwork(item)\nparse(page)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    raw = tmp_path / "raw.txt"
    raw.write_text(
        'process 1:"python -m poller";run (mod.py:2);work (mod.py:3) 6\n'
        'process 1:"python -m poller";run (mod.py:2);parse (other.py:9) 2\n'
        'process 1:"python -m poller";loop (mod.py:1) 12\n'
    )
    got = profile_summary(raw)
    assert (got["samples"], got["busy"]) == (20, 8)
    assert dict(got["self"]) == {"work (mod.py)": 75.0, "parse (other.py)": 25.0}
    assert "run (mod.py)" not in dict(got["inclusive"])  # in every busy sample: says nothing


def test_counting_pipe_counts_requests_on_kept_alive_connections() -> None:
    class Chunked(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b"x" * 70_000, b"y" * 10):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")

        def log_message(self, *args: object) -> None:
            pass

    with serving(Chunked) as port:
        pipe = CountingPipe(port)
        try:
            conn = http.client.HTTPConnection("127.0.0.1", pipe.port, timeout=10)
            for _ in range(5):
                conn.request("GET", "/bench?list-type=2")
                assert len(conn.getresponse().read()) == 70_010
            conn.close()
            assert urllib.request.urlopen(pipe.endpoint + "/x", timeout=10).read()[-1:] == b"y"
            assert pipe.requests == 6
        finally:
            pipe.close()


@pytest.mark.slow
def test_bench_prefix_small_run_records_every_change_exactly_once(tmp_path: Path) -> None:
    """The whole bench at a tiny size: four rounds, each change once, start-up figures, one JSON line."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    argv = [sys.executable, "-m", "bench.prefix", "--prefixes", "2", "--keys-per-prefix", "300"]
    argv += ["--interval", "10", "--changes", "30"]
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])["prefix"]
    rounds = {r["pass"]: r for r in result["rounds"]}
    assert list(rounds) == ["first", "steady, 0 changes", "30 changes", "after restart, 0 changes"]
    assert rounds["first"]["history"]["first_seen"] == 600
    assert all(r["history"]["exact"] == 1 and r["errors"] == 0 for r in rounds.values())
    assert rounds["30 changes"]["history"]["recorded"] == 30
    assert all(r["requests"] >= 2 and r["passes"] >= 2 for r in rounds.values())
    assert result["server"]["wrong_secret_status"] == 403
    assert result["startup_restart_s"] > 0
    assert "every change recorded exactly once" in proc.stdout
