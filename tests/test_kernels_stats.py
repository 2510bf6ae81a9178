"""Attention-statistics kernels (torch and Triton backends) against the naive reference.

Triton runs in its interpreter on the CPU (TRITON_INTERPRET=1, set in conftest); its outputs are
pre-filled with NaN / a sentinel so every element must be written. The torch backend runs twice:
``torch`` with the native row pass (which must have been built here) and ``torch-ops`` with it
switched off, the fallback for machines without a C compiler.
"""

import pytest
import torch

from headlab.kernels import attention_with_stats, column_stats, native
from headlab.kernels.reference import attention_probs_reference, attention_stats_reference, column_stats_reference
from headlab.kernels.attention_stats_torch import attention_stats_torch
from headlab.kernels._launch import UNWRITTEN_INDEX

pytestmark = pytest.mark.numerics  # run again in CI with one thread and narrower vector units

TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3}

# (batch, q heads, kv heads, query rows, keys, head dim, causal, padding, dtype, topk)
CASES = [
    (1, 3, 1, 63, 63, 64, True, None, torch.float32, 8),
    (1, 9, 1, 100, 100, 60, True, "left", torch.float32, 4),
    (2, 2, 2, 200, 200, 64, False, "right", torch.float32, 8),
    (2, 3, 3, 1, 150, 60, True, "left", torch.float32, 8),
    (1, 3, 1, 5, 130, 64, True, None, torch.float16, 8),
    (1, 2, 2, 100, 100, 60, False, None, torch.float16, 1),
    (2, 3, 1, 63, 63, 64, True, "left", torch.float16, 8),
]


def rel_rms(x, y):
    """Relative RMS error, passing outright when the max error is ≤ 1e-6."""
    x, y = x.double(), y.double()
    if (x - y).abs().max() <= 1e-6:
        return 0.0
    return ((x - y).pow(2).mean().sqrt() / (y.pow(2).mean().sqrt() + 1e-8)).item()


@pytest.fixture
def row_pass(request, monkeypatch):
    """Parametrised by backend name: ``torch-ops`` switches the native row pass off and returns
    ``"torch"``; ``torch`` insists that the native pass is in use."""
    backend = request.param
    if backend == "torch-ops":
        monkeypatch.setattr(native, "available", lambda: False)
        return "torch"
    if backend == "torch":
        assert native.available(), "the native row pass did not build (is a C compiler installed?)"
    return backend


