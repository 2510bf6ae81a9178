"""Sink-dimension, context-divergence and linear-probe head scores on tiny models whose answers are
known by construction, each checked against an independent computation."""

import json

import pytest
import torch
from conftest import CharTokenizer, tiny_llama

from headlab.core.errors import InputFileError
from headlab.probes.scorers.divergence import head_divergence, zero_outliers
from headlab.probes.scorers.labelled import load_labelled
from headlab.probes.scorers.probing import probe_heads
from headlab.probes.scorers.sinks import SinkSettings, massive_activations, sink_token_mask


def zero_value_group(model, layer: int, group: int) -> None:
    """Zero one KV head's value projection: its query heads then output exactly 0."""
    d = model.config.head_dim
    with torch.no_grad():
        model.model.layers[layer].self_attn.v_proj.weight[group * d:(group + 1) * d] = 0


def eager_maps(model, ids):
    model.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            return model(input_ids=ids, output_attentions=True).attentions
    finally:
        model.config._attn_implementation = "sdpa"


def test_sink_token_mask_marks_only_large_ratio_tokens():
    hidden = torch.randn(1, 6, 1024) * 0.1  # one large dim: phi <= sqrt(d_model)
    hidden[0, 2, 5] = 50.0
    assert sink_token_mask(hidden, [5], tau=20).tolist() == [[False, False, True, False, False, False]]
    assert not sink_token_mask(hidden, [], tau=20).any()
    assert not sink_token_mask(hidden, [4], tau=20).any()


def test_massive_activation_planted_in_an_embedding_is_found_and_scored():
    model = tiny_llama("gqa", layers=4)
    sink_id, dim = 5, 3
    with torch.no_grad():
        model.model.embed_tokens.weight[sink_id, dim] = 1e4
    gen = torch.Generator().manual_seed(0)
    windows = []
    for _ in range(3):
        ids = torch.randint(10, 90, (1, 20), generator=gen)
        ids[0, 0] = ids[0, 7] = sink_id
        windows.append(ids)
    result = massive_activations(model, windows, SinkSettings(abs_min=100, ratio_min=1000, tau=5))  # phi <= sqrt(54)
    assert result.sink_dims == [dim]
    assert all(entry["dim"] == dim and entry["token"] in (0, 7) for layer in result.top for entry in layer)
    assert result.sink_tokens == [2.0] * 4
    expected = torch.stack([torch.stack(eager_maps(model, ids))[:, 0][..., [0, 7]].sum(-1).mean(-1)
                            for ids in windows]).mean(0)  # [layer, head] mass on the two sink tokens
    assert torch.allclose(result.scores, expected, atol=1e-5)


@pytest.mark.parametrize("method", ["maps", "statistics"])
def test_sink_mass_counts_the_rows_from_the_first_sink_on_from_maps_or_statistics(method, monkeypatch):
    import headlab.probes.scorers.sinks as sinks

    monkeypatch.setattr(sinks, "scoring_method", lambda model, n_tokens: method)  # the report's choice by length
    model = tiny_llama("gqa", layers=4)
    sink_id, dim = 5, 3
    with torch.no_grad():
        model.model.embed_tokens.weight[sink_id, dim] = 1e4
    gen = torch.Generator().manual_seed(1)
    windows, sink_positions = [], ([0, 9], [0, 6], [4, 9])  # the first token marks the dimension in 2 of 3
    for positions in sink_positions:
        ids = torch.randint(10, 90, (1, 16), generator=gen)
        ids[0, positions] = sink_id
        windows.append(ids)
    result = massive_activations(model, windows, SinkSettings(abs_min=100, ratio_min=1000, tau=5))
    assert result.method == method and result.summary()["method"] == method and result.sink_dims == [dim]
    mass, rows = 0, 0  # [layer, head]: the rows from each window's first sink on (rows 0-3 of the last do not)
    for ids, positions in zip(windows, sink_positions):
        maps = torch.stack(eager_maps(model, ids))[:, 0, :, positions[0]:]  # [layer, head, row, key]
        mass, rows = mass + maps[..., positions].sum(-1).sum(-1), rows + maps.shape[-2]
    expected = mass / rows
    # two fp32 routes to the same probabilities: logits (6-term dot products, |logit| < 0.2 in this seeded
    # model) differ by at most 6·eps each, so a probability by 2·6·eps relative plus the 16-key softmax sum's
    # 17·eps; a row sums two of them (each below 1) and the score is a mean of such rows
    bound = 2 * (2 * 6 + 17) * torch.finfo(torch.float32).eps
    assert torch.allclose(result.scores, expected, rtol=0, atol=bound)


