"""The single attention hook: no-op exactness, restore on exit, padding, cached decoding."""

import pytest
import torch
from conftest import padded_batch, tiny_bert, tiny_llama

from headlab.surgeon import HeadScale, Plan, Taps, attach, model_shape
from headlab.surgeon.hook import hook_name
from headlab.surgeon.sites import attention_modules

pytestmark = pytest.mark.numerics  # run again in CI with one thread and narrower vector units


def logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("side", ["left", "right"])
def test_empty_plan_is_bitwise_identical_decoder(llama, side):
    ids, mask = padded_batch([11, 7, 4], 11, side)
    before = logits(llama, ids, mask)
    with attach(llama):
        during = logits(llama, ids, mask)
    valid = mask.bool()
    assert torch.equal(before[valid], during[valid])


def test_empty_plan_matches_eager_closely(llama):
    ids, mask = padded_batch([9, 6], 9, "left")
    with attach(llama):
        hooked = logits(llama, ids, mask)
    llama.set_attn_implementation("eager")
    eager = logits(llama, ids, mask)
    valid = mask.bool()
    assert torch.allclose(hooked[valid], eager[valid], atol=1e-5)


def test_empty_plan_is_bitwise_identical_encoder(bert):
    ids, mask = padded_batch([10, 3, 6], 10, "right")
    with torch.no_grad():
        before = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        with attach(bert):
            during = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    valid = mask.bool()
    assert torch.equal(before[valid], during[valid])


def test_hook_really_runs_and_receives_the_base_implementations_mask(llama):
    """The registered function is the one called, and every layer receives exactly the mask the
    untouched model's SDPA receives (the padded batch's mask; none for a plain causal batch), so
    the mask never silently goes missing."""
    import headlab.surgeon.hook as hook
    from transformers.integrations import sdpa_attention

    seen, base = [], []
    original_attend, original_sdpa = hook.Session.attend, sdpa_attention.sdpa_attention_forward

    def spy(self, module, q, k, v, mask, *rest):
        seen.append(mask)
        return original_attend(self, module, q, k, v, mask, *rest)

    def base_spy(module, q, k, v, mask, **kwargs):
        base.append(mask)
        return original_sdpa(module, q, k, v, mask, **kwargs)

    hook.Session.attend = spy
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    ALL_ATTENTION_FUNCTIONS._global_mapping["sdpa"] = base_spy
    try:
        for lengths in ([8, 8], [8, 5]):
            ids, mask = padded_batch(lengths, 8, "left")
            base.clear()
            logits(llama, ids, mask)
            expected = list(base)
            seen.clear()
            with attach(llama):
                logits(llama, ids, mask)
            assert len(seen) == llama.config.num_hidden_layers
            assert all((m is None) == (e is None) for m, e in zip(seen, expected))
            assert all(m is None or torch.equal(m, e) for m, e in zip(seen, expected))
            assert (seen[0] is None) == (lengths == [8, 8])
    finally:
        hook.Session.attend = original_attend
        ALL_ATTENTION_FUNCTIONS._global_mapping["sdpa"] = original_sdpa


@pytest.mark.parametrize("side", ["left"])
def test_cached_generate_gives_the_same_tokens(llama, side):
    ids, mask = padded_batch([8, 5, 3], 8, side)
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        plain = llama.generate(ids, **kwargs)
        with attach(llama):
            hooked = llama.generate(ids, **kwargs)
    assert torch.equal(plain, hooked)


def test_cached_decode_equals_uncached_recompute_with_a_plan():
    model = tiny_llama("gqa")
    plan = Plan([HeadScale(layer=1, heads=(0, 4), scale=0.0), HeadScale(layer=2, heads=(8,), scale=2.5)])
    ids, mask = padded_batch([7, 7], 7, "left")
    with torch.no_grad(), attach(model, plan):
        generated = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        full = model(input_ids=generated).logits
    # greedy decoding means each generated token is the argmax of the uncached logits before it
    assert torch.equal(full[:, 6:-1].argmax(-1), generated[:, 7:])


