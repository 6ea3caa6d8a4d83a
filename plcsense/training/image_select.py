"""Settings of a transfer-learning image classifier chosen by validation on the user's training data, in a budget.

Every choice is measured, never assumed: the input resolution, the pooling of the feature maps, the class
weighting, the augmentation and the fine-tuning depth are tried on the training data alone (a validation part, or
stratified k-fold when the data is small), cheapest first, and the run writes what it tried and why it chose
what it chose. Cheap proxies carry the early choices: the frozen backbone's pooled features are computed once per
resolution (with LiteRT, about three times faster than Keras on a CPU) and a logistic regression on them chooses
resolution, pooling and weighting in seconds; only the finalist is fine-tuned. Fine-tuning trains the upper part
of the backbone on its cached input activations, computed once for the original photos and their flipped copies
(the augmentation), so an epoch costs only the upper part. The head that fine-tuning starts from was fitted on
those same flipped copies: the head never meets augmented features for the first time while the backbone is
unfrozen, which is what made fine-tuning collapse before.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import keras
import numpy as np
from ai_edge_litert.interpreter import Interpreter
from keras import layers
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, train_test_split
from sklearn.preprocessing import StandardScaler

from plcsense.models.backbones import BACKBONES, preprocessed, top_part, unfreeze_above
from plcsense.quiet import LITERT_STARTUP, without_lines
from plcsense.training.export import to_tflite

FLIPS = ((False, False), (True, False), (False, True), (True, True))
"""Copies of each photo for augmentation: as is, mirrored left-right, top-bottom, both. Exact (no resampling
blur, which cost fine textures accuracy) and label-preserving for surface inspection; validation checks the
latter on each data set."""
WEIGHTINGS = {"none": 0.0, "sqrt": 0.5, "balanced": 1.0}
"""Class weight = (1 / class frequency) ** exponent: none, a middle way, or fully balanced."""
DEPTHS = {"top": 0.75, "half": 0.5, "whole": 0.0}
"""Fine-tuning depths, as the fraction of the backbone's layers kept frozen below the trained part."""
STRENGTHS = (0.1, 1.0)
"""Inverse L2 strengths of the logistic regression on standardised features."""
LEARNING_RATES = (1e-5, 1e-4)
"""Peak fine-tuning rates (Adam), each tried at the first depth and at deeper ones until it validates less
accurately than the other. Adam's steps are about the rate whatever the gradient. 1e-5 keeps a backbone whose
frozen features already score ~98 % (the NEU variants of ``bench/neu_variants.py``, where 1e-4 shook it: 0.74-0.87
validation accuracy after the first epoch, from 0.98). 1e-4 moves one whose frozen features fall short: on
``pasted320`` (small defects on a textured surface, 320 px) the probe validated at 0.77, the top quarter
fine-tuned at 1e-5 at 0.78 and at 1e-4 at 0.82; 1e-3 collapsed."""


@dataclass(frozen=True)
class Folds:
    """Train/validation index pairs over the pool of selection images, and how they were made."""

    pairs: list[tuple[np.ndarray, np.ndarray]]
    describe: str

    @classmethod
    def make(cls, labels: np.ndarray, seed: int) -> Folds:
        """Stratified 5-fold below 300 images, 3-fold below 600, a stratified 20 % validation part above (the
        user's val/ folder, when there is one, is taken before this is asked)."""
        n = len(labels)
        smallest = int(np.bincount(labels).min())
        if n < 600 and smallest >= 2:
            k = min(5 if n < 300 else 3, smallest)
            split = StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(n), labels)
            return cls([(np.sort(a), np.sort(b)) for a, b in split], f"stratified {k}-fold over {n} images")
        stratify = labels if smallest >= 2 else None
        train, val = train_test_split(np.arange(n), test_size=0.2, random_state=seed, stratify=stratify)
        return cls([(np.sort(train), np.sort(val))], f"a stratified 20 % validation part ({len(val)} of {n})")


