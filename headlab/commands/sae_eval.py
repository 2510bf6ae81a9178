"""``headlab sae eval``: the metrics of a saved autoencoder on text."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.errors import HeadlabError
from ..core.files import claim_file, write_json
from ..core.kinds import Integer
from ..core.settings import check_settings, setting, settings_from_args
from ..core.text import TextWindows
from . import common
from .base import Command, register_command


@dataclass
class EvalData:
    """The windows of text ``sae eval`` measures on."""

    text: TextWindows = setting(default_factory=lambda: TextWindows(windows=16, tokens=128))
    seed: int = setting(1, "window seed (training used --seed 0 by default)", kind=Integer(0), flag="--seed")

    def __post_init__(self):
        check_settings(self)


def saved_autoencoder(args):
    """``(sae, cfg, model spec)`` of SAE_DIR, checked against the model's shape before any model loads."""
    from ..sae import load_sae

    sae, config = load_sae(args.sae)
    spec = args.model or config["headlab"].get("model_spec") or config["metadata"]["model_name"]
    shape = common.model_shape_of(common.model_config(args, spec))
    layer = config["headlab"]["layer"]
    if layer >= shape.n_layers or shape.n_heads * shape.head_dim != sae.d_in:
        raise HeadlabError(f"the autoencoder in {args.sae} reads layer {layer} with {sae.d_in} inputs; {spec} has "
                           f"{shape.n_layers} layers of {shape.n_heads * shape.head_dim} head outputs")
    return sae, config, spec


def sae_folder_argument(parser) -> None:
    parser.add_argument("sae", metavar="SAE_DIR", help="folder with cfg.json and sae_weights.safetensors")


@register_command
class SaeEval(Command):
    name = "sae eval"
    help = "metrics of a saved autoencoder on text, as JSON"
    description = ("Measure the autoencoder in SAE_DIR on --windows windows of text (placed with --seed, 1 by "
                   "default so that they differ from training's): reconstruction, sparsity and, for a causal LM, "
                   "the loss recovered with the autoencoder spliced in. Writes the metrics as JSON. Cost: a few "
                   "forwards per window (seconds for SmolLM2-135M on two CPU cores).")
    example = "{sae} --windows 2 --tokens 64 --out {out}/metrics.json"
    model = "option"
    output = "JSON file to write"
    settings = (EvalData,)

    def arguments(self, parser) -> None:
        sae_folder_argument(parser)

    def check(self, args):
        data = settings_from_args(EvalData, args)
        claim_file(args.out, args.overwrite, "--out metrics")
        return data, saved_autoencoder(args)[2]

    def need(self, args, checked):
        from ..core.resources import Forward

        data, spec = checked
        return common.need(args, [Forward(data.text.tokens)], "--tokens", spec=spec)

    def run(self, args, checked) -> int:
        from ..sae.pipeline import evaluate_saved

        data, spec = checked
        model, tokenizer = common.load_model_from(args, spec)
        print(write_json(args.out, evaluate_saved(args.sae, model, tokenizer, data.text, data.seed)))
        return 0
