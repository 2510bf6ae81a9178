"""The toy extensions of ``toys.py`` (an edit kind, a score family, an SAE architecture, a command), each
registered from that file alone, work end to end: plans, the hook, the report, training and saving, the
command line."""

import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from conftest import CharTokenizer, padded_batch, tiny_llama
from toys import Negate, Sharpen

from headlab.cli import main
from headlab.core.errors import HeadlabError
from headlab.core.text import TextWindows
from headlab.probes import ReportSettings, write_report
from headlab.surgeon import Plan, PlanError, Taps, attach, model_shape
from headlab.surgeon.edits.base import Edit, register_edit


def test_a_toy_edit_kind_round_trips_through_a_plan_file_and_runs_in_the_hook(tmp_path):
    model = tiny_llama("gqa")
    ids, mask = padded_batch([9, 6], 9, "left")
    plan = Plan([Sharpen(1, (2, 4), temperature=0.25), Negate(2, (1,))])
    plan.save(tmp_path / "plan.json")
    loaded = Plan.load(tmp_path / "plan.json")
    assert loaded.edits == plan.edits
    with pytest.raises(PlanError, match="temperature"):
        Plan.from_dict({**plan.to_dict(), "edits": [{"kind": "toy_sharpen", "layer": 1, "heads": [2],
                                                      "temperature": -1.0}]})
    taps = Taps(attention={1: None})
    with torch.no_grad(), attach(model, taps=taps) as plain:
        model(input_ids=ids, attention_mask=mask)
    with torch.no_grad(), attach(model, loaded, taps=taps) as edited:
        model(input_ids=ids, attention_mask=mask)
    before, after = plain.recording.attention_map(1), edited.recording.attention_map(1)
    valid = mask.bool()
    for head in (2, 4):  # softmax(s / T) = a^(1/T) renormalised
        sharpened = before[:, head] ** 4
        expected = sharpened / sharpened.sum(-1, keepdim=True)
        assert torch.allclose(after[:, head][valid], expected[valid], atol=1e-5)
    assert torch.equal(after[:, 0][valid], before[:, 0][valid])


def test_a_toy_output_kind_equals_negating_the_output_projections_input():
    model = tiny_llama("mha")
    ids = torch.randint(1, 97, (1, 11), generator=torch.Generator().manual_seed(3))
    head_dim = model_shape(model).head_dim
    projection = model.model.layers[2].self_attn.o_proj

    def negate(module, args):
        z = args[0].unflatten(-1, (-1, head_dim)).clone()
        z[..., 1, :] = -z[..., 1, :]
        return (z.flatten(-2),)

    handle = projection.register_forward_pre_hook(negate)
    try:
        with torch.no_grad():
            expected = model(input_ids=ids).logits
    finally:
        handle.remove()
    with torch.no_grad(), attach(model, Plan([Negate(2, (1,))])):
        got = model(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-6)


def test_registering_a_kind_under_a_taken_name_or_an_unknown_stage_fails():
    with pytest.raises(ValueError, match="registered already"):
        @register_edit
        @dataclass(frozen=True)
        class Again(Edit):
            kind: ClassVar[str] = "toy_negate"
            stage: ClassVar[str] = "output"

    with pytest.raises(ValueError, match="stage"):
        @register_edit
        @dataclass(frozen=True)
        class Nowhere(Edit):
            kind: ClassVar[str] = "toy_nowhere"
            stage: ClassVar[str] = "after"


def test_a_toy_score_family_reaches_the_report_scores_json_and_the_command_line(tmp_path):
    from headlab.cli import build_parser

    model = tiny_llama("gqa")
    settings = ReportSettings(text=TextWindows(windows=2, tokens=24), families=("toy-query-norms",), n_views=1)
    write_report(model, CharTokenizer(), "tiny", tmp_path / "out", settings, progress=False)
    data = json.loads((tmp_path / "out" / "scores.json").read_text())
    expected = model.model.layers[1].self_attn.q_proj.weight[6:12].detach().norm()
    assert data["scores"]["query_norm"]["values"][1][1] == pytest.approx(float(expected), rel=1e-6)
    assert "norm of W_q per head" in (tmp_path / "out" / "report.html").read_text()
    report_help = _subcommand_help(build_parser(), "report")  # built from the settings and the registry
    assert _squeezed("toy-query-norms: the Frobenius norm") in _squeezed(report_help)
    with pytest.raises(HeadlabError, match="toy-nothing"):
        ReportSettings(families=("toy-nothing",))


def test_a_family_that_needs_a_decoder_is_skipped_with_its_reason_on_an_encoder(tmp_path):
    from headlab.probes.scorers.families import requested_families

    families, skipped = requested_families(ReportSettings(families=("toy-decoder-only", "context")), causal=False)
    assert [family.name for family in families] == ["context"]
    assert skipped == {"toy-decoder-only": "needs a causal language model"}


def _squeezed(text: str) -> str:
    """``text`` without whitespace (argparse wraps help lines, also at hyphens)."""
    return "".join(text.split())


def _subcommand_help(parser, name: str) -> str:
    for action in parser._subparsers._group_actions:
        if name in action.choices:
            return action.choices[name].format_help()
    raise LookupError(name)


def test_a_toy_sae_architecture_trains_saves_and_loads(tmp_path):
    from sae_worker import SETTINGS, Chunks

    from headlab.sae import ShuffleBuffer, SparseAutoencoder, Trainer, load_sae, save_sae
    from headlab.sae.settings import TrainSettings

    settings = TrainSettings(**{**SETTINGS.__dict__, "arch": "toy-absolute", "l1_coefficient": 0.01})
    sae = SparseAutoencoder(12, 48, "toy-absolute", n_heads=3, seed=0)
    before = sae.W_dec.detach().clone()
    Trainer(sae, ShuffleBuffer(Chunks(0), 16, 64, seed=0), settings).run(progress=False)
    assert not torch.equal(before, sae.W_dec)
    x = Chunks(1).chunk(0)
    pre = sae.pre_activations(x * sae.scale)
    assert torch.equal(sae.encode(x), pre.abs())
    save_sae(sae, tmp_path / "sae", "tiny", 0, "model.layers.0.self_attn.o_proj", 16)
    loaded, config = load_sae(tmp_path / "sae")
    assert config["headlab"]["arch"] == "toy-absolute" and config["architecture"] == "standard"
    torch.testing.assert_close(loaded.encode(x), sae.encode(x) / sae.scale, rtol=1e-5, atol=1e-5)
    assert _squeezed("toy-absolute: absolute values of the pre-activations") in _squeezed(
        _subcommand_help(_sae_parser(), "train"))


def _sae_parser():
    from headlab.cli import build_parser

    for action in build_parser()._subparsers._group_actions:
        if "sae" in action.choices:
            return action.choices["sae"]
    raise LookupError("sae")


def test_a_toy_command_is_one_module_the_command_line_finds(tmp_path, capsys):
    model = tiny_llama("gqa")
    model.save_pretrained(tmp_path / "model")
    assert main(["toy-count-heads", str(tmp_path / "model")]) == 0
    assert capsys.readouterr().out.strip() == "3 layers, 9 query heads, 3 KV heads"
    assert main(["toy-count-heads", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