def class_weights(labels: np.ndarray, num_classes: int, weighting: str) -> np.ndarray:
    """Per-class weights for ``weighting`` (see WEIGHTINGS), averaging 1 over the samples."""
    counts = np.maximum(np.bincount(labels, minlength=num_classes), 1).astype(float)
    weights = (counts.sum() / counts) ** WEIGHTINGS[weighting]
    return weights / (weights[labels].mean())


def flip(batch: np.ndarray, copy: int) -> np.ndarray:
    horizontal, vertical = FLIPS[copy]
    if horizontal:
        batch = batch[:, :, ::-1]
    if vertical:
        batch = batch[:, ::-1]
    return batch


class Tap:
    """The frozen backbone run by LiteRT at any input size: pooled final features and one cut's activations."""

    def __init__(self, arch: str, backbone: keras.Model, cuts: list[str]) -> None:
        pixels = keras.Input((None, None, 3), name="pixels")
        inner = keras.Model(backbone.input, [backbone.get_layer(c).output for c in cuts] + [backbone.output])
        *acts, maps = inner(preprocessed(arch, pixels))
        pooled = layers.Concatenate()([layers.GlobalAveragePooling2D()(maps), layers.GlobalMaxPooling2D()(maps)])
        started = time.perf_counter()
        tapped = keras.Model(pixels, [pooled, *acts])
        flatbuffer = to_tflite(tapped)
        with without_lines(LITERT_STARTUP):
            self._interpreter = Interpreter(model_content=flatbuffer, num_threads=None)
        self.convert_seconds = time.perf_counter() - started
        self._input = self._interpreter.get_input_details()[0]["index"]
        self._pooled, *self._acts = self._match_outputs(tapped, BACKBONES[arch].min_size)
        self.rate = 0.0
        """Photos per second of the last run (224 px equivalent), for budget estimates."""

    def _match_outputs(self, tapped: keras.Model, side: int) -> list[int]:
        """LiteRT's output index of each of ``tapped``'s outputs. LiteRT may list outputs in any order and two cuts
        can have the same shape (InceptionV3's mixed4 and mixed7: 17 x 17 x 768), so they are matched by their
        values on one random photo."""
        photo = np.random.default_rng(0).uniform(0, 255, (1, side, side, 3)).astype(np.float32)
        outputs = tapped(photo, training=False)  # a model with one output (no cuts) gives a tensor, not a list
        expected = [np.asarray(x) for x in (outputs if isinstance(outputs, (list, tuple)) else [outputs])]
        self._interpreter.resize_tensor_input(self._input, photo.shape)
        self._interpreter.allocate_tensors()
        self._interpreter.set_tensor(self._input, photo)
        self._interpreter.invoke()
        got = {o["index"]: self._interpreter.get_tensor(o["index"]) for o in self._interpreter.get_output_details()}
        matched = []
        for want in expected:
            same = [i for i, v in got.items() if v.shape == want.shape and i not in matched]
            matched.append(min(same, key=lambda i: float(np.max(np.abs(got[i] - want)))))
        return matched

    def bytes_per_photo(self, side: int) -> int:
        """What one photo at ``side`` px takes in the caches: its pixels (uint8), pooled features (float32) and the
        cuts' activations (float16); measured on one blank photo, since backbones round odd sizes differently."""
        self._interpreter.resize_tensor_input(self._input, (1, side, side, 3))
        self._interpreter.allocate_tensors()
        outputs = self._interpreter.get_output_details()
        size = {o["index"]: int(np.prod(o["shape"])) for o in outputs}
        return side * side * 3 + 4 * size[self._pooled] + 2 * sum(size[a] for a in self._acts)

    def run(self, pixels: np.ndarray, copy: int = 0, batch: int = 16) -> tuple[np.ndarray, list[np.ndarray]]:
        """Pooled features (n, 2c) float32 (mean, then max) and the cuts' activations (float16) of copy ``copy``."""
        started = time.perf_counter()
        pooled, acts = [], []
        shape = None
        for i in range(0, len(pixels), batch):
            chunk = flip(pixels[i : i + batch], copy).astype(np.float32)
            if chunk.shape != shape:
                self._interpreter.resize_tensor_input(self._input, chunk.shape)
                self._interpreter.allocate_tensors()
                shape = chunk.shape
            self._interpreter.set_tensor(self._input, chunk)
            self._interpreter.invoke()
            pooled.append(self._interpreter.get_tensor(self._pooled))
            acts.append([self._interpreter.get_tensor(a).astype(np.float16) for a in self._acts])
        seconds = max(time.perf_counter() - started, 1e-6)
        self.rate = len(pixels) * (pixels.shape[1] * pixels.shape[2]) / (224 * 224) / seconds
        return np.concatenate(pooled), [np.concatenate(a) for a in zip(*acts, strict=True)]


