"""The bundle contract: a good bundle loads, and every kind of broken bundle fails with one clear line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from plcsense.models.bundle import BundleError, load_bundle, read_manifest, write_manifest
from tests.conftest import WINDOW


@pytest.fixture
def bundle_copy(sensor_bundle: Path, tmp_path: Path) -> Path:
    target = tmp_path / "bundle"
    shutil.copytree(sensor_bundle, target)
    return target


def edit_manifest(path: Path, **changes: object) -> None:
    doc = json.loads((path / "manifest.json").read_text())
    for dotted, value in changes.items():
        node = doc
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node[key]
        node[leaf] = value
    (path / "manifest.json").write_text(json.dumps(doc))


def test_good_bundle_loads_and_predicts(sensor_bundle):
    bundle = load_bundle(sensor_bundle)
    m = bundle.manifest
    assert m.task == "anomaly" and m.input.window == WINDOW and m.threshold > 0
    assert set(m.files) == {"model.tflite", "golden.npz", "model.keras"}
    assert m.input.channels == ["vibration", "current", "pressure"]
    out = bundle.model.predict(np.zeros((5, WINDOW, 3), np.float32))
    assert out.shape == (5, 3) and np.all(np.isfinite(out))


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("name", ["model.tflite", "golden.npz", "manifest.json"])
def test_missing_file(bundle_copy, name):
    (bundle_copy / name).unlink()
    with pytest.raises(BundleError) as exc:
        load_bundle(bundle_copy)
    assert name in one_line(exc)


def test_checksum_mismatch(bundle_copy):
    with (bundle_copy / "model.tflite").open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(BundleError) as exc:
        load_bundle(bundle_copy)
    assert "checksum mismatch for model.tflite" in one_line(exc)


def test_unknown_schema_version(bundle_copy):
    edit_manifest(bundle_copy, schema_version=99)
    with pytest.raises(BundleError) as exc:
        load_bundle(bundle_copy)
    assert "unknown schema_version 99" in one_line(exc)


def test_spec_that_does_not_match_the_model(bundle_copy):
    manifest = read_manifest(bundle_copy)
    manifest.input.window = WINDOW + 2
    write_manifest(bundle_copy, manifest)
    with pytest.raises(BundleError) as exc:
        load_bundle(bundle_copy)
    assert "does not match model input" in one_line(exc)


def test_labels_that_do_not_match_the_model(image_bundle, tmp_path):
    target = tmp_path / "img"
    shutil.copytree(image_bundle, target)
    manifest = read_manifest(target)
    manifest.labels = [*manifest.labels, "extra"]
    write_manifest(target, manifest)
    with pytest.raises(BundleError) as exc:
        load_bundle(target)
    assert "4 labels but the model outputs shape [3]" in one_line(exc)


def test_golden_samples_that_no_longer_reproduce(bundle_copy):
    with np.load(bundle_copy / "golden.npz", allow_pickle=False) as golden:
        inputs, outputs = golden["inputs"], golden["outputs"]
    np.savez(bundle_copy / "golden.npz", inputs=inputs, outputs=outputs * 1.5 + 0.1)
    write_manifest(bundle_copy, read_manifest(bundle_copy))  # checksums fine, content wrong
    with pytest.raises(BundleError) as exc:
        load_bundle(bundle_copy)
    assert "golden samples no longer reproduce" in one_line(exc)


def test_invalid_manifest_field(bundle_copy):
    edit_manifest(bundle_copy, task="regression")
    with pytest.raises(BundleError) as exc:
        load_bundle(bundle_copy)
    assert "invalid manifest.json: task" in one_line(exc)


def test_not_json(bundle_copy):
    (bundle_copy / "manifest.json").write_text("{nope")
    with pytest.raises(BundleError) as exc:
        load_bundle(bundle_copy)
    assert "not valid JSON" in one_line(exc)


def test_pickled_golden_file_is_refused(bundle_copy):
    with (bundle_copy / "golden.npz").open("wb") as handle:
        np.savez(handle, inputs=np.array([{"evil": 1}], dtype=object), outputs=np.zeros(1))
    write_manifest(bundle_copy, read_manifest(bundle_copy))
    with pytest.raises(BundleError) as exc:
        load_bundle(bundle_copy)
    assert "golden.npz" in one_line(exc)
