"""``plcsense train sensors --task anomaly``: a detector fitted on normal operation, no labels needed.

Two detectors, both exported with the same interface (raw window in, one error per channel out, the score is
their mean, compared with a threshold calibrated on held-out normal windows):

- ``ar``, configured by :class:`~plcsense.training.detectors.ARSettings`: per-channel autoregressive
  innovations; least squares in milliseconds, robust to slow drift, works on a few hundred rows, no epochs and no
  seed. Threshold and channel tolerances from blocked time-series cross-validation (``detectors.calibrate``).
- ``autoencoder``, configured by :class:`AutoencoderSettings`: a dense window autoencoder trained by gradient
  descent; threshold from reconstruction errors on held-out normal windows (the last part of each run, later in
  time than what the model saw), by the same scaled chi-square tail rule.

Unless one is named (``SensorTrainConfig.detector``), the detector and its settings are chosen among
``candidates`` by ``selection.select`` from the normal data alone, within ``time_budget`` seconds; what was
tried and why the winner won goes into the bundle's ``report/selection.json``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import keras
import numpy as np

from plcsense.models.architectures import dense_autoencoder
from plcsense.models.bundle import Bundle, SensorSpec, new_manifest
from plcsense.models.runtime import predict_all
from plcsense.training.data import (
    DataError,
    SensorTable,
    channel_stats,
    read_sensor_csv,
    sliding_windows,
    varies,
)
from plcsense.training.detectors import ARSettings, Calibrated, calibrate, channel_errors
from plcsense.training.export import check_output_dir, export_bundle
from plcsense.training.selection import Selection, SelectionSettings, select
from plcsense.training.thresholds import TailFit, scaled_chi2_threshold

log = logging.getLogger("plcsense.training")


@dataclass(frozen=True)
class AutoencoderSettings:
    """The dense window autoencoder: trained by gradient descent (hence epochs, batches, a learning rate and a
    seed), its threshold the score a held-out normal window exceeds with probability ``risk``."""

    window: int = 30
    epochs: int = 60
    batch_size: int = 64
    learning_rate: float = 1e-3
    seed: int = 42
    patience: int = 6
    """Early stopping on the held-out windows' error (best weights restored)."""
    calibration_split: float = 0.2
    """Last part of each run's normal windows (later in time than what the model saw) held out for the threshold."""
    risk: float = 1e-5

    def with_window(self, window: int | None) -> AutoencoderSettings:
        return self if window is None else replace(self, window=window)

    def describe(self) -> str:
        return f"autoencoder(window {self.window})"

    def as_dict(self) -> dict:
        return {"detector": "autoencoder", **asdict(self)}


Detector = ARSettings | AutoencoderSettings

STOPPING_SPLIT = 0.15
"""Last part of the autoencoder's training windows (before the calibration part) that early stopping watches."""
MAX_SCORED_WINDOWS = 50_000
"""Training windows the exported model scores for the manifest's training false-alarm rate, evenly spaced."""

SHAPES = ((3, 5, 20), (3, 5, 10), (5, 10, 20), (3, 10, 20), (5, 5, 20))
"""(ar_order, mean_window, smooth) of the AR candidates: faster or slower to react, more or less smoothing."""


def ar_candidates(base: ARSettings) -> tuple[ARSettings, ...]:
    """``base`` first (selection keeps it unless another is clearly better), then its other shapes."""
    others = [replace(base, ar_order=p, mean_window=w, smooth=m) for p, w, m in SHAPES]
    return (base, *(o for o in others if o != base))


CANDIDATES: tuple[Detector, ...] = ar_candidates(ARSettings())
"""The default candidates: AR detectors only. The autoencoder was one and was measured out on the tuning data
(SKAB valve1 and anomaly-free pieces 0-3, ``bench/skab.py``): selection picked it for 7 of those 20 files, on
the strength of its detection of injected faults, and the false-alarm rate on the rows after them became 0.21
(valve1) and 0.32 (pieces) against 0.08 and 0.04 without it: the later normal rows a 400-row recording can
spare do not show the level drift a level-reconstructing model meets afterwards. Name it
(``detector=AutoencoderSettings()``) or add it to ``candidates`` where long recordings let validation see that
drift."""


