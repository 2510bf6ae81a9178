"""ACT's head search on SmolLM2: the layer-prefix search against one whole forward per head, in one run.

    python benchmarks/head_search.py --out benchmarks/results/head_search.json

Four ways to measure every candidate head (layers 2-28, 9 heads each: 243) on the same 32
``kv-recall`` calibration examples (4 choices each, 16 sequences per forward):

- ``whole_full_logits``: each head's plan runs the whole model with logits at every position (the
  search before the layer prefix);
- ``whole``: the whole model, logits only where a choice token is scored (``evaluate`` today);
- ``prefix``: every sequence whole from the kept residual stream entering the head's layer (the
  search when :class:`SuffixScorer` cannot serve a model);
- ``search``: :func:`calibration_search`, which also runs each sequence only from the head's first
  sink on, continuing the unedited cache.

A whole forward costs the same whatever the head's layer, so the two whole modes are timed on one
head per layer (``--sample``) and their per-head mean is multiplied by 243; the two searches are
timed on all 243 heads, whose accuracies must be identical (the sampled heads' in all four).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from unittest.mock import patch

import torch
from machine import cpu_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--sample", type=int, default=27, help="heads timed in the whole modes (one per layer)")
    parser.add_argument("--out", default="benchmarks/results/head_search.json")
    args = parser.parse_args()

    from headlab.surgeon import Calibrate, Plan, load_model
    from headlab.surgeon.hook import attach
    from headlab.surgeon.search import calibration
    from headlab.surgeon.search.calibration import SearchSettings, calibration_search, default_candidates
    from headlab.surgeon.search.accuracy import accuracy, choice_batches, score_batches
    from headlab.surgeon.search.tasks import load_task

    model, tokenizer = load_model("smollm2-135m")
    examples = load_task("kv-recall", "calibration", args.examples)
    candidates = default_candidates(model)
    heads = model.config.num_attention_heads
    layers = sorted({layer for layer, _ in candidates})
    sample = [(layer, layer % heads) for layer in layers][: args.sample]
    batches = choice_batches(tokenizer, examples, 16)

    def full_logits(index, batch):
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, batch.read]

    def read_logits(index, batch):
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=batch.read).logits

    def whole(forward) -> tuple[float, dict]:
        started, measured = time.perf_counter(), {}
        for layer, head in sample:
            with attach(model, Plan([Calibrate(layer, (head,))])):
                measured[f"{layer},{head}"] = accuracy(examples, score_batches(batches, len(examples), forward)).accuracy
        return (time.perf_counter() - started) / len(sample), measured

    torch.manual_seed(0)
    load_before = os.getloadavg()[0]
    per_head_full, acc_full = whole(full_logits)
    per_head_read, acc_read = whole(read_logits)
    settings = SearchSettings(("kv-recall",), len(examples), tuple(candidates))

    def timed_search() -> tuple[float, dict]:
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            state = calibration_search(model, tokenizer, examples, settings, Path(tmp) / "search.json")
            return time.perf_counter() - started, state

    search_seconds, state = timed_search()
    with patch.object(calibration, "_scorer_or_none", lambda *args: None):
        prefix_seconds, prefix_state = timed_search()
    sampled = {key: state["heads"][key] for key in acc_full}
    result = {
        "benchmark": "ACT head search, SmolLM2-135M-Instruct, kv-recall, one run",
        "cpu": cpu_model(), "threads": torch.get_num_threads(),
        "load_average_before_after": [load_before, os.getloadavg()[0]],
        "examples": len(examples), "sequences": sum(len(b.rows) for b in batches), "candidates": len(candidates),
        "whole_full_logits_seconds_per_head": round(per_head_full, 3),
        "whole_seconds_per_head": round(per_head_read, 3),
        "whole_full_logits_seconds_all_heads": round(per_head_full * len(candidates), 1),
        "whole_seconds_all_heads": round(per_head_read * len(candidates), 1),
        "prefix_seconds_all_heads": round(prefix_seconds, 1),
        "search_seconds_all_heads": round(search_seconds, 1),
        "speedup_vs_whole_full_logits": round(per_head_full * len(candidates) / search_seconds, 2),
        "speedup_vs_whole": round(per_head_read * len(candidates) / search_seconds, 2),
        "speedup_vs_prefix": round(prefix_seconds / search_seconds, 2),
        "all_heads_identical_to_prefix": state["heads"] == prefix_state["heads"],
        "kept_heads": len(state["kept"]),
        "sampled_heads_identical": acc_full == acc_read == sampled,
        "sampled_accuracies": sampled, "baseline_accuracy": state["baseline"],
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
