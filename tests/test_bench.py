"""The benchmark's own arithmetic and peers (bench/__main__.py, bench/scale.py): lateness that counts
skipped slots, the demand verdict, and each peer's signed requests accepted by rclone checking SigV4."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.__main__ import (
    botocore_urllib3,
    lateness_quantile,
    lean_loop,
    meets_demand,
    run_poller,
    seconds_text,
    thread_pool,
)
from bench.scale import sizes_arg
from bench.servers import AUTH, Server, start_rclone

LATE = "poller_schedule_lateness_seconds_bucket"


def histogram(counts: dict[str, float]) -> dict[str, float]:
    """A scraped lateness histogram from cumulative counts per upper edge."""
    return {f'{LATE}{{le="{le}"}}': n for le, n in counts.items()}


@pytest.mark.parametrize("module", ["cluster", "latency", "prefix", "scale", "storage", "store_write"])
def test_every_bench_mode_imports(module: str) -> None:
    # `python -m bench --cluster` failed at import for a session after a helper renamed what it imported.
    importlib.import_module(f"bench.{module}")


def test_cluster_lateness_counts_skipped_slots() -> None:
    from bench.cluster import _lateness

    after = {
        'poller_schedule_lateness_seconds_bucket{le="0.01"}': 100.0,
        'poller_schedule_lateness_seconds_bucket{le="+Inf"}': 100.0,
    }
    assert _lateness({}, after, 0.5) == 0.005
    # 100 polls under 10 ms and 100 skipped slots of a 60 s interval: the p99 is among the skipped.
    assert _lateness({}, after, 0.99, skipped=100, interval=60.0) == ">60.000"


def test_cluster_verdict_fails_below_the_demand_not_above_it() -> None:
    """A daemon short of its demand fails the verdict; one a percent above it (a 30 s window's edge,
    or a backlog being worked off) does not: keys polled twice in an interval are counted apart."""
    from clusterrun import Plan, Sample

    from bench.cluster import rate_figures

    plan = Plan(watches=600, interval=60.0, shards=1)

    def scraped(polls: float) -> dict[str, float]:
        return {**histogram({"0.01": polls, "+Inf": polls}), "poller_schedule_lateness_seconds_count": polls}

    def verdict(polls: float) -> dict[str, Any]:
        window = (Sample(0.0, {1: scraped(0)}, {1: [0]}), Sample(100.0, {1: scraped(polls)}, {1: [0]}))
        return rate_figures(plan, [window])

    assert verdict(1000)["target_met"]  # 10.0 polls/s for 10 demanded
    assert verdict(1013)["target_met"]  # 10.13
    short = verdict(985)  # 9.85
    assert not short["target_met"] and "9.8 polls/s sustained of 10.0 demanded" in short["not_met_because"][0]


def test_cluster_demand_is_each_daemons_slots_in_the_window() -> None:
    """A daemon's demand in a window is the slots of its own watches that fall in it: over a whole
    interval that is each watch once, while half an interval's share differs between shard sets."""
    from clusterrun import Plan, Sample

    from bench.cluster import Slots, rate_figures
    from poller.cluster import shard_of

    plan = Plan(watches=9000, interval=60.0, shards=64)
    slots = Slots(plan)
    mine = list(range(22))
    held = sum(shard_of(f"w{i:05d}", 64) in mine for i in range(plan.watches))
    start = 1_800_000_007.25
    assert slots.due(mine, start, start + 60.0) == held
    halves = [slots.due(mine, start, start + 30.0), slots.due(mine, start + 30.0, start + 60.0)]
    assert sum(halves) == held
    assert slots.due(list(range(64)), start, start + 600.0) == 10 * plan.watches

    def scraped(polls: float) -> dict[str, float]:
        return {**histogram({"0.01": polls, "+Inf": polls}), "poller_schedule_lateness_seconds_count": polls}

    due = slots.due(mine, start, start + 30.0)

    def verdict(polls: int) -> dict[str, Any]:
        a = Sample(0.0, {1: scraped(0)}, {1: mine}, wall=start)
        b = Sample(30.0, {1: scraped(polls)}, {1: mine}, wall=start + 30.0)
        return rate_figures(plan, [(a, b)])

    met = verdict(due)
    assert met["rows"][0]["demanded_polls_per_s"] == round(due / 30.0, 1)
    assert met["rows"][0]["slots_due"] == due
    assert not any("pid 1" in reason for reason in met["not_met_because"])
    short = verdict(int(due * 0.98))
    assert any("pid 1:" in reason and "sustained" in reason for reason in short["not_met_because"])


