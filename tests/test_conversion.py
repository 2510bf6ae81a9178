"""Linear/hybrid conversion of tiny Llamas: decoding from the recurrent state, the transfer teacher,
training stages and their resumption, save/reload, the convert command and its errors."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from bounds import U
from conftest import VOCAB, perturb_feature_maps, tiny_llama
from transformers import LlamaConfig, LlamaForCausalLM

from headlab.cli import main as headlab
from headlab.core.errors import InputFileError
from headlab.kernels.reference import hybrid_attention_reference, linear_attention_reference
from headlab.surgeon import load_model
from headlab.surgeon.conversion.converted import convert, converted_layers, load_converted, save_converted
from headlab.surgeon.sites import block_input
from headlab.surgeon.conversion.settings import LinearSettings, StageSettings
from headlab.surgeon.conversion.hedgehog import FeatureMap
from headlab.surgeon.conversion.layer import RecurrentState
from headlab.surgeon.conversion.training import (run_stage, stage1_parameters, transfer_loss,
                                             transfer_mode)


def converted(kind="gqa", form="hybrid", window=4, layers=(0, 2), seed=0, terrace=True, feature_map="lolcats"):
    """A tiny Llama with converted layers whose feature maps are perturbed away from the identity."""
    model = tiny_llama(kind, seed=seed)
    convert(model, LinearSettings(form=form, window=window, layers=layers, terrace=terrace, feature_map=feature_map))
    return perturb_feature_maps(model, seed + 1)


def ids(batch=2, n=23, seed=3):
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["mha", "gqa", "mqa"])
@pytest.mark.parametrize("form,terrace", [("hybrid", True), ("hybrid", False), ("linear", True)])
def test_cached_decoding_equals_parallel_form(kind, form, terrace):
    model, x = converted(kind, form, terrace=terrace), ids()
    with torch.no_grad():
        full = model(x).logits
        out = model(x[:, :9], use_cache=True)
        cache, pieces = out.past_key_values, [out.logits]
        for t in range(9, x.shape[1], 2):  # one and two tokens at a time
            out = model(x[:, t:t + 2], past_key_values=cache, use_cache=True)
            pieces.append(out.logits)
    assert torch.allclose(torch.cat(pieces, 1), full, atol=1e-5)
    assert isinstance(cache.layers[0], RecurrentState) and not isinstance(cache.layers[1], RecurrentState)
    if form == "linear":
        assert cache.layers[0].keys.shape[2] == 0  # the state alone: nothing grows
    else:
        assert cache.layers[0].keys.shape[2] <= 2 * 4  # the window only


def test_generate_matches_recomputation_without_cache():
    model, x = converted(), ids(batch=1, n=6)
    generated = model.generate(x, max_new_tokens=10, do_sample=False, attention_mask=torch.ones_like(x))
    current = x
    with torch.no_grad():
        for _ in range(10):
            current = torch.cat([current, model(current).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(generated, current)


def test_decoding_state_stays_constant_in_size():
    model = converted(form="linear", layers=None)
    sizes = []
    with torch.no_grad():
        out = model(ids(batch=1, n=5), use_cache=True)
        cache = out.past_key_values
        for step in range(40):
            out = model(torch.tensor([[step % VOCAB]]), past_key_values=cache, use_cache=True)
            sizes.append(sum(layer.stored_bytes() for layer in cache.layers))
    assert len(set(sizes)) == 1
    from headlab.surgeon.kv_cache import cache_bytes

    state = cache.layers[0].state
    assert cache_bytes(cache) == sizes[-1] >= len(cache.layers) * state.numel() * state.element_size()


def test_converted_layer_matches_the_kernel_references():
    """One converted layer's head outputs equal the dense references on its own q, k, v."""
    for form in ("hybrid", "linear"):
        model = converted(form=form)
        layer = converted_layers(model)[0]
        captured = {}
        layer.o_proj.register_forward_pre_hook(lambda m, a: captured.update(z=a[0]))
        hidden = {}
        model.model.layers[0].register_forward_pre_hook(lambda m, a, kw: hidden.update(h=block_input(a, kw)),
                                                         with_kwargs=True)
        with torch.no_grad():
            model(ids(batch=1, n=20))
            x = model.model.layers[0].input_layernorm(hidden["h"])
            pos = model.model.rotary_emb(x, torch.arange(20)[None])
            q, k, v = layer._project(x, pos)
            k, v = layer._expand(k), layer._expand(v)
            fq, fk = layer.feature_q(q), layer.feature_k(k)
            if form == "hybrid":
                want = hybrid_attention_reference(q, k, v, fq, fk, layer.gamma, window=4, scale=layer.scaling)
            else:
                want = linear_attention_reference(fq, fk, v)[0]
        got = captured["z"].view(1, 20, -1, 6).transpose(1, 2)
        assert torch.allclose(got, want.float(), atol=1e-5)