def test_no_sink_dimension_means_not_analysed():
    model = tiny_llama("mha", layers=2)
    result = massive_activations(model, [torch.randint(10, 90, (1, 12))])
    assert result.sink_dims == [] and torch.isnan(result.scores).all()


def test_zero_outliers_needs_both_quantities_high():
    vhd = torch.tensor([[1.0, 1.0, 1.0, 10.0], [1.0, 1.0, 1.0, 10.0]])
    ta = torch.tensor([[1.0, 1.0, 1.0, 9.0], [9.0, 1.0, 1.0, 1.0]])
    assert zero_outliers(vhd, ta).tolist() == [[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 10.0]]


def test_head_divergence_matches_outputs_read_at_o_proj():
    model = tiny_llama("gqa")
    zero_value_group(model, layer=1, group=0)
    ids = torch.randint(1, 90, (1, 16), generator=torch.Generator().manual_seed(3))
    span = (1, 8)
    captured = {}

    def grab(layer):
        def hook(module, args):
            captured[layer] = args[0][0, -1].reshape(9, 6).double()
        return hook

    def outputs(x):
        hooks = [model.model.layers[l].self_attn.o_proj.register_forward_pre_hook(grab(l)) for l in range(3)]
        with torch.no_grad():
            model(input_ids=x)
        for h in hooks:
            h.remove()
        return torch.stack([captured[l] for l in range(3)])  # [layer, head, D]

    with_span = outputs(ids)
    without = outputs(torch.cat([ids[:, :1], ids[:, 8:]], dim=1))
    vhd, ta = head_divergence(model, ids, span)
    assert torch.allclose(vhd, (with_span - without).norm(dim=-1), atol=1e-5)
    assert torch.allclose(ta, without.pow(2).sum(-1), atol=1e-5)
    assert vhd[1, :3].abs().max() == 0 and (vhd[1, 3:] > 0).all() and (vhd[0] > 0).all()


def test_head_divergence_rejects_a_span_covering_the_query():
    with pytest.raises(ValueError):
        head_divergence(tiny_llama("mqa"), torch.randint(1, 90, (1, 10)), (2, 10))


def test_probe_accuracy_is_chance_for_a_silent_head_and_high_for_a_head_that_sees_the_label():
    model = tiny_llama("gqa")
    zero_value_group(model, layer=0, group=0)
    # the label is the last character; every head that outputs anything separates the two inputs
    examples = [("ABCDEFGH" + label, label) for label in "PQ" * 10]
    result = probe_heads(model, CharTokenizer(), examples, pool="last", folds=5)
    assert result.majority == 0.5 and result.labels == ["P", "Q"]
    assert result.accuracy[0, :3].tolist() == [0.5, 0.5, 0.5]
    assert (result.accuracy[0, 3:] == 1).all() and (result.accuracy[1:] == 1).all()


def test_labelled_data_errors(tmp_path):
    with pytest.raises(InputFileError, match="does not exist"):
        load_labelled(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "a", "label": 1}) + "\n{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        load_labelled(bad)
    bad.write_text(json.dumps({"text": "a"}) + "\n")
    with pytest.raises(ValueError, match="missing key.*'label'"):
        load_labelled(bad)
    with pytest.raises(ValueError, match="two labels"):
        probe_heads(tiny_llama("mqa"), CharTokenizer(), [("ab", 1)] * 6)
