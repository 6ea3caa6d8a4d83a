"""The classifier-training skeleton both classifiers (images, sensor cycles) share.

A trainer loads its data into :class:`Splits`, builds its Keras model and runs its fitting phases through a
:class:`ClassifierRun`; everything else happens here, once: the checks on the splits, balanced class weights,
early stopping with the best weights restored and learning-rate decay on plateaus (plus TensorBoard logs),
Ctrl-C ending training with the best weights so far, the training curves across phases, the manifest, the
test figures and ``report/`` measured with the exported LiteRT model, and the (quantised) export.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from plcsense.models.bundle import Bundle, InputSpec, OodSpec, Quantize, new_manifest, split_outputs
from plcsense.models.runtime import LiteRTModel, predict_all
from plcsense.training.backend import tensorboard
from plcsense.training.clock import Clock, epoch_figures
from plcsense.training.data import DataError
from plcsense.training.evaluate import classification_scores
from plcsense.training.export import Quantization, export_bundle
from plcsense.training.ood import INT8_NOTE, OOD_SCORE, fit_threshold, with_ood
from plcsense.training.report import classification_report_files
from plcsense.training.splits import balanced_class_weights, split_indices

log = logging.getLogger("plcsense.training")

CURVES = ("loss", "accuracy", "val_loss", "val_accuracy")


@dataclass
class ClassifierConfig:
    """What every classifier trainer takes; each trainer's config adds its own fields and defaults."""

    epochs: int = 30
    batch_size: int = 32
    learning_rate: float = 1e-3
    seed: int = 42
    val_split: float = 0.15
    test_split: float = 0.15
    class_weights: bool = True
    """Weight the loss by inverse class frequency so a rare class is not drowned by the common one."""
    tensorboard: Path | None = None
    quantize: Quantize = "none"
    """Exported model: float32 (none), float16 weights, or full int8 (refused if top-1 agreement is too low)."""
    min_agreement: float = 0.98
    name: str | None = None
    version: str = "1"


@dataclass(frozen=True)
class Schedule:
    """When a fitting phase stops and how its learning rate decays, both on validation loss."""

    patience: int
    """Epochs without a better validation loss before the phase stops (its best weights are kept)."""
    lr_factor: float
    lr_patience: int
    min_lr: float


@dataclass
class Splits:
    """Inputs and integer labels of the training, validation and test parts; ``classes`` names the labels."""

    classes: list[str]
    train: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]

    @classmethod
    def seeded(cls, inputs: np.ndarray, labels: np.ndarray, classes: list[str], cfg: ClassifierConfig) -> Splits:
        """A seeded, stratified split of one labelled set by ``cfg.val_split`` and ``cfg.test_split``."""
        parts = split_indices(labels, cfg.val_split, cfg.test_split, cfg.seed)
        return cls(classes, *((inputs[i], labels[i]) for i in parts))

    @property
    def held_out(self) -> tuple[np.ndarray, np.ndarray]:
        """The part the exported model is scored on: the test part, or the validation part when there is none."""
        return self.test if len(self.test[1]) else self.val


class EpochBudget(keras.callbacks.Callback):
    """A progress line per epoch with the elapsed and remaining time of the run's budget, and the end of the
    phase when one more epoch would leave less than ``reserve`` seconds (the export's share) of it."""

    def __init__(self, clock: Clock, phase: str, epochs: int, reserve: float) -> None:
        super().__init__()
        self.clock, self.phase, self.epochs, self.reserve = clock, phase, epochs, reserve
        self.began = 0.0
        self.stopped = False

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.began = self.clock.elapsed

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        took = self.clock.elapsed - self.began
        logs = logs or {}
        figures = epoch_figures({k: logs[k] for k in CURVES if k in logs})
        self.clock.progress(self.phase, "epoch %d/%d: %s (%.0f s)", epoch + 1, self.epochs, figures, took)
        if epoch + 1 < self.epochs and self.clock.remaining - took < self.reserve:
            self.stopped = True
            self.model.stop_training = True
            self.clock.progress(
                self.phase,
                "stopping: another epoch (~%.0f s) would leave under %.0f s of the time budget for the export",
                took,
                self.reserve,
            )


