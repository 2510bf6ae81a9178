"""Statistics of a masking validation: does masking a score's top-K heads damage a metric more than
masking random heads does?

Per measure and K the inputs are ``top [n_items]`` (the metric on each prompt or window with the
top-K heads masked) and ``random [n_sets, n_items]`` (the same with each random set masked).
``damage`` orients a measure so that larger means worse: ``higher_is_better`` measures (recall,
answer log-probability) are damaged when they fall, the loss when it rises.
"""

from __future__ import annotations

import numpy as np

from ..intervals import percentile_interval


def damage(values: np.ndarray, higher_is_better: bool) -> np.ndarray:
    """``values`` oriented so that larger is more damage."""
    return -values if higher_is_better else values


def rank_p(top: np.ndarray, random: np.ndarray, higher_is_better: bool) -> float:
    """One-sided rank (Monte Carlo) test of the set means: ``(1 + r) / (n_sets + 1)`` with ``r`` the
    random sets that damage the mean at least as much as the top-K set does."""
    top_damage = damage(np.asarray(top).mean(), higher_is_better)
    set_damage = damage(np.asarray(random).mean(1), higher_is_better)
    return float((1 + np.sum(set_damage >= top_damage)) / (len(set_damage) + 1))


def paired_p(top: np.ndarray, random: np.ndarray, higher_is_better: bool) -> float:
    """One-sided Wilcoxon signed-rank test over items that masking the top-K heads damages an item
    more than the random sets do on average (zero differences dropped; 1.0 when none remain)."""
    from scipy.stats import wilcoxon

    differences = damage(np.asarray(top), higher_is_better) - damage(np.asarray(random).mean(0), higher_is_better)
    if not np.any(differences != 0):
        return 1.0
    return float(wilcoxon(differences, zero_method="wilcox", alternative="greater").pvalue)


def bootstrap_intervals(top: np.ndarray, random: np.ndarray, resamples: int, seed: int) -> dict[str, list[float]]:
    """Percentile intervals (:data:`~..intervals.CONFIDENCE`) of the top-K mean, the random-K mean (over sets and
    items) and their difference (random minus top), resampling the items with replacement."""
    top, random = np.asarray(top, dtype=float), np.asarray(random, dtype=float)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, top.shape[0], size=(resamples, top.shape[0]))  # [resamples, n_items]
    top_means = top[picks].mean(1)
    random_means = random.mean(0)[picks].mean(1)
    return {"top": percentile_interval(top_means), "random": percentile_interval(random_means),
            "difference": percentile_interval(random_means - top_means)}


def summarize(top, random, higher_is_better: bool, resamples: int, seed: int) -> dict:
    """Means, the random sets' means, both tests and the bootstrap intervals of one measure and K."""
    top, random = np.asarray(top, dtype=float), np.asarray(random, dtype=float)
    intervals = bootstrap_intervals(top, random, resamples, seed)
    return {
        "top_mean": float(top.mean()), "top_ci": intervals["top"],
        "random_mean": float(random.mean()), "random_ci": intervals["random"],
        "random_set_means": [float(v) for v in random.mean(1)],
        "difference": float(random.mean() - top.mean()), "difference_ci": intervals["difference"],
        "rank_p": rank_p(top, random, higher_is_better), "paired_p": paired_p(top, random, higher_is_better),
    }


__all__ = ["bootstrap_intervals", "damage", "paired_p", "rank_p", "summarize"]
