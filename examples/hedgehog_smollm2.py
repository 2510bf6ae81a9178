"""SmolLM2-135M converted to LoLCATs hybrid and to plain Hedgehog linear attention on this CPU.

    python examples/hedgehog_smollm2.py --work /tmp/hedgehog-smollm2 --out examples/results

For each form, runs ``headlab convert`` (stage 1 attention transfer, stage 2 LoRA; Python
standard-library docstrings, held-out windows for perplexity), reloads the checkpoint with
``load_model``, and measures needle-in-a-haystack recall at 1k–4k tokens (decoding from the
recurrent state) against the original model, plus a greedy sample. Everything lands in
``--out/hedgehog_smollm2.json``: perplexities (original, untrained, after stage 1, after stage 2),
tokens and wall time per stage, recall, samples. Checkpoints stay in ``--work``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from headlab.cli import main as headlab
from headlab.probes.retrieval import NeedleSettings, retrieval_scores
from headlab.surgeon import load_model
from headlab.surgeon.files import write_json

PROMPT = "The three most important ideas in computer science are"


def needle_recall(model, tokenizer, lengths: tuple[int, ...]) -> dict:
    """Recall and responses over 2 needles × ``lengths`` at depth 0.5 (greedy, 24 new tokens)."""
    settings = NeedleSettings(lengths=lengths, depths=(0.5,), n_needles=2)
    started = time.perf_counter()
    result = retrieval_scores(model, tokenizer, settings, record=False)
    return {"recall": result.recall, "runs": result.runs, "seconds": round(time.perf_counter() - started, 1)}


def sample(model, tokenizer, max_new_tokens: int = 40) -> str:
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/hedgehog-smollm2", help="folder for checkpoints")
    parser.add_argument("--out", default="examples/results", help="folder for the summary JSON")
    parser.add_argument("--steps", default="60,40", help="stage-1,stage-2 optimiser steps")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--accumulation", type=int, default=4)
    parser.add_argument("--lengths", default="1024,2048,4096", help="needle prompt lengths")
    parser.add_argument("--forms", default="hybrid,hedgehog")
    args = parser.parse_args()
    lengths = tuple(int(x) for x in args.lengths.split(","))
    torch.manual_seed(0)
    path = Path(args.out) / "hedgehog_smollm2.json"
    # Forms run separately (--forms) are merged into one summary; the original is measured once.
    summary = json.loads(path.read_text()) if path.exists() else {"forms": {}}
    summary.update({"settings": vars(args), "threads": torch.get_num_threads()})
    if "original" not in summary:
        model, tokenizer = load_model("smollm2-135m")
        summary["original"] = {"needles": needle_recall(model, tokenizer, lengths), "sample": sample(model, tokenizer)}
        del model
    for form in args.forms.split(","):
        target = Path(args.work) / form
        started = time.perf_counter()
        code = headlab(["convert", "smollm2-135m", "--to", form, "--out", str(target), "--steps", args.steps,
                        "--seq-len", str(args.seq_len), "--accumulation", str(args.accumulation), "--eval-every", "10"])
        if code:
            raise SystemExit(code)
        wall = time.perf_counter() - started
        provenance = json.loads((target / "headlab_conversion.json").read_text())["provenance"]
        converted, tokenizer = load_model(target)
        summary["forms"][form] = {
            "convert_wall_s": round(wall, 1),
            "held_out_perplexity": provenance["held_out_perplexity"],
            "stages": provenance["stages"],
            "needles": needle_recall(converted, tokenizer, lengths),
            "sample": sample(converted, tokenizer),
        }
        write_json(path, summary)
    print(json.dumps({f: v["held_out_perplexity"] for f, v in summary["forms"].items()}, indent=2))


if __name__ == "__main__":
    main()
