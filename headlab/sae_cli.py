"""``headlab sae train|eval|dashboard``: sparse autoencoders on per-head outputs from the command line."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from . import cli_common as common
from .core.errors import HeadlabError
from .core.files import check_folder, claim_file, claim_folder
from .core.kinds import Integer, Items, Maybe, Text
from .core.settings import check_settings, setting

TRAIN_ENTRIES = ("cfg.json", "sae_weights.safetensors", "metrics.json", "sparsity.safetensors", "checkpoints")


@dataclass
class TrainData:
    """Which layer ``sae train`` encodes, where its activations come from and how it is measured."""

    layer: int = setting(help="layer whose head outputs are encoded (negative counts from the end)", kind=Integer(),
                         flag="--layer")
    eval_windows: int = setting(16, "held-out windows for metrics.json", kind=Integer(1), flag="--eval-windows")
    cache: str | None = setting(None, "activation cache folder (safetensors shards): written on the first run, read "
                                      "by later ones (single process)", kind=Maybe(Text()), flag="--cache")

    def __post_init__(self):
        check_settings(self)


@dataclass
class EvalData:
    """The held-out text windows ``sae eval`` measures on."""

    windows: int = setting(16, "text windows", kind=Integer(1), flag="--windows")
    seed: int = setting(1, "window seed (training used --seed 0 by default)", kind=Integer(0), flag="--seed")

    def __post_init__(self):
        check_settings(self)


@dataclass
class DashboardData:
    """Which latents ``sae dashboard`` shows and on how many windows it looks for their examples."""

    latents: tuple[int, ...] | None = setting(None, "comma list of latents (default: the --top most frequent)",
                                              kind=Maybe(Items(Integer(0))), flag="--latents")
    top: int = setting(8, "most frequently active latents shown when --latents is not given", kind=Integer(1),
                       flag="--top")
    windows: int = setting(32, "text windows searched for examples", kind=Integer(1), flag="--windows")
    seed: int = setting(1, "window seed", kind=Integer(0), flag="--seed")

    def __post_init__(self):
        check_settings(self)


def _train(args) -> int:
    from .sae.settings import TextWindows, TrainSettings

    settings, text = common.settings(TrainSettings, args), common.settings(TextWindows, args)
    data = common.settings(TrainData, args)
    check_folder(args.out, args.overwrite, "--out folder")
    if data.cache:
        check_folder(data.cache, args.overwrite, "--cache folder")
    config = common.model_config(args)
    shape = common.model_shape_of(config)
    layer = common.one_layer(data.layer, shape.n_layers, "--layer")
    d_in = shape.n_heads * shape.head_dim
    if settings.architecture.uses_k and settings.k > settings.expansion * d_in:
        raise HeadlabError(f"--k {settings.k} is more than the {settings.expansion * d_in} latents (--expansion "
                           f"{settings.expansion} x {d_in} inputs)")
    import torch

    from .core.text import train_eval_windows
    from .sae import (CachedActivations, ModelActivations, ShuffleBuffer, SparseAutoencoder, Trainer, evaluate_sae,
                      save_sae)
    from .sae.saving import save_sparsity
    from .surgeon import attention_modules
    from .core.distributed import rank_and_world
    from .core.files import write_json

    from .core.distributed import init_distributed

    init_distributed()
    rank, world = rank_and_world()
    torch.manual_seed(settings.seed)
    model, tokenizer = common.load_model_from(args)
    train, held_out = train_eval_windows(tokenizer, text.text_path, math.ceil(settings.tokens / (text.context - 1)),
                                         data.eval_windows, text.context, settings.seed)
    out = claim_folder(args.out, TRAIN_ENTRIES, args.overwrite, "--out folder")
    start = time.perf_counter()
    if data.cache and world == 1:
        cache = Path(data.cache)
        source = CachedActivations(cache) if (cache / "manifest.json").exists() else None
        if source is None:
            from .sae import cache_activations
            claim_folder(cache, (), args.overwrite, "--cache folder")
            source = cache_activations(ModelActivations(model, train, layer), cache,
                                       metadata={"model": args.model, "context": text.context, "seed": settings.seed})
    else:
        source = ModelActivations(model, train[rank::world], layer)
    batch = settings.batch_size // world
    capacity = max(min(settings.buffer_tokens, settings.tokens) // world, 2 * batch)  # never more than the run uses
    buffer = ShuffleBuffer(source, batch, capacity, settings.seed + rank)
    sae = SparseAutoencoder(d_in, settings.expansion * d_in, settings.arch, settings.k, shape.n_heads, shape.head_dim,
                            settings.seed)
    trainer = Trainer(sae, buffer, settings, out / "checkpoints")
    trainer.run()
    if rank > 0:
        return 0
    wall = time.perf_counter() - start
    module = f"{type(attention_modules(model)[layer]).__name__} (layer {layer}) o_proj input"
    provenance = {"settings": {**settings.__dict__}, "tokens_trained": settings.steps * settings.batch_size,
                  "train_windows": len(train), "epochs_over_windows": buffer.epoch, "context": text.context,
                  "wall_s": round(wall, 1), "world_size": world,
                  "text": text.text_path or "Python standard-library docstrings"}
    from .core.text import special_tokens
    from .surgeon.models import hub_id

    save_sae(sae, out, hub_id(args.model), layer, module, text.context, provenance, overwrite=args.overwrite,
             model_spec=args.model, prepend_bos=bool(special_tokens(tokenizer)[0]), dataset_path=text.text_path or "")
    metrics, frequency = evaluate_sae(model, sae, held_out, layer, progress=True)
    metrics.update({"format": "headlab-sae-metrics/1", "held_out_windows": len(held_out),
                    "train_wall_s": round(wall, 1)})
    write_json(out / "metrics.json", metrics)
    save_sparsity(out, frequency)
    print(json.dumps({k: metrics[k] for k in ("l0", "explained_variance", "ce_loss_recovered", "dead_fraction")
                      if k in metrics}, indent=1))
    print(f"saved {out / 'cfg.json'}, {out / 'sae_weights.safetensors'}, {out / 'metrics.json'}")
    return 0


def _saved(args):
    """``(sae, cfg, model spec)`` of SAE_DIR, checked before any model is loaded."""
    from .sae import load_sae

    sae, config = load_sae(args.sae)
    spec = args.model or config["headlab"].get("model_spec") or config["metadata"]["model_name"]
    shape = common.model_shape_of(common.model_config(args, spec))
    layer = config["headlab"]["layer"]
    if layer >= shape.n_layers or shape.n_heads * shape.head_dim != sae.d_in:
        raise HeadlabError(f"the autoencoder in {args.sae} reads layer {layer} with {sae.d_in} inputs; {spec} has "
                           f"{shape.n_layers} layers of {shape.n_heads * shape.head_dim} head outputs")
    return sae, config, spec


def _eval(args) -> int:
    from .sae.settings import TextWindows

    data, text = common.settings(EvalData, args), common.settings(TextWindows, args)
    claim_file(args.out, args.overwrite, "--out metrics")
    sae, config, spec = _saved(args)
    model, tokenizer = common.load_model_from(args, spec)
    from .core.text import load_text, token_windows
    from .sae import evaluate_sae
    from .core.files import write_json

    windows = token_windows(tokenizer, load_text(text.text_path), data.windows, text.context, data.seed)
    metrics, _ = evaluate_sae(model, sae, windows, config["headlab"]["layer"], progress=True)
    metrics.update({"format": "headlab-sae-metrics/1", "windows": data.windows, "context": text.context,
                    "seed": data.seed, "sae": args.sae})
    print(write_json(args.out, metrics))
    return 0


def _dashboard(args) -> int:
    from .sae.settings import TextWindows

    data, text = common.settings(DashboardData, args), common.settings(TextWindows, args)
    claim_file(args.out, args.overwrite, "--out page")
    sae, config, spec = _saved(args)
    for latent in data.latents or ():
        if latent >= sae.d_sae:
            raise HeadlabError(f"--latents: {latent} is not a latent of this autoencoder (0..{sae.d_sae - 1})")
    if data.latents is None and data.top > sae.d_sae:
        raise HeadlabError(f"--top {data.top} is more than the autoencoder's {sae.d_sae} latents")
    model, tokenizer = common.load_model_from(args, spec)
    from .core.text import load_text, token_windows
    from .sae import collect_examples, write_dashboard

    layer = config["headlab"]["layer"]
    windows = token_windows(tokenizer, load_text(text.text_path), data.windows, text.context, data.seed)
    latents = list(data.latents) if data.latents else None
    if latents is None:
        from .sae.evaluate import evaluate_sae
        _, frequency = evaluate_sae(model, sae, windows[: max(1, len(windows) // 4)], layer)
        latents = frequency.topk(data.top).indices.tolist()  # the most frequently active latents
    examples = collect_examples(model, sae, windows, layer, latents, progress=True)
    tokens = [[tokenizer.decode([i]) for i in w[0].tolist()] for w in windows]
    title = f"SAE features: {config['metadata']['model_name']} {config['metadata']['hook_name']}"
    print(write_dashboard(args.out, sae, examples, tokens, title, overwrite=args.overwrite))
    return 0


def add_parser(sub) -> None:
    """Register ``sae`` and its subcommands on the main parser's subparsers."""
    from .sae.settings import TextWindows, TrainSettings

    sae = sub.add_parser("sae", help="sparse autoencoders on per-head attention outputs (train, eval, dashboard)",
                         description="Sparse autoencoders on the per-head outputs of one layer (the input of o_proj, "
                                     "heads flattened; TransformerLens blocks.L.attn.hook_z).")
    commands = sae.add_subparsers(dest="sae_command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train", help="train an autoencoder on one layer's head outputs",
        description="Train on head outputs of MODEL at --layer over windows of real text (the forward stops after "
                    "the layer; first token excluded), checkpointing to OUT/checkpoints (a killed run resumes when "
                    "started again with the same arguments), then save OUT/cfg.json + OUT/sae_weights.safetensors "
                    "(SAELens layout) and OUT/metrics.json measured on held-out windows. Runs data-parallel under "
                    "torchrun.")
    common.add_model_arguments(train)
    common.add_output_arguments(train, "output folder (new, empty or headlab's own)")
    common.add_settings(train, TrainData, TrainSettings, TextWindows)
    train.set_defaults(run=_train, interrupted=common.interrupted(
        lambda args: f"checkpoints are in {args.out}/checkpoints; run the same command again to resume"))

    evaluate = commands.add_parser("eval", help="metrics of a saved autoencoder on text, as JSON")
    evaluate.add_argument("sae", metavar="SAE_DIR", help="folder with cfg.json and sae_weights.safetensors")
    common.add_model_arguments(evaluate, required=False)
    common.add_output_arguments(evaluate, "JSON file to write")
    common.add_settings(evaluate, EvalData, TextWindows)
    evaluate.set_defaults(run=_eval, interrupted=common.interrupted("nothing was written"))

    dashboard = commands.add_parser("dashboard", help="standalone HTML page of chosen latents")
    dashboard.add_argument("sae", metavar="SAE_DIR", help="folder with cfg.json and sae_weights.safetensors")
    common.add_model_arguments(dashboard, required=False)
    common.add_output_arguments(dashboard, "HTML page to write")
    common.add_settings(dashboard, DashboardData, TextWindows)
    dashboard.set_defaults(run=_dashboard, interrupted=common.interrupted("nothing was written"))
    for subparser in commands.choices.values():
        subparser.set_defaults(prog=subparser.prog)
