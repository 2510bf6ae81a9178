"""The reserved and the streaming decoding caches against transformers' own: the same tokens, and
logits within the fp32 rounding of two orders of the same sums (the caches hand attention views of a
larger buffer, or fewer keys instead of masked ones: :mod:`bounds`); the streaming cache stores less
by exactly the dropped entries."""

import copy

import pytest
import torch
from bounds import forward_rounding_error, reordering_tolerance
from families import family_model
from transformers import DynamicCache

from headlab.surgeon import Plan, Stream, attach, model_shape
from headlab.surgeon.kv_cache import ReservedLayer, cache_bytes, cropped_cache, reserved_cache
from headlab.surgeon.streaming.cache import StreamingLayer, streaming_cache

pytestmark = pytest.mark.numerics  # run again in CI with one thread and narrower vector units


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gemma2", "gpt_oss"])
def test_generation_on_a_reserved_cache_gives_the_tokens_and_logits_of_plain_generation(family):
    model = family_model(family)
    ids = torch.randint(3, 97, (2, 13), generator=torch.Generator().manual_seed(1))
    settings = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, output_logits=True,
                    return_dict_in_generate=True)
    cache = reserved_cache(model, reserve=4)  # grows twice over 12 steps
    with torch.no_grad():
        plain = model.generate(ids, **settings)
        reserved = model.generate(ids, past_key_values=cache, **settings)
    assert torch.equal(plain.sequences, reserved.sequences)
    _assert_same_logits(model, plain, reserved)
    full = [layer for layer in cache.layers if isinstance(layer, ReservedLayer)]
    assert full and all(layer.get_seq_length() == 13 + 11 for layer in full)


def test_a_step_inside_the_room_copies_nothing_and_a_reorder_is_followed():
    layer = ReservedLayer(reserve=8)
    first = torch.randn(2, 3, 5, 4)
    keys, _ = layer.update(first, first)
    room = layer._room[0].data_ptr()
    step = torch.randn(2, 3, 1, 4)
    keys, values = layer.update(step, step)
    assert layer._room[0].data_ptr() == room and torch.equal(keys, torch.cat([first, step], dim=-2))
    layer.batch_select_indices(torch.tensor([1]))  # transformers replaces the held tensors
    keys, _ = layer.update(step[:1], step[:1])
    assert torch.equal(keys, torch.cat([first[1:], step[1:], step[:1]], dim=-2))


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "qwen2"])  # MHA-like, windowed layers, MQA
def test_a_streaming_cache_decodes_like_a_whole_cache_and_stores_only_what_streaming_heads_see(family):
    model = family_model(family)
    shape = model_shape(model)
    layers = [1, 3]  # layer 3 is a global layer in every family here; layer 1 slides in gemma3_text
    plan = Plan([Stream(layer, tuple(range(shape.group_size)), sinks=2, window=5) for layer in layers])
    ids = torch.randint(3, 97, (2, 23), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 23, dtype=torch.long)
    mask[1, :6] = 0  # left padding moves the second row's sinks to positions 6 and 7
    settings = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, output_logits=True,
                    return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad(), attach(model, plan):
        plain_cache, cache = DynamicCache(config=model.config), streaming_cache(model, plan, mask)
        plain = model.generate(ids, attention_mask=mask, past_key_values=plain_cache, **settings)
        streaming = model.generate(ids, attention_mask=mask, past_key_values=cache, **settings)
    assert torch.equal(plain.sequences, streaming.sequences)
    _assert_same_logits(model, plain, streaming, mask)  # the rounding scale of the model without the plan
    positions, entry = 23 + 8 - 1, 2 * 2 * shape.head_dim * 4  # keys and values of 2 rows in fp32
    saved = 0
    for layer in layers:
        if not isinstance(cache.layers[layer], StreamingLayer):
            assert family == "gemma3_text" and layer == 1  # a sliding layer keeps transformers' own cache
            continue
        kept = 6 + 2 + 5  # the positions up to the padded row's second sink, and the latest 5
        saved += (positions - kept) * entry  # KV head 0 streams
    assert saved > 0 and cache_bytes(plain_cache) - cache_bytes(cache) == saved


def test_a_streaming_cache_refuses_what_it_cannot_do():
    layer = StreamingLayer([0], 2, 4)
    layer.update(torch.randn(1, 2, 9, 3), torch.randn(1, 2, 9, 3))
    with pytest.raises(NotImplementedError, match="cropped"):
        layer.crop(-2)
    with pytest.raises(NotImplementedError, match="beam search"):
        layer.batch_select_indices(torch.tensor([0]))


def test_a_cropped_cache_continues_like_a_cropped_copy_and_leaves_the_original():
    model = family_model("llama")
    ids = torch.randint(3, 97, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole = model(input_ids=ids[:, :10], use_cache=True).past_key_values
        kept = [layer.keys.clone() for layer in whole.layers]
        copied = copy.deepcopy(whole)
        copied.crop(-4)  # transformers' own crop (of the last 4 positions), of a copy
        from_crop = model(input_ids=ids[:, 6:], past_key_values=cropped_cache(whole, 6), use_cache=True).logits
        from_copy = model(input_ids=ids[:, 6:], past_key_values=copied, use_cache=True).logits
    assert (from_crop - from_copy).abs().max() <= reordering_tolerance(forward_rounding_error(model, ids), from_copy)
    assert all(torch.equal(layer.keys, k) for layer, k in zip(whole.layers, kept))
    with pytest.raises(ValueError, match="1 to 10"):
        cropped_cache(whole, 11)
    with torch.no_grad():
        windowed = family_model("gemma3_text")(input_ids=ids, use_cache=True).past_key_values
    with pytest.raises(ValueError, match="full-attention"):
        cropped_cache(windowed, 4)


def _assert_same_logits(model, expected, got, prompt_mask=None):
    """``got``'s per-step logits equal ``expected``'s within the rounding of two orders of one
    forward, measured on the generated sequence."""
    mask = None
    if prompt_mask is not None:
        generated = expected.sequences.shape[1] - prompt_mask.shape[1]
        mask = torch.cat([prompt_mask, torch.ones(prompt_mask.shape[0], generated, dtype=prompt_mask.dtype)], 1)
    error = forward_rounding_error(model, expected.sequences, mask)
    for a, b in zip(expected.logits, got.logits):
        assert (a - b).abs().max() <= reordering_tolerance(error, a)
