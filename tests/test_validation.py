"""Masking validation: head choice, the masking plan and the curve harness."""

import json

import pytest
import torch

from conftest import tiny_llama
from headlab.cli import main
from headlab.probes.scores import HeadScores
from headlab.probes.validation import MaskingSettings, loss_metric, masking_curve, masking_plan, random_heads
from headlab.surgeon import attach


def planted_score(n_layers=4, n_heads=5) -> HeadScores:
    values = torch.arange(n_layers * n_heads, dtype=torch.float32).flip(0).reshape(n_layers, n_heads)
    return HeadScores("planted", values, torch.ones(n_layers, n_heads), "tiny")  # head (0, 0) ranks first


def test_random_heads_come_from_outside_the_top_and_follow_the_seed():
    score = planted_score()
    top = {(l, h) for l, h, _ in score.top(8)}
    drawn = random_heads(score, 4, seed=1, exclude_top=8)
    assert len(set(drawn)) == 4 and not set(drawn) & top
    assert drawn == random_heads(score, 4, seed=1, exclude_top=8)
    assert drawn != random_heads(score, 4, seed=2, exclude_top=8)
    assert len(random_heads(score, 15, seed=0, exclude_top=100)) == 15  # exclusion shrinks to leave 15
    with pytest.raises(ValueError, match="has 20"):
        random_heads(score, 21, seed=0, exclude_top=0)


def test_masking_plan_zeroes_exactly_those_heads():
    model = tiny_llama("mha", layers=3)
    ids = torch.randint(1, 97, (1, 11), generator=torch.Generator().manual_seed(0))
    plan = masking_plan([(2, 4), (0, 1), (2, 0)])
    assert [(e.layer, e.heads, e.scale) for e in plan.edits] == [(0, (1,), 0.0), (2, (0, 4), 0.0)]
    gates = torch.ones(3, 5)
    gates[0, 1] = gates[2, 0] = gates[2, 4] = 0.0
    with torch.no_grad(), attach(model, plan):
        masked = model(input_ids=ids).logits
    with torch.no_grad(), attach(model, gates=gates):
        gated = model(input_ids=ids).logits
    torch.testing.assert_close(masked, gated)


def test_curve_separates_a_score_that_names_the_needed_heads():
    score = planted_score()
    needed = {(l, h) for l, h, _ in score.top(5)}

    def metric(plan):  # a task that fails in proportion to the needed heads masked
        masked = {(e.layer, h) for e in (plan.edits if plan else []) for h in e.heads}
        return 1.0 - len(masked & needed) / len(needed)

    curve = masking_curve(score, metric, MaskingSettings(ks=(2, 5), seeds=3, exclude_top=5, metric="loss"),
                          progress=False)
    assert curve["baseline"] == 1.0 and curve["top"] == [0.6, 0.0]
    assert curve["random_mean"] == [1.0, 1.0] and len(curve["random"][1]) == 3
    assert curve["top_heads"]["2"] == [(0, 0), (0, 1)]


def test_loss_metric_matches_a_direct_masked_forward():
    model = tiny_llama("gqa", layers=3)
    windows = [torch.randint(1, 97, (1, 13), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    plan = masking_plan([(1, 3)])
    with torch.no_grad(), attach(model, plan):
        direct = sum(model(input_ids=w, labels=w).loss.item() for w in windows) / 2
    assert loss_metric(model, windows)(plan) == pytest.approx(direct)
    assert loss_metric(model, windows)(None) != pytest.approx(direct)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="metric"):
        MaskingSettings(metric="accuracy")


@pytest.mark.real_model
def test_validate_command_with_loss_on_smollm2(smollm2, tmp_path):
    shape = (30, 9)
    values = torch.rand(*shape, generator=torch.Generator().manual_seed(0))
    scores = {"scores": {"gradient_importance": HeadScores("gradient_importance", values, torch.ones(*shape),
                                                          "smollm2-135m").to_dict()}}
    (tmp_path / "scores.json").write_text(json.dumps(scores))
    out = tmp_path / "out"
    argv = ["validate", "smollm2-135m", "--scores", str(tmp_path / "scores.json"), "--score", "gradient_importance",
            "--out", str(out), "--ks", "3", "--seeds", "2", "--samples", "1", "--tokens", "24"]
    assert main(argv) == 0
    curve = json.loads((out / "validation-gradient_importance.json").read_text())
    assert curve["settings"]["metric"] == "loss" and len(curve["random"][0]) == 2
    assert curve["top"][0] != curve["baseline"]
    assert (out / "validation-gradient_importance.html").stat().st_size > 1000
    assert main(argv[:4] + ["--score", "retrieval", "--out", str(out)]) == 2
