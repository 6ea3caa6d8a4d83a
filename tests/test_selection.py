"""Choosing the sensor anomaly detector from normal data alone: by validation, within the time budget, with a
report of what was tried and why; labelled rows are never fitted on."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from plcsense.models.bundle import load_bundle
from plcsense.training.data import SensorTable
from plcsense.training.detectors import ARSettings
from plcsense.training.selection import SelectionSettings, select, split_in_time
from plcsense.training.sensors import AutoencoderSettings, _fit_autoencoder, fit_candidate, normal_runs
from tests.conftest import write_sensor_csv
from tests.test_detectors import plant
from tests.test_training import assert_quiet

PROGRESS = re.compile(r"candidate (\d+)/(\d+) .*: detection [\d.]+, false alarms [\d.]+, J -?[\d.]+ "
                      r"\([\d.]+ s; elapsed [\d.]+ s, [\d.]+ s left\)")  # fmt: skip


def test_train_sensors_chooses_by_validation_and_reports_why(tmp_path) -> None:
    write_sensor_csv(tmp_path / "normal.csv", rows=600)
    out = tmp_path / "b"
    # A user's shell: TensorFlow, imported by this test process, sets TF_CPP_MIN_LOG_LEVEL=1 for its children.
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    args = ["train", "sensors", str(tmp_path / "normal.csv"), "--out", str(out), "--time-budget", "120"]
    proc = subprocess.run([sys.executable, "-m", "plcsense", *args], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert_quiet(proc)
    progress = [PROGRESS.search(line) for line in proc.stderr.splitlines()]
    progress = [m for m in progress if m]
    report = json.loads((out / "report" / "selection.json").read_text())
    selection = report["selection"]
    assert len(progress) == len(selection["trials"]) >= 3  # one line per candidate tried
    assert [int(m.group(1)) for m in progress] == list(range(1, len(progress) + 1))
    assert selection["chosen"] in [t["candidate"] for t in selection["trials"]] and selection["why"]
    assert selection["time_budget_s"] == 120 and selection["seconds"] < 120
    assert selection["fit_rows"] == 420 and selection["validation_rows"] == 180  # the later 30 % judges
    for trial in selection["trials"]:
        assert 0 <= trial["false_alarms"] <= 1 and 0 <= trial["detection"] <= 1
        assert trial["criterion"] == pytest.approx(trial["detection"] - trial["false_alarms"], abs=2e-4)
    assert report["detector"]["detector"] == "ar" and report["calibration"]["folds"] >= 3
    assert len(report["calibration"]["channel_factors"]) == 3
    manifest = load_bundle(out).manifest
    assert manifest.input.window == report["detector"]["window"] and manifest.score == "ar_innovation"
    assert manifest.threshold == pytest.approx(report["calibration"]["tail"]["threshold"], rel=1e-6)


def test_a_clearly_better_candidate_replaces_the_first_and_a_spent_budget_stops_the_search() -> None:
    runs = [plant(600, seed=3)]
    deaf = ARSettings(risk=1e-30)  # a threshold so high that injected faults go unnoticed
    candidates = [("deaf", deaf), ("default", ARSettings())]
    chosen = select(runs, candidates, fit_candidate, time_budget=60)
    first, second = chosen.trials
    assert second.criterion > first.criterion + 2 * second.gain_se
    assert chosen.chosen == ARSettings() and chosen.winner is second

    spent = select(runs, candidates, fit_candidate, time_budget=0.0)
    assert [t.candidate for t in spent.trials] == ["deaf"]  # at least one candidate, always
    assert spent.chosen == deaf and spent.skipped == ["default: time budget of 0 s spent"]
    report = spent.report(0.0, SelectionSettings())
    assert report["chosen"] == "deaf" and report["skipped"]


def test_the_first_candidate_stays_unless_beaten_by_more_than_chance() -> None:
    runs = [plant(600, seed=4)]
    same = [("first", ARSettings()), ("copy", ARSettings(ridge=1.0001e-4))]  # the same detector, all but in name
    chosen = select(runs, same, fit_candidate, time_budget=60)
    assert chosen.winner is chosen.trials[0]


def test_a_gain_of_nothing_but_rounding_does_not_replace_the_first() -> None:
    """Two candidates that detect the same faults (none here) leave a standard error of 0: a false-alarm rate lower
    by one window in hundreds must not count as a clear gain."""

    class Flat:
        threshold, window = 1.0, 5

        def __init__(self, one_alarm: bool) -> None:
            self.one_alarm = one_alarm

        def scores(self, run: np.ndarray) -> np.ndarray:
            out = np.zeros(len(run) - self.window + 1)
            out[0] = 2.0 if self.one_alarm else 0.0  # the first validation window, never a fault's
            return out

    first, second = ARSettings(), ARSettings(ridge=2e-4)
    candidates = [("first", first), ("second", second)]
    chosen = select([plant(600, seed=5)], candidates, lambda c, runs, deadline: Flat(c is first), time_budget=60)
    a, b = chosen.trials
    assert b.gain_over_first > 0 and b.gain_se == 0 and a.detection == b.detection == 0
    assert chosen.winner is a


def test_autoencoder_training_stops_at_the_deadline(caplog) -> None:
    runs = [plant(500, seed=2)]
    with caplog.at_level(logging.WARNING, logger="plcsense.training"):
        fitted = _fit_autoencoder(
            AutoencoderSettings(window=16, epochs=50), runs, time.monotonic(), verbose=0, keep_on_interrupt=False
        )
    assert "time budget spent after epoch 1" in caplog.text
    assert np.isfinite(fitted.threshold) and fitted.window == 16
    assert fitted.epochs_run == 1 and fitted.stopped == "time budget"


def test_autoencoder_stops_early_on_windows_apart_from_those_that_set_its_threshold(monkeypatch) -> None:
    """Rows numbered in a channel: the windows trained on, those early stopping watches and those the threshold
    is set on come from consecutive stretches of the run, in that order, sharing no reading."""
    import keras

    seen = {}
    fit = keras.Model.fit

    def recording_fit(self, x, y=None, validation_data=None, **kwargs):
        seen["train"], seen["stop"] = x, validation_data[0]
        return fit(self, x, y, validation_data=validation_data, **kwargs)

    monkeypatch.setattr(keras.Model, "fit", recording_fit)
    rows = 600
    run = np.stack([np.arange(rows, dtype=float), np.sin(np.arange(rows) / 5)], axis=1)
    s = AutoencoderSettings(window=16, epochs=2)
    fitted = _fit_autoencoder(s, [run], time.monotonic() + 60, verbose=0, keep_on_interrupt=False)

    def row_span(windows: np.ndarray, normalised: bool) -> tuple[float, float]:
        numbers = windows[..., 0] * (fitted.std[0] if normalised else 1) + (fitted.mean[0] if normalised else 0)
        return float(np.round(numbers.min())), float(np.round(numbers.max()))

    train, stop = row_span(seen["train"], True), row_span(seen["stop"], True)
    calib = row_span(fitted.calibration_windows, False)
    assert train[0] == 0 and train[1] < stop[0] and stop[1] < calib[0] and calib[1] == rows - 1


def test_labelled_rows_split_runs_and_are_never_fitted_on() -> None:
    values = np.arange(30.0)[:, None]
    labels = np.array([0] * 10 + [1] * 5 + [0] * 15)
    runs = normal_runs(SensorTable(["x"], values, labels))
    assert [r[:, 0].tolist() for r in runs] == [list(range(10)), list(range(15, 30))]
    fit, validation = split_in_time(runs, 0.4)  # the last 10 of 25 normal rows validate
    assert [len(r) for r in fit] == [10, 5] and [(len(r), first) for r, first in validation] == [(15, 5)]
