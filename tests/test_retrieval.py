"""Retrieval heads: the copy-paste rule, the recorded decode rows, and NIAH prompts."""

import pytest
import torch

from conftest import eager_maps, tiny_llama
from families import family_model
from headlab.probes.scorers.retrieval import (NEEDLES, NeedlePrompt, NeedleSettings, build_prompt, copy_scores,
                                              greedy_rows_with_top_keys, greedy_with_top_keys, rouge1_recall,
                                              shared_prefix, stop_rule)
import headlab.probes.scorers.retrieval as retrieval
from headlab.surgeon import HeadScale, Plan, attach

pytestmark = pytest.mark.numerics  # run again in CI with one thread and narrower vector units


def planted_prompt() -> NeedlePrompt:
    ids = torch.tensor([[9, 9, 40, 41, 42, 9, 9, 9]])  # answer tokens 40 41 42 at positions 2..4
    return NeedlePrompt(ids, [2, 3, 4], NEEDLES[0], 8, 0.5)


def test_copy_rule_counts_only_argmax_keys_in_the_span_holding_the_token():
    prompt = planted_prompt()
    generated = [40, 41, 42, 41]
    # [layer=1, head=3] top keys per step: head 0 copies every answer token; head 1 looks at the
    # span but at the wrong token; head 2 looks at the right token outside the span (position 0 = 9)
    steps = [torch.tensor([[2, 3, 0]]), torch.tensor([[3, 2, 0]]), torch.tensor([[4, 4, 0]]), torch.tensor([[3, 2, 0]])]
    counted = copy_scores(prompt, generated, steps, "count")
    assert counted.tolist() == [[pytest.approx(4 / 3), pytest.approx(1 / 3), 0.0]]  # head 1 matches at step 2
    distinct = copy_scores(prompt, generated, steps, "set")
    assert distinct.tolist() == [[pytest.approx(1.0), pytest.approx(1 / 3), 0.0]]


def test_rouge1_recall_stems_as_the_harness_does():
    assert rouge1_recall("It is purple walrus nineteen.", "purple walrus nineteen") == 1.0
    assert rouge1_recall("purple cat", "purple walrus nineteen") == pytest.approx(1 / 3)
    assert rouge1_recall("", "a b") == 0.0
    # Porter stemming: inflections count, as in rouge_score(use_stemmer=True)
    assert rouge1_recall("Eating sandwiches while sitting", "eat a sandwich and sit") == pytest.approx(3 / 5)


class NewlineTokenizer:
    """Ids are characters; ``\n`` is id 10; no chat template unless given one."""

    eos_token_id = 0

    def __init__(self, chat_template=None):
        self.chat_template = chat_template

    def __call__(self, text, add_special_tokens=False):
        return type("Enc", (), {"input_ids": [ord(c) for c in text]})()

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i)


def test_stop_rule_goes_on_past_a_leading_newline_and_chat_models_stop_only_at_their_end():
    plain = stop_rule(NewlineTokenizer())
    assert not plain([10]) and not plain([10, 32, 10])  # nothing but blank text yet
    assert plain([10, ord("a"), 10]) and plain([ord("a"), 0])
    chat = stop_rule(NewlineTokenizer(chat_template="{{ messages }}"))
    assert not chat([ord("a"), 10]) and chat([ord("a"), 0])


def test_decode_rows_equal_eager_maps_of_the_full_sequence():
    model = tiny_llama("gqa", layers=3)
    prompt = torch.randint(1, 97, (1, 17), generator=torch.Generator().manual_seed(5))
    generated, top_keys = greedy_with_top_keys(model, prompt, 6, stop=None)
    with torch.no_grad():
        reference = model.generate(prompt, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert generated == reference[0, 17:].tolist()
    full = torch.cat([prompt, torch.tensor([generated[:-1]])], dim=1)
    maps = eager_maps(model, input_ids=full)  # uncached recompute
    for step, keys in enumerate(top_keys):
        row = 16 + step  # the row whose logits produced generated[step]
        expected = torch.stack([maps[layer][0, :, row, : row + 1].argmax(-1) for layer in range(3)])
        assert torch.equal(keys, expected)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])  # gemma3_text: a 7-token window on 3 of 4 layers
