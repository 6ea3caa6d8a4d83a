"""A fast, drift-tolerant anomaly detector for multichannel sensor data, exported as a plain Keras model.

The detector ("AR innovations"): each channel, standardised with the training part's statistics, gets its own
autoregressive model AR(p) fitted by least squares on normal operation. What the AR model cannot predict (the
innovation) is averaged over the last ``mean_window`` readings, standardised by how much that average moved in
normal operation, squared, and averaged again over the last ``smooth`` positions. That mean is the channel's
error; the anomaly score is the mean over channels, compared with a threshold taken from the training part.

Why this and not an autoencoder (measured on SKAB valve1 + valve2, official protocol, ``bench/skab.py``):

- Level shifts (a valve that throttles the flow) are what the labelled faults look like; a window mean of
  standardised readings finds them, but slow, normal drift (water temperature) then raises most false alarms.
  The AR filter keeps the level of a stationary channel (a shift shows up in its innovations). A channel whose
  AR coefficients sum to ``unit_root`` or more wanders like a random walk; it is modelled by its changes
  (AR on differences), so only an unusual rate of change counts, never the level it has wandered to. The
  choice is made per file from the training part; no channel is picked or dropped by hand.
- A drift allowance widens a channel's tolerance where the training part shows its window mean still growing
  apart with lag (extrapolated from ``drift_lag`` to ``drift_horizon`` rows), so slow wander seen in training
  does not alarm later.
- Smoothing twice (innovations over ``mean_window``, squared errors over ``smooth``) trades a few readings of
  delay for far fewer isolated false alarms; the threshold is the largest training score times a margin.
- Everything after the normalisation is linear up to one square, so the whole detector is a fixed-weight
  Dense layer: it converts to LiteRT exactly, scores thousands of windows per second and "training" is a few
  least-squares solves (milliseconds per file, no epochs, no seed dependence).

The exported model has the product's sensor interface: a raw window ``(window, channels)`` float32 in, one
error per channel out; normalisation is inside the graph; ``score = mean(errors) > threshold``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import keras
import numpy as np
from keras import layers

SCALE_FLOOR = 1e-3  # smallest tolerance of a standardised channel: a channel flat in training still scores finitely


@dataclass(frozen=True)
class ARSettings:
    """Fixed defaults, chosen once on SKAB valve1 + valve2 (pooled over 20 files) and never tuned per file.

    Defaults: pooled F1 0.85, FAR 0.03, MAR 0.24. Over the grid ar_order 3/5/8 x mean_window 5/10/15 x
    smooth 10/20/40 x threshold_margin 2.0/2.5 (54 settings) FAR stayed <= 0.15 and F1 >= 0.80 in 46; the other
    8 (F1 0.74-0.80) all have mean_window 5 with ar_order 8 or smooth 10. These defaults sit in the middle of
    that plateau, on the cautious side (margin 2.5: fewer false alarms on unseen normal data).
    """

    ar_order: int = 5  # p: past readings each channel is predicted from
    mean_window: int = 10  # innovations averaged over this many readings (noise down, a level shift stays)
    smooth: int = 20  # squared errors averaged over this many positions (fewer isolated false alarms)
    ridge: float = 1e-4  # least-squares regularisation, relative to the number of training rows
    unit_root: float = 0.9  # channels whose AR coefficients sum to at least this are modelled by their changes
    drift_lag: int = 50  # lag at which the training part's drift is measured (and at lag / 4)
    drift_horizon: int = 400  # rows ahead the measured drift is extrapolated to; 0 switches the allowance off
    threshold_quantile: float = 1.0  # of the training part's scores; 1.0 = the largest
    threshold_margin: float = 2.5  # the threshold is that quantile times this margin

    @property
    def window(self) -> int:
        """Readings one prediction needs: AR order + mean window + smoothing - 1 (34 with the defaults)."""
        return self.ar_order + self.mean_window + self.smooth - 1

    def with_window(self, window: int | None) -> ARSettings:
        """The same settings with ``smooth`` changed so that the model takes ``window`` readings."""
        if window is None or window == self.window:
            return self
        smooth = window - self.ar_order - self.mean_window + 1
        if smooth < 1:
            raise ValueError(
                f"window {window} is too short: needs at least ar_order + mean_window = "
                f"{self.ar_order + self.mean_window} readings"
            )
        return ARSettings(**{**asdict(self), "smooth": smooth})


@dataclass
class FittedDetector:
    """The numbers a fit produces; ``model()`` turns them into the exported Keras graph."""

    mean: np.ndarray  # (C,) channel means of the training part
    std: np.ndarray  # (C,) channel standard deviations (1 where a channel is constant)
    filters: np.ndarray  # (p + mean_window, C) FIR weights on standardised readings, newest reading first
    bias: np.ndarray  # (C,)
    settings: ARSettings

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


def _autoregression(series: np.ndarray, order: int, ridge: float) -> tuple[np.ndarray, float]:
    """Ridge least squares for series_t ~ sum_k coef_k series_{t-k} + intercept: (coef (order,), intercept)."""
    n = len(series)
    design = np.stack([series[order - k : n - k] for k in range(1, order + 1)] + [np.ones(n - order)], axis=1)
    target = series[order:]
    gram = design.T @ design + ridge * len(target) * np.eye(order + 1)
    coef = np.linalg.solve(gram, design.T @ target)
    return coef[:order], float(coef[order])


def fit_detector(train_values: np.ndarray, settings: ARSettings | None = None) -> FittedDetector:
    """Fit the per-channel AR filters and tolerances on normal rows (rows, C). Pure numpy, milliseconds."""
    s = settings or ARSettings()
    values = np.asarray(train_values, dtype=np.float64)
    rows, channels = values.shape
    p, w = s.ar_order, s.mean_window
    if rows < s.window + 2 * p + 10:
        raise ValueError(f"{rows} training rows are too few for a window of {s.window}; record more normal data")
    if not np.all(np.isfinite(values)):
        raise ValueError("training values must be finite")
    mean = values.mean(axis=0)
    std = values.std(axis=0)
    std = np.where(std > 1e-9 * np.maximum(1.0, np.abs(mean)), std, 1.0)  # constant channels: no scaling
    z = (values - mean) / std

    filters = np.zeros((p + w, channels))
    bias = np.zeros(channels)
    for c in range(channels):
        # z_t ~ sum_k phi_k z_{t-k} + intercept; the innovation filter is [1, -phi_1, ..., -phi_p].
        phi, intercept = _autoregression(z[:, c], p, s.ridge)
        innovation = np.concatenate([[1.0], -phi])
        if phi.sum() >= s.unit_root:
            # A wandering channel (temperature): the level model would leak (1 - sum phi) x level into the
            # innovation and alarm as soon as the level leaves the training range. Model its changes instead.
            psi, intercept = _autoregression(np.diff(z[:, c]), p - 1, s.ridge)
            innovation = np.convolve([1.0, -1.0], np.concatenate([[1.0], -psi]))
        filters[:, c] = np.convolve(innovation, np.ones(w) / w)  # then averaged over mean_window readings
        bias[c] = -intercept

    # Window means of the innovations over the training part, newest-first filters applied as a correlation.
    means = np.stack([np.correlate(z[:, c], filters[::-1, c], mode="valid") + bias[c] for c in range(channels)], axis=1)
    offset = means.mean(axis=0)
    variance = means.var(axis=0)
    lag = s.drift_lag
    if s.drift_horizon > 0 and len(means) > lag + 1 and lag >= 4:

        def spread(k: int) -> np.ndarray:
            return np.mean(np.square(means[k:] - means[:-k]), axis=0) / 2 + 1e-12

        far, near = spread(lag), spread(lag // 4)
        growth = np.clip(np.log(far / near) / np.log(lag / (lag // 4)), 0.0, 2.0)
        variance = np.maximum(variance, far * (s.drift_horizon / lag) ** growth)
    scale = np.maximum(np.sqrt(variance), SCALE_FLOOR)
    return FittedDetector(mean, std, filters / scale, (bias - offset) / scale, s)


def channel_errors(model: keras.Model, windows: np.ndarray, batch: int = 1024) -> np.ndarray:
    """Run the Keras scorer on (n, window, C) raw windows in batches: (n, C) per-channel errors."""
    parts = [
        np.asarray(model(windows[i : i + batch].astype(np.float32), training=False))
        for i in range(0, len(windows), batch)
    ]
    return np.concatenate(parts) if parts else np.zeros((0, model.output_shape[-1]), np.float32)


def build_detector(
    train_values: np.ndarray, window: int | None = None, settings: ARSettings | None = None
) -> tuple[keras.Model, float]:
    """Fit on normal rows (rows, C); return (Keras scorer, threshold).

    The scorer takes raw windows (batch, window, C) and outputs per-channel errors (batch, C); a window is
    anomalous when ``errors.mean(axis=1) > threshold``. ``window`` (default ``settings.window``) changes only
    the smoothing length. The threshold is the ``threshold_quantile`` of the scores of all windows inside the
    training part (computed by the model itself, so the exported graph and the threshold agree), times
    ``threshold_margin``. No labels are used.
    """
    s = (settings or ARSettings()).with_window(window)
    fitted = fit_detector(train_values, s)
    model = fitted.model()
    values = np.asarray(train_values, dtype=np.float32)
    windows = np.lib.stride_tricks.sliding_window_view(values, s.window, axis=0).transpose(0, 2, 1)
    scores = channel_errors(model, windows).mean(axis=1)
    threshold = float(np.quantile(scores, s.threshold_quantile) * s.threshold_margin)
    return model, threshold
