"""KV-cache presses: a cache whose KV heads hold their own positions attends exactly over what it
holds (against each family's eager attention recomputing the sequence with those keys), the budget
is one axis of bytes, the allocations share it as documented, the token scorers rank as their papers
define, and bad input is one line."""

import math

import pytest
import torch
from bounds import U, forward_rounding_error, reordering_tolerance
from conftest import tiny_llama
from families import SUPPORTED, family_model, patched_eager

from headlab.core.errors import HeadlabError
from headlab.core.head_scores import HeadScores
from headlab.surgeon import Plan, Stream, attach, model_shape
from headlab.surgeon.compression import KVPress, PressSettings, cache_bytes_at, head_budget
from headlab.surgeon.compression.scorers import ScoredCall, token_scorer
from headlab.surgeon.kv_cache import cache_bytes

pytestmark = pytest.mark.numerics

PREFILL, STEPS = 20, 5


def ids_of(model, n: int, seed: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.get_text_config().vocab_size, (1, n), generator=generator)


@torch.no_grad()
def pressed_decoding(model, press: KVPress, ids: torch.Tensor, reserve: int = 0):
    """Prefill ``ids`` on the press's cache, then greedy steps; ``(sequence, step logits [STEPS, V], cache)``.
    The cache's ``kept`` is what each compressed layer's heads held of the prompt right after the prefill:
    ``{layer: [positions [k] per KV head]}``."""
    cache = press.cache(ids.shape[1], reserve=reserve)
    sequence, logits = ids, []
    with attach(model, compression=press):
        out = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1]
        cache.kept = {layer: [head.positions[:head.held].clone() for head in cache.layers[layer].heads]
                      for layer in press.layers}
        for _ in range(STEPS):
            logits.append(out[0])
            token = out.argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, token], 1)
            out = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1]
    return sequence, torch.stack(logits), cache