@dataclass
class SensorTrainConfig:
    detector: Detector | None = None
    """``ARSettings()`` or ``AutoencoderSettings()`` to train that one; None: choose among ``candidates``."""
    candidates: tuple[Detector, ...] = CANDIDATES
    time_budget: float = 300.0
    """Seconds for choosing and fitting the detector (a 2-core CPU fits every default candidate on 100k rows)."""
    selection: SelectionSettings = field(default_factory=SelectionSettings)
    window: int | None = None
    """Readings per window, instead of the detector's own: AR candidates change their smoothing to fit it
    (those that cannot are skipped), the autoencoder takes it as is."""
    columns: list[str] | None = None
    label_column: str | None = "anomaly"
    ignore_columns: tuple[str, ...] = ("changepoint",)
    name: str | None = None
    version: str = "1"


# ----------------------------------------------------------------------------- fitted candidates
@dataclass
class FittedAR:
    calibrated: Calibrated

    @property
    def threshold(self) -> float:
        return self.calibrated.threshold

    @property
    def window(self) -> int:
        return self.calibrated.detector.settings.window

    def scores(self, run: np.ndarray) -> np.ndarray:
        return self.calibrated.detector.channel_scores(run).mean(axis=1)

    def model(self) -> keras.Model:
        return self.calibrated.detector.model()

    def calibration(self) -> dict:
        c = self.calibrated
        return {
            "rule": "scaled chi-square tail of blocked time-series cross-validation scores",
            "folds": c.folds,
            "channel_factors": [round(float(f), 4) for f in c.channel_factors],
            "tail": c.tail.as_dict(),
            "heldout_false_alarm_rate": float(np.mean(c.heldout_scores > c.threshold)),
        }


@dataclass
class FittedAutoencoder:
    scorer: keras.Model
    threshold: float
    window: int
    mean: np.ndarray
    std: np.ndarray
    tail: TailFit
    fit_windows: int
    calibration_windows: np.ndarray
    epochs_run: int = 0
    stopped: str = "epochs"  # "epochs", "early stopping", "time budget" or "interrupted" (Ctrl-C)

    def scores(self, run: np.ndarray) -> np.ndarray:
        if len(run) < self.window:
            return np.zeros(0)
        return channel_errors(self.scorer, sliding_windows(run.astype(np.float32), self.window)).mean(axis=1)

    def model(self) -> keras.Model:
        return self.scorer

    def calibration(self) -> dict:
        return {
            "rule": "scaled chi-square tail of the errors of held-out normal windows (the last part of each run)",
            "fit_windows": self.fit_windows,
            "calibration_windows": len(self.calibration_windows),
            "epochs_run": self.epochs_run,
            "stopped": self.stopped,
            "tail": self.tail.as_dict(),
        }


Fitted = FittedAR | FittedAutoencoder


class _Deadline(keras.callbacks.Callback):
    """Stops training after the epoch that ends past ``deadline`` (time.monotonic()); EarlyStopping then
    restores the best weights so far."""

    def __init__(self, deadline: float) -> None:
        super().__init__()
        self.deadline = deadline
        self.spent = False

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if time.monotonic() > self.deadline:
            log.warning("time budget spent after epoch %d: keeping the best weights so far", epoch + 1)
            self.model.stop_training = self.spent = True


