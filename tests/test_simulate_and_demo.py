"""The PLC simulator against a real broker, and the demo as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from plcsense.harness import free_port, mosquitto_available, start_broker
from tests.conftest import Collector, write_sensor_csv


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_simulate_csv_rows_and_images(tmp_path, broker, collectors, image_data, protocol):
    write_sensor_csv(tmp_path / "rows.csv", rows=25)
    out = Collector(broker, "sim/#")
    collectors.append(out)
    base = [sys.executable, "-m", "plcsense", "simulate", "--url", broker.url, "--rate", "0", "--protocol", protocol]
    subprocess.run([*base, str(tmp_path / "rows.csv"), "--topic", "sim/rows"], check=True, timeout=60)
    subprocess.run([*base, str(image_data), "--topic", "sim/cam", "--limit", "5"], check=True, timeout=60)
    rows = out.wait(25, "sim/rows")
    assert len(rows) == 25
    first = json.loads(rows[0].payload)
    assert first["id"] == "rows-0" and len(first["data"]) == 3
    images = out.wait(5, "sim/cam")
    assert len(images) == 5 and images[0].payload.startswith(b"\x89PNG")


@pytest.mark.skipif(not mosquitto_available(), reason="needs the mosquitto binary (apt-get install mosquitto)")
def test_simulate_stops_with_exit_2_when_the_broker_refuses_or_is_away(tmp_path):
    write_sensor_csv(tmp_path / "rows.csv", rows=5)
    broker = start_broker(tmp_path / "broker", auth=True)
    try:
        cmd = [sys.executable, "-m", "plcsense", "simulate", str(tmp_path / "rows.csv"), "--topic", "sim/rows"]
        refused = subprocess.run([*cmd, "--url", broker.url], capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2, refused.stderr
        assert f"the MQTT broker at {broker.url} refused the connection: Not authorized" in refused.stderr
        assert "published" not in refused.stdout
        wrong = f"mqtt://plc:wrong@127.0.0.1:{broker.port}"
        secret = subprocess.run([*cmd, "--url", wrong], capture_output=True, text=True, timeout=60)
        assert secret.returncode == 2 and "mqtt://plc:***@127.0.0.1" in secret.stderr and "wrong" not in secret.stderr
        good = f"mqtt://plc:{broker.password}@127.0.0.1:{broker.port}"
        accepted = subprocess.run([*cmd, "--url", good], capture_output=True, text=True, timeout=60)
        assert accepted.returncode == 0 and "published 5 messages" in accepted.stdout, accepted.stderr
    finally:
        broker.stop()
    away = f"mqtt://127.0.0.1:{free_port()}"
    unreachable = subprocess.run([*cmd, "--url", away], capture_output=True, text=True, timeout=60)
    assert unreachable.returncode == 2
    assert f"cannot reach the MQTT broker at {away}" in unreachable.stderr and "Traceback" not in unreachable.stderr


@pytest.mark.skipif(not mosquitto_available(), reason="needs the mosquitto binary (apt-get install mosquitto)")
def test_demo_runs_and_reports(tmp_path):
    env = {**os.environ, "PLCSENSE_DEMO_SECONDS": "15", "PLCSENSE_DEMO_DIR": str(tmp_path / "demo")}
    env.pop("PLCSENSE_MQTT_URL", None)
    proc = subprocess.run(
        [sys.executable, "-m", "plcsense", "demo"], capture_output=True, text=True, timeout=400, env=env
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("demo: ") and last.endswith(" errors")
    messages, results, errors = (int(part.split()[0]) for part in last[len("demo: ") :].split(", "))
    assert results > 0 and messages >= results + errors
    assert " #1: label " in proc.stdout and " #1: score " in proc.stdout
