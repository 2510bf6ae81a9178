"""Token scorers: how much each cached key is worth keeping, per KV head (higher keeps). One home per
scorer: a :class:`TokenScorer` entry in :data:`TOKEN_SCORERS`, found by name.

Every scorer reads one call of a layer (:class:`ScoredCall`) at the moment its cache is compressed:
the queries of the call's last rows (the observation window: the end of the context when compressing
query-agnostically, the question's rows when query-aware) and the keys and values the layer holds.

Shapes: ``queries [batch, heads, window, head_dim]`` (after rotary, as the model attends with them);
``keys, values [batch, kv_heads, n, head_dim]``; ``positions [batch, kv_heads, n]`` (sequence position
of every held key); scores ``[batch, kv_heads, n]`` (fp32).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ...core.errors import HeadlabError
from ...kernels.quirks import softcapped

FUTURE_POSITIONS = 512  # expected attention: the queries expected over the next this many positions
FUTURE_SAMPLES = 8  # ... sampled at this many evenly spaced offsets


@dataclass
class ScoredCall:
    """What a scorer reads (shapes in the module docstring). ``query_positions [window]``: sequence
    positions of the observed queries; ``scaling``/``softcap``: the layer's logits as the model forms
    them; ``group``: query heads per KV head; ``inv_freq [head_dim / 2]``: the layer's rotary
    frequencies (None where the family's rotary is not the plain half-split form); ``pooling``:
    SnapKV's pooling kernel; ``seed``: of the random control; ``window``: a sliding-window layer's window."""

    queries: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    query_positions: torch.Tensor
    scaling: float
    softcap: float | None
    group: int
    inv_freq: torch.Tensor | None = None
    pooling: int = 5
    seed: int = 0
    window: int | None = None


@dataclass(frozen=True)
class TokenScorer:
    """A registered scorer: ``score(call) -> [batch, kv_heads, n]``; ``needs_rotary``: it reads the
    layer's rotary frequencies (refused, with the reason, on a family without plain rotary)."""

    name: str
    description: str
    score: Callable[[ScoredCall], torch.Tensor]
    needs_rotary: bool = False


TOKEN_SCORERS: dict[str, TokenScorer] = {}


def register_scorer(name: str, description: str, needs_rotary: bool = False):
    """Register the decorated function as the token scorer ``name``."""
    def decorate(function: Callable[[ScoredCall], torch.Tensor]):
        TOKEN_SCORERS[name] = TokenScorer(name, description, function, needs_rotary)
        return function
    return decorate


def token_scorer(name: str) -> TokenScorer:
    """The scorer registered as ``name``; one line listing the names otherwise."""
    if name not in TOKEN_SCORERS:
        raise HeadlabError(f"unknown token scorer {name!r}; known: {', '.join(sorted(TOKEN_SCORERS))}")
    return TOKEN_SCORERS[name]


def observed_attention(call: ScoredCall) -> torch.Tensor:
    """``[batch, kv_heads, window, n]``: the observed queries' attention over the held keys (causal: a
    query sees keys at or before its position), averaged over each KV head's query heads."""
    batch, heads, window, width = call.queries.shape
    kv = call.keys.shape[1]
    queries = call.queries.float().reshape(batch, kv, call.group * window, width)
    logits = softcapped(torch.matmul(queries, call.keys.float().transpose(-1, -2)) * call.scaling, call.softcap)
    rows = call.query_positions.repeat(call.group)[None, None, :, None]
    visible = call.positions[:, :, None, :] <= rows
    if call.window is not None:
        visible &= call.positions[:, :, None, :] > rows - call.window
    probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
    return probs.reshape(batch, kv, call.group, window, -1).mean(2)


@register_scorer("streaming_llm", "StreamingLLM: the most recent keys (with the sinks every scorer keeps)")
def recency(call: ScoredCall) -> torch.Tensor:
    return call.positions.float()


@register_scorer("snapkv", "SnapKV: attention of the observation window's queries, summed, pooled over neighbours")
def snapkv(call: ScoredCall) -> torch.Tensor:
    scores = observed_attention(call).sum(2)  # [B, kv, n]
    if call.pooling > 1:
        batch, kv, n = scores.shape
        scores = F.avg_pool1d(scores.reshape(batch * kv, 1, n), call.pooling, stride=1, padding=call.pooling // 2,
                              count_include_pad=False).reshape(batch, kv, n)
    return scores


@register_scorer("tova", "TOVA: attention of the last query alone")
def tova(call: ScoredCall) -> torch.Tensor:
    return observed_attention(call)[:, :, -1]


@register_scorer("knorm", "key norm: keys of small norm kept (they draw attention)")
def key_norm(call: ScoredCall) -> torch.Tensor:
    return -call.keys.float().norm(dim=-1)


@register_scorer("expected_attention", "expected attention: the softmax of the mean future query under a Gaussian "
                                       "of the observed queries moved to the next positions, times the value norm",
                 needs_rotary=True)
def expected_attention(call: ScoredCall) -> torch.Tensor:
    future = _future_queries(call)  # [B, kv, samples, D]
    mean = future.mean(2, keepdim=True)
    centred = future - mean
    covariance = torch.matmul(centred.transpose(-1, -2), centred) / max(1, future.shape[2] - 1)  # [B, kv, D, D]
    keys = call.keys.float()
    linear = torch.matmul(mean, keys.transpose(-1, -2))[:, :, 0] * call.scaling  # [B, kv, n]
    quadratic = 0.5 * call.scaling ** 2 * (torch.matmul(keys, covariance) * keys).sum(-1)
    held = call.positions <= call.query_positions.max()  # padding slots sit after every query
    probs = torch.softmax((linear + quadratic).masked_fill(~held, float("-inf")), dim=-1)
    return probs * call.values.float().norm(dim=-1)


@register_scorer("random", "random keys (the control)")
def random_keys(call: ScoredCall) -> torch.Tensor:
    generator = torch.Generator().manual_seed(call.seed)
    return torch.rand(call.positions.shape, generator=generator)


def _future_queries(call: ScoredCall) -> torch.Tensor:
    """``[batch, kv_heads, group · window · samples, head_dim]``: every observed query rotated from its
    own position to each sampled position among the next :data:`FUTURE_POSITIONS` (rotary's rotation
    by the offset; half-split layout)."""
    batch, heads, window, width = call.queries.shape
    last = int(call.query_positions.max())
    targets = last + 1 + torch.linspace(0, FUTURE_POSITIONS - 1, FUTURE_SAMPLES).round()
    offsets = targets[None, :] - call.query_positions.float()[:, None]  # [window, samples]
    angles = offsets[..., None] * call.inv_freq.float()[None, None, :]  # [window, samples, D/2]
    cos, sin = angles.cos(), angles.sin()
    q = call.queries.float()[:, :, :, None, :]  # [B, H, window, 1, D]
    first, second = q[..., : width // 2], q[..., width // 2:]
    rotated = torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)  # [B, H, w, s, D]
    return rotated.reshape(batch, call.keys.shape[1], -1, width)


__all__ = ["FUTURE_POSITIONS", "FUTURE_SAMPLES", "TOKEN_SCORERS", "ScoredCall", "TokenScorer", "observed_attention",
           "register_scorer", "token_scorer"]