def test_a_shared_prefix_gives_the_tokens_and_top_keys_of_a_full_prefill(family, monkeypatch):
    monkeypatch.setattr(retrieval, "CONTINUATION_ROWS", 4)  # the prompts continue the prefix in two chunks
    model = family_model(family)
    generator = torch.Generator().manual_seed(8)
    common = torch.randint(3, 97, (1, 15), generator=generator)
    prompts = [NeedlePrompt(torch.cat([common, torch.randint(3, 97, (1, 6 + i), generator=generator)], 1), [], NEEDLES[0],
                            21 + i, 0.5) for i in range(3)]
    prefix = shared_prefix(model, prompts)
    assert prefix.length == 15 and prefix.cache.get_seq_length() <= 15
    for prompt in prompts:
        alone = greedy_with_top_keys(model, prompt.input_ids, 5, None)
        shared = greedy_with_top_keys(model, prompt.input_ids, 5, None, prefix=prefix)
        assert shared[0] == alone[0]
        assert all(torch.equal(a, b) for a, b in zip(shared[1], alone[1]))
    with pytest.raises(ValueError, match="unedited"):
        greedy_with_top_keys(model, prompts[0].input_ids, 2, None, Plan([HeadScale(layer=0, heads=(0,), scale=0.0)]),
                             prefix=prefix)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_a_prefix_continues_the_tokens_it_shares_with_an_earlier_one(family):
    model = family_model(family)
    generator = torch.Generator().manual_seed(12)
    opening = torch.randint(3, 97, (1, 9), generator=generator)

    def group(n_own: int) -> list[NeedlePrompt]:  # prompts sharing the opening and n_own more tokens
        shared = torch.cat([opening, torch.randint(3, 97, (1, n_own), generator=generator)], 1)
        return [NeedlePrompt(torch.cat([shared, torch.randint(3, 97, (1, 5), generator=generator)], 1), [], NEEDLES[0],
                             shared.shape[1] + 5, 0.5) for _ in range(2)]

    first_group, second_group = group(3), group(8)
    first = shared_prefix(model, first_group)
    kept = [(layer.keys.clone(), layer.values.clone()) for layer in first.cache.layers]
    embedded = []
    handle = model.get_input_embeddings().register_forward_hook(lambda m, args, out: embedded.append(args[0].shape[1]))
    try:
        second = shared_prefix(model, second_group, first)
    finally:
        handle.remove()
    assert second.length == 17 and torch.equal(second.ids, second_group[0].input_ids[0, :17])
    # a cache holding whole sequences continues the 9 shared tokens; a sliding window runs all 17
    assert sum(embedded) == (17 if family == "gemma3_text" else 8)
    assert all(torch.equal(layer.keys, k) and torch.equal(layer.values, v)
               for layer, (k, v) in zip(first.cache.layers, kept))  # the earlier prefix is unchanged
    for prompt in second_group:
        alone = greedy_with_top_keys(model, prompt.input_ids, 4, None)
        continued = greedy_with_top_keys(model, prompt.input_ids, 4, None, prefix=second)
        assert continued[0] == alone[0]
        assert all(torch.equal(a, b) for a, b in zip(continued[1], alone[1]))


def prompts_sharing_a_prefix(generator, extra=(6, 9, 7)) -> list[NeedlePrompt]:
    common = torch.randint(3, 97, (1, 15), generator=generator)
    return [NeedlePrompt(torch.cat([common, torch.randint(3, 97, (1, n), generator=generator)], 1), [], NEEDLES[0],
                         15 + n, 0.5) for n in extra]


def test_prompts_decoded_side_by_side_give_the_tokens_and_top_keys_of_each_alone():
    model = tiny_llama("gqa", layers=3)
    prompts = prompts_sharing_a_prefix(torch.Generator().manual_seed(9))

    def stop(generated):  # rows stop at different steps
        return generated[-1] % 4 == 0

    for prefix in (None, shared_prefix(model, prompts)):
        together = greedy_rows_with_top_keys(model, [p.input_ids for p in prompts], 8, stop, prefix=prefix)
        lengths = set()
        for prompt, (generated, top_keys) in zip(prompts, together):
            alone = greedy_with_top_keys(model, prompt.input_ids, 8, stop)
            assert generated == alone[0] and len(top_keys) == len(generated)
            assert all(torch.equal(a, b) for a, b in zip(top_keys, alone[1]))
            lengths.add(len(generated))
        assert len(lengths) > 1  # the rows did stop apart


