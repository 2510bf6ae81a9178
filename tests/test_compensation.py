"""RazorAttention's compensation token on streaming heads, against a reference written row by row
in the family's eager attention: uncached, and in cached decoding on the streaming cache (which
keeps the dropped keys' sum at one position). Tolerance: the model's own default-vs-eager logit
difference, times 10, as in the family matrix's cached checks."""

import math

import pytest
import torch
from families import family_model, patched_eager
from transformers import DynamicCache

from headlab.surgeon import Plan, Stream, attach, model_shape
from headlab.core.errors import PlanError
from headlab.surgeon.streaming.cache import StreamingLayer, streaming_cache
from headlab.surgeon.kv_cache import cache_bytes

pytestmark = pytest.mark.numerics  # run again in CI with one thread and narrower vector units

LAYER, SINKS, WINDOW, N_TOKENS, STEPS = 3, 2, 4, 19, 5


def _inputs():
    ids = torch.randint(3, 97, (2, N_TOKENS), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, N_TOKENS, dtype=torch.long)
    mask[1, :5] = 0  # left padding: the second row's sinks are positions 5 and 6
    return ids, mask


def compensated_in_eager(model, heads, key_mask):
    """The family's eager attention with ``heads`` of ``LAYER`` recomputed one row at a time: the
    softmax over the row's sinks and window plus ``n`` copies of the mean key of the ``n`` keys it
    skips, the output the matching mix of values and mean value."""
    group = model_shape(model).group_size

    def wrap(original):
        def attention(attn, query, key, value, attention_mask, scaling=None, softcap=None, **kwargs):
            out, weights = original(attn, query, key, value, attention_mask, scaling=scaling, softcap=softcap, **kwargs)
            if attn.layer_idx != LAYER:
                return out, weights
            out = out.clone()
            valid = key_mask.bool()
            for b in range(query.shape[0]):
                positions = valid[b].nonzero()[:, 0].tolist()
                sinks = positions[:SINKS]
                for t in positions:
                    window = kwargs.get("sliding_window")  # the model's own window on this layer
                    seen = [j for j in positions if j <= t and (window is None or t - j < window)]
                    kept = [j for j in seen if j in sinks or j > t - WINDOW]
                    skipped = [j for j in seen if j not in kept]
                    for h in heads:
                        q, k, v = query[b, h].double(), key[b, h // group].double(), value[b, h // group].double()
                        def logit(kx):
                            s = float(q[t] @ kx) * scaling
                            return s if softcap is None else softcap * math.tanh(s / softcap)

                        logits = [logit(k[j]) for j in kept]
                        values = [v[j] for j in kept]
                        if skipped:
                            logits.append(logit(k[skipped].mean(0)) + math.log(len(skipped)))
                            values.append(v[skipped].mean(0))
                        if getattr(attn, "sinks", None) is not None:  # a learned sink: a key-less column
                            logits.append(float(attn.sinks[h]))
                            values.append(torch.zeros_like(v[0]))
                        p = torch.softmax(torch.tensor(logits, dtype=torch.float64), 0)
                        out[b, t, h] = sum(w * x for w, x in zip(p, values)).to(out.dtype)
            return out, weights
        return attention

    return patched_eager(model, wrap)


def _generate(model, ids, mask, cache):
    with torch.no_grad():
        run = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=STEPS,
                             min_new_tokens=STEPS, do_sample=False, pad_token_id=0, output_logits=True,
                             return_dict_in_generate=True)
    return run.sequences, torch.stack(run.logits, 1)


def _recomputed(model, sequences, mask):
    full_mask = torch.cat([mask, torch.ones(2, STEPS - 1, dtype=mask.dtype)], 1)
    positions = (full_mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        return model(input_ids=sequences[:, :-1], attention_mask=full_mask,
                     position_ids=positions).logits[:, N_TOKENS - 1:], full_mask


@pytest.mark.parametrize("family", ["gemma", "qwen2", "mistral", "gemma2", "gpt_oss"])
# MHA, MQA, a model window wider than the stream's (every layer), soft-cap, learned sinks
def test_compensated_streaming_decodes_as_the_row_by_row_reference(family):
    model = family_model(family)
    shape = model_shape(model)
    heads = tuple(range(shape.group_size))  # KV head 0
    plan = Plan([Stream(LAYER, heads, sinks=SINKS, window=WINDOW, compensate=True)])
    ids, mask = _inputs()
    with attach(model, plan):
        sequences, plain = _generate(model, ids, mask, DynamicCache(config=model.config))
        cache = streaming_cache(model, plan, mask)
        cached_sequences, cached = _generate(model, ids, mask, cache)
    full_mask = torch.cat([mask, torch.ones(2, STEPS - 1, dtype=mask.dtype)], 1)
    with compensated_in_eager(model, heads, full_mask):
        reference, _ = _recomputed(model, sequences, mask)
    own_sequences, own = _generate(model, ids, mask, None)
    with patched_eager(model, lambda original: original):
        own_recomputed, _ = _recomputed(model, own_sequences, mask)
    noise = float((own - own_recomputed).abs().max())
    tolerance = 10 * noise + 1e-5
    assert (plain - reference).abs().max() <= tolerance, (noise, float((plain - reference).abs().max()))
    assert torch.equal(cached_sequences, sequences), "cached decoding gives the recomputation's tokens"
    assert (cached - plain).abs().max() <= tolerance
    with attach(model, Plan([Stream(LAYER, heads, sinks=SINKS, window=WINDOW)])):
        _, uncompensated = _generate(model, ids, mask, None)
    assert (plain - uncompensated).abs().max() > 1e-3, "the compensation token must change the logits"
    layer = cache.layers[LAYER]
    if not isinstance(layer, StreamingLayer):  # a sliding layer keeps transformers' own (bounded) cache
        assert family == "mistral"
        return
    assert layer.dropped is not None
    positions = N_TOKENS + STEPS - 1
    kept = 5 + SINKS + WINDOW + 1  # up to the padded row's last sink, the window and the compensation slot
    entry = 2 * 2 * shape.head_dim * 4  # keys and values of 2 rows in fp32, per position of one KV head
    with attach(model, Plan()):
        full = DynamicCache(config=model.config)
        _generate(model, ids, mask, full)
    assert cache_bytes(full) - cache_bytes(cache) == (positions - kept) * entry


def test_a_compensation_token_refuses_a_post_softmax_edit_on_its_heads():
    from headlab.surgeon import Calibrate

    model = family_model("mistral")
    ids, mask = _inputs()
    plan = Plan([Stream(LAYER, (0, 1, 2), sinks=SINKS, window=WINDOW, compensate=True), Calibrate(LAYER, (1,))])
    with attach(model, plan), pytest.raises(PlanError, match="compensation token"), torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
