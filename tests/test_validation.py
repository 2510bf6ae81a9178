"""Masking validation: random control sets, masking plans, the statistics, the held-out needle task
(shared prefill exact, teacher-forced log-probabilities equal to step-by-step decoding), the file
and the command."""

import json
import random

import numpy as np
import pytest
import torch
from conftest import CharTokenizer, tiny_llama

from headlab.core.text import TextWindows
from headlab.cli import main
from headlab.probes.validation.masking import (eligible_heads, head_means, masking_plan, matched_random_set,
                                               random_sets, top_heads)
from headlab.probes.validation.statistics import bootstrap_intervals, paired_p, rank_p
from headlab.probes.scorers.needles import HELDOUT_NEEDLES, NEEDLES
from headlab.core.head_scores import HeadScores
from headlab.probes.validation.settings import MaskingSettings, ValidationSettings
from headlab.probes.validation.run import NeedleTask, validate_score
from headlab.probes.validation.file import CURVE_FORMAT, load_curve
from headlab.probes.figures import plotly_file_name
from headlab.probes.validation.page import write_curve_page
from headlab.surgeon import HeadMean, HeadScale, Uniform, attach
from headlab.core.errors import InputFileError


def planted_score(n_layers=4, n_heads=5, name="planted") -> HeadScores:
    values = torch.arange(n_layers * n_heads, dtype=torch.float32).flip(0).reshape(n_layers, n_heads) / 100
    return HeadScores(name, values, torch.ones(n_layers, n_heads), "tiny")  # (0, 0) ranks first with 0.19


def test_random_sets_match_the_top_heads_layers_and_skip_the_top_and_high_scorers():
    score = planted_score()
    top = top_heads(score, 7)  # layer 0: 5 heads, layer 1: 2 heads
    assert top == [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (1, 0), (1, 1)]
    sets = random_sets(score, top, 10, exclude_above=0.105, seed=3)
    assert sets == random_sets(score, top, 10, exclude_above=0.105, seed=3)
    assert sets != random_sets(score, top, 10, exclude_above=0.105, seed=4)
    for chosen in sets:
        assert len(set(chosen)) == 7 and not set(chosen) & set(top)
        assert all(score.values[layer, head] <= 0.105 for layer, head in chosen)
        # layer 0 holds only top heads and layer 1 one eligible head, (1, 4) at 0.10 ((1, 2), (1, 3) score
        # above 0.1): layer 0's five come from (1, 4) and four of layer 2, layer 1's two from layers 2 and 3
        assert sorted(layer for layer, _ in chosen) == [1, 2, 2, 2, 2, 2, 3]
    eligible = eligible_heads(score, top, 0.105)
    assert (1, 4) in eligible and (1, 3) not in eligible and (0, 0) not in eligible


def test_a_matched_set_keeps_each_layers_count_when_it_can():
    eligible = {(layer, head) for layer in range(6) for head in range(4)}
    top = [(1, 7), (1, 8), (4, 9)]
    for seed in range(20):
        chosen = matched_random_set(top, set(eligible), random.Random(seed))
        assert sorted(layer for layer, _ in chosen) == [1, 1, 4]
    with pytest.raises(ValueError, match="eligible"):
        matched_random_set(top, {(0, 0), (0, 1)}, random.Random(0))


def test_masking_plans_of_each_mode():
    heads = [(2, 4), (0, 1), (2, 0)]
    uniform = masking_plan(heads, "uniform")
    assert [(type(e), e.layer, e.heads, e.rows) for e in uniform.edits] == [(Uniform, 0, (1,), "decode"),
                                                                           (Uniform, 2, (0, 4), "decode")]
    zero = masking_plan(heads, "zero")
    assert [(type(e), e.heads, e.scale) for e in zero.edits] == [(HeadScale, (1,), 0.0), (HeadScale, (0, 4), 0.0)]
    means = {head: [float(head[1])] * 6 for head in heads}
    mean = masking_plan(heads, "mean", means=means)
    assert isinstance(mean.edits[1], HeadMean) and mean.edits[1].means == ((0.0,) * 6, (4.0,) * 6)


