"""Tasks, choice log-probability scoring and the resumable ACT head search, on a tiny model."""

import json
from types import SimpleNamespace

import pytest
import torch
from bounds import choice_score_tolerance, largest_gap
from conftest import VOCAB, tiny_llama

from headlab.core.errors import InputFileError
from headlab.surgeon import Calibrate, Plan
from headlab.surgeon.search import calibration as search
from headlab.surgeon.hook import attach
from headlab.surgeon.search.accuracy import choice_batches, choice_logprobs, evaluate, score_batches
from headlab.surgeon.search.prefix import LayerPrefix
from headlab.surgeon.search.tasks import BUILTIN_TASKS, Example, load_task

pytestmark = pytest.mark.numerics  # run again in CI with one thread and narrower vector units


class CharTokenizer:
    """Characters as token ids (mod the tiny vocabulary), with a BOS-like id 1."""

    pad_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        ids = [2 + ord(c) % (VOCAB - 2) for c in text]
        return SimpleNamespace(input_ids=([1] if add_special_tokens else []) + ids)


@pytest.mark.parametrize("name", sorted(BUILTIN_TASKS))
def test_builtin_tasks_are_deterministic_valid_and_split(name):
    first = load_task(name, "calibration", 20, seed=3)
    assert first == load_task(name, "calibration", 20, seed=3)
    assert first != load_task(name, "test", 20, seed=3)
    for ex in first:
        assert 0 <= ex.label < len(ex.choices) and len(set(ex.choices)) == len(ex.choices)
    assert len({ex.label for ex in load_task(name, "test", 60)}) > 1, "labels must vary"


def test_jsonl_tasks_split_in_halves_and_bad_lines_are_reported(tmp_path):
    path = tmp_path / "task.jsonl"
    lines = [{"prompt": f"Q{i}:", "choices": [" a", " b"], "label": i % 2,
              "demonstrations": [{"prompt": "Q:", "answer": " a"}]} for i in range(10)]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    calib, test = load_task(str(path), "calibration"), load_task(str(path), "test")
    assert len(calib) == len(test) == 5
    assert {ex.prompt for ex in calib}.isdisjoint({ex.prompt for ex in test})
    assert calib[0].context().startswith("Q: a\n\nQ")
    path.write_text('{"prompt": "x", "choices": [" a"], "label": 0}\n{"prompt": "y"}\n')
    with pytest.raises(ValueError, match="task.jsonl:1"):
        load_task(str(path), "test")
    with pytest.raises(ValueError, match="unknown task"):
        load_task("no-such-task", "test")


def test_batched_scores_equal_one_sequence_at_a_time():
    model, tok = tiny_llama("gqa", layers=5), CharTokenizer()
    examples = [Example("ab =", (" 1", " 22", " 333"), 1), Example("a much longer prompt =", (" x", " yz"), 0)]
    batched = choice_logprobs(model, tok, examples, batch_size=4)
    for ex, scores in zip(examples, batched):
        for choice, score in zip(ex.choices, scores):
            ids = tok(ex.context()).input_ids + tok(choice, add_special_tokens=False).input_ids
            n_ctx = len(tok(ex.context()).input_ids)
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)
            want = sum(logp[i - 1, ids[i]].item() for i in range(n_ctx, len(ids)))
            assert score == pytest.approx(want, abs=1e-4)
    result = evaluate(model, tok, examples)
    assert result.correct == [max(range(len(s)), key=s.__getitem__) == ex.label for s, ex in zip(batched, examples)]


class Killed(Exception):
    """Stands for the process being killed mid-search."""


def test_the_head_search_resumes_where_it_stopped(tmp_path, monkeypatch):
    model, tok = tiny_llama("gqa", layers=5), CharTokenizer()
    examples = load_task("arithmetic", "calibration", 6)
    candidates = tuple(search.default_candidates(model, [2, 3]))
    settings = search.SearchSettings(("arithmetic",), len(examples), candidates, threshold=0.05)
    complete = search.calibration_search(model, tok, examples, settings, tmp_path / "full.json")

    calls, killed = [], []
    real_measure = search.measure_layer

    def dying_measure(*args, **kwargs):
        for edit, result in real_measure(*args, **kwargs):
            if len(calls) == 4 and not killed:
                killed.append(True)
                raise Killed  # the search is killed while measuring its fifth head
            calls.append(edit)
            yield edit, result

    monkeypatch.setattr(search, "measure_layer", dying_measure)
    with pytest.raises(Killed):
        search.calibration_search(model, tok, examples, settings, tmp_path / "run.json")
    calls.clear()
    resumed = search.calibration_search(model, tok, examples, settings, tmp_path / "run.json")
    assert len(calls) == len(candidates) - 4, "only the heads not yet measured are evaluated again"
    assert resumed["heads"] == complete["heads"] and resumed["kept"] == complete["kept"]
    assert resumed["baseline"] == complete["baseline"]
    other = search.SearchSettings(("arithmetic",), len(examples), candidates, beta=0.2)
    with pytest.raises(InputFileError, match="other settings"):
        search.calibration_search(model, tok, examples, other, tmp_path / "run.json")
    state = json.loads((tmp_path / "run.json").read_text())
    state["pieces"]["2,1"] = 0.987654  # a head's accuracy set by hand
    (tmp_path / "run.json").write_text(json.dumps(state))
    with pytest.raises(InputFileError, match="changed after headlab wrote it"):
        search.calibration_search(model, tok, examples, settings, tmp_path / "run.json")
    plan = search.plan_from_search(model, "tiny", {"kept": [[2, 1], [3, 4], [2, 5]]}, 0.4, 0.05)
    assert plan.edits == [Calibrate(2, (1, 5), beta=0.4, threshold=0.05), Calibrate(3, (4,), beta=0.4, threshold=0.05)]


