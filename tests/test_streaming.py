"""Choosing streaming heads from a score: the ranking per KV head, the global layers, the plan file."""

import json

import pytest
import torch
from conftest import tiny_llama

from headlab.cli import main
from headlab.core.head_scores import HeadScores
from headlab.surgeon.streaming.rules import (full_kv_heads, kv_head_scores, random_ranking, razor_ranking, rule_ranking,
                                             score_ranking, streaming_plan)
from headlab.surgeon import Plan, Stream, attach, model_shape
from headlab.core.errors import HeadlabError
from headlab.surgeon.streaming.settings import StreamingSettings
from headlab.core.shape import ModelShape

SHAPE = ModelShape(n_layers=3, n_heads=6, n_kv_heads=2, head_dim=4)  # KV head g serves query heads 3g..3g+2


def score(values) -> HeadScores:
    values = torch.tensor(values, dtype=torch.float32)
    return HeadScores("retrieval", values, torch.ones_like(values), "tiny")


VALUES = [[0.0, 0.9, 0.0, 0.1, 0.1, 0.1],   # layer 0: KV 0 max 0.9, KV 1 max 0.1
          [0.2, 0.2, 0.2, 0.0, 0.0, 0.5],   # layer 1: 0.2, 0.5
          [0.3, 0.0, 0.0, 0.05, 0.0, 0.0]]  # layer 2: 0.3, 0.05


def test_a_kv_head_scores_the_maximum_of_its_query_heads():
    expected = torch.tensor([[0.9, 0.1], [0.2, 0.5], [0.3, 0.05]])
    torch.testing.assert_close(kv_head_scores(score(VALUES).values, 3), expected)


@pytest.mark.parametrize("keep, full", [(0.0, []), (0.5, [(0, 0), (1, 1), (2, 0)]), (1 / 3, [(0, 0), (1, 1)]),
                                        (1.0, [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)])])
def test_the_kept_fraction_holds_the_highest_kv_heads(keep, full):
    kept, streaming = full_kv_heads(score_ranking(score(VALUES), SHAPE), keep)
    assert kept == full and len(kept) + len(streaming) == 6 and not set(kept) & set(streaming)


def test_sliding_layers_are_never_candidates():
    ranking = score_ranking(score(VALUES), SHAPE, ["full_attention", "sliding_attention", "full_attention"])
    kept, streaming = full_kv_heads(ranking, 0.5)
    assert kept == [(0, 0), (2, 0)] and streaming == [(0, 1), (2, 1)]


def test_the_plan_streams_whole_groups_and_a_missing_score_is_refused():
    plan = streaming_plan(score_ranking(score(VALUES), SHAPE), SHAPE, StreamingSettings(keep=0.5, sinks=2, window=8),
                          model_id="tiny")
    assert [(e.layer, e.heads, e.sinks, e.window) for e in plan.edits] == [
        (0, (3, 4, 5), 2, 8), (1, (0, 1, 2), 2, 8), (2, (3, 4, 5), 2, 8)]
    values = [row[:] for row in VALUES]
    values[1][4] = float("nan")
    with pytest.raises(HeadlabError, match=r"missing \(NaN\) on layer\(s\) \[1\]"):
        score_ranking(score(values), SHAPE)


def test_razor_takes_one_echo_head_for_every_fourteen_induction_heads():
    shape = ModelShape(n_layers=30, n_heads=2, n_kv_heads=2, head_dim=4)  # 60 KV heads
    echo_values = torch.arange(60, dtype=torch.float32).reshape(30, 2)  # highest: the last heads
    induction_values = -echo_values  # highest: the first heads
    echo, induction = (HeadScores(name, v, torch.ones_like(v), "tiny") for name, v in
                       (("echo", echo_values), ("razor_induction", induction_values)))
    order = razor_ranking(echo, induction, shape)
    flat = [(layer, kv) for layer in range(30) for kv in range(2)]
    assert order[:16] == [flat[59]] + flat[:14] + [flat[58]], "echo's first, 14 induction heads, echo's second"
    assert sorted(order) == flat, "every head once"
    overlapping = razor_ranking(induction, induction, shape)  # the same ranking twice: nothing taken twice
    assert overlapping == flat


