"""Anomaly bundles judged on labelled sensor files row by row, as the worker judges readings when they arrive.

A row's verdict is the bundle's verdict on the window that ends at that row, so the rows before the first full
window have none. Over the rows that have one: F1, the false alarm rate FAR = FP / (FP + TN) (normal rows
flagged) and the missed alarm rate MAR = FN / (FN + TP) (anomalous rows not flagged), the figures the SKAB
benchmark reports, side by side, because a detector is only as good as the alarms an operator will trust.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score, precision_score, recall_score

from plcsense.models.bundle import Bundle, SensorSpec
from plcsense.models.runtime import predict_all
from plcsense.training.data import DataError, SensorTable, read_sensor_csv, sliding_windows

log = logging.getLogger("plcsense.training")

PREDICTION_COLUMNS = ("file", "row", "timestamp", "score", "predicted", "label")


@dataclass
class RowVerdicts:
    """One file's verdicts on its rows ``first``, ``first + 1``, ... (0 = the first data row)."""

    file: str
    first: int
    scores: np.ndarray  # (n,) the anomaly score: mean per-channel error of the window ending at the row
    predicted: np.ndarray  # (n,) bool: score above the bundle's threshold
    labels: np.ndarray | None  # (n,) bool, when the file has the label column
    times: list[str] | None  # (n,) the rows' time stamps, when the file has a time column


def judge_rows(bundle: Bundle, table: SensorTable, file: str, *, start: int = 0) -> RowVerdicts:
    """Verdicts of ``bundle``'s LiteRT model for the rows of ``table`` from ``start`` on.

    Rows before ``start`` serve only as history for the first windows (e.g. the part a detector was fitted on).
    """
    spec, threshold = bundle.manifest.input, bundle.manifest.threshold
    if bundle.manifest.task != "anomaly" or not isinstance(spec, SensorSpec) or threshold is None:
        raise DataError(f"bundle {bundle.path} is not a sensor anomaly detector ({bundle.manifest.task})")
    missing = [c for c in spec.channels if c not in table.columns]
    if missing:
        raise DataError(f"{file}: no column(s) {missing} that the model reads")
    first = max(start, spec.window - 1)
    values = table.values[first - spec.window + 1 :, [table.columns.index(c) for c in spec.channels]]
    if len(table.values) > first:
        scores = predict_all(bundle.model, sliding_windows(values.astype(np.float32), spec.window)).mean(axis=1)
    else:
        scores = np.zeros(0, np.float32)
    return RowVerdicts(
        file=file,
        first=first,
        scores=scores,
        predicted=scores > threshold,
        labels=None if table.labels is None else table.labels[first:] > 0,
        times=None if table.times is None else table.times[first:],
    )


def alarm_scores(labels: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """F1, FAR and MAR (and precision, recall) of row predictions against 0/1 labels."""
    tn, fp, fn, tp = (int(n) for n in confusion_matrix(labels, predicted, labels=[False, True]).ravel())
    return {
        "f1": float(f1_score(labels, predicted, zero_division=0)),
        "far": fp / (fp + tn) if fp + tn else 0.0,
        "mar": fn / (fn + tp) if fn + tp else 0.0,
        "precision": float(precision_score(labels, predicted, zero_division=0)),
        "recall": float(recall_score(labels, predicted, zero_division=0)),
    }


def summarise(verdicts: list[RowVerdicts]) -> dict[str, float]:
    """Pooled over every judged row: how many, how many flagged, and the alarm scores when all rows are labelled."""
    predicted = np.concatenate([v.predicted for v in verdicts]) if verdicts else np.zeros(0, bool)
    result: dict[str, float] = {
        "n": len(predicted),
        "anomalies": int(predicted.sum()),
        "anomaly_rate": float(predicted.mean()) if len(predicted) else 0.0,
    }
    if len(predicted) and all(v.labels is not None for v in verdicts):  # no judged row: nothing to score
        result |= alarm_scores(np.concatenate([v.labels for v in verdicts]), predicted)  # type: ignore[misc]
    return result


def sensor_files(data: Path) -> list[Path]:
    """``data`` itself, or every CSV below it."""
    paths = sorted(data.rglob("*.csv")) if data.is_dir() else [data]
    if not paths:
        raise DataError(f"no CSV files under {data}")
    return paths


def evaluate_anomaly(bundle: Bundle, data: Path, *, label_column: str = "anomaly") -> tuple[dict, list[RowVerdicts]]:
    """Pooled figures and per-file verdicts of an anomaly bundle on one CSV file or a folder of them."""
    spec = bundle.manifest.input
    assert isinstance(spec, SensorSpec)
    verdicts = [
        judge_rows(bundle, read_sensor_csv(path, columns=spec.channels, label_column=label_column), str(path))
        for path in sensor_files(data)
    ]
    short = [v.file for v in verdicts if not len(v.scores)]
    if short:
        log.warning("%d file(s) shorter than the model's window of %d rows, not judged: %s", len(short), spec.window,
                    ", ".join(short[:5]))  # fmt: skip
    return summarise(verdicts), verdicts


def write_predictions(path: Path, verdicts: list[RowVerdicts]) -> int:
    """One CSV line per judged row (columns ``PREDICTION_COLUMNS``; empty where unknown); returns the row count."""
    written = 0
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(PREDICTION_COLUMNS)
        for v in verdicts:
            for i, (score, flagged) in enumerate(zip(v.scores, v.predicted, strict=True)):
                writer.writerow(
                    [
                        v.file,
                        v.first + i,
                        "" if v.times is None else v.times[i],
                        f"{float(score):.6g}",
                        int(flagged),
                        "" if v.labels is None else int(v.labels[i]),
                    ]
                )
            written += len(v.scores)
    return written
