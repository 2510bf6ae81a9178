"""One prompt decoded under a condition of the compression evaluation: a plan of streaming heads on
its streaming cache, or a press on its compressed cache (query-agnostic: the context compressed before
the question is fed; query-aware: the whole prompt, then compressed). Both prefill every token but the
last and decode greedily from it, as the needle harness does."""

from __future__ import annotations

import torch

from ...surgeon import Plan, attach
from ...surgeon.compression.press import KVPress
from ...surgeon.kv_cache import cache_bytes
from ...surgeon.sites import announcing_layers
from ...surgeon.streaming.cache import streaming_cache
from ..scorers.retrieval import Status, StopRule, greedy_from_cache


@torch.no_grad()
def decoded(model, tokenizer, ids: torch.Tensor, question_start: int | None, condition: Plan | KVPress,
            max_new_tokens: int, stop: StopRule, status: Status | None = None) -> tuple[str, int]:
    """``(response, cache bytes after the prompt)`` of ``ids [1, seq]`` under ``condition``; ``status``
    hears the prefill (layer by layer) and each decoding step."""
    prefilled = ids.shape[1] - 1
    if isinstance(condition, KVPress):
        aware = condition.settings.query_aware or question_start is None
        split = prefilled if aware else question_start
        cache = condition.cache(prefilled, reserve=prefilled - split)
        context = attach(model, compression=condition)
    else:
        split = prefilled
        cache = streaming_cache(model, condition)
        context = attach(model, condition)
    with context:
        with announcing_layers(model, status, f"prefill of {split:,} tokens"):
            model(input_ids=ids[:, :split], past_key_values=cache, use_cache=True, logits_to_keep=1)
        if split < prefilled:
            model(input_ids=ids[:, split:prefilled], past_key_values=cache, use_cache=True, logits_to_keep=1)
        held = cache_bytes(cache)
        generated = greedy_from_cache(model, cache, ids[:, -1:], max_new_tokens, stop, status=status)
    return tokenizer.decode(generated, skip_special_tokens=True).strip(), held


__all__ = ["decoded"]
