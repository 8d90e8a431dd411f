"""Three daemons on one PostgreSQL database, end to end (issue 11, CI size; `python -m bench.cluster`
runs the full one): keys overwritten, deleted and re-created throughout, one daemon killed with
SIGKILL and restarted. No key polled twice in an interval, every change recorded exactly once,
every event delivered (exactly once in steady state), the dead daemon's watches taken over in time."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import clusterrun
from conftest import wait_for
from pgserver import PgServer
from sqlalchemy import text

from poller.store import Store, open_engine


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


def test_a_paused_daemon_cannot_commit_after_its_lease(
    pg_server: PgServer, s3: Any, s3_endpoint: str, bucket: str, tmp_path: Path
):
    plan = clusterrun.Plan(watches=20, shards=4, lease=2.0, heartbeat=0.5, daemons=2)
    keys = [f"{plan.prefix}k{i:05d}" for i in range(plan.watches)]
    for key in keys:
        s3.put_object(Bucket=bucket, Key=key, Body=b"v1")
    receiver = clusterrun.Receiver()
    config = tmp_path / "c.toml"
    with pg_server.database() as url:
        clusterrun.write_config(config, plan, s3_endpoint, bucket, url, receiver.url)
        store = Store(open_engine(url))
        paused, other = (clusterrun.Daemon(config, tmp_path / f"d{i}.log") for i in range(2))
        try:

            def holders() -> dict[int, int]:
                return {r["pid"]: len(r["shards"]) for r in store.cluster_status() if r["shards"]}

            wait_for(lambda: len(holders()) == 2 and history(store) == plan.watches, 60, what="two daemons polling")
            # Paused between sending a webhook and marking it delivered, a daemon's delivery is sent again
            # by the other once its claim lapses: delivery is at least once (the CloudEvent id tells the
            # receiver). This test is about commits, so the first deliveries are all done before the pause.
            wait_for(lambda: len(receiver.snapshot()) == plan.watches and pending(store) == 0, 30, what="deliveries")
            paused.proc.send_signal(signal.SIGSTOP)
            wait_for(lambda: holders() == {other.proc.pid: plan.shards}, 20, what="the other daemon's takeover")
            etags = [s3.put_object(Bucket=bucket, Key=key, Body=b"v2")["ETag"] for key in keys]
            wait_for(lambda: history(store) == 2 * plan.watches, 20, what="the changes recorded by the other daemon")
            paused.proc.send_signal(signal.SIGCONT)
            # Back, it finds its leases gone: what it had in hand is dropped, and it polls nothing more of
            # those shards (its leases lapsed: no poll starts), until the shards rebalance.
            wait_for(
                lambda: any(s in paused.log_path.read_text() for s in ("poll result dropped: shard", "holds 0 of 4")),
                20,
                what="a dropped result or the lost shards",
            )
            wait_for(lambda: len(holders()) == 2, 20, what="the rebalance")
            wait_for(lambda: len(receiver.snapshot()) == 2 * plan.watches, 20, what="every delivery")
        finally:
            paused.proc.send_signal(signal.SIGCONT)
            paused.stop()
            other.stop()
            receiver.close()
        with store.engine.connect() as conn:
            rows = conn.execute(text("SELECT key, event, etag, seq FROM etag_history ORDER BY key, seq")).all()
        store.close()
    assert len(rows) == 2 * plan.watches  # nothing recorded twice
    assert [(r.event, r.seq) for r in rows] == [("first_seen", 1), ("modified", 2)] * plan.watches
    assert sorted(r.etag for r in rows if r.event == "modified") == sorted(etags)
    assert all(len(times) == 1 for times in receiver.snapshot().values())


def pending(store: Store) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM notifications WHERE status <> 'delivered'")).scalar_one())


def history(store: Store) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM etag_history")).scalar_one())
