"""How model families form attention scores beyond ``scale · q·k``: the one home of the quirks
that every op reading scores shares (the reference, the torch paths, the Triton launchers).

* ``window`` (sliding-window attention: Mistral, Gemma 2/3, gpt-oss, Cohere 2, ...): a causal row
  at key position ``p`` sees only keys ``p - window < j <= p``, i.e. ``window`` keys including
  itself (transformers' ``sliding_window`` convention).
* ``softcap`` (Gemma 2): logits become ``c · tanh(s / c)`` before masking.
* ``sinks`` (gpt-oss): one learned logit per query head, ``[Hq]``, an extra column in every row's
  normaliser that takes probability mass but carries no value. Key probabilities then sum to
  ``1 - p_sink`` and the log-sum-exp includes the sink.

Shapes as in :mod:`.reference`.
"""

from __future__ import annotations

import torch


def check_scoring(window: int | None, softcap: float | None, sinks: torch.Tensor | None, causal: bool,
                  n_heads: int) -> None:
    """Raise ``ValueError`` for quirk settings no model uses or the ops cannot honour."""
    if window is not None:
        if isinstance(window, bool) or int(window) != window or window < 1:
            raise ValueError(f"window must be a positive integer number of keys, got {window!r}")
        if not causal:
            raise ValueError("a sliding window needs causal attention (bidirectional windows are not supported)")
    if softcap is not None and not (float(softcap) > 0 and float(softcap) != float("inf")):
        raise ValueError(f"softcap must be a positive finite number, got {softcap!r}")
    if sinks is not None and tuple(sinks.shape) != (n_heads,):
        raise ValueError(f"sinks must hold one logit per query head, [{n_heads}], got {tuple(sinks.shape)}")


def softcapped(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """``c · tanh(s / c)`` (Gemma 2's attention soft-capping), or ``scores`` unchanged."""
    if softcap is None:
        return scores
    return torch.tanh(scores / softcap) * softcap


def first_visible_key(row_position: int, window: int | None) -> int:
    """The first key a causal row at ``row_position`` can see (0 without a window)."""
    return 0 if window is None else max(0, row_position - window + 1)


def with_sinks(lse: torch.Tensor, entropy: torch.Tensor, sinks: torch.Tensor | None):
    """Fold learned sink logits into row statistics taken over the keys alone.

    ``lse, entropy [B, Hq, Nq]`` of the key distribution (natural log; ``lse = -inf`` for rows
    that see no key), ``sinks [Hq]``. Returns ``(lse, entropy, keep)``: the log-sum-exp and
    entropy of the distribution over keys and the sink column, and ``keep [B, Hq, Nq]``, the
    factor every key probability (and so the output, group masses, top-k weights and column
    sums) is multiplied by: ``1 - p_sink``. With ``sinks=None`` returns the inputs and None.

    With ``r = keep``: ``H = r·H_keys - r·log r - p_sink·log p_sink`` (0·log 0 = 0), with
    ``log r = -softplus(sink - lse)`` and ``log p_sink = -softplus(lse - sink)``, so that neither
    log cancels when one side holds nearly all the mass.
    """
    if sinks is None:
        return lse, entropy, None
    sink = sinks.to(device=lse.device, dtype=torch.float32)[None, :, None].expand_as(lse)
    gap = lse - sink  # -inf for rows that see no key
    log_keep = -torch.nn.functional.softplus(-gap)
    log_sink = -torch.nn.functional.softplus(gap)
    keep, sink_mass = log_keep.exp(), log_sink.exp()
    key_part = torch.where(keep > 0, keep * (entropy - log_keep), torch.zeros_like(keep))
    sink_part = torch.where(sink_mass > 0, -sink_mass * log_sink, torch.zeros_like(keep))
    return sink - log_sink, key_part + sink_part, keep
