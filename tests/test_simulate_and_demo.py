"""The PLC simulator against a real broker, and the demo as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.broker import mosquitto_available
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
