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
                   "Decoding then keeps a constant-size state (plus the window) instead of a growing KV cache. "
                   "--softmax-heads RULE keeps some KV heads (or, with --softmax-unit layers, whole layers) of the "
                   "converted layers in softmax attention over the whole context, chosen by a score of --scores, "
                   "razor, uniform, random or kl (greedy by the KL divergence to the original model, after stage 1: "
                   "one forward of --kl-windows windows per candidate, then a few per chosen unit), --softmax-keep "
                   "of them or as many as fit --softmax-cache of the original's cache bytes. Every conversion ends "
                   "with a recall gate: needle recall inside, just outside and far from the window, original against "
                   "converted, on --gate-needles held-out needles at each of --gate-lengths (with 95% intervals; "
                   "about a minute per model for SmolLM2 at the defaults). Cost at the defaults (100 + 100 steps of 8 "
                   "windows of 512 tokens): over an hour for SmolLM2-135M on two CPU cores (--steps 10,5 "
                   "--accumulation 2: a few minutes).")
    example = "{model} --steps 2,1 --accumulation 1 --tokens 64 --windows 1 --eval-every 1 --out {out}"
    max_memory = False  # converted in memory
    output = "checkpoint folder to write (not the source model's folder)"
    settings = (ConversionSettings,)

    def arguments(self, parser) -> None:
        parser.add_argument("--scores", metavar="SCORES", action="append",
                            help="a scores file (a report's scores.json, train-gates' gates.json) for a --softmax-heads "
                                 "rule that is a score, or razor; repeat to read several")

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
        positions = getattr(config.get_text_config(decoder=True), "max_position_embeddings", None)
        if positions and settings.linear.window > positions:
            raise HeadlabError(f"--window {settings.linear.window} is longer than the {positions} positions "
                               f"{args.model} has (a window that long is softmax attention)")
        layers = check_config(config, requested)  # the structure, before any weight
        return settings, layers, requested is None, self._softmax(args, settings, config, layers)

    @staticmethod
    def _softmax(args, settings, config, layers):
        """The softmax heads' choice, from the config and the scores files (None without a rule)."""
        from ..core.head_scores import merged_scores
        from ..surgeon.conversion.selection import softmax_choice
        from ..surgeon.streaming.rules import rule_scores

        if settings.softmax is None:
            if args.scores:
                raise HeadlabError("--scores is read by --softmax-heads RULE; give a rule or drop --scores")
            return None
        needed = set() if settings.softmax in ("uniform", "kl") else set(rule_scores(settings.softmax))
        if args.scores and not needed:
            raise HeadlabError(f"--softmax-heads {settings.softmax} reads no scores; drop --scores")
        shape = common.model_shape_of(config)
        scores = None
        if args.scores:
            scores = merged_scores(args.scores, shape, needed)
            common.check_scores_model(scores, needed, args.model)
        return softmax_choice(settings, config, layers, scores)

    def need(self, args, checked):
        from ..core.resources import FLOAT, Forward

        settings = checked[0]
        shape = common.model_shape_of(common.model_config(args))
        tokens, window = settings.text.tokens, settings.linear.window
        # the window's scores of every converted head, kept for the backward (terrace: two windows)
        windowed = shape.n_layers * shape.n_heads * tokens * min(tokens, 2 * window) * FLOAT * 3
        maps = shape.n_heads if settings.loss == "ce" else 0  # stage 1's attention cross-entropy: T x T maps
        return common.need(args, [Forward(tokens, grad=True, maps=maps), Forward(max(settings.gate_lengths), logits="last")],
                           "--tokens, --window or --gate-lengths", extra=windowed,
                           disk={args.out: 2 * common.checkpoint_bytes(args)})  # the checkpoint and training state

    def run(self, args, checked) -> int:
        from ..probes.validation.recall_gate import RecallGate, gate_lines
        from ..surgeon.conversion.pipeline import convert_and_train

        settings, layers, every_full_layer, softmax = checked
        every = " (every full-attention layer)" if every_full_layer else ""
        print(f"converting layers {index_spans(layers)}{every}")
        if softmax is not None:
            print(softmax.describe())
        gate = RecallGate(settings.linear.window, list(settings.gate_lengths), settings.gate_needles,
                          terrace=not settings.sliding)
        record = convert_and_train(args.model, settings, layers, args.out, args.overwrite, softmax=softmax,
                                   measure=gate)
        for name, value in record["held_out_perplexity"].items():
            print(f"held-out perplexity {name}: {value:.3f}")
        for line in gate_lines(record["recall_gate"]):
            print(line)
        cache = record["cache"]
        print(f"cache after {cache['length']} tokens: {cache['converted_bytes'] / 2**20:.1f} MiB against the "
              f"original's {cache['original_bytes'] / 2**20:.1f} MiB ({cache['fraction']:.3f})")
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
