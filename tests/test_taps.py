"""Taps against independent references: eager ``output_attentions`` and o_proj's own input."""

import pytest
import torch
from conftest import eager_maps, padded_batch, tiny_bert, tiny_llama

from headlab.surgeon import HeadScale, MapBudgetError, Plan, PlanError, Taps, attach
from headlab.surgeon.attention_math import kv_heads_for, per_kv_head_matmul

pytestmark = pytest.mark.numerics  # run again in CI with one thread and narrower vector units


def o_proj_inputs(model, ids, mask, modules):
    """The input of each given o_proj/output-dense module, ``[batch, seq, hidden]``."""
    captured = {}
    handles = [
        m.register_forward_pre_hook(lambda mod, args, i=i: captured.__setitem__(i, args[0].detach()))
        for i, m in enumerate(modules)
    ]
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
    return [captured[i] for i in range(len(modules))]


@pytest.mark.parametrize("side", ["left", "right"])
def test_attention_taps_match_eager_maps(llama, side):
    ids, mask = padded_batch([10, 6, 3], 10, side)
    heads = [0, llama.config.num_attention_heads - 1]
    taps = Taps(attention={0: None, 2: heads})
    with torch.no_grad(), attach(llama, taps=taps) as session:
        llama(input_ids=ids, attention_mask=mask)
    eager = eager_maps(llama, input_ids=ids, attention_mask=mask)
    rows = mask.bool()
    full = session.recording.attention_map(0)
    assert full.shape == eager[0].shape and full.dtype == torch.float32
    assert torch.allclose(full.permute(0, 2, 1, 3)[rows], eager[0].permute(0, 2, 1, 3)[rows], atol=1e-6)
    subset = session.recording.attention_map(2)
    assert session.recording.attention_heads[2] == tuple(heads)
    assert torch.allclose(subset.permute(0, 2, 1, 3)[rows], eager[2][:, heads].permute(0, 2, 1, 3)[rows], atol=1e-6)
    # padded keys get no mass, valid rows sum to one
    assert torch.all(full.sum(-1).permute(0, 2, 1)[rows].sub(1).abs() < 1e-5)
    valid_row_hidden_key = (mask.bool()[:, None, :, None] & ~mask.bool()[:, None, None, :]).expand_as(full)
    assert valid_row_hidden_key.any() and torch.all(full[valid_row_hidden_key] == 0)


def test_attention_taps_match_eager_maps_encoder():
    model = tiny_bert()
    ids, mask = padded_batch([9, 4], 9, "right")
    with torch.no_grad(), attach(model, taps=Taps(attention={1: None})) as session:
        model(input_ids=ids, attention_mask=mask)
    eager = eager_maps(model, input_ids=ids, attention_mask=mask)
    rows = mask.bool()
    got = session.recording.attention_map(1).permute(0, 2, 1, 3)[rows]
    assert torch.allclose(got, eager[1].permute(0, 2, 1, 3)[rows], atol=1e-6)


def test_head_output_taps_are_o_proj_inputs(llama):
    ids, mask = padded_batch([8, 5], 8, "left")
    n_heads, head_dim = llama.config.num_attention_heads, llama.config.head_dim
    plan = Plan([HeadScale(1, (0,), 0.5)])
    with torch.no_grad(), attach(llama, plan, Taps(head_outputs=[0, 1])) as session:
        llama(input_ids=ids, attention_mask=mask)
        expected = o_proj_inputs(llama, ids, mask, [layer.self_attn.o_proj for layer in llama.model.layers[:2]])
    for layer in (0, 1):
        z = session.recording.head_output(layer, call=0)
        assert z.shape == (2, 8, n_heads, head_dim)
        assert torch.equal(z.reshape(2, 8, -1), expected[layer])


@pytest.mark.parametrize("heads", [range(6), [1, 4, 5], [5, 0]])
def test_per_kv_head_matmul_equals_one_copy_of_the_kv_head_per_query_head(heads):
    a = torch.randn(2, len(heads), 3, 8, dtype=torch.float64)
    b = torch.randn(2, 2, 8, 5, dtype=torch.float64)  # 2 KV heads, 3 query heads each
    expected = torch.stack([a[:, i] @ b[:, h // 3] for i, h in enumerate(heads)], dim=1)
    torch.testing.assert_close(per_kv_head_matmul(a, b, heads, 3), expected, rtol=1e-12, atol=1e-12)


def test_gqa_mapping_query_head_reads_kv_head_h_div_g():
    assert kv_heads_for(range(9), 3) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert kv_heads_for(range(5), 1) == [0, 1, 2, 3, 4]  # multi-head: group size 1
    assert kv_heads_for(range(5), 5) == [0, 0, 0, 0, 0]  # multi-query: one KV head
    model = tiny_llama("gqa")
    ids, mask = padded_batch([7], 7, "left")
    eager = eager_maps(model, input_ids=ids, attention_mask=mask)
    with torch.no_grad(), attach(model, taps=Taps(attention={1: [4, 7]})) as session:
        model(input_ids=ids, attention_mask=mask)
    got = session.recording.attention_map(1)
    assert torch.allclose(got, eager[1][:, [4, 7]], atol=1e-6)
    assert not torch.allclose(got[:, 0], eager[1][:, 7], atol=1e-3)


def test_taps_during_cached_generation_record_each_decode_row():
    model = tiny_llama("mqa")
    ids, mask = padded_batch([6, 4], 6, "left")
    with torch.no_grad(), attach(model, taps=Taps(attention={2: None}, head_outputs=[2])) as session:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    maps = session.recording.attention[2]
    assert [tuple(m.shape[-2:]) for m in maps] == [(6, 6), (1, 7), (1, 8)]
    # the decode rows equal the last rows of an uncached pass over the same tokens
    full_mask = torch.cat([mask, torch.ones(2, 2, dtype=mask.dtype)], dim=1)
    eager = eager_maps(model, input_ids=out[:, :8], attention_mask=full_mask)
    assert torch.allclose(maps[2][:, :, 0], eager[2][:, :, -1], atol=1e-6)
    assert session.recording.head_output(2).shape[1] == 8


def test_map_budget_is_enforced():
    model = tiny_llama("mha")
    ids, mask = padded_batch([12], 12, "left")
    taps = Taps(attention={0: None, 1: None}, map_budget_bytes=4 * 5 * 12 * 12 * 1.5)
    with pytest.raises(MapBudgetError, match="budget"):
        with torch.no_grad(), attach(model, taps=taps):
            model(input_ids=ids, attention_mask=mask)


def test_taps_out_of_range_raise_clear_errors():
    model = tiny_llama("gqa")
    with pytest.raises(PlanError, match="head"):
        with attach(model, taps=Taps(attention={0: [9]})):
            pass
    with pytest.raises(PlanError, match="layer 3"):
        with attach(model, taps=Taps(head_outputs=[3])):
            pass