def test_side_by_side_decoding_is_refused_where_rows_cannot_share_a_cache():
    prompts = [p.input_ids for p in prompts_sharing_a_prefix(torch.Generator().manual_seed(1), (3, 4))]
    with pytest.raises(ValueError, match="sliding-window"):
        greedy_rows_with_top_keys(family_model("gemma3_text"), prompts, 2, None)
    with pytest.raises(ValueError, match="unedited"):
        greedy_rows_with_top_keys(tiny_llama("gqa", layers=3), prompts, 2, None,
                                  Plan([HeadScale(layer=0, heads=(0,), scale=0.0)]))


def test_converted_models_continue_a_shared_prefix_and_decode_one_prompt_at_a_time():
    from test_conversion import converted

    model = converted(layers=(0,))  # layer 0 keeps a recurrent state, not keys
    prompts = prompts_sharing_a_prefix(torch.Generator().manual_seed(4), (5, 7))
    prefix = shared_prefix(model, prompts)
    for prompt in prompts:
        shared = greedy_with_top_keys(model, prompt.input_ids, 4, None, record=False, prefix=prefix)
        assert shared[0] == greedy_with_top_keys(model, prompt.input_ids, 4, None, record=False)[0]
    assert retrieval._decode_batches(model, prompts, 4, True) == [[0], [1]]
    with pytest.raises(ValueError, match="converted"):
        greedy_rows_with_top_keys(model, [p.input_ids for p in prompts], 2, None, record=False)


def test_decode_batches_hold_what_fits_the_cache_budget(monkeypatch):
    model = tiny_llama("gqa", layers=3)  # fp32: 2 · 3 layers · kv heads · head_dim · 4 bytes per position
    prompts = prompts_sharing_a_prefix(torch.Generator().manual_seed(2), (5, 5, 5, 5, 5))
    shape = retrieval.model_shape(model)
    row = 2 * 3 * shape.n_kv_heads * shape.head_dim * 4 * (20 + 4)
    monkeypatch.setattr(retrieval, "DECODE_BATCH_BYTES", 2 * row)
    assert retrieval._decode_batches(model, prompts, 4, True) == [[0, 1], [2, 3], [4]]
    assert retrieval._decode_batches(model, prompts, 4, False) == [[i] for i in range(5)]
    monkeypatch.setattr(retrieval, "DECODE_BATCH_BYTES", row - 1)
    assert retrieval._decode_batches(model, prompts, 4, True) == [[i] for i in range(5)]
    assert retrieval._decode_batches(family_model("gemma3_text"), prompts, 4, True) == [[i] for i in range(5)]


def test_plan_applies_during_decoding():
    model = tiny_llama("mha", layers=3)
    prompt = torch.randint(1, 97, (1, 12), generator=torch.Generator().manual_seed(6))
    plan = Plan([HeadScale(layer=layer, heads=tuple(range(5)), scale=0.0) for layer in range(3)])
    masked, _ = greedy_with_top_keys(model, prompt, 5, None, plan, record=False)
    with torch.no_grad():
        logits = model(input_ids=prompt).logits
    plain, _ = greedy_with_top_keys(model, prompt, 5, None, record=False)
    assert plain[0] == int(logits[0, -1].argmax())
    with torch.no_grad(), attach(model, plan):
        masked_logits = model(input_ids=prompt).logits
    assert masked[0] == int(masked_logits[0, -1].argmax())


def test_settings_are_checked():
    with pytest.raises(ValueError, match="mode"):
        NeedleSettings(mode="sum")
    with pytest.raises(ValueError, match="depth"):
        NeedleSettings(depths=(1.5,))


@pytest.mark.real_model
def test_needle_prompt_on_smollm2_tokenizer(smollm2):
    _, tokenizer = smollm2
    haystack = "Plain sentence number one. " * 800
    shallow = build_prompt(tokenizer, haystack, NEEDLES[2], 600, 0.1)
    deep = build_prompt(tokenizer, haystack, NEEDLES[2], 600, 0.9)
    for prompt in (shallow, deep):
        assert 590 <= prompt.length <= 600
        answer = tokenizer.decode(prompt.input_ids[0, prompt.answer_positions])
        assert answer.strip() == NEEDLES[2].answer
    assert shallow.answer_positions[0] < 150 < 450 < deep.answer_positions[0]
    with pytest.raises(ValueError, match="fewer than"):
        build_prompt(tokenizer, "Too short.", NEEDLES[0], 600, 0.5)
