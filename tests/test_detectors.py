"""The AR-innovation anomaly detector and its label-free threshold: interface, calibration on normal data,
false-alarm rates near the stated risk, faults flagged, runs kept apart, SKAB sanity check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.stats import chi2

from plcsense.training.data import read_sensor_csv, sliding_windows
from plcsense.training.detectors import (
    ARSettings,
    _blocked_folds,
    build_detector,
    calibrate,
    channel_errors,
)
from plcsense.training.thresholds import scaled_chi2_threshold

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


def stationary(rows: int, seed: int) -> np.ndarray:
    """Three independent AR(1) channels: normal data whose future behaves exactly like its past."""
    rng = np.random.default_rng(seed)
    phi, noise = np.array([0.3, -0.2, 0.1]), rng.normal(size=(rows, 3))
    values = np.zeros((rows, 3))
    for t in range(1, rows):
        values[t] = phi * values[t - 1] + noise[t]
    return values


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
        build_detector(values[:TRAIN_ROWS], window=ARSettings().taps - 1)

    # The exported LiteRT model (normalisation inside) gives the same errors as Keras, and calibration's numpy
    # scores are the same numbers: the threshold was set on what the worker will compute.
    from plcsense.models.runtime import LiteRTModel
    from plcsense.training.export import to_tflite

    (tmp_path / "m.tflite").write_bytes(to_tflite(model))
    lite = LiteRTModel(tmp_path / "m.tflite")
    assert lite.input_shape == (window, 4) and lite.output_shape == (4,)
    np.testing.assert_allclose(lite.predict(windows[:100]), errors[:100], rtol=1e-3, atol=1e-3)
    numpy_errors = calibrate(values[:TRAIN_ROWS]).detector.channel_scores(values)
    np.testing.assert_allclose(numpy_errors, errors, rtol=1e-3, atol=1e-3)


def test_a_channel_flat_below_float32_resolution_scores_the_same_in_numpy_and_keras() -> None:
    """A spread of 1e-8 is below what the worker's float32 readings resolve and below Keras' Normalization floor
    (1e-7): it counts as a constant channel, so calibration's numbers stay those of the exported model."""
    values = plant(600)
    values[:, 1] = 0.026 + 1e-8 * np.random.default_rng(3).normal(size=len(values))
    calibrated = calibrate(values[:TRAIN_ROWS])
    model = calibrated.detector.model()
    errors = channel_errors(model, sliding_windows(values.astype(np.float32), model.input_shape[1]))
    np.testing.assert_allclose(calibrated.detector.channel_scores(values), errors, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("risk", [1e-2, 1e-3])
def test_scaled_chi2_threshold_matches_a_known_tail(risk: float) -> None:
    """Scores drawn from a known scaled chi-square: the fitted threshold sits at its true quantile and fresh
    scores exceed it about ``risk`` of the time."""
    rng = np.random.default_rng(1)
    fit, fresh = 3 * rng.chisquare(6, 4000), 3 * rng.chisquare(6, 400_000)
    tail = scaled_chi2_threshold(fit, risk)
    assert tail.threshold == pytest.approx(3 * chi2.isf(risk, 6), rel=0.05)
    assert 0.6 * risk < np.mean(fresh > tail.threshold) < 1.6 * risk
    assert scaled_chi2_threshold(fit, risk / 10).threshold > tail.threshold  # a smaller risk, a higher threshold
    flat = scaled_chi2_threshold(np.full(50, 2.0), risk)  # a flat signal: anything above it is unusual
    assert 2.0 < flat.threshold < 2.001


@pytest.mark.parametrize("risk", [1e-2, 1e-3])
def test_false_alarm_rate_on_fresh_normal_data_is_near_the_risk(risk: float) -> None:
    """Calibrated on 3,000 rows of stationary data by blocked cross-validation, the detector flags fresh normal
    windows at a rate near ``risk`` (averaged over seeds; windows overlap, so single runs scatter)."""
    rates = []
    for seed in range(3):
        values = stationary(23_000, seed)
        c = calibrate(values[:3000], ARSettings(risk=risk))
        rates.append(np.mean(c.detector.channel_scores(values[3000:]).mean(axis=1) > c.threshold))
    assert risk / 3 < np.mean(rates) < 3 * risk, rates


def test_blocked_folds_never_score_rows_they_were_fitted_on() -> None:
    runs = [np.arange(250.0)[:, None], 1000 + np.arange(150.0)[:, None]]  # values name their rows
    folds = list(_blocked_folds(runs, 4, gap=20))
    assert len(folds) == 4
    for fit, held in folds:
        fitted = {float(v) for run in fit for v in run[:, 0]}
        for i, a, b in held:
            scored = {float(v) for v in runs[i][a:b, 0]}
            assert not fitted & scored
            near = {float(v) for v in runs[i][max(0, a - 20) : b + 20, 0]}  # the gap either side too
            assert not fitted & near
    held_rows = sum(b - a for _, held in folds for _, a, b in held)
    assert held_rows == 400  # every row is held out exactly once


def test_runs_are_not_joined() -> None:
    """Two recordings at different operating points: calibrated as separate runs, the jump between them is
    neither learnt as normal nor allowed to inflate the threshold (it would be, concatenated)."""
    a, b = stationary(800, 1), stationary(800, 2) + 25.0
    apart = calibrate([a, b])
    joined = calibrate(np.concatenate([a, b]))
    assert apart.threshold < joined.threshold / 2
    same = calibrate([a, b - 25.0])
    assert apart.threshold == pytest.approx(same.threshold, rel=0.35)


def test_too_few_rows_say_so() -> None:
    with pytest.raises(ValueError, match="record more normal data"):
        calibrate(stationary(60, 0))


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