def test_head_means_equal_the_mean_of_the_tapped_outputs():
    model = tiny_llama("gqa", layers=3)
    windows = [torch.randint(1, 97, (1, n), generator=torch.Generator().manual_seed(n)) for n in (7, 12)]
    means = head_means(model, windows, {(1, 2), (2, 0)})
    from headlab.surgeon import Taps

    outputs = []
    for ids in windows:
        with attach(model, taps=Taps(head_outputs=[1])) as session:
            model(input_ids=ids)
        outputs.append(session.recording.head_output(1)[0, :, 2].double())
    expected = torch.cat(outputs).mean(0)
    assert torch.allclose(torch.tensor(means[(1, 2)], dtype=torch.float64), expected, atol=1e-7)


def test_rank_p_counts_the_sets_that_do_at_least_as_much_damage():
    top = np.array([0.1, 0.2, 0.0])
    random_ = np.array([[0.9, 0.8, 1.0]] * 19 + [[0.0, 0.0, 0.0]])
    assert rank_p(top, random_, higher_is_better=True) == pytest.approx(2 / 21)  # itself and the one worse set
    assert rank_p(top, random_[:19], higher_is_better=True) == pytest.approx(1 / 20)
    assert rank_p(top, random_[:19], higher_is_better=False) == pytest.approx(20 / 20)  # a loss that fell


def test_paired_p_is_small_for_a_consistent_drop_and_one_without_differences():
    gen = np.random.default_rng(0)
    random_ = gen.uniform(0.5, 1.0, size=(20, 30))
    drop = random_.mean(0) - gen.uniform(0.2, 0.4, size=30)
    assert paired_p(drop, random_, higher_is_better=True) < 1e-5
    assert paired_p(random_.mean(0) + 0.3, random_, higher_is_better=True) > 0.99
    assert paired_p(random_.mean(0), random_, higher_is_better=True) == 1.0


def test_bootstrap_intervals_cover_the_means_and_narrow_with_more_items():
    gen = np.random.default_rng(1)
    small, large = gen.normal(size=20), gen.normal(size=2000)
    rand_small, rand_large = gen.normal(1, 1, size=(5, 20)), gen.normal(1, 1, size=(5, 2000))
    wide = bootstrap_intervals(small, rand_small, 2000, seed=0)
    narrow = bootstrap_intervals(large, rand_large, 2000, seed=0)
    assert wide["top"][0] < small.mean() < wide["top"][1]
    assert narrow["difference"][0] < rand_large.mean() - large.mean() < narrow["difference"][1]
    assert np.diff(narrow["top"]) < np.diff(wide["top"]) / 5
    assert bootstrap_intervals(small, rand_small, 500, seed=2) == bootstrap_intervals(small, rand_small, 500, seed=2)


def test_held_out_needles_differ_from_the_scoring_needles():
    assert not {n.sentence for n in HELDOUT_NEEDLES} & {n.sentence for n in NEEDLES}
    for needle in HELDOUT_NEEDLES:
        assert needle.answer in needle.sentence


def test_loss_validation_on_a_tiny_model_matches_direct_masked_forwards(tmp_path):
    model = tiny_llama("gqa", layers=3)
    text = tmp_path / "text.txt"
    text.write_text("Some plain words of held-out text, repeated for windows. " * 40)
    score = planted_score(3, 6, "gradient")
    settings = ValidationSettings(text=TextWindows(text_path=str(text), windows=3, tokens=16),
                                  masking=MaskingSettings(ks=(2, 4), random_sets=3, mode="zero", bootstrap=200))
    curve = validate_score(model, CharTokenizer(), score, settings, progress=False)
    assert curve["metric"] == "loss" and curve["n_items"] == curve["n_used"] == 3
    top = curve["heads"]["top"]["2"]
    assert top == [(0, 0), (0, 1)]
    from headlab.core.text import load_text, token_windows

    windows = token_windows(CharTokenizer(), load_text(str(text)), 3, 16, 0)
    with torch.no_grad(), attach(model, masking_plan(top, "zero")):
        direct = [float(model(input_ids=w, labels=w).loss) for w in windows]
    assert curve["values"]["top"]["2"]["loss"] == pytest.approx(direct, abs=1e-6)
    first_set = curve["heads"]["random"]["4"][0]
    with torch.no_grad(), attach(model, masking_plan(first_set, "zero")):
        direct = [float(model(input_ids=w, labels=w).loss) for w in windows]
    assert curve["values"]["random"]["4"]["loss"][0] == pytest.approx(direct, abs=1e-6)
    summary = curve["summary"]["loss"]["by_k"]["4"]
    assert len(summary["random_set_means"]) == 3 and 1 / 4 <= summary["rank_p"] <= 1
    path = tmp_path / "validation-gradient.json"
    path.write_text(json.dumps(curve))
    loaded = load_curve(path)["summary"]["loss"]["by_k"]["4"]
    assert loaded["rank_p"] == summary["rank_p"] and list(loaded["top_ci"]) == summary["top_ci"]
    page = write_curve_page(load_curve(path), tmp_path / "v.html").read_text()
    assert "<script src='plotly-" in page and "masking-gradient" in page  # the figure, beside the shared plotly.js
    assert (tmp_path / plotly_file_name()).stat().st_size > 1_000_000


