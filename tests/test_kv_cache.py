"""The reserved decoding cache against transformers' own: the same tokens and bit-identical logits."""

import pytest
import torch
from families import family_model

from headlab.surgeon.kv_cache import ReservedLayer, reserved_cache


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gemma2", "gpt_oss"])
def test_generation_on_a_reserved_cache_is_bit_identical(family):
    model = family_model(family)
    ids = torch.randint(3, 97, (2, 13), generator=torch.Generator().manual_seed(1))
    settings = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, output_logits=True,
                    return_dict_in_generate=True)
    cache = reserved_cache(model, reserve=4)  # grows twice over 12 steps
    with torch.no_grad():
        plain = model.generate(ids, **settings)
        reserved = model.generate(ids, past_key_values=cache, **settings)
    assert torch.equal(plain.sequences, reserved.sequences)
    assert all(torch.equal(a, b) for a, b in zip(plain.logits, reserved.logits))
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
