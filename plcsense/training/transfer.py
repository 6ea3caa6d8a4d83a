"""Transfer learning on an ImageNet backbone, with its settings chosen by validation within a time budget.

Stages, cheapest first, each planned against the time left (``report/selection.json`` lists every trial, what
was skipped and why, and the choice):

1. frozen: pooled features of the frozen backbone at each candidate resolution; a logistic-regression probe per
   pooling x class weighting x L2 strength picks resolution, pooling and weighting (the photos' own size, when
   above the backbone's, wins within one standard error: see ``keeps_detail``).
2. augmentation: the same probe fitted on the photos plus their flipped copies, kept when validation agrees.
3. fine-tuning: the top quarter, half or whole backbone trained on cached activations, starting from that probe
   as the head, with warm-up and cosine decay and early stopping; kept only when it beats the frozen probe.
4. refit: the winner trained again on all training and validation photos (for the epochs validation chose), then
   exported; a fine-tuned network leaves ``CALIBRATION_SHARE`` of them out to set its ood threshold on. The test/
   folder, when there is one, is only scored by the export.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
from PIL import Image

from plcsense.models.backbones import BACKBONES, POOLINGS, build_backbone, classifier, cut_near, head
from plcsense.models.bundle import Bundle, ImageSpec
from plcsense.models.inputs import InputError, load_image_file
from plcsense.training.classifier import ClassifierRun, Schedule, Splits
from plcsense.training.clock import Clock, epoch_figures
from plcsense.training.data import (
    IMAGE_SUFFIXES,
    IMAGES,
    DataError,
    class_files,
    detect_sample_bits,
    require_examples,
)
from plcsense.training.image_config import DEFAULT_TIME_BUDGET, ImageTrainConfig, default_time_budget
from plcsense.training.image_select import (
    DEPTHS,
    FLIPS,
    LEARNING_RATES,
    STRENGTHS,
    WEIGHTINGS,
    FineTuner,
    Folds,
    Probe,
    Tap,
    Trial,
    common_epoch,
    flip,
    pooled_view,
    probe_trial,
)
from plcsense.training.memory import too_big
from plcsense.training.splits import split_indices

log = logging.getLogger("plcsense.training")

MAX_SIDE = 448
"""Largest resolution tried: twice the backbones' native 224, at a quarter of the speed."""
DEPTH_COST = {"top": 1.0, "half": 2.5, "whole": 5.0}
"""Rough cost of an epoch relative to the top quarter's, to plan a deeper trial before trying it."""


@dataclass
class Photos:
    """Paths and labels of photos; ``from_val`` marks those of the user's val/ folder."""

    files: list[Path]
    labels: np.ndarray
    from_val: np.ndarray

    def take(self, index: np.ndarray | list[int]) -> Photos:
        index = np.asarray(index, dtype=int)
        return Photos([self.files[i] for i in index], self.labels[index], self.from_val[index])


@dataclass(frozen=True)
class BestFold:
    """The fine-tuning fold that validated best: its network, and the validation photos it never learnt."""

    key: tuple[float, float]
    """(validation accuracy, -loss)"""
    weights: list[np.ndarray]
    val: np.ndarray


def list_photos(root: Path, classes: list[str] | None = None, *, from_val: bool = False) -> tuple[Photos, list[str]]:
    """``root/<class>/*`` image files; ``classes`` fixes the label order (a folder outside it is an error)."""
    names, per_class = class_files(root, classes, IMAGE_SUFFIXES, IMAGES)
    files = [file for _, found in per_class for file in found]
    labels = [label for label, found in per_class for _ in found]
    return Photos(files, np.asarray(labels), np.full(len(files), from_val)), names


def load_pixels(photos: Photos, side: int, sample_bits: int = 16) -> tuple[np.ndarray, Photos]:
    """(n, side, side, 3) uint8 through the worker's own decoder; unreadable files are left out and named."""
    spec = ImageSpec(height=side, width=side, channels=3, color_mode="rgb", sample_bits=sample_bits)
    pixels, kept, skipped = [], [], []
    for i, file in enumerate(photos.files):
        try:
            pixels.append(np.clip(np.rint(load_image_file(str(file), spec)), 0, 255).astype(np.uint8))
            kept.append(i)
        except (InputError, OSError) as exc:
            skipped.append(f"{file}: {exc}")
    if skipped:
        log.warning("skipped %d unreadable images:\n  %s", len(skipped), "\n  ".join(skipped))
    if not pixels:
        raise DataError("no readable images")
    return np.stack(pixels), photos.take(kept)