def _fit_autoencoder(
    s: AutoencoderSettings, runs: list[np.ndarray], deadline: float, verbose: int, keep_on_interrupt: bool
) -> FittedAutoencoder:
    """Train on the first part of each run, stop early on the next and set the threshold on the last (early stopping
    picks the epoch that fits its windows best, so they would give too low a threshold); Ctrl-C keeps the best
    epoch so far when ``keep_on_interrupt`` (the final fit; during selection it ends the search instead)."""
    window = s.window

    def after_gap(part: np.ndarray) -> np.ndarray:  # windows sharing no reading with the part before
        return part[window:] if len(part) > 2 * window else part

    train_parts, stop_parts, calib_parts = [], [], []
    for run in runs:
        if len(run) < window + 2:
            continue
        windows = sliding_windows(run, window)
        cut = int(len(windows) * (1 - s.calibration_split))
        if 1 <= cut < len(windows):
            stop_cut = max(1, int(cut * (1 - STOPPING_SPLIT)))
            train_parts.append(windows[:stop_cut])
            stop_parts.append(after_gap(windows[stop_cut:cut]))
            calib_parts.append(after_gap(windows[cut:]))
    if not train_parts:
        raise ValueError(f"too few normal rows for windows of {window}; record more or shrink --window")
    fit, stop, calib = (np.concatenate(p) for p in (train_parts, stop_parts, calib_parts))
    mean, std = channel_stats(fit)
    keras.utils.set_random_seed(s.seed)
    autoencoder, scorer = dense_autoencoder(window, mean, std)
    autoencoder.compile(optimizer=keras.optimizers.Adam(s.learning_rate), loss="mse")
    fit_n, stop_n = (fit - mean) / std, (stop - mean) / std
    monitor = "val_loss" if len(stop) else "loss"  # runs too short to spare windows for stopping
    early = keras.callbacks.EarlyStopping(monitor, patience=s.patience, restore_best_weights=True)
    budget, history = _Deadline(deadline), keras.callbacks.History()
    try:
        autoencoder.fit(
            fit_n, fit_n, validation_data=(stop_n, stop_n) if len(stop) else None, epochs=s.epochs,
            batch_size=s.batch_size, verbose=verbose, callbacks=[early, budget, history],
        )  # fmt: skip
        stopped = "time budget" if budget.spent else "early stopping" if early.stopped_epoch else "epochs"
    except KeyboardInterrupt:
        if not keep_on_interrupt or early.best_weights is None:  # selection's to handle, or nothing to keep
            raise
        log.warning("interrupted: keeping the best weights so far")
        autoencoder.set_weights(early.best_weights)
        stopped = "interrupted"
    errors = channel_errors(scorer, calib.astype(np.float32)).mean(axis=1)
    tail = scaled_chi2_threshold(errors, s.risk)
    epochs_run = len(history.history.get("loss", []))
    return FittedAutoencoder(scorer, tail.threshold, window, mean, std, tail, len(fit), calib, epochs_run, stopped)


def fit_candidate(
    candidate: object, runs: list[np.ndarray], deadline: float, verbose: int = 0, final: bool = False
) -> Fitted:
    """Fit and calibrate one candidate on normal runs (a ValueError says why it cannot use them); ``final``: the
    fit that is exported, which Ctrl-C ends with the best weights so far."""
    if isinstance(candidate, ARSettings):
        return FittedAR(calibrate(runs, candidate))
    assert isinstance(candidate, AutoencoderSettings)
    return _fit_autoencoder(candidate, runs, deadline, verbose, keep_on_interrupt=final)


# ----------------------------------------------------------------------------- training
def normal_runs(table: SensorTable) -> list[np.ndarray]:
    """The runs of consecutive unlabelled (normal) rows: labelled rows are left out, and no window or AR lag may
    join the rows before an anomaly to the rows after it."""
    if table.labels is None:
        return [table.values]
    normal = np.concatenate([[False], table.labels == 0, [False]])
    edges = np.flatnonzero(np.diff(normal.astype(int)))
    return [table.values[a:b] for a, b in zip(edges[::2], edges[1::2], strict=True)]


def read_tables(paths: list[Path], cfg: SensorTrainConfig) -> list[SensorTable]:
    """Read every CSV with the first file's channels, so all files feed the same columns."""
    if not paths:
        raise DataError("no CSV files given")
    first = read_sensor_csv(paths[0], columns=cfg.columns, label_column=cfg.label_column, ignore=cfg.ignore_columns)
    return [first] + [read_sensor_csv(p, columns=first.columns, label_column=cfg.label_column) for p in paths[1:]]


def train_sensor_anomaly(paths: list[Path], out: Path, cfg: SensorTrainConfig) -> Bundle:
    check_output_dir(out)
    tables = read_tables(paths, cfg)
    return train_anomaly_tables(tables, out, cfg, name=cfg.name or paths[0].stem)


def _candidates(cfg: SensorTrainConfig) -> tuple[list[tuple[str, Detector]], list[str]]:
    """The candidates with ``cfg.window`` applied, named; and those that cannot take that window."""
    usable, unusable = [], []
    for candidate in cfg.candidates:
        try:
            adapted = candidate.with_window(cfg.window)
        except ValueError as exc:
            unusable.append(f"{candidate.describe()}: {exc}")
            continue
        name = adapted.describe()
        if name not in dict(usable):
            usable.append((name, adapted))
    return usable, unusable