def pooled_view(pooled: np.ndarray, pooling: str) -> np.ndarray:
    """The head's input for ``pooling`` out of the tap's [mean, max] features."""
    return pooled[:, : pooled.shape[1] // 2] if pooling == "avg" else pooled


@dataclass
class Probe:
    """A linear head on pooled features (logistic regression), and its Dense layer equivalent."""

    weights: np.ndarray
    bias: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, num_classes: int, weighting: str, strength: float) -> Probe:
        scaler = StandardScaler().fit(x)
        sample_weight = class_weights(y, num_classes, weighting)[y]
        lr = LogisticRegression(C=strength, max_iter=150, tol=1e-3)
        lr.fit(scaler.transform(x), y, sample_weight=sample_weight)
        # softmax logits of every class, a class absent from the training part at a very low one
        coef = np.zeros((num_classes, x.shape[1]))
        intercept = np.full(num_classes, -30.0)
        if len(lr.classes_) == 2:  # scikit-learn keeps one row: the second class's logit against the first's 0
            coef[lr.classes_[1]] = lr.coef_[0]
            intercept[lr.classes_] = [0.0, lr.intercept_[0]]
        else:
            coef[lr.classes_] = lr.coef_
            intercept[lr.classes_] = lr.intercept_
        scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
        # the standardisation folded into the layer: coef @ ((x - mean) / scale) + intercept
        return cls((coef / scale).T.astype(np.float32), (intercept - coef @ (scaler.mean_ / scale)).astype(np.float32))

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        logits = x @ self.weights + self.bias
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(axis=1, keepdims=True)


