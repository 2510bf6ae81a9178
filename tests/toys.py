"""Extensions registered from outside headlab, one of each kind: an edit kind of each softmax-free stage, a
score family, an SAE architecture, a token scorer, a kernel op and a command. Each is defined in this file alone, with no
change to any headlab module; importing it registers them, and the contract tests
(``test_contracts.py``) and the end-to-end tests (``test_extensions.py``) run them like the built-in ones."""

from dataclasses import dataclass
from typing import ClassVar

import torch

from headlab.commands.base import Command, register_command
from headlab.core.head_scores import HeadScores
from headlab.core.kinds import Number
from headlab.core.settings import setting
from headlab.kernels import AttentionInputs, Op, register_op
from headlab.kernels.ops import REFERENCE, Case
from headlab.probes.scorers.families import score_family
from headlab.sae.architectures import Architecture, register_architecture
from headlab.surgeon import model_shape
from headlab.surgeon.compression.scorers import ScoredCall, register_scorer
from headlab.surgeon.edits.base import Edit, EditCall, register_edit


@register_edit
@dataclass(frozen=True)
class Sharpen(Edit):
    """Toy bias-stage kind: divide the heads' logits by ``temperature`` on the keys each row sees."""

    kind: ClassVar[str] = "toy_sharpen"
    stage: ClassVar[str] = "bias"

    temperature: float = setting(0.5, "divisor of the logits", kind=Number(0.0, low_open=True))

    def apply(self, logits: torch.Tensor, at: EditCall) -> torch.Tensor:
        return torch.where(at.visible, logits / self.temperature, logits)


@register_edit
@dataclass(frozen=True)
class Negate(Edit):
    """Toy output-stage kind: flip the sign of the heads' outputs."""

    kind: ClassVar[str] = "toy_negate"
    stage: ClassVar[str] = "output"

    def apply(self, out: torch.Tensor, at: EditCall) -> torch.Tensor:
        out = out.clone()
        out[:, :, list(self.heads)] = -out[:, :, list(self.heads)]
        return out


@score_family("toy-query-norms", "the Frobenius norm of each head's query projection")
def query_norms(inputs):
    shape = model_shape(inputs.model)
    values = torch.stack([layer.self_attn.q_proj.weight.detach().unflatten(0, (shape.n_heads, -1)).norm(dim=(1, 2))
                          for layer in inputs.model.model.layers])
    yield HeadScores("query_norm", values, inputs.counts(1), inputs.model_id, "norm of W_q per head", {})


@score_family("toy-decoder-only", "each head's layer index, for causal language models only", causal_only=True)
def decoder_only(inputs):
    shape = model_shape(inputs.model)
    values = torch.arange(shape.n_layers, dtype=torch.float32)[:, None].expand(-1, shape.n_heads).clone()
    yield HeadScores("layer_index", values, inputs.counts(1), inputs.model_id, "the head's layer", {})


@register_scorer("toy_value_norm", "toy token scorer: keys whose values have the largest norm")
def value_norm(call: ScoredCall) -> torch.Tensor:
    return call.values.float().norm(dim=-1)


@register_architecture
class Absolute(Architecture):
    """Toy architecture: codes ``|pre|`` with an L1 penalty (positively homogeneous, so the input scale
    folds into the saved weights); saved as SAELens' standard."""

    name = "toy-absolute"
    summary = "absolute values of the pre-activations"

    def activation(self, sae, pre):
        return pre.abs()

    def loss(self, sae, out, x, settings, variance, dead):
        return (x - out.x_hat).pow(2).sum(1).mean() + settings.l1_coefficient * out.codes.sum(1).mean()


def _scaled_query_cases(call: AttentionInputs) -> list[Case]:
    def run(backend: str) -> dict:
        if backend == REFERENCE:
            return {"scaled": call.q * call.scale}
        if backend != "torch":
            raise ValueError(f"toy_scaled_queries has no {backend} path")
        return {"scaled": torch.mul(call.q, call.scale)}

    return [Case("queries times the scale", run)]


register_op(Op("toy_scaled_queries", "queries times the logits' scale (a test's own op)", ("torch",),
               _scaled_query_cases))


@register_command
class CountHeads(Command):
    """Toy command: print the model's layer and head counts, from its config alone."""

    name = "toy-count-heads"
    help = "print the model's layers and heads"
    description = "Read MODEL's config (no weights) and print its layers, query heads and KV heads. Cost: none."
    example = "{model}"

    def check(self, args):
        from headlab.commands import common

        return common.model_shape_of(common.model_config(args))

    def run(self, args, shape) -> int:
        print(f"{shape.n_layers} layers, {shape.n_heads} query heads, {shape.n_kv_heads} KV heads")
        return 0
