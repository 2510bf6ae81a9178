"""The evaluation of streaming-head plans on SmolLM2 (short prompts, a short window): the cache bytes
each condition holds, the unedited condition against the model's own loss, the pooling of random
draws, and the command's files."""

import json
import math

import pytest
import torch

from headlab.cli import main
from headlab.probes.compression.run import evaluate_compression, summarize_runs
from headlab.probes.compression.file import COMPRESSION_FORMAT
from headlab.core.text import load_text, token_windows
from headlab.probes.compression.settings import CompressionSettings
from headlab.surgeon.streaming.rules import full_kv_heads, random_ranking
from headlab.surgeon import model_shape
from headlab.core.errors import InputFileError

pytestmark = pytest.mark.slow

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
    assert data["format"] == COMPRESSION_FORMAT and data["kind"] == "streaming"
    assert data["settings"]["compensate"] is True
    assert {row["rule"] for row in data["summary"]} == {"full", "random"}
    page = (out / "compression.html").read_text()
    assert 'name="generator" content="headlab"' in page and "needle recall" in page


@pytest.fixture(scope="module")
def converted_checkpoint(smollm2, tmp_path_factory):
    """SmolLM2 with layers 0 and 1 converted to the hybrid form (untrained feature maps), saved with
    its tokenizer and its base recorded as convert records it."""
    import copy

    from headlab.surgeon.conversion import LinearSettings, convert
    from headlab.surgeon.conversion.converted import save_converted

    model, tokenizer = smollm2
    converted = convert(copy.deepcopy(model), LinearSettings(form="hybrid", window=16, layers=(0, 1)))
    folder = tmp_path_factory.mktemp("conversion") / "ckpt"
    save_converted(converted, tokenizer, folder, {"base_model": "smollm2-135m"})
    return converted, folder


def test_stream_eval_of_a_converted_checkpoint_measures_it_against_its_base(converted_checkpoint, smollm2, tmp_path):
    converted, folder = converted_checkpoint
    base, tokenizer = smollm2
    out = tmp_path / "eval"
    status = main(["stream-eval", str(folder), "--lengths", "256", "--needle-depths", "0.5", "--needles", "1",
                   "--windows", "1", "--out", str(out)])
    assert status == 0
    data = json.loads((out / "compression.json").read_text())
    assert data["kind"] == "conversion" and data["base_model"] == "smollm2-135m" and data["model_id"] == str(folder)
    assert "rules" not in data["settings"] and data["settings"]["lengths"] == [256]
    runs = {run["rule"]: run for run in data["runs"]}
    assert sorted(runs) == ["converted", "full"]
    window = token_windows(tokenizer, load_text(None, heldout=True), 1, 256, 0)[0]
    with torch.no_grad():  # each model's loss, computed here without the evaluation's code
        for rule, model in (("full", base), ("converted", converted)):
            assert runs[rule]["losses"] == [float(model(input_ids=window, labels=window, use_cache=False).loss)]
    shape = model_shape(base)
    entry = 2 * shape.head_dim * 4  # keys and values of one position of one KV head, fp32
    assert runs["full"]["keep"] == 1.0 and runs["full"]["full_heads"] == 90
    assert runs["converted"]["keep"] == pytest.approx(28 / 30) and runs["converted"]["full_heads"] == 84
    state = shape.n_heads * 2 * 64 * (shape.head_dim + 1) * 4  # [heads, 2F, D + 1] fp32, feature dim 64
    for full, conv in zip(runs["full"]["needles"], runs["converted"]["needles"]):
        positions = full["kv_bytes"] // (entry * 90)
        assert full["kv_bytes"] == positions * entry * 90 and positions > 200
        # terraced window of 16: the next query (position `positions`) sees its own block of 16 and the one
        # before in softmax, so the cache holds keys from the start of the block before it
        window_bytes = (16 + positions % 16) * shape.n_kv_heads * entry
        assert conv["kv_bytes"] == positions * entry * 84 + 2 * (window_bytes + state)
    rows = {row["rule"]: row for row in data["summary"]}
    assert rows["converted"]["kv_fraction"] == pytest.approx(runs["converted"]["needles"][0]["kv_bytes"]
                                                             / runs["full"]["needles"][0]["kv_bytes"])
    page = (out / "compression.html").read_text()
    assert "converted to linear attention, against smollm2-135m" in page and "<td>base</td>" in page


