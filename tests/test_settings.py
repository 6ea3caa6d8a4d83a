"""Settings from YAML and environment, and clear refusals of bad settings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from plcsense.worker.settings import load_settings

MINIMAL = """\
mqtt:
  url: mqtt://127.0.0.1:1883      # mqtts:// for TLS
  client_id: line3-worker
metrics:
  port: 9108
routes:
  - name: pump
    topic: plant/+/pump          # an MQTT topic filter
    model: bundles/pump          # a bundle directory
    encoding: json               # json | npy | image
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_minimal_file_with_defaults(tmp_path):
    s = load_settings(write(tmp_path, MINIMAL))
    assert s.mqtt.host == "127.0.0.1" and s.mqtt.port == 1883 and not s.mqtt.tls
    assert s.mqtt.protocol == "5" and s.mqtt.status_topic == "plcsense/line3-worker/status"
    route = s.routes[0]
    assert route.topic == "plant/+/pump" and route.encoding == "json" and route.qos == 1
    assert route.result_topic.format(topic="plant/a/pump", route="pump") == "plant/a/pump/result"


def test_environment_overrides_nested_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("PLCSENSE_MQTT__URL", "mqtts://broker.plant:8883")
    monkeypatch.setenv("PLCSENSE_MQTT__PROTOCOL", "3.1.1")
    monkeypatch.setenv("PLCSENSE_METRICS__PORT", "9200")
    s = load_settings(write(tmp_path, MINIMAL))
    assert s.mqtt.tls and s.mqtt.port == 8883 and s.mqtt.protocol == "3.1.1" and s.metrics.port == 9200
    assert s.mqtt.client_id == "line3-worker"


def test_model_path_relative_to_config_file(tmp_path, monkeypatch):
    (tmp_path / "bundles" / "pump").mkdir(parents=True)
    monkeypatch.chdir("/")
    s = load_settings(write(tmp_path, MINIMAL))
    assert s.routes[0].model == tmp_path / "bundles" / "pump"


@pytest.mark.parametrize(
    ("change", "where"),
    [
        (("url: mqtt://127.0.0.1:1883", "url: http://x"), "mqtt.url"),
        (("topic: plant/+/pump", "topic: plant/#/pump"), "routes.0.topic"),
        (("encoding: json", "encoding: xml"), "routes.0.encoding"),
        (("port: 9108", "port: 99999"), "metrics.port"),
        (("client_id: line3-worker", "client_id: line3-worker\n  shared_group: g\n  protocol: '3.1.1'"), "mqtt"),
        (("  - name: pump", "  - name: pump\n    colour: red"), "routes.0.colour"),
        (("encoding: json", "encoding: json\n    qos: 2"), "routes.0.qos"),
        (("client_id: line3-worker", "client_id: line3-worker\n  tls_insecure: true"), "mqtt"),
        (("url: mqtt://127.0.0.1:1883", "url: mqtt://plc:secret@127.0.0.1:1883"), "mqtt"),
        # values paho would accept and then fail on (a dead network thread, a reconnect loop without delay)
        (("client_id: line3-worker", "client_id: line3-worker\n  keepalive_s: 70000"), "mqtt.keepalive_s"),
        (("client_id: line3-worker", "client_id: line3-worker\n  session_expiry_s: 8589934592"), "mqtt.session"),
        (("client_id: line3-worker", "client_id: line3-worker\n  reconnect_max_s: 0.4"), "mqtt.reconnect_max_s"),
        (("client_id: line3-worker", "client_id: line3-worker\n  reconnect_min_s: 60"), "mqtt"),
        # answers that could never be published, or would come back as inputs; a shared group in the filter
        (("encoding: json", "encoding: json\n    result_topic: '{topic}/+'"), "routes.0.result_topic"),
        (("encoding: json", "encoding: json\n    error_topic: '{topic}'"), "routes.0.error_topic"),
        (("topic: plant/+/pump", "topic: $share/g/plant/+/pump"), "routes.0.topic"),
    ],
)
def test_invalid_settings_rejected(tmp_path, change, where):
    with pytest.raises(ValidationError) as exc:
        load_settings(write(tmp_path, MINIMAL.replace(*change)))
    assert any(".".join(map(str, e["loc"])).startswith(where) for e in exc.value.errors())


def test_serve_with_invalid_settings_exits_2_with_a_clear_message(tmp_path):
    config = write(tmp_path, MINIMAL.replace("encoding: json", "encoding: xml"))
    proc = subprocess.run(
        [sys.executable, "-m", "plcsense", "serve", "--config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert "routes.0.encoding" in proc.stderr and "PLCSENSE_" in proc.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "plcsense", "serve", "--config", str(tmp_path / "nope.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 2 and "not found" in missing.stderr


@pytest.mark.parametrize(("which", "field"), [("config", "MqttSettings"), ("manifest", "SensorSpec")])
def test_schema_carries_field_docs(which, field, capsys):
    from plcsense.cli import main

    assert main(["schema", which]) == 0
    schema = json.loads(capsys.readouterr().out)
    described = [p for p in schema["$defs"][field]["properties"].values() if p.get("description")]
    assert described, f"{field} fields have no descriptions"


def test_password_from_a_secret_file(tmp_path):
    from plcsense.worker.settings import MqttSettings

    secret = tmp_path / "mqtt-password"
    secret.write_text("s3cret\n")
    assert MqttSettings(username="plc", password_file=secret).password.get_secret_value() == "s3cret"
    with pytest.raises(ValidationError, match="not both"):
        MqttSettings(username="plc", password="x", password_file=secret)
    with pytest.raises(ValidationError, match="does not exist"):
        MqttSettings(username="plc", password_file=tmp_path / "missing")
