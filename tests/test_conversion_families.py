"""Linear/hybrid conversion across the family matrix (``families.py``, whose ``conversion`` says what
each family's default conversion does): a family either converts (its rebuilt softmax reproduces
the model, cached decoding equals the parallel form, a checkpoint reloads) or is refused, before
anything is replaced, with its reason."""

import copy
import re

import pytest
import torch
from bounds import U
from families import FAMILIES, VOCAB, family_model

from headlab.cli import main as headlab
from headlab.surgeon import UnsupportedModelError
from headlab.surgeon.conversion import layer as layer_module
from headlab.surgeon.conversion.converted import convert, converted_layers, load_converted, save_converted
from headlab.surgeon.conversion.settings import LinearSettings
from headlab.surgeon.conversion.support import check_config
from headlab.surgeon.conversion.training import transfer_mode

pytestmark = pytest.mark.numerics  # run again in CI with one thread and narrower vector units

CONVERTS = {f.name: f.conversion for f in FAMILIES if not isinstance(f.conversion, str)}  # the layers replaced
REFUSED = {f.name: f.conversion for f in FAMILIES if isinstance(f.conversion, str)}  # what the refusal says


def inputs(batch=2, n=23):
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(3))


def fresh(name: str):
    """A copy of the family's shared tiny model (conversion replaces modules in place)."""
    return copy.deepcopy(family_model(name))


def _own_noise(model, x) -> float:
    """The unconverted model's own rounding scale: its eager attention against its default one."""
    with torch.no_grad():
        default = model(x).logits
        previous = model.config._attn_implementation
        model.set_attn_implementation("eager")
        try:
            eager = model(x).logits
        finally:
            model.set_attn_implementation(previous)
    return float((default - eager).abs().max())


@pytest.mark.parametrize("name", sorted(CONVERTS))
def test_the_rebuilt_softmax_reproduces_the_model(name):
    """In transfer mode every converted layer passes on its softmax teacher, rebuilt from the
    layer's projections, norms and rotary positions: the logits are the original model's, to
    within ten times the model's own eager-against-default difference (as the family matrix), plus
    a few units of fp32 roundoff relative to the logits should that difference be zero."""
    model, x = fresh(name), inputs()
    noise = _own_noise(model, x)
    with torch.no_grad():
        original = model(x).logits
    convert(model, LinearSettings())
    assert tuple(sorted(converted_layers(model))) == CONVERTS[name]
    with torch.no_grad(), transfer_mode(model, "mse"):
        rebuilt = model(x, use_cache=False).logits
    assert (rebuilt - original).abs().max() <= 10 * noise + 4 * U * original.abs().max()


def _cached_and_parallel(model, x):
    """Logits of ``x`` decoded from the cache (9 tokens, then two at a time) and in one forward."""
    with torch.no_grad():
        full = model(x).logits
        out = model(x[:, :9], use_cache=True)
        cache, pieces = out.past_key_values, [out.logits]
        for t in range(9, x.shape[1], 2):
            out = model(x[:, t:t + 2], past_key_values=cache, use_cache=True)
            pieces.append(out.logits)
    return torch.cat(pieces, 1), full, cache


@pytest.mark.parametrize("softmax_heads", [False, True], ids=["converted", "head-hybrid"])
@pytest.mark.parametrize("name", sorted(CONVERTS))
def test_cached_decoding_of_a_converted_family_equals_its_parallel_form(name, softmax_heads):
    """Feature maps moved off the identity; tolerance ten times the unconverted model's own
    cached-against-recomputed difference (as the family matrix; the converted one measures 0.5-2
    times it), plus a few units of fp32 roundoff relative to the logits. ``head-hybrid``: KV head 0
    of every converted layer keeps softmax attention."""
    model, x = fresh(name), inputs()
    own_cached, own_full, _ = _cached_and_parallel(model, x)
    noise = float((own_cached - own_full).abs().max())
    kept = tuple((layer, 0) for layer in CONVERTS[name]) if softmax_heads else ()
    convert(model, LinearSettings(window=4, layers=CONVERTS[name], softmax_heads=kept))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for converted in converted_layers(model).values():
            for fmap in (converted.feature_q, converted.feature_k):
                fmap.weight.add_(0.5 * torch.randn(fmap.weight.shape, generator=g))
    cached, full, cache = _cached_and_parallel(model, x)
    assert (cached - full).abs().max() <= 10 * noise + 4 * U * full.abs().max()
    kinds = [type(layer).__name__ for layer in cache.layers]
    assert [i for i, kind in enumerate(kinds) if kind == "RecurrentState"] == list(CONVERTS[name])


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_a_refused_family_names_its_reason_and_is_left_unconverted(name):
    model = fresh(name)
    with pytest.raises(UnsupportedModelError, match=re.escape(REFUSED[name])):
        convert(model, LinearSettings())
    assert not converted_layers(model)


