"""Which Keras backend and device a training run uses, the precision it trains in, and what needs TensorFlow.

Training is plain Keras 3, so it runs on any backend ``KERAS_BACKEND`` names (``tensorflow``, the default, or
``jax``; ``torch`` where PyTorch is installed). A run logs its backend and device, and on a GPU trains in mixed
precision: bfloat16 from compute capability 8.0 (Ampere, Hopper; no loss scaling needed), float16 with loss
scaling on 7.x (Volta, Turing), float32 on a CPU or an older GPU, where reduced precision is slower, not faster.
``PLCSENSE_PRECISION`` overrides the choice. Whatever the run trained in, the exported model is float32
(:func:`as_float32`): the worker's LiteRT path and its golden samples never depend on the training device.

Two pieces need TensorFlow whatever the backend: the LiteRT converter and TensorBoard's event writer. On another
backend the converter runs in a TensorFlow process of its own (:func:`convert_elsewhere`), which loads the
saved ``.keras`` model, so a model trained with JAX on a GPU becomes the same bundle as one trained on a CPU.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

log = logging.getLogger("plcsense.training")

PRECISION_ENV = "PLCSENSE_PRECISION"
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
CONVERTER_MODULE = "plcsense.training.tfconvert"
"""Run with ``python -m`` under ``KERAS_BACKEND=tensorflow``: loads a ``.keras`` model, writes its LiteRT model."""


class BackendError(RuntimeError):
    """A backend, device or precision that cannot be used as asked; the message says what to do instead."""


@dataclass(frozen=True)
class Device:
    """The device Keras computes on: ``gpu`` or ``cpu``, its name, and a GPU's compute capability."""

    kind: str
    name: str
    compute_capability: tuple[int, int] | None = None

    def __str__(self) -> str:
        if self.kind != "gpu":
            return "CPU"
        if self.compute_capability is None:
            return f"GPU {self.name}"
        return f"GPU {self.name} (compute capability {self.compute_capability[0]}.{self.compute_capability[1]})"


def _capability(text: object) -> tuple[int, int] | None:
    """``"9.0"``, ``(9, 0)`` or ``"sm_90"``-like values as (major, minor)."""
    if isinstance(text, tuple | list) and len(text) == 2:
        return int(text[0]), int(text[1])
    parts = str(text).replace("sm_", "").split(".")
    try:
        return (int(parts[0]), int(parts[1]) if len(parts) > 1 else 0) if text else None
    except ValueError:
        return None


def detect_device() -> Device:
    """The first accelerator the current Keras backend sees, else the CPU."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        gpus = [d for d in jax.devices() if d.platform == "gpu"]
        if gpus:
            return Device("gpu", gpus[0].device_kind, _capability(getattr(gpus[0], "compute_capability", None)))
    elif backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            details = tf.config.experimental.get_device_details(gpus[0])
            name = details.get("device_name", gpus[0].name)
            return Device("gpu", name, _capability(details.get("compute_capability")))
    elif backend == "torch":
        import torch

        if torch.cuda.is_available():
            return Device("gpu", torch.cuda.get_device_name(0), _capability(torch.cuda.get_device_capability(0)))
    return Device("cpu", "cpu")


def default_precision(device: Device) -> str:
    """Mixed precision where the device computes it natively and faster: see the module's docstring."""
    capability = device.compute_capability
    if device.kind != "gpu" or capability is None:
        return "float32"
    if capability >= (8, 0):
        return "mixed_bfloat16"
    return "mixed_float16" if capability >= (7, 0) else "float32"


@dataclass(frozen=True)
class Run:
    """What a training run computes on, as :func:`configure` set it up."""

    backend: str
    device: Device
    precision: str

    def record(self) -> dict[str, str]:
        return {"backend": self.backend, "device": str(self.device), "precision": self.precision}


def configure(precision: str | None = None) -> Run:
    """Set Keras' global dtype policy for this device and log the backend, device and precision.

    ``precision``: one of PRECISIONS; default ``PLCSENSE_PRECISION`` from the environment, else ``auto``. Call it
    before any model is built: layers take the policy in force when they are made.
    """
    choice = precision or os.environ.get(PRECISION_ENV) or "auto"
    if choice not in PRECISIONS:
        raise BackendError(f"{PRECISION_ENV}={choice!r}: choose one of {', '.join(PRECISIONS)}")
    device = detect_device()
    run = Run(keras.backend.backend(), device, default_precision(device) if choice == "auto" else choice)
    keras.mixed_precision.set_global_policy(run.precision)
    log.info("training on Keras backend %s, %s, precision %s", run.backend, run.device, run.precision)
    if run.device.kind == "cpu" and run.backend == "tensorflow" and _jax_gpu_plugin_installed():
        log.info("JAX with CUDA is installed: KERAS_BACKEND=jax trains on the GPU")
    return run


