"""Tests on the bundled SmolLM2-135M (decoder, GQA) and all-MiniLM-L6-v2 (encoder); Gemma 3 270M
(sliding windows past 512 tokens) has its own module."""

import pytest
import torch
from bounds import logit_error, probability_tolerance
from conftest import eager_recorder, frozen_state

from headlab.surgeon import HeadScale, Plan, Taps, attach

pytestmark = [pytest.mark.real_model, pytest.mark.numerics]

PROMPTS = ["The capital of France is", "Attention heads in a transformer read from earlier tokens and"]


def assert_maps_match_eager(session, records, layers_heads, valid):
    """The session's maps equal the eager maps of the same forward within the fp32 error bound."""
    for layer, heads in layers_heads:
        q, k, scaling, kwargs, weights = records[layer]
        tolerance = probability_tolerance(logit_error(q, k, scaling, kwargs.get("softcap")), k.shape[2])
        got = session.recording.attention_map(layer).permute(0, 2, 1, 3)[valid]
        want = weights[:, list(heads)].permute(0, 2, 1, 3)[valid]
        assert (got - want).abs().max() <= tolerance, (layer, float((got - want).abs().max()), tolerance)


def test_smollm2_noop_logits_taps_and_generation(smollm2):
    model, tokenizer = smollm2
    tokenizer.padding_side = "left"
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    layers_heads = ((0, tuple(range(9))), (17, (3, 8)), (29, tuple(range(9))))
    taps = Taps(attention=dict(layers_heads))
    with torch.no_grad():
        before = model(**batch).logits
        with attach(model, taps=taps):
            during = model(**batch).logits
    valid = batch.attention_mask.bool()
    assert torch.equal(before[valid], during[valid])
    with torch.no_grad(), eager_recorder(model) as records, attach(model, taps=taps) as session:
        model(**batch)
    assert_maps_match_eager(session, records, layers_heads, valid)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id or 0)
    with torch.no_grad():
        plain = model.generate(**batch, **kwargs)
        with attach(model):
            hooked = model.generate(**batch, **kwargs)
    assert torch.equal(plain, hooked)


def test_smollm2_ablation_changes_the_prediction_only_where_planned(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    plan = Plan([HeadScale(layer, tuple(range(9)), 0.0) for layer in range(2, 28)])
    with torch.no_grad():
        clean = model(input_ids=ids).logits[0, -1]
        with attach(model, plan):
            ablated = model(input_ids=ids).logits[0, -1]
    assert tokenizer.decode(clean.argmax()).strip() == "Paris"
    assert (clean - ablated).abs().max() > 1.0


def test_minilm_noop_and_taps(minilm):
    model, tokenizer = minilm
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        before = model(**batch).last_hidden_state
        with attach(model, taps=Taps(attention={3: None}, head_outputs=[3])) as session:
            during = model(**batch).last_hidden_state
    valid = batch.attention_mask.bool()
    assert torch.equal(before[valid], during[valid])
    assert session.recording.head_output(3).shape == (2, batch.input_ids.shape[1], 12, 32)
    with torch.no_grad(), eager_recorder(model) as records, attach(model, taps=Taps(attention={3: None})) as session:
        model(**batch)
    assert_maps_match_eager(session, records, ((3, tuple(range(12))),), valid)


def test_smollm2_sink_dimension_and_var_on_a_document_span(smollm2):
    """SmolLM2's first token carries a massive activation on dimension 507 (≈650 vs a median of
    ≈2, below the published 1000× ratio); with a lower ratio VAR's detection finds it, the first
    token becomes a sink token, and VAR keeps every row summing to one."""
    from headlab.surgeon import Redistribute, Request, detect_sink_dimensions

    model, tokenizer = smollm2
    texts = ["Notes: the library stores records in pages. Question: where are records stored? Answer:",
             "A short document about rivers and lakes, followed by a question about the lakes."]
    inputs = [tokenizer(t, return_tensors="pt").input_ids for t in texts]
    assert detect_sink_dimensions(model, inputs) == []  # published thresholds: nothing in this model
    dims = detect_sink_dimensions(model, inputs, abs_min=20, ratio_min=100)
    assert dims == [507]
    ids = inputs[0]
    plan = Plan([Redistribute(layer, tuple(range(9)), sink_dims=dims) for layer in (4, 12)])
    with torch.no_grad(), attach(model, plan, Taps(attention={4: None, 12: None}), request=Request(span=(1, 12))) as s:
        model(input_ids=ids)
    for layer in (4, 12):
        assert frozen_state(s, "redistribute", layer)[0, 0], "the first token is a sink token"
        sums = s.recording.attention_map(layer).sum(-1)
        assert torch.allclose(sums, torch.ones_like(sums), atol=1e-5)


@pytest.mark.real_model
def test_smollm2_previous_token_scores_rank_like_transformerlens_head_detector(smollm2):
    """headlab's previous-token score and TransformerLens' detect_head on a TransformerBridge of the
    same weights order every head the same way (the full comparison, with induction, is
    examples/crosscheck_transformerlens.py)."""
    from scipy.stats import spearmanr
    from transformer_lens.head_detector import detect_head
    from transformer_lens.model_bridge import TransformerBridge

    from headlab.probes import pattern_scores, record_attention
    from headlab.surgeon import model_directory

    model, tokenizer = smollm2
    bridge = TransformerBridge.boot_transformers(str(model_directory("smollm2-135m")), device="cpu")
    bridge.cfg.default_prepend_bos = False
    text = "The parser reads each line, splits it on commas and returns the fields as a list of strings."
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert torch.equal(bridge.to_tokens(text).cpu(), ids)
    ours = pattern_scores(record_attention(model, ids).maps, causal=True)["previous_token"]
    theirs = detect_head(bridge, text, "previous_token_head")
    assert spearmanr(ours.flatten().numpy(), theirs.flatten().numpy()).statistic > 0.99
