"""``headlab convert``: softmax attention replaced by Hedgehog linear or LoLCATs hybrid attention, trained in two
stages and saved as a checkpoint that ``load_model`` reloads."""

from __future__ import annotations

from pathlib import Path

from ..core.errors import HeadlabError
from ..core.files import check_folder
from ..core.kinds import index_spans
from ..core.settings import settings_from_args
from ..surgeon.conversion.settings import ConversionSettings
from . import common
from .base import Command, register_command


@register_command
class Convert(Command):
    name = "convert"
    help = "convert softmax attention to Hedgehog linear or hybrid attention and train it"
    description = ("Replace the attention of the chosen layers of a causal LM by Hedgehog linear attention (--to "
                   "hedgehog) or the LoLCATs hybrid of softmax over a recent window plus linear attention over older "
                   "tokens (--to hybrid). Stage 1 trains only the feature maps (and window weights) to match each "
                   "layer's softmax output; stage 2 trains LoRA adapters (r 8, alpha 16) on q/k/v/o_proj with "
                   "next-token loss and merges them. --data chat trains on chat conversations instead of plain text "
                   "windows: passages of the text with questions (half about a fact hidden in them) and the original "
                   "model's own answers, through its chat template (kept in OUT/training/chat_data.json). Training "
                   "state goes to OUT/training (a killed run resumes when started again with the same arguments); "
                   "the checkpoint (config, tokenizer, model.safetensors, headlab_conversion.json with settings, "
                   "perplexities and training history) goes to OUT and reloads with headlab.surgeon.load_model(OUT). "
                   "Decoding then keeps a constant-size state (plus the window) instead of a growing KV cache. Cost "
                   "at the defaults (100 + 100 steps of 8 windows of 512 tokens): over an hour for SmolLM2-135M on "
                   "two CPU cores (--steps 10,5 --accumulation 2: a few minutes).")
    example = "{model} --steps 2,1 --accumulation 1 --tokens 64 --windows 1 --eval-every 1 --out {out}"
    max_memory = False  # converted in memory
    output = "checkpoint folder to write (not the source model's folder)"
    settings = (ConversionSettings,)

    def check(self, args):
        from ..surgeon.conversion.support import check_config

        settings = settings_from_args(ConversionSettings, args)
        out = Path(args.out)
        self._refuse_the_source(args.model, out)
        check_folder(out, args.overwrite, "--out checkpoint folder")
        config = common.model_config(args, causal=True, needs="conversion")
        requested = common.layers_of(settings.layers, common.model_shape_of(config).n_layers, "--layers")
        already = common.converted_layers_of(args.model, config)
        if already:
            raise HeadlabError(f"{args.model} is a converted checkpoint already (layers {index_spans(already)}); "
                               "convert its base model, once, with every layer to convert")
        from ..surgeon.conversion.converted import is_converted_directory

        if is_converted_directory(out) and not (out / "training").exists():
            raise HeadlabError(f"{out} already holds a finished converted checkpoint; choose another --out")
        return settings, check_config(config, requested), requested is None  # the structure, before any weight

    def run(self, args, checked) -> int:
        from ..surgeon.conversion.pipeline import convert_and_train

        settings, layers, every_full_layer = checked
        every = " (every full-attention layer)" if every_full_layer else ""
        print(f"converting layers {index_spans(layers)}{every}")
        perplexity = convert_and_train(args.model, settings, layers, args.out, args.overwrite)
        for name, value in perplexity.items():
            print(f"held-out perplexity {name}: {value:.3f}")
        print(f"converted checkpoint: {args.out} (reload with headlab.surgeon.load_model({str(args.out)!r}))")
        return 0

    def interrupted(self, args) -> str:
        return f"training checkpoints are in {args.out}/training; run the same command again to resume"

    @staticmethod
    def _refuse_the_source(spec: str, out: Path) -> None:
        """Refuse ``--out`` equal to, or inside, the folder the model is read from."""
        from ..surgeon.models import BUNDLED, cache_root

        if spec in BUNDLED:
            common.check_paths_differ(str(out), cache_root() / "models", "the cache of bundled models")
        elif Path(spec).expanduser().exists():
            common.check_paths_differ(str(out), Path(spec), "the source model's folder")