def test_rules_rank_by_name_and_the_random_control_is_seeded():
    scores = {"retrieval": score(VALUES)}
    assert rule_ranking("retrieval", scores, SHAPE) == score_ranking(score(VALUES), SHAPE)
    assert rule_ranking("random", None, SHAPE, seed=1) == random_ranking(SHAPE, seed=1)
    assert sorted(random_ranking(SHAPE, seed=1)) == sorted(score_ranking(score(VALUES), SHAPE))
    assert len({tuple(random_ranking(SHAPE, seed=s)) for s in range(5)}) > 1
    with pytest.raises(HeadlabError, match="echo, razor_induction"):
        rule_ranking("razor", scores, SHAPE)
    with pytest.raises(HeadlabError, match="no score.s. induction"):
        rule_ranking("induction", scores, SHAPE)
    with pytest.raises(HeadlabError, match="needs a scores file"):
        rule_ranking("retrieval", None, SHAPE)


def test_stream_plan_command_writes_a_plan_that_runs(tmp_path):
    model = tiny_llama("gqa")
    model.save_pretrained(tmp_path / "model")
    shape = model_shape(model)
    values = torch.rand(shape.n_layers, shape.n_heads, generator=torch.Generator().manual_seed(3))
    (tmp_path / "scores.json").write_text(json.dumps({"format": "headlab-scores/1", "scores": {
        "retrieval": HeadScores("retrieval", values, torch.ones_like(values), str(tmp_path / "model")).to_dict()}}))
    status = main(["stream-plan", str(tmp_path / "model"), "--scores", str(tmp_path / "scores.json"),
                   "--keep", "0.5", "--window", "3", "--out", str(tmp_path / "plan.json")])
    assert status == 0
    plan = Plan.load(tmp_path / "plan.json")
    streamed = [(e.layer, h) for e in plan.edits for h in e.heads]
    assert all(isinstance(e, Stream) and e.window == 3 for e in plan.edits)
    assert len(streamed) == 4 * shape.group_size  # of 9 KV heads, round(4.5) = 5 keep the context; whole groups
    ids = torch.randint(1, 97, (1, 12), generator=torch.Generator().manual_seed(4))
    unbounded = Plan([Stream(e.layer, e.heads, sinks=e.sinks, window=1000) for e in plan.edits])
    with torch.no_grad():
        with attach(model, unbounded):
            everything = model(input_ids=ids).logits
        with attach(model, plan):
            streaming = model(input_ids=ids).logits
    seen_whole = 4 + 3  # rows 0..6 see every earlier key through 4 sinks and a 3-position window
    assert torch.equal(everything[:, :seen_whole], streaming[:, :seen_whole])
    assert (everything[:, seen_whole:] - streaming[:, seen_whole:]).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["llama", "gemma", "mistral", "gemma2", "gpt_oss"])
def test_streaming_in_blocks_equals_the_heads_recomputed_in_full(family, monkeypatch):
    """Edits that only hide keys run the model's own attention over each block's kept keys (blocks of
    5 rows here, so 23 rows make 5 blocks; learned sinks: one call under the narrowed mask); a tap
    on the layer sends the call through the fp32 recomputation instead. Same logits up to the
    model's own eager-vs-default difference, times 10."""
    from families import family_model

    from headlab.surgeon import Taps
    from headlab.surgeon.edits import stages

    model = family_model(family)
    shape = model_shape(model)
    plan = Plan([Stream(3, tuple(range(shape.group_size)), sinks=2, window=4)])  # KV head 0 of a global layer
    ids = torch.randint(3, 97, (2, 23), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 23, dtype=torch.long)
    mask[1, :6] = 0
    monkeypatch.setattr(stages, "STREAM_BLOCK", 5)
    with torch.no_grad():
        with attach(model, plan):
            blocked = model(input_ids=ids, attention_mask=mask).logits
        with attach(model, plan, taps=Taps(attention={3: (0,)})):
            recomputed = model(input_ids=ids, attention_mask=mask).logits
        own = model(input_ids=ids, attention_mask=mask).logits
        previous = model.config._attn_implementation
        model.set_attn_implementation("eager")
        try:
            own_eager = model(input_ids=ids, attention_mask=mask).logits
        finally:
            model.set_attn_implementation(previous)
    valid = mask.bool()
    noise = float((own - own_eager).abs()[valid].max())
    assert (blocked - recomputed).abs()[valid].max() <= 10 * noise + 1e-5
    assert (blocked - own).abs()[valid].max() > 1e-3, "streaming must change the logits"