def test_stream_eval_of_a_converted_checkpoint_alone(converted_checkpoint, tmp_path):
    _, folder = converted_checkpoint
    out = tmp_path / "alone"
    assert main(["stream-eval", str(folder), "--base", "none", "--lengths", "128", "--needle-depths", "0.5",
                 "--needles", "1", "--windows", "1", "--out", str(out)]) == 0
    data = json.loads((out / "compression.json").read_text())
    assert data["base_model"] is None and [row["rule"] for row in data["summary"]] == ["converted"]
    assert data["summary"][0]["kv_fraction"] is None


def test_an_interrupted_evaluation_resumes_after_its_last_finished_run(smollm2, tmp_path, monkeypatch):
    """Ctrl-C after the first run: the progress file holds it; the same evaluation started again
    measures only the runs it lacks and gives the result of an uninterrupted one."""
    from headlab.probes.compression import run as compression

    model, tokenizer = smollm2
    settings = CompressionSettings(**{**SETTINGS, "random_sets": 1, "lengths": (128, 160)})
    journal = tmp_path / "compression.progress.json"
    measure, calls = compression._measure, []

    def interrupted_after_one(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return measure(*args, **kwargs)

    monkeypatch.setattr(compression, "_measure", interrupted_after_one)
    with pytest.raises(KeyboardInterrupt):
        evaluate_compression(model, tokenizer, None, settings, "m", progress=False, journal_path=journal)
    kept = list(json.loads(journal.read_text())["pieces"].values())
    assert [(run["rule"], run["length"]) for run in kept] == [("full", 128)]

    def counted(*args, **kwargs):
        calls.append(1)
        return measure(*args, **kwargs)

    calls.clear()
    monkeypatch.setattr(compression, "_measure", counted)
    resumed = evaluate_compression(model, tokenizer, None, settings, "m", progress=False, journal_path=journal)
    assert len(calls) == 3  # (random, 128), (full, 160), (random, 160)
    assert resumed["runs"][0] == kept[0]
    fresh = evaluate_compression(model, tokenizer, None, settings, "m", progress=False)
    strip = [{k: v for k, v in run.items() if k != "seconds"} for run in fresh["runs"]]
    assert [{k: v for k, v in run.items() if k != "seconds"} for run in resumed["runs"]] == strip
    other = CompressionSettings(**{**SETTINGS, "random_sets": 1, "lengths": (128,)})
    with pytest.raises(InputFileError, match="holds a compression of other settings"):
        evaluate_compression(model, tokenizer, None, other, "m", progress=False, journal_path=journal)


def test_stream_eval_of_a_converted_checkpoint_resumes(converted_checkpoint, tmp_path, monkeypatch):
    """The converted checkpoint measured, the base interrupted: the same command measures the base only
    and removes its progress file once the results are written."""
    from headlab.probes.compression import run as compression

    _, folder = converted_checkpoint
    out = tmp_path / "resumed"
    args = ["stream-eval", str(folder), "--lengths", "128", "--needle-depths", "0.5", "--needles", "1", "--windows",
            "1", "--out", str(out)]
    measure, rules, compression_measure = compression.conversion_runs, [], compression._measure

    def base_interrupted(model, tokenizer, rule, *rest, **kwargs):
        rules.append(rule)
        if rule == "full":
            raise KeyboardInterrupt
        return measure(model, tokenizer, rule, *rest, **kwargs)

    monkeypatch.setattr(compression, "conversion_runs", base_interrupted)
    assert main(args) == 130
    pieces = json.loads((out / "compression.progress.json").read_text())["pieces"]
    assert [run["rule"] for run in pieces.values()] == ["converted"]
    measured = []
    monkeypatch.setattr(compression, "_measure", lambda *a, **k: measured.append(1) or compression_measure(*a, **k))
    monkeypatch.setattr(compression, "conversion_runs", measure)
    assert main(args) == 0
    assert len(measured) == 1 and not (out / "compression.progress.json").exists()
    assert {row["rule"] for row in json.loads((out / "compression.json").read_text())["summary"]} == {"converted",
                                                                                                       "full"}
