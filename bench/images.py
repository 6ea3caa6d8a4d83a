"""NEU steel-defect benchmark: seeded 80/20 split, train with the product's code, score on the held-out 20 %.

    .venv/bin/python bench/images.py [--arch mobilenet_v2] [--weights ../shared/weights/...h5] [--quantize int8]
    .venv/bin/python bench/images.py --variant grey64 --probe     # a harder variant (bench/neu_variants.py)
    .venv/bin/python bench/images.py --variant grey64 --probe --draw 1   # the same recipe, other photos

Prints one JSON line: test accuracy of the exported (LiteRT) model on the test folder (with ``--quantize``, also
that of the float32 model of the same training and the two models' top-1 agreement there), training time, the Keras
backend, device and precision it trained with and the whole run's wall time, the
manifest's per-variant figures (float32 / float16 / int8 accuracy and top-1 agreement), what the selection
chose, the test folder's majority-class rate and, with ``--probe``, the accuracy of a linear probe (logistic
regression on the frozen backbone's 224 px mean-pooled features, the old default's head) on the same folders.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
from neu_variants import DEV, HELD_BACK, PASTED, Pasted, redrawn, write_pasted, write_variant
from sklearn.model_selection import train_test_split

from plcsense.models.bundle import Bundle, load_bundle, split_outputs
from plcsense.models.runtime import LiteRTModel, predict_all
from plcsense.training.backend import configure
from plcsense.training.data import load_image_folder
from plcsense.training.evaluate import classifier_summary
from plcsense.training.image_config import Augment, ImageTrainConfig
from plcsense.training.images import train_images

SHARED = Path(__file__).resolve().parents[2] / "shared"


def split_folder(source: Path, target: Path, seed: int = 42, test: float = 0.2) -> None:
    """``target/train/<class>`` and ``target/test/<class>`` as symlinks, stratified and seeded."""
    if (target / "train").exists():
        return
    files = sorted(p for p in source.glob("*/*") if p.is_file())
    labels = [p.parent.name for p in files]
    train, held = train_test_split(np.array(files), test_size=test, random_state=seed, stratify=labels)
    for part, chosen in (("train", train), ("test", held)):
        for f in chosen:
            dest = target / part / f.parent.name / f.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.symlink_to(f)


def linear_probe(train: Path, test: Path, weights: str) -> float:
    """Test accuracy of logistic regression on frozen MobileNetV2 224 px mean-pooled features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from plcsense.models.backbones import build_backbone
    from plcsense.training.image_select import Tap
    from plcsense.training.transfer import list_photos, load_pixels

    backbone = build_backbone("mobilenet_v2", (None, None, 3), None if weights == "none" else weights)
    tap = Tap("mobilenet_v2", backbone, [])
    train_photos, classes = list_photos(train)
    test_photos = list_photos(test, classes)[0]
    features = {}
    for name, photos in (("train", train_photos), ("test", test_photos)):
        pixels, kept = load_pixels(photos, 224)
        features[name] = (tap.run(pixels)[0][:, :1280], kept.labels)
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(*features["train"])
    return float(probe.score(*features["test"]))


