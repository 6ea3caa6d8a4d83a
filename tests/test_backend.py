"""Training on any Keras backend: a model trained with JAX becomes the same bundle; mixed precision exports float32.

The JAX run is a subprocess of its own: a process's Keras backend is fixed when Keras is first imported, and the
rest of the suite runs TensorFlow in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from plcsense.models.bundle import load_bundle
from plcsense.training.backend import BackendError, Device, as_float32, configure, default_precision
from tests.conftest import write_image_folder
from tests.test_sensor_classify import write_folder
from tests.test_training import assert_quiet

# Trains through the CLI (argv lists in argv[1]), then loads each bundle's model.keras on the same backend and
# saves its answers to the bundle's golden inputs as argv[2]/<bundle name>.npy; argv[2]/codes.json: exit codes.
JAX_RUN = """
import json, sys
from pathlib import Path
from plcsense.cli import main
runs, report = json.loads(sys.argv[1]), Path(sys.argv[2])
codes = [main(args) for args in runs]
import keras, numpy as np
for args in runs:
    out = Path(args[args.index("--out") + 1])
    model = keras.saving.load_model(out / "model.keras")
    np.save(report / f"{out.name}.npy", model.predict(np.load(out / "golden.npz")["inputs"], verbose=0))
(report / "codes.json").write_text(json.dumps({"codes": codes, "backend": keras.backend.backend()}))
"""


def test_models_trained_with_jax_become_bundles_the_worker_loads(tmp_path: Path) -> None:
    pytest.importorskip("jax", reason="the JAX backend is installed by the dev extra")
    write_image_folder(tmp_path / "photos", per_class=20)
    write_folder(tmp_path / "cycles", {"leak": 8, "normal": 8}, seed=0)
    out = tmp_path / "bundles"
    runs = [
        # one batch per epoch and per prediction: each new batch shape is one more XLA compilation on the CPU
        ["train", "images", str(tmp_path / "photos"), "--arch", "scratch", "--image-size", "16", "--epochs", "2",
         "--batch-size", "64", "--out", str(out / "photos")],
        ["train", "sensors", str(tmp_path / "cycles"), "--task", "classify", "--epochs", "2", "--batch-size", "16",
         "--out", str(out / "cycles")],
    ]  # fmt: skip
    # XLA's quicker, less optimising compiler: these models compile for far longer than they train
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
    env.pop("PLCSENSE_PRECISION", None)
    proc = subprocess.run(
        [sys.executable, "-c", JAX_RUN, json.dumps(runs), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "codes.json").read_text()) == {"codes": [0, 0], "backend": "jax"}
    assert proc.stderr.count("training on Keras backend jax, CPU, precision float32") == 2, proc.stderr[-3000:]
    assert_quiet(proc)
    expected = {"photos": (["bright", "dark", "striped"], (16, 16, 1)), "cycles": (["leak", "normal"], (24, 2))}
    for name, (labels, shape) in expected.items():
        bundle = load_bundle(out / name)  # the worker's loader: seal, checksums, golden samples through LiteRT
        assert bundle.manifest.labels == labels and bundle.input_shape == shape
        # the model trained with JAX, loaded with JAX, answers the golden inputs as the converted LiteRT model does
        golden, answers = np.load(out / name / "golden.npz")["outputs"], np.load(tmp_path / f"{name}.npy")
        k = len(labels)
        assert answers.shape == golden.shape
        np.testing.assert_allclose(answers[:, :k], golden[:, :k], atol=1e-5)
        # further outputs (a classifier's ood score, a distance through a whitening: the output most sensitive to
        # float rounding; TensorFlow's own Keras and LiteRT differ by as much)
        np.testing.assert_allclose(answers[:, k:], golden[:, k:], atol=5e-3)


@pytest.mark.parametrize(
    ("device", "precision"),
    [
        (Device("cpu", "cpu"), "float32"),
        (Device("gpu", "NVIDIA H200", (9, 0)), "mixed_bfloat16"),
        (Device("gpu", "NVIDIA A100", (8, 0)), "mixed_bfloat16"),
        (Device("gpu", "Tesla T4", (7, 5)), "mixed_float16"),
        (Device("gpu", "Tesla P100", (6, 0)), "float32"),
        (Device("gpu", "unknown", None), "float32"),
    ],
)
def test_precision_follows_the_device(device: Device, precision: str) -> None:
    assert default_precision(device) == precision


@pytest.fixture
def restore_policy():
    yield
    keras.mixed_precision.set_global_policy("float32")


def test_configure_reports_this_machine_and_takes_the_precision_asked(monkeypatch, restore_policy) -> None:
    monkeypatch.delenv("PLCSENSE_PRECISION", raising=False)
    run = configure()
    assert run.record() == {"backend": "tensorflow", "device": "CPU", "precision": "float32"}
    assert keras.mixed_precision.global_policy().name == "float32"
    monkeypatch.setenv("PLCSENSE_PRECISION", "mixed_bfloat16")
    assert configure().precision == "mixed_bfloat16"
    assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
    monkeypatch.setenv("PLCSENSE_PRECISION", "half")
    with pytest.raises(BackendError, match="PLCSENSE_PRECISION='half'"):
        configure()


def _policies(model: keras.Model) -> set[str]:
    found, stack = set(), [model]
    while stack:
        layer = stack.pop()
        found.add(layer.dtype_policy.name)
        stack.extend(getattr(layer, "layers", []))
    return found


def test_a_mixed_precision_model_exports_in_float32(tmp_path: Path, restore_policy) -> None:
    from plcsense.training.sensor_classify import SensorClassifyConfig, cnn1d, train_sensor_classifier

    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    model = cnn1d(24, np.zeros(2), np.ones(2), 3)
    assert _policies(model) == {"mixed_bfloat16", "float32"}  # float32: the softmax layer only
    copy = as_float32(model)
    assert _policies(copy) == {"float32"}
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), copy.get_weights(), strict=True))
    x = np.random.default_rng(0).normal(size=(8, 24, 2)).astype(np.float32)
    mixed, exact = model.predict(x, verbose=0), copy.predict(x, verbose=0)
    assert 0 < np.abs(mixed - exact).max() < 0.05  # the same network, in 16 bits and in 32

    data = write_folder(tmp_path / "cycles", {"leak": 8, "normal": 8}, seed=0)
    bundle = load_bundle(train_sensor_classifier(data, tmp_path / "bundle", SensorClassifyConfig(epochs=2)).path)
    keras.mixed_precision.set_global_policy("float32")
    saved = keras.saving.load_model(bundle.path / "model.keras")
    assert _policies(saved) == {"float32"}
    golden = np.load(bundle.path / "golden.npz")
    assert np.abs(saved.predict(golden["inputs"], verbose=0) - golden["outputs"]).max() < 1e-5
