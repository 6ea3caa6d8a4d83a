"""``plcsense train sensors --task anomaly``: an autoencoder on normal operation, no labels needed.

The threshold comes from reconstruction errors on held-out normal windows (the last part of each file, so
it is judged on data later in time than what the model saw): a high quantile, times a safety margin.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from plcsense.models.bundle import Bundle, SensorSpec, new_manifest
from plcsense.training.data import DataError, SensorTable, read_sensor_csv, sliding_windows
from plcsense.training.evaluate import predict_all
from plcsense.training.export import check_output_dir, export_bundle

log = logging.getLogger("plcsense.training")


@dataclass
class SensorTrainConfig:
    window: int = 30
    columns: list[str] | None = None
    label_column: str | None = "anomaly"
    ignore_columns: tuple[str, ...] = ("changepoint",)
    epochs: int = 60
    batch_size: int = 64
    learning_rate: float = 1e-3
    seed: int = 42
    calibration_split: float = 0.2
    threshold_quantile: float = 0.995
    threshold_margin: float = 1.2
    patience: int = 6
    name: str | None = None
    version: str = "1"


def _normal_windows(table: SensorTable, window: int) -> np.ndarray:
    windows = sliding_windows(table.values, window)
    if table.labels is None:
        return windows
    clean = sliding_windows(table.labels[:, None], window).max(axis=(1, 2)) == 0
    return windows[clean]


def train_sensor_anomaly(paths: list[Path], out: Path, cfg: SensorTrainConfig) -> Bundle:
    import keras

    from plcsense.models.architectures import dense_autoencoder

    check_output_dir(out)
    if not paths:
        raise DataError("no CSV files given")
    first = read_sensor_csv(paths[0], columns=cfg.columns, label_column=cfg.label_column, ignore=cfg.ignore_columns)
    tables = [first] + [read_sensor_csv(p, columns=first.columns, label_column=cfg.label_column) for p in paths[1:]]
    fit_parts, calib_parts = [], []
    for path, table in zip(paths, tables, strict=True):
        windows = _normal_windows(table, cfg.window)
        cut = int(len(windows) * (1 - cfg.calibration_split))
        if cut < 1 or cut == len(windows):
            raise DataError(f"{path}: too few normal rows for window {cfg.window}; record more or shrink --window")
        fit_parts.append(windows[:cut])
        calib_parts.append(windows[cut + cfg.window :] if len(windows) - cut > 2 * cfg.window else windows[cut:])
    fit, calib = np.concatenate(fit_parts), np.concatenate(calib_parts)
    rows = np.concatenate([t.values for t in tables])
    mean, std = rows.mean(axis=0), rows.std(axis=0)
    std = np.where(std > 1e-9 * np.maximum(1.0, np.abs(mean)), std, 1.0)  # constant channels: no scaling
    log.info(
        "%d channels (%s), %d training and %d calibration windows of %d readings",
        len(first.columns),
        ", ".join(first.columns),
        len(fit),
        len(calib),
        cfg.window,
    )

    keras.utils.set_random_seed(cfg.seed)
    autoencoder, scorer = dense_autoencoder(cfg.window, mean, std)
    autoencoder.compile(optimizer=keras.optimizers.Adam(cfg.learning_rate), loss="mse")
    fit_n, calib_n = (fit - mean) / std, (calib - mean) / std
    autoencoder.fit(
        fit_n,
        fit_n,
        validation_data=(calib_n, calib_n),
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        verbose=2,
        callbacks=[keras.callbacks.EarlyStopping(patience=cfg.patience, restore_best_weights=True)],
    )
    spec = SensorSpec(channels=first.columns, window=cfg.window, mean=mean.tolist(), std=std.tolist())
    manifest = new_manifest(
        name=cfg.name or paths[0].stem,
        version=cfg.version,
        task="anomaly",
        input=spec,
        threshold=0.0,
        score="mean_squared_error",
    )
    manifest.metrics.update({"train_windows": len(fit), "calibration_windows": len(calib)})

    def score(lite) -> dict[str, float]:
        errors = predict_all(lite, calib.astype(np.float32)).mean(axis=1)
        manifest.threshold = float(np.quantile(errors, cfg.threshold_quantile) * cfg.threshold_margin)
        return {
            "calibration_error_median": float(np.median(errors)),
            "calibration_false_alarm_rate": float(np.mean(errors > manifest.threshold)),
        }

    return export_bundle(out, scorer, manifest, calib, score)
