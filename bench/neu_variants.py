"""Harder variants of NEU for developing ``train images`` defaults that hold on data nobody tuned them on.

    .venv/bin/python bench/neu_variants.py [--out /tmp/plcsense-neu-variants] [--held-back]

Each variant is ``<out>/<name>/train/<class>/*.png`` and ``<out>/<name>/test/<class>/*.png``, drawn from NEU with a
fixed seed, train and test disjoint, test in the training set's class proportions (so the majority-class rate of
the test folder is what always answering the commonest class scores). The dev variants are for tuning; the
held-back one (``--held-back``) is written only when asked, and must be run once, at the end, with the defaults
chosen on the others.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

SHARED = Path(__file__).resolve().parents[2] / "shared"
NEU = SHARED / "data" / "neu-det"


@dataclass(frozen=True)
class Variant:
    classes: tuple[str, ...]
    train: tuple[int, ...]
    """Training photos per class, in ``classes`` order."""
    test: tuple[int, ...]
    size: int | None
    """Side in pixels (greyscale PNG); None keeps NEU's 200 px."""
    seed: int


ALL = ("crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches")
DEV: dict[str, Variant] = {
    # greyscale at 64 px, 60 photos a class: small photos, upscaled or not
    "grey64": Variant(ALL, (60,) * 6, (40,) * 6, 64, 1),
    # native 200 px, the rare classes with 10-30 photos
    "imbalanced": Variant(ALL, (200, 120, 60, 30, 20, 10), (100, 60, 30, 15, 10, 5), None, 2),
    # 15 photos a class
    "few": Variant(ALL, (15,) * 6, (40,) * 6, None, 3),
    # 4 classes at 96 px, the rarest under 5 % of the photos
    "grey96-imb4": Variant(
        ("inclusion", "pitted_surface", "rolled-in_scale", "scratches"), (220, 80, 25, 10), (70, 26, 8, 4), 96, 4
    ),
}
HELD_BACK: dict[str, Variant] = {
    # run once, at the end: 5 classes at 72 px, imbalanced, few photos in the rare classes
    "held-back": Variant(
        ("crazing", "inclusion", "patches", "pitted_surface", "scratches"),
        (150, 90, 40, 20, 12),
        (80, 48, 21, 10, 6),
        72,
        5,
    ),
}


def redrawn(variant: Variant, draw: int) -> Variant:
    """The same recipe (classes, counts, size) drawn with another seed: fresh photos of the same difficulty, for
    measuring how much a figure moves with the draw rather than with the code."""
    return variant if draw == 0 else replace(variant, seed=variant.seed + 1000 * draw)


def majority_rate(variant: Variant) -> float:
    return max(variant.test) / sum(variant.test)


def write_variant(variant: Variant, target: Path) -> Path:
    """Write ``target/train`` and ``target/test`` (kept when already there); returns ``target``."""
    if (target / "test").is_dir():
        return target
    rng = np.random.default_rng(variant.seed)
    for name, n_train, n_test in zip(variant.classes, variant.train, variant.test, strict=True):
        files = sorted((NEU / name).glob("*.jpg"))
        chosen = rng.permutation(len(files))[: n_train + n_test]
        for part, picks in (("train", chosen[:n_train]), ("test", chosen[n_train:])):
            folder = target / part / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in picks:
                with Image.open(files[i]) as image:
                    grey = image.convert("L")
                    if variant.size:
                        grey = grey.resize((variant.size, variant.size), Image.Resampling.BILINEAR)
                    grey.save(folder / f"{files[i].stem}.png")
    (target / "variant.json").write_text(json.dumps({**vars(variant), "majority_rate": majority_rate(variant)}))
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/plcsense-neu-variants"))
    parser.add_argument("--held-back", action="store_true", help="also write the held-back variant")
    args = parser.parse_args()
    variants = {**DEV, **(HELD_BACK if args.held_back else {})}
    for name, variant in variants.items():
        write_variant(variant, args.out / name)
        print(f"{args.out / name}: majority-class rate {majority_rate(variant):.3f}")


if __name__ == "__main__":
    main()
