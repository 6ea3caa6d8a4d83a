"""Sensor-tensor classification (`plcsense train sensors`, classification task): a 1-D CNN per machine cycle.

The data layout mirrors images: ``DATA_DIR/<class>/*.csv``, one CSV per sample, rows = time steps, columns =
channels, a header naming the channels. Every sample must have the same length and the same channels; the
exported model takes the raw (time steps, channels) float32 tensor and outputs class probabilities, with the
per-channel normalisation inside the graph.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
from keras import layers

from plcsense.models.bundle import Bundle, Quantize, SensorSpec, new_manifest
from plcsense.models.runtime import predict_all
from plcsense.training.data import DataError, load_sensor_folder
from plcsense.training.evaluate import classification_scores
from plcsense.training.export import Quantization, check_output_dir, export_bundle
from plcsense.training.fitting import fit_keeping_best
from plcsense.training.report import classification_report_files
from plcsense.training.splits import balanced_class_weights, split_indices

log = logging.getLogger("plcsense.training")


@dataclass
class SensorClassifyConfig:
    columns: list[str] | None = None
    """Channels to use (default: every numeric column of the first file; all files must then have the same)."""
    epochs: int = 150
    batch_size: int = 32
    learning_rate: float = 1e-3
    seed: int = 42
    val_split: float = 0.15
    test_split: float = 0.15
    patience: int = 25
    """Early stopping: epochs without a better validation loss before training stops (best weights kept)."""
    lr_patience: int = 8
    """Halve the learning rate after this many epochs without a better validation loss."""
    class_weights: bool = True
    """Weight the loss by inverse class frequency so a rare condition is not drowned by the common one."""
    tensorboard: Path | None = None
    quantize: Quantize = "none"
    """Exported model: float32 (none), float16 weights, or full int8 (refused if top-1 agreement is too low)."""
    min_agreement: float = 0.98
    name: str | None = None
    version: str = "1"


def channel_stats(inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation over every sample and time step; constant channels get std 1."""
    flat = inputs.reshape(-1, inputs.shape[-1]).astype(np.float64)
    mean, std = flat.mean(axis=0), flat.std(axis=0)
    std = np.where(std > 1e-9 * np.maximum(1.0, np.abs(mean)), std, 1.0)
    return mean, std


def cnn1d(
    window: int,
    mean: np.ndarray,
    std: np.ndarray,
    num_classes: int,
    *,
    filters: tuple[int, ...] = (64, 128, 64),
    kernels: tuple[int, ...] = (7, 5, 3),
    dropout: float = 0.3,
) -> keras.Model:
    """A fully convolutional 1-D classifier on raw (window, channels) readings.

    Normalisation (per channel) -> Conv1D + batch norm + ReLU blocks -> global average pooling -> dropout ->
    softmax. Global pooling makes the head independent of the window length and keeps the model small.
    """
    channels = len(mean)
    inputs = keras.Input((window, channels), name="readings")
    x = layers.Normalization(axis=-1, mean=np.asarray(mean), variance=np.square(std), name="normalise")(inputs)
    for i, (f, k) in enumerate(zip(filters, kernels, strict=True)):
        x = layers.Conv1D(f, k, padding="same", use_bias=False, name=f"conv{i + 1}")(x)
        x = layers.BatchNormalization(name=f"bn{i + 1}")(x)
        x = layers.Activation("relu", name=f"relu{i + 1}")(x)
    x = layers.GlobalAveragePooling1D(name="pool")(x)
    x = layers.Dropout(dropout, name="dropout")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="cnn1d")


def train_sensor_classifier(data_dir: Path, out: Path, cfg: SensorClassifyConfig) -> Bundle:
    """Train a :func:`cnn1d` on ``data_dir/<class>/*.csv`` and export a verified bundle to ``out``.

    Seeded stratified train/validation/test split; normalisation statistics from the training samples only;
    class weights; learning-rate halving on plateaus and early stopping on validation loss with the best
    weights restored (Ctrl-C does the same and exports). The manifest's test figures and the ``report/``
    (confusion matrix, per-class precision/recall, training curves) are measured with the exported LiteRT model.
    """
    check_output_dir(out)
    data = load_sensor_folder(data_dir, columns=cfg.columns)
    if len(data.classes) < 2:
        raise DataError(f"{data_dir} has one class folder ({data.classes[0]}); a classifier needs at least two")
    train, val, test = split_indices(data.labels, cfg.val_split, cfg.test_split, cfg.seed)
    if not len(train) or not len(val):
        raise DataError(
            f"{data_dir}: {len(data.labels)} samples leave no training or validation set; add samples or "
            "change the validation split"
        )
    counts = np.bincount(data.labels, minlength=len(data.classes))
    log.info(
        "%d samples of %d x %d (%s), %d classes (%s); split %d/%d/%d",
        len(data.labels),
        data.window,
        len(data.channels),
        ", ".join(data.channels),
        len(data.classes),
        ", ".join(f"{c} {n}" for c, n in zip(data.classes, counts, strict=True)),
        len(train),
        len(val),
        len(test),
    )
    mean, std = channel_stats(data.inputs[train])

    keras.utils.set_random_seed(cfg.seed)
    model = cnn1d(data.window, mean, std, len(data.classes))
    model.compile(
        optimizer=keras.optimizers.Adam(cfg.learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    early = keras.callbacks.EarlyStopping(patience=cfg.patience, restore_best_weights=True)
    callbacks = [
        keras.callbacks.ReduceLROnPlateau(factor=0.5, patience=cfg.lr_patience, min_lr=1e-5),
        early,
        keras.callbacks.History(),
    ]
    if cfg.tensorboard:
        callbacks.append(keras.callbacks.TensorBoard(log_dir=str(cfg.tensorboard)))
    interrupted = False
    class_weight = balanced_class_weights(data.labels[train], len(data.classes)) if cfg.class_weights else None
    try:
        fit_keeping_best(
            model,
            (data.inputs[train], data.labels[train]),
            (data.inputs[val], data.labels[val]),
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
            callbacks=callbacks,
            class_weight=class_weight,
        )
    except KeyboardInterrupt:
        interrupted = True
    history = {k: [float(v) for v in vs] for k, vs in callbacks[2].history.items() if k != "learning_rate"}

    spec = SensorSpec(channels=data.channels, window=data.window, mean=mean.tolist(), std=std.tolist())
    manifest = new_manifest(
        name=cfg.name or data_dir.resolve().name,
        version=cfg.version,
        task="classification",
        input=spec,
        labels=data.classes,
    )
    manifest.metrics.update({"train_samples": len(train), "val_samples": len(val), "test_samples": len(test)})
    if interrupted:
        manifest.metrics["interrupted"] = 1.0
    held_out = test if len(test) else val

    def score(lite) -> dict[str, float]:
        scores = classification_scores(predict_all(lite, data.inputs[held_out]), data.labels[held_out])
        return {"test_accuracy": scores["accuracy"], "test_loss": scores["loss"]}

    def report(lite, folder: Path) -> None:
        probabilities = predict_all(lite, data.inputs[held_out])
        classification_report_files(folder, probabilities, data.labels[held_out], data.classes, history=history)

    quantization = Quantization(cfg.quantize, data.inputs[train], cfg.min_agreement)  # export samples it at random
    return export_bundle(out, model, manifest, data.inputs[held_out], score, quantization=quantization, report=report)
