"""Three daemons on one PostgreSQL database, end to end (issue 11, CI size; `python -m bench.cluster`
runs the full one): keys overwritten, deleted and re-created throughout, one daemon killed with
SIGKILL and restarted. No key polled twice in an interval, every change recorded exactly once,
every event delivered (exactly once in steady state), the dead daemon's watches taken over in time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import clusterrun
from pgserver import PgServer


def test_three_daemons_share_one_watch_list(
    pg_server: PgServer, s3: Any, s3_endpoint: str, bucket: str, tmp_path: Path
):
    plan = clusterrun.Plan()
    with pg_server.database() as url:
        report = clusterrun.run(plan, s3, s3_endpoint, bucket, url, tmp_path)
    print(report.figures)
    assert report.problems == [], report.figures
    figures = report.figures
    assert figures["duplicate_history_rows"] == 0 and figures["missing_changes"] == 0
    assert figures["keys_polled_twice_in_an_interval"] == 0
    assert figures["undelivered"] == 0 and figures["delivered_twice_in_steady_state"] == 0
    assert figures["killed_daemon_watches"] > 0
    assert figures["takeover_max_s"] <= plan.takeover_bound + 1.0
