"""The family matrix: every decoder family of ``families.py`` either works on every check or is
refused with one clear line. References are the family's own code: its untouched forward, its
eager attention (called in the same forward, so both see the same ``q, k``), and its output
projection's input. Tolerances come from :mod:`bounds`.
"""

import pytest
import torch
from bounds import U, entropy_tolerance, logit_error, probability_tolerance
from conftest import eager_recorder
from families import (FAMILIES, REFUSED, SUPPORTED, VOCAB, BY_NAME, family_model, family_table, output_projection,
                      patched_eager, readme_table)

from headlab.sae.activations import head_outputs
from headlab.surgeon import (Calibrate, HeadScale, Plan, Request, Steer, Stream, Taps, Uniform, UnsupportedModelError,
                             attach, model_shape)
from headlab.core.errors import PlanError
from headlab.surgeon.sites import attention_modules

pytestmark = pytest.mark.numerics  # run again in CI with one thread and narrower vector units

N_TOKENS = 23
CALIBRATED_LAYER = 2  # a sliding-window layer in every family that has them
STATS_HEADS = (0, 2, 4)  # a subset, so that the model's own attention also runs (and returns its maps)


def batch():
    """Two rows of 23 tokens, the second left-padded to 17."""
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(3, VOCAB, (2, N_TOKENS), generator=gen)
    mask = torch.ones(2, N_TOKENS, dtype=torch.long)
    mask[1, :6] = 0
    return ids, mask


def logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def test_the_readme_table_is_generated_from_the_matrix():
    assert readme_table() == family_table(), "run `python tests/families.py` to regenerate the README's table"


@pytest.mark.parametrize("name", SUPPORTED)
def test_empty_plan_is_exact(name):
    model = family_model(name)
    ids, mask = batch()
    before = logits(model, ids, mask)
    with attach(model):
        during = logits(model, ids, mask)
    valid = mask.bool()
    assert torch.equal(before[valid], during[valid])


@pytest.mark.parametrize("name", SUPPORTED)
def test_cached_generate_is_unchanged_by_the_hook(name):
    model = family_model(name)
    ids, mask = batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        plain = model.generate(ids, **kwargs)
        with attach(model):
            hooked = model.generate(ids, **kwargs)
    assert torch.equal(plain, hooked)


@pytest.mark.parametrize("name", SUPPORTED)
def test_map_taps_equal_the_familys_eager_maps(name):
    model = family_model(name)
    ids, mask = batch()
    shape = model_shape(model)
    with eager_recorder(model) as records, attach(model, taps=Taps.all_attention(shape)) as session:
        logits(model, ids, mask)
    valid = mask.bool()
    for layer in range(shape.n_layers):
        q, k, scaling, kwargs, weights = records[layer]
        ours = session.recording.attention_map(layer)
        tolerance = probability_tolerance(logit_error(q, k, scaling, kwargs.get("softcap")), N_TOKENS)
        difference = (ours - weights.float()).abs()[valid[:, None, :, None].expand_as(ours)]
        assert difference.max() <= tolerance, (layer, float(difference.max()), tolerance)


@pytest.mark.parametrize("name", SUPPORTED)
def test_statistics_equal_the_familys_eager_maps(name):
    model = family_model(name)
    ids, mask = batch()
    shape = model_shape(model)
    first = torch.zeros(2, 1, N_TOKENS, dtype=torch.bool)
    first[0, 0, 0] = first[1, 0, 6] = True  # each row's first real token
    taps = Taps(stats={layer: STATS_HEADS for layer in range(shape.n_layers)}, stats_key_groups=first, stats_topk=2)
    with eager_recorder(model) as records, attach(model, taps=taps) as session:
        logits(model, ids, mask)
    rows = mask.bool()[:, None, :].expand(2, len(STATS_HEADS), N_TOKENS)
    for layer in range(shape.n_layers):
        q, k, scaling, kwargs, weights = records[layer]
        p = weights.float()[:, list(STATS_HEADS)]  # [B, h, N, N]
        stats = session.recording.stats[layer][0]
        sink = (1 - p.sum(-1)).clamp_min(0) if kwargs.get("s_aux") is not None else None
        terms = torch.where(p > 0, -p * p.log(), torch.zeros_like(p)).sum(-1)
        if sink is not None:
            terms = terms + torch.where(sink > 0, -sink * sink.log(), torch.zeros_like(sink))
        delta = logit_error(q, k, scaling, kwargs.get("softcap"))
        sink_min = None if sink is None else float(sink[rows].min())
        assert (stats.entropy - terms).abs()[rows].max() <= entropy_tolerance(delta, N_TOKENS, sink_min), layer
        first_mass = torch.stack([p[0, :, :, 0], p[1, :, :, 6]])
        assert (stats.group_mass[..., 0] - first_mass).abs()[rows].max() <= probability_tolerance(delta, N_TOKENS)
        top = p.max(-1)
        assert (stats.topk_weight[..., 0] - top.values).abs()[rows].max() <= probability_tolerance(delta, N_TOKENS)


