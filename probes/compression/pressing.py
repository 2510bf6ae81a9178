"""Presses in the compression evaluation: which press conditions a setting asks for (token scorers,
head allocations, whole-head hybrids, query-agnostic and query-aware, each at every budget), and a
text window's perplexity with the cache held under the budget (prompts: :mod:`.decoding`).

A prompt is compressed query-agnostically by default: its context is prefilled and compressed before
the question is seen (the budget leaves room for the question), then the question is fed and the
answer decoded; query-aware, the whole prompt is prefilled and then compressed. Either way the cache
holds the budget at the prompt's length, so every condition sits on one axis of cache bytes. While
decoding, a layer that gained the press's slack over its budget is compressed back to it.
"""

from __future__ import annotations

import torch

from ...core.errors import HeadlabError
from ...surgeon import attach
from ...surgeon.compression.budget import head_budget
from ...surgeon.compression.scorers import token_scorer
from ...surgeon.compression.settings import PressSettings
from .settings import CompressionSettings

MODES = {"agnostic": False, "aware": True}
PERPLEXITY_CHUNK = 128  # rows a perplexity window is fed in, the cache compressed after each


def hybrid_parts(spec: str) -> tuple[str, float, int, str | None]:
    """``(rule, whole fraction, window, scorer or None)`` of a ``RULE:WHOLE:WINDOW[:SCORER]`` hybrid, e.g.
    ``razor:0.1:64`` (with every scorer) or ``razor:0.1:64:snapkv`` (with that scorer only)."""
    parts = spec.split(":")
    try:
        rule, whole, window = parts[0], float(parts[1]), int(parts[2])
    except (IndexError, ValueError):
        raise HeadlabError(f"--hybrids {spec!r}: write RULE:WHOLE:WINDOW[:SCORER], e.g. razor:0.1:64 (the rule "
                           "ranking the whole heads, their fraction of KV heads, the other heads' window, and the "
                           "one scorer it goes with, if not every one)") from None
    if len(parts) not in (3, 4) or not 0 < whole < 1 or window < 0:
        raise HeadlabError(f"--hybrids {spec!r}: WHOLE is a fraction in (0, 1) and WINDOW a count of positions")
    scorer = parts[3] if len(parts) == 4 else None
    if scorer is not None:
        token_scorer(scorer)
    return rule, whole, window, scorer


def allocation_parts(spec: str) -> dict:
    """The press fields of an allocation: ``uniform``, ``pool`` or ``scores:RULE``."""
    name, _, rule = spec.partition(":")
    if name in ("uniform", "pool") and not rule:
        return {"allocation": name}
    if name == "scores" and rule:
        return {"allocation": name, "rule": rule}
    raise HeadlabError(f"--allocations {spec!r}: write uniform, pool or scores:RULE (RULE a score of --scores, razor "
                       "or random)")


def press_settings(settings: CompressionSettings) -> list[tuple[str, PressSettings]]:
    """``(rule name, press)`` of every press condition at every budget: each scorer under each
    allocation, then each hybrid with each scorer (or the one it names), each in each mode."""
    for scorer in settings.scorers:
        token_scorer(scorer)
    out = []
    for mode in settings.modes:
        aware = MODES[mode]
        for scorer in settings.scorers:
            variants = [allocation_parts(allocation) for allocation in settings.allocations]
            variants += [dict(rule=rule, whole=whole, window=window) for rule, whole, window, only in
                         map(hybrid_parts, settings.hybrids) if only in (None, scorer)]
            for variant in variants:
                for budget in settings.budgets:
                    press = PressSettings(**{"scorer": scorer, "budget": budget, "sinks": settings.sinks,
                                             "window": settings.press_window, "query_aware": aware,
                                             "seed": settings.seed, **variant})
                    out.append((press.label(), press))
    return out


def press_rules(settings: CompressionSettings) -> set[str]:
    """The head-score rules the press conditions read (their whole heads, their head weights)."""
    return ({hybrid_parts(spec)[0] for spec in settings.hybrids}
            | {allocation_parts(spec).get("rule") for spec in settings.allocations} - {None})


def check_budgets(config, presses: list[PressSettings], lengths, whole_heads) -> None:
    """Every press's budget fits at every length (one line otherwise, before any weight is read);
    ``whole_heads(press)`` counts the KV heads it keeps whole."""
    for press in presses:
        for length in lengths:
            head_budget(config, length, press.budget, press.tokens, whole_heads(press), press.sinks + press.window)


@torch.no_grad()
def press_window_loss(model, window: torch.Tensor, press, chunk: int = PERPLEXITY_CHUNK) -> float:
    """Mean next-token cross-entropy (nats) of ``window [1, n]`` fed in chunks of ``chunk`` rows, every
    global layer compressed to the budget (measured at ``n``) after each chunk: each token is predicted
    from what the press's cache holds when it arrives."""
    cache = press.cache(window.shape[1])
    total, count = 0.0, 0
    with attach(model, compression=press):
        for start in range(0, window.shape[1] - 1, chunk):
            rows = window[:, start:start + chunk]
            logits = model(input_ids=rows, past_key_values=cache, use_cache=True).logits[0].float()
            targets = window[0, start + 1:start + 1 + rows.shape[1]]
            logits = logits[:len(targets)]
            total += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
            count += len(targets)
            for layer in press.layers:
                cache.layers[layer].pending = 0
    return total / count


__all__ = ["MODES", "PERPLEXITY_CHUNK", "allocation_parts", "check_budgets", "hybrid_parts", "press_rules",
           "press_settings", "press_window_loss"]
