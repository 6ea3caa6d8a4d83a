"""A fast, drift-tolerant anomaly detector for multichannel sensor data, exported as a plain Keras model.

The detector ("AR innovations"): each channel, standardised with the training part's statistics, gets its own
autoregressive model AR(p) fitted by least squares on normal operation. What the AR model cannot predict (the
innovation) is averaged over the last ``mean_window`` readings, divided by that channel's tolerance, squared,
and averaged again over the last ``smooth`` positions. That mean is the channel's error; the anomaly score is
the mean over channels, compared with a threshold calibrated on held-out normal windows.

Why this design (measured on SKAB, ``bench/skab.py``):

- Level shifts (a valve that throttles the flow) are what the labelled faults look like; the AR filter keeps
  the level of a stationary channel, so a shift shows up in its innovations. A channel whose AR coefficients sum
  to ``unit_root`` or more wanders like a random walk; it is modelled by its changes (AR on differences), so
  only an unusual rate of change counts, never the level it has wandered to.
- A drift allowance widens a channel's tolerance where the training part shows its window mean still growing
  apart with lag (a variogram extrapolated from ``drift_lag`` to ``drift_horizon`` rows).
- Everything after the normalisation is linear up to one square, so the whole detector is a fixed-weight
  Dense layer: it converts to LiteRT exactly, scores thousands of windows per second and "training" is a few
  least-squares solves (milliseconds, no epochs, no seed dependence).

Calibration, without labels (``calibrate``): blocked time-series cross-validation with a gap ("hv-block",
Racine 2000; Bergmeir & Benitez 2012): the normal rows are cut into ``folds`` consecutive blocks; for each block
a detector is fitted on the rows outside it (less ``window`` rows either side, so autocorrelation does not leak)
and scores the windows whose innovations all lie inside it. These held-out scores set two things:

1. Each channel's tolerance: a channel whose held-out errors have a heavier tail than its in-fold errors (a
   temperature that moves in bursts the AR model never saw, say) is widened by the ratio of their
   ``channel_quantile`` quantiles. Without this, one bursty channel raises the common threshold so far that a
   clear fault on another channel goes unflagged.
2. The threshold: the score a held-out normal window exceeds with probability ``risk``, from a scaled chi-square
   fitted to the held-out scores (``thresholds.scaled_chi2_threshold``).

The exported model has the product's sensor interface: a raw window ``(window, channels)`` float32 in, one
error per channel out; normalisation is inside the graph; ``score = mean(errors) > threshold``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import keras
import numpy as np
from keras import layers

from plcsense.training.data import channel_stats
from plcsense.training.thresholds import TailFit, scaled_chi2_threshold

SCALE_FLOOR = 1e-3  # smallest tolerance of a standardised channel: a channel flat in training still scores finitely


@dataclass(frozen=True)
class ARSettings:
    """The AR-innovation detector's settings; defaults chosen on SKAB valve1 (see ``bench/skab.py``)."""

    ar_order: int = 3  # p: past readings each channel is predicted from
    mean_window: int = 5  # innovations averaged over this many readings (noise down, a level shift stays)
    smooth: int = 20  # squared errors averaged over this many positions (fewer isolated false alarms)
    ridge: float = 1e-4  # least-squares regularisation, relative to the number of training rows
    unit_root: float = 0.5  # channels whose AR coefficients sum to at least this are modelled by their changes
    drift_lag: int = 50  # lag at which the training part's drift is measured (and at lag / 4)
    drift_horizon: int = 400  # rows ahead the measured drift is extrapolated to; 0 switches the allowance off
    risk: float = 1e-5  # probability that a held-out normal window scores above the threshold (fitted tail)
    folds: int = 8  # blocks of the blocked time-series cross-validation that produces held-out scores
    channel_quantile: float = 0.99  # tail quantile whose held-out / in-fold ratio widens a channel's tolerance

    @property
    def window(self) -> int:
        """Readings one prediction needs: AR order + mean window + smoothing - 1 (27 with the defaults)."""
        return self.ar_order + self.mean_window + self.smooth - 1

    @property
    def taps(self) -> int:
        """Readings one innovation mean depends on."""
        return self.ar_order + self.mean_window

    def with_window(self, window: int | None) -> ARSettings:
        """The same settings with ``smooth`` changed so that the model takes ``window`` readings."""
        if window is None or window == self.window:
            return self
        smooth = window - self.taps + 1
        if smooth < 1:
            raise ValueError(
                f"window {window} is too short: needs at least ar_order + mean_window = {self.taps} readings"
            )
        return replace(self, smooth=smooth)

    def describe(self) -> str:
        return f"ar(order {self.ar_order}, mean {self.mean_window}, smooth {self.smooth}, unit root {self.unit_root})"

    def as_dict(self) -> dict[str, float]:
        return {"detector": "ar", **asdict(self), "window": self.window}  # type: ignore[dict-item]


