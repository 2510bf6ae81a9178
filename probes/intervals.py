"""Percentile bootstrap intervals, shared by every product that reports a mean with its uncertainty (the
masking validation, the compression evaluation, comparisons paired by prompt)."""

from __future__ import annotations

import numpy as np

CONFIDENCE = 0.95


def percentile_interval(samples: np.ndarray) -> list[float]:
    """The central :data:`CONFIDENCE` interval of bootstrap ``samples``."""
    tail = 100 * (1 - CONFIDENCE) / 2
    return [float(v) for v in np.percentile(samples, [tail, 100 - tail])]


def mean_interval(values: np.ndarray, resamples: int, seed: int) -> list[float]:
    """Percentile bootstrap interval of the mean of ``values``, resampling them with replacement."""
    values = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    return percentile_interval(values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(1))


def paired_difference_interval(a: np.ndarray, b: np.ndarray, resamples: int, seed: int) -> list[float]:
    """Percentile bootstrap interval of ``mean(a) - mean(b)`` for values paired by item (``a[i]`` and
    ``b[i]`` measured on the same item), resampling the items with replacement."""
    difference = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    return mean_interval(difference, resamples, seed)


__all__ = ["CONFIDENCE", "mean_interval", "paired_difference_interval", "percentile_interval"]
