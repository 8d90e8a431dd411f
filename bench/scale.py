"""Key watches at scale: `python -m bench.scale` (also `python -m bench --scale`).

One daemon per size (100,000, 300,000 and 1,000,000 key watches by default; `--sizes` to change),
each watch on its own key of rclone checking every signature, each size at a demanded rate this
machine can sustain (1,000 polls/s: the interval is watches / 1,000 s). Per size: start-up on a
fresh database (READY=1 and the first committed poll), the first pass complete (every watch's first
sighting committed), peak RSS, sustained polls/s against the demand with the skipped slots and p99
lateness over a steady window, then the daemon started again on the database it left (READY=1,
first poll): the scaling curve a user sizes a machine with.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.__main__ import LEGEND, demand_text, run_poller, seconds_text
from bench.servers import AUTH, start_rclone, use_bench_credentials

SIZES = (100_000, 300_000, 1_000_000)


def sizes_arg(text: str) -> list[int]:
    """`--sizes 10000,30000`: watch counts, comma-separated (underscores allowed: 1_000_000)."""
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sizes {text!r}: give watch counts separated by commas") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"--sizes {text!r}: give at least one watch count, each above 0")
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__)
    parser.add_argument("--sizes", type=sizes_arg, default=list(SIZES), help="watch counts, comma-separated")
    parser.add_argument("--rate", type=float, default=1000.0, help="polls/s demanded at every size")
    parser.add_argument("--seconds", type=float, default=60.0, help="the steady window measured at each size")
    parser.add_argument(
        "--ready-timeout", type=float, default=900.0, help="seconds allowed for READY=1 and for the first poll"
    )
    args = parser.parse_args()
    use_bench_credentials()

    results: dict[str, Any] = {"rate": args.rate, "seconds": args.seconds, "runs": []}
    with tempfile.TemporaryDirectory(prefix="poller-bench-scale-") as tmp:
        workdir = Path(tmp)
        t0 = time.monotonic()
        server = start_rclone(workdir, max(args.sizes), auth=AUTH)
        results["server"] = server.name
        results["setup_s"] = round(time.monotonic() - t0, 1)
        try:
            for n in args.sizes:
                run = run_poller(
                    server,
                    n,
                    args.seconds,
                    workdir,
                    args.rate,
                    concurrency=None,
                    restart=True,
                    ready_timeout=args.ready_timeout,
                )
                run.pop("db")
                results["runs"].append(run)
                print_row(run, header=len(results["runs"]) == 1)
        finally:
            server.close()
    print(LEGEND)
    print("  1st pass: seconds after READY=1 until every watch's first sighting is committed; RSS: peak (VmHWM).")
    print(json.dumps({"scale": results}, separators=(",", ":")))


def print_row(r: dict[str, Any], header: bool) -> None:
    if header:
        print(
            f"{'watches':>9} {'ready s':>8} {'1st poll':>8} {'1st pass':>8} {'RSS MB':>7} {'demand/s':>8} "
            f"{'polls/s':>8} {'met':>4} {'skipped':>8} {'p99 late':>9} {'re-ready':>8} {'re-1st':>8} "
            f"{'re-RSS':>7} {'errors':>6}"
        )
    print(
        f"{r['watches']:>9,} {r['startup_s']:>8.1f} {r['first_poll_s']:>8.1f} "
        f"{seconds_text(r['first_pass_s'], digits=1):>8} "
        f"{r['peak_rss_mb']:>7.0f} {r['demanded_polls_per_s']:>8.0f} {r['polls_per_s']:>8.0f} "
        f"{demand_text(r):>4} {r['skipped']:>8} {seconds_text(r['lateness_p99_s'], r['lateness_p99_lower_bound']):>9} "
        f"{r['restart_startup_s']:>8.1f} {r['restart_first_poll_s']:>8.1f} {r['restart_peak_rss_mb']:>7.0f} "
        f"{r['errors']:>6}",
        flush=True,
    )


if __name__ == "__main__":
    main()