def _one_head_at_a_time(model, tok, examples, candidates, beta, threshold):
    """Each head's plan evaluated on its own with the whole model: what the search must reproduce."""
    return {f"{layer},{head}": evaluate(model, tok, examples, Plan([Calibrate(layer, (head,), beta, threshold)])).accuracy
            for layer, head in candidates}


def test_scores_from_a_kept_layer_input_equal_the_whole_forward():
    model, tok = tiny_llama("gqa", layers=5), CharTokenizer()
    examples = load_task("kv-recall", "test", 5)
    batches = choice_batches(tok, examples, 3)
    prefix = LayerPrefix(model, batches)
    tolerance = choice_score_tolerance(model, batches)  # the same forward, resumed from a stored layer input
    for layer in (3, 2, 4, 0, 4):  # forwards, backwards (from the embeddings again) and repeated
        prefix.advance(layer)
        assert prefix.layer == layer
        for plan in (Plan(), Plan([Calibrate(layer if layer >= 2 else 2, (1, 4), beta=0.0, threshold=0.02)])):
            whole = choice_logprobs(model, tok, examples, plan, batch_size=3)
            with attach(model, plan):
                from_prefix = score_batches(batches, len(examples), prefix.forward)
            assert largest_gap(from_prefix, whole) <= tolerance
    assert not any("forward" in vars(block) for block in prefix.blocks), "the blocks' own forwards are restored"


def test_a_forward_set_on_a_block_before_the_prefix_is_put_back():
    model, tok = tiny_llama("gqa", layers=5), CharTokenizer()
    examples = load_task("kv-recall", "test", 2)
    batches = choice_batches(tok, examples, 4)
    calls = []
    block = model.model.layers[1]
    own = block.forward

    def wrapper(*args, **kwargs):  # stands for accelerate's offloading wrapper
        calls.append(1)
        return own(*args, **kwargs)

    block.forward = wrapper
    prefix = LayerPrefix(model, batches)
    prefix.advance(3)
    prefix.forward(0, batches[0])
    assert vars(block)["forward"] is wrapper
    calls.clear()
    choice_logprobs(model, tok, examples)
    assert calls, "the block runs through its wrapper again"


def test_the_search_measures_what_each_head_alone_measures(tmp_path):
    model, tok = tiny_llama("gqa", layers=5), CharTokenizer()
    examples = load_task("arithmetic", "calibration", 12)
    candidates = tuple(search.default_candidates(model, [3, 2]))
    settings = search.SearchSettings(("arithmetic",), len(examples), candidates, beta=0.0, threshold=0.02)
    state = search.calibration_search(model, tok, examples, settings, tmp_path / "s.json", batch_size=5)
    assert state["heads"] == _one_head_at_a_time(model, tok, examples, candidates, 0.0, 0.02)
    assert state["baseline"] == evaluate(model, tok, examples).accuracy
    assert len(set(state["heads"].values())) > 1, "the heads must differ for the comparison to mean something"


@pytest.mark.slow
def test_the_search_on_smollm2_measures_what_each_head_alone_measures(tmp_path, smollm2):
    model, tok = smollm2
    examples = load_task("kv-recall", "calibration", 8)
    candidates = ((3, 4), (15, 2), (27, 7))
    settings = search.SearchSettings(("kv-recall",), len(examples), candidates, beta=0.0)
    state = search.calibration_search(model, tok, examples, settings, tmp_path / "s.json")
    assert state["heads"] == _one_head_at_a_time(model, tok, examples, candidates, 0.0, settings.threshold)
    batches = choice_batches(tok, examples, 16)
    prefix = LayerPrefix(model, batches)
    prefix.advance(15)
    plan = Plan([Calibrate(15, (2,), beta=0.0)])
    whole = choice_logprobs(model, tok, examples, plan)
    with attach(model, plan):
        assert score_batches(batches, len(examples), prefix.forward) == whole
    assert whole != choice_logprobs(model, tok, examples), "the edit must change the scores"


def test_a_plan_changes_scores_and_an_empty_plan_does_not():
    model, tok = tiny_llama("gqa", layers=5), CharTokenizer()
    examples = load_task("kv-recall", "test", 3)
    plain = choice_logprobs(model, tok, examples)
    assert choice_logprobs(model, tok, examples, Plan()) == plain
    edited = choice_logprobs(model, tok, examples, Plan([Calibrate(2, tuple(range(9)), beta=0.0, threshold=0.02)]))
    assert edited != plain
