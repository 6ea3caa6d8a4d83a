"""Sensor-tensor classification (`plcsense train sensors`, classification task): a 1-D CNN per machine cycle.

The data layout mirrors images: ``DATA_DIR/<class>/*.csv``, one CSV per sample, rows = time steps, columns =
channels, a header naming the channels. Every sample must have the same length and the same channels; the
exported model takes the raw (time steps, channels) float32 tensor and outputs class probabilities, with the
per-channel normalisation inside the graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
from keras import layers

from plcsense.models.bundle import Bundle, SensorSpec
from plcsense.training.classifier import ClassifierConfig, ClassifierRun, Schedule, Splits
from plcsense.training.data import channel_stats, load_sensor_folder
from plcsense.training.export import check_output_dir


@dataclass
class SensorClassifyConfig(ClassifierConfig):
    columns: list[str] | None = None
    """Channels to use (default: every numeric column of the first file; all files must then have the same)."""
    epochs: int = 150
    patience: int = 25
    """Early stopping: epochs without a better validation loss before training stops (best weights kept)."""
    lr_patience: int = 8
    """Halve the learning rate after this many epochs without a better validation loss."""


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
    # the softmax in float32 under mixed precision too (plcsense.training.backend)
    outputs = layers.Dense(num_classes, activation="softmax", name="probabilities", dtype="float32")(x)
    return keras.Model(inputs, outputs, name="cnn1d")


def train_sensor_classifier(data_dir: Path, out: Path, cfg: SensorClassifyConfig) -> Bundle:
    """Train a :func:`cnn1d` on ``data_dir/<class>/*.csv`` and export a verified bundle to ``out``.

    Seeded stratified train/validation/test split; normalisation statistics from the training samples only;
    the rest (class weights, learning-rate halving on plateaus, early stopping, Ctrl-C, the LiteRT-measured
    test figures and ``report/``) is the shared :class:`~plcsense.training.classifier.ClassifierRun`.
    """
    check_output_dir(out)
    data = load_sensor_folder(data_dir, columns=cfg.columns)
    splits = Splits.seeded(data.inputs, data.labels, data.classes, cfg)
    schedule = Schedule(patience=cfg.patience, lr_factor=0.5, lr_patience=cfg.lr_patience, min_lr=1e-5)
    describe = f"{data.window} x {len(data.channels)} readings ({', '.join(data.channels)})"
    run = ClassifierRun(data_dir, cfg, splits, schedule, describe=describe)
    mean, std = channel_stats(splits.train[0])
    model = run.compile(cnn1d(data.window, mean, std, len(data.classes)), cfg.learning_rate)
    with run.interruptible():
        run.fit(model, splits.train, splits.val, cfg.epochs)
    spec = SensorSpec(channels=data.channels, window=data.window, mean=mean.tolist(), std=std.tolist())
    return run.export(out, model, spec)
