"""The pattern scores of attention maps (and of per-row statistics), and running means of scores over
samples. Definitions: docs/methods/patterns.md and sinks.md. All scores here are computed from full maps of unpadded
inputs, ``A [layer, head, query, key]`` (rows sum to one over visible keys).
"""

from __future__ import annotations

import torch

from ...core.head_scores import HeadScores

PATTERN_SCORES = {
    "sink_first_token": "mean attention received by the first token (s_0)",
    "entropy": "mean row entropy normalised by log(visible keys), rows with one visible key excluded",
    "previous_token": "mean attention on the previous token, rows 1.. (TransformerLens' 'mul' measure)",
    "confidence": "mean over rows of the largest attention weight (Voita et al.'s confidence)",
    "sink_hidden": "mean row mass on hidden sinks: keys after the first whose mean received attention (over the "
                   "rows that see them) exceeds 0.1, among keys seen by at least 32 rows (ACT's sink criterion); "
                   "from maps only (NaN in statistics mode)",
}

PATTERN_PAGES = {"sink_first_token": "methods/sinks", "sink_hidden": "methods/sinks", "entropy": "methods/patterns",
                 "previous_token": "methods/patterns", "confidence": "methods/patterns"}

HIDDEN_SINK_THRESHOLD = 0.1
HIDDEN_SINK_MIN_ROWS = 32  # keys seen by fewer rows (the last ones, under a causal mask) are too noisy


def pattern_scores(maps: torch.Tensor, causal: bool) -> dict[str, torch.Tensor]:
    """The pattern scores of one input's maps ``[layer, head, query, key]`` -> ``{name: [layer, head]}``.

    Row quantities are computed in fp32 a block of rows at a time (no float64 copy of the maps);
    means over rows are taken in float64.
    """
    n = maps.shape[-1]
    visible = torch.arange(1, n + 1, dtype=torch.float64) if causal else torch.full((n,), float(n), dtype=torch.float64)
    entropy, confidence = [], []
    received = torch.zeros(*maps.shape[:2], n, dtype=torch.float64)  # column sums [layer, head, key]
    step = max(1, 2**24 // max(1, maps.shape[0] * maps.shape[1] * n))  # rows per block: ~64 MiB of fp32
    for start in range(0, n, step):
        rows = maps[..., start:start + step, :].float()
        entropy.append(-torch.special.xlogy(rows, rows).sum(-1).double())  # [layer, head, rows]
        confidence.append(rows.amax(-1).double())
        received += rows.sum(-2).double()
    row_entropy = torch.cat(entropy, -1)
    multi = visible > 1
    later = torch.arange(1, n)
    return {
        "sink_first_token": maps[..., 0].double().mean(-1).float(),
        "entropy": (row_entropy[..., multi] / visible[multi].log()).mean(-1).float(),
        "previous_token": maps[..., later, later - 1].double().mean(-1).float(),
        "confidence": torch.cat(confidence, -1).mean(-1).float(),
        "sink_hidden": hidden_sink_mass(received, causal).float(),
    }


def hidden_sink_mass(received: torch.Tensor, causal: bool) -> torch.Tensor:
    """``[layer, head]`` mean row mass on hidden sinks (keys, the first aside, whose mean received
    attention exceeds 0.1 over at least 32 rows), from column sums ``[layer, head, key]``."""
    n = received.shape[-1]
    seen_by = torch.arange(n, 0, -1, dtype=torch.float64) if causal else torch.full((n,), float(n), dtype=torch.float64)
    sinks = (received / seen_by > HIDDEN_SINK_THRESHOLD) & (seen_by >= HIDDEN_SINK_MIN_ROWS)
    sinks[..., 0] = False
    return (received * sinks).sum(-1) / n


def pattern_scores_from_statistics(rows: dict[int, dict[str, torch.Tensor]], causal: bool) -> dict[str, torch.Tensor]:
    """The same scores as :func:`pattern_scores`, from per-row statistics ``{layer: {name: [head,
    query]}}`` (:func:`headlab.probes.scorers.record.record_statistics`) instead of maps."""
    layers = sorted(rows)
    def stack(name):
        return torch.stack([rows[layer][name].double() for layer in layers])  # [layer, head, query]
    entropy = stack("entropy")
    n = entropy.shape[-1]
    visible = torch.arange(1, n + 1, dtype=entropy.dtype) if causal else torch.full((n,), float(n), dtype=entropy.dtype)
    multi = visible > 1
    return {
        "sink_first_token": stack("first_token").mean(-1).float(),
        "entropy": (entropy[..., multi] / visible[multi].log()).mean(-1).float(),
        "previous_token": stack("previous_token")[..., 1:].mean(-1).float(),
        "confidence": stack("top_weight").mean(-1).float(),
        "sink_hidden": torch.full(entropy.shape[:2], float("nan")),
    }


class ScoreAccumulator:
    """Running means of ``[layer, head]`` scores over samples (float64)."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}

    def add(self, scores: dict[str, torch.Tensor]) -> None:
        for name, value in scores.items():
            value = value.double()
            seen = ~value.isnan()
            if name not in self.sums:
                self.sums[name] = torch.zeros_like(value)
                self.counts[name] = torch.zeros_like(value, dtype=torch.long)
            self.sums[name] += value.nan_to_num(0.0)
            self.counts[name] += seen.long()

    def all_reduce(self) -> None:
        """Sum the running totals over the ranks of the process group (every rank ends equal)."""
        import torch.distributed as dist

        for name in sorted(self.sums):
            dist.all_reduce(self.sums[name])
            dist.all_reduce(self.counts[name])

    def result(self, name: str, model_id: str, description: str, settings: dict) -> HeadScores:
        counts = self.counts[name]
        values = torch.where(counts > 0, self.sums[name] / counts.clamp_min(1), torch.nan).float()
        return HeadScores(name, values, counts, model_id, description, settings)
