"""bench/skab.py: the worker on a real Mosquitto predicts exactly what the offline path predicts, on one SKAB file."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.broker import mosquitto_available, start_broker

SKAB = Path(__file__).resolve().parents[2] / "shared" / "data" / "skab"
BENCH = Path(__file__).resolve().parents[1] / "bench" / "skab.py"
FILE = "valve2/3.csv"  # the shortest labelled SKAB file: 995 rows, 595 of them scored


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_skab", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not (SKAB / FILE).is_file(), reason=f"needs the SKAB data at {SKAB} (see shared/data/README.md)")
@pytest.mark.skipif(not mosquitto_available(), reason="needs the mosquitto binary (apt-get install mosquitto)")
def test_via_mqtt_predictions_equal_offline(tmp_path: Path) -> None:
    skab = load_bench()
    f = skab.load_labelled_file(SKAB / FILE)
    assert f is not None and f.key == FILE
    run, _ = skab.train_and_score(f, tmp_path / "bundle")
    assert run.first == 400 and len(run.pred) == len(f.values) - 400 and run.pred.any()

    broker = start_broker(tmp_path / "broker")
    try:
        (tmp_path / "workers").mkdir()
        report, predictions = skab.run_via_mqtt([f], {f.key: run}, broker.url, tmp_path / "workers", timeout=60)
    finally:
        broker.stop()
    np.testing.assert_array_equal(predictions[f.key], run.pred)
    assert report["parity"] == 1.0 and report["scored_rows"] == len(f.values) - run.first
    assert report["repeated_results"] == 0
    offline = skab.summarise_predictions([f], {f.key: run.pred}, 400)
    assert report["pooled"] == offline["pooled"]
