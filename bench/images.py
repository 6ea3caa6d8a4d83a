"""NEU steel-defect benchmark: seeded 80/20 split, train with the product's code, score on the held-out 20 %.

    .venv/bin/python bench/images.py [--arch mobilenet_v2] [--weights ../shared/weights/...h5] [--quantize int8]

Prints one JSON line: test accuracy of the exported (LiteRT) model on the 20 % test folder, training time,
and the manifest's per-variant figures (float32 / float16 / int8 accuracy and top-1 agreement).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from plcsense.models.bundle import load_bundle
from plcsense.training.evaluate import evaluate
from plcsense.training.images import Augment, ImageTrainConfig, train_images

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "neu-det")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/plcsense-bench-neu"))
    parser.add_argument("--arch", default="mobilenet_v2")
    parser.add_argument("--weights", default=str(SHARED / "weights" / "mobilenet_v2_1.0_224_no_top.h5"))
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--fine-tune-epochs", type=int, default=10)
    parser.add_argument("--fine-tune-layers", type=int, default=30)
    parser.add_argument("--quantize", default="none", choices=["none", "float16", "int8"])
    parser.add_argument("--no-augment", action="store_true")
    args = parser.parse_args()

    split_folder(args.data, args.workdir / "split")
    out = args.workdir / f"bundle-{args.arch}-{args.quantize}"
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
        name="neu",
    )
    started = time.perf_counter()
    train_images(args.workdir / "split" / "train", out, cfg)
    train_seconds = time.perf_counter() - started
    bundle = load_bundle(out)
    scores = evaluate(bundle, args.workdir / "split" / "test")
    print(
        json.dumps(
            {
                "arch": args.arch,
                "quantize": args.quantize,
                "test_n": scores["n"],
                "test_accuracy": scores["accuracy"],
                "test_loss": scores["loss"],
                "train_seconds": round(train_seconds, 1),
                "model_bytes": (out / "model.tflite").stat().st_size,
                "variants": bundle.manifest.variants,
            }
        )
    )


if __name__ == "__main__":
    main()
