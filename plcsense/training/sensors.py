"""``plcsense train sensors --task anomaly``: a detector fitted on normal operation, no labels needed.

Two detectors, both exported with the same interface (raw window in, one error per channel out, the score is
their mean, compared with a threshold calibrated on normal data):

- ``ar``, configured by :class:`~plcsense.training.detectors.ARSettings` (default, chosen by measurement on
  SKAB): per-channel autoregressive innovations; fitted by least squares in milliseconds, robust to slow drift,
  works on a few hundred rows, no epochs and no seed. Threshold: the largest training score times a margin.
- ``autoencoder``, configured by :class:`AutoencoderSettings`: a dense window autoencoder trained by gradient
  descent; threshold from reconstruction errors on held-out normal windows (the last part of each file, later in
  time than what the model saw): a high quantile, times a margin.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import keras
import numpy as np

from plcsense.models.architectures import dense_autoencoder
from plcsense.models.bundle import Bundle, SensorSpec, new_manifest
from plcsense.models.runtime import predict_all
from plcsense.training.data import DataError, SensorTable, read_sensor_csv, sliding_windows
from plcsense.training.detectors import ARSettings, build_detector
from plcsense.training.export import check_output_dir, export_bundle

log = logging.getLogger("plcsense.training")


@dataclass(frozen=True)
class AutoencoderSettings:
    """The dense window autoencoder: trained by gradient descent (hence epochs, batches, a learning rate and a
    seed), its threshold a high quantile of the errors on held-out normal windows, times a margin."""

    window: int = 30
    epochs: int = 60
    batch_size: int = 64
    learning_rate: float = 1e-3
    seed: int = 42
    patience: int = 6
    """Early stopping on the held-out windows' error (best weights restored)."""
    calibration_split: float = 0.2
    """Last part of each file's normal windows (later in time than what the model saw) held out for the threshold."""
    threshold_quantile: float = 0.995
    threshold_margin: float = 1.2

    def with_window(self, window: int | None) -> AutoencoderSettings:
        return self if window is None else replace(self, window=window)


Detector = ARSettings | AutoencoderSettings


@dataclass
class SensorTrainConfig:
    detector: Detector = field(default_factory=ARSettings)
    """The detector and its own settings: ``ARSettings()`` (default) or ``AutoencoderSettings()``."""
    window: int | None = None
    """Readings per window, instead of the detector's own: 34 for ``ar`` (AR order + averaging + smoothing - 1,
    only the smoothing changes), 30 for the autoencoder."""
    columns: list[str] | None = None
    label_column: str | None = "anomaly"
    ignore_columns: tuple[str, ...] = ("changepoint",)
    name: str | None = None
    version: str = "1"


def _normal_windows(table: SensorTable, window: int) -> np.ndarray:
    windows = sliding_windows(table.values, window)
    if table.labels is None:
        return windows
    clean = sliding_windows(table.labels[:, None], window).max(axis=(1, 2)) == 0
    return windows[clean]


def read_tables(paths: list[Path], cfg: SensorTrainConfig) -> list[SensorTable]:
    """Read every CSV with the first file's channels, so all files feed the same columns."""
    if not paths:
        raise DataError("no CSV files given")
    first = read_sensor_csv(paths[0], columns=cfg.columns, label_column=cfg.label_column, ignore=cfg.ignore_columns)
    return [first] + [read_sensor_csv(p, columns=first.columns, label_column=cfg.label_column) for p in paths[1:]]


def train_sensor_anomaly(paths: list[Path], out: Path, cfg: SensorTrainConfig) -> Bundle:
    check_output_dir(out)
    tables = read_tables(paths, cfg)
    return train_anomaly_tables(tables, out, cfg, name=cfg.name or paths[0].stem, sources=[str(p) for p in paths])


def train_anomaly_tables(
    tables: list[SensorTable], out: Path, cfg: SensorTrainConfig, *, name: str, sources: list[str] | None = None
) -> Bundle:
    """Fit the configured detector on the normal rows of ``tables`` and export a bundle."""
    sources = sources or [f"table {i}" for i in range(len(tables))]
    try:
        detector = cfg.detector.with_window(cfg.window)
    except ValueError as exc:  # a window the AR detector cannot fill
        raise DataError(str(exc)) from None
    if isinstance(detector, ARSettings):
        return _train_ar(tables, out, detector, cfg, name)
    return _train_autoencoder(tables, out, detector, cfg, name, sources)


