"""Deterministic, seeded train/validation/test splits."""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import train_test_split


def split_indices(labels: np.ndarray, val: float, test: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified when every class has enough samples, plain shuffled otherwise."""
    index = np.arange(len(labels))

    def split(idx: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
        if fraction <= 0:
            return idx, idx[:0]
        counts = np.bincount(labels[idx])
        stratify = labels[idx] if counts[counts > 0].min() >= 2 else None
        try:
            a, b = train_test_split(idx, test_size=fraction, random_state=seed, stratify=stratify)
        except ValueError:  # too few samples per class for a stratified split of this size
            a, b = train_test_split(idx, test_size=fraction, random_state=seed)
        return np.sort(a), np.sort(b)

    rest, test_idx = split(index, test)
    train_idx, val_idx = split(rest, val / (1 - test) if test < 1 else 0)
    return train_idx, val_idx, test_idx


def balanced_class_weights(labels: np.ndarray, num_classes: int) -> dict[int, float]:
    """Balanced weights (inverse class frequency) for the classes present; absent ones keep weight 1."""
    from sklearn.utils.class_weight import compute_class_weight

    present = np.unique(labels)
    weights = compute_class_weight("balanced", classes=present, y=labels)
    table = dict.fromkeys(range(num_classes), 1.0)
    table.update({int(c): float(w) for c, w in zip(present, weights, strict=True)})
    return table