def test_curve_files_of_another_format_or_damaged_are_one_clear_error(tmp_path):
    path = tmp_path / "validation-x.json"
    path.write_text(json.dumps({"format": "headlab-masking-curve/1", "score": "x", "k": [1]}))
    with pytest.raises(InputFileError, match="not a masking validation of this headlab"):
        load_curve(path)
    path.write_text(json.dumps({"format": CURVE_FORMAT, "score": "x"}))
    with pytest.raises(InputFileError, match="missing key"):
        load_curve(path)
    path.write_text("{")
    with pytest.raises(InputFileError, match="not JSON"):
        load_curve(path)


@pytest.mark.slow
@pytest.mark.real_model
def test_needle_task_on_smollm2_shares_the_prefill_exactly_and_scores_the_answer_as_decoding_would(smollm2):
    """Uniform masking leaves the prefill alone, so a shared prefill gives what a prefill inside each
    masked session gives, bit for bit; the teacher-forced answer log-probability equals feeding the
    answer one token at a time under the same plan (within fp32 rounding of batched vs single rows)."""
    model, tokenizer = smollm2
    settings = ValidationSettings(needle_lengths=(256,), needle_depths=(0.5,), n_needles=1, max_new_tokens=8)
    task = NeedleTask(model, tokenizer, settings, "uniform")
    prompt = task.prompts[0]
    plan = masking_plan([(15, 1), (16, 7), (20, 3)], "uniform")
    shared = task.evaluate(prompt, plan, task.prefill(prompt))
    own = task.evaluate(prompt, plan, None)
    assert shared == own
    answer = task.answer_ids(prompt)
    cache = task.prefill(prompt)
    logprobs = []
    with torch.no_grad(), attach(model, plan) as session:
        session.resume(prompt.length - 1)
        token = prompt.input_ids[:, -1:]
        for target in answer[0]:
            logits = model(input_ids=token, past_key_values=cache, use_cache=True).logits[0, -1].float()
            logprobs.append(float(torch.log_softmax(logits, -1)[target]))
            token = target.view(1, 1)
    assert shared["answer_logprob"] == pytest.approx(sum(logprobs) / len(logprobs), abs=1e-4)
    unmasked = task.evaluate(prompt, None, task.prefill(prompt))
    assert unmasked["answer_logprob"] != pytest.approx(shared["answer_logprob"], abs=1e-3)


@pytest.mark.real_model
def test_validate_command_with_loss_on_smollm2(smollm2, tmp_path):
    shape = (30, 9)
    values = torch.rand(*shape, generator=torch.Generator().manual_seed(0))
    scores = {"scores": {"gradient_importance": HeadScores("gradient_importance", values, torch.ones(*shape),
                                                          "smollm2-135m").to_dict()}}
    (tmp_path / "scores.json").write_text(json.dumps(scores))
    out = tmp_path / "out"
    argv = ["validate", "smollm2-135m", "--scores", str(tmp_path / "scores.json"), "--score", "gradient_importance",
            "--out", str(out), "--ks", "3", "--random-sets", "2", "--windows", "2", "--tokens", "24"]
    assert main(argv) == 0
    curve = load_curve(out / "validation-gradient_importance.json")
    assert curve["metric"] == "loss" and curve["mode"] == "uniform"
    assert len(curve["values"]["random"]["3"]["loss"]) == 2
    assert curve["summary"]["loss"]["by_k"]["3"]["top_mean"] != curve["summary"]["loss"]["baseline_mean"]
    assert (out / "validation-gradient_importance.html").stat().st_size > 1000
    assert main(argv[:4] + ["--score", "retrieval", "--out", str(out)]) == 2


