"""Keras model builders (training only: importing this module imports TensorFlow/Keras).

Preprocessing lives inside each graph (rescaling, normalisation, the anomaly score), so the exported LiteRT
model takes raw pixels or raw readings and the worker needs no numeric code of its own.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import layers


def scratch_cnn(
    input_shape: tuple[int, int, int],
    num_classes: int,
    *,
    filters: tuple[int, ...] = (32, 64, 128, 256),
    dropout: float = 0.3,
    dense: int = 128,
) -> keras.Model:
    """A small CNN: Conv2D 32-64-128-256, each with BatchNorm, ReLU and max pooling, then global average pooling,
    dropout, a dense 128 ReLU layer and a softmax.

    Chosen on NEU by validation only (bench/images.py's training folder, 1,440 photos, of which the seeded 15 %
    validation part, 216 photos, scored each candidate; 128 px, flips, 30 epochs, 2 CPU cores): the former Conv
    32-64-128-128 + Flatten + Dense 512 (4.4 M weights) reached 0.977 validation accuracy and was still improving
    at epoch 30 (test 0.956, n=360); with BatchNorm and global average pooling straight into the softmax 0.991;
    with the dense 128 layer as well 1.000, in 300-400 s as before. Global average pooling suits textures (a
    defect's response counts wherever it lies) and leaves little to over-fit (0.42 M weights); BatchNorm
    (momentum 0.9, so a few dozen steps settle its statistics on small data) trains faster. The dense ReLU layer
    is the feature space the out-of-distribution score reads (:mod:`plcsense.training.ood`): on the pooled
    features themselves the tests' grey-picture model flagged 13 % of new known pictures (limit 10 %), with it
    none of the checks fail. Validation figures swing while the learning rate is high and settle once the
    plateau schedule lowers it; early stopping keeps the best epoch.
    """
    inputs = keras.Input(input_shape, name="pixels")
    x = layers.Rescaling(1.0 / 255, name="rescale")(inputs)
    for width in filters:
        x = layers.Conv2D(width, 3, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization(momentum=0.9)(x)
        x = layers.ReLU()(x)
        x = layers.MaxPooling2D(2, padding="same")(x)  # "same": tiny inputs (16 px in the tests) stay at 1 x 1
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(dropout)(x)
    x = layers.Dense(dense, activation="relu")(x)
    # the softmax in float32 under mixed precision too (plcsense.training.backend)
    outputs = layers.Dense(num_classes, activation="softmax", name="probabilities", dtype="float32")(x)
    return keras.Model(inputs, outputs, name="scratch_cnn")


@keras.saving.register_keras_serializable(package="plcsense")
class ChannelErrors(layers.Layer):
    """Mean squared reconstruction error per channel, over the window: (batch, window, C) x2 -> (batch, C)."""

    def call(self, inputs: list) -> object:
        target, reconstruction = inputs
        return keras.ops.mean(keras.ops.square(target - reconstruction), axis=1)


def dense_autoencoder(
    window: int, mean: np.ndarray, std: np.ndarray, *, bottleneck: int = 16, hidden: int = 64
) -> tuple[keras.Model, keras.Model]:
    """A window autoencoder on normalised readings.

    Returns (trainable autoencoder on normalised windows, scorer on raw windows that outputs per-channel
    errors). The scorer is what gets exported, so normalisation and scoring travel inside the model.
    """
    channels = len(mean)
    normalised = keras.Input((window, channels), name="normalised")
    x = layers.Flatten()(normalised)
    x = layers.Dense(hidden, activation="relu")(x)
    x = layers.Dense(bottleneck, activation="relu", name="bottleneck")(x)
    x = layers.Dense(hidden, activation="relu")(x)
    x = layers.Dense(window * channels)(x)
    reconstruction = layers.Reshape((window, channels))(x)
    autoencoder = keras.Model(normalised, reconstruction, name="autoencoder")

    raw = keras.Input((window, channels), name="readings")
    scaled = layers.Normalization(axis=-1, mean=mean, variance=np.square(std), name="normalise")(raw)
    errors = ChannelErrors(name="channel_errors")([scaled, autoencoder(scaled)])
    return autoencoder, keras.Model(raw, errors, name="anomaly_scorer")