def native_side(files: list[Path], sample: int = 50) -> int:
    """Median side of the photos (geometric mean of width and height), from a sample of file headers."""
    sides = []
    for file in files[:: max(1, len(files) // sample)]:
        try:
            with Image.open(file) as image:
                sides.append(math.sqrt(image.width * image.height))
        except (OSError, Image.DecompressionBombError):  # loading it says why, once, with the file's name
            continue
    return int(np.median(sides)) if sides else 224


def resolutions(arch: str, native: int, pinned: int | None) -> list[int]:
    """The backbone's native size, plus the photos' own (rounded to 32, at most ``MAX_SIDE``) when it is larger by
    over an eighth or smaller by over a quarter; cheapest first.

    Asymmetric on purpose: shrinking a photo loses detail no later choice recovers (a crack a few pixels wide in
    a 300 px photo is narrower still at 224), while a somewhat smaller photo only gains speed at its own size.
    """
    if pinned:
        if pinned < BACKBONES[arch].min_size:
            raise DataError(f"--image-size {pinned} is below {arch}'s smallest input, {BACKBONES[arch].min_size} px")
        return [pinned]
    default = BACKBONES[arch].default_size
    own = max(BACKBONES[arch].min_size, min(MAX_SIDE, 32 * round(native / 32)))
    if 3 / 4 <= own / default <= 9 / 8:
        return [default]
    return sorted({default, own})


def keeps_detail(own: Trial, best: Trial, n_photos: int) -> bool:
    """Whether the photos' own resolution, above the backbone's, is chosen although a smaller one's probe validated
    better: when it is within one standard error of that probe (``sqrt(p (1 - p) / n)`` over the ``n_photos``
    validated). Frozen ImageNet features favour the size they were trained at, but fine-tuning adapts them, and
    the detail lost by shrinking stays lost: on 320 px photos of small defects on a texture (``bench/images.py
    --variant pasted320 --draw 1``) the probe at 224 px validated 0.731 and at 320 px 0.710, yet fine-tuning at
    224 px reached 0.747 on the test folder (with an earlier choice of learning rate) and at 320 px 0.895."""
    return own.accuracy >= best.accuracy - math.sqrt(best.accuracy * (1 - best.accuracy) / n_photos)


CALIBRATION_SHARE = 0.1
"""Share of each class's photos that a fine-tuned refit leaves out to set the ood threshold on (classes with
fewer than ten photos give none): a network has learnt the photos it trained on, their features sit closer to the
class means than a new photo's, and a threshold at their 99th percentile flagged 4.1 % of the model's own test
photos instead of 1 % (MobileNetV2 fine-tuned on an imbalanced NEU variant, ``bench/images.py --variant
imbalanced --draw 1``). Measured instead: a ratio of unseen to learnt distances taken from the folds' networks
overshot, since those trained for other epoch counts than the refit (0 % own, 57 % of foreign photos flagged)."""


MIN_CALIBRATION = 20
"""Fewest photos a threshold is set on: the largest of n photos' scores is exceeded by 1 / (n + 1) of new ones
on average (4.8 % at 20). Below this the refit keeps every photo and the threshold comes from validation photos
it has learnt, as for the probe."""


def calibration_part(labels: np.ndarray, seed: int) -> np.ndarray:
    """Indices of ``CALIBRATION_SHARE`` of each class's photos (rounded down), drawn with ``seed``; none when that
    makes fewer than ``MIN_CALIBRATION``."""
    rng = np.random.default_rng(seed)
    picked = [
        rng.choice(members, int(len(members) * CALIBRATION_SHARE), replace=False)
        for members in (np.flatnonzero(labels == c) for c in np.unique(labels))
    ]
    part = np.sort(np.concatenate(picked)).astype(int)
    return part if len(part) >= MIN_CALIBRATION else part[:0]


def depths(backbone: keras.Model, fine_tune_layers: int | None, fine_tune_epochs: int) -> dict[str, str | None]:
    """Fine-tuning candidates, name -> the layer below the trained part (None: the whole backbone)."""
    if fine_tune_layers == 0 or fine_tune_epochs <= 0:
        return {}
    if fine_tune_layers is not None:
        n = len(backbone.layers)
        return {f"top {fine_tune_layers} layers": cut_near(backbone, max(0.0, (n - 1 - fine_tune_layers) / (n - 1)))}
    return {name: cut_near(backbone, fraction) if fraction else None for name, fraction in DEPTHS.items()}


NO_TIME_TO_REFIT = "no time to refit"
"""How ``selection.json``'s ``refit`` note starts when the budget left no time for it (``Selection.cut_short``)."""


class Selection:
    """The trials of one run and the best so far; writes ``report/selection.json``."""

    def __init__(self, clock: Clock, folds: Folds) -> None:
        self.clock, self.folds = clock, folds
        self.trials: list[Trial] = []
        self.skipped: list[dict[str, object]] = []
        self.best: Trial | None = None
        self.notes: dict[str, object] = {}

    def add(self, trial: Trial) -> Trial:
        self.trials.append(trial)
        self.clock.progress(
            trial.stage,
            "%s: validation accuracy %.4f, loss %.4f (%.0f s)",
            ", ".join(f"{k} {v}" for k, v in trial.settings.items()),
            trial.accuracy,
            trial.loss,
            trial.seconds,
        )
        if self.best is None or self.better(trial, self.best):
            self.best = trial
        return trial

    @staticmethod
    def better(new: Trial, old: Trial) -> bool:
        """Higher validation accuracy, then lower loss; except that, at equal accuracy, an earlier fine-tuning
        trial (shallower, or at the smaller rate) stays. Where validation saturates (every depth and rate at 100 %
        on NEU's 288 validation photos) the loss only ranks confidence, which a larger rate and more trainable
        layers buy; that loss picked the half backbone at 1e-4, whose refit then missed 2 of its own 144 kept-out
        photos and 2 of NEU's 360 test photos, where the top quarter at 1e-5 had missed none."""
        tied = round(new.accuracy, 4) == round(old.accuracy, 4)
        if tied and new.stage == old.stage == "fine-tune":
            return False
        return new.key() > old.key()

    def skip(self, stage: str, candidate: str, reason: str, *, for_time: bool = False) -> None:
        """Leave ``candidate`` out, saying why; ``for_time``: a larger time budget would have tried it."""
        self.skipped.append({"stage": stage, "candidate": candidate, "reason": reason, "for_time": for_time})
        self.clock.progress(stage, "skipped %s: %s", candidate, reason)

    def cut_short(self) -> list[str]:
        """What the time budget left out or stopped before it had finished: candidates skipped for time,
        fine-tuning trials whose epochs it ended and the refit on every photo."""
        stopped = [
            f"{t.settings['depth']} at {t.settings['learning_rate']:g} stopped after {t.extra['epochs']} epochs"
            for t in self.trials
            if "time budget" in t.extra.get("stopped", ())
        ]
        no_refit = ["the refit skipped"] if str(self.notes.get("refit", "")).startswith(NO_TIME_TO_REFIT) else []
        return [f"{s['candidate']} skipped" for s in self.skipped if s["for_time"]] + stopped + no_refit

    def report(self) -> str:
        return json.dumps(
            {
                "time_budget_s": self.clock.budget,
                "elapsed_s_at_export": round(self.clock.elapsed, 1),
                "validation": self.folds.describe,
                "chosen": self.best.record() if self.best else None,
                "why": "the highest mean validation accuracy of the trials (then the lowest validation loss, except "
                "between fine-tuning trials: the shallower, then the smaller rate); a fine-tuning trial includes its "
                "starting point, the frozen probe",
                **self.notes,
                "trials": [t.record() for t in self.trials],
                "skipped": self.skipped,
            },
            indent=2,
        )


class BackboneRun:
    """One ``train images`` run on a backbone: the stages of the module docstring, then the export."""

    def __init__(self, data_dir: Path, cfg: ImageTrainConfig) -> None:
        self.data_dir, self.cfg = data_dir, cfg
        self.clock = Clock(cfg.time_budget or DEFAULT_TIME_BUDGET)  # sized to the photos below when not given
        root = data_dir / "train" if (data_dir / "train").is_dir() else data_dir
        train, self.classes = list_photos(root)
        if len(self.classes) < 2:
            raise DataError(f"{data_dir} has one class folder ({self.classes[0]}); a classifier needs at least two")
        nested = root != data_dir
        val = (
            list_photos(data_dir / "val", self.classes, from_val=True)[0]
            if nested and (data_dir / "val").is_dir()
            else None
        )
        self.test = list_photos(data_dir / "test", self.classes)[0] if nested and (data_dir / "test").is_dir() else None
        if self.test is None and cfg.test_split:
            keep, _, held = split_indices(train.labels, 0.0, cfg.test_split, cfg.seed)
            train, self.test = train.take(keep), train.take(held)
        self.pool = (
            train
            if val is None
            else Photos(
                train.files + val.files,
                np.concatenate([train.labels, val.labels]),
                np.concatenate([train.from_val, val.from_val]),
            )
        )
        require_examples(self.pool.labels, self.classes, root)
        self.native = native_side(self.pool.files)
        self.sides = resolutions(cfg.arch, self.native, cfg.image_size)
        if cfg.time_budget is None:
            self.clock.budget = default_time_budget(len(self.pool.files), max(self.sides))
        self.n_classes = len(self.classes)
        weights = None if cfg.weights in (None, "none") else cfg.weights
        self.backbone = build_backbone(cfg.arch, (None, None, 3), weights)
        self.backbone.trainable = False
        self.pretrained = self.backbone.get_weights()
        self.depths = depths(self.backbone, cfg.fine_tune_layers, cfg.fine_tune_epochs)
        self.cuts = sorted(
            {c for c in self.depths.values() if c}, key=[layer.name for layer in self.backbone.layers].index
        )
        keras.utils.set_random_seed(cfg.seed)

    # ------------------------------------------------------------------------------------------------ stages
    def run(self, out: Path) -> Bundle:
        cfg, clock = self.cfg, self.clock
        self.bits = detect_sample_bits(self.pool.files)
        clock.progress(
            "data", "%d classes, %d photos to learn from (median side %d px); resolutions to try %s; time budget "
            "%.0f s%s", self.n_classes, len(self.pool.files), self.native, self.sides, clock.budget,
            " (given)" if cfg.time_budget else " (the default for this many photos; --time-budget to change it)",
        )  # fmt: skip
        self.tap = Tap(cfg.arch, self.backbone, self.cuts)
        clock.progress("data", "frozen %s converted to LiteRT in %.0f s", cfg.arch, self.tap.convert_seconds)
        self.ready: tuple[int, str, list[np.ndarray], list[np.ndarray]] | None = None
        """(side, pooling, backbone weights, head weights) of a complete model to export, the best so far."""
        self.selection: Selection | None = None
        self.ready_trial: Trial | None = None
        """The trial whose model ``ready`` is: what the report names as chosen."""
        self.curves: dict[str, list[float]] = {}
        """Fine-tuning curves (first fold) of the best fine-tuning trial."""
        self.calibration: np.ndarray | None = None
        """Photos the refit leaves out, to set the ood threshold on (see ``_refit``)."""
        interrupted = False
        try:
            self._frozen(self.sides)
            self._augmentation()
            self._fine_tuning()
            self._refit()
        except KeyboardInterrupt:
            interrupted = True
            log.warning("training interrupted: exporting the best model so far")
            if self.ready is None:
                if self.selection is None or self.selection.best is None:
                    raise
                self._refit_probe(self.selection.best)
        self._say_what_time_cut_short()
        return self._export(out, interrupted)

    def _say_what_time_cut_short(self) -> None:
        """A warning, and a note in ``selection.json``, when the time budget kept the search from trying
        everything: the user learns which option buys a better model (on 2,200 photos of 320 px, 600 s instead of
        the default 1,796 s stopped fine-tuning after 3 epochs and scored 0.887 instead of 0.973)."""
        cut = self.selection.cut_short() if self.selection else []
        if cut:
            self.selection.notes["cut_short_by_time_budget"] = cut
            log.warning(
                "the time budget of %.0f s cut the search short (%s); --time-budget %.0f lets it try more",
                self.clock.budget, "; ".join(cut), 2 * self.clock.budget,
            )  # fmt: skip

    def _frozen(self, sides: list[int]) -> None:
        """Stage 1: resolution, pooling, class weighting and L2 strength, with a probe on frozen pooled features."""
        cfg, clock = self.cfg, self.clock
        weightings = list(WEIGHTINGS) if cfg.class_weights is None else ["balanced" if cfg.class_weights else "none"]
        counts = np.bincount(self.pool.labels, minlength=self.n_classes)
        if counts.max() <= 1.2 * counts.min():  # (nearly) balanced classes: every weighting is the same probe
            weightings = weightings[:1]
        # one setting at a time (L2 strength, then pooling, then weighting), the others at their best so far;
        # each resolution goes through all of them (probes cost seconds), starting from the best settings so far: a
        # weighting chosen on the features of a resolution that then loses by ten points is no choice for the winner
        plan = [("strength", STRENGTHS), ("pooling", POOLINGS), ("weighting", weightings)]
        base: dict[str, object] = {"pooling": "avg", "weighting": weightings[0]}
        for i, side in enumerate(sides):
            refused = too_big(len(self.pool.files) * self.tap.bytes_per_photo(side))
            if not i and refused:
                raise DataError(
                    f"{len(self.pool.files)} photos at {side} px: their pixels and the frozen backbone's activations "
                    f"{refused}; train on fewer photos, on a machine with more memory, or with --fine-tune-layers 0 "
                    "(no activations kept)"
                )
            if i:
                cost = self._extract_seconds(side) * 1.5
                if cost > 0.3 * clock.remaining:
                    self.selection.skip(
                        "frozen", f"{side} px", f"~{cost:.0f} s of the {clock.remaining:.0f} s left", for_time=True
                    )
                    continue
                if refused:
                    self.selection.skip("frozen", f"{side} px", f"its photos and activations {refused}")
                    continue
            pixels, kept = load_pixels(self.pool, side, self.bits)
            if self.selection is None:
                self.pool = kept  # unreadable photos are left out of everything from here on
                folds = self._folds()
                self.selection = Selection(clock, folds)
                clock.progress("data", "validation: %s", folds.describe)
            elif len(kept.files) != len(self.pool.files):  # a photo unreadable now but not before: rows would shift
                self.selection.skip("frozen", f"{side} px", "a photo could no longer be read (changed during the run?)")
                continue
            pooled, acts = self.tap.run(pixels)
            clock.progress("frozen", "%d px features (%.0f photos/s at 224 px)", side, self.tap.rate)
            tried: set[frozenset] = set()
            for name, values in plan:
                for value in values:
                    settings = dict(base, resolution=side, **{name: value})
                    key = frozenset(settings.items())  # the same settings, whichever step put them together
                    if key in tried or (tried and clock.remaining < self._export_seconds() + 60):
                        continue
                    tried.add(key)
                    view = pooled_view(pooled, str(settings["pooling"]))
                    trial = self.selection.add(
                        probe_trial(
                            lambda _, v=view: v, self.pool.labels, self.selection.folds, self.n_classes, settings
                        )
                    )
                    if trial is self.selection.best:
                        self.side, self.pixels, self.pooled, self.acts = side, pixels, [pooled], [acts]
                base = {k: v for k, v in self.selection.best.settings.items() if k != "resolution"}
            best, n = self.selection.best, len(self.pool.files)
            own = max((t for t in self.selection.trials if t.settings.get("resolution") == side), key=Trial.key)
            if side > BACKBONES[cfg.arch].default_size and own is not best and keeps_detail(own, best, n):
                self.selection.notes["resolution"] = (
                    f"{side} px, the photos' own size: its probe validated {own.accuracy:.4f}, within one standard "
                    f"error of {best.settings['resolution']} px's {best.accuracy:.4f}, and fine-tuning keeps the "
                    "detail that shrinking loses"
                )
                self.selection.best = own
                self.side, self.pixels, self.pooled, self.acts = side, pixels, [pooled], [acts]
            del pixels, pooled, acts
        self.settings = dict(self.selection.best.settings, augment="none")
        self._refit_probe(self.selection.best)

    def _augmentation(self) -> None:
        """Stage 2: flipped copies, kept when the probe fitted on them validates at least as well."""
        cfg, clock, selection = self.cfg, self.clock, self.selection
        if cfg.augment is None or not cfg.augment.flip:
            selection.skip("augment", "flips", "augmentation switched off")
            return
        cost = (len(FLIPS) - 1) * self._extract_seconds(self.side)
        if cost > 0.35 * (clock.remaining - self._export_seconds()):
            selection.skip(
                "augment",
                "flips",
                f"copies would take ~{cost:.0f} s of the {clock.remaining:.0f} s left",
                for_time=True,
            )
            return
        refused = too_big((len(FLIPS) - 1) * (self.pooled[0].nbytes + sum(a.nbytes for a in self.acts[0])))
        if refused:
            selection.skip("augment", "flips", f"the copies' activations {refused}")
            return
        for copy in range(1, len(FLIPS)):
            pooled, acts = self.tap.run(self.pixels, copy)
            self.pooled.append(pooled)
            self.acts.append(acts)
        clock.progress("augment", "features of %d flipped copies of each photo", len(FLIPS) - 1)
        before = selection.best
        settings = dict(self.settings, augment="flips")
        trial = probe_trial(
            lambda c: pooled_view(self.pooled[c], str(settings["pooling"])),
            self.pool.labels, selection.folds, self.n_classes, settings, copies=len(FLIPS), stage="augment",
        )  # fmt: skip
        selection.add(trial)
        if trial.key() >= before.key():
            self.settings = settings
            selection.best = trial
            self._refit_probe(trial)
        else:
            self.pooled, self.acts = self.pooled[:1], self.acts[:1]

    def _fine_tuning(self) -> None:
        """Stage 3: each depth, shallowest first, while the budget allows it and its refit."""
        clock, selection = self.clock, self.selection
        folds = selection.folds.pairs
        n_fold = float(np.mean([len(t) for t, _ in folds]))
        previous: tuple[str, float] | None = None
        rates = LEARNING_RATES if self.cfg.fine_tune_learning_rate is None else (self.cfg.fine_tune_learning_rate,)
        for name, cut in self.depths.items():
            # a deeper depth tries the rates that have not lost on validation accuracy at a shallower one
            for rate in self._rates_left(rates):
                candidate = name if len(rates) == 1 else f"{name}, learning rate {rate:g}"
                available = clock.remaining - self._export_seconds()
                share = len(folds) * n_fold / (len(folds) * n_fold + len(self.pool.files))
                # the trial leaves its own refit a share, and the best so far its refit in full: a deeper trial
                # that loses must not take the time the winner needs to learn from every photo
                reserve = self._refit_seconds()
                budget = min(available * share, available - reserve)
                kept = f" (~{reserve:.0f} s kept to refit the best so far)" if reserve else ""
                if previous:
                    epoch = previous[1] * DEPTH_COST.get(name, 1.0) / DEPTH_COST.get(previous[0], 1.0)
                    if 3 * epoch * len(folds) > budget:
                        selection.skip(
                            "fine-tune",
                            candidate,
                            f"3 epochs x {len(folds)} folds ~{3 * epoch * len(folds):.0f} s, {budget:.0f} s available"
                            + kept,
                            for_time=True,
                        )
                        continue
                if budget < 20:
                    selection.skip("fine-tune", candidate, f"{budget:.0f} s available{kept}", for_time=True)
                    continue
                result = self._fine_tune_trial(name, cut, budget, rate)
                if result is not None:
                    previous = (name, result)

    def _rates_left(self, rates: tuple[float, ...]) -> list[float]:
        """``rates`` less those whose best fine-tuning trial so far validated less accurately than another's. A
        difference in loss alone keeps both: at the top quarter, often neither beats the probe it starts from, and
        which rate the deeper parts want is then still open."""
        best: dict[float, float] = {}
        for t in self.selection.trials:
            if t.stage == "fine-tune":
                rate = float(t.settings["learning_rate"])
                best[rate] = max(best.get(rate, 0.0), round(t.accuracy, 4))
        return [r for r in rates if best.get(r, 1.0) >= max(best.values(), default=0.0)]

    def _fine_tune_trial(self, name: str, cut: str | None, budget: float, rate: float) -> float | None:
        """All folds of one depth, a trial when they all fit the budget; returns the seconds an epoch took (None
        when not one was measured), which plans the deeper depths either way."""
        cfg, clock, selection = self.cfg, self.clock, self.selection
        started = clock.elapsed
        tuner = self._tuner(cut, rate)
        copies = len(self.pooled)
        results, epoch_seconds = [], []
        best_fold: BestFold | None = None
        curves: dict[str, list[float]] = {}
        for k, (train, val) in enumerate(selection.folds.pairs):
            fold_end = started + budget * (k + 1) / len(selection.folds.pairs)
            self.backbone.set_weights(self.pretrained)
            self._set_head(tuner, train)
            timer = {"start": clock.elapsed}

            def on_epoch(epoch: int, figures: dict[str, float], k: int = k, timer: dict = timer) -> None:
                epoch_seconds.append(clock.elapsed - timer["start"])
                timer["start"] = clock.elapsed
                clock.progress(
                    "fine-tune", "%s, learning rate %g, fold %d/%d, epoch %d: %s", name, rate, k + 1,
                    len(selection.folds.pairs), epoch, epoch_figures(figures),
                )  # fmt: skip

            result = tuner.fit(
                self._batches(cut), self.pool.labels, train, val,
                copies=copies, weighting=str(self.settings["weighting"]), max_epochs=cfg.fine_tune_epochs,
                patience=cfg.patience or 4, deadline=lambda seconds, end=fold_end: clock.elapsed + seconds > end,
                on_epoch=on_epoch,
            )  # fmt: skip
            results.append(result)
            if result.weights is not None and (best_fold is None or (result.accuracy, -result.loss) > best_fold.key):
                best_fold = BestFold((result.accuracy, -result.loss), result.weights, val)
            if k == 0:
                curves = result.curves
            if clock.elapsed > started + budget and k + 1 < len(selection.folds.pairs):
                selection.skip(
                    "fine-tune",
                    f"{name}, learning rate {rate:g}",
                    f"the budget ended after fold {k + 1}",
                    for_time=True,
                )
                break
        else:
            settings = dict(self.settings, depth=name, trainable_layers=tuner.trainable, learning_rate=rate)
            epochs, accuracy, loss = common_epoch(results)
            extra = {
                "epochs": epochs,
                "best_epochs": [r.best_epoch for r in results],
                "stopped": sorted({r.stopped for r in results}),
            }
            trial = selection.add(Trial("fine-tune", settings, accuracy, loss, clock.elapsed - started, extra))
            if trial is selection.best:
                self.tuned = (cut, rate, epochs, float(np.mean(epoch_seconds)), best_fold)
                self.curves = curves
        self.backbone.set_weights(self.pretrained)
        return float(np.mean(epoch_seconds)) if epoch_seconds else None

    def _refit(self) -> None:
        """Stage 4: the chosen settings on every photo; the frozen probe is already refitted."""
        best = self.selection.best
        if best.stage != "fine-tune":
            return
        cut, rate, epochs, _, best_fold = self.tuned
        if epochs == 0:
            self.selection.notes["refit"] = "fine-tuning never beat its starting point: the frozen probe is exported"
            return
        self.backbone.set_weights(self.pretrained)
        tuner = self._tuner(cut, rate)
        calibration = calibration_part(self.pool.labels, self.cfg.seed)
        everything = np.setdiff1d(np.arange(len(self.pool.files)), calibration)
        self._set_head(tuner, everything)
        cost = self._refit_seconds()
        if cost > self.clock.remaining - self._export_seconds():
            if best_fold is None:  # no fold's model beat its own start: there is none to export
                self.selection.notes["refit"] = f"{NO_TIME_TO_REFIT} (~{cost:.0f} s): the frozen probe is exported"
                return
            self._restore(tuner, best_fold)
            self.selection.notes["refit"] = f"{NO_TIME_TO_REFIT} (~{cost:.0f} s): the best fold's model is exported"
        else:
            self.clock.progress(
                "refit", "%s on %d photos for %d epochs (%d kept out for the ood threshold)",
                best.settings["depth"], len(everything), epochs, len(calibration),
            )  # fmt: skip
            try:
                tuner.fit(
                    self._batches(cut), self.pool.labels, everything, None,
                    copies=len(self.pooled), weighting=str(self.settings["weighting"]),
                    max_epochs=self.cfg.fine_tune_epochs, epochs=epochs,
                    on_epoch=lambda e, f: self.clock.progress("refit", "epoch %d: %s", e, f"loss {f['loss']:.4f}"),
                )  # fmt: skip
            except KeyboardInterrupt:
                # a refit cut short is no model; the best fold's is a complete one that beat the probe
                if best_fold is not None:
                    self._restore(tuner, best_fold)
                    self.selection.notes["refit"] = "interrupted (Ctrl-C): the best fold's model is exported"
                    self._ready_now(best)
                raise
            self.selection.notes["refit"] = f"fine-tuned on {len(everything)} photos for {epochs} epochs" + (
                f"; {len(calibration)} more, kept out, set the ood threshold" if len(calibration) else ""
            )
            self.calibration = calibration if len(calibration) else None
        self._ready_now(best)

    def _refit_seconds(self) -> float:
        """What refitting the best fine-tuning trial so far on every photo (less the ood part) would take; nothing
        while a frozen probe leads (its refit takes a second)."""
        if self.selection.best is None or self.selection.best.stage != "fine-tune":
            return 0.0
        _, _, epochs, epoch_seconds, _ = self.tuned
        photos = len(self.pool.files) - len(calibration_part(self.pool.labels, self.cfg.seed))
        return epochs * epoch_seconds * photos / np.mean([len(t) for t, _ in self.selection.folds.pairs])

    def _restore(self, tuner: FineTuner, fold: BestFold) -> None:
        """The best fold's network instead of a refit; its validation photos, which it never learnt, set its ood
        threshold."""
        tuner.restore(fold.weights)
        self.calibration = fold.val

    def _ready_now(self, trial: Trial) -> None:
        """The backbone and head as they are now are the model to export, ``trial``'s."""
        self.ready = (self.side, str(self.settings["pooling"]), self.backbone.get_weights(), self.head.get_weights())
        self.ready_trial = trial

    # ------------------------------------------------------------------------------------------------ helpers
    def _folds(self) -> Folds:
        cfg = self.cfg
        from_val = self.pool.from_val
        if from_val.any():
            train = np.flatnonzero(~from_val)
            val = np.flatnonzero(from_val)
            return Folds([(train, val)], f"the val/ folder ({len(val)} photos)")
        if cfg.val_split:
            train, val, _ = split_indices(self.pool.labels, cfg.val_split, 0.0, cfg.seed)
            return Folds([(train, val)], f"a {cfg.val_split:.0%} validation part (stratified where classes allow)")
        return Folds.make(self.pool.labels, cfg.seed)

    def _extract_seconds(self, side: int) -> float:
        return len(self.pool.files) * (side / 224) ** 2 / max(self.tap.rate, 1e-6)

    def _export_seconds(self) -> float:
        """Conversion, the ood fit (Keras, ~2.5x slower than LiteRT) and LiteRT scoring of the export."""
        held = len(self.test.files) if self.test else 0
        seconds = 1.5 * self.tap.convert_seconds + 10
        seconds += self._extract_seconds(self.side) * (2.5 + (held + len(self.pool.files) * 0.2) / len(self.pool.files))
        if self.cfg.quantize != "none":
            seconds += 2.5 * self.tap.convert_seconds + self._extract_seconds(self.side) * held / len(self.pool.files)
        return seconds

    def _new_head(self) -> keras.Model:
        # no dropout: the head starts as the probe, whose L2 penalty is its regulariser, and dropping features the
        # probe relies on would shake the head just when the backbone starts to move
        channels = self.backbone.output.shape[-1]
        return head((None, None, channels), self.n_classes, pooling=str(self.settings["pooling"]), dropout=0.0)

    def _tuner(self, cut: str | None, rate: float) -> FineTuner:
        self.head = self._new_head()
        return FineTuner(
            self.cfg.arch, self.backbone, self.head, cut, self.n_classes,
            learning_rate=rate, batch_size=self.cfg.batch_size, seed=self.cfg.seed,
        )  # fmt: skip

    def _probe(self, index: np.ndarray) -> Probe:
        copies = len(self.pooled)
        view = [pooled_view(p, str(self.settings["pooling"])) for p in self.pooled]
        x = np.concatenate([view[c][index] for c in range(copies)])
        y = np.tile(self.pool.labels[index], copies)
        return Probe.fit(x, y, self.n_classes, str(self.settings["weighting"]), float(self.settings["strength"]))

    def _set_head(self, tuner: FineTuner, index: np.ndarray) -> None:
        probe = self._probe(index)
        tuner.head.get_layer("probabilities").set_weights([probe.weights, probe.bias])

    def _refit_probe(self, trial: Trial) -> None:
        """The frozen probe of ``trial`` on every photo: a complete model, ready to export."""
        self.ready_trial = trial
        self.settings = getattr(self, "settings", None) or dict(trial.settings, augment="none")
        self.head = self._new_head()
        probe = self._probe(np.arange(len(self.pool.files)))
        self.head.get_layer("probabilities").set_weights([probe.weights, probe.bias])
        self.ready = (self.side, str(self.settings["pooling"]), self.pretrained, self.head.get_weights())

    def _batches(self, cut: str | None):
        if cut is None:
            return lambda idx, copies: np.stack(
                [flip(self.pixels[i : i + 1], c)[0] for i, c in zip(idx, copies, strict=True)]
            ).astype(np.float32)
        slot = self.cuts.index(cut)
        return lambda idx, copies: np.stack([self.acts[c][slot][i] for i, c in zip(idx, copies, strict=True)]).astype(
            np.float32
        )

    # ------------------------------------------------------------------------------------------------ export
    def _export(self, out: Path, interrupted: bool) -> Bundle:
        side, pooling, backbone_weights, head_weights = self.ready
        self.pooled, self.acts = [], []  # the selection's caches (every flipped copy's activations) are done with
        self.backbone.set_weights(backbone_weights)
        net = classifier(self.cfg.arch, (side, side, 3), self.n_classes, pooling=pooling, backbone=self.backbone)
        net.head.set_weights(head_weights)
        spec = ImageSpec(height=side, width=side, channels=3, color_mode="rgb", sample_bits=self.bits)
        assert side == self.side, "a ready model is always at the resolution whose photos are loaded"
        pixels = self.pixels
        calibrated = self.calibration is not None  # set when a fine-tuned network ships, a refit or a fold's
        if calibrated:
            # a fine-tuned network has learnt every photo it trained on: the ood threshold comes from those it has not
            val_index = self.calibration
            learnt = np.setdiff1d(np.arange(len(pixels)), val_index)
        else:
            val_index = self.selection.folds.pairs[0][1]
            learnt = np.arange(len(pixels))
        # uint8 throughout: the export casts batch by batch (float32 copies of a few thousand photos of 288 px
        # would take gigabytes)
        test = (np.zeros((0, side, side, 3), np.uint8), np.zeros(0, int))
        if self.test is not None:
            test_pixels, tested = load_pixels(self.test, side, self.bits)
            test = (test_pixels, tested.labels)
        splits = Splits(
            self.classes,
            (pixels[learnt], self.pool.labels[learnt]),
            (pixels[val_index], self.pool.labels[val_index]),
            test,
        )
        cfg = self.cfg
        run = ClassifierRun(
            self.data_dir, cfg, splits, Schedule(patience=0, lr_factor=1, lr_patience=0, min_lr=0),
            describe=f"{side}x{side} images, {cfg.arch}",
        )  # fmt: skip
        run.interrupted = interrupted
        best = self.ready_trial
        if best is not self.selection.best:  # the report and manifest name the model that is shipped
            if interrupted:
                winner = self.selection.best
                self.selection.notes["interrupted"] = (
                    f"the best trial ({winner.stage}, validation accuracy {winner.accuracy:.4f}) was not yet a "
                    "complete model: the best one that was is exported"
                )
            self.selection.best = best
        if best.stage != "fine-tune":  # the probe ships: no fine-tuning curves describe it
            self.curves = {}
        run.history = self.curves
        if cfg.tensorboard:
            self._tensorboard(cfg.tensorboard)
        self.clock.progress("export", "exporting %s", ", ".join(f"{k} {v}" for k, v in best.settings.items()))
        return run.export(
            out,
            net.model,
            spec,
            show_misclassified=True,
            # without a test part the figures are on the photos kept out of the refit, or on validation photos the
            # model has learnt from
            held_out_name="test" if len(test[1]) else ("calibration" if calibrated else "fit"),
            extra_metrics={"val_accuracy": best.accuracy, "val_loss": best.loss},
            report_files={"selection.json": self.selection.report()},
        )

    def _tensorboard(self, folder: Path) -> None:
        """Each trial's validation figures, and the curves of the chosen fine-tuning's first fold."""
        import tensorflow as tf

        with tf.summary.create_file_writer(str(folder)).as_default():
            for step, trial in enumerate(self.selection.trials):
                tf.summary.scalar(f"selection/{trial.stage}/val_accuracy", trial.accuracy, step=step)
                tf.summary.scalar(f"selection/{trial.stage}/val_loss", trial.loss, step=step)
            for name, values in self.curves.items():
                for step, value in enumerate(values, 1):
                    tf.summary.scalar(f"fine_tune/{name}", value, step=step)


def train_backbone(data_dir: Path, out: Path, cfg: ImageTrainConfig) -> Bundle:
    return BackboneRun(data_dir, cfg).run(out)
