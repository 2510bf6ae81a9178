"""Result types of the attention-statistics ops."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionStats:
    """Per-row results of attention with statistics.

    ``out [B, Hq, Nq, D]`` (input dtype; None in the hook's recordings, which keep statistics only); ``lse``, ``entropy [B, Hq, Nq]`` fp32 (natural log);
    ``group_mass [B, Hq, Nq, G]`` fp32 or None; ``topk_index`` int64 and ``topk_weight`` fp32
    ``[B, Hq, Nq, k]`` (descending weight, earliest key first on ties) or None; ``columns``:
    the attention each key receives (:class:`ColumnStats`) when requested, else None.
    """

    out: torch.Tensor | None
    lse: torch.Tensor
    entropy: torch.Tensor
    group_mass: torch.Tensor | None = None
    topk_index: torch.Tensor | None = None
    topk_weight: torch.Tensor | None = None
    columns: "ColumnStats | None" = None


@dataclass
class ColumnStats:
    """``col_sum [B, Hq, Nk]`` fp32: attention each key receives, summed over valid rows;
    ``col_count [B, Nk]`` int64: valid rows that see each key. Their ratio is the
    "mean attention received" sink score."""

    col_sum: torch.Tensor
    col_count: torch.Tensor

    def mean_received(self) -> torch.Tensor:
        """``[B, Hq, Nk]``: col_sum / col_count, 0 where no row sees the key."""
        count = self.col_count[:, None, :].to(self.col_sum.dtype)
        return torch.where(count > 0, self.col_sum / count.clamp_min(1), torch.zeros_like(self.col_sum))
