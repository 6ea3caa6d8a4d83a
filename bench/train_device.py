"""NEU steel defects on an accelerator: MobileNetV2 trained by Keras on any backend, exported and scored elsewhere.

A GPU machine needs Keras and a backend only (JAX brings CUDA); the LiteRT export needs TensorFlow, which such a
machine may not have. So the benchmark has two halves:

    KERAS_BACKEND=jax python bench/train_device.py train --data DATA --weights W.h5 --out RUN
        # NEU's seeded 80/20 split (bench/images.py's), a fixed recipe; writes RUN/model.keras and RUN/timing.json
        # (backend, device, precision, seconds per phase and per epoch, training images per second)
    python bench/train_device.py export RUN --data DATA --out BUNDLE
        # with TensorFlow: the same split, the product's export (ood fit, LiteRT conversion, golden samples,
        # report), the exported model's accuracy on the test 20 % through the worker's LiteRT; prints one JSON line

The recipe is fixed, not ``plcsense train images``' selection (which chooses resolution, pooling, weighting and
fine-tuning depth within a time budget): 224 px (``--image-size``), the head on the frozen backbone, then the
backbone's upper half fine-tuned, flips as augmentation, balanced class weights, early stopping on a stratified
20 % of the training part. It measures what the device does to the training time of one model, and that the
bundle is as good.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.model_selection import train_test_split

SHARED = Path(__file__).resolve().parents[2] / "shared"
SEED = 42
BATCH = 96  # divides the training (1,152) and validation (288) parts: no partial batch, no extra compilation


def split(data: Path) -> tuple[dict[str, tuple[list[Path], np.ndarray]], list[str]]:
    """train/val/test files and labels: bench/images.py's seeded 80/20 split, then a stratified 20 % for val."""
    files = sorted(p for p in data.glob("*/*") if p.is_file())
    classes = sorted({p.parent.name for p in files})
    labels = [p.parent.name for p in files]
    train, test = train_test_split(np.array(files), test_size=0.2, random_state=SEED, stratify=labels)
    fit, val = train_test_split(train, test_size=0.2, random_state=SEED, stratify=[p.parent.name for p in train])
    parts = {"train": fit, "val": val, "test": test}
    return {k: (list(v), np.array([classes.index(p.parent.name) for p in v])) for k, v in parts.items()}, classes


def load_rgb(files: list[Path], size: int) -> np.ndarray:
    """(n, size, size, 3) uint8 as the worker decodes them (RGB, bilinear resize), without plcsense.models, whose
    LiteRT and pydantic a training-only machine may lack; ``export`` checks it against the product's loader."""
    out = np.empty((len(files), size, size, 3), np.uint8)
    for i, path in enumerate(files):
        with Image.open(path) as image:
            out[i] = np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))
    return out


