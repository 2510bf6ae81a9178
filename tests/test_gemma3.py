"""The bundled Gemma 3 270M past its 512-token sliding window: five of every six layers see only
the last 512 keys, and decoding keeps only those in their cache. References are the model's own
forward and its eager attention in the same forward (same ``q, k``); tolerances from :mod:`bounds`.
"""

import pytest
import torch
from bounds import entropy_tolerance, logit_error, probability_tolerance
from conftest import eager_recorder, frozen_state

from headlab.core.text import load_text
from headlab.surgeon import Calibrate, Plan, Taps, attach

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

LONG, SHORT = 700, 610  # tokens of the two rows (the second left-padded): both past the window
SLIDING, GLOBAL = 3, 5  # layer_types: 5 sliding layers, then a global one
WINDOW = 512


@pytest.fixture(scope="module")
def long_batch(gemma3):
    model, tokenizer = gemma3
    ids = tokenizer(load_text(None)[:20000], return_tensors="pt").input_ids[:, :LONG]  # starts with <bos>
    short = torch.cat([torch.zeros(1, LONG - SHORT, dtype=torch.long), ids[:, :SHORT]], 1)
    mask = torch.ones(2, LONG, dtype=torch.long)
    mask[1, : LONG - SHORT] = 0
    return torch.cat([ids, short]), mask


def test_the_layers_are_what_the_tests_assume(gemma3):
    config = gemma3[0].config
    assert config.sliding_window == WINDOW
    assert config.layer_types[SLIDING] == "sliding_attention" and config.layer_types[GLOBAL] == "full_attention"


def test_empty_plan_is_exact_past_the_window(gemma3, long_batch):
    model, _ = gemma3
    ids, mask = long_batch
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        with attach(model, taps=Taps(head_outputs=[SLIDING])):
            during = model(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    assert torch.equal(before[valid], during[valid])


def test_maps_and_statistics_equal_eager_on_a_sliding_and_a_global_layer(gemma3, long_batch):
    model, _ = gemma3
    ids, mask = long_batch
    first = torch.zeros(2, 1, LONG, dtype=torch.bool)
    first[0, 0, 0] = first[1, 0, LONG - SHORT] = True  # each row's <bos>
    taps = Taps(attention={SLIDING: None, GLOBAL: None}, stats={SLIDING: (1, 3), GLOBAL: (1, 3)},
                stats_key_groups=first, stats_topk=1)
    with torch.no_grad(), eager_recorder(model) as records, attach(model, taps=taps) as session:
        model(input_ids=ids, attention_mask=mask)
    valid = mask.bool()
    rows = valid[:, None, :].expand(2, 2, LONG)
    for layer in (SLIDING, GLOBAL):
        q, k, scaling, _, weights = records[layer]
        delta = logit_error(q, k, scaling)
        maps = session.recording.attention_map(layer)
        assert (maps - weights).abs().permute(0, 2, 1, 3)[valid].max() <= probability_tolerance(delta, LONG)
        p = weights[:, [1, 3]]
        stats = session.recording.stats[layer][0]
        entropy = torch.where(p > 0, -p * p.log(), torch.zeros_like(p)).sum(-1)
        assert (stats.entropy - entropy).abs()[rows].max() <= entropy_tolerance(delta, LONG)
        bos_mass = torch.stack([p[0, :, :, 0], p[1, :, :, LONG - SHORT]])
        assert (stats.group_mass[..., 0] - bos_mass).abs()[rows].max() <= probability_tolerance(delta, LONG)
        assert (stats.topk_weight[..., 0] - p.max(-1).values).abs()[rows].max() <= probability_tolerance(delta, LONG)
    sliding = session.recording.attention_map(SLIDING)[0, :, -1]
    assert sliding[:, : LONG - WINDOW].sum() == 0 and sliding[:, LONG - WINDOW:].sum(-1).allclose(torch.ones(4))
    assert session.recording.attention_map(GLOBAL)[0, :, -1, : LONG - WINDOW].sum() > 0


def test_decoding_past_the_window_with_and_without_the_hook_and_under_calibrate(gemma3, long_batch):
    """Generation is unchanged by an empty plan; under ACT on a sliding layer (whose decode keys are
    the last 512 positions of the cache), cached decoding equals the recomputation with the
    prompt's frozen sink sets as closely as the model's own cached and recomputed logits agree."""
    model, _ = gemma3
    ids, mask = long_batch
    steps = 4
    kwargs = dict(attention_mask=mask, max_new_tokens=steps, do_sample=False, pad_token_id=0,
                  output_logits=True, return_dict_in_generate=True)
    full_mask = torch.cat([mask, torch.ones(2, steps - 1, dtype=mask.dtype)], 1)
    positions = (full_mask.cumsum(-1) - 1).clamp_min(0)
    plan = Plan([Calibrate(SLIDING, (0, 1, 2, 3), beta=0.4)])
    runs = {}
    with torch.no_grad():
        runs["plain"] = model.generate(ids, **kwargs)
        for name, active in (("empty", Plan()), ("calibrate", plan)):
            with attach(model, active):
                runs[name] = model.generate(ids, **kwargs)
            with attach(model, active) as session:
                model(input_ids=ids, attention_mask=mask, position_ids=positions[:, :LONG])
                session.state.pin()
                runs[name + "-full"] = model(input_ids=runs[name].sequences[:, :-1], attention_mask=full_mask,
                                             position_ids=positions).logits[:, LONG - 1:]
    assert torch.equal(runs["plain"].sequences, runs["empty"].sequences)
    assert frozen_state(session, "calibrate", SLIDING).any(), "ACT must find sinks to move mass from"
    own_noise = (torch.stack(runs["empty"].logits, 1) - runs["empty-full"]).abs().max()
    edited_gap = (torch.stack(runs["calibrate"].logits, 1) - runs["calibrate-full"]).abs().max()
    assert edited_gap <= 10 * own_noise + 1e-5, (float(own_noise), float(edited_gap))
    assert not torch.allclose(torch.stack(runs["calibrate"].logits, 1), torch.stack(runs["plain"].logits, 1),
                              atol=1e-3), "the plan must change the decode"
