"""Head-level hybrids: converted layers whose chosen KV heads keep softmax attention over the whole
context. Cached decoding equals the parallel form, softmax heads compute the model's own attention,
checkpoints reload exactly, stage 1 trains the converted heads only."""

import json
import re

import pytest
import torch
from bounds import U, forward_rounding_error, reordering_tolerance
from conftest import VOCAB, perturb_feature_maps, tiny_llama

from headlab.core.errors import UnsupportedModelError
from headlab.surgeon.conversion.converted import convert, converted_layers, load_converted, save_converted
from headlab.surgeon.conversion.layer import RecurrentState
from headlab.surgeon.conversion.settings import LinearSettings
from headlab.surgeon.conversion.training import stage1_parameters, transfer_loss, transfer_mode


def converted(kind="gqa", form="hybrid", softmax_heads=((0, 1), (2, 0), (2, 2)), layers=(0, 2), window=4, seed=0):
    """A tiny Llama whose ``layers`` are converted, ``softmax_heads`` kept softmax, feature maps perturbed."""
    model = tiny_llama(kind, seed=seed)
    convert(model, LinearSettings(form=form, window=window, layers=layers, softmax_heads=softmax_heads))
    return perturb_feature_maps(model, seed + 1)


def sum_tolerance(n_terms: int, magnitude: float) -> float:
    """Tolerance on two fp32 computations, in other orders or layouts, of a normalised sum of ``n_terms``
    rounded terms of values up to ``magnitude``: each is off by at most ``(n_terms + 4) u`` relative
    (the terms, the normaliser and the division; Higham §3.1), their difference by twice that."""
    return 2 * (n_terms + 4) * U * magnitude


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
    soft = [0, 1, 2, 6, 7, 8]
    teacher = layer._teacher(q[:, soft], k[:, soft], v[:, soft])  # the same kernel on the same heads
    assert torch.equal(mixed[:, soft], teacher)
    kept = layer.softmax_kv
    layer.set_softmax_heads(())
    every = layer.parallel(q, k, v)
    layer.set_softmax_heads(kept)
    n_keys, n_features, magnitude = 12, layer.feature_q.n_features, float(v.abs().max())
    # a head's output: a normalised sum over the keys of weights made from n_features-term dot products
    assert (mixed[:, 3:6] - every[:, 3:6]).abs().max() <= sum_tolerance(n_keys + n_features, magnitude)
    weights = layer.attention_weights(q, k)
    assert (weights.sum(-1) - 1).abs().max() <= sum_tolerance(n_keys, 1.0)
    assert ((weights @ v) - mixed).abs().max() <= sum_tolerance(2 * n_keys + n_features, magnitude)


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
    with pytest.raises(UnsupportedModelError, match="KV head\\(s\\) \\[3\\]; the model has 3"):
        convert(tiny_llama("gqa"), LinearSettings(layers=(0,), softmax_heads=((0, 3),)))


# ---- choosing the softmax heads ------------------------------------------------------------------

from headlab.core.errors import HeadlabError  # noqa: E402
from headlab.core.head_scores import HeadScores  # noqa: E402
from headlab.surgeon.compression.budget import cache_bytes_at  # noqa: E402
from headlab.surgeon.conversion.selection import (converted_cache_bytes, kl_greedy, softmax_choice,  # noqa: E402
                                                  static_ranking, uniform_pick, use_softmax_heads)
from headlab.surgeon.conversion.settings import ConversionSettings  # noqa: E402
from headlab.surgeon.kv_cache import cache_bytes  # noqa: E402


def test_uniform_picks_the_centres_of_equal_stretches():
    units = [(layer,) for layer in range(30)]
    assert uniform_pick(units, 3) == [(5,), (15,), (25,)]
    assert uniform_pick(units, 30) == units