class ClassifierRun:
    """One training run of a classifier on ``splits``, from the first fitting phase to the exported bundle."""

    def __init__(
        self, data_dir: Path, cfg: ClassifierConfig, splits: Splits, schedule: Schedule, *, describe: str
    ) -> None:
        """Check the splits, log them (``describe`` says what a sample is) and seed Keras for the model to build."""
        if len(splits.classes) < 2:
            raise DataError(f"{data_dir} has one class folder ({splits.classes[0]}); a classifier needs at least two")
        n_train, n_val, n_test = (len(part[1]) for part in (splits.train, splits.val, splits.test))
        if not n_train or not n_val:
            raise DataError(
                f"{data_dir}: {n_train} training and {n_val} validation samples; a classifier needs both: add "
                "samples, raise --val-split or add a val/ folder"
            )
        labels = np.concatenate([splits.train[1], splits.val[1], splits.test[1]])
        counts = np.bincount(labels, minlength=len(splits.classes))
        log.info(
            "%d classes (%s); %d train / %d val / %d test samples of %s",
            len(splits.classes),
            ", ".join(f"{c} {n}" for c, n in zip(splits.classes, counts, strict=True)),
            n_train,
            n_val,
            n_test,
            describe,
        )
        self.data_dir, self.cfg, self.splits, self.schedule = data_dir, cfg, splits, schedule
        self.class_weight = balanced_class_weights(splits.train[1], len(splits.classes)) if cfg.class_weights else None
        self.history: dict[str, list[float]] = {}
        """Training curves of every phase so far, one after the other; ``phase_boundary`` marks where a later
        phase starts."""
        self.interrupted = False
        keras.utils.set_random_seed(cfg.seed)

    def compile(self, model: keras.Model, learning_rate: float) -> keras.Model:
        model.compile(
            optimizer=keras.optimizers.Adam(learning_rate), loss="sparse_categorical_crossentropy", metrics=["accuracy"]
        )
        return model

    def fit(
        self,
        model: keras.Model,
        train: tuple[np.ndarray, np.ndarray],
        val: tuple[np.ndarray, np.ndarray],
        epochs: int,
        budget: EpochBudget | None = None,
    ) -> dict[str, list[float]]:
        """One fitting phase; returns its curves. Ctrl-C restores the best weights seen, then re-raises.
        ``budget`` logs each epoch against the run's time budget (instead of Keras' lines) and ends the phase
        in time; the best weights seen are restored either way."""
        s = self.schedule
        early = keras.callbacks.EarlyStopping(patience=s.patience, restore_best_weights=True)
        history = keras.callbacks.History()
        callbacks = [
            early,
            keras.callbacks.ReduceLROnPlateau(factor=s.lr_factor, patience=s.lr_patience, min_lr=s.min_lr),
            history,
        ]
        if budget is not None:
            callbacks.append(budget)
        if self.cfg.tensorboard:
            callbacks.append(tensorboard(self.cfg.tensorboard))
        try:
            model.fit(
                train[0],
                train[1],
                validation_data=val,
                epochs=epochs,
                batch_size=self.cfg.batch_size,
                callbacks=callbacks,
                class_weight=self.class_weight,
                verbose=0 if budget is not None else 1 if sys.stdout.isatty() else 2,
            )
        except KeyboardInterrupt:
            if early.best_weights is not None:
                model.set_weights(early.best_weights)
            log.warning("training interrupted: exporting the best model so far")
            raise
        finally:
            phase = {k: [float(v) for v in vs] for k, vs in history.history.items() if k != "learning_rate"}
            self._record(phase)
        return phase

    def _record(self, phase: dict[str, list[float]]) -> None:
        if not self.history:
            self.history = dict(phase)
            return
        boundary = len(self.history["loss"])
        self.history = {k: self.history.get(k, []) + phase.get(k, []) for k in CURVES}
        self.history["phase_boundary"] = [float(boundary)]

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """Run the fitting phases inside: Ctrl-C ends training, and the run goes on to export what it has."""
        try:
            yield
        except KeyboardInterrupt:
            self.interrupted = True

    def export(
        self,
        out: Path,
        model: keras.Model,
        spec: InputSpec,
        *,
        show_misclassified: bool = False,
        held_out_name: str | None = None,
        extra_metrics: dict[str, float] | None = None,
        report_files: dict[str, str] | None = None,
    ) -> Bundle:
        """Export ``model`` with its manifest; test figures and ``report/`` come from the LiteRT model.

        The exported graph appends an out-of-distribution score (:mod:`plcsense.training.ood`), fitted on the
        training features; its threshold comes from the validation inputs run through the model that ships.
        ``show_misclassified``: the held-out inputs are pictures, drawn in ``report/misclassified.png``.
        ``held_out_name`` prefixes the held-out figures: ``test``, or ``val`` when there is no test part (the part
        that chose the epoch; ``fit`` when the model was refitted on it). ``test_unknown`` exists with a test part
        only: on the validation inputs the ood threshold was set on, it is about 1 % by construction;
        ``extra_metrics`` go into the manifest, ``report_files`` (name -> text) into ``report/``.
        """
        cfg, splits = self.cfg, self.splits
        manifest = new_manifest(
            name=cfg.name or self.data_dir.resolve().name,
            version=cfg.version,
            task="classification",
            input=spec,
            labels=splits.classes,
            ood=OodSpec(score=OOD_SCORE, threshold=1.0),  # the threshold is fitted by calibrate() below
        )
        manifest.metrics.update(
            {
                "train_samples": len(splits.train[1]),
                "val_samples": len(splits.val[1]),
                "test_samples": len(splits.test[1]),
            }
        )
        if self.interrupted:
            manifest.metrics["interrupted"] = 1.0
        manifest.metrics.update(extra_metrics or {})
        inputs, labels = splits.held_out
        tested = len(splits.test[1]) > 0
        held_out_name = held_out_name or ("test" if tested else "val")

        def probabilities(lite: LiteRTModel, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
            return split_outputs(manifest, predict_all(lite, x))

        def score(lite: LiteRTModel) -> dict[str, float]:
            scores = classification_scores(probabilities(lite, inputs)[0], labels)
            return {f"{held_out_name}_accuracy": scores["accuracy"], f"{held_out_name}_loss": scores["loss"]}

        def report(lite: LiteRTModel, folder: Path) -> None:
            classification_report_files(
                folder,
                probabilities(lite, inputs)[0],
                labels,
                splits.classes,
                images=inputs if show_misclassified else None,
                history=self.history,
                part=held_out_name,
            )
            for name, text in (report_files or {}).items():
                (folder / name).write_text(text)

        def calibrate(lite: LiteRTModel) -> None:
            assert manifest.ood is not None
            manifest.ood.threshold = fit_threshold(probabilities(lite, splits.val[0])[1])
            if tested:
                ood = probabilities(lite, inputs)[1]
                manifest.metrics["test_unknown"] = float(np.mean(ood > manifest.ood.threshold))
            if cfg.quantize == "int8":
                log.warning(INT8_NOTE)

        model = with_ood(model, splits.train, splits.val[0], len(splits.classes), cfg.batch_size)
        quantization = Quantization(cfg.quantize, splits.train[0], cfg.min_agreement)
        return export_bundle(
            out, model, manifest, inputs, score, quantization=quantization, report=report, calibrate=calibrate
        )
