"""Several daemons on one PostgreSQL database, full size: `python -m bench.cluster`.

Three daemons share 3,000 watches at a 1 s interval against rclone serve s3, on a throwaway
PostgreSQL server (tests/pgserver.py); keys are overwritten, deleted and re-created throughout,
one daemon is killed with SIGKILL and started again (the scenario of tests/clusterrun.py, which
CI runs at a smaller size). Prints a table and one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from bench.servers import BUCKET, client, start_rclone

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import clusterrun
from pgserver import PgServer, find_bindir


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__.splitlines()[0])
    parser.add_argument("--watches", type=int, default=3000, help="watches shared by the daemons (default 3000)")
    parser.add_argument("--daemons", type=int, default=3)
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between two polls of a watch (default 1)")
    parser.add_argument("--shards", type=int, default=64)
    parser.add_argument("--lease", type=float, default=6.0, help="seconds (the daemon's default is 15)")
    parser.add_argument("--heartbeat", type=float, default=2.0, help="seconds (the daemon's default is 3)")
    parser.add_argument("--seconds", type=float, default=90.0, help="length of the change phase")
    parser.add_argument("--rate", type=float, default=20.0, help="changes per second over all keys")
    parser.add_argument("--concurrency", type=int, default=32, help="[schedule] concurrency of each daemon")
    args = parser.parse_args()
    bindir = find_bindir()
    if bindir is None:
        parser.error("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): apt-get install postgresql")
    plan = clusterrun.Plan(
        watches=args.watches,
        interval=args.interval,
        daemons=args.daemons,
        shards=args.shards,
        lease=args.lease,
        heartbeat=args.heartbeat,
        concurrency=args.concurrency,
        mutate_seconds=args.seconds,
        mutation_rate=args.rate,
        kill_at=args.seconds / 3,
        restart_at=args.seconds * 2 / 3,
        settle=60.0,
    )
    # rclone without --auth-key takes any signature; the daemons still sign with these.
    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(env)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="poller-bench-cluster-") as tmp:
        workdir = Path(tmp)
        server = start_rclone(workdir, 1)  # one file, so the bucket's directory exists
        pg = PgServer(bindir, durable=True).start()
        try:
            url = pg.url(pg.create_database())
            report = clusterrun.run(plan, client(server.endpoint), server.endpoint, BUCKET, url, workdir, env)
        finally:
            pg.stop()
            server.close()
    figures = report.figures
    print(
        f"{plan.daemons} daemons, {plan.watches} watches every {plan.interval:g}s, {plan.shards} shards, "
        f"lease {plan.lease:g}s, heartbeat {plan.heartbeat:g}s; rclone serve s3, durable PostgreSQL"
    )
    for key, value in figures.items():
        print(f"  {key:<40}{value}")
    print("  problems: " + ("; ".join(report.problems) if report.problems else "none"))
    print(f"  wall time: {time.monotonic() - started:.0f}s")
    print(json.dumps({"cluster": figures, "problems": report.problems}))
    return 1 if report.problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
