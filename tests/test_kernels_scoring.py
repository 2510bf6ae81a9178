"""The model-family quirks of the statistics ops (sliding window, soft-capping, learned sinks)
against the naive reference, which writes each quirk out literally (a sink is a real softmax
column there), on every backend: torch with the native row pass, torch ops, Triton (interpreter).
"""

import pytest
import torch

from headlab.kernels import attention_with_stats, column_stats, partial_attention, row_key_probs
from headlab.kernels.reference import attention_probs_reference, attention_stats_reference, column_stats_reference
from headlab.kernels.quirks import with_sinks
from headlab.kernels.attention_stats_torch import attention_stats_torch

from test_kernels_stats import make_inputs, rel_rms, row_pass  # noqa: F401  (row_pass is a fixture)

pytestmark = pytest.mark.numerics  # run again in CI with one thread and narrower vector units

SINKS = torch.tensor([0.5, -1.0, 3.0, 9.0])  # the last head puts nearly all mass on its sink

# (name, batch, q heads, kv heads, rows, keys, head dim, padding, quirks)
CASES = [
    ("window", 2, 4, 2, 90, 90, 16, "left", dict(window=7)),
    ("window-decode", 2, 4, 1, 3, 40, 16, "left", dict(window=5)),  # decode rows at the end of a cache
    ("window-wider-than-input", 1, 4, 2, 30, 30, 16, None, dict(window=64)),
    ("softcap", 2, 4, 2, 70, 70, 16, "left", dict(softcap=2.0)),
    ("sinks", 2, 4, 2, 70, 70, 16, "left", dict(sinks=SINKS)),
    ("all", 2, 4, 1, 81, 81, 16, "left", dict(window=9, softcap=1.5, sinks=SINKS)),
]


def _quirk_inputs(case, seed=0):
    _, batch, heads, kv_heads, n_query, n_key, dim, padding, quirks = case
    q, k, v, key_valid, groups = make_inputs(batch, heads, kv_heads, n_query, n_key, dim, padding, torch.float32,
                                             seed=seed)
    return q * 3, k, v, key_valid, groups, quirks  # sharper rows: windows and caps then matter


@pytest.mark.parametrize("row_pass", ["torch", "torch-ops", "triton"], indirect=True)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_statistics_with_family_quirks_match_reference(case, row_pass):
    q, k, v, key_valid, groups, quirks = _quirk_inputs(case)
    got = attention_with_stats(q, k, v, key_valid=key_valid, key_groups=groups, topk=4, columns=True,
                               backend=row_pass, **quirks)
    ref = attention_stats_reference(q, k, v, key_valid=key_valid, key_groups=groups, topk=4, **quirks)
    cols = column_stats_reference(q, k, key_valid=key_valid, **quirks)
    for name in ("out", "lse", "entropy", "group_mass", "topk_weight"):
        value, expected = getattr(got, name), getattr(ref, name)
        assert not value.isnan().any(), name
        assert torch.equal(value.isfinite(), expected.isfinite()), name
        finite = expected.isfinite()
        assert rel_rms(value[finite], expected[finite]) <= 1e-5, name
    assert torch.equal(got.topk_index, ref.topk_index)
    assert rel_rms(got.columns.col_sum, cols.col_sum) <= 1e-5
    assert torch.equal(got.columns.col_count, cols.col_count)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_column_pass_with_family_quirks_matches_reference(case, backend):
    q, k, v, key_valid, _, quirks = _quirk_inputs(case, seed=1)
    lse = attention_stats_reference(q, k, v, key_valid=key_valid, **quirks).lse
    got = column_stats(q, k, lse, key_valid=key_valid, backend=backend,
                       **{name: value for name, value in quirks.items() if name != "sinks"})
    ref = column_stats_reference(q, k, key_valid=key_valid, **quirks)
    assert rel_rms(got.col_sum, ref.col_sum) <= 1e-5
    assert torch.equal(got.col_count, ref.col_count)


@pytest.mark.parametrize("row_pass", ["torch", "torch-ops"], indirect=True)
@pytest.mark.parametrize("block", [16, 37])
def test_torch_blocks_straddling_windows_match_reference(block, row_pass):
    """Blocks whose rows have different window starts (some keys hidden for some rows only)."""
    q, k, v, key_valid, groups, quirks = _quirk_inputs(CASES[-1], seed=2)
    got = attention_stats_torch(q, k, v, scale=16**-0.5, causal=True, q_offset=0, key_valid=key_valid,
                                key_groups=groups, topk=4, columns=True, block=block, **quirks)
    ref = attention_stats_reference(q, k, v, key_valid=key_valid, key_groups=groups, topk=4, **quirks)
    for name in ("out", "lse", "entropy", "group_mass", "topk_weight"):
        assert rel_rms(getattr(got, name), getattr(ref, name)) <= 1e-5, name
    assert torch.equal(got.topk_index, ref.topk_index)