def _without_seconds(curve: dict) -> dict:
    return {key: value for key, value in curve.items() if key != "seconds"}


def test_an_interrupted_loss_validation_resumes_after_its_last_window(tmp_path, monkeypatch):
    """Ctrl-C in the second window: the journal holds the first; started again, the validation measures
    only the windows it lacks and gives the curve of an uninterrupted one."""
    from headlab.probes.validation.run import LossTask

    model = tiny_llama("gqa", layers=3)
    text = tmp_path / "text.txt"
    text.write_text("Some plain words of held-out text, repeated for windows. " * 40)
    score = planted_score(3, 6, "gradient")
    settings = ValidationSettings(text=TextWindows(text_path=str(text), windows=3, tokens=16),
                                  masking=MaskingSettings(ks=(2,), random_sets=2, mode="zero", bootstrap=200))
    journal = tmp_path / "validation-gradient.progress.json"
    evaluate, calls = LossTask.evaluate, []

    def interrupted(self, window, plan):
        if len(calls) == 4:  # unmasked, top-2 and two random sets of the first window, then the second's
            raise KeyboardInterrupt
        calls.append(1)
        return evaluate(self, window, plan)

    monkeypatch.setattr(LossTask, "evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        validate_score(model, CharTokenizer(), score, settings, progress=False, journal_path=journal)
    assert list(json.loads(journal.read_text())["pieces"]) == ["0"]
    calls.clear()
    monkeypatch.setattr(LossTask, "evaluate", lambda self, w, p: calls.append(1) or evaluate(self, w, p))
    resumed = validate_score(model, CharTokenizer(), score, settings, progress=False, journal_path=journal)
    assert len(calls) == 8  # windows 1 and 2 only
    fresh = validate_score(model, CharTokenizer(), score, settings, progress=False)
    assert _without_seconds(resumed) == _without_seconds(fresh)
    other = ValidationSettings(text=TextWindows(text_path=str(text), windows=3, tokens=16),
                               masking=MaskingSettings(ks=(3,), random_sets=2, mode="zero", bootstrap=200))
    with pytest.raises(InputFileError, match="holds a validation of other settings"):
        validate_score(model, CharTokenizer(), score, other, progress=False, journal_path=journal)


@pytest.mark.slow
def test_an_interrupted_needle_validation_resumes_and_the_command_removes_its_journal(smollm2, tmp_path, monkeypatch):
    from headlab.probes.validation.run import NeedleTask as Task

    shape = (30, 9)
    values = torch.rand(*shape, generator=torch.Generator().manual_seed(0))
    scores = {"scores": {"retrieval": HeadScores("retrieval", values, torch.ones(*shape), "smollm2-135m").to_dict()}}
    (tmp_path / "scores.json").write_text(json.dumps(scores))
    out = tmp_path / "out"
    argv = ["validate", "smollm2-135m", "--scores", str(tmp_path / "scores.json"), "--score", "retrieval",
            "--out", str(out), "--ks", "2", "--random-sets", "1", "--needles", "1", "--needle-lengths", "160",
            "--needle-depths", "0.3,0.7"]
    measure, calls = Task._measure, []

    def interrupted(self, *args):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return measure(self, *args)

    monkeypatch.setattr(Task, "_measure", interrupted)
    assert main(argv) == 130
    journal = out / "validation-retrieval.progress.json"
    assert list(json.loads(journal.read_text())["pieces"]) == ["0"]
    calls.clear()
    monkeypatch.setattr(Task, "_measure", lambda self, *args: calls.append(1) or measure(self, *args))
    assert main(argv) == 0
    assert len(calls) == 1 and not journal.exists()
    resumed = load_curve(out / "validation-retrieval.json")
    model, tokenizer = smollm2
    settings = ValidationSettings(masking=MaskingSettings(ks=(2,), random_sets=1), n_needles=1,
                                  needle_lengths=(160,), needle_depths=(0.3, 0.7))
    score = HeadScores("retrieval", values, torch.ones(*shape), "smollm2-135m")
    fresh = json.loads(json.dumps(validate_score(model, tokenizer, score, settings, "smollm2-135m", progress=False)))
    assert resumed["values"] == fresh["values"] and resumed["items"] == fresh["items"]
