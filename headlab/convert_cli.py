"""``headlab convert``: replace softmax attention by Hedgehog linear or hybrid attention, trained in two
stages and saved as a checkpoint that ``load_model`` reloads."""

from __future__ import annotations

import math
from pathlib import Path

from . import cli_common as common
from .core.errors import HeadlabError
from .core.files import check_folder, claim_folder
from .core.kinds import index_spans

CHECKPOINT_ENTRIES = ("config.json", "generation_config.json", "model.safetensors", "headlab_conversion.json",
                      "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                      "training")


def _convert(args) -> int:
    from .surgeon.conversion.settings import ConversionSettings

    settings = common.settings(ConversionSettings, args)
    out = Path(args.out)
    _refuse_the_source(args.model, out)
    check_folder(out, args.overwrite, "--out checkpoint folder")
    config = common.model_config(args, causal=True, needs="conversion")
    requested = common.layers_of(settings.layers, common.model_shape_of(config).n_layers, "--layers")
    already = common.converted_layers_of(args.model, config)
    if already:
        raise HeadlabError(f"{args.model} is a converted checkpoint already (layers {index_spans(already)}); convert "
                           "its base model, once, with every layer to convert")
    import torch

    from .surgeon.conversion.data import require_chat_template, training_windows
    from .surgeon import load_model
    from .surgeon.conversion.converted import convert, is_converted_directory, save_converted
    from .surgeon.conversion.support import check_config, verify_layers
    from .surgeon.conversion.training import (add_lora, next_token_loss, run_stage, stage1_parameters, transfer_loss,
                                          transfer_mode)
    from .surgeon.losses import heldout_loss

    layers = check_config(config, requested)  # the modules' structure, before any weight is read
    linear = settings.linear_settings(tuple(layers))
    training = out / "training"
    if is_converted_directory(out) and not training.exists():
        raise HeadlabError(f"{out} already holds a finished converted checkpoint; choose another --out")
    stage1, stage2 = settings.stages()
    torch.manual_seed(settings.seed)
    model, tokenizer = load_model(args.model)
    verify_layers(model, layers, linear)  # the rebuilt softmax reproduces each layer, before any data is made
    claim_folder(out, CHECKPOINT_ENTRIES, args.overwrite, "--out checkpoint folder")
    if settings.data == "chat":
        require_chat_template(tokenizer, args.model)
    n_train = max(1, max(stage1.steps, stage2.steps) * settings.accumulation)
    train, held_out = training_windows(model, tokenizer, settings, n_train, training)
    train_ids, val_ids = torch.cat(train), torch.cat(held_out)
    perplexity = {"original": math.exp(heldout_loss(model, held_out))}
    print(f"converting layers {index_spans(layers)}" + (" (every full-attention layer)" if requested is None else ""))
    convert(model, linear, verify=False)  # verified above on these weights
    perplexity["converted_untrained"] = math.exp(heldout_loss(model, held_out))
    summaries = []
    if stage1.steps:
        params = stage1_parameters(model)
        with transfer_mode(model, stage1.loss) as converted:
            summaries.append(run_stage("stage1", model, params,
                                       lambda ids: transfer_loss(model, ids, converted, stage1.loss_scale),
                                       train_ids, val_ids, stage1, training))
        perplexity["after_stage1"] = math.exp(heldout_loss(model, held_out))
    if stage2.steps:
        peft_model = add_lora(model, stage2)
        params = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
        summaries.append(run_stage("stage2", peft_model, params, lambda ids: next_token_loss(peft_model, ids),
                                   train_ids, val_ids, stage2, training))
        model = peft_model.merge_and_unload()
        perplexity["after_stage2"] = math.exp(heldout_loss(model, held_out))
    from .surgeon.models import BUNDLED

    local = args.model not in BUNDLED and Path(args.model).is_dir()
    base = Path(args.model).resolve() if local else args.model  # stream-eval finds it from any folder
    provenance = {"base_model": str(base), "data": settings.data, "seq_len": settings.seq_len,
                  "held_out_windows": len(held_out),
                  "held_out_perplexity": perplexity, "stages": summaries}
    save_converted(model, tokenizer, out, provenance, overwrite=args.overwrite)
    for name, value in perplexity.items():
        print(f"held-out perplexity {name}: {value:.3f}")
    print(f"converted checkpoint: {out} (reload with headlab.surgeon.load_model({str(out)!r}))")
    return 0


def _refuse_the_source(spec: str, out: Path) -> None:
    """Refuse ``--out`` equal to, or inside, the folder the model is read from."""
    from .surgeon.models import BUNDLED, cache_root

    if spec in BUNDLED:
        common.check_paths_differ(str(out), cache_root() / "models", "the cache of bundled models")
    elif Path(spec).expanduser().exists():
        common.check_paths_differ(str(out), Path(spec), "the source model's folder")


def add_parser(sub) -> None:
    """Register ``convert`` on the main parser's subparsers."""
    from .surgeon.conversion.settings import ConversionSettings

    p = sub.add_parser(
        "convert", help="convert softmax attention to Hedgehog linear or hybrid attention and train it",
        description="Replace the attention of the chosen layers of a causal LM by Hedgehog linear attention "
                    "(--to hedgehog) or the LoLCATs hybrid of softmax over a recent window plus linear attention "
                    "over older tokens (--to hybrid). Stage 1 trains only the feature maps (and window weights) to "
                    "match each layer's softmax output; stage 2 trains LoRA adapters (r 8, alpha 16) on q/k/v/o_proj "
                    "with next-token loss and merges them. --data chat trains on chat conversations instead of plain "
                    "text windows: passages of the text with questions (half about a fact hidden in them) and the "
                    "original model's own answers, through its chat template (kept in OUT/training/chat_data.json). "
                    "Training state goes to OUT/training (a killed run resumes "
                    "when started again with the same arguments); the checkpoint (config, tokenizer, "
                    "model.safetensors, headlab_conversion.json with settings, perplexities and training history) "
                    "goes to OUT and reloads with headlab.surgeon.load_model(OUT). Decoding then keeps a constant-size "
                    "state (plus the window) instead of a growing KV cache. The model is converted in memory.")
    p.add_argument("model", metavar="MODEL", help=common.MODEL_HELP)
    common.add_output_arguments(p, "checkpoint folder to write (not the source model's folder)")
    common.add_settings(p, ConversionSettings)
    p.set_defaults(run=_convert, interrupted=common.interrupted(
        lambda args: f"training checkpoints are in {args.out}/training; run the same command again to resume"))