def test_lateness_quantile_interpolates_within_a_bucket() -> None:
    after = histogram({"0.01": 50, "0.05": 100, "300.0": 100, "+Inf": 100})
    assert lateness_quantile({}, after, 0.5) == (0.01, False)
    p99, over = lateness_quantile({}, after, 0.99)
    assert p99 == pytest.approx(0.01 + 0.04 * 49 / 50) and not over


def test_lateness_quantile_uses_the_window_delta() -> None:
    before = histogram({"0.01": 1000, "0.05": 1000, "+Inf": 1000})
    after = histogram({"0.01": 1000, "0.05": 1100, "+Inf": 1100})
    assert lateness_quantile(before, after, 0.5) == (pytest.approx(0.03), False)


def test_skipped_slots_count_as_at_least_one_interval_late() -> None:
    after = histogram({"0.01": 90, "300.0": 90, "+Inf": 90})
    assert lateness_quantile({}, after, 0.5, skipped=10, interval=60.0) == (0.01 * 50 / 90, False)
    # 10 skipped of 100: the p99 is one of them, known only to be at least the interval.
    assert lateness_quantile({}, after, 0.99, skipped=10, interval=60.0) == (60.0, True)
    assert lateness_quantile({}, histogram({"0.01": 0, "+Inf": 0}), 0.5, skipped=5, interval=2.0) == (2.0, True)


def test_polls_over_the_top_edge_give_a_lower_bound() -> None:
    after = histogram({"0.01": 10, "300.0": 10, "+Inf": 100})
    assert lateness_quantile({}, after, 0.5) == (300.0, True)
    # Over the top edge and skipped together: the smaller bound holds for both.
    assert lateness_quantile({}, after, 0.99, skipped=100, interval=1000.0) == (300.0, True)
    assert lateness_quantile({}, {}, 0.99) == (None, False)
    assert seconds_text(60.0, True) == ">60.000" and seconds_text(None) == "-"


def test_meets_demand_needs_the_rate_and_nothing_skipped() -> None:
    assert meets_demand({"polls_per_s": 990.0, "demanded_polls_per_s": 1000.0, "skipped": 0})
    assert not meets_demand({"polls_per_s": 989.0, "demanded_polls_per_s": 1000.0, "skipped": 0})
    assert not meets_demand({"polls_per_s": 1000.0, "demanded_polls_per_s": 1000.0, "skipped": 1})


def test_sizes_arg() -> None:
    assert sizes_arg("10000,30_000") == [10_000, 30_000]
    for bad in ("", "ten", "0,5"):
        with pytest.raises(argparse.ArgumentTypeError, match="--sizes"):
            sizes_arg(bad)


@pytest.fixture
def signed_rclone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", AUTH[0])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AUTH[1])
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    server = start_rclone(tmp_path, 20, auth=AUTH)
    yield server
    server.close()


def test_peers_send_heads_rclone_accepts(signed_rclone: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each peer raises on any answer but 200/304, so a rate above 0 means rclone accepted its signatures."""
    assert thread_pool(signed_rclone, 0.3, 2) > 0
    assert botocore_urllib3(signed_rclone, 0.3, 2) > 0
    assert lean_loop(signed_rclone, 0.3, 2) > 0
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(RuntimeError, match="answered 403"):
        botocore_urllib3(signed_rclone, 0.3, 1)


def test_run_poller_measures_a_restart_on_the_populated_database(signed_rclone: Server, tmp_path: Path) -> None:
    run = run_poller(signed_rclone, 20, 1.0, tmp_path, rate=20, concurrency=None, restart=True, ready_timeout=60)
    assert run["errors"] == 0 and run["first_pass_s"] is not None
    assert 0 < run["startup_s"] <= run["first_poll_s"]
    assert 0 < run["restart_startup_s"] <= run["restart_first_poll_s"]
    assert run["meets_demand"] == (run["skipped"] == 0 and run["polls_per_s"] >= 0.99 * 20)


def test_the_storage_bench_runs_end_to_end(tmp_path: Path) -> None:
    """`python -m bench.storage`, tiny: every figure it prints is computed (a figure's code that
    stopped the run went unnoticed until a full 15-minute run)."""
    import json
    import subprocess
    import sys

    tiny = ["--watches", "200", "--history-watches", "20", "--days", "2", "--skip-writer", "--cli-repeat", "1"]
    proc = subprocess.run(
        [sys.executable, "-m", "bench.storage", *tiny, "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = json.loads(proc.stdout.strip().splitlines()[-1])["backends"]["SQLite"]
    assert set(run["cli_s"]) >= {"status", "history --since 1h", "--version (start-up alone)"}
    assert run["prune"]["runs_removed"] > 0