def test_kl_greedy_chooses_what_exhaustive_greedy_chooses():
    """With a divergence whose gains shrink as units are added (a coverage function), lazy greedy picks
    what measuring every unit at every round picks, in fewer measurements."""
    cover = {"a": {1, 2, 3}, "b": {3, 4}, "c": {5, 8}, "d": {1, 2}, "e": {4, 5, 6, 7}}
    units = [(name,) for name in cover]
    calls = []

    def divergence(chosen):
        calls.append(chosen)
        return 8 - len(set().union(*(cover[u[0]] for u in chosen)))

    chosen, trace = kl_greedy(units, 3, divergence)
    exhaustive, left = [], list(units)
    for _ in range(3):
        best = min(left, key=lambda u: (divergence(exhaustive + [u]), units.index(u)))
        exhaustive.append(best)
        left.remove(best)
    assert chosen == exhaustive == [("e",), ("a",), ("c",)]
    assert [row["kl"] for row in trace] == [8, 4, 1, 0]
    assert trace[1]["measured"] == 5  # the first round measures every unit once
    assert sum(row["measured"] for row in trace) < 1 + 5 + 4 + 3


def test_score_rules_rank_kv_heads_and_layers_by_their_best_query_head():
    model = tiny_llama("gqa", layers=4)
    values = torch.zeros(4, 9)
    values[2, 7] = 3.0  # KV head 2 of layer 2
    values[0, 1] = 2.0  # KV head 0 of layer 0
    values[3, 4] = 1.0  # KV head 1 of layer 3
    scores = {"retrieval": HeadScores("retrieval", values, torch.ones(4, 9, dtype=torch.long), "tiny")}
    heads = static_ranking("retrieval", "heads", [0, 2, 3], model.config, scores)
    assert heads[:3] == [(2, 2), (0, 0), (3, 1)] and len(heads) == 9
    assert static_ranking("retrieval", "layers", [0, 2, 3], model.config, scores) == [(2,), (0,), (3,)]
    assert static_ranking("random", "heads", [0, 2], model.config, seed=1) == static_ranking(
        "random", "heads", [0, 2], model.config, seed=1) != static_ranking("random", "heads", [0, 2], model.config)


def test_the_cache_bytes_formula_is_what_the_caches_hold():
    model = converted(window=4)
    settings = converted_layers(model)[0].settings
    x = ids(batch=1, n=9)
    with torch.no_grad():
        cache = model(x, use_cache=True).past_key_values
        for step in range(14):
            cache = model(torch.tensor([[step % VOCAB]]), past_key_values=cache, use_cache=True).past_key_values
    assert cache_bytes(cache) == converted_cache_bytes(model.config, settings, 23)
    every_head = LinearSettings(layers=(1,), softmax_heads=((1, 0), (1, 1), (1, 2)))
    assert converted_cache_bytes(model.config, every_head, 23) == cache_bytes_at(model.config, 23)


def test_softmax_budgets_are_resolved_from_the_config_and_bad_ones_refused():
    config = tiny_llama("gqa", layers=4).config
    choice = softmax_choice(ConversionSettings(softmax="uniform", softmax_keep=0.25), config, [0, 1, 2, 3])
    assert choice.count == 3 and len(choice.heads) == 3
    layers = softmax_choice(ConversionSettings(softmax="uniform", softmax_unit="layers", softmax_keep=0.5), config,
                            [0, 1, 2, 3])
    assert layers.heads == tuple((layer, kv) for layer in (1, 3) for kv in range(3))
    cached = softmax_choice(ConversionSettings(softmax="random", softmax_cache=0.5, cache_length=4096,
                                               linear=LinearSettings(window=8)), config, [0, 1, 2, 3])
    chosen = LinearSettings(window=8, layers=(0, 1, 2, 3), softmax_heads=cached.heads)
    extra = next((layer, kv) for layer in range(4) for kv in range(3) if (layer, kv) not in cached.heads)
    one_more = LinearSettings(window=8, layers=(0, 1, 2, 3), softmax_heads=(*cached.heads, extra))
    assert converted_cache_bytes(config, chosen, 4096) <= 0.5 * cache_bytes_at(config, 4096)
    assert converted_cache_bytes(config, one_more, 4096) > 0.5 * cache_bytes_at(config, 4096)
    assert cached.count == len(cached.heads) == 5  # six would hold half the cache plus the converted heads' states
    with pytest.raises(HeadlabError, match="keeps all 12 heads"):
        softmax_choice(ConversionSettings(softmax="uniform", softmax_keep=1.0), config, [0, 1, 2, 3])
    with pytest.raises(HeadlabError, match="keeps none"):
        softmax_choice(ConversionSettings(softmax="uniform", softmax_keep=0.01), config, [0, 1, 2, 3])
    with pytest.raises(HeadlabError, match="the conversion alone holds"):
        softmax_choice(ConversionSettings(softmax="uniform", softmax_cache=0.001), config, [0, 1, 2, 3])
    with pytest.raises(HeadlabError, match="needs a scores file"):
        softmax_choice(ConversionSettings(softmax="retrieval"), config, [0, 1, 2, 3])


