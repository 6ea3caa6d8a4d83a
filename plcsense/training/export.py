"""Export a trained Keras model as a verified model bundle (LiteRT model, golden samples, manifest)."""

from __future__ import annotations

import contextlib
import io
import shutil
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from plcsense.models.bundle import GOLDEN_FILE, MODEL_FILE, Bundle, Manifest, load_bundle, write_manifest
from plcsense.models.runtime import LiteRTModel

GOLDEN_SAMPLES = 3


def to_tflite(model: keras.Model) -> bytes:
    """Convert to a float32 LiteRT flatbuffer with a resizable batch dimension."""
    with contextlib.redirect_stdout(io.StringIO()):  # Keras prints the whole SavedModel signature otherwise
        return tf.lite.TFLiteConverter.from_keras_model(model).convert()


def check_output_dir(out: Path) -> None:
    """Refuse to replace a directory that is not a bundle: ``--out ~`` must not wipe anyone's home."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "manifest.json").is_file())):
        raise FileExistsError(f"{out} exists and is not a model bundle; choose another --out")


def export_bundle(
    out: Path,
    model: keras.Model,
    manifest: Manifest,
    golden_inputs: np.ndarray,
    score: Callable[[LiteRTModel], dict[str, float]],
) -> Bundle:
    """Write the bundle to ``out`` atomically and load it back through the same checks the worker runs.

    ``score`` measures the exported LiteRT model (not the Keras one) on held-out data; its figures go into
    the manifest, so the numbers a user reads are those of the model the worker will run.
    """
    out = Path(out)
    check_output_dir(out)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    (staging / MODEL_FILE).write_bytes(to_tflite(model))
    lite = LiteRTModel(staging / MODEL_FILE)
    manifest.metrics.update(score(lite))
    inputs = golden_inputs[:GOLDEN_SAMPLES].astype(np.float32)
    np.savez(staging / GOLDEN_FILE, inputs=inputs, outputs=lite.predict(inputs))
    model.save(staging / "model.keras")
    write_manifest(staging, manifest)
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return load_bundle(out)
