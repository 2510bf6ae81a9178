"""Edit plans applied through the hook on tiny models: row sums, no-ops, frozen state, cached decoding."""

import pytest
import torch
from conftest import eager_maps, frozen_state, padded_batch, tiny_llama

from headlab.surgeon import (
    Calibrate, HeadMean, HeadScale, Plan, PlanError, Redistribute, Reinforce, Request, Steer, Taps, Uniform,
    attach,
    reference_outputs,
)
from headlab.surgeon.edits import formulas

pytestmark = pytest.mark.numerics  # run again in CI with one thread and narrower vector units

SINK_DIM = 4  # tiny random models have no massive activations: the tests plant one on token id 1
ALL = tuple(range(9))


def plant_sink(model, dim=SINK_DIM, size=300.0):
    """Give token id 1 a huge value on ``dim`` so that VAR finds it as a sink token."""
    with torch.no_grad():
        model.model.embed_tokens.weight[:, dim] = 0.0
        model.model.embed_tokens.weight[1, dim] = size
    return model


def batch_with_first_token(lengths, total, side="left"):
    ids, mask = padded_batch(lengths, total, side)
    ids[ids == 1] = 2
    for row, n in enumerate(lengths):
        ids[row, total - n if side == "left" else 0] = 1  # a BOS-like first token
    return ids, mask


def redistribute(layer=2, **overrides):
    params = dict(sink_dims=(SINK_DIM,), span_mass_min=0.05, sink_share_max=0.9, sink_threshold=5.0)
    params.update(overrides)
    return Redistribute(layer, ALL, **params)


def full_plan(beta=0.4, alpha_steer=0.05, keep=0.6, alpha_vhr=2.0):
    return Plan([
        Steer(1, (0, 4), alpha=alpha_steer),
        redistribute(2, keep_fraction=keep),
        Calibrate(3, (1, 2, 8), beta=beta),
        Reinforce(3, ALL, alpha=alpha_vhr),
        HeadScale(0, (3,), 0.5),
    ])


def request_for(model, ids, mask, span=(7, 10), emphasis=(3, 6)):
    return Request(span=span, emphasis=emphasis, reference=reference_outputs(model, ids, span, [3], mask))


def test_act_through_the_hook_equals_the_loop_on_eager_maps_and_spares_other_heads():
    model = tiny_llama("gqa", layers=5)
    ids, mask = batch_with_first_token([14, 10], 14)
    plan = Plan([Calibrate(3, (1, 2), beta=0.4, threshold=0.15)])
    with torch.no_grad(), attach(model, plan, Taps(attention={3: None})) as session:
        model(input_ids=ids, attention_mask=mask)
    plain = eager_maps(model, input_ids=ids, attention_mask=mask)[3]
    valid = mask.bool()
    edited = session.recording.attention_map(3)
    visible = plain > 0
    scores = formulas.mean_received(plain[:, [1, 2]], visible[:, :1] | ~valid[:, None, :, None], valid)
    sinks = formulas.act_sink_set(scores, valid, 0.15)
    assert sinks.any(), "the fixture must have sinks beyond the first one"
    first_row = torch.zeros_like(valid)
    first_row[torch.arange(2), valid.float().argmax(-1)] = True
    want = formulas.act_reweight(plain[:, [1, 2]], sinks, visible[:, [1, 2]], 0.4, first_row)
    rows = valid[:, None, :].expand(2, 2, 14)
    assert torch.allclose(edited[:, [1, 2]][rows], want[rows], atol=1e-5)
    sums = edited.sum(-1)[valid[:, None, :].expand(2, 9, 14)]
    assert torch.allclose(sums, torch.ones_like(sums), atol=1e-5)
    for head in (0, 3, 4, 5, 6, 7, 8):
        assert torch.allclose(edited[:, head][rows[:, 0]], plain[:, head][rows[:, 0]], atol=1e-5)


