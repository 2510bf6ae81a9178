"""A press: KV-cache compression of a pretrained model through headlab's attention hook.

:class:`KVPress` binds :class:`~.settings.PressSettings` to a model: the token scorer, the KV heads a
rule keeps whole, the head weights of the ``scores`` allocation and the rotary frequencies a scorer
may need, all checked before any forward. ``press.cache(length, reserve)`` makes the compressed cache
of one sequence whose budget is measured at ``length`` tokens; the first call (the prefill) attends
exactly as the model does and then compresses every layer (a sliding-window layer within its window), leaving room for ``reserve`` more
positions (the question, when compressing query-agnostically); while decoding, a layer that has
gained ``slack`` positions over its budget is compressed back to it.

Usage::

    press = KVPress(model, PressSettings(scorer="snapkv", budget=0.35))
    cache = press.cache(prompt_length)
    with attach(model, compression=press):
        model(input_ids=context, past_key_values=cache)      # compressed at the end of this call
        model(input_ids=question, past_key_values=cache)
"""

from __future__ import annotations

import math

import torch
from transformers.cache_utils import DynamicCache

from ...core.errors import HeadlabError
from ...core.head_scores import HeadScores
from ...core.shape import model_shape
from ..attention_math import AttentionCall
from ..streaming.rules import full_kv_heads, kv_head_scores, rule_ranking
from ..sites import full_attention_layers
from .budget import HeadBudget, head_budget
from .cache import PAD_POSITION, CompressedLayer, compressed_cache
from .scorers import ScoredCall, token_scorer
from .settings import PressSettings

SAFEGUARD = 0.2  # Ada-KV and the scores allocation: each compressed head keeps at least this share of an even split