def test_use_softmax_heads_changes_modules_and_the_recorded_settings():
    model = converted()
    settings = use_softmax_heads(model, ((0, 2),))
    assert settings.softmax_heads == ((0, 2),)
    assert converted_layers(model)[0].softmax_kv == (2,) and converted_layers(model)[2].softmax_kv == ()
    assert all(layer.settings is settings for layer in converted_layers(model).values())


# ---- the convert command -------------------------------------------------------------------------

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from headlab.cli import main as headlab  # noqa: E402
from headlab.surgeon import load_model  # noqa: E402


@pytest.fixture
def tiny_base(tmp_path, smollm2):
    """A random 3-layer Llama (2 KV heads of 2 query heads; weights large enough that attention moves
    the logits) with SmolLM2's tokenizer, in a folder."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(smollm2[1]), hidden_size=24, head_dim=6, intermediate_size=37,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=True, initializer_range=0.3)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    smollm2[1].save_pretrained(tmp_path / "base")
    return tmp_path / "base"


QUICK = ["--steps", "2,1", "--window", "8", "--tokens", "48", "--accumulation", "1", "--eval-every", "1", "--windows", "2",
         "--gate-lengths", "128", "--gate-needles", "1"]


@pytest.mark.real_model
def test_convert_chooses_softmax_heads_by_kl_and_records_them(tiny_base, tmp_path):
    out = tmp_path / "kl"
    assert headlab(["convert", str(tiny_base), "--out", str(out), "--softmax-heads", "kl", "--softmax-keep", "0.5",
                    "--stage2-loss", "kl", *QUICK]) == 0
    record = json.loads((out / "headlab_conversion.json").read_text())
    assert record["provenance"]["stage2_loss"] == "kl"
    chosen = record["provenance"]["softmax"]
    assert chosen["rule"] == "kl" and chosen["count"] == 3 and len(chosen["heads"]) == 3
    assert record["settings"]["softmax_heads"] == chosen["heads"]
    kls = [row["kl"] for row in chosen["kl_trace"]]
    assert len(kls) == 4 and kls[-1] < kls[0]  # restoring softmax heads brings the model back toward the original
    model, _ = load_model(out)
    kept = [[layer, kv] for layer, module in converted_layers(model).items() for kv in module.softmax_kv]
    assert kept == chosen["heads"]
    cache = record["provenance"]["cache"]
    assert cache["converted_bytes"] == converted_cache_bytes(model.config, converted_layers(model)[0].settings, 4096)
    assert headlab(["stream-eval", str(out), "--base", "none", "--lengths", "128", "--needle-depths", "0.5",
                    "--needles", "1", "--windows", "1", "--out", str(tmp_path / "eval")]) == 0
    evaluation = json.loads((tmp_path / "eval" / "compression.json").read_text())
    assert [(row["full_heads"], row["keep"]) for row in evaluation["runs"]] == [(3, 0.5)]  # the softmax heads whole


@pytest.mark.real_model
def test_convert_refuses_bad_softmax_budgets_and_scores_before_loading(tiny_base, tmp_path, capsys, monkeypatch):
    from headlab.surgeon import models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    values = torch.rand(3, 4)
    scores = {"model_id": "another-model", "scores": {"retrieval": HeadScores(
        "retrieval", values, torch.ones(3, 4, dtype=torch.long), "another-model").to_dict()}}
    (tmp_path / "scores.json").write_text(json.dumps(scores))
    cases = [(["--softmax-heads", "retrieval", "--scores", str(tmp_path / "scores.json")], "another model"),
             (["--softmax-heads", "uniform", "--softmax-keep", "1"], "nothing would be converted"),
             (["--softmax-heads", "uniform", "--softmax-cache", "0.0001"], "the conversion alone holds"),
             (["--softmax-heads", "retrieval"], "needs a scores file"),
             (["--scores", str(tmp_path / "scores.json")], "--scores is read by --softmax-heads"),
             (["--softmax-unit", "layers"], "--softmax-unit need(s) --softmax-heads")]
    for extra, message in cases:
        assert headlab(["convert", str(tiny_base), "--out", str(tmp_path / "o"), *QUICK, *extra]) == 2, extra
        assert message in capsys.readouterr().err, extra


def test_the_distillation_loss_is_the_kl_to_the_original_model():
    """Stage 2's ``kl`` loss: the target is the original model (adapters off, every head softmax), so it
    equals the KL computed against an unconverted copy, and the layers keep their own softmax heads."""
    from headlab.surgeon.conversion.settings import lora_defaults
    from headlab.surgeon.conversion.training import add_lora, distillation_loss

    original, x = tiny_llama("gqa"), ids(batch=1)
    peft_model = add_lora(converted(), lora_defaults())
    with torch.no_grad():
        want = torch.log_softmax(original(x).logits.float(), -1)
        got = torch.log_softmax(peft_model(x).logits.float(), -1)
    expected = float((want.exp() * (want - got)).sum(-1).mean())
    loss = distillation_loss(peft_model, x)
    # the target's logits are the original's rebuilt in other orders: within reordering_tolerance, which
    # moves a log-softmax by at most twice that and a KL (a mean of p·(log p − log q)) by at most four times
    logits = original(x).logits
    tolerance = 4 * reordering_tolerance(forward_rounding_error(original, x), logits)
    assert expected > 10 * tolerance and abs(float(loss) - expected) <= tolerance
    loss.backward()
    trained = [n for n, p in peft_model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert trained and all("lora_" in n for n in trained)
    assert converted_layers(peft_model.base_model.model)[2].softmax_kv == (0, 2)


# ---- damaged checkpoints -------------------------------------------------------------------------

from headlab.core.errors import InputFileError  # noqa: E402


def _damaged(tmp_path, name, damage):
    """A saved converted checkpoint with one kind of damage."""
    folder = tmp_path / name
    save_converted(converted(), None, folder)
    damage(folder)
    return folder


def _edit_json(file, change):
    data = json.loads(file.read_text())
    change(data)
    file.write_text(json.dumps(data))


DAMAGE = {
    "heads doubled in the config": (lambda f: _edit_json(f / "config.json", lambda d: d.update(
        num_attention_heads=18, num_key_value_heads=6)), "but the config and the conversion give it shape"),
    "weights deleted": (lambda f: (f / "model.safetensors").unlink(), "has no model.safetensors"),
    "weights truncated": (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:-100]),
                          "the file is truncated or damaged"),
    "marker names layer 99": (lambda f: _edit_json(f / "headlab_conversion.json", lambda d: d["settings"].update(
        layers=[0, 2, 99])), "names layer(s) [99], but the config has 3 layers"),
    "marker not JSON": (lambda f: (f / "headlab_conversion.json").write_text("{"), "is damaged"),
    "softmax head beyond the layer": (lambda f: _edit_json(f / "headlab_conversion.json", lambda d: d["settings"].update(
        softmax_heads=[[0, 7]])), "names KV head(s) [7]"),
}


@pytest.mark.parametrize("name", sorted(DAMAGE))
def test_a_damaged_converted_checkpoint_is_refused_in_one_line(tmp_path, name):
    damage, message = DAMAGE[name]
    folder = _damaged(tmp_path, name.replace(" ", "-"), damage)
    with pytest.raises(InputFileError, match=re.escape(message)):
        load_model(folder)


@pytest.mark.parametrize("terrace", [True, False])
def test_recall_gate_bins_are_inside_or_outside_the_window_from_every_position(terrace):
    """A needle ``d`` tokens before the last position ``p`` is seen through the softmax window when
    ``p − d ≥ window_starts(p)``: every distance of the inside bin is, from every position; no distance of
    the other bins is, from any position."""
    from headlab.kernels.linear_torch import window_starts
    from headlab.probes.validation.recall_gate import distance_bins

    window = 16
    bins = distance_bins(window, terrace)
    positions = torch.arange(4 * window, 40 * window)
    starts = window_starts(positions, window, terrace)
    for name, (low, high) in bins.items():
        for distance in range(low, min(high, 30 * window)):
            seen = positions - distance >= starts
            assert bool(seen.all()) if name == "inside the window" else not bool(seen.any()), (name, distance)