def test_transfer_mode_passes_the_teacher_downstream():
    """With every layer converted and in transfer mode, logits equal the original softmax model's."""
    original = tiny_llama("gqa")
    model = converted(layers=None)
    x = ids()
    with torch.no_grad(), transfer_mode(model, "mse") as layers:
        logits = model(x, use_cache=False).logits
        losses = [float(layer.transfer_loss) for layer in layers]
        assert torch.allclose(logits, original(x).logits, atol=1e-5)
    assert all(loss > 0 for loss in losses)
    assert all(layer.transfer is None for layer in converted_layers(model).values())


def test_attention_weights_rows_sum_to_one_and_reproduce_outputs():
    model = converted(form="hybrid")
    layer = converted_layers(model)[0]
    q, k, v = (torch.randn(1, 9, 12, 6) for _ in range(3))  # the gqa model: 9 query heads
    weights = layer.attention_weights(q, k)
    assert torch.allclose(weights.sum(-1), torch.ones(1, 9, 12), atol=1e-6)
    assert torch.allclose(weights @ v, layer.parallel(q, k, v), atol=1e-5)


def test_feature_maps_start_from_the_identity_and_have_documented_widths():
    x = torch.randn(2, 3, 7, 6)
    lolcats = FeatureMap(3, 6, LinearSettings(feature_dim=8))
    fla = FeatureMap(3, 6, LinearSettings(feature_map="fla"))
    assert lolcats(x).shape[-1] == 16 and fla(x).shape[-1] == 12
    u = F.pad(x, (0, 2))  # x I_{6×8}
    assert torch.allclose(lolcats(x), torch.cat([u.softmax(-1), (-u).softmax(-1)], -1))
    assert torch.allclose(fla(x), torch.cat([2 * x, -2 * x], -1).softmax(-1))


def test_kaiming_feature_init_draws_as_the_released_configs_do():
    """kaiming-uniform on the [H, D, F] weight: fan-in D·F, bound sqrt(6 / (D·F)), seeded by torch."""
    torch.manual_seed(7)
    fmap = FeatureMap(3, 6, LinearSettings(feature_dim=8, feature_init="kaiming"))
    torch.manual_seed(7)
    expected = torch.nn.init.kaiming_uniform_(torch.empty(3, 6, 8))
    assert torch.equal(fmap.weight.detach(), expected)
    assert fmap.weight.abs().max() <= (6 / (6 * 8)) ** 0.5
    assert not torch.equal(fmap.weight.detach(), FeatureMap(3, 6, LinearSettings(feature_dim=8)).weight.detach())


@pytest.mark.parametrize("feature_map", ["lolcats", "fla"])
def test_checkpoint_reloads_to_identical_logits(tmp_path, feature_map):
    model, x = converted(feature_map=feature_map), ids()
    save_converted(model, None, tmp_path / "ckpt", {"note": "test"})
    reloaded, _ = load_converted(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, model(x).logits)
    assert sorted(converted_layers(reloaded)) == [0, 2]
    assert json.loads((tmp_path / "ckpt" / "headlab_conversion.json").read_text())["settings"]["feature_map"] == feature_map


def _stage1(model, folder, steps, stop_at=None):
    train = torch.randint(0, VOCAB, (6, 16), generator=torch.Generator().manual_seed(5))
    val = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(6))
    params = stage1_parameters(model)
    settings = StageSettings(steps=steps, lr=3e-2, accumulation=2, eval_every=2)
    with transfer_mode(model, "mse") as layers:
        return run_stage("stage1", model, params, lambda t: transfer_loss(model, t, layers, 1000.0), train, val,
                         settings, folder, stop_at=stop_at)


