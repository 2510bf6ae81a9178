"""Tolerances for comparing two fp32 computations of the same attention, from error bounds.

Two implementations (ours and a model's eager attention) compute the same maps from the same
``q, k`` with different operation orders. Standard fp32 error analysis (unit roundoff
``u = 2^-24``; Higham, *Accuracy and Stability of Numerical Algorithms*, §3.1) bounds each:

* a logit ``s = scale · Σ_d q_d k_d`` over ``D`` terms, in any summation order:
  ``|fl(s) - s| ≤ γ_D · scale · Σ_d |q_d k_d| + u |s|`` with ``γ_D = D u / (1 - D u)``; a soft-cap
  ``c·tanh(s/c)`` is 1-Lipschitz and adds ``~2u·c`` of rounding;
* a probability ``p_j = exp(s_j - lse)`` whose logits are each off by at most ``δ``:
  ``|Δp_j| ≤ 2 δ p_j`` from the logits, plus ``(N + 4) u`` from the exponentials, the row sum
  over ``N`` keys and the division;
* an entropy ``H = -Σ p log p`` under relative probability errors ``ε``: ``|ΔH| ≤ ε (1 + H)``.

The difference of two implementations is at most the sum of their two bounds. The bounds hold
on every CPU (they do not depend on which vector unit or summation order a machine uses).
"""

from __future__ import annotations

import math

import torch

U = 2.0**-24  # fp32 unit roundoff


def logit_error(q: torch.Tensor, k: torch.Tensor, scale: float, softcap: float | None = None) -> float:
    """Bound on every logit's fp32 error for ``q [B, Hq, Nq, D]``, ``k [B, Hkv, Nk, D]``."""
    dim = q.shape[-1]
    gamma = dim * U / (1 - dim * U)
    kx = k.double().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    magnitude = scale * float(torch.matmul(q.double().abs(), kx.abs().transpose(-1, -2)).max())
    bound = gamma * magnitude + U * magnitude
    if softcap is not None:
        bound += 2 * U * softcap
    return bound


def probability_tolerance(logit_err: float, n_keys: int) -> float:
    """Tolerance on ``|p - p'|`` between two fp32 implementations, each with logit error
    ``logit_err`` over rows of ``n_keys`` keys."""
    return 2 * (2 * logit_err + (n_keys + 4) * U)


def entropy_tolerance(logit_err: float, n_keys: int, sink_mass_min: float | None = None) -> float:
    """Tolerance on entropies of rows over ``n_keys`` keys; with a learned sink whose mass is
    formed as ``1 - Σ p`` (error ``N u``), ``sink_mass_min`` is the smallest sink mass."""
    relative = 2 * logit_err + (n_keys + 4) * U
    tolerance = relative * (1 + math.log(n_keys + 1))
    if sink_mass_min is not None:
        tolerance += n_keys * U * (1 + abs(math.log(max(sink_mass_min, 1e-30))))
    return 2 * tolerance


def forward_rounding_error(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> float:
    """The fp32 rounding error of one forward of ``model`` on these inputs: the largest difference
    between its logits and those of the same forward in float64 (a copy of the model; the float64
    result is exact to ~1e-16 relative, so the difference is the fp32 forward's own error).

    A whole forward has no closed-form bound (it composes every layer's errors), so this measures the
    one fp32 error that is observable. Two fp32 computations of the same forward in other orders,
    layouts or chunkings each carry an error of this size: see :func:`reordering_tolerance`."""
    import copy

    exact = copy.deepcopy(model).double()
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    with torch.no_grad():
        single = model(**inputs).logits.double()
        double = exact(**inputs).logits
    return float((single - double).abs().max())


def reordering_tolerance(rounding_error: float, logits: torch.Tensor) -> float:
    """Tolerance on ``|a - b|`` of two fp32 computations of the same logits that differ only in the
    order, layout or chunking of their sums (a cache held in views of a larger buffer, fewer keys
    instead of masked ones, a forward resumed from a stored layer input): each is off the exact
    logits by about the measured ``rounding_error`` (:func:`forward_rounding_error`), their
    difference by at most twice that; ten times leaves room for one order rounding worse than the
    other. ``4 u max|logits|`` covers an error measured as 0. A wrong cache entry or mask changes
    logits by O(1), far above this."""
    return 10 * rounding_error + 4 * U * float(logits.abs().max())


def choice_score_tolerance(model, batches) -> float:
    """Tolerance on the summed choice log-probabilities of ``batches`` (``ChoiceBatch`` es) between two
    fp32 computations of the same forward: log-softmax moves each token's log-probability by at most
    twice the largest logit change, so a choice of ``n`` tokens moves by ``2 n`` times the logits'
    :func:`reordering_tolerance`."""
    tolerance = 0.0
    for batch in batches:
        with torch.no_grad():
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        logit_tolerance = reordering_tolerance(forward_rounding_error(model, batch.input_ids, batch.attention_mask),
                                               logits)
        longest = max(len(targets) for _, targets, _ in batch.rows)
        tolerance = max(tolerance, 2 * longest * logit_tolerance)
    return tolerance


def largest_gap(a: list[list[float]], b: list[list[float]]) -> float:
    """The largest difference between two per-example lists of choice scores of the same shape."""
    assert [len(row) for row in a] == [len(row) for row in b]
    return max(abs(x - y) for row_a, row_b in zip(a, b) for x, y in zip(row_a, row_b))