def test_restores_previous_implementation_on_exit_and_after_exception():
    model = tiny_llama("mha")
    model.set_attn_implementation("eager")
    with attach(model):
        assert model.config._attn_implementation == hook_name("eager")
    assert model.config._attn_implementation == "eager"
    with pytest.raises(RuntimeError, match="boom"):
        with attach(model, Plan([HeadScale(0, (1,), 0.0)])):
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "eager"
    assert not any(hasattr(m, "_headlab_session") for m in model.modules())
    ids, mask = padded_batch([6], 6, "left")
    reference = tiny_llama("mha")
    reference.set_attn_implementation("eager")
    assert torch.equal(logits(model, ids, mask), logits(reference, ids, mask))


def test_nested_attach_is_refused():
    model = tiny_llama("mqa")
    with attach(model):
        with pytest.raises(RuntimeError, match="already attached"):
            with attach(model):
                pass


def test_attention_modules_are_found_once_per_layer():
    for model in (tiny_llama("gqa"), tiny_bert()):
        layers = [m.layer_idx for m in attention_modules(model)]
        assert layers == list(range(model.config.num_hidden_layers))


def test_head_scale_zero_equals_zeroing_the_o_proj_input_slice(llama):
    """Ablation through the hook equals zeroing that head's slice of o_proj's input directly."""
    layer, head = 1, llama.config.num_attention_heads - 1
    head_dim = llama.config.head_dim
    ids, mask = padded_batch([9, 6], 9, "right")

    def zero_slice(module, args):
        (x,) = args
        x = x.clone()
        x[..., head * head_dim : (head + 1) * head_dim] = 0
        return (x,)

    handle = llama.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(zero_slice)
    try:
        expected = logits(llama, ids, mask)
    finally:
        handle.remove()
    with attach(llama, Plan([HeadScale(layer, (head,), 0.0)])):
        ablated = logits(llama, ids, mask)
    assert torch.equal(expected[mask.bool()], ablated[mask.bool()])
    assert not torch.allclose(ablated, logits(llama, ids, mask))


def test_gates_multiply_head_outputs_and_carry_gradients():
    model = tiny_llama("gqa")
    shape = (3, 9)
    gates = torch.ones(shape, requires_grad=True)
    ids, mask = padded_batch([8], 8, "left")
    with attach(model, gates=gates):
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    assert gates.grad is not None and gates.grad.shape == shape
    assert (gates.grad.abs() > 0).all()
    with attach(model, gates=torch.ones(shape)):
        ones = logits(model, ids, mask)
    assert torch.equal(ones, logits(model, ids, mask))


def test_taps_do_not_change_outputs(llama):
    ids, mask = padded_batch([9, 4], 9, "left")
    before = logits(llama, ids, mask)
    taps = Taps(attention={0: None, 2: [1]}, head_outputs=[0, 1, 2])
    with attach(llama, taps=taps):
        during = logits(llama, ids, mask)
    assert torch.equal(before[mask.bool()], during[mask.bool()])


def test_a_resumed_session_places_a_sliding_window_caches_keys_as_an_unbroken_one():
    """A session that starts at a decode step on a cache filled outside it (resume) records the same
    maps at the same sequence positions as one that saw the prefill, on a sliding-window model whose
    cache keeps only the last keys."""
    from families import WINDOW, family_model

    model = family_model("mistral")
    ids = torch.randint(3, 97, (1, 3 * WINDOW), generator=torch.Generator().manual_seed(2))
    shape = model_shape(model)
    with torch.no_grad():
        cache = model(input_ids=ids[:, :-1], use_cache=True).past_key_values
        step = ids[:, -1:]
        with attach(model) as whole:
            fresh = model(input_ids=ids[:, :-1], use_cache=True).past_key_values
            whole.set_taps(Taps.all_attention(shape))
            model(input_ids=step, past_key_values=fresh, use_cache=True)
        with attach(model, taps=Taps.all_attention(shape)) as resumed:
            resumed.resume(ids.shape[1] - 1)
            model(input_ids=step, past_key_values=cache, use_cache=True)
    for layer in range(shape.n_layers):
        assert resumed.recording.attention_key_start[layer] == whole.recording.attention_key_start[layer]
        assert whole.recording.attention_key_start[layer][-1] > 0  # the window dropped keys
        assert torch.equal(resumed.recording.attention_map(layer), whole.recording.attention_map(layer))
