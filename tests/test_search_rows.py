"""The head search's scorer that runs each sequence only from the head's first sink on, against
whole forwards under the same one-head plan."""

import dataclasses
import itertools
import random

import pytest
import torch
from bounds import choice_score_tolerance, largest_gap
from conftest import tiny_llama
from families import family_model
from test_evaluation import CharTokenizer

from headlab.surgeon import Calibrate, Plan, UnsupportedModelError
from headlab.surgeon.search import calibration as search
from headlab.surgeon.search import suffix
from headlab.surgeon.search.accuracy import choice_batches, choice_logprobs, evaluate
from headlab.surgeon.search.prefix import LayerPrefix
from headlab.surgeon.search.suffix import SuffixScorer, group_by_first_row
from headlab.surgeon.search.tasks import load_task

pytestmark = pytest.mark.numerics  # run again in CI with one thread and narrower vector units


def peaked_llama():
    """A tiny Llama with its query and key projections scaled 20×: peaked attention, whose sinks
    (at ACT's threshold 0.2) sit anywhere from the first to the last rows, or nowhere."""
    model = tiny_llama("gqa", layers=5)
    with torch.no_grad():
        for block in model.model.layers:
            block.self_attn.q_proj.weight.mul_(20.0)
            block.self_attn.k_proj.weight.mul_(20.0)
    return model


@torch.no_grad()
def continued_scores(model, batches, n_examples: int, split: int) -> list[list[float]]:
    """Unedited choice scores with each batch run as a prefill of its first ``split`` positions and
    a continuation of that cache (the model alone, as :func:`score_batches` scores)."""
    scores = [[] for _ in range(n_examples)]
    for batch in batches:
        first = model(input_ids=batch.input_ids[:, :split], attention_mask=batch.attention_mask[:, :split],
                      use_cache=True)
        rest = model(input_ids=batch.input_ids[:, split:], attention_mask=batch.attention_mask,
                     past_key_values=first.past_key_values)
        logprobs = torch.log_softmax(torch.cat([first.logits, rest.logits], 1)[:, batch.read].float(), -1)
        for row, (example, targets, at) in enumerate(batch.rows):
            scores[example].append(logprobs[row, at].gather(-1, targets[:, None]).sum().item())
    return scores


def identity_rounding(model, tok, examples, edit: Calibrate, unedited, batch_size: int) -> float:
    """How far the model's scores move when ``edit``'s layer is recomputed eagerly under beta 1,
    which changes no weight (the hook alone; no scorer)."""
    identity = dataclasses.replace(edit, beta=1.0)
    return largest_gap(choice_logprobs(model, tok, examples, Plan([identity]), batch_size=batch_size), unedited)


@pytest.mark.slow
def test_scores_from_the_first_sink_on_equal_whole_forwards(monkeypatch):
    model, tok = peaked_llama(), CharTokenizer()
    examples = load_task("arithmetic", "calibration", 12)
    batches = choice_batches(tok, examples, 5)
    prefix = LayerPrefix(model, batches)
    scorer = SuffixScorer(model, batches, prefix, len(examples))
    unedited = scorer.unedited_scores()  # kept layer inputs continued, against whole forwards
    assert largest_gap(unedited, choice_logprobs(model, tok, examples, batch_size=5)) <= choice_score_tolerance(
        model, batches)
    alone = LayerPrefix(model, batches)
    for layer in (1, 3, 4):  # the streams the unedited pass hands the prefix are the ones it finds itself
        alone.advance(layer)
        assert all(torch.equal(a, b) for a, b in zip(alone.states, prefix.known[layer], strict=True))
    starts, run, total = [], [0], [0]
    real_group = suffix.group_by_first_row

    def spied(items, *args, **kwargs):
        groups = real_group(items, *args, **kwargs)
        starts.extend(start for start, _ in groups)
        run[0] += len(items)
        return groups

    monkeypatch.setattr(suffix, "group_by_first_row", spied)
    heads = range(model.config.num_attention_heads)
    unedited = choice_logprobs(model, tok, examples, batch_size=5)
    continued = largest_gap(continued_scores(model, batches, len(examples), 12), unedited)
    for layer in (3, 2, 4):
        prefix.advance(layer)
        # the model's own rounding, from code other than the scorer: cache continued, layer recomputed
        noise = [max(continued, identity_rounding(model, tok, examples, Calibrate(layer, (h,)), unedited, 5))
                 for h in heads]
        for settings, order in ((dict(beta=0.0, threshold=0.2), heads),  # each head alone, then all side by side
                                (dict(beta=0.4, threshold=0.1, drop_first="none"), heads[::-1])):
            edits = [Calibrate(layer, (h,), **settings) for h in order]
            together = scorer.layer_scores(edits)
            for edit, scores in zip(edits, together):
                whole = choice_logprobs(model, tok, examples, Plan([edit]), batch_size=5)
                bound = 10 * noise[edit.heads[0]] + 1e-5
                assert largest_gap(scores, whole) <= bound, (edit, noise)
                assert largest_gap(scorer.scores(edit), whole) <= bound, (edit, noise)
            total[0] += 2 * len(edits) * len(scorer.sequences)
    assert 0 in starts and max(starts) > 15, "sinks from the first row to late rows must be covered"
    assert 0 < run[0] < total[0], "some sequences must keep their unedited scores"
    for unlike in ([Calibrate(4, (1,)), Calibrate(4, (2,), beta=0.1)], [Calibrate(4, (1, 2))],
                   [Calibrate(4, (1,)), Calibrate(4, (1,))], [Calibrate(3, (1,))], []):
        with pytest.raises(ValueError):
            scorer.layer_scores(unlike)