def _normal_rows(table: SensorTable) -> np.ndarray:
    return table.values if table.labels is None else table.values[table.labels == 0]


def _train_ar(tables: list[SensorTable], out: Path, s: ARSettings, cfg: SensorTrainConfig, name: str) -> Bundle:
    values = np.concatenate([_normal_rows(t) for t in tables])
    try:
        scorer, threshold = build_detector(values, settings=s)
    except ValueError as exc:
        raise DataError(str(exc)) from None
    columns = tables[0].columns
    window = s.window
    log.info(
        "%d channels (%s), %d normal rows, AR detector on windows of %d readings",
        len(columns),
        ", ".join(columns),
        len(values),
        window,
    )
    windows = sliding_windows(values, window)
    normalise = scorer.get_layer("normalise")
    mean, variance = (np.asarray(w, dtype=np.float64).reshape(-1) for w in (normalise.mean, normalise.variance))
    spec = SensorSpec(channels=columns, window=window, mean=mean.tolist(), std=np.sqrt(variance).tolist())
    manifest = new_manifest(
        name=name, version=cfg.version, task="anomaly", input=spec, threshold=threshold, score="ar_innovation"
    )
    manifest.metrics.update({"train_rows": len(values), "train_windows": len(windows)})

    def score(lite) -> dict[str, float]:
        scores = predict_all(lite, windows.astype(np.float32)).mean(axis=1)
        return {
            "train_score_median": float(np.median(scores)),
            "train_false_alarm_rate": float(np.mean(scores > threshold)),
        }

    return export_bundle(out, scorer, manifest, windows, score)


def _train_autoencoder(
    tables: list[SensorTable], out: Path, s: AutoencoderSettings, cfg: SensorTrainConfig, name: str, sources: list[str]
) -> Bundle:
    window = s.window
    fit_parts, calib_parts = [], []
    for source, table in zip(sources, tables, strict=True):
        windows = _normal_windows(table, window)
        cut = int(len(windows) * (1 - s.calibration_split))
        if cut < 1 or cut == len(windows):
            raise DataError(f"{source}: too few normal rows for window {window}; record more or shrink --window")
        fit_parts.append(windows[:cut])
        calib_parts.append(windows[cut + window :] if len(windows) - cut > 2 * window else windows[cut:])
    fit, calib = np.concatenate(fit_parts), np.concatenate(calib_parts)
    columns = tables[0].columns
    rows = np.concatenate([t.values for t in tables])
    mean, std = rows.mean(axis=0), rows.std(axis=0)
    std = np.where(std > 1e-9 * np.maximum(1.0, np.abs(mean)), std, 1.0)  # constant channels: no scaling
    log.info(
        "%d channels (%s), %d training and %d calibration windows of %d readings",
        len(columns),
        ", ".join(columns),
        len(fit),
        len(calib),
        window,
    )

    keras.utils.set_random_seed(s.seed)
    autoencoder, scorer = dense_autoencoder(window, mean, std)
    autoencoder.compile(optimizer=keras.optimizers.Adam(s.learning_rate), loss="mse")
    fit_n, calib_n = (fit - mean) / std, (calib - mean) / std
    autoencoder.fit(
        fit_n,
        fit_n,
        validation_data=(calib_n, calib_n),
        epochs=s.epochs,
        batch_size=s.batch_size,
        verbose=2,
        callbacks=[keras.callbacks.EarlyStopping(patience=s.patience, restore_best_weights=True)],
    )
    spec = SensorSpec(channels=columns, window=window, mean=mean.tolist(), std=std.tolist())
    manifest = new_manifest(
        name=name,
        version=cfg.version,
        task="anomaly",
        input=spec,
        threshold=0.0,
        score="mean_squared_error",
    )
    manifest.metrics.update({"train_windows": len(fit), "calibration_windows": len(calib)})

    def score(lite) -> dict[str, float]:
        errors = predict_all(lite, calib.astype(np.float32)).mean(axis=1)
        manifest.threshold = float(np.quantile(errors, s.threshold_quantile) * s.threshold_margin)
        return {
            "calibration_error_median": float(np.median(errors)),
            "calibration_false_alarm_rate": float(np.mean(errors > manifest.threshold)),
        }

    return export_bundle(out, scorer, manifest, calib, score)
