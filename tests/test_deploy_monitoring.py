"""Alerting as shipped: Prometheus config and rules check, every alert has unit tests that show it firing and
silent (`promtool test rules`), Alertmanager's config checks and routes every alert to a receiver."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.deploy_tools import DEPLOY, run, tool

PROMETHEUS = DEPLOY / "prometheus"
RULES = PROMETHEUS / "alerts.yml"
RULE_TESTS = PROMETHEUS / "tests" / "alerts_test.yml"
ALERTMANAGER = DEPLOY / "alertmanager" / "alertmanager.yml"


def alerts() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"] if "alert" in rule]


def test_prometheus_config_and_rules_check():
    run([tool("promtool"), "check", "config", str(PROMETHEUS / "prometheus.yml")])
    run([tool("promtool"), "check", "rules", str(RULES)])


def test_prometheus_sends_alerts_to_alertmanager():
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    targets = [t for am in config["alerting"]["alertmanagers"] for sc in am["static_configs"] for t in sc["targets"]]
    assert targets == ["alertmanager:9093"]
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert "alertmanager" in compose["services"]


def test_alert_rule_unit_tests_pass():
    run([tool("promtool"), "test", "rules", str(RULE_TESTS)])


def test_every_alert_is_tested_firing_and_silent():
    fired: set[str] = set()
    silent: set[str] = set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (fired if check["exp_alerts"] else silent).add(check["alertname"])
    names = {rule["alert"] for rule in alerts()}
    assert names - fired == set(), "alerts never shown firing"
    assert names - silent == set(), "alerts never shown silent"


@pytest.mark.parametrize("rule", alerts(), ids=lambda r: r["alert"])
def test_alert_has_severity_and_text(rule):
    assert rule["labels"]["severity"] in ("critical", "warning")
    assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    assert "job=~" not in rule["expr"] and 'job="' not in rule["expr"], "rules must not depend on the job name"


def test_alertmanager_config_checks():
    run([tool("amtool"), "check-config", str(ALERTMANAGER)])


def test_every_alert_reaches_a_receiver():
    amtool = tool("amtool")
    config = yaml.safe_load(ALERTMANAGER.read_text())
    receivers = {r["name"]: r for r in config["receivers"]}
    for rule in alerts():
        labels = [f"alertname={rule['alert']}", f"severity={rule['labels']['severity']}", "site=line3", "route=pump"]
        out = run([amtool, "config", "routes", "test", f"--config.file={ALERTMANAGER}", *labels]).split()
        assert out, rule["alert"]
        for name in out:
            integrations = {k for k, v in receivers[name].items() if k.endswith("_configs") and v}
            assert integrations, f"{rule['alert']} goes to {name}, which sends nothing"


def test_alertmanager_smtp_password_comes_from_a_file():
    config = yaml.safe_load(ALERTMANAGER.read_text())
    assert "smtp_auth_password" not in config["global"]
    secret = Path(config["global"]["smtp_auth_password_file"])
    assert secret.parent == Path("/run/secrets"), "compose mounts secrets in /run/secrets"
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert secret.name in compose["services"]["alertmanager"]["secrets"]
    assert compose["secrets"][secret.name]["file"] == f"./secrets/{secret.name}"


def test_dashboard_filters_every_query_by_site_and_worker():
    board = json.loads((DEPLOY / "grafana" / "dashboards" / "plcsense.json").read_text())
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert {"datasource", "site", "instance", "route"} <= variables.keys()
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    titles = set()
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            assert 'site=~"$site"' in target["expr"] and 'instance=~"$instance"' in target["expr"], panel["title"]
            if "plcsense_inference_seconds" in target["expr"]:
                assert "route, model, version" in target["expr"], "inference joins plcsense_model_info on all three"
        titles.add(panel["title"])
    assert {"Workers up", "Answer latency p50 / p95 / p99", "Routes without a model"} <= titles


def test_every_dashboard_query_parses(tmp_path):
    """promtool parses each panel query (as a recording rule), the ones the end-to-end test leaves quiet too."""
    from tests.test_deploy_prometheus import dashboard_queries

    rules = [{"record": f"dashboard_query_{i}", "expr": expr} for i, (_, expr) in enumerate(dashboard_queries())]
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run([tool("promtool"), "check", "rules", str(path)])