@pytest.mark.parametrize("name", SUPPORTED)
def test_recording_leaves_the_logits_bit_identical(name):
    """Statistics, maps and head outputs of every head of every layer recorded: the logits are the
    untapped model's, bit for bit (recording never changes what the model computes)."""
    model = family_model(name)
    ids, mask = batch()
    layers = range(model_shape(model).n_layers)
    with torch.no_grad():
        plain = logits(model, ids, mask)
        taps = Taps(stats={layer: None for layer in layers}, stats_topk=2, stats_columns=True,
                    attention={layer: None for layer in layers}, head_outputs=tuple(layers))
        with attach(model, taps=taps):
            tapped = logits(model, ids, mask)
    assert torch.equal(tapped, plain)


@pytest.mark.parametrize("name", SUPPORTED)
def test_head_scale_equals_zeroing_the_output_projections_input(name):
    model = family_model(name)
    ids, mask = batch()
    layer, heads = 1, (0, 2)
    projection = output_projection(attention_modules(model)[layer])

    def zero_heads(module, args):
        z = args[0].unflatten(-1, (-1, model_shape(model).head_dim)).clone()
        z[..., list(heads), :] = 0
        return (z.flatten(-2),)

    handle = projection.register_forward_pre_hook(zero_heads)
    try:
        expected = logits(model, ids, mask)
    finally:
        handle.remove()
    with attach(model, Plan([HeadScale(layer, heads, 0.0)])):
        got = logits(model, ids, mask)
    valid = mask.bool()
    assert torch.equal(got[valid], expected[valid])
    assert not torch.equal(got[valid], logits(model, ids, mask)[valid])


def _calibrate_plan(model):
    return Plan([Calibrate(CALIBRATED_LAYER, tuple(range(model_shape(model).n_heads)), beta=0.4, threshold=0.2,
                           drop_first="none")])


@pytest.mark.parametrize("name", SUPPORTED)
def test_calibrate_keeps_every_rows_sum(name):
    model = family_model(name)
    ids, mask = batch()
    taps = Taps(attention={CALIBRATED_LAYER: None})
    with attach(model, taps=taps) as plain:
        logits(model, ids, mask)
    with attach(model, _calibrate_plan(model), taps=taps) as edited:
        logits(model, ids, mask)
    before, after = plain.recording.attention_map(CALIBRATED_LAYER), edited.recording.attention_map(CALIBRATED_LAYER)
    rows = mask.bool()[:, None, :].expand(before.shape[:3])
    assert (after.sum(-1) - before.sum(-1)).abs()[rows].max() <= 2 * (N_TOKENS + 4) * U
    assert (after - before).abs().max() > 1e-3, "the calibration must change some rows"
    assert (after >= 0).all()


def _cached_and_recomputed(model, plan, ids, mask, steps=6, request=None):
    """``(generated [B, steps], cached logits, recomputed logits [B, steps, vocab])``: greedy
    decoding with ``plan`` (sliding-window caches drop keys between steps), and one forward over
    the prompt plus the generated tokens with the state the prompt's prefill fixed (pinned)."""
    full_mask = torch.cat([mask, torch.ones(2, steps - 1, dtype=mask.dtype)], 1)
    positions = (full_mask.cumsum(-1) - 1).clamp_min(0)  # as generate numbers left-padded rows
    with torch.no_grad():
        with attach(model, plan, request=request):
            run = model.generate(ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, pad_token_id=0,
                                 output_logits=True, return_dict_in_generate=True)
        with attach(model, plan, request=request) as session:
            model(input_ids=ids, attention_mask=mask, position_ids=positions[:, :N_TOKENS])  # fixes the sink sets
            session.state.pin()
            full = model(input_ids=run.sequences[:, :-1], attention_mask=full_mask,
                         position_ids=positions).logits[:, N_TOKENS - 1:]
    return run.sequences[:, N_TOKENS:], torch.stack(run.logits, 1), full