def test_stage1_lowers_the_transfer_loss_and_trains_only_feature_maps():
    model = converted(layers=None)
    frozen = {n: p.clone() for n, p in model.named_parameters() if "feature" not in n and "mix_logit" not in n}
    summary = _stage1(model, None, steps=8)
    assert summary["best_val_loss"] < summary["initial_val_loss"]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_killed_stage_resumes_to_the_same_weights(tmp_path):
    straight = converted(layers=None)
    _stage1(straight, tmp_path / "a", steps=6)
    resumed = converted(layers=None)
    _stage1(resumed, tmp_path / "b", steps=6, stop_at=4)
    again = converted(layers=None)  # a fresh process: weights come from the checkpoint
    summary = _stage1(again, tmp_path / "b", steps=6)
    assert summary["steps"] == 6
    for (name, p), (_, q) in zip(straight.named_parameters(), again.named_parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("damage, fragment", [("garbage", "cannot resume the training"),
                                                ("nan", "values that are not finite"),
                                                ("shape", "at another shape"), ("other", "other parameters")])
def test_a_damaged_training_state_is_refused_in_one_line(tmp_path, damage, fragment):
    _stage1(converted(layers=None), tmp_path, steps=4, stop_at=2)
    (state_file,) = [path for path in tmp_path.rglob("*") if path.is_file() and path.suffix == ".pt"]
    state = torch.load(state_file, weights_only=True)
    name = sorted(state["weights"])[0]
    if damage == "garbage":
        state_file.write_bytes(b"not a torch file")
    else:
        if damage == "nan":
            state["weights"][name] = torch.full_like(state["weights"][name], math.nan)
        elif damage == "shape":
            state["weights"][name] = state["weights"][name][..., :1]
        else:
            state["weights"]["another.parameter"] = state["weights"].pop(name)
        torch.save(state, state_file)
    with pytest.raises(InputFileError, match=fragment):
        _stage1(converted(layers=None), tmp_path, steps=4)


def test_padding_and_bad_layers_are_refused():
    model = converted()
    x = ids()
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    with pytest.raises(ValueError, match="padded"):
        model(x, attention_mask=mask)
    with pytest.raises(ValueError, match="out of range"):
        convert(tiny_llama("gqa"), LinearSettings(layers=(5,)))
    with pytest.raises(ValueError, match=r"already has converted layers \(0, 2\)"):
        convert(model, LinearSettings(layers=(1,)))


def test_a_right_padded_batch_gives_each_sequence_its_own_outputs_and_cannot_be_continued():
    """Pads come after every real token, so no real position sees them: whatever the pads hold,
    every real position's logits are the same, bit for bit; a cache filled from such a batch
    refuses to go on."""
    model, x = converted(), ids(n=15)
    mask = torch.ones_like(x)
    mask[1, 9:] = 0
    other = x.clone()
    other[1, 9:] = (x[1, 9:] + 1) % VOCAB
    with torch.no_grad():
        out = model(x, attention_mask=mask, use_cache=True)
        again = model(other, attention_mask=mask).logits
    assert torch.equal(out.logits[0], again[0]) and torch.equal(out.logits[1, :9], again[1, :9])
    assert not torch.equal(out.logits[1, 9:], again[1, 9:])  # the pads themselves did change
    with pytest.raises(ValueError, match="cannot continue a right-padded batch"):
        model(x[:, :1], past_key_values=out.past_key_values)  # the padding forgotten: the state remembers it


def test_choice_evaluation_of_a_converted_model_does_not_depend_on_the_padding():
    """Right-padded choice batches: the same scores, bit for bit, whatever token pads them."""
    from test_evaluation import CharTokenizer  # with a pad id

    from headlab.surgeon.search.accuracy import choice_logprobs
    from headlab.surgeon.search.tasks import Example

    class OtherPad(CharTokenizer):
        pad_token_id = 5

    model = converted()
    examples = [Example("ab =", (" 1", " 22", " 333"), 1), Example("a much longer prompt =", (" x", " yz"), 0)]
    assert choice_logprobs(model, CharTokenizer(), examples, batch_size=4) == \
        choice_logprobs(model, OtherPad(), examples, batch_size=4)


def test_hook_refuses_edits_and_taps_on_converted_layers():
    from headlab.surgeon import HeadScale, Plan, PlanError, Taps, attach

    model = converted(layers=(0,))
    with pytest.raises(PlanError, match="converted"):
        with attach(model, Plan([HeadScale(layer=0, heads=(1,), scale=0.0)])):
            pass
    with pytest.raises(PlanError, match="converted"):
        with attach(model, taps=Taps(head_outputs=[0])):
            pass
    with attach(model, Plan([HeadScale(layer=1, heads=(1,), scale=0.0)])) as session:  # softmax layers stay editable
        model(ids())
        with pytest.raises(PlanError, match="converted"):  # taps set later are checked too
            session.set_taps(Taps(stats={0: None}))
        session.set_taps(Taps(head_outputs=[1]))


def test_maps_of_converted_layers_are_their_converted_weights_on_whole_inputs_only():
    from headlab.surgeon import PlanError, Taps, attach

    from headlab.surgeon.sites import has_causal_attention

    model = converted(layers=(0, 2))
    assert has_causal_attention(model)  # the first attention module is a converted one
    x = ids(batch=1)
    hidden = {}
    handle = model.model.layers[2].self_attn.register_forward_pre_hook(
        lambda module, args, kwargs: hidden.update(h=kwargs["hidden_states"], pe=kwargs["position_embeddings"]),
        with_kwargs=True)
    with torch.no_grad(), attach(model, taps=Taps(attention={0: None, 1: (2,), 2: (0, 3)})) as session:
        out = model(x, use_cache=True)
        handle.remove()
        expected = model.model.layers[2].self_attn.attention_weights_of(hidden["h"], hidden["pe"])[:, [0, 3]]
        assert torch.equal(session.recording.attention_map(2), expected)
        assert session.recording.attention_map(1).shape == (1, 1, 23, 23)  # the softmax layer as usual
        sums = session.recording.attention_map(0).sum(-1)  # 23 quotients of one normaliser, summed in fp32
        assert (sums - 1).abs().max() <= 2 * (23 + 4) * U
        with pytest.raises(PlanError, match="continue a cache"):  # a decode step's input alone does not give them
            model(x[:, :1], past_key_values=out.past_key_values, use_cache=True)


def test_maps_of_converted_layers_over_the_budget_are_refused_before_they_are_computed(monkeypatch):
    from headlab.surgeon import MapBudgetError, Taps, attach
    from headlab.surgeon.conversion.layer import LinearAttention

    model = converted(layers=(0,))
    monkeypatch.setattr(LinearAttention, "attention_weights_of", lambda *a: pytest.fail("maps computed"))
    with pytest.raises(MapBudgetError), attach(model, taps=Taps(attention={0: (1,)}, map_budget_bytes=4 * 23 * 23 - 1)):
        model(ids(batch=1))


@pytest.mark.real_model
def test_convert_command_trains_saves_and_reloads(tmp_path, smollm2, monkeypatch):
    tokenizer = smollm2[1]
    monkeypatch.chdir(tmp_path)  # the base given as a relative folder
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=30, head_dim=6, intermediate_size=37,
                         num_hidden_layers=2, num_attention_heads=5, num_key_value_heads=1,
                         max_position_embeddings=256, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    out = tmp_path / "converted"
    args = ["convert", "base", "--to", "hybrid", "--out", str(out), "--steps", "2,2", "--window", "64",
            "--tokens", "48", "--accumulation", "2", "--eval-every", "1", "--windows", "2", "--layers", "1",
            "--gate-lengths", "448", "--gate-needles", "2"]
    assert headlab(args) == 0
    model, tok = load_model(out)
    assert sorted(converted_layers(model)) == [1] and tok is not None
    record = json.loads((out / "headlab_conversion.json").read_text())
    assert [s["stage"] for s in record["provenance"]["stages"]] == ["stage1", "stage2"]
    assert set(record["provenance"]["held_out_perplexity"]) == {"original", "converted_untrained", "after_stage1",
                                                                 "after_stage2"}
    assert record["provenance"]["base_model"] == str((tmp_path / "base").resolve())
    gate = record["provenance"]["recall_gate"]  # the recall gate: the same prompts, by distance from the end
    assert gate["original"]["distances"] == gate["converted"]["distances"] and len(gate["converted"]["runs"]) >= 4
    assert {"inside the window", "just outside"} <= set(gate["converted"]["bins"])
    assert "difference_ci" in gate["converted"]["bins"]["just outside"]["recalled"]
    monkeypatch.chdir(out)  # stream-eval finds the recorded base from another folder
    assert headlab(["stream-eval", str(out), "--lengths", "128", "--needle-depths", "0.5", "--needles", "1",
                    "--windows", "1", "--out", str(tmp_path / "eval")]) == 0
    evaluation = json.loads((tmp_path / "eval" / "compression.json").read_text())
    assert {row["rule"] for row in evaluation["summary"]} == {"converted", "full"}
    import shutil

    shutil.rmtree(out / "training")
    assert headlab(args) == 2  # a finished checkpoint is never overwritten
    assert headlab(["convert", str(tmp_path / "base"), "--to", "hybrid", "--out", str(tmp_path / "o2"),
                    "--layers", "7", "--steps", "1"]) == 2


def test_the_head_search_leaves_converted_layers_out():
    from headlab.surgeon import PlanError
    from headlab.surgeon.search.calibration import default_candidates

    model = tiny_llama("gqa", layers=5)
    convert(model, LinearSettings(layers=(3,)))
    assert {layer for layer, _ in default_candidates(model)} == {2}  # layers 2 .. n - 2, less the converted 3
    with pytest.raises(PlanError, match="none converted to linear attention"):
        default_candidates(model, [2, 3])
