"""One Keras training phase as both classifiers' trainers run it."""

from __future__ import annotations

import logging
import sys

import keras
import numpy as np

log = logging.getLogger("plcsense.training")


def fit_keeping_best(
    model: keras.Model,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    *,
    epochs: int,
    batch_size: int,
    callbacks: list[keras.callbacks.Callback],
    class_weight: dict[int, float] | None,
) -> dict[str, list[float]]:
    """Fit and return the history; Ctrl-C restores the best weights EarlyStopping saw, then re-raises."""
    early = next(c for c in callbacks if isinstance(c, keras.callbacks.EarlyStopping))
    try:
        history = model.fit(
            train[0],
            train[1],
            validation_data=val,
            epochs=epochs,
            batch_size=batch_size,
            callbacks=callbacks,
            class_weight=class_weight,
            verbose=1 if sys.stdout.isatty() else 2,
        )
        return history.history
    except KeyboardInterrupt:
        if early.best_weights is not None:
            model.set_weights(early.best_weights)
        log.warning("training interrupted: exporting the best model so far")
        raise