def float_and_exported(bundle: Bundle, test: Path) -> dict:
    """Test figures of the exported model and, for a quantised bundle, of the float32 model of the same training.

    The float model is the bundle's ``model.keras`` converted as the export converts its float32 variant, so one
    training scores both on the same test photos through LiteRT.
    """
    from plcsense.training.export import to_tflite
    from plcsense.training.ood import MahalanobisScore  # noqa: F401  (registers the layer for loading)

    manifest = bundle.manifest
    assert manifest.labels is not None
    images = load_image_folder(test, manifest.input, classes=manifest.labels)
    inputs = images.images.astype("float32")
    scores = {"exported": classifier_summary(bundle, inputs, images.labels)}
    if manifest.quantization == "none":
        return scores
    import keras

    float_path = bundle.path.with_name(bundle.path.name + ".float32.tflite")
    float_path.write_bytes(to_tflite(keras.saving.load_model(bundle.path / "model.keras", compile=False)))
    lite = LiteRTModel(float_path)
    scores["float32"] = classifier_summary(Bundle(bundle.path, manifest, lite, bundle.digest), inputs, images.labels)
    top1 = [split_outputs(manifest, predict_all(m, inputs))[0].argmax(axis=1) for m in (lite, bundle.model)]
    scores["top1_agreement"] = float(np.mean(top1[0] == top1[1]))
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "neu-det")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/plcsense-bench-neu"))
    parser.add_argument("--arch", default="mobilenet_v2")
    parser.add_argument("--weights", default=str(SHARED / "weights" / "mobilenet_v2_1.0_224_no_top.h5"))
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=30, help="scratch CNN")
    parser.add_argument("--fine-tune-epochs", type=int, default=15)
    parser.add_argument("--fine-tune-layers", type=int, default=None, help="default: chosen by validation")
    parser.add_argument("--quantize", default="none", choices=["none", "float16", "int8"])
    parser.add_argument(
        "--min-agreement", type=float, default=None, help="quantised export's required top-1 agreement (0: measure)"
    )
    parser.add_argument("--no-augment", action="store_true")
    parser.add_argument("--time-budget", type=float, help="seconds (default: the product's own)")
    parser.add_argument(
        "--variant", choices=sorted({**DEV, **HELD_BACK, **PASTED}), help="a harder NEU variant instead of NEU"
    )
    parser.add_argument("--probe", action="store_true", help="also score the linear-probe baseline")
    parser.add_argument(
        "--draw", type=int, default=0, help="with --variant: another random draw of its photos (0: the variant's own)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")  # the selection's progress lines
    begun = time.perf_counter()
    device = configure()  # backend, device and precision, as `plcsense train` sets them

    if args.variant:
        variant = {**DEV, **HELD_BACK, **PASTED}[args.variant]
        name = args.variant + (f"-draw{args.draw}" if args.draw else "")
        write = write_pasted if isinstance(variant, Pasted) else write_variant
        split = write(redrawn(variant, args.draw), args.workdir / "variants" / name)
    else:
        split = args.workdir / "split"
        split_folder(args.data, split)
    out = args.workdir / f"bundle-{args.variant or 'neu'}-{args.arch}-{args.quantize}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = ImageTrainConfig(
        arch=args.arch,
        weights=None if args.weights == "none" else args.weights,
        image_size=args.image_size,
        epochs=args.epochs,
        fine_tune_epochs=args.fine_tune_epochs,
        fine_tune_layers=args.fine_tune_layers,
        quantize=args.quantize,
        augment=Augment.parse("none" if args.no_augment else "auto", args.arch),
        time_budget=args.time_budget,
        name=args.variant or "neu",
    )
    if args.min_agreement is not None:
        cfg.min_agreement = args.min_agreement
    started = time.perf_counter()
    train_images(split / "train", out, cfg)
    train_seconds = time.perf_counter() - started
    bundle = load_bundle(out)
    measured = float_and_exported(bundle, split / "test")
    scores = measured["exported"]
    labels = [p.parent.name for p in (split / "test").glob("*/*")]
    selection = out / "report" / "selection.json"
    print(
        json.dumps(
            {
                "data": args.variant or "neu",
                "draw": args.draw if args.variant else None,
                "majority_rate": max(labels.count(c) for c in set(labels)) / len(labels),
                "probe_accuracy": linear_probe(split / "train", split / "test", args.weights) if args.probe else None,
                "chosen": json.loads(selection.read_text())["chosen"] if selection.is_file() else None,
                "arch": args.arch,
                "quantize": args.quantize,
                "test_n": scores["n"],
                "test_accuracy": scores["accuracy"],
                "test_loss": scores["loss"],
                "test_confusion": scores["confusion_matrix"],
                "float32_test_accuracy": measured["float32"]["accuracy"] if "float32" in measured else None,
                "float32_test_confusion": measured["float32"]["confusion_matrix"] if "float32" in measured else None,
                "test_top1_agreement": measured.get("top1_agreement"),
                "test_unknown": scores.get("unknown"),
                "train_seconds": round(train_seconds, 1),
                "wall_seconds": round(time.perf_counter() - begun, 1),
                **device.record(),
                "model_bytes": (out / "model.tflite").stat().st_size,
                "variants": bundle.manifest.variants,
            }
        )
    )


if __name__ == "__main__":
    main()
