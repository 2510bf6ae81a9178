"""Statistics recorded through the hook equal those computed from eager attention maps."""

import pytest
import torch
from conftest import eager_maps, padded_batch, tiny_bert, tiny_llama

from headlab.surgeon import Taps, attach
from headlab.surgeon.attention_math import MaskStructureError, decompose_mask

pytestmark = pytest.mark.numerics  # run again in CI with one thread and narrower vector units


def check_against_maps(stats, columns, maps, groups, query_valid, topk):
    """Compare one layer's recorded statistics with a full eager map ``[B, H, Nq, Nk]`` on valid rows."""
    rows = query_valid[:, None, :].expand(maps.shape[:3])
    plogp = torch.where(maps > 0, maps * maps.clamp_min(1e-30).log(), torch.zeros_like(maps))
    assert torch.allclose(stats.entropy[rows], -plogp.sum(-1)[rows], atol=2e-4)
    mass = torch.einsum("bhqk,bgk->bhqg", maps, groups.float())
    assert torch.allclose(stats.group_mass[rows], mass[rows], atol=1e-5)
    top = torch.topk(maps, topk, dim=-1)
    assert torch.allclose(stats.topk_weight[rows], top.values[rows], atol=1e-5)
    seen = rows[..., None] & (top.values > 0)  # rows with fewer visible keys than k report -1 beyond them
    assert torch.equal(stats.topk_index[seen], top.indices[seen])
    assert (stats.topk_index[rows[..., None] & (top.values == 0)] == -1).all()
    received = torch.where(rows[..., None], maps, torch.zeros_like(maps)).sum(2)
    assert torch.allclose(columns.col_sum, received, atol=1e-4)


@pytest.mark.parametrize("model_factory", [lambda: tiny_llama("gqa"), tiny_bert], ids=["llama-gqa", "bert"])
def test_stats_tap_matches_eager_maps_on_a_padded_batch(model_factory):
    model = model_factory()
    side = "left" if hasattr(model, "lm_head") else "right"
    ids, mask = padded_batch([14, 9, 5], 14, side)
    groups = torch.zeros(3, 2, 14, dtype=torch.bool)
    groups[:, 0, 0] = True
    groups[:, 1, 6:9] = True
    heads = [0, 3, 4]
    taps = Taps(stats={1: heads, 2: None}, stats_key_groups=groups, stats_topk=3, stats_columns=True)
    with torch.no_grad(), attach(model, taps=taps) as session:
        model(input_ids=ids, attention_mask=mask)
    maps = eager_maps(model, input_ids=ids, attention_mask=mask)
    valid = mask.bool()
    check_against_maps(session.recording.stats[1][0], session.recording.columns[1][0], maps[1][:, heads], groups, valid, 3)
    check_against_maps(session.recording.stats[2][0], session.recording.columns[2][0], maps[2], groups, valid, 3)


def test_key_groups_given_per_layer_are_read_as_each_layer_runs():
    model = tiny_llama("gqa")
    ids, mask = padded_batch([14, 9], 14, "left")
    early, late = torch.zeros(2, 1, 14, dtype=torch.bool), torch.zeros(2, 2, 14, dtype=torch.bool)
    early[:, 0, 5:7] = True
    late[:, 0, -1] = late[:, 1, 8:] = True
    groups = {}  # filled by a hook before each layer, as a caller that finds its groups on the way does
    hooks = [model.model.layers[layer].register_forward_pre_hook(lambda *_, layer=layer, g=g: groups.update({layer: g}))
             for layer, g in ((0, early), (2, late))]
    try:
        with torch.no_grad(), attach(model, taps=Taps(stats={0: None, 1: None, 2: None}, stats_key_groups=groups,
                                                       stats_topk=3, stats_columns=True)) as session:
            model(input_ids=ids, attention_mask=mask)
    finally:
        for hook in hooks:
            hook.remove()
    maps = eager_maps(model, input_ids=ids, attention_mask=mask)
    valid = mask.bool()
    check_against_maps(session.recording.stats[0][0], session.recording.columns[0][0], maps[0], early, valid, 3)
    check_against_maps(session.recording.stats[2][0], session.recording.columns[2][0], maps[2], late, valid, 3)
    assert session.recording.stats[1][0].group_mass is None  # a layer the mapping leaves out has no groups