@pytest.mark.parametrize("name", SUPPORTED)
def test_cached_decoding_equals_the_recomputation_under_softmax_edits(name):
    """Cached decoding under PASTA's bias and ACT (frozen emphasis span and sink sets, read at sequence
    positions through sliding-window caches) equals the recomputation: its logits differ no more than the
    model's own cached and recomputed logits do without a plan (times 10, for rounding that the
    edit's extra ops add), on every step up to a row's end token."""
    model = family_model(name)
    ids, mask = batch()
    plan = Plan([Steer(CALIBRATED_LAYER, (0, 1), alpha=0.1), *_calibrate_plan(model).edits])
    request = Request(emphasis=(17, 22))  # inside the decode steps' sliding windows
    generated, cached, full = _cached_and_recomputed(model, plan, ids, mask, request=request)
    _, own_cached, own_full = _cached_and_recomputed(model, Plan(), ids, mask)
    # a row that emitted the end token is padded afterwards: only its tokens up to that one are choices
    choices = (generated == model.generation_config.eos_token_id).long().cumsum(-1).roll(1, -1) == 0
    choices[:, 0] = True
    own_noise = float((own_cached - own_full).abs().max())
    assert (cached - full).abs()[choices].max() <= 10 * own_noise + 1e-5, (own_noise, (cached - full).abs().max())


def zeroed_query_on_decode(model, layer, heads):
    """The family's eager attention with the query of ``heads`` on ``layer`` zeroed in calls that
    extend the cache (the retrieval-head harness's masking)."""
    def wrap(original):
        def zeroing(attn, query, key, value, attention_mask, **kwargs):
            if attn.layer_idx == layer and query.shape[-2] < key.shape[-2]:
                query = query.clone()
                query[:, list(heads)] = 0
            return original(attn, query, key, value, attention_mask, **kwargs)
        return zeroing

    return patched_eager(model, wrap)


def _decode_logits(model, ids, mask, steps=5):
    with torch.no_grad():
        run = model.generate(ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True)
    return run.sequences, torch.stack(run.logits, 1)


@pytest.mark.parametrize("name", SUPPORTED)
def test_uniform_decode_masking_equals_a_zeroed_query(name):
    """Uniform(rows="decode") leaves the prefill alone and, on every decode step, gives what zeroing
    the heads' query in the family's own eager attention gives (soft-caps, windows and learned sinks
    included). Tolerance: the model's own eager-vs-default difference, times 10, as in the cached check."""
    model = family_model(name)
    ids, mask = batch()
    layer, heads = CALIBRATED_LAYER, (0, 3)
    with attach(model, Plan([Uniform(layer, heads)])):
        sequences, ours = _decode_logits(model, ids, mask)
    with zeroed_query_on_decode(model, layer, heads):
        ref_sequences, reference = _decode_logits(model, ids, mask)
    _, own = _decode_logits(model, ids, mask)
    with eager_recorder(model):
        _, own_eager = _decode_logits(model, ids, mask)
    noise = float((own - own_eager).abs().max())
    assert torch.equal(ours[:, 0], own[:, 0]), "the prefill (first generated token's logits) is untouched"
    assert torch.equal(sequences, ref_sequences)
    assert (ours - reference).abs().max() <= 10 * noise + 1e-5, (noise, float((ours - reference).abs().max()))
    assert (ours - own).abs()[:, 1:].max() > 1e-3, "the decode steps must change"


def streaming_in_eager(model, layer, heads, sinks, window, key_mask):
    """The family's eager attention, uncached, with ``heads`` of ``layer`` kept to the first ``sinks``
    valid tokens of each row of ``key_mask [B, N]`` and the ``window`` latest positions (a per-head mask)."""
    def wrap(original):
        def streaming(attn, query, key, value, attention_mask, **kwargs):
            if attn.layer_idx == layer:
                batch, n_heads, n = query.shape[0], query.shape[1], key.shape[-2]
                assert query.shape[-2] == n, "the reference recomputes without a cache"
                valid = key_mask.bool()
                sink = valid & (valid.cumsum(-1) <= sinks)  # [B, N]
                position = torch.arange(n)
                keep = sink[:, None, None, :] | (position[None, None, None, :] > position[None, None, :, None] - window)
                streamed = torch.zeros(n_heads, dtype=torch.bool)
                streamed[list(heads)] = True
                hide = ~keep & streamed[None, :, None, None]  # [B, H, N, N]
                attention_mask = attention_mask[..., :n].expand(batch, n_heads, n, n)
                attention_mask = (attention_mask & ~hide if attention_mask.dtype == torch.bool
                                  else attention_mask.masked_fill(hide, torch.finfo(attention_mask.dtype).min))
            return original(attn, query, key, value, attention_mask, **kwargs)
        return streaming

    return patched_eager(model, wrap)