def held_in_eager(model, press: KVPress, cache, prefill: int):
    """The family's eager attention, uncached: on the press's layers, a row after the prefill sees, per
    query head, the prefill positions its KV head holds in ``cache`` and every later position up to itself."""
    group = model_shape(model).group_size
    kept = cache.kept

    def wrap(original):
        def held(attn, query, key, value, attention_mask, **kwargs):
            if attn.layer_idx in kept:
                n_heads, n = query.shape[1], key.shape[-2]
                visible = torch.ones(n_heads, n, n, dtype=torch.bool).tril()
                for h in range(n_heads):
                    row = torch.zeros(n, dtype=torch.bool)
                    row[kept[attn.layer_idx][h // group]] = True
                    row[prefill:] = True
                    visible[h, prefill:] &= row
                mask = attention_mask[..., :n].expand(1, n_heads, n, n)
                attention_mask = (mask & visible if mask.dtype == torch.bool
                                  else mask.masked_fill(~visible, torch.finfo(mask.dtype).min))
            return original(attn, query, key, value, attention_mask, **kwargs)
        return held

    return patched_eager(model, wrap)


@pytest.mark.parametrize("name", SUPPORTED)
def test_a_pressed_cache_decodes_as_eager_attention_over_the_keys_it_holds(name):
    """SnapKV at 8 positions per KV head (1 sink, a window of 2) on a 20-token prefill, then 5 steps
    with no recompression: the step logits equal the family's eager attention recomputing the whole
    sequence where each head sees what its cache holds. Tolerance: the model's own cached logits
    against its own eager recomputation, times 10."""
    model = family_model(name)
    ids = ids_of(model, PREFILL)
    settings = PressSettings(scorer="snapkv", budget=None, tokens=8, sinks=1, window=2, observation=4, slack=100)
    if name == "mistral":  # a window on every layer: nothing to compress
        with pytest.raises(HeadlabError, match="has none"):
            KVPress(model, settings)
        return
    press = KVPress(model, settings)
    sequence, ours, cache = pressed_decoding(model, press, ids)
    assert all(count == 8 + STEPS for layer in press.layers for count in cache.layers[layer].held_counts())
    reference, own_cached, noise = eager_reference(model, press, cache, sequence)
    assert (ours - reference).abs().max() <= 10 * noise + 1e-5, (noise, float((ours - reference).abs().max()))
    assert (ours - own_cached).abs().max() > 1e-3, "dropping 12 of 20 positions must change the logits"


def eager_reference(model, press: KVPress, cache, sequence: torch.Tensor):
    """``(reference, own cached, noise)``: the step logits ``[STEPS, V]`` of the family's eager attention
    recomputing ``sequence`` over the keys ``cache`` held (:func:`held_in_eager`), the model's own cached
    step logits, and how far those are from its own eager recomputation (its rounding)."""
    with held_in_eager(model, press, cache, PREFILL), torch.no_grad():
        reference = model(input_ids=sequence[:, :-1]).logits[0, PREFILL - 1:]
    with torch.no_grad():
        own_cached = _own_cached_logits(model, sequence)
    with patched_eager(model, lambda original: original), torch.no_grad():
        own_recomputed = model(input_ids=sequence[:, :-1]).logits[0, PREFILL - 1:]
    return reference, own_cached, float((own_cached - own_recomputed).abs().max())


def _own_cached_logits(model, sequence: torch.Tensor) -> torch.Tensor:
    """The model's own cached decoding of ``sequence``'s steps: ``[STEPS, V]``."""
    out = model(input_ids=sequence[:, :PREFILL], use_cache=True)
    logits, cache = [out.logits[0, -1]], out.past_key_values
    for step in range(PREFILL, PREFILL + STEPS - 1):
        out = model(input_ids=sequence[:, step:step + 1], past_key_values=cache, use_cache=True)
        logits.append(out.logits[0, -1])
        cache = out.past_key_values
    return torch.stack(logits)


def test_heads_of_one_layer_hold_different_counts_and_still_decode_exactly():
    """The pool allocation (Ada-KV) gives the KV heads of a layer different counts; the padded call
    still equals eager attention over each head's own positions."""
    model = tiny_llama("gqa")
    ids = ids_of(model, PREFILL)
    press = KVPress(model, PressSettings(scorer="tova", budget=None, tokens=8, allocation="pool", sinks=1, window=1,
                                         slack=100))
    sequence, ours, cache = pressed_decoding(model, press, ids)
    counts = [cache.layers[layer].held_counts() for layer in press.layers]
    assert any(len(set(layer)) > 1 for layer in counts), counts
    assert all(sum(layer) == 3 * (8 + STEPS) for layer in counts), "the pool keeps the layer's total"
    model.set_attn_implementation("eager")
    try:
        with held_in_eager(model, press, cache, PREFILL), torch.no_grad():
            reference = model(input_ids=sequence[:, :-1]).logits[0, PREFILL - 1:]
    finally:
        model.set_attn_implementation("sdpa")
    tolerance = reordering_tolerance(forward_rounding_error(model, sequence[:, :-1]), reference)
    assert (ours - reference).abs().max() <= tolerance, (float((ours - reference).abs().max()), tolerance)


@pytest.mark.parametrize("name", ["llama", "gemma3_text", "gpt_oss"])
def test_a_budget_of_every_position_reproduces_the_models_own_decoding(name):
    model = family_model(name)
    ids = ids_of(model, PREFILL)
    press = KVPress(model, PressSettings(scorer="snapkv", budget=1.0))
    sequence, ours, _ = pressed_decoding(model, press, ids)
    with torch.no_grad():
        own = _own_cached_logits(model, sequence)
    tolerance = reordering_tolerance(forward_rounding_error(model, sequence[:, :-1]), own)
    assert (ours - own).abs().max() <= tolerance, (float((ours - own).abs().max()), tolerance)


@pytest.mark.parametrize("name, budget", [("llama", 0.4), ("gemma3_text", 0.7), ("gpt_oss", 0.7)])
def test_the_cache_holds_its_budget_of_the_uncompressed_bytes(name, budget):
    """After the prefill the cache holds the budget's share of what the uncompressed cache holds, the
    sliding-window layers' windows counted, within one position per compressed KV head."""
    model = family_model(name)
    ids = ids_of(model, 40)
    with torch.no_grad():
        full = cache_bytes(model(input_ids=ids, use_cache=True).past_key_values)
    assert full == cache_bytes_at(model.config, 40)
    press = KVPress(model, PressSettings(scorer="knorm", budget=budget, sinks=1, window=1))
    cache = press.cache(40)
    with attach(model, compression=press), torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    shape = model_shape(model)
    one_position = 2 * shape.head_dim * 4
    compressed = len(press.layers) * shape.n_kv_heads
    assert abs(cache_bytes(cache) - budget * full) <= compressed * one_position, (cache_bytes(cache), budget * full)


def test_decoding_keeps_the_cache_within_its_slack():
    model = tiny_llama("gqa")
    press = KVPress(model, PressSettings(scorer="snapkv", budget=None, tokens=10, sinks=1, window=2, slack=3))
    cache = press.cache(PREFILL)
    token = ids_of(model, PREFILL)
    with attach(model, compression=press), torch.no_grad():
        model(input_ids=token, past_key_values=cache, use_cache=True)
        most = 0
        for _ in range(30):
            model(input_ids=token[:, -1:], past_key_values=cache, use_cache=True)
            most = max(most, *(max(cache.layers[layer].held_counts()) for layer in press.layers))
    assert cache.get_seq_length() == PREFILL + 30
    assert 10 < most <= 10 + 3


def test_a_query_agnostic_press_leaves_room_for_the_question():
    model = tiny_llama("gqa")
    ids = ids_of(model, 30)
    press = KVPress(model, PressSettings(scorer="snapkv", budget=None, tokens=12, sinks=1, window=2, slack=0))
    cache = press.cache(30, reserve=6)
    with attach(model, compression=press), torch.no_grad():
        model(input_ids=ids[:, :24], past_key_values=cache, use_cache=True)
        assert all(count == 6 for layer in press.layers for count in cache.layers[layer].held_counts())
        model(input_ids=ids[:, 24:], past_key_values=cache, use_cache=True)
    assert all(count == 12 for layer in press.layers for count in cache.layers[layer].held_counts())


def random_scores(model, seed: int = 0) -> dict[str, HeadScores]:
    shape = model_shape(model)
    values = torch.rand(shape.n_layers, shape.n_heads, generator=torch.Generator().manual_seed(seed))
    return {"retrieval": HeadScores("retrieval", values, torch.ones_like(values), "tiny")}


def test_whole_heads_keep_every_position_and_the_rest_share_what_is_left():
    model = tiny_llama("gqa")  # 3 layers x 3 KV heads
    scores = random_scores(model)
    press = KVPress(model, PressSettings(scorer="snapkv", budget=0.5, whole=2 / 9, rule="retrieval", sinks=1,
                                         window=2), scores)
    assert len(press.whole) == 2
    cache = press.cache(36)
    with attach(model, compression=press), torch.no_grad():
        model(input_ids=ids_of(model, 36), past_key_values=cache, use_cache=True)
    counts = {(layer, kv): count for layer in press.layers
              for kv, count in enumerate(cache.layers[layer].held_counts())}
    assert all(counts[head] == 36 for head in press.whole)
    others = [count for head, count in counts.items() if head not in press.whole]
    assert others == [round((0.5 * 9 * 36 - 2 * 36) / 7)] * 7


def test_the_scores_allocation_gives_higher_scored_heads_more():
    model = tiny_llama("gqa")
    scores = random_scores(model, seed=4)
    press = KVPress(model, PressSettings(scorer="snapkv", budget=0.5, allocation="scores", rule="retrieval", sinks=1,
                                         window=1), scores)
    cache = press.cache(40)
    with attach(model, compression=press), torch.no_grad():
        model(input_ids=ids_of(model, 40), past_key_values=cache, use_cache=True)
    kv_scores = scores["retrieval"].values.reshape(3, 3, 3).amax(-1)
    counts = torch.tensor([cache.layers[layer].held_counts() for layer in press.layers], dtype=torch.float)
    order = kv_scores.flatten().argsort()
    assert counts.flatten()[order[-1]] > counts.flatten()[order[0]]
    assert abs(counts.sum() - 0.5 * 9 * 40) <= 9


def scored_call(queries, keys, **kwargs) -> ScoredCall:
    n = keys.shape[-2]
    return ScoredCall(queries, keys, kwargs.pop("values", torch.ones_like(keys)), torch.arange(n)[None, None].expand(
        1, keys.shape[1], n), kwargs.pop("query_positions", torch.arange(n - queries.shape[-2], n)), 1.0, None,
        queries.shape[1] // keys.shape[1], **kwargs)


def test_snapkv_sums_the_windows_attention_and_pools_neighbours():
    generator = torch.Generator().manual_seed(0)
    queries, keys = torch.randn(1, 2, 3, 4, generator=generator), torch.randn(1, 1, 9, 4, generator=generator)
    logits = queries[0] @ keys[0, 0].T  # [2, 3, 9]
    causal = torch.arange(9)[None, :] <= torch.arange(6, 9)[:, None]
    probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1)
    expected = probs.mean(0).sum(0)
    torch.testing.assert_close(token_scorer("snapkv").score(scored_call(queries, keys, pooling=1))[0, 0], expected)
    pooled = token_scorer("snapkv").score(scored_call(queries, keys, pooling=3))[0, 0]
    torch.testing.assert_close(pooled[4], expected[3:6].mean())
    torch.testing.assert_close(pooled[0], expected[:2].mean())


def test_tova_reads_the_last_query_and_key_norm_keeps_small_keys():
    keys = torch.zeros(1, 1, 5, 2)
    keys[0, 0, 2] = torch.tensor([3.0, 0.0])
    keys[0, 0, 4] = torch.tensor([0.1, 0.0])
    queries = torch.tensor([[[[-1.0, 0.0], [1.0, 0.0]]]])
    tova = token_scorer("tova").score(scored_call(queries, keys))[0, 0]
    assert int(tova.argmax()) == 2
    norm = token_scorer("knorm").score(scored_call(queries, keys))[0, 0]
    assert int(norm.argmin()) == 2 and norm[0] == 0


def test_expected_attention_moves_queries_as_the_models_rotary_would():
    """The future queries are the observed ones rotated from their positions to the sampled future
    positions: equal to applying transformers' rotary to the un-rotated query at those positions."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from headlab.surgeon.compression.press import rotary_frequencies
    from headlab.surgeon.compression.scorers import FUTURE_POSITIONS, FUTURE_SAMPLES, _future_queries

    model = tiny_llama("mha")
    inv_freq = rotary_frequencies(model)
    raw = torch.randn(1, 5, 1, 6, generator=torch.Generator().manual_seed(1))
    rotary = model.model.rotary_emb

    def rotated(position: int) -> torch.Tensor:
        cos, sin = rotary(raw, torch.tensor([[position]]))
        return apply_rotary_pos_emb(raw, raw, cos, sin)[0]

    call = scored_call(rotated(7), torch.zeros(1, 5, 8, 6), query_positions=torch.tensor([7]), inv_freq=inv_freq)
    future = _future_queries(call)  # [1, 5, samples, 6]
    targets = 8 + torch.linspace(0, FUTURE_POSITIONS - 1, FUTURE_SAMPLES).round().long()
    expected = torch.stack([rotated(int(t))[0, :, 0] for t in targets], dim=1)
    # Both rotate the same fp32 query, by angles formed in fp32 from positions up to the last target: each
    # angle is off by at most u·(position + 1) radians, moving a rotated coordinate by that times |q|, and
    # the rotation's products and sums add a few u·|q|; twice for the two computations.
    angle_error = U * (int(targets.max()) + 1) * float(inv_freq.max())
    tolerance = 2 * float(raw.abs().max()) * math.sqrt(2) * (angle_error + 4 * U) * 2
    assert (future[0] - expected).abs().max() <= tolerance, (float((future[0] - expected).abs().max()), tolerance)


@pytest.mark.parametrize("settings, scores, message", [
    (dict(scorer="snapkv", budget=0.01, sinks=4, window=32), False, "smallest budget is"),
    (dict(scorer="snapkv", budget=0.9, tokens=10), False, "exactly one of --budget"),
    (dict(scorer="snapkv", budget=0.5, whole=0.3), False, "need --rule"),
    (dict(scorer="nonsense", budget=0.5), False, "unknown token scorer 'nonsense'"),
    (dict(scorer="snapkv", budget=0.5, pooling=4), False, "must be odd"),
    (dict(scorer="snapkv", budget=0.5, whole=0.3, rule="retrieval"), False, "needs a scores file"),
])
def test_bad_press_settings_are_one_line(settings, scores, message):
    model = tiny_llama("gqa")
    with pytest.raises(HeadlabError, match=message):
        KVPress(model, PressSettings(**settings), random_scores(model) if scores else None).head_budget(256)


def test_expected_attention_is_refused_on_a_family_without_rotary_positions():
    with pytest.raises(HeadlabError, match="no plain rotary frequencies"):
        KVPress(family_model("gpt2"), PressSettings(scorer="expected_attention", budget=0.5))


def test_head_scores_of_another_model_are_refused():
    model = tiny_llama("gqa")
    other = tiny_llama("mha")
    with pytest.raises(HeadlabError):
        KVPress(model, PressSettings(scorer="snapkv", budget=0.5, whole=0.3, rule="retrieval"), random_scores(other))


def test_a_batch_and_edits_on_compressed_layers_are_refused():
    model = tiny_llama("gqa")
    press = KVPress(model, PressSettings(scorer="snapkv", budget=1.0))
    cache = press.cache(10)
    with attach(model, compression=press), pytest.raises(HeadlabError, match="one sequence"):
        model(input_ids=torch.randint(3, 50, (2, 10)), past_key_values=cache)
    with pytest.raises(HeadlabError, match="compressed by the press"):
        with attach(model, Plan([Stream(1, tuple(range(9)))]), compression=press):
            pass


def test_the_budget_says_the_smallest_it_can_hold():
    model = family_model("gemma3_text")  # 3 sliding layers of 6 positions and one global layer
    with pytest.raises(HeadlabError) as error:
        head_budget(model.config, 40, 0.05, None, 0, 4)
    floor = float(str(error.value).split("smallest budget is ")[1].split("%")[0]) / 100
    budget = head_budget(model.config, 40, math.ceil(floor * 1000) / 1000, None, 0, 4)
    assert budget.per_head >= 4


@pytest.mark.parametrize("name", ["gemma3_text", "gpt_oss"])
def test_the_sliding_windows_keep_the_budgets_share_too(name):
    """At 30% of the cache every layer keeps 30% of what it holds (at least its sinks and window), and
    decoding (with the windows moving over the kept positions) equals eager attention over the kept keys
    within each window."""
    model = family_model(name)
    ids = ids_of(model, PREFILL)
    press = KVPress(model, PressSettings(scorer="snapkv", budget=0.3, sinks=1, window=1, observation=4, slack=100))
    sequence, ours, cache = pressed_decoding(model, press, ids)
    assert press.layers == list(range(4)) and press.budget.per_sliding
    window = cache.layers[0].window
    assert window == 7
    with torch.no_grad():
        full = cache_bytes(model(input_ids=ids[:, :PREFILL], use_cache=True).past_key_values)
    shape = model_shape(model)
    assert cache_bytes(cache) <= 0.3 * full + (STEPS + 2) * 2 * shape.head_dim * 4 * 4 * shape.n_kv_heads
    reference, own_cached, noise = eager_reference(model, press, cache, sequence)
    assert (ours - reference).abs().max() <= 10 * noise + 1e-5, (noise, float((ours - reference).abs().max()))
