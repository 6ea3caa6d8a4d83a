"""The monitoring pipeline end to end with the real binaries: Prometheus scrapes two real workers (one serving good,
bad and anomalous readings, one whose model is missing) under a job name of its own, every dashboard query and
variable runs against it and returns data, and the shipped rules fire PlcsenseModelNotLoaded through the shipped
Alertmanager routing to a webhook receiver, then PlcsenseWorkerDown when that worker crashes.

For speed the copies of the shipped files differ in timing only: scrape and rule evaluation every second, rules'
`for:` and Alertmanager's group_wait set to 0 (their thresholds and durations are what the promtool unit tests
check), and the e-mail receiver replaced by the test's webhook."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from plcsense.harness import WorkerProcess, free_port, write_worker_config
from tests.conftest import WINDOW, Collector, publish_all
from tests.deploy_tools import DEPLOY, tool

DASHBOARD = DEPLOY / "grafana" / "dashboards" / "plcsense.json"
SITE = "e2e"
# Panels that only show something when that fault happens; the test makes the others happen.
QUIET_PANELS = {
    "Answers dropped/s",
    "MQTT connect failures/s",
    "Ignored messages/s",
    "Canary share by version",  # a route with a candidate: tests/test_lifecycle.py
    "Shadow agreement by version",
}


def _get(url: str, timeout: float = 5) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def _wait(what: str, check, timeout: float = 30, log: Path | None = None):
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError, KeyError):
            last = check()
            if last:
                return last
        time.sleep(0.25)
    raise AssertionError(f"{what} not seen in {timeout:.0f} s (last: {last!r})\n{log.read_text() if log else ''}")


class Webhook:
    """An Alertmanager webhook receiver: keeps every alert it is sent."""

    def __init__(self) -> None:
        self.alerts: list[dict] = []
        received = self.alerts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.extend(json.loads(body)["alerts"])
                self.send_response(200)
                self.end_headers()

            def log_message(self, *_args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"

    def firing(self, name: str) -> list[dict]:
        return [a["labels"] for a in self.alerts if a["labels"]["alertname"] == name and a["status"] == "firing"]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _spawn(cmd: list[str], log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


@contextlib.contextmanager
def alertmanager(tmp: Path, webhook: Webhook) -> Iterator[str]:
    config = yaml.safe_load((DEPLOY / "alertmanager" / "alertmanager.yml").read_text())
    config["global"] = {"resolve_timeout": "5m"}
    config["receivers"] = [{"name": r["name"], "webhook_configs": [{"url": webhook.url}]} for r in config["receivers"]]
    for route in [config["route"], *config["route"].get("routes", [])]:
        route["group_wait"] = "0s"
    (tmp / "alertmanager.yml").write_text(yaml.safe_dump(config))
    port, log = free_port(), tmp / "alertmanager.log"
    proc = _spawn(
        [tool("alertmanager"), f"--config.file={tmp / 'alertmanager.yml'}", f"--storage.path={tmp / 'am-data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
        log,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        _wait("Alertmanager ready", lambda: urllib.request.urlopen(f"{url}/-/ready", timeout=1).status == 200, log=log)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def prometheus(tmp: Path, targets: list[str], alertmanager_url: str) -> Iterator[str]:
    rules = re.sub(r"(?m)^(\s+for:) \S+$", r"\1 0s", (DEPLOY / "prometheus" / "alerts.yml").read_text())
    (tmp / "alerts.yml").write_text(rules)
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["alerts.yml"],
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [alertmanager_url.split("//")[1]]}]}]},
        # A job name no rule knows: the rules must find the workers by their metrics.
        "scrape_configs": [
            {"job_name": "edge-gateways", "static_configs": [{"targets": targets, "labels": {"site": SITE}}]}
        ],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port, log = free_port(), tmp / "prometheus.log"
    proc = _spawn(
        [tool("prometheus"), f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        log,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        _wait("Prometheus ready", lambda: urllib.request.urlopen(f"{url}/-/ready", timeout=1).status == 200, log=log)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def query(url: str, expr: str) -> list[dict]:
    reply = _get(f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    assert reply["status"] == "success", reply
    return reply["data"]["result"]


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every panel target, with Grafana's variables as "All" would set them."""
    board = json.loads(DASHBOARD.read_text())
    found = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", "1m")
            expr = re.sub(r"\$(site|instance|route)\b", ".*", expr)
            found.append((panel["title"], expr))
    return found


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    yield hook
    hook.close()


