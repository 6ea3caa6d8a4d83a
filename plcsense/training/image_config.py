"""What ``plcsense train images`` can be told: augmentation and the training configuration.

A module of its own so that the transfer-learning path (``training/transfer.py``) and the image trainer
(``training/images.py``) share it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from plcsense.training.classifier import ClassifierConfig
from plcsense.training.data import DataError

__all__ = ["Augment", "ImageTrainConfig", "default_time_budget"]

DEFAULT_TIME_BUDGET = 600.0
"""Seconds of a run on up to ``BUDGETED_PHOTOS`` photos at 224 px, and of every scratch CNN run."""
BUDGETED_PHOTOS = 1500
"""Photos at 224 px that ``DEFAULT_TIME_BUDGET`` is sized for: NEU's 1,440 training photos of 200 px, which it
fine-tunes to 100 % on 2 cores in about 500 s."""
MAX_DEFAULT_BUDGET = 3600.0


def default_time_budget(photos: int, side: int) -> float:
    """A backbone run's budget when none is given: ``DEFAULT_TIME_BUDGET``, and more in proportion to the work
    beyond ``BUDGETED_PHOTOS`` (photos x (side / 224)^2, ``side`` the largest resolution tried), at most an hour.

    Every stage costs in proportion to that work, so a fixed budget starves larger sets: on 2,200 photos of 320 px
    (``bench/images.py --variant pasted320large``) 600 s stopped fine-tuning after 3 epochs and scored 0.887 on the
    test folder, 1200 s scored 0.949.
    """
    work = photos * (side / 224) ** 2
    return min(MAX_DEFAULT_BUDGET, DEFAULT_TIME_BUDGET * max(1.0, work / BUDGETED_PHOTOS))


@dataclass
class Augment:
    flip: bool = True
    rotation: float = 0.05
    zoom: float = 0.1
    translation: float = 0.05
    contrast: float = 0.1
    brightness: float = 0.1

    @classmethod
    def parse(cls, spec: str, arch: str) -> Augment | None:
        """``auto``, ``none`` or a comma list of flip,rotation,zoom,translation,contrast,brightness.

        ``auto``: flips only. Backbones fine-tune on cached copies of each photo, and only flips are exact copies
        (the selection still checks on validation that they help). For the scratch CNN, measured on NEU
        (64 px, 20 epochs): rotation, zoom and translation resample the image, and the slight blur they add cost
        the scratch CNN 12 points of test accuracy on fine steel textures (0.81 vs 0.93 without augmentation).
        """
        names = ("flip", "rotation", "zoom", "translation", "contrast", "brightness")
        if spec == "none":
            return None
        if spec == "auto":
            spec = "flip"
        chosen = {part.strip() for part in spec.split(",") if part.strip()}
        unknown = chosen - set(names)
        if unknown:
            raise DataError(f"unknown augmentation {sorted(unknown)}; choose from {', '.join(names)}")
        return cls(**{n: getattr(cls, n) if n in chosen else (False if n == "flip" else 0.0) for n in names})


@dataclass
class ImageTrainConfig(ClassifierConfig):
    arch: str = "mobilenet_v2"
    weights: str | None = "imagenet"
    """``imagenet`` (Keras download), None (random init) or a local ``.h5`` path."""
    image_size: int | None = None
    """Default: chosen by validation among the backbone's native size and the photos' own (128 for scratch)."""
    color_mode: Literal["auto", "grayscale", "rgb"] = "auto"
    fine_tune_epochs: int = 15
    """At most this many fine-tuning epochs (early stopping on validation usually ends sooner)."""
    fine_tune_layers: int | None = None
    """Default: chosen by validation (head only, the top quarter, the top half or the whole backbone); 0: head
    only; N: the top N layers (rounded down to where the backbone can be cut)."""
    fine_tune_learning_rate: float | None = None
    """Peak learning rate of fine-tuning (Adam), reached after a one-epoch warm-up, then cosine decay. Default:
    chosen by validation among ``image_select.LEARNING_RATES``."""
    time_budget: float | None = None
    """Seconds for the whole run, export included, on this machine: the selection plans its trials to fit; the
    scratch CNN stops when another epoch would not leave time for the export. Default: ``default_time_budget``
    on a backbone, ``DEFAULT_TIME_BUDGET`` for the scratch CNN."""
    class_weights: bool | None = None  # type: ignore[assignment]
    """Default: chosen by validation for backbones (none, square-root or fully balanced), balanced for scratch."""
    val_split: float | None = None  # type: ignore[assignment]
    """Default: stratified 5-fold below 600 photos, a 20 % validation part above (0.15 for scratch)."""
    test_split: float | None = None  # type: ignore[assignment]
    """Default: none for backbones (the test/ folder is used when there is one), 0.15 for scratch."""
    patience: int | None = None
    """Epochs without validation improvement before stopping; default 4 in fine-tuning, 12 for the scratch CNN,
    whose validation loss wanders more from epoch to epoch under augmentation."""
    augment: Augment | None = field(default_factory=lambda: Augment.parse("auto", "mobilenet_v2"))
    """Flips (tried, kept when validation agrees) for backbones; the other transforms apply to scratch only."""
