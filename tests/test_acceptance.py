"""The slice's acceptance scenario end to end: CLI training, the minimal YAML, mosquitto_pub -l, SIGTERM."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SHARED_DATA, Collector, WorkerProcess, worker_config

SKAB = SHARED_DATA / "skab"


def serving_maps_tensorflow(pid: int) -> bool:
    maps = Path(f"/proc/{pid}/maps").read_text()
    return "site-packages/tensorflow" in maps or "libtensorflow" in maps


@pytest.mark.skipif(not SKAB.is_dir(), reason="needs ../shared/data/skab (present in CI)")
@pytest.mark.skipif(
    shutil.which("mosquitto_pub") is None, reason="needs mosquitto_pub (apt-get install mosquitto-clients)"
)
def test_skab_readings_with_mosquitto_pub(tmp_path, broker, collectors):
    bundle = tmp_path / "bundles" / "pump"
    train = subprocess.run(
        [
            sys.executable,
            "-m",
            "plcsense",
            "train",
            "sensors",
            str(SKAB / "anomaly-free" / "anomaly-free.csv"),
            "--task",
            "anomaly",
            "--window",
            "30",
            "--out",
            str(bundle),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert train.returncode == 0, train.stderr
    routes = [{"name": "pump", "topic": "plant/+/pump", "model": "bundles/pump", "encoding": "json"}]
    config, port = worker_config(tmp_path / "config.yaml", broker, routes, client_id="line3-worker")
    worker = WorkerProcess(config, port, tmp_path / "worker.log").start()
    out = Collector(broker, "plant/#")
    collectors.append(out)

    rows = (SKAB / "valve1" / "1.csv").read_text().splitlines()[1:101]
    lines = "\n".join(json.dumps([float(v) for v in row.split(";")[1:9]]) for row in rows) + "\n"
    pub = ["mosquitto_pub", "-h", broker.host, "-p", str(broker.port), "-q", "1", "-t", "plant/rig1/pump"]
    subprocess.run([*pub, "-l"], input=lines, text=True, check=True, timeout=60)
    for bad in ("{not json", "[1, 2, 3]", "[NaN, 0, 0, 0, 0, 0, 0, 0]"):
        subprocess.run([*pub, "-m", bad], check=True, timeout=30)

    results = out.wait_for(71, "plant/rig1/pump/result")
    errors = out.wait_for(3, "plant/rig1/pump/error")
    assert len(results) >= 71
    assert [e["error"] for e in errors] == ["invalid_json", "bad_shape", "non_finite"]
    subprocess.run([*pub, "-m", json.dumps({"id": "sentinel", "data": [0.0] * 8})], check=True, timeout=30)
    assert out.wait_for_ids(["sentinel"])  # answered after everything before it
    assert worker.metric("plcsense_messages_total", route="pump") == 104
    assert sum(v for (name, _), v in worker.metrics().items() if name == "plcsense_errors_total") == 3
    assert not serving_maps_tensorflow(worker.proc.pid)
    assert worker.terminate() == 0


def test_serving_path_imports_no_tensorflow(sensor_bundle, image_bundle):
    code = f"""
import sys, numpy as np
from plcsense.worker.service import Worker
from plcsense.worker.settings import Settings
from plcsense.models.bundle import load_bundle
from plcsense.worker.decoders import decode
import plcsense.cli, plcsense.simulate, plcsense.worker.main
b = load_bundle({str(sensor_bundle)!r}); load_bundle({str(image_bundle)!r})
b.model.predict(np.zeros((2, b.manifest.input.window, 3), np.float32))
decode(b"[1, 2, 3]", "json", b.manifest)
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras", "sklearn", "matplotlib"))
print(bad)
sys.exit(1 if bad else 0)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
