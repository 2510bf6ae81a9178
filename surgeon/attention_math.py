"""What one call of the attention interface computes, and pure tensor functions on it.

:class:`AttentionCall` reads a call the way the model's own attention would run it: scaling,
causality and the family quirks its modeling code passes as keywords (a sliding window, Gemma 2's
soft-cap, gpt-oss's learned sinks), plus where the call's keys sit in the sequence (sliding-window
caches keep only the last keys). A keyword that could change attention and is not understood is
refused before anything is computed from scores. The tensor math of the quirks lives in
:mod:`headlab.kernels.quirks`.

Shapes: ``q [batch, heads, query, head_dim]`` after RoPE; ``k, v [batch, kv_heads, key, head_dim]``
after the cache update, not expanded for GQA; masks ``[batch, 1, query, key]`` (bool: True
visible; or additive float); attention ``[batch, heads, query, key]``; per-head outputs
``[batch, seq, heads, head_dim]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..core.errors import HeadlabError
from ..kernels.quirks import softcapped
from ..kernels.reference import visibility

MASKED = torch.finfo(torch.float32).min  # as eager: fully hidden rows become uniform, not NaN

# Keywords modeling code passes to the attention interface that do not change what attention
# computes (bookkeeping for caches, routers and outputs).
NEUTRAL_KEYWORDS = frozenset({
    "dropout", "scaling", "position_ids", "cache_position", "use_cache", "past_key_values", "output_attentions",
    "output_hidden_states", "output_router_logits", "return_dict", "is_causal",
})
QUIRK_KEYWORDS = frozenset({"sliding_window", "softcap", "s_aux"})


class UnsupportedAttentionError(HeadlabError):
    """An attention call carries something headlab cannot reproduce exactly (an unknown keyword
    that may change the scores), so edits and taps on it are refused."""


@dataclass(frozen=True)
class AttentionCall:
    """One layer call as the model computes it.

    ``window``: keys per causal row (sliding-window layers); ``softcap``: logits become
    ``c·tanh(s/c)``; ``sinks [H]``: learned logits of a key-less column in every row's normaliser
    (key probabilities then sum to ``1 - p_sink``); ``key_start``: sequence position of the call's
    first key (0 unless a sliding-window cache dropped older keys).
    """

    scaling: float
    is_causal: bool
    window: int | None = None
    softcap: float | None = None
    sinks: torch.Tensor | None = None
    key_start: int = 0

    @classmethod
    def read(cls, module, query: torch.Tensor, kwargs: dict, key_start: int = 0) -> "AttentionCall":
        """The call's settings from the module and the keywords transformers passed; raises
        :class:`UnsupportedAttentionError` for a keyword that may change attention."""
        unknown = sorted(name for name, value in kwargs.items()
                         if value is not None and name not in NEUTRAL_KEYWORDS | QUIRK_KEYWORDS)
        if unknown:
            raise UnsupportedAttentionError(
                f"{type(module).__name__} (layer {module.layer_idx}) passes {unknown} to its attention, which "
                "headlab does not model; edits and taps on this layer are refused rather than computed wrongly"
            )
        scaling = kwargs.get("scaling")
        if scaling is None:
            scaling = getattr(module, "scaling", query.shape[-1] ** -0.5)
        is_causal = kwargs.get("is_causal")
        if is_causal is None:
            is_causal = bool(getattr(module, "is_causal", False))
        sinks = kwargs.get("s_aux")
        return cls(float(scaling), bool(is_causal), kwargs.get("sliding_window"), kwargs.get("softcap"),
                   None if sinks is None else sinks.detach().float(), int(key_start))

    def kernel_quirks(self, heads: Sequence[int] | None = None) -> dict:
        """``window``, ``softcap`` and ``sinks`` (of ``heads``) for :mod:`headlab.kernels` ops."""
        sinks = self.sinks
        if sinks is not None and heads is not None:
            sinks = sinks[list(heads)]
        return {"window": self.window, "softcap": self.softcap, "sinks": sinks}

    def row_positions(self, n_query: int, n_key: int) -> torch.Tensor:
        """``[Nq]`` sequence positions of the call's query rows (the last ``Nq`` of its keys)."""
        return torch.arange(n_query) + self.key_start + n_key - n_query


