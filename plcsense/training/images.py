"""``plcsense train images``: a classifier from a folder of labelled photos."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from plcsense.models.bundle import Bundle, ImageSpec, new_manifest
from plcsense.training.data import IMAGE_SUFFIXES, DataError, ImageSet, class_folders, load_image_folder
from plcsense.training.evaluate import classification_scores
from plcsense.training.export import check_output_dir, export_bundle
from plcsense.training.splits import split_indices

log = logging.getLogger("plcsense.training")


@dataclass
class ImageTrainConfig:
    image_size: int = 128
    color_mode: str = "auto"  # auto | grayscale | rgb
    epochs: int = 30
    batch_size: int = 32
    learning_rate: float = 1e-3
    seed: int = 42
    val_split: float = 0.15
    test_split: float = 0.15
    patience: int = 5
    name: str | None = None
    version: str = "1"


def detect_color_mode(root: Path) -> str:
    """``grayscale`` when every sampled image is single-channel, else ``rgb``."""
    for folder in class_folders(root):
        for file in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:20]:
            try:
                with Image.open(file) as image:
                    if image.mode not in ("L", "1", "I;16", "I"):
                        return "rgb"
            except OSError:
                continue
    return "grayscale"


def train_images(data_dir: Path, out: Path, cfg: ImageTrainConfig) -> Bundle:
    import keras

    from plcsense.models.architectures import scratch_cnn

    check_output_dir(out)
    mode = detect_color_mode(data_dir) if cfg.color_mode == "auto" else cfg.color_mode
    spec = ImageSpec(
        height=cfg.image_size, width=cfg.image_size, channels=1 if mode == "grayscale" else 3, color_mode=mode
    )
    data: ImageSet = load_image_folder(data_dir, spec)
    if len(data.classes) < 2:
        raise DataError(f"{data_dir} has one class folder ({data.classes[0]}); a classifier needs at least two")
    train, val, test = split_indices(data.labels, cfg.val_split, cfg.test_split, cfg.seed)
    log.info(
        "%d images, %d classes (%s), %s; split %d/%d/%d",
        len(data.labels),
        len(data.classes),
        ", ".join(data.classes),
        mode,
        len(train),
        len(val),
        len(test),
    )

    keras.utils.set_random_seed(cfg.seed)
    model = scratch_cnn(spec.shape, len(data.classes))
    model.compile(
        optimizer=keras.optimizers.Adam(cfg.learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(
        data.images[train],
        data.labels[train],
        validation_data=(data.images[val], data.labels[val]),
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        verbose=2,
        callbacks=[keras.callbacks.EarlyStopping(patience=cfg.patience, restore_best_weights=True)],
    )
    manifest = new_manifest(
        name=cfg.name or data_dir.resolve().name,
        version=cfg.version,
        task="classification",
        input=spec,
        labels=data.classes,
    )
    manifest.metrics.update({"train_samples": len(train), "val_samples": len(val), "test_samples": len(test)})

    def score(lite) -> dict[str, float]:
        held_out = test if len(test) else val
        scores = classification_scores(lite.predict(data.images[held_out]), data.labels[held_out])
        return {"test_accuracy": scores["accuracy"], "test_loss": scores["loss"]}

    golden = data.images[test if len(test) else val]
    return export_bundle(out, model, manifest, golden, score)
