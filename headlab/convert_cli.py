"""``headlab convert``: softmax attention → Hedgehog linear or LoLCATs hybrid attention, trained in two
stages and saved as a checkpoint that ``load_model`` reloads."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from .cli_common import MODEL_HELP

FORMS = {"hedgehog": "linear", "hybrid": "hybrid"}


def _steps(text: str) -> tuple[int, int]:
    parts = [int(x) for x in text.split(",")]
    if len(parts) not in (1, 2) or min(parts) < 0:
        raise argparse.ArgumentTypeError("--steps is S1 or S1,S2 with non-negative integers")
    return parts[0], parts[-1] if len(parts) == 2 else parts[0]


def _layers(text: str | None) -> tuple[int, ...] | None:
    from .cli import _layers as parse

    return None if text is None else tuple(parse(text))


def _convert(args) -> int:
    import torch

    from .probes.corpus import train_eval_windows
    from .surgeon import load_model
    from .surgeon.conversion import convert, is_converted_directory, save_converted
    from .surgeon.evaluate import heldout_loss
    from .surgeon.hedgehog import LinearSettings
    from .surgeon.linear_training import (StageSettings, add_lora, lora_defaults, next_token_loss, run_stage,
                                          stage1_parameters, transfer_loss, transfer_mode)

    out = Path(args.out)
    training = out / "training"
    if is_converted_directory(out) and not training.exists():
        raise ValueError(f"{out} already holds a converted checkpoint; choose another --out")
    stage1_steps, stage2_steps = args.steps
    settings = LinearSettings(form=FORMS[args.to], window=args.window, terrace=not args.sliding,
                              feature_dim=args.feature_dim, feature_map=args.feature_map, layers=_layers(args.layers))
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model)
    n_train = max(1, max(stage1_steps, stage2_steps) * args.accumulation)
    train, held_out = train_eval_windows(tokenizer, args.text_file, n_train, args.eval_windows, args.seq_len, args.seed)
    train_ids, val_ids = torch.cat(train), torch.cat(held_out)
    perplexity = {"original": math.exp(heldout_loss(model, held_out))}
    convert(model, settings)
    perplexity["converted_untrained"] = math.exp(heldout_loss(model, held_out))
    common = dict(accumulation=args.accumulation, eval_every=args.eval_every, seed=args.seed)
    stage1 = StageSettings(steps=stage1_steps, lr=args.lr1, loss=args.loss, **common)
    summaries = []
    if stage1_steps:
        params = stage1_parameters(model)
        with transfer_mode(model, args.loss) as layers:
            summaries.append(run_stage("stage1", model, params, lambda ids: transfer_loss(model, ids, layers, stage1.loss_scale),
                                       train_ids, val_ids, stage1, training))
        perplexity["after_stage1"] = math.exp(heldout_loss(model, held_out))
    if stage2_steps:
        stage2 = lora_defaults(steps=stage2_steps, lr=args.lr2, **common)
        peft_model = add_lora(model, stage2)
        params = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
        summaries.append(run_stage("stage2", peft_model, params, lambda ids: next_token_loss(peft_model, ids),
                                   train_ids, val_ids, stage2, training))
        model = peft_model.merge_and_unload()
        perplexity["after_stage2"] = math.exp(heldout_loss(model, held_out))
    provenance = {"base_model": args.model, "seq_len": args.seq_len, "held_out_windows": len(held_out),
                  "held_out_perplexity": perplexity, "stages": summaries}
    save_converted(model, tokenizer, out, provenance)
    for name, value in perplexity.items():
        print(f"held-out perplexity {name}: {value:.3f}")
    print(f"converted checkpoint: {out} (reload with headlab.surgeon.load_model({str(out)!r}))")
    return 0


def add_parser(sub) -> None:
    """Register ``convert`` on the main parser's subparsers."""
    p = sub.add_parser(
        "convert", help="convert softmax attention to Hedgehog linear or hybrid attention and train it",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Replace the attention of the chosen layers of a causal LM by Hedgehog linear attention "
                    "(--to hedgehog) or the LoLCATs hybrid of softmax over a recent window plus linear attention "
                    "over older tokens (--to hybrid). Stage 1 trains only the feature maps (and window weights) to "
                    "match each layer's softmax output; stage 2 trains LoRA adapters (r 8, alpha 16) on q/k/v/o_proj "
                    "with next-token loss and merges them. Training state goes to OUT/training (a killed run resumes "
                    "when started again with the same arguments); the checkpoint (config, tokenizer, "
                    "model.safetensors, headlab_conversion.json with settings, perplexities and training history) "
                    "goes to OUT and reloads with headlab.surgeon.load_model(OUT). Decoding then keeps a constant-size "
                    "state (plus the window) instead of a growing KV cache.")
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)  # converts in memory: no --max-memory
    p.add_argument("--to", choices=tuple(FORMS), required=True, help="plain linear (hedgehog) or the hybrid")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--layers", default=None, help="layers to convert, e.g. 2-27 or 3,5,9 (default: all)")
    p.add_argument("--steps", type=_steps, default=(100, 100), metavar="S1[,S2]",
                   help="optimiser steps of stage 1 and stage 2 (one number: both; 0 skips a stage)")
    p.add_argument("--window", type=int, default=64, help="softmax window of the hybrid")
    p.add_argument("--sliding", action="store_true", help="sliding window instead of the terrace (own + previous block)")
    p.add_argument("--feature-dim", type=int, default=64, help="F of the feature map (2F features)")
    p.add_argument("--feature-map", choices=("lolcats", "fla"), default="lolcats")
    p.add_argument("--loss", choices=("mse", "ce"), default="mse",
                   help="stage-1 loss: per-head output MSE or attention cross-entropy (T x T maps: short --seq-len)")
    p.add_argument("--lr1", type=float, default=1e-2, help="stage-1 learning rate")
    p.add_argument("--lr2", type=float, default=1e-4, help="stage-2 learning rate")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per training sequence")
    p.add_argument("--accumulation", type=int, default=8, help="sequences per optimiser step")
    p.add_argument("--eval-every", type=int, default=25, help="steps between validations and checkpoints")
    p.add_argument("--eval-windows", type=int, default=4, help="held-out windows for validation and perplexity")
    p.add_argument("--text-file", default=None, help="UTF-8 training text (default: Python standard-library docstrings)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_convert)
