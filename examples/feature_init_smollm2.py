"""Does the feature maps' starting point matter? SmolLM2-135M converted to the hybrid (all layers) with
the truncated identity (headlab's default) and with kaiming-uniform (the released LoLCATs configs),
then stage 1 (attention transfer) alone, side by side on the same windows.

    python examples/feature_init_smollm2.py --out examples/results

Writes ``--out/feature_init_smollm2.json``: per initialisation the held-out stage-1 loss (1000 x
per-head output MSE, mean over layers) before training and at every validation, the held-out
perplexity untrained and after stage 1, and the wall time.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from headlab.core.text import train_eval_windows
from headlab.surgeon import load_model
from headlab.surgeon.conversion.converted import convert
from headlab.surgeon.conversion.settings import FEATURE_INITS, LinearSettings, StageSettings
from headlab.surgeon.losses import heldout_loss
from headlab.core.files import write_json
from headlab.surgeon.conversion.training import run_stage, stage1_parameters, transfer_loss, transfer_mode


def one_run(init: str, args, train, held_out) -> dict:
    torch.manual_seed(args.seed)  # the same draw for every run that uses the generator
    model, _ = load_model("smollm2-135m")
    convert(model, LinearSettings(form="hybrid", feature_init=init))
    untrained = math.exp(heldout_loss(model, held_out))
    settings = StageSettings(steps=args.steps, accumulation=args.accumulation, eval_every=args.eval_every,
                             seed=args.seed)
    started = time.perf_counter()
    with transfer_mode(model, "mse") as layers:
        summary = run_stage(f"stage1-{init}", model, stage1_parameters(model),
                            lambda ids: transfer_loss(model, ids, layers, settings.loss_scale),
                            torch.cat(train), torch.cat(held_out), settings)
    return {"perplexity_untrained": untrained, "perplexity_after_stage1": math.exp(heldout_loss(model, held_out)),
            "stage1_initial_val_loss": summary["initial_val_loss"], "stage1_best_val_loss": summary["best_val_loss"],
            "history": summary["history"], "seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="examples/results")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--accumulation", type=int, default=4)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    _, tokenizer = load_model("smollm2-135m")
    train, held_out = train_eval_windows(tokenizer, None, args.steps * args.accumulation, 4, args.seq_len, args.seed)
    summary = {"settings": vars(args), "threads": torch.get_num_threads(),
               "runs": {init: one_run(init, args, train, held_out) for init in FEATURE_INITS}}
    write_json(Path(args.out) / "feature_init_smollm2.json", summary)
    for init, run in summary["runs"].items():
        print(f"{init}: stage-1 val loss {run['stage1_initial_val_loss']:.2f} -> {run['stage1_best_val_loss']:.2f}, "
              f"perplexity {run['perplexity_untrained']:.1f} -> {run['perplexity_after_stage1']:.2f}")


if __name__ == "__main__":
    main()
