"""contrib/ monitoring: the Prometheus rules pass promtool's check and unit tests, the Grafana dashboard is
well-formed, and every metric either one names is one a running daemon exports."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ConfigFile, free_port, wait_for
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "contrib" / "prometheus" / "poller-rules.yml"
RULE_TESTS = ROOT / "contrib" / "prometheus" / "poller-rules.test.yml"
DASHBOARD = ROOT / "contrib" / "grafana" / "poller-dashboard.json"

# Series Prometheus itself writes for every target; the daemon cannot export them.
PROMETHEUS_SERIES = {"up"}
SEVERITIES = {"critical", "warning", "info"}
# PromQL keywords that look like identifiers outside a function call.
PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "atan2"}
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def promtool() -> str:
    """The promtool binary; outside CI its absence skips, in CI it fails (the rules must be checked there)."""
    path = shutil.which("promtool")
    if path is None:
        reason = "promtool is not installed (Debian: apt-get install --no-install-recommends prometheus)"
        if os.environ.get("CI"):
            pytest.fail(f"CI must check the Prometheus rules with promtool: {reason}")
        pytest.skip(reason)
    return path


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=120)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, label names, keywords or Grafana variables)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries, where $__rate_interval lives
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\boffset\s+-?\w+", " ", text)
    text = re.sub(r"\$\{?\w+\}?", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[a-zA-Z_:][a-zA-Z0-9_:]*", text):
        if re.match(r"\s*\(", text[match.end() :]) or match.group() in PROMQL_WORDS:
            continue
        names.add(match.group())
    return names


def load_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [rule for group in doc["groups"] for rule in group["rules"]]


def load_dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text(encoding="utf-8")))


def panel_targets(dashboard: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(panel, target) for panel in dashboard["panels"] for target in panel.get("targets", [])]


def dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and the metric of label_values() variables."""
    queries = [target["expr"] for _, target in panel_targets(dashboard)]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            match = re.fullmatch(r"label_values\((.+),\s*\w+\)", query)
            assert match, f"variable {var['name']}: unexpected query {query!r}"
            queries.append(match.group(1))
    return queries


