"""The whole conversion of a pretrained model, as ``headlab convert`` runs it: load, prove that each chosen
layer's rebuilt softmax reproduces it, make the training data, convert, train stage 1 (the feature maps
match each layer's softmax output) and stage 2 (LoRA with next-token loss, merged), measure the held-out
perplexity after each step, and save a checkpoint that :func:`headlab.surgeon.load_model` reloads. Training
state goes to ``OUT/training``; a killed run resumes from it."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ...core.files import claim_folder
from .settings import ConversionSettings

CHECKPOINT_ENTRIES = ("config.json", "generation_config.json", "model.safetensors", "headlab_conversion.json",
                      "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                      "training")


def convert_and_train(model_spec: str, settings: ConversionSettings, layers: list[int], out: str | Path,
                      overwrite: bool = False, progress: bool = True) -> dict[str, float]:
    """Convert ``layers`` of the model ``model_spec`` names and train them as ``settings`` say; write the
    checkpoint into ``out``. Returns the held-out perplexities: of the original model, converted
    untrained, and after each stage that ran. ``progress``: a status line as each step starts, and bars."""
    from ..losses import heldout_loss, next_token_loss
    from ..models import BUNDLED, load_model
    from .converted import convert, save_converted
    from .data import require_chat_template, training_windows
    from .support import verify_layers
    from .training import add_lora, run_stage, stage1_parameters, transfer_loss, transfer_mode

    out = Path(out)
    linear = settings.linear_settings(tuple(layers))
    stage1, stage2 = settings.stages()
    torch.manual_seed(settings.seed)

    def say(text: str) -> None:
        if progress:
            tqdm.write(text, file=sys.stderr)

    model, tokenizer = load_model(model_spec)
    say(f"checking that the rebuilt softmax reproduces each of the {len(layers)} layers")
    verify_layers(model, layers, linear)  # the rebuilt softmax reproduces each layer, before any data is made
    claim_folder(out, CHECKPOINT_ENTRIES, overwrite, "--out checkpoint folder")
    if settings.data == "chat":
        require_chat_template(tokenizer, model_spec)
    training = out / "training"
    n_train = max(1, max(stage1.steps, stage2.steps) * settings.accumulation)
    train, held_out = training_windows(model, tokenizer, settings, n_train, training, progress)
    train_ids, val_ids = torch.cat(train), torch.cat(held_out)

    def perplexity_of(measured, what: str) -> float:
        say(f"held-out perplexity {what} on {len(held_out)} windows")
        return math.exp(heldout_loss(measured, held_out, progress, f"perplexity {what}"))

    perplexity = {"original": perplexity_of(model, "of the original model")}
    convert(model, linear, verify=False)  # verified above on these weights
    perplexity["converted_untrained"] = perplexity_of(model, "converted, untrained")
    summaries = []
    if stage1.steps:
        params = stage1_parameters(model)
        with transfer_mode(model, stage1.loss) as converted:
            summaries.append(run_stage("stage1", model, params,
                                       lambda ids: transfer_loss(model, ids, converted, stage1.loss_scale),
                                       train_ids, val_ids, stage1, training, progress=progress))
        perplexity["after_stage1"] = perplexity_of(model, "after stage 1")
    if stage2.steps:
        peft_model = add_lora(model, stage2)
        params = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
        summaries.append(run_stage("stage2", peft_model, params, lambda ids: next_token_loss(peft_model, ids),
                                   train_ids, val_ids, stage2, training, progress=progress))
        model = peft_model.merge_and_unload()
        perplexity["after_stage2"] = perplexity_of(model, "after stage 2")
    local = model_spec not in BUNDLED and Path(model_spec).is_dir()
    base = Path(model_spec).resolve() if local else model_spec  # stream-eval finds it from any folder
    provenance = {"base_model": str(base), "data": settings.data, "seq_len": settings.text.tokens,
                  "held_out_windows": len(held_out), "held_out_perplexity": perplexity, "stages": summaries}
    say(f"saving the converted checkpoint to {out}")
    save_converted(model, tokenizer, out, provenance, overwrite=overwrite)
    return perplexity


__all__ = ["CHECKPOINT_ENTRIES", "convert_and_train"]
