"""``plcsense evaluate``: scores computed with the exported LiteRT model, the one the worker runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, log_loss

from plcsense.models.bundle import Bundle, ImageSpec, SensorSpec, split_outputs
from plcsense.models.runtime import predict_all
from plcsense.training.anomaly_eval import evaluate_anomaly
from plcsense.training.data import DataError, load_image_folder, load_sensor_folder


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


def classifier_summary(bundle: Bundle, inputs: np.ndarray, labels: np.ndarray) -> dict:
    """:func:`classification_summary` of a classifier bundle's LiteRT model on ``inputs``, plus ``unknown``: the
    share of inputs its ood score flags (bundles with ``ood`` only)."""
    manifest = bundle.manifest
    assert manifest.labels is not None
    probabilities, ood = split_outputs(manifest, predict_all(bundle.model, inputs))
    summary = classification_summary(probabilities, labels, manifest.labels)
    if ood is not None and manifest.ood is not None:
        summary["unknown"] = float(np.mean(ood > manifest.ood.threshold))
    return summary


def evaluate_sensor_folder(bundle: Bundle, data_dir: Path) -> dict:
    """Scores of a sensor classification bundle's LiteRT model on ``data_dir/<class>/*.csv``.

    Returns ``n``, ``accuracy``, ``loss``, per-class ``precision``/``recall``/``support`` (dicts keyed by label)
    and ``confusion_matrix`` (rows: true label, columns: predicted, in ``labels`` order), and ``unknown`` (the
    share flagged by the ood score) for bundles that have one.
    """
    manifest = bundle.manifest
    spec = manifest.input
    if manifest.task != "classification" or not isinstance(spec, SensorSpec) or not manifest.labels:
        raise DataError(f"bundle {bundle.path} is not a sensor classification model ({manifest.task})")
    data = load_sensor_folder(data_dir, columns=spec.channels, classes=manifest.labels, window=spec.window)
    return classifier_summary(bundle, data.inputs, data.labels)


def evaluate(bundle: Bundle, data: Path, *, label_column: str = "anomaly") -> dict[str, float]:
    """Scores for one folder of class folders (classification) or one CSV file / folder of CSVs (anomaly)."""
    manifest = bundle.manifest
    if manifest.task == "classification" and isinstance(manifest.input, SensorSpec):
        return evaluate_sensor_folder(bundle, data)
    if manifest.task == "classification":
        assert isinstance(manifest.input, ImageSpec) and manifest.labels
        images = load_image_folder(data, manifest.input, classes=manifest.labels)
        return classifier_summary(bundle, images.images, images.labels)
    return evaluate_anomaly(bundle, data, label_column=label_column)[0]


def format_table(rows: dict[str, dict[str, float]]) -> str:
    keys = list(dict.fromkeys(k for row in rows.values() for k, v in row.items() if isinstance(v, (int, float))))
    width = max(len("data"), *(len(name) for name in rows))
    lines = ["  ".join([f"{'data':<{width}}", *(f"{k:>10}" for k in keys)])]
    for name, row in rows.items():
        cells = [f"{row[k]:>10.4f}" if isinstance(row.get(k), float) else f"{row.get(k, ''):>10}" for k in keys]
        lines.append("  ".join([f"{name:<{width}}", *cells]))
    return "\n".join(lines)
