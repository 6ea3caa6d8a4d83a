"""Export a trained Keras model as a verified model bundle (LiteRT model, golden samples, manifest, report)."""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import shutil
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from plcsense.models.bundle import (
    GOLDEN_FILE,
    MODEL_FILE,
    Bundle,
    Manifest,
    Quantize,
    load_bundle,
    split_outputs,
    write_manifest,
)
from plcsense.models.runtime import LiteRTModel, predict_all
from plcsense.quiet import CONVERTER, LITERT_STARTUP, without_lines
from plcsense.training.backend import as_float32, convert_elsewhere

log = logging.getLogger("plcsense.training")

GOLDEN_SAMPLES = 3
REPRESENTATIVE_SAMPLES = 200


class ExportError(RuntimeError):
    """An export that must not ship, e.g. a quantised model that disagrees with the float one."""


@dataclass
class Quantization:
    mode: Quantize = "none"
    representative: np.ndarray | None = None
    """Training inputs that calibrate int8 ranges (full-integer quantisation)."""
    min_agreement: float = 0.98
    """Fraction of held-out inputs where the quantised model's top-1 must equal the float model's."""


def calibration_samples(q: Quantization) -> np.ndarray:
    """The inputs that calibrate int8 ranges: a seeded random sample of the representative training inputs.

    Random, not the first ones: training arrays come sorted by class, and int8 ranges calibrated on the first
    classes alone clip the others. The sample of an array of at most REPRESENTATIVE_SAMPLES is that array.
    """
    if q.representative is None or not len(q.representative):
        raise ExportError("int8 quantisation needs representative training data")
    rng = np.random.default_rng(0)
    chosen = rng.choice(len(q.representative), min(REPRESENTATIVE_SAMPLES, len(q.representative)), replace=False)
    return q.representative[np.sort(chosen)].astype(np.float32)


def to_tflite(model: keras.Model, quantization: Quantization | None = None) -> bytes:
    """Convert to a LiteRT flatbuffer with float32 input/output and a resizable batch dimension.

    The model is converted in float32 whatever precision it trained in; on a Keras backend other than TensorFlow
    the conversion runs in a TensorFlow process of its own (:func:`~plcsense.training.backend.convert_elsewhere`).
    """
    model = as_float32(model)
    q = quantization or Quantization()
    samples = calibration_samples(q) if q.mode == "int8" else None
    if keras.backend.backend() != "tensorflow":
        return convert_elsewhere(model, q.mode, samples)
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if q.mode == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif q.mode == "int8":

        def representative() -> Iterator[list[np.ndarray]]:
            for sample in samples:
                yield [sample[None]]

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
    with (
        contextlib.redirect_stdout(io.StringIO()),  # Keras prints the whole SavedModel signature otherwise
        without_lines(CONVERTER),  # and the int8 converter its settings
        without_lines(LITERT_STARTUP),  # and the int8 debugger's interpreters theirs
        warnings.catch_warnings(),
    ):
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs were expected")  # by design
        warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated")  # the debugger's own use
        return converter.convert() if q.mode != "int8" else _selectively_quantized(tf, converter, samples)


SENSITIVE_ERROR = 0.7
"""A layer whose int8 output is off by more than this many quantisation steps (root mean square, measured by
TensorFlow's quantisation debugger on calibration inputs) stays float; every other layer is int8. Per-tensor
int8 of a classifier's logits or of the ood score's distances costs far more than the backbone's layers: keeping
the 3-6 layers above this (the ood score's sum and exp, the head's matrix product, at times a depthwise layer)
in float raised the int8 model's top-1 agreement with float on training photos outside the calibration sample
from 0.679 to 0.937 (pasted320, whole backbone fine-tuned) and from 0.995 to 1.000 (NEU, top quarter), for a
size within 1 %. 0.7 is the debugger guide's example cut."""
DEBUG_SAMPLES = 40