class KVPress:
    """A press bound to ``model`` (see the module docstring); ``scores`` holds the head scores a
    ``rule`` reads (``{name: HeadScores}``)."""

    def __init__(self, model, settings: PressSettings, scores: dict[str, HeadScores] | None = None):
        self.model, self.settings = model, settings
        self.scorer = token_scorer(settings.scorer)
        self.shape = model_shape(model)
        self.global_layers = full_attention_layers(model.config)
        self.layers = list(self.global_layers)  # the layers the current cache compresses
        if not self.layers:
            raise HeadlabError(f"every layer of {type(model).__name__} holds a sliding window already; a press "
                               "compresses the caches of global-attention layers, and this model has none")
        layer_types = getattr(model.config.get_text_config(decoder=True), "layer_types", None)
        ranking = None if settings.rule is None else rule_ranking(settings.rule, scores, self.shape, layer_types,
                                                                  settings.seed)
        self.whole = set(full_kv_heads(ranking, settings.whole)[0]) if settings.whole else set()
        self.weights = self._head_weights(ranking, scores) if settings.allocation == "scores" else None
        self.inv_freq = rotary_frequencies(model) if self.scorer.needs_rotary else None
        if self.scorer.needs_rotary and self.inv_freq is None:
            raise HeadlabError(f"token scorer {settings.scorer!r} moves queries to future positions with the model's "
                               f"rotary embedding, and {type(model).__name__} has no plain rotary frequencies "
                               "(rotary_emb.inv_freq); choose another scorer")
        self.current: DynamicCache | None = None
        self.budget: HeadBudget | None = None

    def head_budget(self, length: int) -> HeadBudget:
        """The per-head budget at ``length`` tokens (refuses a budget below the sinks and window)."""
        s = self.settings
        return head_budget(self.model.config, length, s.budget, s.tokens, len(self.whole), s.sinks + s.window)

    def cache(self, length: int, reserve: int = 0) -> DynamicCache:
        """A compressed cache for one sequence whose budget is measured at ``length`` tokens; its first
        call is compressed to the budget less ``reserve`` positions."""
        self.budget = self.head_budget(length)
        sliding = self.budget.per_sliding or {}
        self.layers = sorted([*self.global_layers, *sliding])
        cache = compressed_cache(self.model, self, self.layers)
        for layer in self.layers:
            cache.layers[layer].targets = self._targets(layer, sliding.get(layer, self.budget.per_head))
            cache.layers[layer].pending = reserve
        self.current = cache
        return cache

    def layer(self, index: int) -> CompressedLayer:
        """The current cache's layer ``index``."""
        if self.current is None:
            raise HeadlabError("this press has no cache: make one with press.cache(length) and pass it to the model")
        return self.current.layers[index]

    def attend(self, module, own, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
               kwargs: dict):
        """One call of a compressed layer (``query [1, H, new, D]``; ``key``/``value`` from the layer's
        update): the model's own attention over what each head holds, then compression where due.
        Returns ``(out [1, new, H, D], weights or None)``."""
        cache_layer = self.layer(module.layer_idx)
        if not isinstance(cache_layer, CompressedLayer):
            raise HeadlabError(f"layer {module.layer_idx} of the model's cache is not the press's: pass the cache of "
                               "press.cache(...) as past_key_values")
        n_query = query.shape[-2]
        if any(cache_layer.before):
            visible = cache_layer.visible(n_query, key.shape[-2], self.shape.group_size, query.device)
            mask = visible if attention_mask is None or attention_mask.dtype == torch.bool else \
                torch.zeros(visible.shape, dtype=attention_mask.dtype, device=query.device).masked_fill(
                    ~visible, torch.finfo(attention_mask.dtype).min)
            out, weights = own(module, query, key, value, mask, **kwargs)
        else:
            out, weights = own(module, query, key, value, attention_mask, **kwargs)
        cache_layer.observe(query, self.settings.observation)
        due = self._due(cache_layer)
        if due is not None:
            self.compress(cache_layer, AttentionCall.read(module, query, kwargs), due)
        return out, weights

    def compress(self, cache_layer: CompressedLayer, call: AttentionCall, reserve: int) -> None:
        """Keep in every compressed head of ``cache_layer`` its sinks, its window and what the scorer
        ranks highest, up to its target less ``reserve``."""
        cache_layer.forget_outside_window()
        keys, values, positions = cache_layer.held_tensors()
        scored = ScoredCall(cache_layer.recent_queries, keys, values, positions, cache_layer.recent_positions.to(
            positions.device), call.scaling, call.softcap, self.shape.group_size, self.inv_freq,
            self.settings.pooling, self.settings.seed + cache_layer.index, cache_layer.window)
        scores = self.scorer.score(scored).float()[0]  # [kv, longest]
        scores = scores.masked_fill(positions[0] == PAD_POSITION, float("-inf"))
        counts = cache_layer.held_counts()
        protected = self._protected(positions[0], counts)
        scores = scores.masked_fill(protected, float("inf"))
        targets = [max(0.0, t - reserve) if math.isfinite(t) else t for t in cache_layer.targets]
        cache_layer.keep_slots(self._chosen(scores, counts, targets, protected.sum(-1).tolist()))
        return_freed_memory()

    def _due(self, cache_layer: CompressedLayer) -> int | None:
        """The reserve to compress with at the end of this call, or None."""
        if cache_layer.pending is not None:
            reserve, cache_layer.pending = cache_layer.pending, None
            return reserve
        slack = self.settings.slack
        over = any(h > t + slack for h, t in zip(cache_layer.held_counts(), cache_layer.targets) if math.isfinite(t))
        return 0 if slack and over else None

    def _protected(self, positions: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """``[kv, longest]``: each head's sinks (the sequence's first positions) and its latest window."""
        slots = torch.arange(positions.shape[-1], device=positions.device)
        latest = slots[None, :] >= torch.tensor(counts, device=positions.device)[:, None] - self.settings.window
        return (positions < self.settings.sinks) | (latest & (positions != PAD_POSITION))

    def _chosen(self, scores: torch.Tensor, counts: list[int], targets: list[float],
                protected: list[int]) -> list[torch.Tensor]:
        """The slots each head keeps, ascending: all of a whole head's; otherwise its top entries, as many
        as its target (never fewer than its protected ones), shared out across the layer's heads by one
        top-k under the pool allocation."""
        heads = range(len(counts))
        keep = [counts[h] if not math.isfinite(targets[h]) else min(counts[h], max(protected[h], round(targets[h])))
                for h in heads]
        if self.settings.allocation == "pool":
            keep = self._pooled(scores, counts, targets, protected, keep)
        return [torch.topk(scores[h, :counts[h]], keep[h]).indices.sort().values for h in heads]

    def _pooled(self, scores: torch.Tensor, counts: list[int], targets: list[float], protected: list[int],
                even: list[int]) -> list[int]:
        """Ada-KV: each compressed head keeps at least a :data:`SAFEGUARD` share of its even count (and its
        protected entries); the rest of the layer's total goes to the highest scores of any head."""
        pooled = [h for h in range(len(counts)) if math.isfinite(targets[h])]
        floor = {h: min(counts[h], max(protected[h], int(SAFEGUARD * even[h]))) for h in pooled}
        rest = sum(even[h] for h in pooled) - sum(floor.values())
        if rest <= 0 or not pooled:
            return even
        leftovers = torch.cat([scores[h, :counts[h]].sort(descending=True).values[floor[h]:] for h in pooled])
        owner = torch.cat([torch.full((counts[h] - floor[h],), h) for h in pooled])
        taken = owner[torch.topk(leftovers, min(rest, len(leftovers))).indices]
        keep = list(even)
        for h in pooled:
            keep[h] = floor[h] + int((taken == h).sum())
        return keep

    def _targets(self, layer: int, per_head: float) -> list[float]:
        """Positions each KV head of ``layer`` may hold: every one for a whole head, else ``per_head``
        (scaled by the head's weight under the scores allocation)."""
        out = []
        for kv in range(self.shape.n_kv_heads):
            if (layer, kv) in self.whole:
                out.append(math.inf)
            elif self.weights is not None:
                out.append(per_head * self.weights[(layer, kv)])
            else:
                out.append(per_head)
        return out

    def _head_weights(self, ranking, scores) -> dict[tuple[int, int], float]:
        """HeadKV's shares, relative to an even split (mean 1 over the compressed heads): a
        :data:`SAFEGUARD` floor, the rest in proportion to the rule's KV-head score (its rank for razor
        and random, which have no single score)."""
        heads = [head for head in ranking if head not in self.whole]
        if self.settings.rule in (scores or {}):
            table = kv_head_scores(scores[self.settings.rule].values.float(), self.shape.group_size)
            raw = [max(0.0, float(table[layer, kv])) for layer, kv in heads]
        else:
            raw = [float(len(heads) - rank) for rank in range(len(heads))]
        total = sum(raw) or 1.0
        return {head: SAFEGUARD + (1 - SAFEGUARD) * len(heads) * value / total for head, value in zip(heads, raw)}


def return_freed_memory() -> None:
    """Hand the pages freed by a compression back to the operating system. glibc keeps freed blocks of
    the sizes a cache layer uses in its heap (its mmap threshold rises with each such free), where the
    small kept tensors allocated after them pin them: without this, a process's resident memory would
    not fall with what the press drops. Nothing on other C libraries."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _glibc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _glibc()


def rotary_frequencies(model) -> torch.Tensor | None:
    """``[head_dim / 2]``: the rotary frequencies of the model's global layers (the ``rotary_emb`` of its
    base model), or None where there is no such buffer."""
    base = getattr(model, "model", model)
    base = getattr(base, "language_model", base)
    rotary = getattr(base, "rotary_emb", None)
    inv_freq = getattr(rotary, "inv_freq", None)
    if inv_freq is None:
        inv_freq = getattr(rotary, "full_attention_inv_freq", None)
    return None if inv_freq is None else inv_freq.detach().float().cpu()


__all__ = ["SAFEGUARD", "KVPress", "rotary_frequencies"]