def test_var_rows_sum_to_one_and_the_planted_sink_is_found():
    model = plant_sink(tiny_llama("gqa", layers=5))
    ids, mask = batch_with_first_token([14, 11], 14)
    ids[:, 8] = 1  # a sink token inside the span as well: VAR edits only where one lies there
    with torch.no_grad(), attach(model, Plan([redistribute()]), Taps(attention={2: None}),
                                 request=Request(span=(7, 10))) as session:
        model(input_ids=ids, attention_mask=mask)
    plain = eager_maps(model, input_ids=ids, attention_mask=mask)[2]
    valid = mask.bool()
    edited = session.recording.attention_map(2)
    sums = edited.sum(-1).permute(0, 2, 1)[valid]
    assert torch.allclose(sums, torch.ones_like(sums), atol=1e-5)
    sinks = frozen_state(session, "redistribute", 2)
    assert torch.equal(sinks, (ids == 1) & valid)
    changed = (edited - plain).abs().amax(-1) > 1e-4  # [B, H, Nq]
    assert changed.any()
    assert not changed[:, :, :10].any(), "rows up to the span's end are never edited at prefill"


@pytest.mark.parametrize("kind", ["mha", "gqa", "mqa"])
def test_neutral_parameters_are_no_ops(kind):
    model = plant_sink(tiny_llama(kind, layers=5))
    heads = model.config.num_attention_heads
    ids, mask = batch_with_first_token([13, 9], 13)
    plan = Plan([Steer(1, (0,), alpha=1.0), Redistribute(2, tuple(range(heads)), sink_dims=(SINK_DIM,), keep_fraction=1.0),
                 Calibrate(3, tuple(range(heads)), beta=1.0), Reinforce(3, tuple(range(heads)), alpha=1.0)])
    request = Request(span=(7, 10), emphasis=(3, 6), reference=reference_outputs(model, ids, (7, 10), [3], mask))
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        with attach(model, plan, request=request):
            neutral = model(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    assert (neutral - plain)[valid].abs().max() <= 1e-5


def test_cached_decode_equals_a_full_recompute_with_the_prefill_state():
    """Tokens and logits of cached greedy decoding equal one uncached forward over prompt and
    generated tokens with the state the prompt's prefill fixed (sinks, spans, VHR heads)."""
    model = plant_sink(tiny_llama("gqa", layers=5))
    ids, mask = batch_with_first_token([13, 10], 13)
    request = request_for(model, ids, mask)
    with torch.no_grad():
        with attach(model, full_plan(), request=request) as session:
            run = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True)
            heads_after_decode = frozen_state(session, "reinforce", 3).clone()
        with attach(model, full_plan(), request=request) as session:
            model(input_ids=ids, attention_mask=mask)
            assert torch.equal(frozen_state(session, "reinforce", 3), heads_after_decode), "VHR heads are frozen after step 0"
            session.state.pin()
            full_mask = torch.cat([mask, torch.ones(2, 4, dtype=mask.dtype)], 1)
            full = model(input_ids=run.sequences[:, :-1], attention_mask=full_mask).logits
    cached = torch.stack(run.logits, 1)  # [B, 5, vocab]
    assert torch.allclose(full[:, 12:], cached, atol=1e-4)
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                           output_logits=True, return_dict_in_generate=True)
    assert not torch.allclose(torch.stack(plain.logits, 1), cached, atol=1e-3), "the plan must change the decode"


def test_vhr_selects_above_the_median_of_its_own_divergence():
    model = tiny_llama("gqa", layers=5)
    ids, mask = batch_with_first_token([13, 13], 13)
    request = request_for(model, ids, mask)
    with torch.no_grad():
        with attach(model, taps=Taps(head_outputs=[3])) as plain:
            model(input_ids=ids, attention_mask=mask)
        with attach(model, Plan([Reinforce(3, ALL, alpha=2.0)]), request=request) as session:
            model(input_ids=ids, attention_mask=mask)
    last = plain.recording.head_output(3)[:, -1]
    want = formulas.vhr_select((last - request.reference[3]).norm(dim=-1), request.reference[3].pow(2).sum(-1))
    assert torch.equal(frozen_state(session, "reinforce", 3), want)


def test_head_mean_replaces_outputs_with_the_given_means():
    model = tiny_llama("mha", layers=5)
    ids, _ = padded_batch([8], 8, "left")
    means = [[0.25 * (h + 1)] * 6 for h in range(2)]
    with torch.no_grad(), attach(model, Plan([HeadMean(1, (0, 3), means)]), Taps(head_outputs=[1])) as session:
        model(input_ids=ids)
    z = session.recording.head_output(1)
    assert torch.equal(z[0, :, 0], torch.full((8, 6), 0.25))
    assert torch.equal(z[0, :, 3], torch.full((8, 6), 0.5))


