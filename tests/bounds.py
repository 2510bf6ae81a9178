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