def test_the_search_on_a_peaked_model_measures_what_each_head_alone_measures(tmp_path):
    model, tok = peaked_llama(), CharTokenizer()
    examples = load_task("arithmetic", "calibration", 12)
    candidates = tuple(search.default_candidates(model, [2, 3, 4]))
    settings = search.SearchSettings(("arithmetic",), len(examples), candidates, beta=0.0, threshold=0.2)
    state = search.calibration_search(model, tok, examples, settings, tmp_path / "s.json", batch_size=5)
    alone = {f"{layer},{head}": evaluate(model, tok, examples, Plan([Calibrate(layer, (head,), 0.0, 0.2)])).accuracy
             for layer, head in candidates}
    assert state["heads"] == alone
    assert state["baseline"] == evaluate(model, tok, examples).accuracy
    assert len(set(state["heads"].values())) > 1, "the heads must differ for the comparison to mean something"


def _cost(groups, items, cost_rows):
    return sum(cost_rows + len(members) * (max(sum(items[m]) for m in members) - start) for start, members in groups)


def test_sequences_are_grouped_at_least_cost_over_adjacent_first_rows():
    rng = random.Random(0)
    for _ in range(60):
        items = [(rng.randrange(30), rng.randrange(1, 12)) for _ in range(rng.randrange(1, 8))]
        cost_rows, max_rows = rng.choice([0, 4, 32]), rng.choice([8, 40, 1024])
        groups = group_by_first_row(items, cost_rows, max_rows)
        assert sorted(m for _, members in groups for m in members) == list(range(len(items)))
        for start, members in groups:
            assert start == min(items[m][0] for m in members)
            rows = len(members) * (max(sum(items[m]) for m in members) - start)
            assert rows <= max_rows or len(members) == 1
        order = sorted(range(len(items)), key=lambda i: items[i])
        best = float("inf")
        for cuts in itertools.product([False, True], repeat=len(items) - 1):  # every split of the order
            bounds = [0] + [i + 1 for i, cut in enumerate(cuts) if cut] + [len(items)]
            split = [order[a:b] for a, b in zip(bounds, bounds[1:])]
            candidate = [(min(items[m][0] for m in members), members) for members in split]
            if all(len(m) == 1 or len(m) * (max(sum(items[i]) for i in m) - s) <= max_rows for s, m in candidate):
                best = min(best, _cost(candidate, items, cost_rows))
        assert _cost(groups, items, cost_rows) == best


def test_models_the_scorer_cannot_serve_are_refused_and_searched_whole(tmp_path):
    tok = CharTokenizer()
    examples = load_task("arithmetic", "calibration", 4)
    batches = choice_batches(tok, examples, 4)
    windowed = family_model("mistral")
    with pytest.raises(UnsupportedModelError, match="whole sequence"):
        SuffixScorer(windowed, batches, LayerPrefix(windowed, batches), len(examples))
    model = peaked_llama()
    with pytest.raises(UnsupportedModelError, match="0.0 GiB, over the budget of 0.0 GiB"):
        SuffixScorer(model, batches, LayerPrefix(model, batches), len(examples), cache_budget=1000)
    block = model.model.layers[2]
    own = block.forward
    block.forward = lambda *args, **kwargs: (own(*args, **kwargs),)  # a block returning more than the stream
    prefix = LayerPrefix(model, batches)
    with pytest.raises(UnsupportedModelError, match="cannot be skipped"):
        SuffixScorer(model, batches, prefix, len(examples))
    assert not prefix.known, "a refused scorer hands the prefix nothing"
    candidates = tuple(search.default_candidates(windowed, [2]))
    settings = search.SearchSettings(("arithmetic",), len(examples), candidates, beta=0.0, threshold=0.02)
    with pytest.warns(UserWarning, match="slower path: each head runs its sequences whole .*whole sequence"):
        state = search.calibration_search(windowed, tok, examples, settings, tmp_path / "s.json", batch_size=4)
    assert state["heads"] == {f"2,{h}": evaluate(windowed, tok, examples, Plan([Calibrate(2, (h,), 0.0, 0.02)])).accuracy
                              for _, h in candidates}


@pytest.mark.slow
def test_smollm2_scores_from_the_first_sink_on_equal_whole_forwards(smollm2):
    model, tok = smollm2
    examples = load_task("kv-recall", "calibration", 8)
    batches = choice_batches(tok, examples, 16)
    prefix = LayerPrefix(model, batches)
    scorer = SuffixScorer(model, batches, prefix, len(examples))
    unedited = choice_logprobs(model, tok, examples)
    continued = largest_gap(continued_scores(model, batches, len(examples), 30), unedited)
    for layer, head in ((3, 4), (15, 2), (27, 7)):
        prefix.advance(layer)
        edit = Calibrate(layer, (head,), beta=0.0)
        noise = max(continued, identity_rounding(model, tok, examples, edit, unedited, 16))
        whole = choice_logprobs(model, tok, examples, Plan([edit]))
        assert largest_gap(whole, unedited) > 1e-2, "the edit must change the scores"
        assert largest_gap(scorer.scores(edit), whole) <= 10 * noise + 1e-5, (layer, head, noise)
