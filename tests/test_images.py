"""Image classifier training: backbones, freezing, weights files, quantised export, reports, parity."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from plcsense.cli import ARCHS
from plcsense.models.backbones import (
    BACKBONES,
    WeightsError,
    build_backbone,
    classifier,
    cut_near,
    top_part,
    unfreeze_above,
)
from plcsense.models.bundle import load_bundle
from plcsense.training.data import DataError
from plcsense.training.export import ExportError
from plcsense.training.images import ImageTrainConfig, train_images
from plcsense.worker.decoders import decode
from tests.conftest import SHARED_DATA, write_image_folder

WEIGHTS = SHARED_DATA.parent / "weights" / "mobilenet_v2_1.0_224_no_top.h5"
NEU = SHARED_DATA / "neu-det"
needs_weights = pytest.mark.skipif(not WEIGHTS.is_file(), reason="needs ../shared/weights (present in CI)")


def test_cli_lists_every_backbone():
    assert set(ARCHS) == {"scratch", *BACKBONES}


@pytest.mark.parametrize("arch", sorted(BACKBONES))
def test_each_arch_builds_and_starts_frozen(arch):
    size = BACKBONES[arch].min_size
    net = classifier(arch, (size, size, 3), 4, weights=None)
    assert net.model.output_shape == (None, 4)
    out = net.model.predict(np.random.default_rng(0).uniform(0, 255, (2, size, size, 3)), verbose=0)
    assert out.shape == (2, 4) and np.allclose(out.sum(axis=1), 1, atol=1e-5)
    assert not net.backbone.trainable and net.backbone.trainable_weights == []
    head_weights = {id(w) for w in net.head.trainable_weights}
    assert {id(w) for w in net.model.trainable_weights} == head_weights


def test_cut_points_and_unfreezing_keep_batchnorm_frozen():
    net = classifier("mobilenet_v2", (32, 32, 3), 3, weights=None)
    cut = cut_near(net.backbone, 0.75)
    names = [layer.name for layer in net.backbone.layers]
    assert cut == "block_11_add"  # a block boundary: no skip connection crosses it
    with pytest.raises(ValueError):
        top_part(net.backbone, "block_12_expand")  # block 12's residual reads block 11's output from below
    upper = top_part(net.backbone, cut)
    assert upper.output_shape == net.backbone.output_shape
    count = unfreeze_above(net.backbone, cut)
    below, above = net.backbone.layers[: names.index(cut) + 1], net.backbone.layers[names.index(cut) + 1 :]
    assert not any(layer.trainable for layer in below)
    assert all(
        layer.trainable != isinstance(layer, keras.layers.BatchNormalization) for layer in above if layer.weights
    )
    assert count == sum(layer.trainable for layer in above) > 0
    # the part shares its layers with the backbone: training it trains them
    assert upper.get_layer("Conv_1") is net.backbone.get_layer("Conv_1")


@needs_weights
def test_the_tap_tells_apart_cuts_of_the_same_shape():
    """Two cuts with equal shapes (InceptionV3's mixed4 and mixed7 are both 17 x 17 x 768): each cached activation
    must be its own cut's, or fine-tuning from one depth trains on the other's features."""
    import keras

    from plcsense.training.image_select import Tap

    pixels = keras.Input((None, None, 3))
    a = keras.layers.Conv2D(8, 3, padding="same", name="cut_a")(pixels)
    b = keras.layers.Conv2D(8, 3, padding="same", name="cut_b")(keras.layers.Activation("relu")(a))
    c = keras.layers.Conv2D(16, 1, name="top")(b)
    backbone = keras.Model(pixels, c)
    tap = Tap("mobilenet_v2", backbone, ["cut_b", "cut_a"])
    photos = np.random.default_rng(1).uniform(0, 255, (3, 40, 40, 3)).astype(np.uint8)
    _, (got_b, got_a) = tap.run(photos)
    inner = keras.Model(backbone.input, [backbone.get_layer("cut_b").output, backbone.get_layer("cut_a").output])
    want_b, want_a = (np.asarray(x) for x in inner(photos.astype(np.float32) / 127.5 - 1.0))
    np.testing.assert_allclose(got_b, want_b, rtol=0.02, atol=0.02)
    np.testing.assert_allclose(got_a, want_a, rtol=0.02, atol=0.02)


def test_the_tap_sizes_its_caches_before_running():
    """The memory check before a resolution is loaded must match what the caches then take, at odd sizes too."""
    from plcsense.models.backbones import build_backbone
    from plcsense.training.image_select import Tap
    from plcsense.training.transfer import depths

    backbone = build_backbone("mobilenet_v2", (None, None, 3), None)
    tap = Tap("mobilenet_v2", backbone, [c for c in depths(backbone, None, 1).values() if c])
    for side in (32, 100, 224):
        photos = np.zeros((2, side, side, 3), np.uint8)
        pooled, acts = tap.run(photos)
        assert len(acts) == 2
        assert 2 * tap.bytes_per_photo(side) == photos.nbytes + pooled.nbytes + sum(a.nbytes for a in acts), side


def test_fine_tuning_is_scored_at_one_epoch_count_for_every_fold():
    """Each fold at its own best epoch would score this depth 0.9 (a lucky epoch per fold) against a probe start of
    0.8; at any one epoch count the folds average at most 0.8, and the refit's epoch count is that one."""
    from plcsense.training.image_select import FineTuneResult, common_epoch

    def fold(start: float, accuracies: list[float]) -> FineTuneResult:
        curves = {"val_accuracy": accuracies, "val_loss": [1 - a for a in accuracies]}
        best = int(np.argmax([start, *accuracies]))
        return FineTuneResult(max(start, *accuracies), 0.0, best, "epochs", curves, None, (start, 1 - start))

    lucky = [fold(0.8, [1.0, 0.6, 0.7]), fold(0.8, [0.6, 1.0, 0.7]), fold(0.8, [0.7, 0.6, 0.9])]
    assert np.mean([r.accuracy for r in lucky]) == pytest.approx(0.9667, abs=1e-4)
    assert common_epoch(lucky) == (0, pytest.approx(0.8), pytest.approx(0.2))  # no count beats the start
    # a depth that helps on every fold wins at the count where the mean is best; a fold that stopped early
    # (after 2 epochs) counts with its last epoch beyond that
    steady = [fold(0.8, [0.85, 0.9, 0.95, 0.9]), fold(0.8, [0.85, 0.9]), fold(0.8, [0.8, 0.9, 0.95, 0.95])]
    epochs, accuracy, _ = common_epoch(steady)
    assert epochs == 3 and accuracy == pytest.approx((0.95 + 0.9 + 0.95) / 3)
    # one validation part: its own best epoch, as before
    assert common_epoch([fold(0.8, [0.7, 0.9, 0.85])])[:2] == (2, pytest.approx(0.9))


def test_local_weights_file_loads_and_mismatch_is_explained():
    a = build_backbone("mobilenet_v2", (96, 96, 3), str(WEIGHTS))
    b = build_backbone("mobilenet_v2", (96, 96, 3), None)
    first = a.get_layer("Conv1").get_weights()[0]
    assert not np.allclose(first, b.get_layer("Conv1").get_weights()[0])
    # a known property of the ImageNet weights, not of a random init: the stem has real structure
    assert abs(float(first.mean())) < 1 and float(first.std()) > 0.05
    with pytest.raises(WeightsError, match="does not fit mobilenet_v3_small"):
        build_backbone("mobilenet_v3_small", (96, 96, 3), str(WEIGHTS))
    with pytest.raises(WeightsError, match="not found"):
        build_backbone("mobilenet_v2", (96, 96, 3), "/nonexistent/weights.h5")
    with pytest.raises(WeightsError, match="at least 75 px"):
        build_backbone("inception_v3", (64, 64, 3), None)


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("parts")
    for split, n, seed in (("train", 24, 0), ("val", 6, 1), ("test", 6, 2)):
        write_image_folder(root / split, per_class=n, seed=seed)
    return root


@pytest.fixture(scope="module")
def scratch_int8(parts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("b") / "bundle"
    cfg = ImageTrainConfig(
        arch="scratch", image_size=16, epochs=12, batch_size=8, augment=None, quantize="int8", name="parts"
    )
    train_images(parts, out, cfg)
    return out


def test_explicit_splits_quantised_export_and_report(scratch_int8):
    bundle = load_bundle(scratch_int8)
    m = bundle.manifest
    assert m.metrics["test_samples"] == 18 and m.metrics["train_samples"] == 72 and m.metrics["val_samples"] == 18
    assert m.quantization == "int8" and set(m.variants) == {"float32", "int8"}
    assert m.variants["int8"]["top1_agreement"] >= 0.98
    assert m.metrics["test_accuracy"] == m.variants["int8"]["test_accuracy"]
    report = scratch_int8 / "report"
    for name in (
        "metrics.json",
        "confusion_matrix.json",
        "confusion_matrix.png",
        "training_curves.png",
        "misclassified.png",
    ):
        assert (report / name).stat().st_size > 0, name
    matrix = json.loads((report / "confusion_matrix.json").read_text())
    assert matrix["labels"] == ["bright", "dark", "striped"] and sum(map(sum, matrix["matrix"])) == 18
    per_class = json.loads((report / "metrics.json").read_text())
    assert {"precision", "recall", "f1-score"} <= set(per_class["dark"])
    assert "report/confusion_matrix.png" in m.files  # the report is covered by the checksums too


def test_keras_and_worker_agree_on_top1(scratch_int8, parts):
    """The Keras model on images loaded the Keras way, and the worker's decode + LiteRT path, give one answer."""
    bundle = load_bundle(scratch_int8)
    model = keras.saving.load_model(scratch_int8 / "model.keras")
    files = sorted((parts / "test").glob("*/*.png"))
    spec = bundle.manifest.input
    keras_images = np.stack(
        [
            keras.utils.img_to_array(
                keras.utils.load_img(f, color_mode="grayscale", target_size=(16, 16), interpolation="bilinear")
            )
            for f in files
        ]
    )
    keras_top1 = model.predict(keras_images, verbose=0).argmax(axis=1)
    worker_inputs = np.stack([decode(f.read_bytes(), "image", bundle.manifest).array for f in files])
    assert worker_inputs.shape[1:] == spec.shape
    worker_top1 = bundle.model.predict(worker_inputs).argmax(axis=1)
    assert (keras_top1 == worker_top1).mean() >= 0.99


def test_failed_quantisation_parity_fails_loudly(parts, tmp_path):
    cfg = ImageTrainConfig(
        arch="scratch", image_size=16, epochs=1, batch_size=8, augment=None, quantize="int8", min_agreement=1.01
    )
    with pytest.raises(ExportError, match="agrees with the float model"):
        train_images(parts, tmp_path / "b", cfg)
    assert not (tmp_path / "b").exists() and not (tmp_path / "b.partial").exists()


def test_scratch_cnn_keeps_to_its_time_budget(parts, tmp_path, caplog):
    """A budget that the export's share already fills: one epoch, a progress line with the time spent and left,
    the best weights exported and the stop recorded in the manifest."""
    cfg = ImageTrainConfig(arch="scratch", image_size=16, epochs=12, batch_size=8, augment=None, time_budget=1)
    with caplog.at_level("INFO", logger="plcsense.training"):
        bundle = train_images(parts, tmp_path / "b", cfg)
    assert re.search(r"\[fit +\d+s elapsed, +0s left\] epoch 1/12: loss [0-9.]+, accuracy", caplog.text)
    assert "stopping: another epoch" in caplog.text and "epoch 2/12" not in caplog.text
    assert bundle.manifest.metrics["stopped_by_time_budget"] == 1.0


def test_transfer_learning_selects_by_validation_within_budget(parts, tmp_path):
    """Grey images into an RGB backbone: frozen probes, flips, fine-tuning, the refit, all reported and timed."""
    out = tmp_path / "b"
    proc = subprocess.run(
        [
            sys.executable, "-m", "plcsense", "train", "images", str(parts),
            "--arch", "mobilenet_v2", "--weights", "none", "--image-size", "32", "--fine-tune-epochs", "2",
            "--fine-tune-learning-rate", "1e-5", "--time-budget", "240", "--tensorboard", str(tmp_path / "tb"),
            "--quantize", "float16",
            "--min-agreement", "0", "--out", str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    # a progress line per phase and candidate, with the time spent and left
    for phase in ("data", "frozen", "augment", "fine-tune", "export"):
        assert re.search(rf"\[{phase} +\d+s elapsed, +\d+s left\]", proc.stderr), phase
    m = load_bundle(out).manifest
    assert m.input.color_mode == "rgb" and m.input.channels == 3 and m.quantization == "float16"
    assert m.input.height == 32
    assert {"test_accuracy", "val_accuracy"} <= set(m.metrics)
    selection = json.loads((out / "report" / "selection.json").read_text())
    assert selection["validation"] == "the val/ folder (18 photos)"
    stages = {t["stage"] for t in selection["trials"]}
    assert {"frozen", "fine-tune"} <= stages
    assert any(t.get("augment") == "flips" and t["stage"] == "augment" for t in selection["trials"])
    best = max(selection["trials"], key=lambda t: (round(t["val_accuracy"], 4), -t["val_loss"]))
    if "never beat" in selection.get("refit", ""):  # the probe it started from is what was exported
        assert selection["chosen"]["stage"] in ("frozen", "augment")
    else:
        assert selection["chosen"]["val_accuracy"] == best["val_accuracy"]
    assert m.metrics["train_samples"] == 72 + 18  # the refit learnt from train + val (too few to keep any out)
    assert m.metrics["val_accuracy"] == pytest.approx(selection["chosen"]["val_accuracy"], abs=1e-4)
    assert selection["elapsed_s_at_export"] < 240
    assert any((tmp_path / "tb").rglob("events.out.tfevents.*"))
    predicted = subprocess.run(
        [sys.executable, "-m", "plcsense", "predict", str(out), str(parts / "test" / "dark" / "000.png")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert predicted.returncode == 0
    _, label, score = predicted.stdout.strip().split("\t")[:3]
    assert label in m.labels and 0 <= float(score) <= 1


def test_a_refit_leaves_a_tenth_of_each_class_out_for_the_ood_threshold():
    """A network has learnt the photos it trained on, so the threshold comes from photos kept out of the refit:
    a tenth of each class, rounded down (a class of under ten photos keeps them all)."""
    from plcsense.training.transfer import calibration_part

    labels = np.repeat([0, 1, 2], [200, 35, 9])
    part = calibration_part(labels, seed=0)
    assert np.bincount(labels[part], minlength=3).tolist() == [20, 3, 0]
    assert len(set(part.tolist())) == len(part)
    assert np.array_equal(part, calibration_part(labels, seed=0))
    assert len(calibration_part(np.repeat([0, 1], [100, 99]), seed=0)) == 0  # 19: too few to set a threshold on


def train_with_fine_tuning_winning(
    parts, tmp_path, monkeypatch, *, interrupt_refit: bool = False, preferred_rate: float | None = None
):
    """Train on ``parts`` with fine-tuning made to win (every fold beats its start, one epoch, fine-tuning trials
    rank first, those at ``preferred_rate`` before the others); ``interrupt_refit``: Ctrl-C as the refit starts.
    Returns (manifest, selection report)."""
    from plcsense.training import image_select, transfer

    fit = image_select.FineTuner.fit

    def fit_and_keep(self, *args, **kwargs):
        if interrupt_refit and kwargs.get("epochs"):  # the refit
            raise KeyboardInterrupt
        result = fit(self, *args, **kwargs)
        result.weights = result.weights or self.snapshot()  # as if an epoch had beaten the start in every fold
        return result

    monkeypatch.setattr(image_select.FineTuner, "fit", fit_and_keep)
    monkeypatch.setattr(transfer, "common_epoch", lambda results: (1, *image_select.common_epoch(results)[1:]))
    monkeypatch.setattr(transfer.Selection, "better", staticmethod(lambda new, old: new.key() > old.key()))
    monkeypatch.setattr(  # fine-tuning wins
        image_select.Trial,
        "key",
        lambda self: (
            self.stage == "fine-tune",
            self.settings.get("learning_rate") == preferred_rate,
            round(self.accuracy, 4),
            -self.loss,
        ),
    )
    cfg = ImageTrainConfig(
        arch="mobilenet_v2", weights=None, image_size=32, time_budget=240, name="parts",
        fine_tune_layers=10, fine_tune_epochs=2,
        fine_tune_learning_rate=None if preferred_rate else 1e-5,  # one trial, unless the rate is what is tested
    )  # fmt: skip
    m = train_images(parts, tmp_path / "b", cfg).manifest
    return m, json.loads((tmp_path / "b" / "report" / "selection.json").read_text())


def test_a_fine_tuned_refit_sets_its_ood_threshold_on_photos_it_never_learnt(parts, tmp_path, monkeypatch):
    """The kept-out photos leave the refit and the ood statistics, and set the threshold."""
    from plcsense.training import transfer

    monkeypatch.setattr(transfer, "MIN_CALIBRATION", 9)  # the fixture's 90 photos keep 9 out
    m, selection = train_with_fine_tuning_winning(parts, tmp_path, monkeypatch)
    assert selection["refit"] == "fine-tuned on 81 photos for 1 epochs; 9 more, kept out, set the ood threshold"
    assert m.metrics["train_samples"] == 81 and m.metrics["val_samples"] == 9
    assert {"test_accuracy", "test_unknown"} <= set(m.metrics)


def test_fine_tuning_chooses_its_learning_rate_by_validation_and_refits_with_it(parts, tmp_path, monkeypatch):
    """Frozen features that already fit want small steps, poor ones larger: both rates are tried at the first
    depth, and the refit trains at the one that validated better."""
    from plcsense.training import image_select

    rates = []
    init = image_select.FineTuner.__init__

    def recording(self, *args, **kwargs):
        rates.append(kwargs["learning_rate"])
        init(self, *args, **kwargs)

    monkeypatch.setattr(image_select.FineTuner, "__init__", recording)
    preferred = image_select.LEARNING_RATES[-1]  # not the first tried, so the refit cannot pass by chance
    _, selection = train_with_fine_tuning_winning(parts, tmp_path, monkeypatch, preferred_rate=preferred)
    tried = [t["learning_rate"] for t in selection["trials"] if t["stage"] == "fine-tune"]
    assert tried == list(image_select.LEARNING_RATES) and selection["chosen"]["learning_rate"] == preferred
    assert rates == [*image_select.LEARNING_RATES, preferred]  # each trial, then the refit
    assert selection["refit"].startswith("fine-tuned on")


def test_a_learning_rate_is_dropped_only_when_it_validates_less_accurately():
    """A deeper depth tries every rate that has not lost on accuracy: a tie (often both at the probe they start
    from) says nothing about which rate the deeper layers want."""
    from types import SimpleNamespace

    from plcsense.training.image_select import Trial
    from plcsense.training.transfer import BackboneRun

    def run_with(*trials: tuple[float, float, float]) -> list[float]:
        run = BackboneRun.__new__(BackboneRun)
        run.selection = SimpleNamespace(
            trials=[Trial("frozen", {}, 0.9, 0.3, 1.0)]
            + [Trial("fine-tune", {"learning_rate": r}, acc, loss, 1.0) for r, acc, loss in trials]
        )
        return run._rates_left((1e-5, 1e-4))

    assert run_with() == [1e-5, 1e-4]
    assert run_with((1e-5, 0.73104, 0.82), (1e-4, 0.73096, 0.95)) == [1e-5, 1e-4]  # equal to 4 places, losses apart
    assert run_with((1e-5, 0.7310, 0.82), (1e-4, 0.8234, 0.62)) == [1e-4]
    assert run_with((1e-5, 0.7310, 0.82), (1e-4, 0.7310, 0.82), (1e-5, 0.7363, 0.93)) == [1e-5]
    assert run_with((1e-5, 0.7310, 0.82)) == [1e-5, 1e-4]  # 1e-4 skipped for time: not lost


def test_a_deeper_trial_leaves_the_best_so_far_the_time_for_its_refit():
    """A deeper fine-tuning trial that then loses must not take the time the winner needs for its refit on every
    photo (on 2,200 photos of 320 px the whole backbone's trial did, and the best fold's model shipped)."""
    from types import SimpleNamespace

    from plcsense.training.clock import Clock
    from plcsense.training.image_select import Folds, Trial
    from plcsense.training.transfer import BackboneRun, Selection

    run = BackboneRun.__new__(BackboneRun)
    run.clock = Clock(1000)
    run.cfg = SimpleNamespace(fine_tune_learning_rate=1e-4, seed=42)
    run.pool = SimpleNamespace(files=[f"{i}.png" for i in range(200)], labels=np.arange(200) % 2)
    run.selection = Selection(run.clock, Folds([(np.arange(160), np.arange(160, 200))], "a 20 % part"))
    run.selection.add(Trial("frozen", {}, 0.8, 0.5, 1.0))
    run.depths = {"top": "cut_top", "half": "cut_half"}
    run._export_seconds = lambda: 100.0
    budgets: dict[str, float] = {}

    def trial(name: str, cut: str, budget: float, rate: float) -> float:
        budgets[name] = budget
        if name == "top":  # wins: 15 epochs of 40 s on 160 photos, so 15 x 40 x 180 / 160 = 675 s to refit on 180
            run.selection.add(Trial("fine-tune", {"depth": "top", "learning_rate": rate}, 0.95, 0.2, 600.0))
            run.tuned = (cut, rate, 15, 40.0, None)
        return 40.0

    run._fine_tune_trial = trial
    run._fine_tuning()
    assert budgets["top"] == pytest.approx(900 * 160 / (160 + 200), abs=2)  # nothing won yet: the usual share
    assert run._refit_seconds() == pytest.approx(675)
    # half: 3 epochs of ~100 s would fit its share (400 s) but not the 225 s the winner's refit leaves
    assert "half" not in budgets
    (skipped,) = run.selection.skipped
    assert skipped["candidate"] == "half" and "kept to refit the best so far" in skipped["reason"]
    assert skipped["for_time"]


def test_resolutions_tried_keep_the_detail_of_larger_photos():
    from plcsense.training.transfer import resolutions

    assert resolutions("mobilenet_v2", 300, None) == [224, 288]  # a fine crack is not shrunk without a try
    assert resolutions("mobilenet_v2", 1000, None) == [224, 448]  # at most twice the native size
    assert resolutions("mobilenet_v2", 200, None) == [224]  # NEU: close enough, smaller
    assert resolutions("mobilenet_v2", 64, None) == [64, 224]  # small photos: as they are, and upscaled
    assert resolutions("mobilenet_v2", 300, 160) == [160]  # --image-size pins it
    with pytest.raises(DataError, match="below mobilenet_v2's smallest input, 32 px"):
        resolutions("mobilenet_v2", 300, 16)


def test_every_resolution_chooses_its_own_probe_settings(tmp_path):
    """Photos far from the backbone's size: both resolutions try every L2 strength, pooling and (imbalanced
    classes) weighting, so a weighting chosen on the losing resolution's features is not forced on the winner."""
    from plcsense.training.image_select import STRENGTHS, WEIGHTINGS

    root = tmp_path / "photos"
    for name, n in (("bright", 30), ("dark", 12), ("striped", 6)):
        write_image_folder(root / "_all", per_class=n, seed=n)
        (root / "_all" / name).rename(root / name)
        shutil.rmtree(root / "_all")
    cfg = ImageTrainConfig(arch="mobilenet_v2", weights=None, fine_tune_layers=0, augment=None, time_budget=240)
    train_images(root, tmp_path / "b", cfg)
    trials = json.loads((tmp_path / "b" / "report" / "selection.json").read_text())["trials"]
    sides = sorted({t["resolution"] for t in trials})
    assert sides == [32, 224]  # 24 px photos: the smallest side MobileNetV2 takes, and its own
    for side in sides:
        here = [t for t in trials if t["stage"] == "frozen" and t["resolution"] == side]
        assert {t["strength"] for t in here} == set(STRENGTHS), side
        assert {t["pooling"] for t in here} == {"avg", "avgmax"}, side
        assert {t["weighting"] for t in here} == set(WEIGHTINGS), side


def test_the_photos_own_resolution_is_chosen_within_one_standard_error(tmp_path, monkeypatch):
    """Photos larger than the backbone's 224 px: their own size is chosen although 224 px's probe validated
    slightly better (within one standard error), and the export takes photos at that size."""
    from plcsense.training import transfer

    root = tmp_path / "photos"
    write_image_folder(root, per_class=12, size=288)
    probe_trial = transfer.probe_trial

    def own_size_a_little_worse(*args, **kwargs):
        trial = probe_trial(*args, **kwargs)
        trial.accuracy = 0.80 if trial.settings["resolution"] == 224 else 0.75  # 36 photos: one SE is 0.067
        return trial

    monkeypatch.setattr(transfer, "probe_trial", own_size_a_little_worse)
    cfg = ImageTrainConfig(arch="mobilenet_v2", weights=None, fine_tune_layers=0, augment=None, time_budget=240)
    bundle = train_images(root, tmp_path / "b", cfg)
    selection = json.loads((tmp_path / "b" / "report" / "selection.json").read_text())
    assert {t["resolution"] for t in selection["trials"]} == {224, 288}
    spec = bundle.manifest.input
    assert selection["chosen"]["resolution"] == 288 and (spec.height, spec.width) == (288, 288)
    assert "within one standard error of 224 px's 0.8000" in selection["resolution"]


def test_a_resolution_more_than_one_standard_error_worse_is_not_chosen():
    from plcsense.training.image_select import Trial
    from plcsense.training.transfer import keeps_detail

    best = Trial("frozen", {"resolution": 224}, 0.731, 0.7, 1.0)
    assert keeps_detail(Trial("frozen", {"resolution": 320}, 0.710, 0.8, 1.0), best, 379)  # SE 0.023
    assert not keeps_detail(Trial("frozen", {"resolution": 320}, 0.700, 0.8, 1.0), best, 379)
    assert not keeps_detail(Trial("frozen", {"resolution": 320}, 0.99, 0.1, 1.0), Trial("frozen", {}, 1.0, 0.0, 1), 50)


def test_an_earlier_fine_tuning_trial_keeps_a_tie_in_accuracy():
    """At saturated validation accuracy the loss ranks confidence, not generalisation: between fine-tuning trials a
    tie keeps the earlier (shallower, smaller rate) one; against the frozen probe, and on accuracy, nothing changes."""
    from plcsense.training.image_select import Trial
    from plcsense.training.transfer import Selection

    probe = Trial("augment", {}, 1.0, 0.0058, 1.0)
    top = Trial("fine-tune", {"depth": "top", "learning_rate": 1e-5}, 1.0, 0.0005, 1.0)
    half = Trial("fine-tune", {"depth": "half", "learning_rate": 1e-4}, 1.0, 0.0001, 1.0)
    assert Selection.better(top, probe) and not Selection.better(half, top)
    assert Selection.better(half, probe)  # the probe still loses a tie on loss
    assert not Selection.better(Trial("fine-tune", {}, 1.0, 0.01, 1.0), probe)
    assert Selection.better(Trial("fine-tune", {}, 0.9, 0.3, 1.0), Trial("fine-tune", {}, 0.89, 0.1, 1.0))


def test_the_default_time_budget_grows_with_the_photos_and_their_size():
    """600 s for NEU's 1,440 training photos at 224 px, in proportion to photos x side^2 above, at most an hour."""
    from plcsense.training.image_config import default_time_budget

    assert default_time_budget(1440, 224) == default_time_budget(60, 448) == 600
    assert default_time_budget(2200, 320) == pytest.approx(600 * 2200 * (320 / 224) ** 2 / 1500)
    assert default_time_budget(3000, 224) == 1200 and default_time_budget(100_000, 448) == 3600


def test_what_the_time_budget_cut_short_is_said_with_what_to_do(caplog):
    """A user whose budget ended the search early is told what was left out and which option tries it."""
    from types import SimpleNamespace

    from plcsense.training.clock import Clock
    from plcsense.training.image_select import Folds, Trial
    from plcsense.training.transfer import BackboneRun, Selection

    selection = Selection(Clock(600), Folds([], "a 20 % validation part"))
    selection.skip("frozen", "320 px", "its photos and activations would not fit", for_time=False)
    run = SimpleNamespace(selection=selection, clock=selection.clock)
    BackboneRun._say_what_time_cut_short(run)
    assert "cut_short_by_time_budget" not in selection.notes and "time budget" not in caplog.text

    top = {"depth": "top", "learning_rate": 1e-4}
    selection.add(Trial("fine-tune", top, 0.9, 0.3, 58.0, {"epochs": 3, "stopped": ["time budget"]}))
    selection.add(Trial("fine-tune", dict(top, learning_rate=1e-5), 0.8, 0.5, 97.0, {"epochs": 5, "stopped": []}))
    selection.skip(
        "fine-tune", "half, learning rate 0.0001", "3 epochs x 1 folds ~140 s, 43 s available", for_time=True
    )
    BackboneRun._say_what_time_cut_short(run)
    cut = ["half, learning rate 0.0001 skipped", "top at 0.0001 stopped after 3 epochs"]
    assert selection.notes["cut_short_by_time_budget"] == cut
    assert "the time budget of 600 s cut the search short" in caplog.text and "--time-budget 1200" in caplog.text
    assert json.loads(selection.report())["cut_short_by_time_budget"] == cut
    selection.notes["refit"] = "no time to refit (~300 s): the best fold's model is exported"
    assert selection.cut_short()[-1] == "the refit skipped"


def test_a_photo_unreadable_at_the_second_resolution_skips_it(tmp_path, monkeypatch):
    """Rows of the second resolution's features must line up with the labels: a photo that can no longer be read
    (replaced during the run) skips that resolution instead of shifting every photo after it."""
    from plcsense.training import transfer

    root = tmp_path / "photos"
    write_image_folder(root, per_class=12, size=24)
    load_pixels = transfer.load_pixels

    def second_read_loses_one(photos, side, *args):
        pixels, kept = load_pixels(photos, side, *args)
        if side == 224:
            return pixels[1:], kept.take(np.arange(1, len(kept.files)))
        return pixels, kept

    monkeypatch.setattr(transfer, "load_pixels", second_read_loses_one)
    cfg = ImageTrainConfig(arch="mobilenet_v2", weights=None, fine_tune_layers=0, augment=None, time_budget=240)
    train_images(root, tmp_path / "b", cfg)
    selection = json.loads((tmp_path / "b" / "report" / "selection.json").read_text())
    assert {t["resolution"] for t in selection["trials"]} == {32}
    assert any(s["candidate"] == "224 px" and "no longer be read" in s["reason"] for s in selection["skipped"])


def test_caches_that_would_not_fit_in_memory_are_skipped_with_the_reason(tmp_path, monkeypatch):
    """A few thousand large photos: a larger resolution's photos and activations, or the flipped copies'
    activations, that would take more than half the available memory are skipped, not allocated until the
    kernel kills the run."""
    from plcsense.training import memory

    root = tmp_path / "photos"
    write_image_folder(root, per_class=12, size=24)
    free = iter([1 << 40])  # the first resolution fits, then 1 MB: nothing more does
    monkeypatch.setattr(memory, "available_bytes", lambda: next(free, 1_000_000))
    cfg = ImageTrainConfig(arch="mobilenet_v2", weights=None, fine_tune_layers=0, time_budget=240)
    train_images(root, tmp_path / "b", cfg)
    selection = json.loads((tmp_path / "b" / "report" / "selection.json").read_text())
    assert {t["resolution"] for t in selection["trials"]} == {32}
    reasons = {s["candidate"]: s["reason"] for s in selection["skipped"]}
    assert "GB of memory available" in reasons["224 px"] and "GB of memory available" in reasons["flips"]


def test_photos_whose_first_resolution_would_not_fit_in_memory_are_refused_with_what_to_do(tmp_path, monkeypatch):
    """Sized before a photo is loaded: a run that cannot hold its first resolution's caches says so and how to
    train anyway, instead of being killed by the kernel part way through."""
    from plcsense.training import memory

    root = tmp_path / "photos"
    write_image_folder(root, per_class=12, size=24)
    monkeypatch.setattr(memory, "available_bytes", lambda: 100_000)
    cfg = ImageTrainConfig(arch="mobilenet_v2", weights=None, time_budget=240)
    with pytest.raises(DataError, match=r"36 photos at 32 px: .* GB of memory available; .*--fine-tune-layers 0"):
        train_images(root, tmp_path / "b", cfg)


def test_available_memory_is_the_machine_s_capped_by_a_container_limit(tmp_path):
    from plcsense.training.memory import available_bytes

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000000 kB\nMemAvailable:    8000000 kB\n")
    limit, usage = tmp_path / "memory.max", tmp_path / "memory.current"
    limit.write_text("4096000000\n")
    usage.write_text("1024000000\n")
    assert available_bytes(meminfo, [(limit, usage)]) == 3_072_000_000
    limit.write_text("max\n")  # a container without a limit
    assert available_bytes(meminfo, [(limit, usage)]) == 8_192_000_000
    assert available_bytes(tmp_path / "absent", [(tmp_path / "absent", usage)]) is None


def test_interrupted_selection_exports_the_best_model_so_far(parts, tmp_path, monkeypatch):
    """Ctrl-C in fine-tuning: the frozen probe chosen so far is exported, marked interrupted."""
    from plcsense.training import image_select

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(image_select.FineTuner, "fit", interrupt)
    cfg = ImageTrainConfig(arch="mobilenet_v2", weights=None, image_size=32, time_budget=240, name="parts")
    bundle = train_images(parts, tmp_path / "b", cfg)
    m = bundle.manifest
    assert m.metrics["interrupted"] == 1.0 and m.metrics["test_accuracy"] >= 0.9
    chosen = json.loads((tmp_path / "b" / "report" / "selection.json").read_text())["chosen"]
    assert chosen["stage"] in ("frozen", "augment")  # a probe, with or without the flipped copies


def test_ctrl_c_after_fine_tuning_won_reports_the_model_it_exports(parts, tmp_path, monkeypatch):
    """A fine-tuning trial that won is not a model until its refit: Ctrl-C then exports the probe, and the
    report and manifest must describe that probe, not the fine-tuning's figures."""
    from plcsense.training.transfer import BackboneRun

    fine_tuning = BackboneRun._fine_tuning

    def won_then_interrupted(self):
        fine_tuning(self)
        tuned = [t for t in self.selection.trials if t.stage == "fine-tune"]
        assert tuned, "the fixture's run fine-tunes at least one depth"
        self.selection.best = tuned[-1]  # as if it had won
        raise KeyboardInterrupt

    monkeypatch.setattr(BackboneRun, "_fine_tuning", won_then_interrupted)
    cfg = ImageTrainConfig(
        arch="mobilenet_v2", weights=None, image_size=32, time_budget=240, name="parts",
        fine_tune_layers=10, fine_tune_epochs=2,  # one short depth: a fine-tuning trial is all this needs
        fine_tune_learning_rate=1e-5,
    )  # fmt: skip
    m = train_images(parts, tmp_path / "b", cfg).manifest
    selection = json.loads((tmp_path / "b" / "report" / "selection.json").read_text())
    assert m.metrics["interrupted"] == 1.0
    assert (
        selection["chosen"]["stage"] in ("frozen", "augment") and "not yet a complete model" in selection["interrupted"]
    )
    assert m.metrics["val_accuracy"] == pytest.approx(selection["chosen"]["val_accuracy"], abs=1e-4)


def test_ctrl_c_in_the_refit_exports_the_best_fold_model(parts, tmp_path, monkeypatch):
    """A refit cut short is no model, but the best fold's fine-tuned network is a complete one that beat the
    probe: Ctrl-C in the refit exports it, says so, and sets its ood threshold on that fold's validation photos,
    which it never learnt (5-fold over the fixture's 90 photos: 72 learnt, 18 not)."""
    m, selection = train_with_fine_tuning_winning(parts, tmp_path, monkeypatch, interrupt_refit=True)
    assert m.metrics["interrupted"] == 1.0
    assert selection["chosen"]["stage"] == "fine-tune"
    assert selection["refit"] == "interrupted (Ctrl-C): the best fold's model is exported"
    assert m.metrics["train_samples"] == 72 and m.metrics["val_samples"] == 18


def test_12bit_photos_train_and_predict_at_their_own_depth(parts, tmp_path):
    """Photos of a 12-bit camera in 16-bit files: training finds the depth, keeps it in the bundle, and the
    model sees every photo as the 8-bit original it was made from, in training and through the worker's
    decoder."""
    from plcsense.training.data import detect_sample_bits

    root = tmp_path / "12bit"
    for png in parts.rglob("*.png"):
        target = root / png.relative_to(parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(Image.open(png), dtype=np.uint16) * 16).save(target)  # 0..4080
    assert detect_sample_bits(sorted(root.rglob("*.png"))) == 12
    assert detect_sample_bits(sorted(parts.rglob("*.png"))) == 16  # 8-bit photos: nothing to scale
    cfg = ImageTrainConfig(arch="scratch", image_size=16, epochs=2, batch_size=8, augment=None, name="parts")
    bundle = train_images(root, tmp_path / "b", cfg)
    spec = bundle.manifest.input
    assert spec.sample_bits == 12
    photo = next((root / "test" / "dark").glob("*.png"))
    original = parts / "test" / "dark" / photo.name
    seen = [decode(p.read_bytes(), "image", bundle.manifest).array for p in (photo, original)]
    np.testing.assert_array_equal(*seen)


def test_corrupt_and_odd_images_are_handled(tmp_path):
    data = tmp_path / "mixed"
    write_image_folder(data, per_class=8)
    (data / "dark" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    (data / "bright" / "empty.png").write_bytes(b"")
    from PIL import Image

    Image.new("RGB", (50, 31), (250, 250, 250)).save(data / "bright" / "rgb_odd_size.png")
    Image.new("RGBA", (20, 20), (10, 10, 10, 255)).save(data / "dark" / "rgba.png")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "plcsense",
            "train",
            "images",
            str(data),
            "--arch",
            "scratch",
            "--no-augment",
            "--image-size",
            "16",
            "--epochs",
            "1",
            "--out",
            str(tmp_path / "b"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped 2 unreadable images" in proc.stderr
    assert "corrupt.jpg" in proc.stderr and "empty.png" in proc.stderr
    assert load_bundle(tmp_path / "b").manifest.input.color_mode == "rgb"  # one colour image: RGB for all


@pytest.mark.skipif(not NEU.is_dir(), reason="needs ../shared/data/neu-det (present in CI)")
@needs_weights
def test_neu_subsample_with_imagenet_weights(tmp_path):
    """A few dozen real steel-defect images: pretrained features separate them after a short head phase."""
    for cls in sorted(p.name for p in NEU.iterdir())[:3]:
        for split, files in (("train", range(1, 21)), ("test", range(21, 31))):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in files:
                shutil.copy(NEU / cls / f"{cls}_{i}.jpg", tmp_path / split / cls)
    cfg = ImageTrainConfig(
        arch="mobilenet_v2",
        weights=str(WEIGHTS),
        image_size=96,
        fine_tune_epochs=0,
        augment=None,
        val_split=0.2,
        name="neu",
    )
    train_images(tmp_path, tmp_path / "b", cfg)
    selection = json.loads((tmp_path / "b" / "report" / "selection.json").read_text())
    assert selection["time_budget_s"] == 600  # no budget given: the default for 48 photos
    from plcsense.training.evaluate import evaluate

    scores = evaluate(load_bundle(tmp_path / "b"), tmp_path / "test")
    assert scores["n"] == 30 and scores["accuracy"] >= 0.9
