"""``plcsense train images``: a classifier from a folder of labelled photos.

On an ImageNet backbone the run chooses its own settings by validation on the training data, within
``time_budget`` seconds (:mod:`plcsense.training.image_select`): input resolution, pooling, class weighting,
augmentation and fine-tuning depth, then a final refit on training plus validation data with what won. The
from-scratch CNN trains one fixed recipe within the same budget (no refit: its epochs are chosen by early
stopping on the validation part). Ctrl-C ends training and exports the best model so far.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import keras
import numpy as np
from PIL import Image

from plcsense.models.backbones import augmentation, classifier, default_image_size
from plcsense.models.bundle import Bundle, ImageSpec
from plcsense.training.classifier import ClassifierRun, EpochBudget, Schedule, Splits
from plcsense.training.clock import Clock
from plcsense.training.data import (
    IMAGE_SUFFIXES,
    IMAGES,
    ImageSet,
    class_files,
    class_folders,
    detect_sample_bits,
    load_image_folder,
    require_examples,
)
from plcsense.training.export import check_output_dir
from plcsense.training.image_config import DEFAULT_TIME_BUDGET, ImageTrainConfig
from plcsense.training.splits import split_indices

log = logging.getLogger("plcsense.training")


def detect_color_mode(root: Path) -> str:
    """``grayscale`` when every sampled image is single-channel, else ``rgb``."""
    for folder in class_folders(root):
        for file in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:20]:
            try:
                with Image.open(file) as image:
                    if image.mode not in ("L", "1", "I") and not image.mode.startswith("I;16"):
                        return "rgb"
            except (OSError, Image.DecompressionBombError):
                continue
    return "grayscale"


def load_splits(data_dir: Path, spec: ImageSpec, cfg: ImageTrainConfig) -> Splits:
    """Explicit ``train/``, ``val/``, ``test/`` sub-folders when present, else a seeded stratified split."""
    if (data_dir / "train").is_dir():
        train = load_image_folder(data_dir / "train", spec)
        require_examples(train.labels, train.classes, data_dir / "train")
        parts = {
            name: load_image_folder(data_dir / name, spec, classes=train.classes)
            for name in ("val", "test")
            if (data_dir / name).is_dir()
        }
        missing = [n for n in ("val", "test") if n not in parts]
        fractions = {
            "val": cfg.val_split if "val" in missing else 0,
            "test": cfg.test_split if "test" in missing else 0,
        }
        tr, va, te = split_indices(train.labels, fractions["val"], fractions["test"], cfg.seed)
        pick = {"val": va, "test": te}

        def part(name: str) -> tuple[np.ndarray, np.ndarray]:
            if name in parts:
                return parts[name].images, parts[name].labels
            return train.images[pick[name]], train.labels[pick[name]]

        return Splits(train.classes, (train.images[tr], train.labels[tr]), part("val"), part("test"))
    data: ImageSet = load_image_folder(data_dir, spec)
    require_examples(data.labels, data.classes, data_dir)
    return Splits.seeded(data.images, data.labels, data.classes, cfg)


def train_images(data_dir: Path, out: Path, cfg: ImageTrainConfig) -> Bundle:
    check_output_dir(out)
    if cfg.arch == "scratch":
        return _train_scratch(data_dir, out, cfg)
    from plcsense.training.transfer import train_backbone

    return train_backbone(data_dir, out, cfg)


def _train_scratch(data_dir: Path, out: Path, cfg: ImageTrainConfig) -> Bundle:
    """The small CNN from random weights: one recipe, fitted with augmentation and early stopping, ended early
    when ``time_budget`` would not allow another epoch and the export."""
    clock = Clock(cfg.time_budget or DEFAULT_TIME_BUDGET)
    cfg = replace(
        cfg,
        val_split=0.15 if cfg.val_split is None else cfg.val_split,
        test_split=0.15 if cfg.test_split is None else cfg.test_split,
        class_weights=True if cfg.class_weights is None else cfg.class_weights,
    )
    size = cfg.image_size or default_image_size(cfg.arch)
    root = data_dir / "train" if (data_dir / "train").is_dir() else data_dir
    mode = detect_color_mode(root) if cfg.color_mode == "auto" else cfg.color_mode
    bits = detect_sample_bits([f for _, found in class_files(root, None, IMAGE_SUFFIXES, IMAGES)[1] for f in found])
    channels = 1 if mode == "grayscale" else 3
    spec = ImageSpec(height=size, width=size, channels=channels, color_mode=mode, sample_bits=bits)
    splits = load_splits(data_dir, spec, cfg)
    patience = cfg.patience or 12  # the scratch CNN's validation loss wanders from epoch to epoch
    schedule = Schedule(patience=patience, lr_factor=0.3, lr_patience=max(1, patience // 2), min_lr=1e-7)
    run = ClassifierRun(data_dir, cfg, splits, schedule, describe=f"{mode} {size}x{size} images, {cfg.arch}")
    net = classifier(cfg.arch, spec.shape, len(splits.classes), weights=None)
    trainer = net.model
    if cfg.augment is not None:
        aug = augmentation(**vars(cfg.augment), seed=cfg.seed)
        inputs = keras.Input(spec.shape)
        trainer = keras.Model(inputs, net.model(aug(inputs)))
    clock.progress("data", "%d training, %d validation photos loaded", len(splits.train[1]), len(splits.val[1]))
    # the export's share: LiteRT conversion, the ood fit over the training photos, scoring; int8 converts twice
    reserve = 30.0 * (2 if cfg.quantize == "int8" else 1)
    budget = EpochBudget(clock, "fit", cfg.epochs, reserve)
    with run.interruptible():
        run.fit(run.compile(trainer, cfg.learning_rate), splits.train, splits.val, cfg.epochs, budget)
    clock.progress("export", "exporting the best epoch's weights")
    extra = {"stopped_by_time_budget": 1.0} if budget.stopped else None
    return run.export(out, net.model, spec, show_misclassified=True, extra_metrics=extra)
