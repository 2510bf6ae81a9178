"""Head-level hybrids: converted layers whose chosen KV heads keep softmax attention over the whole
context. Cached decoding equals the parallel form, softmax heads compute the model's own attention,
checkpoints reload exactly, stage 1 trains the converted heads only."""

import json

import pytest
import torch
from bounds import forward_rounding_error, reordering_tolerance
from conftest import VOCAB, tiny_llama

from headlab.surgeon.conversion.converted import convert, converted_layers, load_converted, save_converted
from headlab.surgeon.conversion.layer import RecurrentState
from headlab.surgeon.conversion.settings import LinearSettings
from headlab.surgeon.conversion.training import stage1_parameters, transfer_loss, transfer_mode


def converted(kind="gqa", form="hybrid", softmax_heads=((0, 1), (2, 0), (2, 2)), layers=(0, 2), window=4, seed=0):
    """A tiny Llama whose ``layers`` are converted, ``softmax_heads`` kept softmax, feature maps perturbed."""
    model = tiny_llama(kind, seed=seed)
    convert(model, LinearSettings(form=form, window=window, layers=layers, softmax_heads=softmax_heads))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in converted_layers(model).values():
            for fmap in (layer.feature_q, layer.feature_k):
                fmap.weight.add_(0.5 * torch.randn(fmap.weight.shape, generator=g))
    return model


def ids(batch=2, n=23, seed=3):
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def decoded_logits(model, x, first=9):
    """Logits of ``x`` from a prefill of ``first`` tokens, then one and two tokens at a time."""
    with torch.no_grad():
        out = model(x[:, :first], use_cache=True)
        cache, pieces = out.past_key_values, [out.logits]
        for t in range(first, x.shape[1], 2):
            out = model(x[:, t:t + 2], past_key_values=cache, use_cache=True)
            pieces.append(out.logits)
    return torch.cat(pieces, 1), cache


@pytest.mark.parametrize("form", ["hybrid", "linear"])
@pytest.mark.parametrize("kind,softmax_heads", [("gqa", ((0, 1), (2, 0), (2, 2))), ("mha", ((0, 0), (0, 4))),
                                                ("mqa", ((2, 0),))])
def test_cached_decoding_equals_the_parallel_form(kind, softmax_heads, form):
    model, x = converted(kind, form, softmax_heads), ids()
    with torch.no_grad():
        full = model(x).logits
    pieces, cache = decoded_logits(model, x)
    tolerance = reordering_tolerance(forward_rounding_error(model, x), full)
    assert (pieces - full).abs().max() <= tolerance
    kept = {layer: [kv for l, kv in softmax_heads if l == layer] for layer in (0, 2)}
    for layer in (0, 2):
        slot = cache.layers[layer]
        assert isinstance(slot, RecurrentState)
        if kept[layer]:  # the softmax heads hold every key; the converted ones a window and a state
            assert slot.full_keys.shape[1:3] == (len(kept[layer]), x.shape[1])
        else:
            assert slot.full_keys is None


def test_softmax_heads_compute_the_model_own_attention():
    """A converted layer whose every KV head stays softmax is the original layer (logits within the
    rounding of two orders of the same sums); with converted heads beside them the logits move."""
    original, x = tiny_llama("gqa"), ids()
    every = converted(softmax_heads=tuple((layer, kv) for layer in (0, 2) for kv in range(3)))
    some = converted()
    with torch.no_grad():
        want = original(x).logits
        assert (every(x).logits - want).abs().max() <= reordering_tolerance(forward_rounding_error(original, x), want)
        assert (some(x).logits - want).abs().max() > 1e-2
    pieces, _ = decoded_logits(every, x)
    assert (pieces - want).abs().max() <= reordering_tolerance(forward_rounding_error(original, x), want)


def test_softmax_head_outputs_are_exact_and_converted_heads_unchanged():
    """Inside a layer, the softmax heads' outputs are causal softmax attention and the converted heads'
    outputs are those of the fully converted layer, on the same q, k, v."""
    model = converted()
    layer = converted_layers(model)[2]  # KV heads 0 and 2 softmax: query heads 0-2 and 6-8
    q, k, v = (torch.randn(1, 9, 12, 6, generator=torch.Generator().manual_seed(s)) for s in (1, 2, 3))
    mixed = layer.parallel(q, k, v)
    teacher = layer._teacher(q, k, v)
    assert torch.equal(mixed[:, [0, 1, 2, 6, 7, 8]], teacher[:, [0, 1, 2, 6, 7, 8]])
    kept = layer.softmax_kv
    layer.set_softmax_heads(())
    every = layer.parallel(q, k, v)
    layer.set_softmax_heads(kept)
    assert (mixed[:, 3:6] - every[:, 3:6]).abs().max() <= 1e-6
    weights = layer.attention_weights(q, k)
    assert torch.allclose(weights.sum(-1), torch.ones(1, 9, 12), atol=1e-6)
    assert torch.allclose(weights @ v, mixed, atol=1e-5)


def test_a_checkpoint_with_softmax_heads_reloads_to_identical_logits(tmp_path):
    model, x = converted(), ids()
    save_converted(model, None, tmp_path / "ckpt")
    reloaded, _ = load_converted(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, model(x).logits)
    recorded = json.loads((tmp_path / "ckpt" / "headlab_conversion.json").read_text())["settings"]
    assert recorded["softmax_heads"] == [[0, 1], [2, 0], [2, 2]]
    assert converted_layers(reloaded)[2].softmax_kv == (0, 2)


def test_stage1_trains_only_the_converted_heads_feature_maps():
    model = converted(softmax_heads=((0, 1),), layers=(0,))
    params = stage1_parameters(model)
    with transfer_mode(model, "mse") as layers:
        transfer_loss(model, ids(batch=1), layers, 1000.0).backward()
    grad = params["model.layers.0.self_attn.feature_q.weight"].grad  # [H, D, F]: query heads 3-5 are softmax
    assert grad[[3, 4, 5]].abs().sum() == 0 and grad[[0, 1, 2, 6, 7, 8]].abs().sum() > 0


def test_softmax_heads_outside_the_converted_layers_or_the_model_are_refused():
    with pytest.raises(Exception, match="not converted"):
        LinearSettings(layers=(0,), softmax_heads=((2, 0),))
    with pytest.raises(ValueError, match="KV heads 0–2"):
        convert(tiny_llama("gqa"), LinearSettings(layers=(0,), softmax_heads=((0, 3),)))
