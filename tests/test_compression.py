"""The evaluation of streaming-head plans on SmolLM2 (short prompts, a short window): the cache bytes
each condition holds, the unedited condition against the model's own loss, the pooling of random
draws, and the command's files."""

import json
import math

import pytest
import torch

from headlab.cli import main
from headlab.probes.compression import COMPRESSION_FORMAT, evaluate_compression, summarize_runs
from headlab.probes.corpus import load_text, token_windows
from headlab.probes.settings import CompressionSettings
from headlab.probes.streaming import full_kv_heads, random_ranking
from headlab.surgeon import model_shape

SETTINGS = dict(rules=("random",), keeps=(0.25,), random_sets=2, lengths=(256,), depths=(0.5,), n_needles=2,
                windows=1, sinks=4, window=32, max_new_tokens=8)


@pytest.fixture(scope="module")
def result(smollm2):
    model, tokenizer = smollm2
    return evaluate_compression(model, tokenizer, None, CompressionSettings(**SETTINGS), progress=False)


def test_each_condition_holds_the_cache_its_plan_says(result, smollm2):
    model, _ = smollm2
    shape = model_shape(model)
    entry = 2 * shape.head_dim * 4  # keys and values of one position of one KV head, fp32
    candidates = shape.n_layers * shape.n_kv_heads
    by_rule = {(run["rule"], run["draw"]): run for run in result["runs"]}
    assert sorted(by_rule, key=str) == sorted([("full", None), ("random", 0), ("random", 1)], key=str)
    prompt_tokens = [n["kv_bytes"] // (entry * candidates) for n in by_rule["full", None]["needles"]]
    assert all(abs(n - 255) <= 16 for n in prompt_tokens), "the prefill holds the 256-token prompt but its last token"
    for draw in (0, 1):
        run = by_rule["random", draw]
        full, streaming = full_kv_heads(random_ranking(shape, seed=draw), 0.25)
        assert run["full_heads"] == len(full) == 23  # 0.25 x 90 = 22.5, rounded half up
        kept = SETTINGS["sinks"] + SETTINGS["window"]
        for needle, positions in zip(run["needles"], prompt_tokens):
            assert needle["kv_bytes"] == (len(full) * positions + len(streaming) * kept) * entry


def test_the_unedited_condition_is_the_model_and_streaming_changes_the_loss(result, smollm2):
    model, tokenizer = smollm2
    window = token_windows(tokenizer, load_text(None, heldout=True), 1, 256, 0)[0]
    with torch.no_grad():
        own = float(model(input_ids=window, labels=window, use_cache=False).loss)
    full = next(r for r in result["runs"] if r["rule"] == "full")
    assert full["losses"] == [own]
    streamed = [r["losses"][0] for r in result["runs"] if r["rule"] == "random"]
    assert all(abs(loss - own) > 1e-3 for loss in streamed), "a 32-position window must change a 256-token loss"


def test_random_draws_are_pooled_per_prompt(result):
    rows = {row["rule"]: row for row in result["summary"]}
    draws = [r for r in result["runs"] if r["rule"] == "random"]
    per_prompt = [sum(d["needles"][i]["recalled"] for d in draws) / 2 for i in range(2)]
    assert rows["random"]["draws"] == 2 and rows["random"]["recall"] == pytest.approx(sum(per_prompt) / 2)
    assert rows["random"]["perplexity"] == pytest.approx(math.exp(sum(d["losses"][0] for d in draws) / 2))
    assert rows["full"]["kv_fraction"] == 1.0 and 0 < rows["random"]["kv_fraction"] < 0.5
    lo, hi = rows["random"]["recall_ci"]
    assert lo <= rows["random"]["recall"] <= hi
    fake = [{**r, "needles": [{**n, "recalled": 1.0} for n in r["needles"]]} for r in result["runs"]]
    assert all(row["recall"] == 1.0 and row["recall_ci"] == [1.0, 1.0] for row in summarize_runs(fake))


def test_stream_eval_command_writes_the_curves(tmp_path):
    out = tmp_path / "eval"
    status = main(["stream-eval", "smollm2-135m", "--rules", "random", "--keeps", "0.5", "--random-sets", "1",
                   "--lengths", "256", "--needle-depths", "0.5", "--needles", "1", "--windows", "1", "--window", "32",
                   "--compensate", "--out", str(out)])
    assert status == 0
    data = json.loads((out / "compression.json").read_text())
    assert data["format"] == COMPRESSION_FORMAT and data["settings"]["compensate"] is True
    assert {row["rule"] for row in data["summary"]} == {"full", "random"}
    page = (out / "compression.html").read_text()
    assert 'name="generator" content="headlab"' in page and "needle recall" in page
