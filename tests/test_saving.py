"""Edited checkpoints (``headlab apply``, :func:`headlab.surgeon.saving.save_edited`): on every family of
the matrix, static edits fold into weights that plain transformers loads, edits that read the input
reload with headlab's ``load_model``, and both give the logits (and cached generations) of the live
plan; the folder never mixes layouts and never takes files headlab did not write."""

import json
import subprocess
import sys
import warnings

import pytest
import torch
from bounds import forward_rounding_error, reordering_tolerance
from families import BY_NAME, SUPPORTED, VOCAB, family_model
from headlab.core.errors import HeadlabError, OutputError, PlanError
from headlab.surgeon import (
    Calibrate,
    HeadMean,
    HeadScale,
    Plan,
    attach,
    load_model,
    model_shape,
)
from headlab.surgeon.hook import install, installed_plan, uninstall
from headlab.surgeon.saving import BASE_FOLDER, EDITED_FILE, save_edited
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.numerics


def batch():
    ids = torch.randint(3, VOCAB, (2, 19), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    return ids, mask


def live_logits(model, plan, ids, mask):
    with torch.no_grad(), attach(model, plan):
        return model(input_ids=ids, attention_mask=mask).logits


def logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def assert_same_logits(model, reloaded, expected, ids, mask):
    got = logits(reloaded, ids, mask)
    valid = mask.bool()
    tolerance = reordering_tolerance(forward_rounding_error(model, ids), expected[valid])  # padded rows: NaN in some families
    assert (got[valid] - expected[valid]).abs().max() <= tolerance


def eager_experts(model):
    """Tiny MoE models have odd sizes, which transformers' grouped expert kernel refuses; the matrix runs
    its experts eagerly (as ``families.family_model`` builds them)."""
    if getattr(model.config, "_experts_implementation", None):
        model.set_experts_implementation("eager")
    return model


def static_plan(shape):
    """Scaling, ablation and a mean replacement composed on one layer, a scale on another."""
    mean = tuple(0.25 * (i + 1) for i in range(shape.head_dim))
    return Plan([HeadScale(1, (0, 2), 0.5), HeadMean(2, (1,), (mean,)), HeadScale(2, (1, 3), 2.0),
                 HeadScale(3, (4,), 0.0)])


@pytest.mark.parametrize("name", SUPPORTED)
def test_static_edits_fold_into_weights_that_plain_transformers_loads(name, tmp_path):
    model = family_model(name)
    plan = static_plan(model_shape(model))
    ids, mask = batch()
    expected = live_logits(model, plan, ids, mask)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    saved = save_edited(model, None, plan, tmp_path / "edited")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "saving changed the live model"
    if BY_NAME[name].mean_folds:
        assert saved.layout == "folded" and not saved.kept.edits
        reloaded = eager_experts(AutoModelForCausalLM.from_pretrained(tmp_path / "edited")).eval()  # no headlab hook
    else:  # no bias to hold the replaced mean: saved as the model and its plan
        assert saved.layout == "hooked" and "no bias" in " ".join(saved.reasons)
        assert not (tmp_path / "edited" / "config.json").exists()
        reloaded, _ = load_model(tmp_path / "edited")
        eager_experts(reloaded)
    assert_same_logits(model, reloaded, expected, ids, mask)


@pytest.mark.parametrize("name", SUPPORTED)
def test_scaling_and_ablation_fold_on_every_family(name, tmp_path):
    model = family_model(name)
    plan = Plan([HeadScale(0, (1,), 3.0), HeadScale(2, (0, 4), 0.0)])
    ids, mask = batch()
    expected = live_logits(model, plan, ids, mask)
    assert save_edited(model, None, plan, tmp_path / "edited").layout == "folded"
    reloaded = eager_experts(AutoModelForCausalLM.from_pretrained(tmp_path / "edited")).eval()
    assert_same_logits(model, reloaded, expected, ids, mask)


@pytest.mark.parametrize("name", SUPPORTED)
def test_edits_that_read_the_input_reload_with_the_plan_installed(name, tmp_path):
    model = family_model(name)
    plan = Plan([Calibrate(2, (0, 1, 2, 3, 4), beta=0.4, threshold=0.05), HeadScale(3, (2,), 0.0)])
    ids, mask = batch()
    expected = live_logits(model, plan, ids, mask)
    saved = save_edited(model, None, plan, tmp_path / "edited")
    assert saved.layout == "hooked" and saved.kept.edits == plan.edits
    with pytest.raises((OSError, ValueError)):  # plain transformers refuses it rather than loading it unedited
        AutoModelForCausalLM.from_pretrained(tmp_path / "edited")
    reloaded, _ = load_model(tmp_path / "edited")
    eager_experts(reloaded)
    assert installed_plan(reloaded).edits == plan.edits
    assert_same_logits(model, reloaded, expected, ids, mask)
    kwargs = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad(), attach(model, plan):
        live = model.generate(ids, **kwargs)
    with torch.no_grad():
        again = reloaded.generate(ids, **kwargs)
    assert torch.equal(live, again)


def test_an_installed_plan_runs_before_attached_edits_and_comes_off(tmp_path):
    model = family_model("llama")
    ids, mask = batch()
    first, second = Plan([Calibrate(2, (0, 1), beta=0.3)]), Plan([HeadScale(3, (1,), 0.0)])
    together = live_logits(model, first.then(second), ids, mask)
    plain = logits(model, ids, mask)
    install(model, first)
    try:
        assert not torch.equal(logits(model, ids, mask), plain)
        assert torch.equal(live_logits(model, second, ids, mask), together)
        assert installed_plan(model) is first  # back after the attach
        with pytest.raises(PlanError, match="installed already"):
            install(model, second)
    finally:
        assert uninstall(model) is first
    assert torch.equal(logits(model, ids, mask), plain)


def test_saving_an_installed_model_keeps_its_plan(tmp_path):
    model = family_model("llama")
    ids, mask = batch()
    first, second = Plan([Calibrate(2, (0, 1), beta=0.3)]), Plan([HeadScale(3, (1,), 0.5)])
    expected = live_logits(model, first.then(second), ids, mask)
    install(model, first)
    try:
        saved = save_edited(model, None, second, tmp_path / "edited")
    finally:
        uninstall(model)
    assert saved.kept.edits == first.edits + second.edits
    reloaded, _ = load_model(tmp_path / "edited")
    assert_same_logits(model, reloaded, expected, ids, mask)


def test_a_wrong_fold_is_caught_before_the_folder_is_written(tmp_path, monkeypatch):
    model = family_model("llama")

    def wrong(self, scale, shift):  # the scale lands on the next head
        scale = scale.clone()
        scale[[(h + 1) % scale.numel() for h in self.heads]] *= self.scale
        return scale, shift

    monkeypatch.setattr(HeadScale, "affine", wrong)
    with pytest.raises(HeadlabError, match="away from the live plan"):
        save_edited(model, None, Plan([HeadScale(2, (0,), 0.0)]), tmp_path / "edited")
    assert not (tmp_path / "edited" / EDITED_FILE).exists() and not (tmp_path / "edited" / "config.json").exists()


def test_layouts_never_mix_and_foreign_folders_are_refused(tmp_path):
    model = family_model("llama")
    out = tmp_path / "edited"
    save_edited(model, None, Plan([HeadScale(2, (0,), 0.0)]), out)
    assert (out / "config.json").is_file()
    save_edited(model, None, Plan([Calibrate(2, (0,), beta=0.3)]), out)  # headlab's own folder: rewritten
    assert not (out / "config.json").exists() and (out / BASE_FOLDER / "config.json").is_file()
    assert json.loads((out / EDITED_FILE).read_text())["layout"] == "hooked"
    save_edited(model, None, Plan([HeadScale(2, (0,), 0.0)]), out)
    assert (out / "config.json").is_file() and not (out / BASE_FOLDER).exists()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(OutputError, match="did not write"):
        save_edited(model, None, Plan([HeadScale(2, (0,), 0.0)]), foreign)
    assert (foreign / "notes.txt").read_text() == "keep" and len(list(foreign.iterdir())) == 1


def test_plans_saved_from_python_record_their_model(tmp_path):
    model = family_model("llama")
    plan = Plan([HeadScale(2, (0,), 0.0)])
    with pytest.warns(UserWarning, match="records no model or shape"):
        plan.save(tmp_path / "unbound.json")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan.save(tmp_path / "bound.json", model=model)
    data = json.loads((tmp_path / "bound.json").read_text())
    assert data["shape"] == model_shape(model).to_dict() and data["model"] == (model.name_or_path or None)
    other = family_model("gemma")  # 5 KV heads, where llama's tiny model has one
    with pytest.raises(PlanError, match="made for a model of shape"):
        Plan.load(tmp_path / "bound.json").validate(model_shape(other))


def test_apply_command_writes_a_checkpoint_and_refuses_bad_plans_before_loading(tmp_path):
    model = family_model("llama")
    model.save_pretrained(tmp_path / "base")
    Plan([HeadScale(1, (0, 3), 0.0)]).save(tmp_path / "plan.json", model=model)
    Plan([]).save(tmp_path / "empty.json", model=model)
    with pytest.warns(UserWarning):  # saved without a model: only the apply command's check can refuse it
        Plan([HeadScale(1, (7,), 0.0)]).save(tmp_path / "wide.json")
    run = lambda plan, out: subprocess.run(
        [sys.executable, "-m", "headlab", "apply", str(tmp_path / "base"), "--plan", str(tmp_path / plan), "--out",
         str(tmp_path / out)], capture_output=True, text=True, check=False)
    done = run("plan.json", "edited")
    assert done.returncode == 0, done.stderr
    assert "transformers loads" in done.stdout
    ids, mask = batch()
    expected = live_logits(model, Plan([HeadScale(1, (0, 3), 0.0)]), ids, mask)
    assert_same_logits(model, AutoModelForCausalLM.from_pretrained(tmp_path / "edited"), expected, ids, mask)
    for plan, message in (("empty.json", "has no edits"), ("wide.json", "names head(s) [7]")):
        refused = run(plan, f"out-{plan}")
        assert refused.returncode != 0 and message in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1 and not (tmp_path / f"out-{plan}").exists()
