"""The converted attention layer: Hedgehog linear or LoLCATs hybrid attention (docs/methods/conversion.md).

:class:`LinearAttention` replaces a decoder layer's ``self_attn``. It reuses the original
``q/k/v/o_proj`` modules, the query/key norms where the family has them and the family's rotary
function (:mod:`.support` says which layers qualify), and owns the feature maps ``φ_q``, ``φ_k``
(per query head, applied after RoPE and GQA expansion) and, for the hybrid, the window weights
``θ [H]`` with ``γ = sigmoid(θ)``.

Head-level hybrids: the KV heads ``settings.softmax_heads`` names for this layer keep, with their
query heads, the layer's own softmax attention over the whole context (and cache every key and
value); only the other heads are converted. Feature maps and window weights exist for every query
head, so a checkpoint's shapes do not depend on which heads stay softmax (a softmax head's are unused).

Caching: with a ``Cache`` the layer swaps its own slot for a :class:`RecurrentState` (the window of
recent keys plus ``Σ φk [v, 1]`` over older ones, and every key and value of the softmax heads), so the
stock KV cache never grows for converted heads. The first call on an empty state runs the parallel form; later calls run a dense step over
the window (``hybrid_step_torch``), which equals the parallel form.

Attention transfer (stage 1): with ``transfer = True`` the layer also computes the softmax teacher
from the same ``q, k, v`` (no gradient), stores the student's loss in ``transfer_loss`` and passes the
teacher's output downstream, so every layer trains independently.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import CacheLayerMixin

from ...kernels.linear import hybrid_attention, linear_attention
from ...kernels.linear_torch import hybrid_step_torch, window_starts, with_ones
from .hedgehog import FeatureMap, logit
from .settings import LinearSettings

TRANSFER_LOSSES = ("mse", "ce")


class RecurrentState(CacheLayerMixin):
    """A converted layer's decoding state: the converted heads' window keys/values ``[B, H_kv', L, D]``
    at positions ``key_start … seen − 1`` and ``state [B, H', 2F, D + 1]`` over the positions before
    ``key_start``; the softmax heads' keys/values ``[B, H_kv − H_kv', seen, D]`` (``full_keys``,
    ``full_values``; None where every head is converted)."""

    is_sliding = False
    is_croppable = False
    supports_early_init = False

    def __init__(self):
        super().__init__()
        self.state: torch.Tensor | None = None
        self.full_keys: torch.Tensor | None = None
        self.full_values: torch.Tensor | None = None
        self.seen = 0
        self.key_start = 0
        self.padded = False  # filled from a right-padded batch: not to be continued

    def lazy_initialization(self, key_states, value_states) -> None:
        raise TypeError("a converted layer's state is filled by the layer itself")

    def update(self, key_states, value_states, *args, **kwargs):
        raise TypeError("a converted layer keeps a recurrent state, not a growing KV cache")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = self.state = self.full_keys = self.full_values = None
        self.seen = self.key_start = 0
        self.padded = False
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self.keys, self.values, self.state, self.full_keys, self.full_values = (
                None if t is None else t.index_select(0, beam_idx.to(t.device)) for t in self._held())

    def _held(self) -> tuple:
        return self.keys, self.values, self.state, self.full_keys, self.full_values

    def stored_bytes(self) -> int:
        """Bytes held: window keys and values, the recurrent state, the softmax heads' keys and values."""
        if not self.is_initialized:
            return 0
        return sum(t.numel() * t.element_size() for t in self._held() if t is not None)


def state_slot(cache, layer_idx: int) -> RecurrentState:
    """The :class:`RecurrentState` of ``layer_idx`` in a transformers ``Cache``, installed on first use."""
    while len(cache.layers) <= layer_idx:
        if cache.layer_class_to_replicate is None:
            raise ValueError(f"the cache has no slot for layer {layer_idx}")
        cache.layers.append(cache.layer_class_to_replicate())
    slot = cache.layers[layer_idx]
    if not isinstance(slot, RecurrentState):
        if slot.get_seq_length() > 0:
            raise ValueError(f"layer {layer_idx}'s cache slot already holds softmax keys")
        slot = cache.layers[layer_idx] = RecurrentState()
    return slot


def right_padded(mask: torch.Tensor | None) -> bool:
    """Whether ``mask [B, 1, T_q, T_k]`` (bool, True attends, or additive float; None: causal) hides
    padding at the end of some rows; False for a plain causal mask. Raises for any other mask
    (left padding, packing): a linear state cannot skip tokens it has folded in."""
    if mask is None:
        return False
    allowed = mask if mask.dtype == torch.bool else mask == 0
    n_query, n_key = allowed.shape[-2:]
    rows = torch.arange(n_query, device=mask.device)[:, None] + (n_key - n_query)
    causal = torch.arange(n_key, device=mask.device)[None, :] <= rows
    valid = allowed[:, 0, -1, :]  # [B, T_k]: the keys the last row sees, all real ones under a causal mask
    prefix = valid.cumprod(-1).bool()  # right padding: real keys first, pads after
    if not torch.equal(valid, prefix) or not torch.equal(allowed, causal & valid[:, None, None, :]):
        raise ValueError("converted linear-attention layers do not support left-padded batches or custom masks; "
                         "pad on the right or pass sequences of equal length")
    return not bool(valid.all())


def norm_site(norm, heads: int, head_dim: int) -> str | None:
    """Where a query/key norm acts: ``"head"`` (weights ``[head_dim]`` or ``[heads, head_dim]``, on
    ``[..., heads, head_dim]``), ``"projection"`` (weights ``[heads · head_dim]``, on the projection
    before it is split into heads), or None for any other shape."""
    weight = getattr(norm, "weight", None)
    weight_shape = None if weight is None else tuple(weight.shape)
    if weight_shape in ((head_dim,), (heads, head_dim)):
        return "head"
    if weight_shape == (heads * head_dim,):
        return "projection"
    return None


def uses_rotary(attention: nn.Module) -> bool:
    """Whether the family applies rotary positions in this layer, as its modeling file decides:
    SmolLM3 per layer (``use_rope``), Cohere 2 on its sliding-window layers only (its full-attention
    layers have none); every other family everywhere. The conversion's probe checks the result."""
    if hasattr(attention, "use_rope"):
        return bool(attention.use_rope)
    if type(attention).__name__ == "Cohere2Attention":
        return attention.sliding_window is not None
    return True


class LinearAttention(nn.Module):
    """Drop-in ``self_attn`` with Hedgehog linear or hybrid attention (see the module docstring)."""

    is_causal = True  # each token's output folds in the tokens before it only

    def __init__(self, attention: nn.Module, settings: LinearSettings, n_heads: int, n_kv_heads: int, head_dim: int):
        super().__init__()
        self.settings = settings
        self.config = attention.config
        self.layer_idx = attention.layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.scaling = attention.scaling
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj)
        self.q_norm, self.k_norm = getattr(attention, "q_norm", None), getattr(attention, "k_norm", None)
        self.norm_sites = {name: norm_site(norm, heads, head_dim) for name, norm, heads in
                           (("q", self.q_norm, n_heads), ("k", self.k_norm, n_kv_heads)) if norm is not None}
        # the family's rotary function; none where the layer has no positions (NoPE layers)
        self.rotary = sys.modules[type(attention).__module__].apply_rotary_pos_emb if uses_rotary(attention) else None
        self.feature_q = FeatureMap(n_heads, head_dim, settings)
        self.feature_k = FeatureMap(n_heads, head_dim, settings)
        self.mix_logit = nn.Parameter(torch.full((n_heads,), logit(settings.gamma_init))) if settings.is_hybrid else None
        self.set_softmax_heads(settings.softmax_kv_heads(self.layer_idx))
        self.backend = "auto"
        self.transfer: str | None = None  # None, "mse" or "ce": stage-1 attention transfer
        self.transfer_loss: torch.Tensor | None = None

    @property
    def gamma(self) -> torch.Tensor | None:
        """``[H]`` softmax-window weights (hybrid only)."""
        return None if self.mix_logit is None else torch.sigmoid(self.mix_logit.float())

    def set_softmax_heads(self, kv_heads) -> None:
        """Make the KV heads ``kv_heads`` (and their query heads) compute softmax attention over the
        whole context; every other head the converted form."""
        kv_heads = tuple(sorted(set(kv_heads)))
        outside = [kv for kv in kv_heads if not 0 <= kv < self.n_kv_heads]
        if outside:
            raise ValueError(f"layer {self.layer_idx} has KV heads 0–{self.n_kv_heads - 1}, not {outside}")
        group = self.n_heads // self.n_kv_heads
        self.softmax_kv = kv_heads
        self.linear_kv = tuple(kv for kv in range(self.n_kv_heads) if kv not in kv_heads)
        self.softmax_q = [h for kv in self.softmax_kv for h in range(kv * group, (kv + 1) * group)]
        linear_q = [h for kv in self.linear_kv for h in range(kv * group, (kv + 1) * group)]
        self.linear_q = None if not kv_heads else linear_q  # None: every head converted

    def _gamma(self, heads: list[int] | None) -> torch.Tensor | None:
        """``[H']`` window weights of query heads ``heads`` (None: all); None for plain linear attention."""
        gamma = self.gamma
        return gamma if gamma is None or heads is None else gamma[heads]

    @staticmethod
    def _pick(x: torch.Tensor, heads: list[int] | None) -> torch.Tensor:
        """``x [B, heads, ...]`` restricted to ``heads`` (None: all)."""
        return x if heads is None else x[:, heads]

    def _linear_kv_index(self) -> list[int] | None:
        return None if self.linear_q is None else list(self.linear_kv)

    def _expand(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)

    def _project(self, hidden_states, position_embeddings):
        """Post-RoPE ``q [B, H, T, D]`` and ``k, v [B, H_kv, T, D]``, through the layer's query/key
        norms where it has them."""
        q = self._heads(self.q_proj(hidden_states), self.q_norm, self.norm_sites.get("q"))
        k = self._heads(self.k_proj(hidden_states), self.k_norm, self.norm_sites.get("k"))
        v = self._heads(self.v_proj(hidden_states), None, None)
        if self.rotary is not None:
            q, k = self.rotary(q, k, *position_embeddings)
        return q, k, v

    def _heads(self, projected: torch.Tensor, norm, site: str | None) -> torch.Tensor:
        """``[B, T, heads · D]`` split into ``[B, heads, T, D]``, normed where ``site`` says."""
        if site == "projection":
            projected = norm(projected)
        split = projected.view(*projected.shape[:-1], -1, self.head_dim)
        if site == "head":
            split = norm(split)
        return split.transpose(1, 2)

    def softmax_forward(self, hidden_states: torch.Tensor, position_embeddings) -> torch.Tensor:
        """The layer's output ``[B, T, hidden]`` under causal softmax attention, before conversion
        (the teacher, through ``o_proj``)."""
        q, k, v = self._project(hidden_states, position_embeddings)
        out = self._teacher(q, self._expand(k), self._expand(v))
        return self.o_proj(out.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1))

    def _teacher(self, q, k, v) -> torch.Tensor:
        """Causal softmax attention ``[B, H, T, D]`` of post-RoPE ``q`` and expanded ``k, v``."""
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scaling)

    def parallel(self, q, k, v) -> torch.Tensor:
        """``[B, H, T, D]`` outputs of the layer (converted heads, and softmax heads where it keeps
        some) from post-RoPE ``q`` and expanded ``k, v``."""
        heads = self.linear_q
        converted = self._converted(*(self._pick(x, heads) for x in (q, k, v)), heads) if heads != [] else None
        return self._with_softmax(converted, q, k, v)

    def _converted(self, q, k, v, heads: list[int] | None) -> torch.Tensor:
        """``[B, H', T, D]`` outputs of the converted form for query heads ``heads`` (None: all) from
        their post-RoPE ``q`` and expanded ``k, v``."""
        fq, fk = self.feature_q(q, heads), self.feature_k(k, heads)
        s = self.settings
        if s.is_hybrid:
            return hybrid_attention(q, k, v, fq, fk, self._gamma(heads), window=s.window,
                                    terrace=s.terrace, scale=self.scaling, backend=self.backend)
        return linear_attention(fq, fk, v, backend=self.backend)[0]

    def _with_softmax(self, converted: torch.Tensor | None, q, k, v) -> torch.Tensor:
        """``[B, H, T, D]``: ``converted`` outputs of the converted heads, with the softmax heads'
        causal softmax attention (from post-RoPE ``q`` and expanded ``k, v``) in their places."""
        if not self.softmax_q:
            return converted
        heads = self.softmax_q
        return self._merged(self._teacher(q[:, heads], k[:, heads], v[:, heads]), converted)

    def _merged(self, soft: torch.Tensor, converted: torch.Tensor | None) -> torch.Tensor:
        """``[B, H, ...]``: ``soft [B, H_s, ...]`` in the softmax heads' places and ``converted`` (None where
        no head is converted) in the converted heads'."""
        out = soft.new_empty(soft.shape[0], self.n_heads, *soft.shape[2:])
        out[:, self.softmax_q] = soft
        if converted is not None:
            out[:, self.linear_q] = converted.to(out.dtype)
        return out

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        padded = right_padded(attention_mask)
        q, k, v = self._project(hidden_states, position_embeddings)
        slot = state_slot(past_key_values, self.layer_idx) if past_key_values is not None else None
        if slot is not None and slot.seen > 0:
            if padded or slot.padded:
                raise ValueError("a converted layer cannot continue a right-padded batch (its state has folded in "
                                 "the padding); decode sequences of equal length")
            out = self._step(slot, q, k, v)
        else:  # right padding changes no real position's output: every pad comes after it
            ke, ve = self._expand(k), self._expand(v)
            out = self._transfer(q, ke, ve) if self.transfer else self.parallel(q, ke, ve)
            if slot is not None:
                self._hold_softmax(slot, k, v)
                self._fill(slot, *(self._pick(x, self._linear_kv_index()) for x in (k, v)), 0)
                slot.padded = padded
        out = out.to(hidden_states.dtype).transpose(1, 2).reshape(*hidden_states.shape[:-1], -1)
        return self.o_proj(out), None

    def _transfer(self, q, k, v) -> torch.Tensor:
        """Teacher output (passed on), with the student's loss stored in ``transfer_loss``."""
        if self.transfer not in TRANSFER_LOSSES:
            raise ValueError(f"transfer must be one of {TRANSFER_LOSSES}, got {self.transfer!r}")
        with torch.no_grad():
            teacher = self._teacher(q, k, v)
        heads = self.linear_q
        if heads == []:  # every head softmax: nothing to learn
            self.transfer_loss = teacher.new_zeros((), dtype=torch.float32)
        elif self.transfer == "mse":
            student = self._converted(*(self._pick(x, heads) for x in (q, k, v)), heads)
            self.transfer_loss = F.mse_loss(student.float(), self._pick(teacher, heads).float())
        else:
            self.transfer_loss = self._attention_cross_entropy(self._pick(q, heads), self._pick(k, heads), heads)
        return teacher

    def _attention_cross_entropy(self, q, k, heads: list[int] | None) -> torch.Tensor:
        """``−Σ_{j≤i} a_ij log â_ij`` averaged over rows: softmax teacher ``a`` vs the converted
        weights ``â`` of query heads ``heads`` (None: all; dense ``T × T``: short sequences only)."""
        with torch.no_grad():
            teacher = self._softmax_weights(q, k)
        student = self._converted_weights(q, k, heads)
        return -(teacher * torch.log(student.clamp(min=1e-12))).sum(-1).mean()

    def _softmax_weights(self, q, k) -> torch.Tensor:
        """``[B, H', T, T]`` causal softmax weights of post-RoPE ``q`` and expanded ``k``."""
        n = q.shape[2]
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        s = (q.float() @ k.float().transpose(-1, -2)) * self.scaling
        return torch.softmax(s.masked_fill(~causal, float("-inf")), -1)

    def attention_weights(self, q, k) -> torch.Tensor:
        """``[B, H, T, T]`` attention weights of the layer (rows sum to one), from post-RoPE ``q`` and
        expanded ``k``: the converted form's, and causal softmax on the softmax heads; dense, for short
        diagnostics."""
        heads = self.linear_q
        converted = self._converted_weights(self._pick(q, heads), self._pick(k, heads), heads) if heads != [] else None
        if not self.softmax_q:
            return converted
        return self._merged(self._softmax_weights(q[:, self.softmax_q], k[:, self.softmax_q]), converted)

    def _converted_weights(self, q, k, heads: list[int] | None) -> torch.Tensor:
        """``[B, H', T, T]`` weights of the converted form for query heads ``heads`` (None: all)."""
        n = q.shape[2]
        pos = torch.arange(n, device=q.device)
        causal = pos[None, :] <= pos[:, None]
        s_ = self.settings
        start = window_starts(pos, s_.window, s_.terrace)[:, None] if s_.is_hybrid else pos[:, None] + 1
        in_window = causal & (pos[None, :] >= start)
        weights = (self.feature_q(q, heads) @ self.feature_k(k, heads).transpose(-1, -2)) * (causal & ~in_window)
        if s_.is_hybrid:
            s = ((q.float() @ k.float().transpose(-1, -2)) * self.scaling).masked_fill(~in_window, float("-inf"))
            soft = torch.exp(s - s.amax(-1, keepdim=True)) * self._gamma(heads)[None, :, None, None]
            weights = weights + soft
        return weights / weights.sum(-1, keepdim=True)

    def attention_weights_of(self, hidden_states: torch.Tensor, position_embeddings) -> torch.Tensor:
        """:meth:`attention_weights` ``[B, H, T, T]`` of a layer input (dense: short inputs only)."""
        q, k, _ = self._project(hidden_states, position_embeddings)
        return self.attention_weights(q, self._expand(k))

    def _step(self, slot: RecurrentState, q, k, v) -> torch.Tensor:
        """Outputs of new tokens from the recurrent state (and the softmax heads' keys), then the state
        advanced past them."""
        first = slot.seen
        converted = None
        heads, kv_heads = self.linear_q, self._linear_kv_index()
        if heads != []:
            keys = torch.cat([slot.keys, self._pick(k, kv_heads)], 2)
            values = torch.cat([slot.values, self._pick(v, kv_heads)], 2)
            ke, ve, qc = self._expand(keys), self._expand(values), self._pick(q, heads)
            s = self.settings
            converted = hybrid_step_torch(
                qc, ke, ve, self.feature_q(qc, heads), self.feature_k(ke, heads), self._gamma(heads), slot.state,
                first_position=first, key_start=slot.key_start,
                window=s.window if s.is_hybrid else 0, terrace=s.terrace, scale=self.scaling)
            self._fill(slot, keys, values, slot.key_start)
        else:
            slot.seen = first + q.shape[2]
        if not self.softmax_q:
            return converted
        self._hold_softmax(slot, k, v)
        ke, ve = self._expand(slot.full_keys), self._expand(slot.full_values)
        n_new, n_keys = q.shape[2], ke.shape[2]
        visible = (torch.arange(n_keys, device=q.device)[None, :]
                   <= torch.arange(n_keys - n_new, n_keys, device=q.device)[:, None])
        soft = F.scaled_dot_product_attention(q[:, self.softmax_q], ke, ve, attn_mask=visible, scale=self.scaling)
        return self._merged(soft, converted)

    def _hold_softmax(self, slot: RecurrentState, k, v) -> None:
        """Append the softmax heads' new keys and values ``[B, H_kv, T, D]`` to ``slot``."""
        if not self.softmax_kv:
            return
        kv = list(self.softmax_kv)
        new_keys, new_values = k[:, kv].detach(), v[:, kv].detach()
        if slot.full_keys is not None:
            new_keys, new_values = torch.cat([slot.full_keys, new_keys], 2), torch.cat([slot.full_values, new_values], 2)
        slot.full_keys, slot.full_values = new_keys, new_values
        slot.is_initialized = True

    def _fill(self, slot: RecurrentState, keys, values, key_start: int) -> None:
        """Keep the keys the next query's window needs; fold older ones into the state.
        ``keys, values [B, H_kv', L, D]`` (the converted KV heads) sit at positions ``key_start …``."""
        seen = key_start + keys.shape[2]
        s = self.settings
        next_start = int(window_starts(torch.tensor(seen), s.window, s.terrace)) if s.is_hybrid else seen
        n_fold = next_start - key_start
        state = slot.state
        heads = self.linear_q
        if state is None:
            n_feat = self.feature_k.n_features
            n_heads = self.n_heads if heads is None else len(heads)
            state = keys.new_zeros(keys.shape[0], n_heads, n_feat, self.head_dim + 1, dtype=torch.float32)
        if n_fold > 0:
            fk = self.feature_k(self._expand(keys[:, :, :n_fold]), heads)
            state = state + fk.transpose(-1, -2) @ with_ones(self._expand(values[:, :, :n_fold]).float())
        slot.keys, slot.values = keys[:, :, n_fold:].detach(), values[:, :, n_fold:].detach()
        slot.state, slot.seen, slot.key_start = state.detach(), seen, next_start
        slot.is_initialized = True