Segments = Sequence[np.ndarray]
"""Runs of consecutive normal rows (rows, C); no window or AR lag ever spans two of them."""


def as_segments(values: np.ndarray | Segments) -> list[np.ndarray]:
    if isinstance(values, np.ndarray) and values.ndim == 2:
        return [np.asarray(values, dtype=np.float64)]
    return [np.asarray(v, dtype=np.float64) for v in values]


@dataclass
class FittedDetector:
    """The numbers a fit produces; ``model()`` turns them into the exported Keras graph."""

    mean: np.ndarray  # (C,) channel means of the training part
    std: np.ndarray  # (C,) channel standard deviations (1 where a channel is constant)
    filters: np.ndarray  # (p + mean_window, C) FIR weights on standardised readings, newest reading first
    bias: np.ndarray  # (C,)
    settings: ARSettings

    def widened(self, factors: np.ndarray) -> FittedDetector:
        """The same detector with channel c's squared error divided by ``factors[c]`` (>= 1)."""
        root = np.sqrt(np.asarray(factors, dtype=np.float64))
        return replace(self, filters=self.filters / root, bias=self.bias / root)

    def channel_scores(self, values: np.ndarray) -> np.ndarray:
        """Raw rows (n, C) -> (n - window + 1, C): per-channel errors of the window ending at each row from
        ``window - 1`` on; the same numbers as ``model()`` (numpy, for calibration and selection)."""
        s = self.settings
        z = (np.asarray(values, dtype=np.float64) - self.mean) / self.std
        if len(z) < s.window:
            return np.zeros((0, z.shape[1]))
        taps = np.lib.stride_tricks.sliding_window_view(z, s.taps, axis=0)  # (n - taps + 1, C, taps), oldest first
        means = np.einsum("nct,tc->nc", taps, self.filters[::-1]) + self.bias
        return _moving_mean(np.square(means), s.smooth)

    def model(self) -> keras.Model:
        """Raw window (window, C) -> per-channel error (C,): Normalization, one fixed Dense, square, mean."""
        s = self.settings
        window, channels, taps = s.window, len(self.mean), self.filters.shape[0]
        # Output j (0 = newest) of channel c reads standardised rows window-1-j-l, l = 0..taps-1.
        kernel = np.zeros((window, channels, s.smooth, channels), np.float32)
        for j in range(s.smooth):
            for lag in range(taps):
                kernel[window - 1 - j - lag, np.arange(channels), j, np.arange(channels)] = self.filters[lag]
        kernel = kernel.reshape(window * channels, s.smooth * channels)
        bias = np.tile(self.bias, s.smooth).astype(np.float32)

        raw = keras.Input((window, channels), name="readings")
        x = layers.Normalization(axis=-1, mean=self.mean, variance=np.square(self.std), name="normalise")(raw)
        x = layers.Flatten(name="flatten")(x)
        dense = layers.Dense(s.smooth * channels, name="innovation_means", trainable=False)
        x = dense(x)
        dense.set_weights([kernel, bias])
        x = layers.Multiply(name="square")([x, x])
        x = layers.Reshape((s.smooth, channels), name="positions")(x)
        errors = layers.GlobalAveragePooling1D(name="channel_errors")(x)
        return keras.Model(raw, errors, name="ar_innovation_detector")