def kv_heads_for(heads: Sequence[int], group_size: int) -> list[int]:
    """KV head read by each query head: ``h // g`` (the layout ``repeat_kv`` produces)."""
    return [h // group_size for h in heads]


def per_kv_head_matmul(a: torch.Tensor, b: torch.Tensor, heads: Sequence[int], group_size: int) -> torch.Tensor:
    """``a [B, h, Nq, X]`` (the query heads ``heads``) times each head's KV-head operand ``b [B, kv, X, Y]``:
    ``[B, h, Nq, Y]``. When ``heads`` are every query head in order, the heads of one KV group share
    one product (rows stacked), so ``b`` is not copied once per query head."""
    n_kv = b.shape[1]
    if group_size > 1 and list(heads) == list(range(n_kv * group_size)):
        batch, n_heads, n_query, width = a.shape
        out = torch.matmul(a.reshape(batch, n_kv, group_size * n_query, width), b)
        return out.reshape(batch, n_heads, n_query, out.shape[-1])
    return torch.matmul(a, b[:, kv_heads_for(heads, group_size)])


def additive_mask(mask: torch.Tensor | None, n_query: int, n_key: int, is_causal: bool, device,
                  window: int | None = None) -> torch.Tensor:
    """An fp32 additive mask ``[batch or 1, 1, query, key]`` (0 visible, fp32 min hidden).

    ``None`` (SDPA's mask builder omits a mask that hides nothing beyond causality) is treated
    as causal with offset ``key - query`` and the layer's window when ``is_causal``, else as
    all-visible, as SDPA treats it. Boolean masks mark visible entries with True.
    """
    if mask is None:
        visible = visibility(1, n_query, n_key, is_causal, n_key - n_query, None, device, window)
        return torch.zeros(visible.shape, device=device).masked_fill(~visible, MASKED)
    mask = mask[..., :n_key]
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, device=device).masked_fill(~mask, MASKED)
    return mask.float()


def narrowed_mask(mask: torch.Tensor | None, keep: torch.Tensor, n_query: int, n_key: int, is_causal: bool,
                  window: int | None = None) -> torch.Tensor:
    """The layer's ``mask`` (boolean or additive, in its own form) with the entries outside ``keep``
    ``[B, H or 1, Nq, Nk]`` hidden too. ``None`` (SDPA's causal shortcut) becomes a boolean mask,
    which SDPA-like implementations take (eager ones always receive a mask)."""
    keep = keep.to(mask.device if mask is not None else keep.device)
    if mask is None:
        return visibility(1, n_query, n_key, is_causal, n_key - n_query, None, keep.device, window) & keep
    mask = mask[..., :n_key]
    if mask.dtype == torch.bool:
        return mask & keep
    return mask.masked_fill(~keep, torch.finfo(mask.dtype).min)


def attention_logits(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, call: AttentionCall,
                     heads: Sequence[int], group_size: int) -> torch.Tensor:
    """Masked fp32 logits ``[batch, len(heads), query, key]`` of the chosen query heads, soft-capped
    before masking as the model does."""
    q = query[:, list(heads)].float()
    products = per_kv_head_matmul(q, key.float().transpose(-1, -2), heads, group_size)
    scores = softcapped(products * call.scaling, call.softcap)
    return scores + additive_mask(mask, q.shape[-2], key.shape[-2], call.is_causal, q.device, call.window)


