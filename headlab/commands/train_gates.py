"""``headlab train-gates``: DuoAttention's gates, which KV heads need the whole context."""

from __future__ import annotations

from pathlib import Path

from ..core.files import check_folder, claim_folder
from ..core.settings import settings_from_args
from ..surgeon.streaming.settings import GateSettings
from . import common
from .base import Command, register_command


@register_command
class TrainGates(Command):
    name = "train-gates"
    help = "train DuoAttention's gates: which KV heads need the whole context"
    description = ("Train DuoAttention's gate per KV head of the global-attention layers: each head's output mixes "
                   "full and streaming attention (--sinks first tokens, --window latest positions) by its gate, and "
                   "only the gates learn, on synthetic passkey samples built offline from --text-file, so that the "
                   "final hidden states at the answer stay the unedited model's, with a penalty --lam on the mean "
                   "gate. Writes gates.json (a scores file with the duo_gate score, for stream-plan and stream-eval) "
                   "and plan.json (the KV heads with a gate of at least 0.5 keep the whole context). The training "
                   "state is saved every --save-every steps; the same command resumes a killed run. Cost: one forward "
                   "and backward of the sample per step; the published 2000 steps of 1,000-32,000 tokens take days on "
                   "a CPU (--steps 60 --max-length 2048: about an hour for SmolLM2-135M on two CPU cores).")
    example = ("{model} --steps 2 --min-length 256 --max-length 256 --intervals 1 --passkeys 2 --passkey-words 4 "
                "--sinks 2 --window 8 --out {out}")
    output = "output folder"
    settings = (GateSettings,)

    def check(self, args):
        settings = settings_from_args(GateSettings, args)
        check_folder(args.out, args.overwrite, "--out folder")
        config = common.model_config(args, causal=True, needs="gate training")
        common.refuse_converted(args, config, "gate training")
        from ..surgeon.streaming.gates import STATE_FILE, read_state

        shape = common.model_shape_of(config)
        read_state(Path(args.out) / STATE_FILE, settings, (shape.n_layers, shape.n_kv_heads))  # a resumable state
        return settings

    def need(self, args, settings):
        from ..core.resources import Forward

        config = common.model_config(args)
        limit = getattr(config.get_text_config(decoder=True), "max_position_embeddings", None)
        longest = min(settings.max_length, limit) if limit else settings.max_length
        heads = common.model_shape_of(config).n_heads
        return common.need(args, [Forward(longest, grad=True, maps=heads, logits="last", recompute=True)],
                           "--max-length")

    def run(self, args, settings) -> int:
        from ..surgeon.streaming.gates import GATES_FILE, PLAN_FILE, STATE_FILE, GateTraining

        out = Path(args.out)
        model, tokenizer = common.load_model_from(args)
        training = GateTraining(model, tokenizer, settings, out)  # checks the text; resumes from the folder's state
        claim_folder(out, (STATE_FILE, GATES_FILE, PLAN_FILE), args.overwrite, "--out folder")
        limit = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
        if limit and settings.max_length > limit:
            capped = "--min-length and --max-length are" if settings.min_length > limit else "--max-length is"
            print(f"{capped} capped at the model's {limit} positions: samples of {training.lengths[0]} to "
                  f"{training.lengths[-1]} tokens")
        if training.step:
            print(f"resuming from step {training.step} of {settings.steps} ({out / STATE_FILE})")
        gates = training.run()
        training.write(out, args.model)
        trained = gates[list(training.layers)]
        kept, total = int((trained >= 0.5).sum()), trained.numel()
        print(f"{kept} of {total} KV heads have a gate of at least 0.5 (mean gate {float(trained.mean()):.3f}) after "
              f"{training.step} steps in {training.seconds:.0f} s\nscores: {out / GATES_FILE} (score duo_gate)\n"
              f"plan: {out / PLAN_FILE}")
        return 0

    def interrupted(self, args) -> str:
        return "the training state saved last is kept; the same command resumes from it"