@pytest.mark.parametrize("name", SUPPORTED)
def test_streaming_heads_decode_as_a_sink_and_window_mask_in_eager_attention(name):
    """Stream on one KV head's query heads of a full-attention layer: cached decoding (prefill and
    decode steps) gives the logits of the family's eager attention recomputing the whole sequence
    with a per-head sink + window mask (left padding included). Tolerance: the model's own cached
    logits against its own eager recomputation, times 10, as in the cached check."""
    model = family_model(name)
    ids, mask = batch()
    shape = model_shape(model)
    layer, heads = 3, tuple(range(shape.group_size))  # every query head of KV head 0
    steps = 6
    with attach(model, Plan([Stream(layer, heads, sinks=2, window=4)])):
        sequences, ours = _decode_logits(model, ids, mask, steps)
    full_mask = torch.cat([mask, torch.ones(2, steps - 1, dtype=mask.dtype)], 1)
    positions = (full_mask.cumsum(-1) - 1).clamp_min(0)
    with streaming_in_eager(model, layer, heads, 2, 4, full_mask), torch.no_grad():
        reference = model(input_ids=sequences[:, :-1], attention_mask=full_mask,
                          position_ids=positions).logits[:, N_TOKENS - 1:]
    own_sequences, own = _decode_logits(model, ids, mask, steps)
    with streaming_in_eager(model, layer, (), 2, 4, full_mask), torch.no_grad():  # no head streamed
        own_recomputed = model(input_ids=own_sequences[:, :-1], attention_mask=full_mask,
                               position_ids=positions).logits[:, N_TOKENS - 1:]
    noise = float((own - own_recomputed).abs().max())  # the model's own cached-vs-recomputed rounding
    choices = (sequences[:, N_TOKENS:] == model.generation_config.eos_token_id).long().cumsum(-1).roll(1, -1) == 0
    choices[:, 0] = True
    assert (ours - reference).abs()[choices].max() <= 10 * noise + 1e-5, (noise, float((ours - reference).abs().max()))
    assert (ours - own).abs().max() > 1e-3, "streaming must change the logits"


def test_streaming_is_per_kv_head():
    shape = model_shape(family_model("qwen2"))  # one KV head for 5 query heads
    with pytest.raises(PlanError, match="KV head"):
        Plan([Stream(1, (0, 1))]).validate(shape)
    Plan([Stream(1, tuple(range(shape.n_heads)))]).validate(shape)


@pytest.mark.parametrize("name", SUPPORTED)
def test_head_output_tap_and_sae_activations_are_the_output_projections_input(name):
    model = family_model(name)
    ids, mask = batch()
    shape = model_shape(model)
    layer = 3
    seen = []
    projection = output_projection(attention_modules(model)[layer])
    handle = projection.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    try:
        logits(model, ids, mask)
        logits(model, ids[:1], None)
    finally:
        handle.remove()
    with attach(model, taps=Taps(head_outputs=[layer])) as session:
        logits(model, ids, mask)
    tapped = session.recording.head_output(layer)
    assert tuple(tapped.shape) == (2, N_TOKENS, shape.n_heads, shape.head_dim)
    assert torch.equal(tapped.flatten(-2), seen[0])
    sae_input = head_outputs(model, ids[:1], layer)  # [seq, heads · head_dim] of one unpadded row
    assert torch.equal(sae_input, seen[1][0])


@pytest.mark.parametrize("name", REFUSED)
def test_unsupported_families_are_refused_in_one_line(name):
    model = family_model(name)
    with pytest.raises(UnsupportedModelError) as err:
        with attach(model):
            pass
    message = str(err.value)
    assert message.startswith(BY_NAME[name].refused) and "\n" not in message


def test_the_matrix_covers_the_families_the_project_promises():
    promised = {"llama", "qwen2", "qwen3", "gemma", "gpt2", "gpt_neox", "olmo2", "granite", "starcoder2", "cohere",
                "opt", "mistral", "gemma3_text", "gemma2", "gpt_oss", "phi3", "smollm3", "qwen2_moe", "qwen3_moe",
                "mixtral", "falcon", "gptj"}
    assert promised <= {family.name for family in FAMILIES}