def choose(runs: list[np.ndarray], cfg: SensorTrainConfig, started: float) -> tuple[Detector, Selection | None]:
    """The configured detector, or the one selection picks among the candidates."""
    if cfg.detector is not None:
        try:
            return cfg.detector.with_window(cfg.window), None
        except ValueError as exc:  # a window the AR detector cannot fill
            raise DataError(str(exc)) from None
    candidates, unusable = _candidates(cfg)
    if not candidates:
        raise DataError("no detector takes this window: " + "; ".join(unusable))
    rows = np.concatenate(runs)
    if not varies(rows.std(axis=0), rows.mean(axis=0)).any():  # no fault to inject, nothing to choose by
        log.warning("no channel varies in the normal rows: %s is used without selection", candidates[0][0])
        return candidates[0][1], None
    log.info("choosing among %d detectors within %.0f s", len(candidates), cfg.time_budget)
    try:
        selection = select(
            runs, candidates, fit_candidate, time_budget=cfg.time_budget, settings=cfg.selection, started=started
        )
    except ValueError as exc:
        raise DataError(str(exc)) from None
    selection.skipped += unusable
    return selection.chosen, selection  # type: ignore[return-value]


def train_anomaly_tables(tables: list[SensorTable], out: Path, cfg: SensorTrainConfig, *, name: str) -> Bundle:
    """Choose (unless configured), fit and calibrate a detector on the normal rows of ``tables``; export it."""
    started = time.monotonic()
    runs = [run for t in tables for run in normal_runs(t) if len(run)]
    columns = tables[0].columns
    if not runs:
        raise DataError(
            f"every row is labelled anomalous ({cfg.label_column} = 1): a detector learns normal operation; give it "
            "rows labelled 0"
        )
    rows = sum(len(r) for r in runs)
    log.info("%d channels (%s), %d normal rows in %d runs", len(columns), ", ".join(columns), rows, len(runs))
    detector, selection = choose(runs, cfg, started)
    log.info("fitting %s on all %d normal rows", detector.describe(), rows)
    try:
        fitted = fit_candidate(detector, runs, started + cfg.time_budget, verbose=2, final=True)
    except ValueError as exc:
        raise DataError(str(exc)) from None

    if isinstance(fitted, FittedAR):
        mean, std, score_name = fitted.calibrated.detector.mean, fitted.calibrated.detector.std, "ar_innovation"
        long_runs = [r for r in runs if len(r) >= fitted.window]
        windows = sum(len(r) - fitted.window + 1 for r in long_runs)
        stride = math.ceil(windows / MAX_SCORED_WINDOWS)  # every window of a long recording would take gigabytes
        held = np.concatenate([sliding_windows(r, fitted.window, stride) for r in long_runs])
        measured_on = "train"  # training windows (every stride-th): the rate the threshold leaves on fitted data
    else:
        mean, std, score_name = fitted.mean, fitted.std, "mean_squared_error"
        held = fitted.calibration_windows
        measured_on = "calibration"  # the held-out windows the threshold was set on
    spec = SensorSpec(channels=columns, window=fitted.window, mean=mean.tolist(), std=std.tolist())
    manifest = new_manifest(
        name=name, version=cfg.version, task="anomaly", input=spec, threshold=fitted.threshold, score=score_name
    )
    if isinstance(fitted, FittedAR):
        manifest.metrics.update({"train_rows": rows, "train_windows": windows, "scored_windows": len(held)})
    else:
        manifest.metrics.update({"train_windows": fitted.fit_windows, "calibration_windows": len(held)})
        manifest.metrics.update(
            {"epochs_run": fitted.epochs_run, "stopped_by_time_budget": float(fitted.stopped == "time budget")}
        )
    if (selection is not None and selection.interrupted) or (
        isinstance(fitted, FittedAutoencoder) and fitted.stopped == "interrupted"
    ):
        manifest.metrics["interrupted"] = 1.0
    if selection is not None:
        won = selection.winner
        manifest.metrics.update({"validation_detection": won.detection, "validation_false_alarms": won.false_alarms})
    report = {
        "detector": detector.as_dict(),
        "calibration": fitted.calibration(),
        "selection": None if selection is None else selection.report(cfg.time_budget, cfg.selection),
    }

    def score(lite) -> dict[str, float]:
        scores = predict_all(lite, held.astype(np.float32)).mean(axis=1)
        return {
            f"{measured_on}_score_median": float(np.median(scores)),
            f"{measured_on}_false_alarm_rate": float(np.mean(scores > fitted.threshold)),
        }

    def write_report(lite, folder: Path) -> None:
        (folder / "selection.json").write_text(json.dumps(report, indent=1) + "\n")

    bundle = export_bundle(out, fitted.model(), manifest, held, score, report=write_report)
    log.info("bundle written in %.1f s (time budget %.0f s)", time.monotonic() - started, cfg.time_budget)
    return bundle
