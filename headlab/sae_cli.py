"""``headlab sae train|eval|dashboard``: sparse autoencoders on per-head outputs from the command line."""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from .cli_common import add_model_arguments, load_model_from



def _train(args) -> int:
    import torch

    from .cli import _init_distributed
    from .probes.corpus import train_eval_windows
    from .sae import (CachedActivations, ModelActivations, ShuffleBuffer, SparseAutoencoder, TrainSettings, Trainer,
                      evaluate_sae, save_sae)
    from .surgeon import attention_modules, model_shape
    from .surgeon.distributed import rank_and_world
    from .surgeon.files import write_json

    settings = TrainSettings(arch=args.arch, k=args.k, expansion=args.expansion, tokens=args.tokens,
                             batch_size=args.batch_size, buffer_tokens=args.buffer_tokens, lr=args.lr,
                             seed=args.seed, checkpoint_every=args.checkpoint_every, l1_coefficient=args.l1,
                             resample_every=args.resample_every)
    _init_distributed()
    rank, world = rank_and_world()
    torch.manual_seed(args.seed)
    model, tokenizer = load_model_from(args)
    shape = model_shape(model)
    if not 0 <= args.layer < shape.n_layers:
        raise ValueError(f"--layer {args.layer} outside 0..{shape.n_layers - 1}")
    rows_per_window = args.context - 1
    train, held_out = train_eval_windows(tokenizer, args.text_file, math.ceil(args.tokens / rows_per_window), args.eval_windows,
                               args.context, args.seed)
    out = Path(args.out)
    start = time.perf_counter()
    if args.cache and world == 1:
        cache = Path(args.cache)
        source = CachedActivations(cache) if (cache / "manifest.json").exists() else None
        if source is None:
            from .sae import cache_activations
            source = cache_activations(ModelActivations(model, train, args.layer), cache,
                                       metadata={"model": args.model, "context": args.context, "seed": args.seed})
    else:
        source = ModelActivations(model, train[rank::world], args.layer)
    buffer = ShuffleBuffer(source, settings.batch_size // world, max(settings.buffer_tokens // world,
                                                                     2 * settings.batch_size // world), args.seed + rank)
    sae = SparseAutoencoder(shape.n_heads * shape.head_dim, settings.expansion * shape.n_heads * shape.head_dim,
                            settings.arch, settings.k, shape.n_heads, shape.head_dim, args.seed)
    trainer = Trainer(sae, buffer, settings, out / "checkpoints")
    trainer.run()
    if rank > 0:
        return 0
    wall = time.perf_counter() - start
    module = f"{type(attention_modules(model)[args.layer]).__name__} (layer {args.layer}) o_proj input"
    provenance = {"settings": {**settings.__dict__}, "tokens_trained": settings.steps * settings.batch_size,
                  "train_windows": len(train), "epochs_over_windows": buffer.epoch, "context": args.context,
                  "wall_s": round(wall, 1), "world_size": world, "text": args.text_file or "Python standard-library docstrings"}
    save_sae(sae, out, args.model, args.layer, module, args.context, provenance)
    metrics, frequency = evaluate_sae(model, sae, held_out, args.layer, progress=True)
    metrics.update({"held_out_windows": len(held_out), "train_wall_s": round(wall, 1)})
    write_json(out / "metrics.json", metrics)
    from safetensors.torch import save_file
    from .surgeon.files import atomic_path
    with atomic_path(out / "sparsity.safetensors") as tmp:
        save_file({"sparsity": frequency.float()}, str(tmp))
    print(json.dumps({k: metrics[k] for k in ("l0", "explained_variance", "ce_loss_recovered", "dead_fraction")
                      if k in metrics}, indent=1))
    print(f"saved {out / 'cfg.json'}, {out / 'sae_weights.safetensors'}, {out / 'metrics.json'}")
    return 0


def _load(args):
    from .sae import load_sae

    sae, config = load_sae(args.sae)
    model, tokenizer = load_model_from(args, args.model or config["metadata"]["model_name"])
    return sae, config, model, tokenizer


def _eval(args) -> int:
    from .probes.corpus import load_text, token_windows
    from .sae import evaluate_sae
    from .surgeon.files import write_json

    sae, config, model, tokenizer = _load(args)
    layer = config["headlab"]["layer"]
    windows = token_windows(tokenizer, load_text(args.text_file), args.windows, args.context, args.seed)
    metrics, _ = evaluate_sae(model, sae, windows, layer, progress=True)
    metrics.update({"windows": args.windows, "context": args.context, "seed": args.seed, "sae": args.sae})
    print(write_json(args.out, metrics))
    return 0


def _dashboard(args) -> int:
    from .probes.corpus import load_text, token_windows
    from .sae import collect_examples, write_dashboard

    sae, config, model, tokenizer = _load(args)
    layer = config["headlab"]["layer"]
    windows = token_windows(tokenizer, load_text(args.text_file), args.windows, args.context, args.seed)
    if args.latents:
        latents = [int(x) for x in args.latents.split(",")]
    else:
        from .sae.evaluate import evaluate_sae
        _, frequency = evaluate_sae(model, sae, windows[: max(1, len(windows) // 4)], layer)
        latents = frequency.topk(args.top).indices.tolist()  # the most frequently active latents
    examples = collect_examples(model, sae, windows, layer, latents, progress=True)
    tokens = [[tokenizer.decode([i]) for i in w[0].tolist()] for w in windows]
    title = f"SAE features: {config['metadata']['model_name']} {config['metadata']['hook_name']}"
    print(write_dashboard(args.out, sae, examples, tokens, title))
    return 0


def add_parser(sub) -> None:
    """Register ``sae`` and its subcommands on the main parser's subparsers."""
    sae = sub.add_parser("sae", help="sparse autoencoders on per-head attention outputs (train, eval, dashboard)",
                         description="Sparse autoencoders on the per-head outputs of one layer (the input of o_proj, "
                                     "heads flattened; TransformerLens blocks.L.attn.hook_z).")
    commands = sae.add_subparsers(dest="sae_command", required=True)

    train = commands.add_parser(
        "train", help="train an autoencoder on one layer's head outputs",
        description="Train on head outputs of MODEL at --layer over windows of real text (the forward stops after "
                    "the layer; first token excluded), checkpointing to OUT/checkpoints (a killed run resumes when "
                    "started again with the same arguments), then save OUT/cfg.json + OUT/sae_weights.safetensors "
                    "(SAELens layout) and OUT/metrics.json measured on held-out windows. Runs data-parallel under "
                    "torchrun.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_arguments(train)
    train.add_argument("--layer", type=int, required=True, help="layer whose head outputs are encoded")
    train.add_argument("--arch", choices=("topk", "batchtopk", "relu", "jumprelu"), default="topk")
    train.add_argument("--k", type=int, default=32, help="active latents (topk, batchtopk)")
    train.add_argument("--expansion", type=int, default=16, help="d_sae = expansion x n_heads x d_head")
    train.add_argument("--tokens", type=int, default=200_000, help="training tokens")
    train.add_argument("--batch-size", type=int, default=1024, help="global batch in tokens")
    train.add_argument("--buffer-tokens", type=int, default=32768, help="shuffle buffer size in tokens")
    train.add_argument("--lr", type=float, default=None,
                       help="learning rate (default: 2e-4 / sqrt(d_sae / 2^14); relu: 1.2e-3)")
    train.add_argument("--l1", type=float, default=1.0,
                       help="relu: L1 coefficient on inputs normalised to E|x|^2 = d_in (unverified default)")
    train.add_argument("--resample-every", type=int, default=25_000,
                       help="relu: steps between dead-latent resamples (at most 4)")
    train.add_argument("--context", type=int, default=128, help="tokens per text window")
    train.add_argument("--eval-windows", type=int, default=16, help="held-out windows for metrics.json")
    train.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints")
    train.add_argument("--cache", default=None, help="activation cache folder (safetensors shards): written on the "
                                                     "first run, read by later ones (single process)")
    train.add_argument("--text-file", default=None, help="UTF-8 text (default: Python standard-library docstrings)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--out", required=True, help="output folder")
    train.set_defaults(run=_train)

    evaluate = commands.add_parser("eval", help="metrics of a saved autoencoder on text, as JSON",
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    evaluate.add_argument("sae", metavar="SAE_DIR", help="folder with cfg.json and sae_weights.safetensors")
    add_model_arguments(evaluate, required=False)  # default: the model recorded in cfg.json
    evaluate.add_argument("--windows", type=int, default=16)
    evaluate.add_argument("--context", type=int, default=128)
    evaluate.add_argument("--seed", type=int, default=1, help="window seed (training used --seed 0 by default)")
    evaluate.add_argument("--text-file", default=None)
    evaluate.add_argument("--out", required=True, help="JSON file to write")
    evaluate.set_defaults(run=_eval)

    dashboard = commands.add_parser("dashboard", help="standalone HTML page of chosen latents",
                                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    dashboard.add_argument("sae", metavar="SAE_DIR")
    add_model_arguments(dashboard, required=False)
    dashboard.add_argument("--latents", default=None, help="comma list (default: the --top most frequent)")
    dashboard.add_argument("--top", type=int, default=8)
    dashboard.add_argument("--windows", type=int, default=32)
    dashboard.add_argument("--context", type=int, default=128)
    dashboard.add_argument("--seed", type=int, default=1)
    dashboard.add_argument("--text-file", default=None)
    dashboard.add_argument("--out", required=True, help="HTML file to write")
    dashboard.set_defaults(run=_dashboard)
