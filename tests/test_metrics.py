"""Prometheus metrics over HTTP from the running daemon: values move as polls happen."""

from __future__ import annotations

import re
import signal
import urllib.request
from pathlib import Path

from conftest import ConfigFile, free_port, wait_for


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values = {}
    for line in text.splitlines():
        match = re.match(r"^(poller_[^ ]+) ([0-9.e+-]+)$", line)
        if match:
            values[match.group(1)] = float(match.group(2))
    return values


def test_metrics_endpoint_moves(config: ConfigFile, s3, bucket, start_daemon):
    port = free_port()
    s3.put_object(Bucket=bucket, Key="k", Body=b"v1")
    config.write(
        [{"name": "a", "bucket": bucket, "key": "k"}, {"name": "gone", "bucket": "no-such-bucket-metrics", "key": "k"}],
        metrics={"listen": f":{port}"},
    )  # no host: 127.0.0.1
    daemon = start_daemon(config)
    daemon.notify.wait("READY=1")
    first = wait_for(
        lambda: (m := scrape(port)).get('poller_polls_total{outcome="unchanged"}', 0) >= 1 and m,
        what="an unchanged poll counted",
    )
    assert first['poller_changes_total{event="first_seen"}'] == 1
    assert first['poller_errors_total{kind="bucket_missing"}'] >= 1
    assert first['poller_watches{state="unchanged"}'] == 1 and first['poller_watches{state="error"}'] == 1
    assert first["poller_poll_duration_seconds_count"] >= 2
    assert first["poller_schedule_lateness_seconds_count"] >= 2
    s3.put_object(Bucket=bucket, Key="k", Body=b"v2")
    wait_for(lambda: scrape(port).get('poller_changes_total{event="modified"}') == 1, what="modified counted")
    later = scrape(port)
    assert later['poller_polls_total{outcome="unchanged"}'] >= first['poller_polls_total{outcome="unchanged"}']
    # A watch removed by a reload leaves the gauge; one added shows as unpolled until its first poll.
    config.write(
        [{"name": "a", "bucket": bucket, "key": "k"}, {"name": "new", "bucket": bucket, "key": "k"}],
        metrics={"listen": f":{port}"},
    )
    daemon.signal(signal.SIGHUP)
    gauges = wait_for(
        lambda: (
            (m := scrape(port)).get('poller_watches{state="error"}', 0) == 0
            and m.get('poller_watches{state="unchanged"}') == 2
            and m
        ),
        what="the removed watch gone from the gauge, the added one polled",
    )
    assert 'poller_watches{state="unpolled"}' not in gauges
    # Bound to loopback only.
    listening = [
        line.split()[1]
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
        if line.split()[3] == "0A" and line.split()[1].endswith(f":{port:04X}")
    ]
    assert listening == [f"0100007F:{port:04X}"]
    assert daemon.stop() == 0
    assert f"metrics on http://127.0.0.1:{port}/metrics" in daemon.log


def test_metrics_listen_must_be_host_port(tmp_path):
    from conftest import run_cli

    path = tmp_path / "c.toml"
    path.write_text('[metrics]\nlisten = "9464"\n')
    proc = run_cli("check", "--config", str(path))
    assert proc.returncode == 2 and "[metrics]" in proc.stderr and "HOST:PORT" in proc.stderr


def test_a_prefix_watchs_key_changes_are_counted(config: ConfigFile, s3, bucket, start_daemon):
    port = free_port()
    for key in ("logs/a", "logs/b"):
        s3.put_object(Bucket=bucket, Key=key, Body=b"v1")
    config.write([{"name": "logs", "bucket": bucket, "prefix": "logs/"}], metrics={"listen": f":{port}"})
    daemon = start_daemon(config)
    daemon.notify.wait("READY=1")
    wait_for(lambda: scrape(port).get('poller_changes_total{event="first_seen"}') == 2, what="both keys counted")
    s3.put_object(Bucket=bucket, Key="logs/a", Body=b"v2")
    s3.delete_object(Bucket=bucket, Key="logs/b")
    counted = wait_for(
        lambda: (m := scrape(port)).get('poller_changes_total{event="deleted"}') == 1 and m, what="the deletion counted"
    )
    assert counted['poller_changes_total{event="modified"}'] == 1
    assert daemon.stop() == 0
