"""Keras model builders (training only: importing this module imports TensorFlow/Keras).

Preprocessing lives inside each graph (rescaling, normalisation, the anomaly score), so the exported LiteRT
model takes raw pixels or raw readings and the worker needs no numeric code of its own.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import layers


def scratch_cnn(input_shape: tuple[int, int, int], num_classes: int, *, dropout: float = 0.5) -> keras.Model:
    """The classic small CNN: Conv2D 32-64-128-128 with max pooling, dropout, dense 512, softmax."""
    inputs = keras.Input(input_shape, name="pixels")
    x = layers.Rescaling(1.0 / 255, name="rescale")(inputs)
    for filters in (32, 64, 128, 128):
        x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = layers.MaxPooling2D(2)(x)
    x = layers.Flatten()(x)
    x = layers.Dropout(dropout)(x)
    x = layers.Dense(512, activation="relu")(x)
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
