"""Out-of-distribution acceptance: foreign photos pushed through a trained classifier come out ``unknown``, the
classifier's own test photos do not.

    .venv/bin/python bench/ood.py [--workdir .bench/ood] [--only digits|neu] [--time-budget S]

Two pairs, each model trained with the product's code and defaults, every photo sent through the worker's own
decode + LiteRT path (``plcsense.worker.decoders.decode``, then the bundle's model):

- digits -> NEU: the demo's digit classifier (``plcsense.demo.prepare``: scikit-learn's 1,797 8x8 scans as
  PNGs, the scratch CNN at 32 px); own test set: the seeded 15 % test part the training held out; foreign: all
  1,800 NEU steel photos.
- NEU -> digits: a MobileNetV2 classifier (``../shared/weights``; ``train images`` defaults: settings chosen
  by validation within the time budget, then a refit on training plus validation) trained on a seeded 80 % of
  NEU; own test set: the other 20 % (a ``test/`` folder the training never sees, scored with ``plcsense
  evaluate``'s code); foreign: all 1,797 digit scans.

Prints one JSON line per pair: the share of own test photos and of foreign photos flagged unknown, the
threshold, the test accuracy and the training time. Acceptance: foreign >= 0.90 while own <= 0.05.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from images import split_folder  # bench/images.py: the seeded 80/20 NEU split

from plcsense.demo import prepare
from plcsense.models.bundle import Bundle, load_bundle, split_outputs
from plcsense.models.runtime import predict_all
from plcsense.training.data import IMAGE_SUFFIXES, class_folders
from plcsense.training.evaluate import evaluate
from plcsense.training.images import ImageTrainConfig, train_images
from plcsense.training.splits import split_indices
from plcsense.worker.decoders import decode

SHARED = Path(__file__).resolve().parents[2] / "shared"
NEU = SHARED / "data" / "neu-det"
WEIGHTS = SHARED / "weights" / "mobilenet_v2_1.0_224_no_top.h5"


def photos(root: Path) -> tuple[list[Path], np.ndarray]:
    """Every photo under ``root/<class>/`` and its class index, in the order training loads them."""
    files, labels = [], []
    for index, folder in enumerate(class_folders(root)):
        found = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        files += found
        labels += [index] * len(found)
    return files, np.asarray(labels)


def unknown_share(bundle: Bundle, files: list[Path]) -> float:
    """Share of ``files`` flagged unknown, each decoded as the worker decodes an MQTT payload."""
    assert bundle.manifest.ood is not None, f"{bundle.path} has no ood score; delete it to retrain"
    inputs = np.stack([decode(f.read_bytes(), "image", bundle.manifest).array for f in files])
    _, ood = split_outputs(bundle.manifest, predict_all(bundle.model, inputs))
    assert ood is not None
    return float(np.mean(ood > bundle.manifest.ood.threshold))


def report(
    pair: str, bundle: Bundle, own: float, foreign: float, n: tuple[int, int], accuracy: float, seconds: float
) -> None:
    assert bundle.manifest.ood is not None
    print(
        json.dumps(
            {
                "pair": pair,
                "own_test_unknown": round(own, 4),
                "foreign_unknown": round(foreign, 4),
                "own_test_n": n[0],
                "foreign_n": n[1],
                "threshold": round(bundle.manifest.ood.threshold, 4),
                "test_accuracy": round(accuracy, 4),
                "train_seconds": round(seconds, 1),
                "accepted": foreign >= 0.9 and own <= 0.05,
            }
        ),
        flush=True,
    )


def digits_into_neu(workdir: Path) -> None:
    started = time.perf_counter()
    digits, _ = prepare(workdir / "demo")  # trains .../bundles/digits once, with the demo's settings
    seconds = time.perf_counter() - started
    bundle = load_bundle(workdir / "demo" / "bundles" / "digits")
    files, labels = photos(digits)
    _, _, test = split_indices(labels, 0.15, 0.15, 42)  # the scratch CNN's seeded split: the test part it held out
    own = unknown_share(bundle, [files[i] for i in test])
    foreign = photos(NEU)[0]
    accuracy = bundle.manifest.metrics["test_accuracy"]
    shares = own, unknown_share(bundle, foreign)
    report("digits model <- NEU photos", bundle, *shares, (len(test), len(foreign)), accuracy, seconds)


def neu_into_digits(workdir: Path, time_budget: float | None) -> None:
    split_folder(NEU, workdir / "neu-split")
    out = workdir / "neu-mnv2"
    started = time.perf_counter()
    if not (out / "manifest.json").exists():
        cfg = ImageTrainConfig(weights=str(WEIGHTS), name="neu", time_budget=time_budget)
        train_images(workdir / "neu-split" / "train", out, cfg)
    seconds = time.perf_counter() - started
    bundle = load_bundle(out)
    scores = evaluate(bundle, workdir / "neu-split" / "test")
    foreign = photos(prepare(workdir / "demo")[0])[0]
    shares = scores["unknown"], unknown_share(bundle, foreign)
    report("NEU model <- digit scans", bundle, *shares, (scores["n"], len(foreign)), scores["accuracy"], seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(".bench/ood"))
    parser.add_argument("--only", choices=["digits", "neu"])
    parser.add_argument("--time-budget", type=float, help="seconds for the NEU training run (default: the product's)")
    args = parser.parse_args()
    if not NEU.is_dir() or not WEIGHTS.is_file():
        raise SystemExit(f"bench/ood.py needs {NEU} and {WEIGHTS} (../shared, present in CI)")
    if args.only != "neu":
        digits_into_neu(args.workdir)
    if args.only != "digits":
        neu_into_digits(args.workdir, args.time_budget)


if __name__ == "__main__":
    main()