def exported_series(text: str) -> dict[str, set[str]]:
    """Per metric family of a /metrics text, every series name it can carry (by its type)."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
    }
    exported = {
        family.name: {family.name + suffix for suffix in suffixes.get(family.type, ("",))}
        for family in text_string_to_metric_families(text)
    }
    # prometheus_client writes a counter's or histogram's creation time as a gauge family of its own.
    return {
        name: names
        for name, names in exported.items()
        if not (name.endswith("_created") and name.removesuffix("_created") in exported)
    }


def test_metric_names_from_promql():
    """The extractor the export check relies on finds metric names, and only them."""
    assert metric_names(
        'histogram_quantile(0.99, sum by (job, le) (rate(x_bucket{a="b", c=~"$instance"}[$__rate_interval]))) > 30'
    ) == {"x_bucket"}
    assert metric_names('absent(up{job="poller"})') == {"up"}
    assert metric_names("a / on(instance) group_left(kind) b offset 5m > bool 1e-3") == {"a", "b"}
    assert metric_names("sum without (le) (rate(c_total[5m:1m])) unless d") == {"c_total", "d"}


def test_rules_pass_promtool_check():
    proc = run_promtool("check", "rules", str(RULES))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(load_rules())} rules found" in proc.stdout


def test_rules_unit_tests_pass():
    proc = run_promtool("test", "rules", str(RULE_TESTS))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_every_alert_is_tested_firing_and_silent():
    """Each alert has a promtool case where it fires and one where it must not (healthy or still pending)."""
    alerts = {rule["alert"] for rule in load_rules() if "alert" in rule}
    fires, silent = set(), set()
    for case in yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else silent).add(check["alertname"])
    assert alerts - fires == set(), "alerts never shown firing"
    assert alerts - silent == set(), "alerts never shown silent"
    assert (fires | silent) - alerts == set(), "tests name alerts the rules do not define"


def test_every_alert_tells_the_operator_what_to_do():
    from poller.cli import build_parser

    parser = build_parser()
    alerts = [rule for rule in load_rules() if "alert" in rule]
    assert len(alerts) >= 8
    for rule in alerts:
        name = rule["alert"]
        assert rule.get("labels", {}).get("severity") in SEVERITIES, name
        annotations = rule.get("annotations", {})
        assert annotations.get("summary", "").strip(), f"{name}: no summary"
        assert len(annotations.get("description", "")) > 80, f"{name}: no useful description"
        # Every poller command the description recommends exists with those arguments.
        for command in re.findall(r"`poller ([^`]+)`", annotations["description"]):
            try:
                parser.parse_args(shlex.split(command))
            except SystemExit:
                pytest.fail(f"{name}: the description recommends `poller {command}`, which the CLI rejects")


def test_dashboard_structure():
    dashboard = load_dashboard()
    assert dashboard["schemaVersion"] >= 36 and dashboard["uid"] and dashboard["title"]
    variables = {var["name"]: var for var in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["datasource"] == DATASOURCE and variables["instance"]["multi"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    graphs = [panel for panel in dashboard["panels"] if panel["type"] != "row"]
    assert len(graphs) >= 12
    for panel in graphs:
        title = panel["title"]
        assert panel["datasource"] == DATASOURCE, f"{title}: datasource must be the templated one"
        assert panel["targets"], f"{title}: no query"
        assert {"x", "y", "w", "h"} <= panel["gridPos"].keys(), title
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, title
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), title
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, title
            assert 'instance=~"$instance"' in target["expr"], f"{title}: {target['expr']} ignores the instance variable"


def test_dashboard_queries_parse_as_promql(tmp_path: Path):
    """promtool parses every dashboard query (as recording rules, Grafana's variables filled in)."""
    rules = []
    for i, query in enumerate(dashboard_queries(load_dashboard())):
        expr = re.sub(r"\$\{?\w+\}?", ".*", re.sub(r"\$__\w+", "5m", query))
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}), encoding="utf-8")
    proc = run_promtool("check", "rules", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_rules_and_dashboard_name_only_exported_metrics(config: ConfigFile, s3, bucket, start_daemon):
    """Scrape a real daemon: each metric the rules and the dashboard query exists, and the dashboard shows them all."""
    port = free_port()
    s3.put_object(Bucket=bucket, Key="k", Body=b"v1")
    config.write(
        [{"name": "a", "bucket": bucket, "key": "k"}, {"name": "gone", "bucket": "no-such-bucket-contrib", "key": "k"}],
        metrics={"listen": f"127.0.0.1:{port}"},
    )
    daemon = start_daemon(config)
    daemon.notify.wait("READY=1")

    def scrape() -> str:
        return str(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode())

    text = wait_for(
        lambda: 'poller_polls_total{outcome="error"}' in (t := scrape()) and t, what="a failed poll counted"
    )
    exported = exported_series(text)
    assert daemon.stop() == 0
    series = set().union(*exported.values())

    in_rules = {name for rule in load_rules() for name in metric_names(rule["expr"])}
    dashboard = load_dashboard()
    in_dashboard = {name for query in dashboard_queries(dashboard) for name in metric_names(query)}
    assert in_rules and in_dashboard
    unknown = sorted(in_rules - series - PROMETHEUS_SERIES)
    assert not unknown, f"the rules query metrics the daemon does not export: {unknown}"
    unknown = sorted(in_dashboard - series - PROMETHEUS_SERIES)
    assert not unknown, f"the dashboard queries metrics the daemon does not export: {unknown}"
    # The other way round: a metric the daemon exports and no panel shows is a gap in the dashboard.
    unshown = sorted(family for family, names in exported.items() if not names & in_dashboard)
    assert not unshown, f"metrics the daemon exports and no dashboard panel shows: {unshown}"