def _selectively_quantized(tf, converter, samples: np.ndarray) -> bytes:
    """Full-integer int8, except the layers whose quantisation error exceeds ``SENSITIVE_ERROR`` steps."""
    debug = samples[:DEBUG_SAMPLES]

    def dataset() -> Iterator[list[np.ndarray]]:
        for sample in debug:
            yield [sample[None]]

    debugger = tf.lite.experimental.QuantizationDebugger(converter=converter, debug_dataset=dataset)
    debugger.run()
    table = io.StringIO()
    debugger.layer_statistics_dump(table)
    table.seek(0)
    rows = list(csv.DictReader(table))
    steps = [math.sqrt(float(r["mean_squared_error"])) / float(r["scale"]) if float(r["scale"]) else 0.0 for r in rows]
    sensitive = [r["tensor_name"] for r, error in zip(rows, steps, strict=True) if error > SENSITIVE_ERROR]
    if not sensitive or len(sensitive) == len(rows):  # every layer: no int8 model is left to debug; all int8
        return debugger.get_nondebug_quantized_model()
    log.info("int8: %d layers stay float (error over %s steps): %s", len(sensitive), SENSITIVE_ERROR, sensitive)
    options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=sensitive)
    selective = tf.lite.experimental.QuantizationDebugger(
        converter=converter, debug_dataset=dataset, debug_options=options
    )
    return selective.get_nondebug_quantized_model()


def check_output_dir(out: Path) -> None:
    """Refuse to replace a directory that is not a bundle: ``--out ~`` must not wipe anyone's home."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "manifest.json").is_file())):
        raise FileExistsError(f"{out} exists and is not a model bundle; choose another --out")


def _top1_agreement(manifest: Manifest, a: LiteRTModel, b: LiteRTModel, inputs: np.ndarray) -> float:
    top1 = [split_outputs(manifest, predict_all(m, inputs))[0].argmax(axis=1) for m in (a, b)]
    return float(np.mean(top1[0] == top1[1]))


def export_bundle(
    out: Path,
    model: keras.Model,
    manifest: Manifest,
    golden_inputs: np.ndarray,
    score: Callable[[LiteRTModel], dict[str, float]],
    *,
    quantization: Quantization | None = None,
    report: Callable[[LiteRTModel, Path], None] | None = None,
    calibrate: Callable[[LiteRTModel], None] | None = None,
) -> Bundle:
    """Write the bundle beside ``out``, swap it in by renames, and load it back through the worker's checks.

    ``score`` measures a LiteRT model (not the Keras one) on held-out data; the figures of the exported variant
    go into the manifest's metrics, those of every variant into ``variants``, so the numbers a user reads are
    those of the model the worker runs. A quantised variant whose top-1 agrees with the float model on fewer
    than ``min_agreement`` of the held-out inputs (``golden_inputs``) is refused. ``report`` may write files into
    ``report/`` of the bundle. ``calibrate`` may set what the manifest takes from the model that ships, once it
    is chosen (a classifier's ood threshold).
    """
    out = Path(out)
    check_output_dir(out)
    model = as_float32(model)  # what ships computes in float32
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    q = quantization or Quantization()
    (staging / MODEL_FILE).write_bytes(to_tflite(model))
    with without_lines(LITERT_STARTUP):  # the process's first allocated interpreter announces its CPU delegate
        lite = LiteRTModel(staging / MODEL_FILE)
        float_scores = score(lite)
    manifest.variants = {"float32": float_scores}
    if q.mode != "none":
        candidate = staging / f"model.{q.mode}.tflite"
        candidate.write_bytes(to_tflite(model, q))
        quantised = LiteRTModel(candidate)
        agreement = _top1_agreement(manifest, lite, quantised, golden_inputs)  # cast batch by batch
        manifest.variants[q.mode] = {**score(quantised), "top1_agreement": agreement}
        if agreement < q.min_agreement:
            shutil.rmtree(staging, ignore_errors=True)
            raise ExportError(
                f"{q.mode} model agrees with the float model on {agreement:.1%} of held-out inputs, below the "
                f"required {q.min_agreement:.1%}; export with --quantize none or float16, or give more training data"
            )
        candidate.replace(staging / MODEL_FILE)
        lite = LiteRTModel(staging / MODEL_FILE)
    manifest.quantization = q.mode
    if calibrate is not None:
        calibrate(lite)
    manifest.metrics.update(manifest.variants[q.mode if q.mode != "none" else "float32"])
    inputs = golden_inputs[:GOLDEN_SAMPLES].astype(np.float32)
    np.savez(staging / GOLDEN_FILE, inputs=inputs, outputs=lite.predict(inputs))
    if report is not None:
        (staging / "report").mkdir()
        report(lite, staging / "report")
    model.save(staging / "model.keras")
    write_manifest(staging, manifest)
    previous = out.with_name(out.name + ".previous")
    shutil.rmtree(previous, ignore_errors=True)
    if out.exists():  # keep the old bundle until the new one is in place: never a moment with neither
        out.rename(previous)
    staging.rename(out)
    shutil.rmtree(previous, ignore_errors=True)
    return load_bundle(out)