def test_layers_whose_every_head_is_tapped_keep_the_models_outputs():
    """Recording statistics of every head of every layer leaves the logits those of the untouched
    model bit for bit, prefill and cached decode."""
    model = tiny_llama("gqa")
    ids, mask = padded_batch([12, 7], 12, "left")
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        plain_tokens = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        taps = Taps(stats={layer: None for layer in range(3)}, stats_topk=2, stats_columns=True)
        with attach(model, taps=taps) as session:
            tapped = model(input_ids=ids, attention_mask=mask).logits
            tapped_tokens = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(tapped, plain)
    assert torch.equal(tapped_tokens, plain_tokens)
    assert len(session.recording.stats[0]) == 1 + 1 + 3  # forward, generate's prefill, 3 decode steps


def test_stats_taps_with_gradients_keep_the_models_gradients():
    """The statistics op is forward only: with autograd on, the hook must not hand its output to
    the model, so gradients through a tapped layer equal the untapped ones."""
    model = tiny_llama("gqa")
    ids, mask = padded_batch([10], 10, "left")
    model.zero_grad()
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    expected = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
    model.zero_grad()
    with attach(model, taps=Taps(stats={layer: None for layer in range(3)})) as session:
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    assert len(session.recording.stats[0]) == 1
    assert torch.allclose(model.model.layers[0].self_attn.q_proj.weight.grad, expected, atol=1e-6)
    assert expected.abs().max() > 0


def test_mask_decomposition_refuses_other_structures():
    causal = torch.tril(torch.ones(6, 6, dtype=torch.bool))[None, None]
    key_valid, query_valid, offset = decompose_mask(causal, 6, 6, True, "cpu")
    assert key_valid.all() and query_valid.all() and offset == 0
    window = causal & ~torch.tril(torch.ones(6, 6, dtype=torch.bool), diagonal=-3)[None, None]
    with pytest.raises(MaskStructureError, match="sliding window"):
        decompose_mask(window, 6, 6, True, "cpu")


def test_mask_decomposition_checks_every_row_of_a_long_mask():
    """The structure check runs in row chunks; a defect past the first chunk is still found."""
    n = 1100
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool))[None, None]
    key_valid, query_valid, offset = decompose_mask(causal, n, n, True, "cpu")
    assert key_valid.all() and query_valid.all() and offset == 0
    broken = causal.clone()
    broken[..., 1050, 3] = False
    with pytest.raises(MaskStructureError):
        decompose_mask(broken, n, n, True, "cpu")
    with pytest.raises(MaskStructureError):  # the same defect in an additive float mask
        decompose_mask(torch.zeros(1, 1, n, n).masked_fill(~broken, torch.finfo(torch.float32).min), n, n, True, "cpu")


@pytest.mark.real_model
def test_stats_tap_on_smollm2_matches_eager_maps(smollm2):
    model, tokenizer = smollm2
    tokenizer.padding_side = "left"
    texts = ["Attention sinks appear in most layers of a language model.", "Short one."]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    n = batch.input_ids.shape[1]
    groups = torch.zeros(2, 1, n, dtype=torch.bool)
    groups[:, 0, : n // 2] = True
    taps = Taps(stats={0: None, 15: None, 29: [2, 8]}, stats_key_groups=groups, stats_topk=4, stats_columns=True)
    with torch.no_grad(), attach(model, taps=taps) as session:
        model(**batch)
    maps = eager_maps(model, **batch)
    valid = batch.attention_mask.bool()
    for layer, heads in ((0, list(range(9))), (15, list(range(9))), (29, [2, 8])):
        check_against_maps(session.recording.stats[layer][0], session.recording.columns[layer][0],
                           maps[layer][:, heads], groups, valid, 4)