def test_a_sliding_window_layer_chosen_by_name_is_refused():
    with pytest.raises(UnsupportedModelError, match="layer 0 cannot be converted: it attends through a sliding window"):
        convert(fresh("gemma3_text"), LinearSettings(layers=(0, 3)))


def test_softmax_heads_in_a_sliding_window_layer_are_refused():
    """Softmax heads live inside converted layers; Gemma 3's layer 0 slides and is never converted."""
    model = fresh("gemma3_text")
    with pytest.raises(UnsupportedModelError, match=r"softmax heads name layer\(s\) \[0\], which the conversion"):
        convert(model, LinearSettings(softmax_heads=((0, 0),)))
    assert not converted_layers(model)


def test_the_probe_refuses_a_layer_the_conversion_would_rebuild_wrongly(monkeypatch):
    """With the query/key norms left out of the rebuilt layer (as if their site were unknown),
    Qwen3's conversion is refused by the probe, not carried out."""
    monkeypatch.setattr(layer_module, "norm_site", lambda *args: None)
    model = fresh("qwen3")
    with pytest.raises(UnsupportedModelError, match="layer 0 cannot be converted: rebuilt from its projections"):
        convert(model, LinearSettings())
    assert not converted_layers(model)


def test_the_probe_refuses_cohere2_without_its_rule_on_positions(monkeypatch):
    """Cohere 2's full-attention layers have no rotary positions, which no attribute says: rebuilt with
    positions everywhere, the probe refuses them."""
    monkeypatch.setattr(layer_module, "uses_rotary", lambda attention: True)
    model = fresh("cohere2")
    with pytest.raises(UnsupportedModelError, match="layer 1 cannot be converted: rebuilt from its projections"):
        convert(model, LinearSettings())
    assert not converted_layers(model)


def test_the_probe_leaves_the_random_state_as_it_was():
    """Verification builds throw-away layers (kaiming feature maps draw from torch's generator):
    a conversion draws the same weights with and without it."""
    settings = LinearSettings(feature_init="kaiming")
    weights = []
    for verify in (True, False):
        model = fresh("llama")
        torch.manual_seed(5)
        convert(model, settings, verify=verify)
        weights.append(converted_layers(model)[0].feature_q.weight.detach())
    assert torch.equal(*weights)


@pytest.mark.parametrize("name", ["cohere2", "gemma3_text", "olmo2", "smollm3"])
def test_a_converted_checkpoint_of_the_family_reloads_to_identical_logits(tmp_path, name):
    """Norms, positions and the mixed cache (Gemma 3: sliding-window layers beside a converted one)."""
    model, x = fresh(name), inputs()
    convert(model, LinearSettings(window=4))
    save_converted(model, None, tmp_path / "ckpt")
    reloaded, _ = load_converted(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, model(x).logits)
    assert sorted(converted_layers(reloaded)) == list(CONVERTS[name])


def test_check_config_reads_the_modules_without_weights():
    assert check_config(family_model("gemma3_text").config) == [3]
    assert check_config(family_model("llama").config, [2, 0]) == [0, 2]
    with pytest.raises(UnsupportedModelError, match="soft-capped"):
        check_config(family_model("gemma2").config)


def test_convert_command_refuses_an_unsupported_model_before_loading_it(tmp_path, capsys):
    source = tmp_path / "mistral"
    family_model("mistral").save_pretrained(source)
    (source / "model.safetensors").write_bytes(b"not weights")  # a load would fail on these
    out = tmp_path / "converted"
    assert headlab(["convert", str(source), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "every layer of this model attends through a sliding window" in error and "Traceback" not in error
    assert not out.exists()