def scores(probabilities: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(accuracy, log loss) of predicted probabilities."""
    p = np.clip(probabilities[np.arange(len(labels)), labels], 1e-7, 1.0)
    return float(np.mean(probabilities.argmax(axis=1) == labels)), float(-np.mean(np.log(p)))


@dataclass
class Trial:
    """One candidate's settings and its validation figures (means over the folds)."""

    stage: str
    settings: dict[str, object]
    accuracy: float
    loss: float
    seconds: float
    extra: dict[str, object] = field(default_factory=dict)

    def key(self) -> tuple[float, float]:
        """Higher accuracy first, then lower loss; accuracies within one part in ten thousand count as equal."""
        return (round(self.accuracy, 4), -self.loss)

    def record(self) -> dict[str, object]:
        return {
            "stage": self.stage,
            **self.settings,
            "val_accuracy": round(self.accuracy, 4),
            "val_loss": round(self.loss, 4),
            "seconds": round(self.seconds, 1),
            **self.extra,
        }


def probe_trial(
    pooled: Callable[[int], np.ndarray],
    labels: np.ndarray,
    folds: Folds,
    num_classes: int,
    settings: dict,
    copies: int = 1,
    stage: str = "frozen",
) -> Trial:
    """Fit a probe per fold on copies 0..copies-1 of the training images, score it on the validation images as is."""
    started = time.perf_counter()
    accuracy, loss = [], []
    for train, val in folds.pairs:
        x = np.concatenate([pooled(c)[train] for c in range(copies)])
        y = np.tile(labels[train], copies)
        probe = Probe.fit(x, y, num_classes, settings["weighting"], settings["strength"])
        a, b = scores(probe.probabilities(pooled(0)[val]), labels[val])
        accuracy.append(a)
        loss.append(b)
    return Trial(stage, dict(settings), float(np.mean(accuracy)), float(np.mean(loss)), time.perf_counter() - started)


@dataclass
class FineTuneResult:
    accuracy: float
    loss: float
    best_epoch: int
    stopped: str
    curves: dict[str, list[float]]
    weights: list[np.ndarray] | None = None
    """Backbone then head weights at the best epoch (None when nothing beat the start)."""
    start: tuple[float, float] | None = None
    """(accuracy, loss) on the validation part before the first epoch: the head fine-tuning starts from."""

    def at_epoch(self, epoch: int) -> tuple[float, float]:
        """(accuracy, loss) on the validation part after ``epoch`` epochs (0: the start); a run that stopped
        earlier counts with its last epoch."""
        done = len(self.curves["val_accuracy"])
        if epoch == 0 or done == 0:
            assert self.start is not None
            return self.start
        i = min(epoch, done) - 1
        return self.curves["val_accuracy"][i], self.curves["val_loss"][i]


def common_epoch(results: list[FineTuneResult]) -> tuple[int, float, float]:
    """(epochs, mean accuracy, mean loss): the one epoch count, 0 included, whose validation figures averaged
    over the folds are best, and those means.

    Each fold at its own best epoch would be a maximum over a dozen noisy measurements per fold, an estimate
    that flatters fine-tuning against the probe it starts from (whose figure is no maximum) and describes no
    model: the refit trains for one epoch count. With one validation part this is that part's best epoch.
    """
    longest = max(len(r.curves["val_accuracy"]) for r in results)
    best: tuple[tuple[float, float], int, float, float] | None = None
    for epoch in range(longest + 1):
        figures = np.array([r.at_epoch(epoch) for r in results])
        accuracy, loss = float(figures[:, 0].mean()), float(figures[:, 1].mean())
        key = (round(accuracy, 4), -loss)
        if best is None or key > best[0]:
            best = (key, epoch, accuracy, loss)
    assert best is not None
    return best[1], best[2], best[3]


class FineTuner:
    """Trains the backbone above ``cut`` plus the head on cached activations of the flipped copies."""

    def __init__(
        self,
        arch: str,
        backbone: keras.Model,
        head_model: keras.Model,
        cut: str | None,
        num_classes: int,
        *,
        learning_rate: float,
        batch_size: int,
        seed: int,
    ) -> None:
        self.backbone, self.head, self.cut = backbone, head_model, cut
        self.learning_rate, self.batch_size, self.num_classes = learning_rate, batch_size, num_classes
        self.rng = np.random.default_rng(seed)
        upper = top_part(backbone, cut)
        inputs = keras.Input(upper.input.shape[1:], name="activations")
        x = preprocessed(arch, inputs) if cut is None else inputs
        self.model = keras.Model(inputs, head_model(upper(x, training=False)))
        self.trainable = unfreeze_above(backbone, cut)
        # compiled once: a fold or the refit resets the optimizer's state instead of retracing the step
        self.model.compile(
            optimizer=keras.optimizers.Adam(learning_rate), loss="sparse_categorical_crossentropy", metrics=["accuracy"]
        )

    def snapshot(self) -> list[np.ndarray]:
        return self.backbone.get_weights() + self.head.get_weights()

    def restore(self, weights: list[np.ndarray]) -> None:
        n = len(self.backbone.get_weights())
        self.backbone.set_weights(weights[:n])
        self.head.set_weights(weights[n:])

    def fit(
        self,
        batch_of: Callable[[np.ndarray, np.ndarray], np.ndarray],
        labels: np.ndarray,
        train: np.ndarray,
        val: np.ndarray | None,
        *,
        copies: int,
        weighting: str,
        max_epochs: int,
        epochs: int | None = None,
        patience: int = 4,
        deadline: Callable[[float], bool] = lambda _: False,
        on_epoch: Callable[[int, dict[str, float]], None] = lambda *_: None,
    ) -> FineTuneResult:
        """Train for at most ``max_epochs`` (exactly ``epochs`` when given, e.g. for the final refit) with a linear
        warm-up over the first epoch and cosine decay over ``max_epochs``; stop early on the validation figures
        (``val``) or when ``deadline(seconds one more epoch takes)`` says the budget would not allow another."""
        steps = max(1, math.ceil(len(train) / self.batch_size))
        optimizer = self.model.optimizer
        for variable in optimizer.variables:
            variable.assign(keras.ops.zeros(variable.shape, variable.dtype))  # zeros_like fails on JAX variables

        def rate(step: int) -> float:
            if step < steps:  # linear warm-up over the first epoch
                return self.learning_rate * (step + 1) / steps
            return (
                self.learning_rate
                * 0.5
                * (1 + math.cos(math.pi * min(1.0, (step - steps) / max(1, steps * (max_epochs - 1)))))
            )

        step = 0
        sampling = class_weights(labels[train], self.num_classes, weighting)[labels[train]]
        sampling = sampling / sampling.sum()
        curves: dict[str, list[float]] = {"loss": [], "val_loss": [], "accuracy": [], "val_accuracy": []}
        best: FineTuneResult | None = None
        start_val = self._validate(batch_of, labels, val) if val is not None else None
        best_key = (round(start_val[0], 4), -start_val[1]) if start_val else None
        stopped, epoch, since_best = "epochs", 0, 0
        target = epochs or max_epochs
        while epoch < target:
            started = time.perf_counter()
            order = (
                self.rng.permutation(train)
                if weighting == "none"
                else self.rng.choice(train, size=len(train), p=sampling)
            )
            chosen = self.rng.integers(copies, size=len(order))
            losses, hits = [], []
            for i in range(0, len(order), self.batch_size):
                idx, cp = order[i : i + self.batch_size], chosen[i : i + self.batch_size]
                optimizer.learning_rate.assign(rate(step))
                step += 1
                loss, accuracy = self.model.train_on_batch(batch_of(idx, cp), labels[idx])
                losses.append(float(loss) * len(idx))
                hits.append(float(accuracy) * len(idx))
            epoch += 1
            curves["loss"].append(sum(losses) / len(order))
            curves["accuracy"].append(sum(hits) / len(order))
            figures = {"loss": curves["loss"][-1], "accuracy": curves["accuracy"][-1]}
            if val is not None:
                acc, vloss = self._validate(batch_of, labels, val)
                curves["val_accuracy"].append(acc)
                curves["val_loss"].append(vloss)
                figures.update(val_accuracy=acc, val_loss=vloss)
                key = (round(acc, 4), -vloss)
                if best_key is None or key > best_key:
                    best_key, since_best = key, 0
                    best = FineTuneResult(acc, vloss, epoch, "", {}, self.snapshot())
                else:
                    since_best += 1
            on_epoch(epoch, figures)
            if epochs is None and val is not None and since_best >= patience:
                stopped = "early stopping"
                break
            if epoch < target and deadline(time.perf_counter() - started):
                stopped = "time budget"
                break
        if val is None:
            return FineTuneResult(math.nan, math.nan, epoch, stopped, curves, self.snapshot())
        if best is None:  # never better than where it started
            assert start_val is not None
            return FineTuneResult(start_val[0], start_val[1], 0, stopped, curves, None, start_val)
        best.stopped, best.curves, best.start = stopped, curves, start_val
        return best

    def _validate(self, batch_of: Callable, labels: np.ndarray, val: np.ndarray) -> tuple[float, float]:
        probabilities = self.model.predict(batch_of(val, np.zeros(len(val), int)), batch_size=64, verbose=0)
        return scores(np.asarray(probabilities), labels[val])