def test_plans_round_trip_through_json(tmp_path):
    plan = full_plan()
    plan.edits.append(HeadMean(0, (1,), [[0.5] * 6]))
    plan.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json").edits == plan.edits


def test_bad_plans_and_requests_raise_clear_errors():
    model = tiny_llama("gqa", layers=5)
    ids, mask = batch_with_first_token([10], 10)
    with pytest.raises(PlanError, match="head"):
        with attach(model, Plan([Calibrate(3, (12,))])):
            pass
    with pytest.raises(PlanError, match="layers 0-1"):
        with attach(model, Plan([Calibrate(1, (0,))])):
            pass
    with pytest.raises(PlanError, match="never 0-1 or the last"):
        with attach(model, Plan([redistribute(layer=4)])):
            pass
    with pytest.raises(PlanError, match="unknown edit kind"):
        Plan.from_dict({"format": "headlab-plan/1", "edits": [{"kind": "sharpen", "layer": 0, "heads": [0]}]})
    with pytest.raises(PlanError, match="outside the input"):
        with torch.no_grad(), attach(model, Plan([redistribute()]), request=Request(span=(8, 20))):
            model(input_ids=ids, attention_mask=mask)
    with pytest.raises(PlanError, match="empty"):
        with torch.no_grad(), attach(model, Plan([Steer(1, (0,))]), request=Request(emphasis=(4, 4))):
            model(input_ids=ids, attention_mask=mask)
    with pytest.raises(PlanError, match="needs Request\\(emphasis"):
        with torch.no_grad(), attach(model, Plan([Steer(1, (0,))])):
            model(input_ids=ids, attention_mask=mask)
    with pytest.raises(PlanError, match="reference"):
        with torch.no_grad(), attach(model, Plan([Reinforce(3, ALL)])):
            model(input_ids=ids, attention_mask=mask)


def test_edits_on_a_few_heads_build_maps_for_those_heads_only(monkeypatch):
    from headlab.surgeon import attention_math

    built = []
    real = attention_math.attention_logits

    def spy(query, key, mask, call, heads, group_size):
        built.append(tuple(heads))
        return real(query, key, mask, call, heads, group_size)

    monkeypatch.setattr(attention_math, "attention_logits", spy)
    model = tiny_llama("gqa", layers=5)
    ids, mask = batch_with_first_token([12], 12)
    plan = Plan([Calibrate(3, (1, 7)), Steer(1, (4,)), Calibrate(3, (2,))])
    with torch.no_grad(), attach(model, plan, request=Request(emphasis=(2, 5))):
        model(input_ids=ids, attention_mask=mask)
    assert sorted(built) == [(1, 2, 7), (4,)]


def test_uniform_on_all_rows_spreads_each_row_evenly_over_the_keys_it_sees():
    """rows="all" edits the prefill too: every row of the chosen heads is 1 / (visible keys) on
    its visible keys (left padding hidden), the other heads keep their maps."""
    model = tiny_llama("gqa")
    ids, mask = padded_batch([9, 6], 9, "left")
    taps = Taps(attention={1: None})
    with attach(model, taps=taps) as plain:
        model(input_ids=ids, attention_mask=mask)
    with attach(model, Plan([Uniform(1, (2, 5), rows="all")]), taps=taps) as edited:
        model(input_ids=ids, attention_mask=mask)
    before, after = plain.recording.attention_map(1), edited.recording.attention_map(1)
    valid = mask.bool()
    visible = valid[:, None, :] & torch.ones(9, 9, dtype=torch.bool).tril()  # [B, Nq, Nk]
    expected = visible / visible.sum(-1, keepdim=True).clamp_min(1)
    for head in (2, 5):
        assert torch.allclose(after[:, head][valid], expected[valid], atol=1e-7)
    others = [h for h in range(after.shape[1]) if h not in (2, 5)]
    assert torch.equal(after[:, others][valid[:, None].expand(-1, len(others), -1)],
                       before[:, others][valid[:, None].expand(-1, len(others), -1)])