def _jax_gpu_plugin_installed() -> bool:
    return any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin"))


def _policy_name(node: dict) -> str | None:
    if node.get("class_name") in ("DTypePolicy", "FloatDTypePolicy") and isinstance(node.get("config"), dict):
        return node["config"].get("name")
    return None


def _float32_config(node: object) -> tuple[object, bool]:
    """The serialised model with every mixed dtype policy replaced by float32, and whether any was."""
    if isinstance(node, list):
        items = [_float32_config(v) for v in node]
        return [v for v, _ in items], any(c for _, c in items)
    if not isinstance(node, dict):
        return node, False
    name = _policy_name(node)
    if name is not None and name.startswith("mixed_"):
        return {**node, "config": {**node["config"], "name": "float32"}}, True
    items = {k: _float32_config(v) for k, v in node.items()}
    return {k: v for k, (v, _) in items.items()}, any(c for _, c in items.values())


def as_float32(model: keras.Model) -> keras.Model:
    """``model`` rebuilt with float32 layers and the same weights, or ``model`` itself when it already is.

    Mixed precision keeps its variables in float32 and computes in 16 bits; the copy computes everything in
    float32, which is what the LiteRT converter and the golden samples expect.
    """
    config, mixed = _float32_config(keras.saving.serialize_keras_object(model))
    if not mixed:
        return model
    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")  # for what the config leaves to it (the models themselves)
    try:
        copy = keras.saving.deserialize_keras_object(config)
    finally:
        keras.mixed_precision.set_global_policy(policy)
    copy.set_weights(model.get_weights())
    return copy


def tensorboard(log_dir: Path) -> keras.callbacks.Callback:
    """TensorBoard's callback; where TensorFlow (its event writer) is missing, the curves as CSV in ``log_dir``."""
    if importlib.util.find_spec("tensorflow") is not None:
        return keras.callbacks.TensorBoard(log_dir=str(log_dir))
    log_dir.mkdir(parents=True, exist_ok=True)
    log.warning("TensorBoard logs need TensorFlow, which is not installed: writing %s instead", log_dir / "log.csv")
    return keras.callbacks.CSVLogger(str(log_dir / "log.csv"))


def _custom_modules(model: keras.Model) -> list[str]:
    """plcsense modules whose layer classes ``model`` uses: the converter imports them to register the classes."""
    modules = set()
    stack: list[keras.layers.Layer] = [model]
    while stack:
        layer = stack.pop()
        if type(layer).__module__.startswith("plcsense."):
            modules.add(type(layer).__module__)
        stack.extend(getattr(layer, "layers", []))
    return sorted(modules)


def convert_elsewhere(model: keras.Model, mode: str, representative: np.ndarray | None) -> bytes:
    """The LiteRT flatbuffer of ``model`` made by a TensorFlow process, for models built on another backend.

    The model goes over as a ``.keras`` file, int8 calibration inputs as ``.npy``. Raises BackendError with the
    converter's own output when TensorFlow is missing or the conversion fails.
    """
    if importlib.util.find_spec("tensorflow") is None:
        raise BackendError(
            "exporting needs TensorFlow for the LiteRT converter: pip install 'plcsense[train]' beside this backend, "
            "or keep the .keras model and export it on a machine that has TensorFlow"
        )
    with tempfile.TemporaryDirectory(prefix="plcsense-convert-") as tmp:
        folder = Path(tmp)
        as_float32(model).save(folder / "model.keras")
        if representative is not None:
            np.save(folder / "representative.npy", np.asarray(representative, dtype=np.float32))
        request = {"mode": mode, "modules": _custom_modules(model)}
        (folder / "request.json").write_text(json.dumps(request))
        env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "2"}
        proc = subprocess.run(
            [sys.executable, "-m", CONVERTER_MODULE, str(folder)], env=env, capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise BackendError(f"the LiteRT conversion in TensorFlow failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
        return (folder / "model.tflite").read_bytes()