def train(data: Path, weights: Path, out: Path, size: int, head_epochs: int, fine_tune_epochs: int) -> None:
    from plcsense.quiet import import_tensorflow_quietly

    import_tensorflow_quietly()
    import keras

    from plcsense.models.backbones import classifier, cut_near, unfreeze_above
    from plcsense.training.backend import configure

    begun = time.perf_counter()
    timing: dict[str, object] = {**configure().record(), "image_size": size}
    parts, classes = split(data)
    x_train, y_train = load_rgb(parts["train"][0], size), parts["train"][1]
    x_val, y_val = load_rgb(parts["val"][0], size), parts["val"][1]
    timing["load_seconds"] = round(time.perf_counter() - begun, 1)
    keras.utils.set_random_seed(SEED)
    net = classifier("mobilenet_v2", (size, size, 3), len(classes), weights=str(weights))
    assert net.backbone is not None
    pixels = keras.Input((size, size, 3))
    trainer = keras.Model(pixels, net.model(keras.layers.RandomFlip("horizontal_and_vertical", seed=SEED)(pixels)))
    counts = np.bincount(y_train, minlength=len(classes))
    class_weight = {c: len(y_train) / (len(classes) * max(n, 1)) for c, n in enumerate(counts)}
    curves: dict[str, list[float]] = {}

    def phase(name: str, learning_rate: float, epochs: int) -> None:
        seconds: list[float] = []
        clock = keras.callbacks.LambdaCallback(
            on_epoch_begin=lambda *_: seconds.append(time.perf_counter()),
            on_epoch_end=lambda *_: seconds.append(time.perf_counter() - seconds.pop()),
        )
        trainer.compile(
            keras.optimizers.Adam(learning_rate), loss="sparse_categorical_crossentropy", metrics=["accuracy"]
        )
        started = time.perf_counter()
        history = trainer.fit(
            x_train.astype(np.float32),
            y_train,
            validation_data=(x_val.astype(np.float32), y_val),
            epochs=epochs,
            batch_size=BATCH,
            class_weight=class_weight,
            callbacks=[keras.callbacks.EarlyStopping(patience=5, restore_best_weights=True), clock],
            verbose=2,
        )
        steady = sorted(seconds[1:]) or seconds  # the first epoch includes compiling the step
        timing[name] = {
            "seconds": round(time.perf_counter() - started, 1),
            "epochs": len(seconds),
            "first_epoch_seconds": round(seconds[0], 2),
            "epoch_seconds_median": round(steady[len(steady) // 2], 3),
            "train_images_per_second": round(len(y_train) / steady[len(steady) // 2], 1),
            "best_val_accuracy": round(max(history.history["val_accuracy"]), 4),
        }
        if curves:
            curves["phase_boundary"] = [float(len(curves["loss"]))]
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            curves[key] = curves.get(key, []) + [float(v) for v in history.history[key]]

    phase("head", 1e-3, head_epochs)
    timing["fine_tuned_layers"] = unfreeze_above(net.backbone, cut_near(net.backbone, 0.5))
    phase("fine_tune", 2e-4, fine_tune_epochs)
    out.mkdir(parents=True, exist_ok=True)
    net.model.save(out / "model.keras")
    timing["total_seconds"] = round(time.perf_counter() - begun, 1)
    (out / "timing.json").write_text(json.dumps({**timing, "classes": classes, "curves": curves}, indent=1))
    print(json.dumps(timing))


def export(run_dir: Path, data: Path, out: Path) -> None:
    from plcsense.quiet import import_tensorflow_quietly

    import_tensorflow_quietly()
    import keras

    from plcsense.models.bundle import ImageSpec
    from plcsense.models.inputs import load_image_file
    from plcsense.training.backend import as_float32
    from plcsense.training.classifier import ClassifierConfig, ClassifierRun, Schedule, Splits

    timing = json.loads((run_dir / "timing.json").read_text())
    parts, classes = split(data)
    assert classes == timing["classes"]
    size = timing["image_size"]
    spec = ImageSpec(height=size, width=size, channels=3, color_mode="rgb")
    arrays = {k: np.stack([load_image_file(str(p), spec) for p in files]) for k, (files, _) in parts.items()}
    same = np.array_equal(arrays["val"][:20], load_rgb(parts["val"][0][:20], size))
    assert same, "the training machine decoded the photos differently from the worker"
    splits = Splits(classes, *((arrays[k], parts[k][1]) for k in ("train", "val", "test")))
    started = time.perf_counter()
    model = as_float32(keras.saving.load_model(run_dir / "model.keras", compile=False))
    run = ClassifierRun(data, ClassifierConfig(name="neu"), splits, Schedule(5, 0.5, 2, 1e-6), describe="NEU photos")
    run.history = timing.pop("curves")
    bundle = run.export(out, model, spec, show_misclassified=True)
    metrics = bundle.manifest.metrics
    result = {
        "test_n": len(parts["test"][1]),
        "test_accuracy": metrics["test_accuracy"],
        "test_loss": metrics["test_loss"],
        "export_seconds": round(time.perf_counter() - started, 1),
        "model_bytes": (out / "model.tflite").stat().st_size,
        **{k: v for k, v in timing.items() if k != "classes"},
    }
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    tr = sub.add_parser("train", help="train on this machine's Keras backend and device")
    tr.add_argument("--data", type=Path, default=SHARED / "data" / "neu-det")
    tr.add_argument("--weights", type=Path, default=SHARED / "weights" / "mobilenet_v2_1.0_224_no_top.h5")
    tr.add_argument("--out", type=Path, required=True)
    tr.add_argument("--image-size", type=int, default=224)
    tr.add_argument("--head-epochs", type=int, default=10)
    tr.add_argument("--fine-tune-epochs", type=int, default=20)
    ex = sub.add_parser("export", help="export a trained run as a bundle and score it (needs TensorFlow)")
    ex.add_argument("run", type=Path)
    ex.add_argument("--data", type=Path, default=SHARED / "data" / "neu-det")
    ex.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.step == "train":
        train(args.data, args.weights, args.out, args.image_size, args.head_epochs, args.fine_tune_epochs)
    else:
        export(args.run, args.data, args.out)


if __name__ == "__main__":
    main()