def make_inputs(batch, heads, kv_heads, n_query, n_key, dim, padding, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, n_query, dim, generator=gen).to(dtype)
    k = torch.randn(batch, kv_heads, n_key, dim, generator=gen).to(dtype)
    v = torch.randn(batch, kv_heads, n_key, dim, generator=gen).to(dtype)
    key_valid = None
    if padding:
        key_valid = torch.ones(batch, n_key, dtype=torch.bool)
        cut = slice(0, n_key // 5) if padding == "left" else slice(n_key - n_key // 5, n_key)
        key_valid[-1, cut] = False
    groups = torch.zeros(batch, 2, n_key, dtype=torch.bool)
    groups[:, 0, 0] = True  # the first token, as a sink
    groups[:, 1, n_key // 3 : n_key // 3 + 9] = True  # a span
    return q, k, v, key_valid, groups


@pytest.mark.parametrize("row_pass", ["torch", "torch-ops", "triton"], indirect=True)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}H{c[1]}kv{c[2]}q{c[3]}k{c[4]}d{c[5]}{'c' if c[6] else 'b'}{c[7] or ''}{str(c[8])[-2:]}")
def test_statistics_match_reference(case, row_pass):
    backend = row_pass
    batch, heads, kv_heads, n_query, n_key, dim, causal, padding, dtype, topk = case
    q, k, v, key_valid, groups = make_inputs(batch, heads, kv_heads, n_query, n_key, dim, padding, dtype)
    got = attention_with_stats(q, k, v, causal=causal, key_valid=key_valid, key_groups=groups, topk=topk, backend=backend)
    ref = attention_stats_reference(q, k, v, causal=causal, key_valid=key_valid, key_groups=groups, topk=topk)
    tol = TOLERANCE[dtype]
    for name in ("out", "entropy", "group_mass", "topk_weight"):
        value = getattr(got, name)
        assert not value.isnan().any(), f"{name} has unwritten or NaN elements"
        assert rel_rms(value, getattr(ref, name)) <= tol, name
    finite = ref.lse.isfinite()
    assert torch.equal(got.lse.isfinite(), finite)
    assert rel_rms(got.lse[finite], ref.lse[finite]) <= tol
    assert (got.topk_index != UNWRITTEN_INDEX).all()
    if dtype == torch.float32:
        assert torch.equal(got.topk_index, ref.topk_index)
    else:  # near-ties may swap in half precision: the chosen keys must carry the reference weights
        p, _, _ = attention_probs_reference(q, k, dim**-0.5, causal, None, key_valid)
        found = got.topk_index >= 0
        chosen = torch.gather(p, -1, got.topk_index.clamp_min(0))
        assert torch.equal(found, ref.topk_index >= 0)
        assert rel_rms(chosen[found], ref.topk_weight[found]) <= tol


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[3], CASES[6]], ids=["gqa9-left", "bidir-right", "decode", "fp16"])
def test_column_sums_match_reference(case, backend):
    batch, heads, kv_heads, n_query, n_key, dim, causal, padding, dtype, _ = case
    q, k, v, key_valid, _ = make_inputs(batch, heads, kv_heads, n_query, n_key, dim, padding, dtype, seed=1)
    query_valid = torch.ones(batch, n_query, dtype=torch.bool)
    query_valid[0, : n_query // 4] = False
    lse = attention_stats_reference(q, k, v, causal=causal, key_valid=key_valid).lse
    got = column_stats(q, k, lse, causal=causal, key_valid=key_valid, query_valid=query_valid, backend=backend)
    ref = column_stats_reference(q, k, causal=causal, key_valid=key_valid, query_valid=query_valid)
    assert not got.col_sum.isnan().any()
    assert rel_rms(got.col_sum, ref.col_sum) <= TOLERANCE[dtype]
    assert torch.equal(got.col_count, ref.col_count)
    total_rows = (query_valid[:, None, :] & lse.isfinite()).sum(-1).double()
    assert torch.allclose(got.col_sum.double().sum(-1), total_rows, atol=1e-3)


@pytest.mark.parametrize("row_pass", ["torch", "torch-ops"], indirect=True)
@pytest.mark.parametrize("block", [16, 37])
@pytest.mark.parametrize("case", CASES[:4], ids=["mha", "gqa9-left", "bidir-right", "decode"])
def test_torch_blocks_and_fused_columns_match_reference(case, block, row_pass):
    """Many query blocks (causal key slicing, empty rows inside a block) and the column sums
    taken in the same pass agree with the reference."""
    batch, heads, kv_heads, n_query, n_key, dim, causal, padding, dtype, topk = case
    q, k, v, key_valid, groups = make_inputs(batch, heads, kv_heads, n_query, n_key, dim, padding, dtype, seed=2)
    query_valid = key_valid[:, n_key - n_query :] if key_valid is not None else None
    got = attention_stats_torch(q, k, v, scale=dim**-0.5, causal=causal, q_offset=n_key - n_query,
                                key_valid=key_valid, key_groups=groups, topk=topk, columns=True,
                                query_valid=query_valid, block=block)
    ref = attention_stats_reference(q, k, v, causal=causal, key_valid=key_valid, key_groups=groups, topk=topk)
    ref_cols = column_stats_reference(q, k, causal=causal, key_valid=key_valid, query_valid=query_valid)
    for name in ("out", "entropy", "group_mass", "topk_weight"):
        assert rel_rms(getattr(got, name), getattr(ref, name)) <= 1e-5, name
    assert torch.equal(got.topk_index, ref.topk_index)
    assert torch.equal(got.lse.isfinite(), ref.lse.isfinite())
    assert rel_rms(got.columns.col_sum, ref_cols.col_sum) <= 1e-5
    assert torch.equal(got.columns.col_count, ref_cols.col_count)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_columns_flag_of_the_public_op(backend):
    q, k, v, key_valid, _ = make_inputs(2, 3, 1, 40, 40, 16, "left", torch.float32, seed=3)
    got = attention_with_stats(q, k, v, key_valid=key_valid, columns=True, query_valid=key_valid, backend=backend)
    ref = column_stats_reference(q, k, key_valid=key_valid, query_valid=key_valid)
    assert rel_rms(got.columns.col_sum, ref.col_sum) <= 1e-5
    assert torch.equal(got.columns.col_count, ref.col_count)
    assert attention_with_stats(q, k, v, backend=backend).columns is None


def test_reference_identities():
    """Independent oracles: entropy = LSE - scale·(q · attn(V := k)); sink mass = attention with V := 1[sink]."""
    q, k, v, _, groups = make_inputs(1, 3, 1, 40, 40, 16, None, torch.float64)
    scale = 16**-0.5
    ref = attention_stats_reference(q, k, v, scale=scale, causal=True, key_groups=groups)
    attn_k = attention_stats_reference(q, k, k, scale=scale, causal=True).out
    assert torch.allclose(ref.entropy.double(), ref.lse.double() - scale * (q * attn_k).sum(-1), atol=1e-5)
    indicator = groups[:, :1, :, None].double().expand(1, 1, 40, 16)
    sink = attention_stats_reference(q, k, indicator, scale=scale, causal=True).out[..., 0]
    assert torch.allclose(ref.group_mass[..., 0].double(), sink, atol=1e-6)


def test_bad_arguments_raise_clear_errors():
    q, k, v, _, _ = make_inputs(1, 3, 2, 8, 8, 16, None, torch.float32)
    with pytest.raises(ValueError, match="multiple"):
        attention_with_stats(q, k, v)
    q, k, v, _, _ = make_inputs(1, 4, 2, 8, 8, 16, None, torch.float32)
    with pytest.raises(ValueError, match="topk"):
        attention_with_stats(q, k, v, topk=9)
    with pytest.raises(ValueError, match="backend"):
        attention_with_stats(q, k, v, backend="cuda")
    with pytest.raises(ValueError, match="key_valid"):
        attention_with_stats(q, k, v, key_valid=torch.ones(1, 7, dtype=torch.bool))


def test_torch_path_gives_the_same_results_on_one_or_two_threads_and_restores_the_setting():
    """Blocks are dealt to worker threads: the rows each writes, and the thread setting after the
    call, must not depend on that."""
    q, k, v, key_valid, groups = make_inputs(2, 3, 1, 90, 90, 64, "left", torch.float32)
    before = torch.get_num_threads()
    runs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            runs.append(attention_stats_torch(q, k, v, scale=0.125, causal=True, q_offset=0, key_valid=key_valid,
                                              key_groups=groups, topk=4, columns=True, block=16))
            assert torch.get_num_threads() == threads
        finally:
            torch.set_num_threads(before)
    one, two = runs
    for name in ("out", "lse", "entropy", "group_mass", "topk_index", "topk_weight"):
        assert torch.equal(getattr(one, name), getattr(two, name)), name
    assert torch.allclose(one.columns.col_sum, two.columns.col_sum, atol=1e-6)
