"""Pattern scores on attention maps whose answers are known by construction."""

import math

import pytest
import torch

from headlab.core.head_scores import HeadScores
from headlab.probes import ScoreAccumulator, pattern_scores


def causal_uniform(n):
    rows = torch.tril(torch.ones(n, n))
    return rows / rows.sum(-1, keepdim=True)


def previous_token(n):
    maps = torch.zeros(n, n)
    maps[0, 0] = 1
    maps[torch.arange(1, n), torch.arange(n - 1)] = 1
    return maps


def first_token(n):
    maps = torch.zeros(n, n)
    maps[:, 0] = 1
    return maps


def test_hand_set_heads_score_as_constructed():
    n = 12
    maps = torch.stack([torch.stack([causal_uniform(n), previous_token(n), first_token(n)])])  # [1 layer, 3 heads]
    scores = pattern_scores(maps, causal=True)
    assert torch.allclose(scores["previous_token"][0], torch.tensor([sum(1 / (i + 1) for i in range(1, n)) / (n - 1), 1.0, 1 / (n - 1)]), atol=1e-6)
    assert torch.allclose(scores["entropy"][0], torch.tensor([1.0, 0.0, 0.0]), atol=1e-6)
    assert torch.allclose(scores["sink_first_token"][0], torch.tensor([sum(1 / (i + 1) for i in range(n)) / n, 2 / n, 1.0]), atol=1e-6)
    assert torch.allclose(scores["confidence"][0], torch.tensor([sum(1 / (i + 1) for i in range(n)) / n, 1.0, 1.0]), atol=1e-6)


def test_hidden_sink_mass_counts_a_planted_second_sink_only():
    n = 64
    hidden = torch.zeros(n, n)  # every row gives 0.5 to token 0 and 0.5 to token 5 once it sees it
    hidden[:, 0] = 1.0
    hidden[5:, 0] = 0.5
    hidden[5:, 5] = 0.5
    maps = torch.stack([torch.stack([causal_uniform(n), first_token(n), hidden])])
    scores = pattern_scores(maps, causal=True)["sink_hidden"][0]
    # uniform rows: key j receives mean 1/(N-j)·Σ_{i≥j} 1/(i+1) < 0.1 for keys seen by >= 32 rows
    assert scores[0] == 0.0 and scores[1] == 0.0
    assert scores[2].item() == pytest.approx(0.5 * (n - 5) / n)


def test_encoder_entropy_uses_the_full_row_support():
    n = 8
    maps = torch.full((1, 1, n, n), 1 / n)
    assert torch.allclose(pattern_scores(maps, causal=False)["entropy"], torch.ones(1, 1), atol=1e-6)
    assert not torch.allclose(pattern_scores(maps, causal=True)["entropy"], torch.ones(1, 1), atol=1e-2)


def test_accumulator_averages_samples_and_keeps_nan_as_not_analysed(tmp_path):
    acc = ScoreAccumulator()
    acc.add({"s": torch.tensor([[1.0, math.nan], [0.0, 2.0]])})
    acc.add({"s": torch.tensor([[3.0, math.nan], [1.0, 2.0]])})
    result = acc.result("s", "tiny", "test score", {"seed": 0})
    assert result.values[0, 0] == 2.0 and result.values[1, 0] == 0.5 and math.isnan(result.values[0, 1])
    assert result.counts.tolist() == [[2, 0], [2, 2]]
    assert result.top(2) == [(0, 0, 2.0), (1, 1, 2.0)]
    loaded = HeadScores.load(result.save(tmp_path / "s.json"))
    assert torch.equal(loaded.values.nan_to_num(-1), result.values.nan_to_num(-1)) and loaded.settings == {"seed": 0}