def compensation_token(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, hidden: torch.Tensor,
                       call: AttentionCall, heads: Sequence[int], group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RazorAttention's compensation token of each row of the query heads ``heads``: the mean key
    ``k̄`` and value ``v̄`` of the ``n`` keys ``hidden [B, h, Nq, Nk]`` hides from the row, which
    enters the softmax as ``n`` copies of ``k̄``. Returns ``(logit [B, h, Nq, 1], value [B, h, Nq, D])``:
    the logit ``s(q, k̄) + log n`` (soft-capped as the model's logits), masked where ``n`` is 0."""
    weights = hidden.float()
    counts = weights.sum(-1, keepdim=True)
    mean_key = per_kv_head_matmul(weights, key.float(), heads, group_size) / counts.clamp(min=1)
    mean_value = per_kv_head_matmul(weights, value.float(), heads, group_size) / counts.clamp(min=1)
    products = (query[:, list(heads)].float() * mean_key).sum(-1, keepdim=True)
    logit = softcapped(products * call.scaling, call.softcap) + counts.clamp(min=1).log()
    return torch.where(counts > 0, logit, torch.full_like(logit, MASKED)), mean_value


def softmax_with_sinks(logits: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """Row softmax of ``logits [B, h, Nq, Nk]`` with, when given, one learned sink logit per head
    ``sinks [h]`` as an extra column that is dropped afterwards (rows then sum to ``1 - p_sink``)."""
    if sinks is None:
        return torch.softmax(logits, dim=-1)
    column = sinks.to(logits)[None, :, None, None].expand(*logits.shape[:3], 1)
    return torch.softmax(torch.cat([logits, column], dim=-1), dim=-1)[..., :-1]


def attention_probs(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, call: AttentionCall,
                    heads: Sequence[int], group_size: int) -> torch.Tensor:
    """Probabilities ``[batch, len(heads), query, key]`` in fp32, as the model's own attention
    forms them; rows sum to one (to ``1 - p_sink`` with learned sinks)."""
    logits = attention_logits(query, key, mask, call, heads, group_size)
    sinks = None if call.sinks is None else call.sinks[list(heads)]
    return softmax_with_sinks(logits, sinks)


class MaskStructureError(HeadlabError):
    """The mask is not (causal, optionally sliding-window, or bidirectional) visibility with key padding."""


_CHECK_ROWS = 1024  # rows per chunk when checking a mask's structure (no second N×N tensor)


def _visible_entries(mask, n_query: int, n_key: int, is_causal: bool, device, window) -> torch.Tensor:
    """Bool ``[batch or 1, 1, query, key]``: True where a row sees a key. A boolean mask is used
    as it is (no fp32 copy: at 8192 tokens that would be 256 MB)."""
    if mask is not None and mask.dtype == torch.bool:
        return mask[..., :n_key]
    return additive_mask(mask, n_query, n_key, is_causal, device, window) > MASKED / 2


def decompose_mask(mask, n_query: int, n_key: int, is_causal: bool, device, window: int | None = None):
    """``(key_valid [B, Nk], query_valid [B, Nq], q_offset)`` of a self-attention mask that is
    causal (offset ``Nk - Nq``; with ``window``, each row sees only its last ``window`` keys) or
    bidirectional visibility restricted to non-padded keys; a padded token is a padded key and
    a padded query row.

    Raises :class:`MaskStructureError` for anything else (a window other than the layer's,
    packed sequences), checked on the valid rows, so statistics and edits never run under the
    wrong mask.
    """
    if mask is not None and mask.dim() != 4:
        raise MaskStructureError(f"attention mask of shape {tuple(mask.shape)}: edits and taps need the 4-D masks "
                                 "of SDPA or eager attention")
    q_offset = n_key - n_query
    visible = _visible_entries(mask, n_query, n_key, is_causal, device, window)[:, 0]  # [B or 1, Nq, Nk]
    key_valid = visible.any(1)
    query_valid = key_valid[:, q_offset:]  # self-attention: row i is the token at key i + q_offset
    for start in range(0, n_query, _CHECK_ROWS):
        stop = min(start + _CHECK_ROWS, n_query)
        expected = visibility(key_valid.shape[0], stop - start, n_key, is_causal, q_offset + start, key_valid,
                              device, window)[:, 0]
        rows = query_valid[:, start:stop]
        if not torch.equal(visible[:, start:stop][rows], expected[rows]):
            shape = "causal" if is_causal else "bidirectional"
            if window is not None:
                shape += f" with a sliding window of {window}"
            raise MaskStructureError(
                f"this layer's attention mask is not {shape} visibility with key padding (packed sequences, or "
                "a sliding window the layer does not declare?); edits and statistics need that structure"
            )
    return key_valid, query_valid, q_offset


def scale_heads(out: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Multiply per-head outputs ``out [batch, seq, heads, head_dim]`` by ``scales [heads]``."""
    return out * scales.to(out.dtype)[None, None, :, None]
