"""Knowing when a result cannot be trusted: a classifier's out-of-distribution score, from the exported graph
through ``evaluate`` to the worker's results and metrics.

The tiny image bundle (conftest) knows three families of grey pictures (bright, dark, striped); pictures of
other families go through the worker's own decode + LiteRT path and must come out ``unknown``, while fresh
pictures of the three known families must not.
"""

from __future__ import annotations

import io
import logging
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from plcsense.models.backbones import classifier
from plcsense.models.bundle import Bundle, ImageSpec, load_bundle, new_manifest, split_outputs
from plcsense.training.evaluate import evaluate, format_table
from plcsense.training.export import export_bundle
from plcsense.training.ood import (
    FITTED,
    SATURATED,
    _rows_not_in,
    fit_threshold,
    mahalanobis,
    penultimate,
    unit_length,
    with_ood,
)
from plcsense.worker.decoders import decode
from tests.conftest import SHARED_DATA, Collector, publish_all, write_image_folder
from tests.test_pipeline import inbound, pipeline_for

NEU = SHARED_DATA / "neu-det"
SIZE = 24  # the side of the pictures write_image_folder makes


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="L").save(buffer, "PNG")
    return buffer.getvalue()


def foreign_pictures(n: int, seed: int = 5) -> list[bytes]:
    """Pictures of families the bundle never saw: uniform noise and checkerboards of random square size."""
    rng = np.random.default_rng(seed)
    grid = np.arange(SIZE)
    noise = [png(rng.uniform(0, 255, (SIZE, SIZE))) for _ in range(n // 2)]
    boards = [
        png(np.where((grid[:, None] // k + grid[None] // k) % 2, 230, 20) + rng.normal(0, 12, (SIZE, SIZE)))
        for k in rng.integers(2, 7, n - n // 2)
    ]
    return noise + boards


def fresh_known_pictures(root: Path) -> list[bytes]:
    """New pictures of the three known families (another seed than the training set's)."""
    write_image_folder(root, per_class=20, seed=11)
    return [p.read_bytes() for p in sorted(root.glob("*/*.png"))]


def flagged(bundle: Bundle, payloads: list[bytes]) -> np.ndarray:
    """Which payloads the worker's decode + LiteRT path reports unknown."""
    inputs = np.stack([decode(p, "image", bundle.manifest).array for p in payloads])
    probabilities, ood = split_outputs(bundle.manifest, bundle.model.predict(inputs))
    assert ood is not None and bundle.manifest.ood is not None
    assert probabilities.shape == (len(payloads), 3)
    return ood > bundle.manifest.ood.threshold


def test_foreign_pictures_are_flagged_and_known_ones_are_not(image_bundle, tmp_path):
    bundle = load_bundle(image_bundle)
    assert bundle.manifest.ood is not None and bundle.manifest.ood.score == "mahalanobis"
    assert 0 < bundle.manifest.ood.threshold < SATURATED
    assert 0 <= bundle.manifest.metrics["test_unknown"] <= 0.2  # of 11 test pictures
    assert flagged(bundle, foreign_pictures(60)).mean() >= 0.9
    assert flagged(bundle, fresh_known_pictures(tmp_path / "known")).mean() <= 0.1


@pytest.mark.skipif(not NEU.is_dir(), reason="needs ../shared/data/neu-det (the NEU steel photos; present in CI)")
def test_steel_photos_are_foreign_to_the_grey_pictures_model(image_bundle):
    bundle = load_bundle(image_bundle)
    photos = [p.read_bytes() for folder in sorted(NEU.iterdir()) for p in sorted(folder.glob("*.jpg"))[:20]]
    assert flagged(bundle, photos).mean() >= 0.9


def test_evaluate_has_an_unknown_column(image_bundle, tmp_path):
    known = tmp_path / "known"
    fresh_known_pictures(known)
    foreign = tmp_path / "foreign"  # foreign pictures filed under the model's own class names
    for i, payload in enumerate(foreign_pictures(30)):
        folder = foreign / ("bright", "dark", "striped")[i % 3]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:03d}.png").write_bytes(payload)
    bundle = load_bundle(image_bundle)
    rows = {"known": evaluate(bundle, known), "foreign": evaluate(bundle, foreign)}
    assert rows["known"]["accuracy"] >= 0.9 and rows["known"]["unknown"] <= 0.1
    assert rows["foreign"]["unknown"] >= 0.9
    header = format_table(rows).splitlines()[0].split()
    assert "unknown" in header and "accuracy" in header


def test_predict_says_unknown(image_bundle, tmp_path):
    files = []
    for i, payload in enumerate(foreign_pictures(5)):
        files.append(tmp_path / f"foreign{i}.png")
        files[-1].write_bytes(payload)
    proc = subprocess.run(
        [sys.executable, "-m", "plcsense", "predict", str(image_bundle), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 5
    unknown = [line for line in lines if "\tunknown: unlike the training data (ood score " in line]
    assert len(unknown) >= 3, lines  # the model flags >= 90 % of these (test above)


def test_worker_results_say_unknown_and_count_it(broker, image_bundle, image_data, run_worker, collectors):
    worker = run_worker(
        broker, [{"name": "cam", "topic": "line/+/cam", "model": str(image_bundle), "encoding": "image"}]
    )
    out = Collector(broker, "line/#")
    collectors.append(out)
    known = [(image_data / c / "001.png").read_bytes() for c in ("bright", "dark", "striped")]
    publish_all(broker, "line/1/cam", [*known, *foreign_pictures(6)])
    results = out.wait_for(9, "/result")
    assert [r["label"] for r in results[:3]] == ["bright", "dark", "striped"]
    assert [r["unknown"] for r in results] == [False] * 3 + [True] * 6
    threshold = load_bundle(image_bundle).manifest.ood.threshold
    for r in results:
        assert (r["ood_score"] > threshold) == r["unknown"]
        assert sorted(t["label"] for t in r["top"]) == ["bright", "dark", "striped"]  # the ood score is no class
        assert abs(sum(t["score"] for t in r["top"]) - 1) < 1e-3
    assert worker.metric("plcsense_unknown_inputs_total", route="cam") == 6


def test_a_bundle_without_ood_answers_as_before(tmp_path):
    """Bundles exported before the ood score (no ``ood`` in the manifest) load and answer without the fields."""
    spec = ImageSpec(height=4, width=4, channels=1, color_mode="grayscale")
    pixels = keras.Input(spec.shape)
    model = keras.Model(pixels, keras.layers.Dense(2, activation="softmax")(keras.layers.Flatten()(pixels)))
    manifest = new_manifest(name="old", version="1", task="classification", input=spec, labels=["a", "b"])
    golden = np.random.default_rng(0).uniform(0, 255, (3, *spec.shape)).astype(np.float32)
    bundle = export_bundle(tmp_path / "old", model, manifest, golden, lambda lite: {})
    assert bundle.manifest.ood is None and bundle.model.output_shape == (2,)
    pipeline, answers = pipeline_for({"name": "cam", "topic": "cam/+", "model": str(bundle.path), "encoding": "image"})
    try:
        assert pipeline.handle(inbound(pipeline, "cam/1", png(np.full((4, 4), 200.0)))) is None
        (doc,) = answers.wait(1)
    finally:
        pipeline.close()
    assert doc["label"] in ("a", "b") and len(doc["top"]) == 2
    assert "unknown" not in doc and "ood_score" not in doc


def test_the_score_in_the_graph_is_the_fitted_one_and_leaves_the_probabilities_alone():
    """A backbone classifier (nested head): the exported output is the model's probabilities plus
    ``1 - exp(-d / scale)`` of the Mahalanobis distance computed in NumPy from the same fit."""
    net = classifier("mobilenet_v2", (32, 32, 3), 3, weights=None)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (30, 32, 32, 3)).astype(np.float32)
    y = np.arange(30) % 3
    scored = with_ood(net.model, (x[:24], y[:24]), x[24:], 3, batch_size=8)
    assert scored.output_shape == (None, 4)
    out = scored.predict(x, verbose=0)
    np.testing.assert_allclose(out[:, :3], net.model.predict(x, verbose=0), atol=1e-6)
    features = keras.Model(net.model.inputs, penultimate(net.model)).predict(x, verbose=0)
    fitted = dict(zip(FITTED, scored.get_layer("ood_score").get_weights(), strict=True))
    expected = 1 - np.exp(-mahalanobis(unit_length(features), fitted) / fitted["scale"])
    np.testing.assert_allclose(out[:, 3], expected, atol=2e-3)


def test_a_saturated_threshold_is_reported(caplog):
    with caplog.at_level(logging.WARNING, logger="plcsense.training"):
        assert fit_threshold(np.array([0.0, 0.0, 1.0, 1.0])) == 1.0
    assert "no input can be flagged unknown" in caplog.text
    caplog.clear()
    # the 99th percentile at position 0.99 (n + 1): the largest score is exceeded by 1 / (n + 1) of new ones
    assert fit_threshold(np.linspace(0, 0.5, 101)) == pytest.approx(0.4999)
    assert fit_threshold(np.linspace(0, 0.5, 36)) == 0.5
    assert not caplog.text


def test_validation_photos_in_the_training_part_are_left_out_of_the_fit():
    """A final refit on training plus validation hands both over (its photos as uint8, the validation part as
    float32): the statistics must not see the validation photos, or their scores and the threshold come out low."""
    photos = np.random.default_rng(0).integers(0, 256, (10, 4, 4, 3), dtype=np.uint8)
    assert _rows_not_in(photos, photos[[2, 5]].astype(np.float32)).tolist() == [i not in (2, 5) for i in range(10)]
