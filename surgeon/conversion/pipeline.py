"""The whole conversion of a pretrained model, as ``headlab convert`` runs it: load, prove that each chosen
layer's rebuilt softmax reproduces it, make the training data, convert, train stage 1 (the feature maps
match each layer's softmax output) and stage 2 (LoRA with next-token loss, merged), measure the held-out
perplexity after each step, and save a checkpoint that :func:`headlab.surgeon.load_model` reloads. Training
state goes to ``OUT/training``; a killed run resumes from it."""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from ...core.files import claim_folder
from .selection import SoftmaxChoice
from .settings import ConversionSettings

CHECKPOINT_ENTRIES = ("config.json", "generation_config.json", "model.safetensors", "headlab_conversion.json",
                      "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                      "training")


def convert_and_train(model_spec: str, settings: ConversionSettings, layers: list[int], out: str | Path,
                      overwrite: bool = False, progress: bool = True, softmax: SoftmaxChoice | None = None,
                      measure: Callable | None = None) -> dict:
    """Convert ``layers`` of the model ``model_spec`` names and train them as ``settings`` say, the
    ``softmax`` heads kept softmax (a ``kl`` choice is made after stage 1); write the checkpoint into
    ``out``. Returns the record saved with it: held-out perplexities (original, converted untrained, after
    each stage that ran), the softmax heads and cache bytes, and ``measure(model, tokenizer)`` of the
    original and the converted model where given (the recall gate). ``progress``: a status line as each
    step starts, and bars."""
    from ..losses import heldout_loss, next_token_loss
    from ..models import BUNDLED, load_model
    from .converted import conversion_settings, convert, save_converted
    from .data import require_chat_template, training_windows
    from .selection import KL_RULE, kl_selection, next_token_log_probs
    from .support import verify_layers
    from .training import add_lora, distillation_loss, run_stage, stage1_parameters, transfer_loss, transfer_mode

    out = Path(out)
    linear = settings.linear_settings(tuple(layers))
    if softmax is not None and softmax.heads is not None:
        linear = dataclasses.replace(linear, softmax_heads=softmax.heads)
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
    gate = {}
    if measure is not None:
        say("the recall gate on the original model")
        gate["original"] = measure(model, tokenizer)
    kl_by_rule = softmax is not None and softmax.rule == KL_RULE
    if kl_by_rule:
        say(f"next-token distributions of the original model on {settings.kl_windows} training windows (the kl rule)")
        target = next_token_log_probs(model, train[:settings.kl_windows])  # chosen on training data, not held out
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
    selection = {} if softmax is None else {"rule": softmax.rule, "unit": softmax.unit, "count": softmax.count,
                                            "candidates": softmax.candidates}
    if kl_by_rule:
        say(f"choosing {softmax.count} softmax {softmax.unit} by KL on {settings.kl_windows} training windows "
            f"(about {softmax.candidates + 4 * softmax.count} forwards of each)")
        bar = tqdm(total=softmax.count, desc="kl selection", unit=softmax.unit[:-1], disable=not progress)
        _, selection["kl_trace"] = kl_selection(model, softmax.count, softmax.unit, train[:settings.kl_windows],
                                                target, bar.set_postfix_str)
        bar.update(softmax.count)
        bar.close()
        del target
        perplexity["after_selection"] = perplexity_of(model, "with the softmax heads chosen")
    if stage2.steps:
        peft_model = add_lora(model, stage2)
        params = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
        loss = distillation_loss if settings.stage2_loss == "kl" else next_token_loss
        summaries.append(run_stage("stage2", peft_model, params, lambda ids: loss(peft_model, ids),
                                   train_ids, val_ids, stage2, training, progress=progress))
        model = peft_model.merge_and_unload()
        perplexity["after_stage2"] = perplexity_of(model, "after stage 2")
    local = model_spec not in BUNDLED and Path(model_spec).is_dir()
    base = Path(model_spec).resolve() if local else model_spec  # stream-eval finds it from any folder
    final = conversion_settings(model)
    selection["heads"] = [list(pair) for pair in final.softmax_heads]
    provenance = {"base_model": str(base), "data": settings.data, "seq_len": settings.text.tokens,
                  "stage2_loss": settings.stage2_loss,
                  "held_out_windows": len(held_out), "held_out_perplexity": perplexity, "stages": summaries,
                  "softmax": selection, "cache": cache_record(model.config, final, settings.cache_length)}
    if measure is not None:
        say("the recall gate on the converted model")
        gate["converted"] = measure(model, tokenizer)
        provenance["recall_gate"] = gate
    say(f"saving the converted checkpoint to {out}")
    save_converted(model, tokenizer, out, provenance, overwrite=overwrite)
    return provenance


def cache_record(config, settings, length: int) -> dict:
    """The converted and the original model's cache bytes after ``length`` tokens (fp32)."""
    from ..compression.budget import cache_bytes_at
    from .selection import converted_cache_bytes

    converted, original = converted_cache_bytes(config, settings, length), cache_bytes_at(config, length)
    return {"length": length, "converted_bytes": converted, "original_bytes": original,
            "fraction": converted / original}


__all__ = ["CHECKPOINT_ENTRIES", "convert_and_train"]
