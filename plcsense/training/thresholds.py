"""Label-free alarm thresholds: a tail fitted to held-out normal scores, at a stated risk.

A detector's threshold must say how often it will cry wolf on normal data it has not seen. The scores used here
come from held-out normal windows (windows the scoring model was not fitted on, from time-series
cross-validation). An anomaly score of the detectors here is a mean of squared, standardised errors, i.e. a
quadratic form in roughly Gaussian residuals; its distribution is approximated by a scaled chi-square
``g * chi2(h)`` whose mean and variance match the held-out scores' (Box 1954; the usual control limit of the
squared prediction error in multivariate statistical process control, Nomikos & MacGregor 1995):

    g = var / (2 mean),  h = 2 mean^2 / var,  threshold = g * chi2.isf(risk, h)

so ``risk`` is the probability that a held-out normal window scores above the threshold under the fit.

Why not peaks over threshold (a Generalized Pareto tail, as in SPOT, Siffer et al. KDD 2017): it was measured
on the tuning data (SKAB valve1, ``bench/skab.py``) and lost. A few hundred strongly autocorrelated held-out
scores leave a few dozen excesses; their maximum-likelihood shape is nearly always negative (a bounded tail),
which puts the threshold at the largest score seen, and even with the shape held at >= 0 it gave a lower F1 at a
higher false-alarm rate than the two-moment fit, whose variance carries every rare held-out event into the
threshold.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import chi2


@dataclass(frozen=True)
class TailFit:
    """The fitted score distribution and the threshold it gives; every field goes into the training report."""

    threshold: float
    risk: float  # probability that one held-out normal window scores above ``threshold``, under the fit
    scale: float  # g
    dof: float  # h, the effective degrees of freedom
    mean: float  # of the held-out scores
    std: float
    scores: int  # held-out scores the fit saw

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


def scaled_chi2_threshold(scores: np.ndarray, risk: float) -> TailFit:
    """The score a held-out normal window exceeds with probability ``risk``, from a scaled chi-square fit."""
    values = np.asarray(scores, dtype=np.float64).ravel()
    if not 0 < risk < 0.5:
        raise ValueError(f"risk {risk} must lie between 0 and 0.5")
    if len(values) < 2 or not np.all(np.isfinite(values)) or np.any(values < 0):
        raise ValueError(f"need at least 2 finite, non-negative held-out scores, got {len(values)}")
    mean, var = float(values.mean()), float(values.var())
    if var <= 1e-12 * max(mean, 1.0) ** 2:  # constant scores (a flat signal): anything above them is unusual
        return TailFit(mean + max(mean, 1.0) * 1e-6, risk, 0.0, 0.0, mean, 0.0, len(values))
    scale, dof = var / (2 * mean), 2 * mean * mean / var
    threshold = float(scale * chi2.isf(risk, dof))
    return TailFit(threshold, risk, scale, dof, mean, float(np.sqrt(var)), len(values))
