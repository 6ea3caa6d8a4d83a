"""The time budget of one training run, and the progress lines that say how much of it is spent and left."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("plcsense.training")


def epoch_figures(figures: dict[str, float]) -> str:
    """One epoch's figures for a progress line: ``loss 0.1234, accuracy 0.9876, ...`` in the order given."""
    return ", ".join(f"{name} {float(value):.4f}" for name, value in figures.items())


class Clock:
    """The time budget of one training run; every progress line says how much of it is spent and left."""

    def __init__(self, budget: float) -> None:
        self.budget = budget
        self.start = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @property
    def remaining(self) -> float:
        return self.budget - self.elapsed

    def progress(self, phase: str, message: str, *args: object) -> None:
        log.info("[%s %4.0fs elapsed, %4.0fs left] " + message, phase, self.elapsed, max(0.0, self.remaining), *args)
