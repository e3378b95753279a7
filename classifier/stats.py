"""The interval every accuracy is given with: on a test set of a few hundred images one
image is a fraction of a point, so a rate alone says little."""

from __future__ import annotations

CONFIDENCE = 0.95


def proportion_interval(successes: int, trials: int) -> tuple[float, float]:
    """The exact (Clopper-Pearson) 95 % confidence interval of ``successes / trials``."""
    from scipy.stats import binomtest

    if trials == 0:
        return 0.0, 1.0
    interval = binomtest(successes, trials).proportion_ci(CONFIDENCE, method="exact")
    return float(interval.low), float(interval.high)
