"""The latency-bound regime, measuring the client: `python -m bench.latency` (also `python -m bench --latency`).

rclone serves S3 (checking every signature: `--auth-key`) behind a delay proxy written for this
(bench/delayproxy.js, Node's event loop): each request waits the added round trip, then goes
upstream on a kept-alive connection. The tests' asyncio fault proxy would itself be the ceiling at
a few thousand requests/s; this one's ceiling is measured (wrk, 512 connections, through the proxy)
and printed next to the figures. (Network-namespace `tc netem` was the first choice: this
machine's kernel has no netem qdisc.)

For each round trip: the daemon with the default ceiling (threads follow the work) and, for
comparison, with the old fixed `concurrency = 32`: demanded and sustained polls/s, skipped polls,
lateness p50/p99, worker threads, peak RSS; then boto3 thread pools of 1, 4, 8, 32 threads and of
the daemon's in-flight count. A target is met only when the sustained rate equals the demand,
nothing is skipped and p99 lateness is under 2 s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.__main__ import SATURATION_RATE, run_poller, thread_pool
from bench.profile import print_summary
from bench.servers import BUCKET, Server, free_port, start_rclone

AUTH = ("bench", "bench-secret")
PROXY = Path(__file__).with_name("delayproxy.js")


class DelayProxy:
    """bench/delayproxy.js in front of ``upstream`` (host:port), adding ``delay_ms`` per request."""

    def __init__(self, upstream: str, delay_ms: float) -> None:
        node = shutil.which("node")
        if node is None:
            raise RuntimeError("bench.latency needs Node.js (node) for its delay proxy")
        host, _, port = upstream.rpartition(":")
        self.port = free_port()
        self.proc = subprocess.Popen(
            [node, str(PROXY), str(self.port), host, port, str(delay_ms)], stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the delay proxy did not start")
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def path_ceiling(endpoint: str, seconds: float) -> float | None:
    """What the delayed path carries: wrk, 512 connections through the proxy (None: no wrk).

    wrk sends unsigned GETs (its parser waits for a body after a HEAD's Content-Length), which
    rclone refuses with a short 403: the figure is the ceiling of the proxy and rclone together, to
    compare with what the clients sent.
    """
    if shutil.which("wrk") is None:
        return None
    out = subprocess.run(
        ["wrk", "-t2", "-c512", f"-d{max(int(seconds), 1)}s", f"{endpoint}/{BUCKET}/x"],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    ).stdout
    for line in out.splitlines():
        if line.startswith("Requests/sec:"):
            return float(line.split()[1])
    return None


def verdict(run: dict[str, Any]) -> str:
    demanded, made = run["demanded_polls_per_s"], run["polls_per_s"]
    p99 = run["lateness_p99_s"]
    if made >= 0.99 * demanded and not run["skipped"] and p99 is not None and p99 < 2:
        return "met"
    return "missed"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__)
    parser.add_argument("--rtt-ms", type=float, nargs="+", default=[20.0, 50.0, 80.0])
    parser.add_argument("--watches", type=int, default=100_000)
    parser.add_argument("--interval", type=float, default=60.0, help="seconds between polls of a watch")
    parser.add_argument("--seconds", type=float, default=60.0, help="the measured window of each run")
    parser.add_argument("--peer-seconds", type=float, default=10.0)
    parser.add_argument("--no-fixed", action="store_true", help="skip the run with the old fixed concurrency = 32")
    parser.add_argument(
        "--profile", metavar="DIR", help="after each daemon's measured window, record it with py-spy --gil into DIR"
    )
    args = parser.parse_args()
    if args.profile:
        args.profile = Path(args.profile).resolve()
        args.profile.mkdir(parents=True, exist_ok=True)
    os.environ.update(AWS_ACCESS_KEY_ID=AUTH[0], AWS_SECRET_ACCESS_KEY=AUTH[1], AWS_DEFAULT_REGION="us-east-1")
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        os.environ.pop(var, None)
    rate = args.watches / args.interval
    results: dict[str, Any] = {"watches": args.watches, "interval_s": args.interval, "rtts": []}
    with tempfile.TemporaryDirectory(prefix="poller-bench-latency-") as tmp:
        workdir = Path(tmp)
        t0 = time.monotonic()
        upstream = start_rclone(workdir, args.watches, auth=AUTH)
        results["setup_s"] = round(time.monotonic() - t0, 1)
        try:
            for rtt in args.rtt_ms:
                figures = measure_rtt(upstream, rtt, args, rate, workdir / f"rtt{rtt:g}")
                results["rtts"].append(figures)
                print_rtt(figures)
        finally:
            upstream.close()
    print(json.dumps({"latency": results}, separators=(",", ":")))


def measure_rtt(upstream: Server, rtt: float, args: argparse.Namespace, rate: float, rundir: Path) -> dict[str, Any]:
    """The daemon at the demanded rate (default ceiling, then fixed 32), at saturation, and the boto3 pools."""
    rundir.mkdir()
    proxy = DelayProxy(upstream.endpoint.removeprefix("http://"), rtt)
    try:
        server = Server(
            "rclone serve s3 --auth-key behind bench/delayproxy.js", proxy.endpoint, upstream.keys, upstream.etags
        )
        figures: dict[str, Any] = {"rtt_ms": rtt, "path_ceiling_per_s": path_ceiling(proxy.endpoint, 5)}
        cpu0 = proxy.cpu_seconds()
        spy = args.profile / f"rtt{rtt:g}" if args.profile else None
        if spy is not None:
            spy.mkdir()
        runs = [run_poller(server, args.watches, args.seconds, rundir, rate, concurrency=None, profile=spy)]
        if not args.no_fixed:
            runs.append(run_poller(server, args.watches, args.seconds, rundir, rate))
        # Saturation: more demanded than the client can do, so its sustained rate is its ceiling here.
        n = min(args.watches, 10_000)
        saturated = run_poller(server, n, args.seconds / 2, rundir, SATURATION_RATE, concurrency=None, profile=spy)
        runs.append(saturated)
        figures["proxy_cpu_s"] = round(proxy.cpu_seconds() - cpu0, 1)
        in_flight = max(1, saturated["workers"])  # the worker threads the daemon started at saturation
        pools = {threads: round(thread_pool(server, args.peer_seconds, threads), 1) for threads in
                 sorted({1, 4, 8, 32, in_flight})}  # fmt: skip
    finally:
        proxy.close()
    for run in runs:
        run.pop("db", None)
        run["verdict"] = verdict(run)
    figures.update(
        poller=runs,
        boto3_pools_per_s=pools,
        boto3_best=max(pools.values()),
        boto3_equal_in_flight=pools[in_flight],
        saturated_vs_best_boto3=round(saturated["polls_per_s"] / max(pools.values()), 2),
        saturated_vs_equal_boto3=round(saturated["polls_per_s"] / pools[in_flight], 2),
    )
    return figures


def print_rtt(f: dict[str, Any]) -> None:
    ceiling = f"{f['path_ceiling_per_s']:.0f}/s" if f["path_ceiling_per_s"] else "not measured (needs wrk)"
    print(
        f"\n[+{f['rtt_ms']:g} ms round trip] path ceiling (wrk, 512 connections, through the proxy): {ceiling}; "
        f"proxy CPU during the daemon runs: {f['proxy_cpu_s']} s"
    )
    print(
        f"  {'poller':<30} {'demanded':>9} {'sustained':>9} {'skipped':>8} {'p50 late':>9} {'p99 late':>9} "
        f"{'workers':>7} {'RSS MB':>7} {'verdict':>7}"
    )
    for r in f["poller"]:
        label = f"{r['watches']:,} watches, " + ("ceiling 256" if r["concurrency"] == "default" else "fixed 32")
        p50 = "-" if r["lateness_p50_s"] is None else f"{r['lateness_p50_s']:.3f}s"
        p99 = "-" if r["lateness_p99_s"] is None else f"{r['lateness_p99_s']:.3f}s"
        verdict_ = "(max)" if r["saturation"] else r["verdict"]
        print(
            f"  {label:<30} {r['demanded_polls_per_s']:>9.0f} {r['polls_per_s']:>9.0f} {r['skipped']:>8} "
            f"{p50:>9} {p99:>9} {r['workers']:>7} {r['peak_rss_mb']:>7.0f} {verdict_:>7}"
        )
    for r in f["poller"]:
        if "profile" in r:
            print_summary(f"{r['watches']:,} watches at {r['demanded_polls_per_s']:.0f}/s (--gil)", r["profile"])
    pools = ", ".join(f"{t} threads {v:.0f}/s" for t, v in f["boto3_pools_per_s"].items())
    print(f"  boto3 thread pools: {pools}; best {f['boto3_best']:.0f}/s")
    print(
        f"  poller at saturation / best boto3 pool: {f['saturated_vs_best_boto3']:.2f}x; "
        f"/ boto3 pool of the same in-flight count: {f['saturated_vs_equal_boto3']:.2f}x"
    )


if __name__ == "__main__":
    main()
