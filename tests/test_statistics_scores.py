"""Head scores from streamed statistics (long inputs) equal those from exact maps."""

import pytest
import torch
from conftest import tiny_bert, tiny_llama

from headlab.kernels import attention_with_stats, row_key_probs
from headlab.kernels.reference import attention_probs_reference
from headlab.probes.scorers.record import record_attention, record_statistics
from headlab.probes.scorers.record import scoring_method
from headlab.probes.scorers.patterns import pattern_scores, pattern_scores_from_statistics

pytestmark = pytest.mark.numerics  # run again in CI with one thread and narrower vector units


@pytest.mark.parametrize("padding", [False, True])
def test_row_key_probs_match_the_map(padding):
    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 6, 9, 8, generator=gen), torch.randn(2, 2, 12, 8, generator=gen), torch.randn(2, 2, 12, 8)
    key_valid = torch.ones(2, 12, dtype=torch.bool)
    if padding:
        key_valid[1, :4] = False
    lse = attention_with_stats(q, k, v, key_valid=key_valid, backend="torch").lse
    got = row_key_probs(q, k, lse, (0, 1, 3), key_valid=key_valid)
    p, _, _ = attention_probs_reference(q, k, 8**-0.5, True, None, key_valid)
    for slot, d in enumerate((0, 1, 3)):
        for i in range(9):
            j = i + 3 - d
            want = p[:, :, i, j] if j >= 0 else torch.zeros(2, 6)
            assert torch.allclose(got[:, :, i, slot], want, atol=1e-6), (d, i)


@pytest.mark.parametrize("factory", [lambda: tiny_llama("gqa"), tiny_bert], ids=["decoder", "encoder"])
def test_statistics_scores_equal_map_scores(factory):
    model = factory()
    causal = hasattr(model, "lm_head")
    ids = torch.randint(2, 97, (1, 40), generator=torch.Generator().manual_seed(3))
    from_maps = pattern_scores(record_attention(model, ids).maps, causal)
    from_stats = pattern_scores_from_statistics(record_statistics(model, ids), causal)
    assert from_stats["sink_hidden"].isnan().all()  # needs column sums: maps only
    for name, value in from_maps.items():
        if name == "sink_hidden":
            continue
        assert torch.allclose(from_stats[name], value, atol=1e-5), name


def test_long_windows_switch_to_statistics():
    model = tiny_llama("gqa")
    assert scoring_method(model, 256) == "maps"
    assert scoring_method(model, 8192) == "statistics"  # 3·9·8192²·4 bytes > 2 GiB
