"""``plcsense evaluate``: scores computed with the exported LiteRT model, the one the worker runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, log_loss, precision_score, recall_score

from plcsense.models.bundle import Bundle, ImageSpec, SensorSpec
from plcsense.models.runtime import LiteRTModel
from plcsense.training.data import DataError, load_image_folder, read_sensor_csv, sliding_windows

BATCH = 64


def predict_all(model: LiteRTModel, inputs: np.ndarray) -> np.ndarray:
    return np.concatenate([model.predict(inputs[i : i + BATCH]) for i in range(0, len(inputs), BATCH)])


def _normalised(probabilities: np.ndarray) -> np.ndarray:
    clipped = np.clip(probabilities.astype(np.float64), 1e-7, 1)
    return clipped / clipped.sum(axis=1, keepdims=True)


def classification_scores(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    classes = np.arange(probabilities.shape[1])
    return {
        "n": len(labels),
        "accuracy": float(accuracy_score(labels, probabilities.argmax(axis=1))),
        # int8 outputs are quantised: renormalise so they are a distribution again before the log loss
        "loss": float(log_loss(labels, _normalised(probabilities), labels=classes)),
    }


def classification_summary(probabilities: np.ndarray, labels: np.ndarray, names: list[str]) -> dict:
    """``classification_scores`` plus per-class precision/recall/support and the confusion matrix (rows: truth)."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    predicted = probabilities.argmax(axis=1)
    index = list(range(len(names)))
    precision, recall, _, support = precision_recall_fscore_support(labels, predicted, labels=index, zero_division=0)
    return {
        **classification_scores(probabilities, labels),
        "labels": list(names),
        "precision": {c: float(p) for c, p in zip(names, precision, strict=True)},
        "recall": {c: float(r) for c, r in zip(names, recall, strict=True)},
        "support": {c: int(n) for c, n in zip(names, support, strict=True)},
        "confusion_matrix": confusion_matrix(labels, predicted, labels=index).tolist(),
    }


def anomaly_scores(bundle: Bundle, paths: list[Path], label_column: str) -> dict[str, float]:
    spec = bundle.manifest.input
    assert isinstance(spec, SensorSpec) and bundle.manifest.threshold is not None
    scores, labels, have_labels = [], [], True
    for path in paths:
        table = read_sensor_csv(path, columns=spec.channels, label_column=label_column)
        windows = sliding_windows(table.values, spec.window).astype(np.float32)
        scores.append(predict_all(bundle.model, windows).mean(axis=1))
        if table.labels is None:
            have_labels = False
        else:
            labels.append(table.labels[spec.window - 1 :])  # a window is judged by its newest reading
    score = np.concatenate(scores)
    predicted = score > bundle.manifest.threshold
    result: dict[str, float] = {
        "n": len(score),
        "anomalies": int(predicted.sum()),
        "anomaly_rate": float(predicted.mean()),
    }
    if have_labels:
        truth = np.concatenate(labels)
        result |= {
            "f1": float(f1_score(truth, predicted, zero_division=0)),
            "precision": float(precision_score(truth, predicted, zero_division=0)),
            "recall": float(recall_score(truth, predicted, zero_division=0)),
        }
    return result


def evaluate(bundle: Bundle, data: Path, *, label_column: str = "anomaly") -> dict[str, float]:
    """Scores for one folder of class folders (classification) or one CSV file / folder of CSVs (anomaly)."""
    manifest = bundle.manifest
    if manifest.task == "classification" and isinstance(manifest.input, SensorSpec):
        from plcsense.training.sensor_classify import evaluate_sensor_folder

        return evaluate_sensor_folder(bundle, data)
    if manifest.task == "classification":
        assert isinstance(manifest.input, ImageSpec) and manifest.labels
        images = load_image_folder(data, manifest.input, classes=manifest.labels)
        return classification_summary(predict_all(bundle.model, images.images), images.labels, manifest.labels)
    paths = sorted(data.rglob("*.csv")) if data.is_dir() else [data]
    if not paths:
        raise DataError(f"no CSV files under {data}")
    return anomaly_scores(bundle, paths, label_column)


def format_table(rows: dict[str, dict[str, float]]) -> str:
    keys = list(dict.fromkeys(k for row in rows.values() for k, v in row.items() if isinstance(v, (int, float))))
    width = max(len("data"), *(len(name) for name in rows))
    lines = ["  ".join([f"{'data':<{width}}", *(f"{k:>10}" for k in keys)])]
    for name, row in rows.items():
        cells = [f"{row[k]:>10.4f}" if isinstance(row.get(k), float) else f"{row.get(k, ''):>10}" for k in keys]
        lines.append("  ".join([f"{name:<{width}}", *cells]))
    return "\n".join(lines)