def test_rows_that_see_nothing_put_all_mass_on_the_sink():
    """A padded row with a learned sink: lse is the sink logit, entropy 0, output 0."""
    q, k, v, _, _ = make_inputs(1, 4, 2, 6, 6, 8, None, torch.float32)
    key_valid = torch.zeros(1, 6, dtype=torch.bool)
    for backend in ("torch", "triton"):
        got = attention_with_stats(q, k, v, key_valid=key_valid, sinks=SINKS, backend=backend)
        assert torch.equal(got.lse, SINKS[None, :, None].expand(1, 4, 6))
        assert torch.equal(got.entropy, torch.zeros(1, 4, 6))
        assert torch.equal(got.out, torch.zeros_like(got.out))


def test_sink_folding_is_exact_where_the_sink_dominates():
    """``with_sinks`` against fp64 on rows whose key share is 1e-7 to 1."""
    lse = torch.tensor([0.0, 0.0, 0.0, -2.0])[None, :, None]  # [B=1, Hq=4, Nq=1]
    entropy = torch.tensor([1.3, 0.2, 2.0, 0.0])[None, :, None]
    sinks = torch.tensor([16.1, 0.0, -30.0, 5.0])
    got_lse, got_entropy, keep = with_sinks(lse, entropy, sinks)
    l64, s64 = lse.double(), sinks.double()[None, :, None]
    total = torch.logaddexp(l64, s64)
    r, p_sink = (l64 - total).exp(), (s64 - total).exp()
    expected = r * entropy.double() - r * (l64 - total) - p_sink * (s64 - total)
    assert torch.allclose(got_lse.double(), total, rtol=1e-6, atol=1e-6)  # fp32 rounding of values up to ~16
    assert torch.allclose(got_entropy.double(), expected, rtol=1e-5, atol=1e-12)
    assert torch.allclose(keep.double(), r, rtol=1e-5, atol=0)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_partial_ops_with_family_quirks_match_the_map(case):
    q, k, v, key_valid, _, quirks = _quirk_inputs(case, seed=3)
    n_key = k.shape[2]
    ref = attention_stats_reference(q, k, v, key_valid=key_valid, **quirks)
    p, _, _ = attention_probs_reference(q, k, 16**-0.5, True, None, key_valid, **quirks)
    keys = torch.tensor([[n_key // 5, n_key - 2, n_key // 2]] * q.shape[0])  # valid keys (padding is left)
    shape = {name: value for name, value in quirks.items() if name != "sinks"}
    mass, _ = partial_attention(q, k, v, ref.lse, keys, **shape)
    assert torch.allclose(mass, p[..., keys[0]].sum(-1), atol=1e-6)
    offsets = (0, 1, 6)
    got = row_key_probs(q, k, ref.lse, offsets, key_valid=key_valid, **shape)
    rows = torch.arange(q.shape[2]) + n_key - q.shape[2]
    for slot, d in enumerate(offsets):
        cols = (rows - d).clamp_min(0)
        expected = torch.gather(p, -1, cols[None, None, :, None].expand(*p.shape[:3], 1))[..., 0]
        expected = torch.where((rows - d >= 0)[None, None], expected, torch.zeros_like(expected))
        assert torch.allclose(got[..., slot], expected, atol=1e-6), d


def test_bad_quirk_settings_raise_clear_errors():
    q, k, v, _, _ = make_inputs(1, 4, 2, 8, 8, 16, None, torch.float32)
    with pytest.raises(ValueError, match="window must be a positive integer"):
        attention_with_stats(q, k, v, window=0)
    with pytest.raises(ValueError, match="needs causal"):
        attention_with_stats(q, k, v, window=3, causal=False)
    with pytest.raises(ValueError, match="softcap must be a positive finite"):
        attention_with_stats(q, k, v, softcap=float("nan"))
    with pytest.raises(ValueError, match="one logit per query head"):
        attention_with_stats(q, k, v, sinks=torch.zeros(3))
