"""``headlab sae train``: an autoencoder on one layer's head outputs."""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from dataclasses import dataclass

from ..core.errors import HeadlabError
from ..core.distributed import first_process
from ..core.files import check_folder
from ..core.locks import output_lock
from ..core.kinds import Indices, Maybe, Text
from ..core.settings import check_settings, setting, settings_from_args
from ..core.text import TextWindows
from ..sae.settings import TrainSettings
from . import common
from .base import Command, register_command


@dataclass
class TrainData:
    """Which layer ``sae train`` encodes, on which text windows, and where its activations are cached."""

    layers: tuple = setting(help="the layer whose head outputs are encoded, one (negative counts from the end)",
                            kind=Indices(), flag="--layers")
    text: TextWindows = setting(default_factory=lambda: TextWindows(windows=16, tokens=128))
    cache: str | None = setting(None, "activation cache folder (safetensors shards): written on the first run, read "
                                      "by later ones (single process)", kind=Maybe(Text()), flag="--cache")

    def __post_init__(self):
        check_settings(self)
        if len(self.layers) != 1 or isinstance(self.layers[0], tuple):
            raise HeadlabError(f"--layers: sae train encodes one layer per run, not {self.layers}")


@register_command
class SaeTrain(Command):
    name = "sae train"
    help = "train an autoencoder on one layer's head outputs"
    description = ("Train on head outputs of MODEL at --layers (one layer) over windows of real text (the forward "
                   "stops after the layer; first token excluded), checkpointing to OUT/checkpoints (a killed run "
                   "resumes when started again with the same arguments), then save OUT/cfg.json + "
                   "OUT/sae_weights.safetensors (SAELens layout) and OUT/metrics.json measured on --windows held-out "
                   "windows. Runs data-parallel under torchrun. Cost at the defaults (200,000 tokens): about 4 "
                   "minutes for SmolLM2-135M on two CPU cores (--train-tokens 20000: under a minute).")
    example = ("{model} --layers 1 --train-tokens 4096 --batch-tokens 256 --expansion 2 --windows 2 --tokens 64 "
                "--out {out}")
    output = "output folder (new, empty or headlab's own)"
    settings = (TrainData, TrainSettings)
    renamed = {"--batch-size": "--batch-tokens"}

    def check(self, args):
        data, settings = settings_from_args(TrainData, args), settings_from_args(TrainSettings, args)
        check_folder(args.out, args.overwrite, "--out folder")
        if data.cache:
            check_folder(data.cache, args.overwrite, "--cache folder")
            cache, out = Path(data.cache).expanduser().resolve(), Path(args.out).expanduser().resolve()
            if cache == out or out in cache.parents or cache in out.parents:
                raise HeadlabError(f"--cache {data.cache} and --out {args.out} are one folder or one inside the other; "
                                   "give the cache a folder of its own")
        shape = common.model_shape_of(common.model_config(args))
        layer = common.layers_of(data.layers, shape.n_layers, "--layers")[0]
        d_in = shape.n_heads * shape.head_dim
        if settings.architecture.uses_k and settings.k > settings.expansion * d_in:
            raise HeadlabError(f"--k {settings.k} is more than the {settings.expansion * d_in} latents (--expansion "
                               f"{settings.expansion} x {d_in} inputs)")
        if data.cache and (Path(data.cache) / "manifest.json").exists():  # a cache of other activations: refused now
            from ..sae.activations import CachedActivations
            from ..sae.pipeline import cache_identity

            CachedActivations(data.cache, cache_identity(args.model, layer, data.text, settings))
        return data, settings, layer

    def need(self, args, checked):
        from ..core.resources import FLOAT, Forward

        data, settings, layer = checked
        shape = common.model_shape_of(common.model_config(args))
        d_in = shape.n_heads * shape.head_dim
        buffer = 2 * min(settings.buffer_tokens, settings.train_tokens) * d_in * FLOAT  # the buffer and a refill
        autoencoder = 4 * 2 * d_in * settings.expansion * d_in * FLOAT  # weights, gradients, Adam's two moments
        cached = settings.train_tokens * d_in * FLOAT  # the activation cache's shards
        disk = {data.cache: cached} if data.cache and not (Path(data.cache) / "manifest.json").exists() else {}
        return common.need(args, [Forward(data.text.tokens)], "--buffer-tokens, --expansion or --tokens",
                           extra=buffer + autoencoder, disk=disk)

    def run(self, args, checked) -> int:
        from ..core.distributed import init_distributed
        from ..sae.pipeline import train_sae

        data, settings, layer = checked
        init_distributed()
        model, tokenizer = common.load_model_from(args)
        writes_cache = data.cache and first_process() and not (Path(data.cache) / "manifest.json").exists()
        with output_lock(data.cache) if writes_cache else nullcontext():  # one run writes a cache; many may read it
            metrics = train_sae(model, tokenizer, layer, args.out, settings, data.text, cache=data.cache,
                                model_spec=args.model, overwrite=args.overwrite)
        if metrics:  # rank 0
            print(json.dumps({k: metrics[k] for k in ("l0", "explained_variance", "ce_loss_recovered", "dead_fraction")
                              if k in metrics}, indent=1))
            print(f"saved {args.out}/cfg.json, sae_weights.safetensors and metrics.json")
        return 0

    def interrupted(self, args) -> str:
        return f"checkpoints are in {args.out}/checkpoints; run the same command again to resume"
