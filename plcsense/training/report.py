"""The evaluation report written into a bundle's ``report/``: figures a user can trust and pictures to check."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window: training runs on servers and in CI
import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import ConfusionMatrixDisplay, classification_report, confusion_matrix


def classification_report_files(
    out: Path,
    probabilities: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
    *,
    images: np.ndarray | None = None,
    history: dict[str, list[float]] | None = None,
    max_misclassified: int = 25,
    part: str = "test",
) -> dict:
    """Write metrics.json, confusion_matrix.{json,png}, training_curves.png, misclassified.png; return metrics.
    ``part`` names the photos scored in the figures' titles: ``test``, ``val`` or ``fit`` (photos it learnt from)."""
    predicted = probabilities.argmax(axis=1)
    index = list(range(len(classes)))
    report = classification_report(
        labels, predicted, labels=index, target_names=classes, output_dict=True, zero_division=0
    )
    matrix = confusion_matrix(labels, predicted, labels=index)
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "confusion_matrix.json").write_text(json.dumps({"labels": classes, "matrix": matrix.tolist()}) + "\n")

    size = max(4.0, 0.6 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay(matrix, display_labels=classes).plot(ax=ax, colorbar=False, xticks_rotation=45)
    ax.set_title(f"{part} accuracy {report['accuracy']:.4f} (n={len(labels)})")
    fig.tight_layout()
    fig.savefig(out / "confusion_matrix.png", dpi=100)
    plt.close(fig)

    if history:
        _training_curves(out / "training_curves.png", history)
    if images is not None:
        _misclassified(
            out / "misclassified.png", images, labels, predicted, probabilities, classes, max_misclassified, part
        )
    return report


def _training_curves(path: Path, history: dict[str, list[float]]) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        for key in (metric, f"val_{metric}"):
            if key in history:
                ax.plot(range(1, len(history[key]) + 1), history[key], label=key)
        if "phase_boundary" in history:
            ax.axvline(history["phase_boundary"][0] + 0.5, color="grey", linestyle=":", label="fine-tuning starts")
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _misclassified(
    path: Path,
    images: np.ndarray,
    labels: np.ndarray,
    predicted: np.ndarray,
    probabilities: np.ndarray,
    classes: list[str],
    limit: int,
    part: str,
) -> None:
    wrong = np.flatnonzero(predicted != labels)[:limit]
    cols = max(1, min(5, len(wrong)))
    rows = max(1, int(np.ceil(len(wrong) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    if not len(wrong):
        axes[0, 0].text(0.5, 0.5, f"no misclassified {part} images", ha="center", va="center")
    for ax, i in zip(axes.flat, wrong, strict=False):
        image = images[i].astype(np.uint8)
        ax.imshow(image.squeeze(-1) if image.shape[-1] == 1 else image, cmap="gray" if image.shape[-1] == 1 else None)
        ax.set_title(
            f"true {classes[labels[i]]}\npred {classes[predicted[i]]} {probabilities[i].max():.2f}", fontsize=8
        )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
