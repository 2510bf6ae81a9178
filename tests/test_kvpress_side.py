"""The kvpress side of the side-by-side benchmark (``benchmarks/kvpress_side.py``) in kvpress' own
environment (``.venv-kvpress``, built by ``scripts/setup.sh --tests``; kvpress 0.5.5 pins transformers
< 5.3): on a tiny random Llama saved here by headlab's transformers and read there by kvpress', two
short prompts, two presses and both modes give one run each with the cache entries the press keeps,
and the uncompressed baseline (press ``none``) reproduces headlab's greedy decoding of the same tokens
in both modes (agnostic: the context, then the question, then decoding; aware: all but the last token).
"""

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import LLAMA_VARIANTS, VOCAB, tiny_llama

from headlab.probes.scorers.retrieval import greedy_with_top_keys

ROOT = Path(__file__).resolve().parents[1]
KVPRESS_PYTHON = ROOT / ".venv-kvpress" / "bin" / "python"
SIDE = ROOT / "benchmarks" / "kvpress_side.py"
PRESSES = ("KnormPress", "SnapKVPress")  # SnapKV needs a prefill longer than its 64-token window
LENGTHS, QUESTION_STARTS, NEW_TOKENS, BUDGET, LAYERS = (100, 107), (80, 90), 6, 0.5, 3

if not KVPRESS_PYTHON.exists() and os.environ.get("HEADLAB_REQUIRE_KVPRESS"):
    raise RuntimeError("HEADLAB_REQUIRE_KVPRESS is set but .venv-kvpress is missing (bash scripts/setup.sh --tests)")
pytestmark = [pytest.mark.skipif(not KVPRESS_PYTHON.exists(),
                                 reason="no .venv-kvpress (bash scripts/setup.sh --tests)"), pytest.mark.slow]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Save a tiny Llama and two prompts; run the kvpress side on them."""
    work = tmp_path_factory.mktemp("kvpress")
    model = tiny_llama("gqa", layers=LAYERS)
    model.save_pretrained(work / "model")
    generator = torch.Generator().manual_seed(0)
    prompts = [{"input_ids": torch.randint(1, VOCAB, (n,), generator=generator).tolist(), "question_start": q,
                "answer": "x", "needle": 0, "depth": 0.5, "length": n} for n, q in zip(LENGTHS, QUESTION_STARTS)]
    (work / "prompts.json").write_text(json.dumps({"prompts": prompts, "stops": {"end_ids": [], "newline_ids": []}}))
    done = subprocess.run([str(KVPRESS_PYTHON), str(SIDE), "--prompts", str(work / "prompts.json"),
                           "--model-dir", str(work / "model"), "--out", str(work / "runs.json"),
                           "--presses", ",".join(PRESSES), "--budgets", str(BUDGET), "--modes", "agnostic,aware",
                           "--max-new-tokens", str(NEW_TOKENS), "--no-progress"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return work, model, prompts, json.loads((work / "runs.json").read_text())


def test_one_run_per_prompt_mode_and_press_in_kvpress_environment(run):
    work, _, prompts, out = run
    assert out["format"] == "headlab-kvpress-side/1"
    assert out["versions"]["kvpress"] == "0.5.5"
    major, minor = map(int, out["versions"]["transformers"].split(".")[:2])
    assert (major, minor) < (5, 3)
    assert out["model_class"] == "LlamaForCausalLM" and out["compressed_layers"] == list(range(LAYERS))
    keys = sorted((r["prompt"], r["mode"], r["press"], r["budget"]) for r in out["runs"])
    expected = sorted((p, m, name, None if name == "none" else BUDGET) for p in range(len(prompts))
                      for m in ("agnostic", "aware") for name in ("none",) + PRESSES)
    assert keys == expected
    for r in out["runs"]:
        assert "error" not in r, r
        assert len(r["generated"]) == NEW_TOKENS and all(0 <= t < VOCAB for t in r["generated"])
        assert r["seconds"] >= r["prefill_seconds"] > 0
    journal = (work / "runs.json.partial.jsonl").read_text().splitlines()
    assert len(journal) == 1 + len(expected)  # the identity, then one line per run


def test_cache_entries_are_what_the_press_keeps(run):
    _, _, prompts, out = run
    kv_heads = LLAMA_VARIANTS["gqa"][1]
    for r in out["runs"]:
        prompt = prompts[r["prompt"]]
        prefill = prompt["question_start"] if r["mode"] == "agnostic" else prompt["length"] - 1
        assert r["prefill_tokens"] == prefill
        kept = prefill if r["press"] == "none" else int(prefill * BUDGET)
        assert r["entries_tensor"] == r["entries_unmasked"] == LAYERS * kv_heads * kept, r


def test_uncompressed_baseline_reproduces_headlabs_greedy_decoding(run):
    _, model, prompts, out = run
    for index, prompt in enumerate(prompts):
        ids = torch.tensor([prompt["input_ids"]])
        expected, _ = greedy_with_top_keys(model, ids, NEW_TOKENS, None, record=False)
        for mode in ("agnostic", "aware"):
            baseline = next(r for r in out["runs"] if (r["prompt"], r["mode"], r["press"]) == (index, mode, "none"))
            assert baseline["generated"] == expected, (index, mode)


def test_driver_refuses_to_overwrite_a_file_it_did_not_write(tmp_path):
    spec = importlib.util.spec_from_file_location("kvpress_side_by_side",
                                                  ROOT / "benchmarks" / "kvpress_side_by_side.py")
    driver = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(driver)
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(SystemExit, match="not this benchmark's output"):
        driver.check_output(foreign)
    ours = tmp_path / "ours.json"
    ours.write_text(json.dumps({"format": driver.FORMAT}))
    driver.check_output(ours)
    driver.check_output(tmp_path / "missing.json")
    assert driver.n_conditions(["SnapKVPress", "DuoAttentionPress"], [0.25, 0.5]) == 1 + 2 + 1
