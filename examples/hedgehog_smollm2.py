"""SmolLM2-135M converted to the LoLCATs hybrid and to plain Hedgehog linear attention on this CPU,
and how far back each form still finds a needle.

    python examples/hedgehog_smollm2.py --work /tmp/hedgehog-smollm2 --out examples/results

For each form, runs ``headlab convert`` (stage 1 attention transfer, stage 2 LoRA; ``--data chat``
by default: chat conversations whose answers the original model wrote), reloads the checkpoint
with ``load_model`` and measures needle recall on held-out needles against the needle's distance
from the end of the prompt: inside the hybrid's 64-token softmax window, just outside it, and far
from it. Per form and distance bin: recall, ROUGE-1 recall and the answer's log-probability with
95% bootstrap intervals over prompts, and a paired Wilcoxon test of the form against the original
on the same prompts. Everything lands in ``--out/hedgehog_smollm2.json``: perplexities (original,
untrained, after stage 1, after stage 2, on held-out windows of the training data's kind), tokens
and wall time per stage, the needle results and every response. Checkpoints stay in ``--work``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from headlab.cli import main as headlab
from headlab.probes.scorers.needles import HELDOUT_NEEDLES
from headlab.probes.validation.recall_gate import gate_prompts, needle_runs
from headlab.probes.validation.run import NEEDLE_MEASURES
from headlab.probes.validation.statistics import bootstrap_intervals, paired_p
from headlab.surgeon import load_model
from headlab.core.files import write_json

WINDOW = 64
BINS = {"inside the window": (0, WINDOW), "just outside": (WINDOW, 3 * WINDOW), "far": (6 * WINDOW, 10 ** 9)}
TARGET_DISTANCES = (0, 100, 160, 420, 800)  # tokens from the answer's end to the prompt's end (0: closest)


def distance_prompts(tokenizer, lengths: list[int]):
    """Every held-out needle at every length and target distance that fits (each prompt once), with
    its actual distance."""
    return gate_prompts(tokenizer, WINDOW, lengths, len(HELDOUT_NEEDLES), list(TARGET_DISTANCES))


def by_distance(runs: list[dict], distances: list[int], reference: list[dict] | None) -> dict:
    """Per bin and measure: mean, 95% bootstrap interval and (against ``reference``) the paired test."""
    out = {}
    for name, (low, high) in BINS.items():
        chosen = [i for i, d in enumerate(distances) if low <= d < high]
        if not chosen:
            continue
        row = {"n_prompts": len(chosen), "distances": [distances[i] for i in chosen]}
        for measure in NEEDLE_MEASURES:
            values = np.array([runs[i][measure.name] for i in chosen])
            base = values if reference is None else np.array([reference[i][measure.name] for i in chosen])
            intervals = bootstrap_intervals(values, base[None], 2000, seed=0)
            row[measure.name] = {"mean": float(values.mean()), "ci": intervals["top"]}
            if reference is not None:
                row[measure.name].update(original_mean=float(base.mean()), drop_ci=intervals["difference"],
                                         paired_p_worse_than_original=paired_p(values, base[None], True))
        out[name] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/hedgehog-smollm2", help="folder for checkpoints")
    parser.add_argument("--out", default="examples/results", help="folder for the summary JSON")
    parser.add_argument("--steps", default="60,40", help="stage-1,stage-2 optimiser steps")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per training window")
    parser.add_argument("--accumulation", type=int, default=4)
    parser.add_argument("--lengths", default="512,1024", help="needle prompt lengths in tokens")
    parser.add_argument("--forms", default="hybrid,hedgehog")
    parser.add_argument("--data", default="chat", choices=("chat", "text"))
    args = parser.parse_args()
    torch.manual_seed(0)
    path = Path(args.out) / "hedgehog_smollm2.json"
    model, tokenizer = load_model("smollm2-135m")
    prompts, distances = distance_prompts(tokenizer, [int(x) for x in args.lengths.split(",")])
    # Forms run separately (--forms) are merged into one summary; the original is measured once.
    summary = json.loads(path.read_text()) if path.exists() else {}
    if summary.get("distances") != distances:
        summary = {"forms": {}, "distances": distances}
    summary.update({"settings": vars(args), "threads": torch.get_num_threads(), "window": WINDOW,
                    "bins": {name: list(bounds) for name, bounds in BINS.items()}})
    if "original" not in summary:
        runs = needle_runs(model, tokenizer, prompts)
        summary["original"] = {"needles": by_distance(runs, distances, None), "runs": runs}
    del model
    for form in args.forms.split(","):
        target = Path(args.work) / f"{form}-{args.data}"
        started = time.perf_counter()
        code = headlab(["convert", "smollm2-135m", "--to", form, "--out", str(target), "--steps", args.steps,
                        "--tokens", str(args.tokens), "--accumulation", str(args.accumulation), "--eval-every", "10",
                        "--data", args.data])
        if code:
            raise SystemExit(code)
        wall = time.perf_counter() - started
        provenance = json.loads((target / "headlab_conversion.json").read_text())["provenance"]
        converted, tokenizer = load_model(target)
        started = time.perf_counter()
        runs = needle_runs(converted, tokenizer, prompts)
        summary["forms"][f"{form}-{args.data}"] = {
            "convert_wall_s": round(wall, 1), "needle_wall_s": round(time.perf_counter() - started, 1),
            "held_out_perplexity": provenance["held_out_perplexity"], "stages": provenance["stages"],
            "needles": by_distance(runs, distances, summary["original"]["runs"]), "runs": runs,
        }
        write_json(path, summary)
    write_json(path, summary)
    for form, result in summary["forms"].items():
        recall = {name: row["recalled"]["mean"] for name, row in result["needles"].items()}
        print(form, result["held_out_perplexity"], recall)


if __name__ == "__main__":
    main()
