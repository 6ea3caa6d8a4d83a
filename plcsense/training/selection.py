"""Choosing a sensor anomaly detector from the user's normal data alone, within a time budget.

There are no labelled faults to choose with, so each candidate is judged on what it will face: normal data it
has not seen, and faults it has not seen. The normal rows are split in time: every candidate is fitted and
calibrated (its own threshold rule) on the first ``1 - validation_split`` of them and then scores the rest:

- false alarms: the share of those later, normal windows it flags;
- detection: the same windows with a synthetic fault injected, one channel at a time: a level shift of
  +/- ``shift`` x that channel's standard deviation from a point in the validation part to its end (a valve
  that throttles, a sensor that drifts off, a bearing that starts to rub). Windows from the fault's first reading
  on count, so a detector that reacts late loses detection.

The criterion is Youden's J = detection - false alarms (both rates in [0, 1]). The first candidate is the
default; another replaces it only when its J is higher by more than ``min_gain_se`` standard errors of the paired
difference and by ``min_gain`` (the highest such wins). The winner is then fitted again on all normal rows.
Candidates run cheapest first; one that would start after the budget is spent is skipped and listed as such, and
Ctrl-C stops the search with the best candidate so far. No label is read.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from plcsense.training.data import varies

log = logging.getLogger("plcsense.training")


class Fitted(Protocol):
    """A fitted, calibrated candidate as selection sees it."""

    threshold: float
    window: int

    def scores(self, run: np.ndarray) -> np.ndarray:
        """Raw rows (n, C) -> (n - window + 1,) anomaly scores of the windows ending at each row."""
        ...


FitFn = Callable[[object, list[np.ndarray], float], Fitted]
"""fit(candidate settings, normal runs, deadline as time.monotonic()) -> a fitted, calibrated candidate."""


@dataclass(frozen=True)
class SelectionSettings:
    validation_split: float = 0.3  # last part of the normal rows, in time, that candidates are judged on
    shifts: tuple[float, ...] = (2.0, 4.0)  # injected level shifts, in standard deviations of the channel
    min_gain_se: float = 2.0  # how many standard errors a candidate must beat the first (default) one by
    min_gain: float = 0.01  # and by at least this much J: identical detections leave a standard error of 0


@dataclass
class Trial:
    """What one candidate did on the validation part."""

    candidate: str
    settings: dict
    detections: np.ndarray  # detection rate per injected fault (channel x shift x sign)
    false_alarms: float
    threshold: float
    seconds: float
    gain_over_first: float = 0.0  # criterion minus the first candidate's
    gain_se: float = 0.0  # standard error of that gain, from the paired per-fault differences

    @property
    def detection(self) -> float:
        return float(self.detections.mean())

    @property
    def criterion(self) -> float:
        return self.detection - self.false_alarms

    def as_dict(self) -> dict:
        return {
            "candidate": self.candidate,
            "settings": self.settings,
            "detection": round(self.detection, 4),
            "false_alarms": round(self.false_alarms, 4),
            "criterion": round(self.criterion, 4),
            "gain_over_first": round(self.gain_over_first, 4),
            "gain_se": round(self.gain_se, 4),
            "threshold": self.threshold,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class Selection:
    chosen: object  # the winning candidate's settings
    winner: Trial
    trials: list[Trial]
    skipped: list[str] = field(default_factory=list)  # candidates not tried, with the reason
    interrupted: bool = False
    validation_rows: int = 0
    fit_rows: int = 0
    seconds: float = 0.0

    def report(self, time_budget: float, settings: SelectionSettings) -> dict:
        first, best = self.trials[0], self.winner
        if best is first:
            why = (
                f"the first (default) candidate: no other beat its J of {first.criterion:.3f} by more than "
                f"{settings.min_gain_se:g} standard error(s) of the difference and {settings.min_gain:g}"
            )
        else:
            why = (
                f"J {best.criterion:.3f} = detection {best.detection:.3f} - false alarms {best.false_alarms:.3f}, "
                f"{best.gain_over_first:.3f} above the first candidate's (standard error {best.gain_se:.3f})"
            )
        return {
            "criterion": "J = detection - false alarms on later normal rows, faults injected synthetically; "
            "another candidate replaces the first only when its gain exceeds min_gain_se standard errors and "
            "min_gain",
            "validation_split": settings.validation_split,
            "injected_shifts_sd": list(settings.shifts),
            "min_gain_se": settings.min_gain_se,
            "min_gain": settings.min_gain,
            "fit_rows": self.fit_rows,
            "validation_rows": self.validation_rows,
            "time_budget_s": time_budget,
            "seconds": round(self.seconds, 2),
            "interrupted": self.interrupted,
            "chosen": best.candidate,
            "why": why,
            "trials": [t.as_dict() for t in self.trials],
            "skipped": self.skipped,
        }


def split_in_time(
    runs: Sequence[np.ndarray], validation_split: float
) -> tuple[list[np.ndarray], list[tuple[np.ndarray, int]]]:
    """(fit runs, validation runs): the last ``validation_split`` of all rows, in order, is for validation.

    A validation run is (run, first validation row): the rows before it stay as context for the first windows.
    """
    total = sum(len(r) for r in runs)
    cut = round(total * (1 - validation_split))
    fit, validation, seen = [], [], 0
    for run in runs:
        here = min(max(cut - seen, 0), len(run))  # rows of this run before the cut
        if here:
            fit.append(run[:here])
        if here < len(run):
            validation.append((run, here))
        seen += len(run)
    return fit, validation


def judge(
    fitted: Fitted, validation: list[tuple[np.ndarray, int]], spread: np.ndarray, shifts: Sequence[float]
) -> tuple[np.ndarray, float]:
    """(detection rate per injected fault, false-alarm rate) of ``fitted`` on validation runs (run, first row)."""
    flagged, windows = 0, 0
    faults = [(c, shift * sign) for c in np.flatnonzero(spread > 0) for shift in shifts for sign in (1.0, -1.0)]
    hits, counts = np.zeros(len(faults)), np.zeros(len(faults))
    for run, first in validation:
        start = max(0, first - fitted.window + 1)  # the windows ending at validation rows reach back this far
        context = run[start:]
        first_end = first - start  # row index (in context) of the first validation row
        scores = fitted.scores(context)
        ends = np.arange(len(scores)) + fitted.window - 1
        clean = scores[ends >= first_end] > fitted.threshold
        flagged += int(clean.sum())
        windows += len(clean)
        onset = first_end + fitted.window  # one clean window of validation rows first
        if onset >= len(context):
            continue
        for k, (channel, shift) in enumerate(faults):
            faulty = context.copy()
            faulty[onset:, channel] += shift * spread[channel]
            hit = fitted.scores(faulty)[ends >= onset] > fitted.threshold
            hits[k] += hit.sum()
            counts[k] += len(hit)
    if not windows or not counts.any():
        raise ValueError("too few normal rows to validate a detector on; record more normal data")
    return hits / np.maximum(counts, 1), flagged / windows


def select(
    runs: Sequence[np.ndarray],
    candidates: Sequence[tuple[str, object]],
    fit: FitFn,
    *,
    time_budget: float,
    settings: SelectionSettings | None = None,
    started: float | None = None,
) -> Selection:
    """Try ``candidates`` (name, settings) in order within ``time_budget`` seconds from ``started``."""
    s = settings or SelectionSettings()
    started = time.monotonic() if started is None else started
    deadline = started + time_budget
    fit_runs, validation = split_in_time(runs, s.validation_split)
    rows = np.concatenate(fit_runs)
    spread = rows.std(axis=0)
    spread = np.where(varies(spread, rows.mean(axis=0)), spread, 0.0)
    selection = Selection(
        chosen=None,
        winner=None,  # type: ignore[arg-type]
        trials=[],
        fit_rows=sum(len(r) for r in fit_runs),
        validation_rows=sum(len(r) - first for r, first in validation),
    )
    for i, (name, candidate) in enumerate(candidates):
        now = time.monotonic()
        if now >= deadline and selection.trials:
            selection.skipped.append(f"{name}: time budget of {time_budget:.0f} s spent")
            continue
        try:
            fitted = fit(candidate, fit_runs, now + (deadline - now) / 2)  # half: the winner is refitted
            detections, false_alarms = judge(fitted, validation, spread, s.shifts)
        except KeyboardInterrupt:
            if not selection.trials:
                raise
            selection.interrupted = True
            selection.skipped += [f"{n}: interrupted (Ctrl-C)" for n, _ in candidates[i:]]
            log.warning("interrupted: keeping the best candidate so far")
            break
        except ValueError as exc:  # a candidate that cannot use this data (window too long, too few rows)
            selection.skipped.append(f"{name}: {exc}")
            log.info("candidate %d/%d %s: skipped (%s)", i + 1, len(candidates), name, exc)
            continue
        took = time.monotonic() - now
        trial = Trial(name, candidate.as_dict(), detections, false_alarms, float(fitted.threshold), took)  # type: ignore[attr-defined]
        if selection.trials:
            first = selection.trials[0]
            trial.gain_over_first = trial.criterion - first.criterion
            paired = detections - first.detections
            trial.gain_se = float(paired.std(ddof=1) / np.sqrt(len(paired))) if len(paired) > 1 else 0.0
        selection.trials.append(trial)
        elapsed = time.monotonic() - started
        log.info(
            "candidate %d/%d %s: detection %.3f, false alarms %.3f, J %.3f (%.1f s; elapsed %.1f s, %.1f s left)",
            i + 1,
            len(candidates),
            name,
            trial.detection,
            false_alarms,
            trial.criterion,
            took,
            elapsed,
            max(0.0, time_budget - elapsed),
        )
    if not selection.trials:
        raise ValueError("no detector could be fitted: " + "; ".join(selection.skipped))
    # The first candidate is the default; another must beat it by more than chance on these few faults.
    clear = [t for t in selection.trials[1:] if t.gain_over_first > max(s.min_gain_se * t.gain_se, s.min_gain)]
    selection.winner = max([selection.trials[0], *clear], key=lambda t: t.criterion)
    selection.chosen = dict(candidates)[selection.winner.candidate]
    selection.seconds = time.monotonic() - started
    return selection
