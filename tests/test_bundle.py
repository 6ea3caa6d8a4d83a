"""The bundle contract: a good bundle loads, and every kind of broken bundle fails with one clear line."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from plcsense.models.bundle import BundleError, bundle_digest, load_bundle, read_manifest, write_manifest
from tests.conftest import WINDOW


@pytest.fixture
def bundle_copy(sensor_bundle: Path, tmp_path: Path) -> Path:
    target = tmp_path / "bundle"
    shutil.copytree(sensor_bundle, target)
    return target


def reseal(path: Path) -> None:
    """Rewrite bundle.sha256 to match an edited manifest, as someone who knows the format would."""
    digest = hashlib.sha256((path / "manifest.json").read_bytes()).hexdigest()
    (path / "bundle.sha256").write_text(f"sha256:{digest}\n")


def edit_manifest(path: Path, *, sealed: bool = True, **changes: object) -> None:
    """Change manifest fields (``input__window`` for nested ones); ``sealed`` also rewrites bundle.sha256."""
    doc = json.loads((path / "manifest.json").read_text())
    for dotted, value in changes.items():
        node = doc
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node[key]
        node[leaf] = value
    (path / "manifest.json").write_text(json.dumps(doc))
    if sealed:
        reseal(path)


def test_good_bundle_loads_and_predicts(sensor_bundle):
    bundle = load_bundle(sensor_bundle)
    m = bundle.manifest
    assert m.task == "anomaly" and m.input.window == WINDOW and m.threshold > 0
    assert {f for f in m.files if not f.startswith("report/")} == {"model.tflite", "golden.npz", "model.keras"}
    manifest_sha = hashlib.sha256((sensor_bundle / "manifest.json").read_bytes()).hexdigest()
    assert bundle.digest == bundle_digest(sensor_bundle) == f"sha256:{manifest_sha}"
    assert (sensor_bundle / "bundle.sha256").read_text() == f"sha256:{manifest_sha}\n"
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
    assert "4 labels plus an ood score but the model outputs shape [4]" in one_line(exc)


def test_ood_score_must_match_the_model(image_bundle, tmp_path):
    """A manifest that drops the ood score of a model that outputs one (or claims one it lacks) is refused."""
    target = tmp_path / "img"
    shutil.copytree(image_bundle, target)
    manifest = read_manifest(target)
    assert manifest.ood is not None and 0 < manifest.ood.threshold < 1
    manifest.ood = None
    write_manifest(target, manifest)
    with pytest.raises(BundleError) as exc:
        load_bundle(target)
    assert "3 labels but the model outputs shape [4]" in one_line(exc)


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
    reseal(bundle_copy)
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


# ----------------------------------------------------------------------------- tamper evidence (issue 11, item 4)
def test_edited_threshold_is_refused(bundle_copy):
    edit_manifest(bundle_copy, sealed=False, threshold=1e9)
    with pytest.raises(BundleError) as exc:
        load_bundle(bundle_copy)
    assert "manifest.json changed after export" in one_line(exc)


def test_reversed_labels_are_refused(image_bundle, tmp_path):
    target = tmp_path / "img"
    shutil.copytree(image_bundle, target)
    edit_manifest(target, sealed=False, labels=read_manifest(target).labels[::-1])
    with pytest.raises(BundleError) as exc:
        load_bundle(target)
    assert "manifest.json changed after export" in one_line(exc)


def test_pinned_digest_catches_a_resealed_edit(bundle_copy):
    pinned = bundle_digest(bundle_copy)
    assert load_bundle(bundle_copy, expect_digest=pinned).digest == pinned
    edit_manifest(bundle_copy, threshold=1e9)  # bundle.sha256 rewritten too: only the pin can tell
    assert load_bundle(bundle_copy).manifest.threshold == 1e9
    with pytest.raises(BundleError) as exc:
        load_bundle(bundle_copy, expect_digest=pinned)
    assert f"is not the pinned {pinned}" in one_line(exc)


@pytest.mark.parametrize("pin", ["sha256:" + "0" * 64, "0" * 64, "sha256:ABC"])
def test_wrong_or_malformed_pin_is_refused(bundle_copy, pin):
    with pytest.raises(BundleError) as exc:
        load_bundle(bundle_copy, expect_digest=pin)
    assert pin in one_line(exc)


def test_unsealed_bundle_loads_only_with_a_pin(bundle_copy):
    pinned = bundle_digest(bundle_copy)
    (bundle_copy / "bundle.sha256").unlink()
    with pytest.raises(BundleError) as exc:
        load_bundle(bundle_copy)
    assert "missing bundle.sha256" in one_line(exc)
    assert load_bundle(bundle_copy, expect_digest=pinned).digest == pinned


@pytest.mark.parametrize("name", ["../outside.bin", "report/../../outside.bin", "ABSOLUTE"])
def test_files_outside_the_bundle_are_refused(bundle_copy, name):
    outside = bundle_copy.parent / "outside.bin"
    outside.write_bytes(b"not part of the bundle")
    name = str(outside) if name == "ABSOLUTE" else name
    doc = json.loads((bundle_copy / "manifest.json").read_text())
    doc["files"][name] = hashlib.sha256(outside.read_bytes()).hexdigest()
    edit_manifest(bundle_copy, files=doc["files"])
    with pytest.raises(BundleError) as exc:
        load_bundle(bundle_copy)
    assert "is not a plain relative path inside the bundle" in one_line(exc)


def test_symlink_out_of_the_bundle_is_refused(bundle_copy):
    outside = bundle_copy.parent / "golden-elsewhere.npz"
    shutil.copy(bundle_copy / "golden.npz", outside)
    (bundle_copy / "golden.npz").unlink()
    (bundle_copy / "golden.npz").symlink_to(outside)  # same bytes, so the checksum alone would pass
    with pytest.raises(BundleError) as exc:
        load_bundle(bundle_copy)
    assert "golden.npz points outside the bundle" in one_line(exc)


def test_oversized_manifest_is_refused_before_parsing(bundle_copy):
    doc = json.loads((bundle_copy / "manifest.json").read_text())
    doc["metrics"] = {f"m{i:07d}": 0.5 for i in range(250_000)}  # valid JSON, ~5 MB
    (bundle_copy / "manifest.json").write_text(json.dumps(doc))
    reseal(bundle_copy)
    assert (bundle_copy / "manifest.json").stat().st_size > 4_000_000
    started = time.perf_counter()
    with pytest.raises(BundleError) as exc:
        load_bundle(bundle_copy)
    assert "manifest.json is larger than 1048576 bytes" in one_line(exc)
    assert time.perf_counter() - started < 1.0


def test_deeply_nested_manifest_is_a_bundle_error(bundle_copy):
    (bundle_copy / "manifest.json").write_text('{"schema_version": 1, "x": ' + "[" * 200_000 + "]" * 200_000 + "}")
    reseal(bundle_copy)
    with pytest.raises(BundleError) as exc:
        load_bundle(bundle_copy)
    assert "nested too deeply" in one_line(exc)


def test_corrupt_golden_archive_is_named(bundle_copy):
    (bundle_copy / "golden.npz").write_bytes(b"PK\x03\x04 not really a zip archive")
    write_manifest(bundle_copy, read_manifest(bundle_copy))
    with pytest.raises(BundleError) as exc:
        load_bundle(bundle_copy)
    assert "unreadable golden.npz" in one_line(exc)


def test_any_unexpected_failure_while_loading_is_a_bundle_error(bundle_copy):
    np.savez(bundle_copy / "golden.npz", inputs=np.array(["not a number"]), outputs=np.zeros(1))
    write_manifest(bundle_copy, read_manifest(bundle_copy))
    with pytest.raises(BundleError) as exc:
        load_bundle(bundle_copy)
    assert "cannot be read (ValueError: could not convert string to float" in one_line(exc)


@pytest.mark.parametrize(
    ("labels", "complaint"),
    [(["a" * 256, "b", "c"], "labels.0"), ([f"c{i}" for i in range(10_001)], "labels")],
)
def test_label_lengths_and_counts_are_bounded(image_bundle, tmp_path, labels, complaint):
    target = tmp_path / "img"
    shutil.copytree(image_bundle, target)
    edit_manifest(target, labels=labels)
    with pytest.raises(BundleError) as exc:
        load_bundle(target)
    assert f"invalid manifest.json: {complaint}: " in one_line(exc)