def _moving_mean(values: np.ndarray, width: int) -> np.ndarray:
    """(n, C) -> (n - width + 1, C): mean of each run of ``width`` consecutive rows."""
    cumulative = np.concatenate([np.zeros((1, values.shape[1])), np.cumsum(values, axis=0)])
    return (cumulative[width:] - cumulative[:-width]) / width


def _autoregression(series: list[np.ndarray], order: int, ridge: float) -> tuple[np.ndarray, float]:
    """Ridge least squares for x_t ~ sum_k coef_k x_{t-k} + intercept over several runs: (coef, intercept)."""
    design, target = [], []
    for x in series:
        n = len(x)
        if n > order:
            design.append(np.stack([x[order - k : n - k] for k in range(1, order + 1)] + [np.ones(n - order)], 1))
            target.append(x[order:])
    d, t = np.concatenate(design), np.concatenate(target)
    coef = np.linalg.solve(d.T @ d + ridge * len(t) * np.eye(order + 1), d.T @ t)
    return coef[:order], float(coef[order])


def fit_detector(train: np.ndarray | Segments, settings: ARSettings | None = None) -> FittedDetector:
    """Fit the per-channel AR filters and tolerances on normal rows. Pure numpy, milliseconds."""
    s = settings or ARSettings()
    segments = [g for g in as_segments(train) if len(g) >= s.taps]
    rows = sum(len(g) for g in segments)
    if rows < s.window + 2 * s.ar_order + 10:
        raise ValueError(f"{rows} training rows are too few for a window of {s.window}; record more normal data")
    values = np.concatenate(segments)
    if not np.all(np.isfinite(values)):
        raise ValueError("training values must be finite")
    channels = values.shape[1]
    mean, std = channel_stats(values)
    z = [(g - mean) / std for g in segments]

    filters = np.zeros((s.taps, channels))
    bias = np.zeros(channels)
    for c in range(channels):
        # z_t ~ sum_k phi_k z_{t-k} + intercept; the innovation filter is [1, -phi_1, ..., -phi_p].
        phi, intercept = _autoregression([g[:, c] for g in z], s.ar_order, s.ridge)
        innovation = np.concatenate([[1.0], -phi])
        if phi.sum() >= s.unit_root:
            # A wandering channel (temperature): the level model would leak (1 - sum phi) x level into the
            # innovation and alarm as soon as the level leaves the training range. Model its changes instead.
            psi, intercept = _autoregression([np.diff(g[:, c]) for g in z], s.ar_order - 1, s.ridge)
            innovation = np.convolve([1.0, -1.0], np.concatenate([[1.0], -psi]))
        filters[:, c] = np.convolve(innovation, np.ones(s.mean_window) / s.mean_window)
        bias[c] = -intercept

    # Window means of the innovations per run, newest-first filters applied as a correlation.
    means = [
        np.einsum("nct,tc->nc", np.lib.stride_tricks.sliding_window_view(g, s.taps, axis=0), filters[::-1]) + bias
        for g in z
    ]
    pooled = np.concatenate(means)
    offset = pooled.mean(axis=0)
    variance = pooled.var(axis=0)
    lag = s.drift_lag
    if s.drift_horizon > 0 and lag >= 4 and any(len(m) > lag + 1 for m in means):

        def spread(k: int) -> np.ndarray:
            gaps = np.concatenate([np.square(m[k:] - m[:-k]) for m in means if len(m) > lag + 1])
            return gaps.mean(axis=0) / 2 + 1e-12

        far, near = spread(lag), spread(lag // 4)
        growth = np.clip(np.log(far / near) / np.log(lag / (lag // 4)), 0.0, 2.0)
        variance = np.maximum(variance, far * (s.drift_horizon / lag) ** growth)
    scale = np.maximum(np.sqrt(variance), SCALE_FLOOR)
    return FittedDetector(mean, std, filters / scale, (bias - offset) / scale, s)


@dataclass
class Calibrated:
    """A detector fitted on all normal rows, its channel tolerances widened and its threshold set from
    held-out scores; what calibration measured goes into the training report."""

    detector: FittedDetector
    threshold: float
    tail: TailFit
    channel_factors: np.ndarray  # (C,) >= 1: how much each channel's tolerance (squared) was widened
    folds: int
    heldout_scores: np.ndarray  # the held-out normal scores the tail was fitted on


def _blocked_folds(segments: list[np.ndarray], folds: int, gap: int):
    """Yield (fit runs, held-out runs) per block; held-out runs are (segment index, start, stop)."""
    lengths = [len(g) for g in segments]
    starts = np.concatenate([[0], np.cumsum(lengths)])
    edges = np.linspace(0, starts[-1], folds + 1).round().astype(int)
    for lo, hi in itertools.pairwise(edges):
        fit, held = [], []
        for i, g in enumerate(segments):
            o = starts[i]
            a, b = max(lo, o) - o, min(hi, o + len(g)) - o
            if a < b:
                held.append((i, a, b))
            before, after = g[: max(0, min(len(g), lo - gap - o))], g[max(0, hi + gap - o) :]
            fit += [run for run in (before, after) if len(run)]
        yield fit, held


def calibrate(train: np.ndarray | Segments, settings: ARSettings | None = None) -> Calibrated:
    """Fit on all normal rows; set channel tolerances and the threshold from blocked cross-validation."""
    s = settings or ARSettings()
    segments = as_segments(train)
    rows = sum(len(g) for g in segments)
    folds = min(s.folds, rows // (s.taps + s.smooth))
    if folds < 3 or rows * (1 - 1 / folds) - 2 * s.window < s.window + 2 * s.ar_order + 10:
        raise ValueError(
            f"{rows} normal rows are too few to calibrate a window of {s.window} (at least three held-out blocks "
            f"of {s.taps + s.smooth} rows, each fitted without it); record more normal data or shrink --window"
        )
    heldout, infold = [], []
    for fit, held in _blocked_folds(segments, folds, gap=s.window):
        fold = fit_detector(fit, s)
        infold += [fold.channel_scores(run) for run in fit]
        for i, a, b in held:
            start = max(0, a - s.taps + 1)  # earlier rows are inputs of the first innovations, not targets
            scores = fold.channel_scores(segments[i][start:b])
            ends = start + s.window - 1 + np.arange(len(scores))  # the row each window ends at
            heldout.append(scores[ends - s.smooth + 1 >= a])  # every smoothed innovation inside the block
    held_scores, in_scores = np.concatenate(heldout), np.concatenate(infold)
    if len(held_scores) < 20:
        longest = max(len(g) for g in segments)
        raise ValueError(
            f"{rows} normal rows leave {len(held_scores)} held-out windows (the longest run of consecutive normal "
            f"rows has {longest}, a window {s.window}); record longer stretches of normal operation"
        )
    q = s.channel_quantile
    ratio = np.quantile(held_scores, q, axis=0) / np.maximum(np.quantile(in_scores, q, axis=0), 1e-12)
    factors = np.maximum(1.0, ratio)
    totals = (held_scores / factors).mean(axis=1)
    tail = scaled_chi2_threshold(totals, s.risk)
    detector = fit_detector(segments, s).widened(factors)
    return Calibrated(detector, tail.threshold, tail, factors, folds, totals)


def channel_errors(model: keras.Model, windows: np.ndarray, batch: int = 1024) -> np.ndarray:
    """Run the Keras scorer on (n, window, C) raw windows in batches: (n, C) per-channel errors."""
    parts = [
        np.asarray(model(windows[i : i + batch].astype(np.float32), training=False))
        for i in range(0, len(windows), batch)
    ]
    return np.concatenate(parts) if parts else np.zeros((0, model.output_shape[-1]), np.float32)


def build_detector(
    train_values: np.ndarray | Segments, window: int | None = None, settings: ARSettings | None = None
) -> tuple[keras.Model, float]:
    """Fit and calibrate on normal rows (rows, C); return (Keras scorer, threshold).

    The scorer takes raw windows (batch, window, C) and outputs per-channel errors (batch, C); a window is
    anomalous when ``errors.mean(axis=1) > threshold``. ``window`` (default ``settings.window``) changes only
    the smoothing length. No labels are used.
    """
    calibrated = calibrate(train_values, (settings or ARSettings()).with_window(window))
    return calibrated.detector.model(), calibrated.threshold