def _answered_model_unavailable(broker, out: Collector) -> bool:
    publish_all(broker, "plant/c1/camera/weld", [b"not an image"])
    return any(e["error"] == "model_unavailable" for e in out.json("/error"))


def test_dashboard_queries_and_alerts_against_real_prometheus(
    tmp_path, broker, sensor_bundle, run_worker, collectors, webhook
):
    tool("prometheus"), tool("alertmanager")
    pump = {"name": "pump", "topic": "plant/+/pump", "model": str(sensor_bundle), "encoding": "json"}
    good = run_worker(broker, [pump], client_id="good")
    weld = {"name": "weld", "topic": "plant/+/camera/weld", "model": str(tmp_path / "missing"), "encoding": "image"}
    settings = {**broker.mqtt_settings(), "client_id": "faulty"}
    config, port = write_worker_config(tmp_path / "faulty.yaml", settings, [weld])
    faulty = WorkerProcess(config, port, tmp_path / "faulty.log").start(wait=False)
    try:
        out = Collector(broker, "plant/#")
        collectors.append(out)
        _wait("the faulty worker's answer", lambda: _answered_model_unavailable(broker, out), log=faulty.log_path)

        targets = [f"127.0.0.1:{good.metrics_port}", f"127.0.0.1:{faulty.metrics_port}"]
        with alertmanager(tmp_path, webhook) as am_url, prometheus(tmp_path, targets, am_url) as url:
            _wait("both workers scraped", lambda: len(query(url, "plcsense_build_info")) == 2)
            # Good, bad and anomalous readings while Prometheus watches, so that every rate moves.
            # The inference histograms appear with a route's first batch: let Prometheus see them before the rest.
            readings = [json.dumps({"data": [0.1 * i, 1.0, 10.0], "id": f"r{i}"}) for i in range(WINDOW + 10)]
            publish_all(broker, "plant/p1/pump", readings[:WINDOW])
            assert len(out.wait(1, "/result")) == 1
            _wait("the first batch scraped", lambda: query(url, "plcsense_inference_seconds_count"))
            bad = ["{not json", json.dumps({"data": [1, 2], "id": "short"})]
            publish_all(broker, "plant/p1/pump", [*readings[WINDOW:], *bad, json.dumps([0.5, 1.0, 60.0])])
            assert len(out.wait(11 + 1, "/result")) == 12 and len(out.wait(2, "pump/error")) == 2
            _wait("the traffic scraped", lambda: query(url, "sum(plcsense_anomalies_total) > 0"))
            time.sleep(3)  # a few more scrapes

            sites = _get(f"{url}/api/v1/label/site/values?match[]=plcsense_build_info")["data"]
            instances = _get(f"{url}/api/v1/label/instance/values?match[]=plcsense_build_info")["data"]
            assert sites == [SITE] and sorted(instances) == sorted(targets)
            blank = [
                f"{title}: {expr}"
                for title, expr in dashboard_queries()
                if title not in QUIET_PANELS and not any(r["value"][1] != "NaN" for r in query(url, expr))
            ]
            assert not blank, "dashboard queries without a value:\n" + "\n".join(blank)

            fired = _wait("PlcsenseModelNotLoaded at the receiver", lambda: webhook.firing("PlcsenseModelNotLoaded"))
            assert {(a["route"], a["site"], a["severity"]) for a in fired} == {("weld", SITE, "critical")}
            assert all(a["job"] == "edge-gateways" for a in fired)
            assert not webhook.firing("PlcsenseWorkerDown") and not webhook.firing("PlcsenseWorkersAbsent")

            faulty.kill()  # a crash: the target stays, its scrapes fail
            down = _wait("PlcsenseWorkerDown at the receiver", lambda: webhook.firing("PlcsenseWorkerDown"))
            assert [a["instance"] for a in down] == [targets[1]]
    finally:
        faulty.stop()
