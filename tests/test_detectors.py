"""The AR-innovation anomaly detector: interface, calibration on normal data, faults flagged, SKAB sanity check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from plcsense.training.data import read_sensor_csv, sliding_windows
from plcsense.training.detectors import ARSettings, build_detector, channel_errors

SKAB = Path(__file__).resolve().parents[2] / "shared" / "data" / "skab"
TRAIN_ROWS = 400


def plant(rows: int, seed: int = 0) -> np.ndarray:
    """Four channels on very different scales: a noisy AR(1) voltage, a tiny vibration RMS, a slowly wandering
    temperature (random walk) and a quantised flow reading."""
    rng = np.random.default_rng(seed)
    voltage = np.zeros(rows)
    for t in range(1, rows):
        voltage[t] = 0.5 * voltage[t - 1] + rng.normal()
    vibration = 0.026 + 3e-4 * rng.normal(size=rows)
    temperature = 70 + np.cumsum(rng.normal(0, 0.02, rows))
    flow = 32 + 0.4 * np.round(rng.normal(0, 1, rows))
    return np.stack([230 + 3 * voltage, vibration, temperature, flow], axis=1)


def scores(model, threshold: float, values: np.ndarray) -> np.ndarray:
    """Prediction for the window ending at each row from ``window - 1`` on."""
    return channel_errors(model, sliding_windows(values.astype(np.float32), model.input_shape[1])).mean(1) > threshold


def test_interface_raw_window_in_one_error_per_channel_out(tmp_path: Path) -> None:
    values = plant(600)
    model, threshold = build_detector(values[:TRAIN_ROWS])
    window = ARSettings().window
    assert model.input_shape == (None, window, 4) and model.output_shape == (None, 4)
    assert np.isfinite(threshold) and threshold > 0
    windows = sliding_windows(values.astype(np.float32), window)
    errors = channel_errors(model, windows)
    assert errors.shape == (len(windows), 4) and errors.dtype == np.float32 and np.all(errors >= 0)

    wider, _ = build_detector(values[:TRAIN_ROWS], window=50)
    assert wider.input_shape == (None, 50, 4)
    with pytest.raises(ValueError, match="too short"):
        build_detector(values[:TRAIN_ROWS], window=10)

    # The exported LiteRT model (normalisation inside) gives the same errors as Keras.
    from plcsense.models.runtime import LiteRTModel
    from plcsense.training.export import to_tflite

    (tmp_path / "m.tflite").write_bytes(to_tflite(model))
    lite = LiteRTModel(tmp_path / "m.tflite")
    assert lite.input_shape == (window, 4) and lite.output_shape == (4,)
    np.testing.assert_allclose(lite.predict(windows[:100]), errors[:100], rtol=1e-3, atol=1e-3)


def test_threshold_from_normal_data_gives_few_false_alarms_later() -> None:
    """2600 rows after training, with a temperature that wanders out of its training range (a random walk)."""
    false_alarms = []
    for seed in range(3):
        values = plant(3000, seed)
        model, threshold = build_detector(values[:TRAIN_ROWS])
        false_alarms.append(scores(model, threshold, values[TRAIN_ROWS - model.input_shape[1] + 1 :]).mean())
    assert max(false_alarms) < 0.02, false_alarms


@pytest.mark.parametrize("channel,shift", [(3, -1.2), (0, 10.0), (1, 6e-4)])  # about 3, 3 and 2 sd
def test_injected_level_shift_is_flagged(channel: int, shift: float) -> None:
    values = plant(1600, seed=1)
    model, threshold = build_detector(values[:TRAIN_ROWS])
    faulty = values.copy()
    faulty[1000:1400, channel] += shift  # e.g. a valve throttling the flow by 4 %
    window = model.input_shape[1]
    flagged = scores(model, threshold, faulty)
    row = np.arange(window - 1, len(faulty))
    assert flagged[(row >= 1000 + 20) & (row < 1400)].mean() > 0.9  # after the window has filled
    assert flagged[(row >= TRAIN_ROWS) & (row < 1000)].mean() < 0.02


@pytest.mark.skipif(not SKAB.is_dir(), reason=f"SKAB data not found at {SKAB} (see shared/data/README.md)")
def test_skab_protocol_on_two_files() -> None:
    """Official protocol on two SKAB files: fit on the first 400 rows, predict every test row."""
    tp = fp = fn = tn = 0
    for name in ("valve1/13.csv", "valve2/1.csv"):
        table = read_sensor_csv(SKAB / name, label_column="anomaly", ignore=("changepoint",))
        model, threshold = build_detector(table.values[:TRAIN_ROWS])
        window = model.input_shape[1]
        pred = scores(model, threshold, table.values[TRAIN_ROWS - window + 1 :])
        truth = table.labels[TRAIN_ROWS:] > 0
        tp += (truth & pred).sum()
        fp += (~truth & pred).sum()
        fn += (truth & ~pred).sum()
        tn += (~truth & ~pred).sum()
    f1, far = tp / (tp + (fp + fn) / 2), fp / (fp + tn)
    assert f1 >= 0.8 and far <= 0.1, (f1, far)
