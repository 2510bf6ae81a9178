"""The sparse-autoencoder architectures, one class each: how pre-activations become codes, the loss
terms of training, what the saved file holds (SAELens' name for it, a threshold, ``k``), and the
training preset that goes with it (learning rate, Adam betas, schedule, dead-latent resampling).

:class:`~.model.SparseAutoencoder`, the trainer, saving and loading, and the ``--arch`` choices
all find an architecture by name in :data:`ARCHITECTURES`; adding one is one class registered
with :func:`register_architecture`. Shapes: inputs ``x [B, d_in]`` (normalised), pre-activations
and codes ``[B, d_sae]``. Importing this module costs no torch: the methods import it when they run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    import torch

    from .model import SparseAutoencoder
    from .settings import TrainSettings

ARCHITECTURES: dict[str, "Architecture"] = {}


@dataclass
class Encoded:
    """One forward: ``x_hat [B, d_in]``, dense ``codes [B, d_sae]``, ``pre`` the pre-activations
    ``[B, d_sae]`` (for AuxK and JumpReLU's sparsity loss; None for TopK)."""

    x_hat: "torch.Tensor"
    codes: "torch.Tensor"
    pre: "torch.Tensor | None"


def register_architecture(cls: type["Architecture"]) -> type["Architecture"]:
    """Class decorator: make ``cls`` an architecture under ``cls.name`` (one shared instance)."""
    if cls.name in ARCHITECTURES and type(ARCHITECTURES[cls.name]) is not cls:
        raise ValueError(f"SAE architecture {cls.name!r} is registered already")
    ARCHITECTURES[cls.name] = cls()
    return cls


def architecture(name: str) -> "Architecture":
    """The architecture registered as ``name``; ``ValueError`` naming the known ones otherwise."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; choose from {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


class Architecture:
    """Base of the architectures: a ReLU encoder with a plain reconstruction loss and the default
    preset. Subclasses override what differs.

    ``uses_k``: ``k`` active latents (saved as ``k``); ``threshold``: ``None``, ``"learned"`` (a
    parameter trained with the rest) or ``"estimated"`` (a buffer the trainer sets), saved when
    not None; ``input_norm``: inputs are scaled so that ``E‖x‖²`` is ``d_in`` or ``1``;
    ``saelens``: the architecture name SAELens reads the saved file as.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    saelens: ClassVar[str] = "standard"
    uses_k: ClassVar[bool] = False
    threshold: ClassVar[str | None] = None
    input_norm: ClassVar[str] = "d_in"
    adam_betas: ClassVar[tuple[float, float]] = (0.9, 0.999)
    resamples: ClassVar[bool] = False

    def learning_rate(self, d_sae: int) -> float:
        """The preset learning rate: ``2e-4 / sqrt(d_sae / 2^14)``."""
        return 2e-4 / math.sqrt(d_sae / 2**14)

    def lr_factor(self, settings: "TrainSettings", step: int, warm_from: int) -> float:
        """Multiplier of the learning rate at ``step``: linear warm-up, constant, linear decay over
        the last ``decay_fraction``."""
        warmup = min(settings.warmup_steps, max(1, settings.steps // 20))
        decay_start = int(settings.steps * (1 - settings.decay_fraction))
        if step < warmup:
            return (step + 1) / warmup
        if step >= decay_start:
            return max(0.0, (settings.steps - step) / max(1, settings.steps - decay_start))
        return 1.0

    def encode(self, sae: "SparseAutoencoder", x: "torch.Tensor") -> "Encoded":
        """One forward: pre-activations, codes, reconstruction."""
        pre = sae.pre_activations(x)
        codes = self.activation(sae, pre)
        return Encoded(codes @ sae.W_dec + sae.b_dec, codes, pre)

    def activation(self, sae: "SparseAutoencoder", pre: "torch.Tensor") -> "torch.Tensor":
        import torch.nn.functional as F

        return F.relu(pre)

    def loss(self, sae: "SparseAutoencoder", out: "Encoded", x: "torch.Tensor", settings: "TrainSettings",
             variance: float, dead: "torch.Tensor") -> "torch.Tensor":
        """The training loss of one batch (a mean over rows)."""
        return (x - out.x_hat).pow(2).sum(1).mean()

    def after_step(self, sae: "SparseAutoencoder", codes: "torch.Tensor", settings: "TrainSettings") -> None:
        """Anything the architecture updates after an optimiser step (nothing by default)."""


@register_architecture
class ReLU(Architecture):
    """ReLU with an L1 penalty on inputs normalised to ``E‖x‖² = d_in``; Adam betas (0, 0.9999), lr
    1.2e-3, a cosine decay whose warm-up restarts after each dead-latent resample."""

    name = "relu"
    summary = "ReLU codes with an L1 penalty (Anthropic's April 2023 preset, dead-latent resampling)"
    adam_betas = (0.0, 0.9999)
    resamples = True

    def learning_rate(self, d_sae: int) -> float:
        return 1.2e-3

    def lr_factor(self, settings: "TrainSettings", step: int, warm_from: int) -> float:
        warmup = min(settings.warmup_steps, max(1, settings.steps // 20))
        return min(1.0, (step - warm_from + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / settings.steps))

    def loss(self, sae, out, x, settings, variance, dead):
        return (x - out.x_hat).pow(2).sum(1).mean() + settings.l1_coefficient * out.codes.sum(1).mean()


class _KSparse(Architecture):
    """The ``k``-sparse architectures: reconstruction loss normalised by the inputs' variance, plus
    AuxK on the dead latents."""

    uses_k = True

    def loss(self, sae, out, x, settings, variance, dead):
        loss = (x - out.x_hat).pow(2).sum(1).mean() / variance
        if dead.any() and settings.aux_coefficient > 0:
            loss = loss + settings.aux_coefficient * aux_loss(sae, x, out.x_hat, dead, settings.k_aux or sae.d_in // 2)
        return loss


@register_architecture
class TopK(_KSparse):
    """The ``k`` largest pre-activations of each row, through the sparse kernels (no dense code in
    the backward)."""

    name = "topk"
    summary = "the k largest pre-activations of each token (Gao et al.)"
    saelens = "topk"

    def encode(self, sae, x):
        from ..kernels import dense_codes, sparse_decode, topk_encode
        values, indices = topk_encode(x, sae.W_enc, sae.b_enc, sae.b_dec, sae.k)
        x_hat = sparse_decode(values, indices, sae.W_dec, sae.b_dec)
        return Encoded(x_hat, dense_codes(values.detach(), indices, sae.d_sae), None)


@register_architecture
class BatchTopK(_KSparse):
    """The ``B·k`` largest activations of a training batch; at inference a threshold, the EMA of the
    smallest kept activation (estimated from the first step), so it saves as a JumpReLU."""

    name = "batchtopk"
    summary = "the B·k largest activations of each batch; a threshold at inference (Bussmann et al.)"
    saelens = "jumprelu"
    threshold = "estimated"

    def activation(self, sae, pre):
        import torch
        import torch.nn.functional as F

        if sae.training:
            flat = F.relu(pre).flatten()
            values, indices = flat.topk(min(sae.k * pre.shape[0], flat.numel()))
            return torch.zeros_like(flat).scatter(0, indices, values).view_as(pre)
        return pre * (pre > sae.threshold)

    def after_step(self, sae, codes, settings):
        import torch

        from ..core.distributed import all_reduce

        active = codes > 0
        smallest = codes[active].min() if active.any() else torch.tensor(0.0)
        all_reduce(smallest, torch.distributed.ReduceOp.MIN)
        ema = settings.threshold_decay() if sae.threshold.any() else 0.0  # the first value starts it
        sae.threshold.mul_(ema).add_((1 - ema) * smallest)


@register_architecture
class JumpReLU(Architecture):
    """``pre · 1[pre > θ]`` with learned thresholds (straight-through gradients: :mod:`.jump`) and an
    L0 penalty, on inputs normalised to ``E‖x‖² = 1``."""

    name = "jumprelu"
    summary = "pre-activations above learned thresholds, with an L0 penalty (Rajamanoharan et al.)"
    saelens = "jumprelu"
    threshold = "learned"
    input_norm = "one"

    def activation(self, sae, pre):
        from .jump import JumpReLUFunction

        return JumpReLUFunction.apply(pre, sae.threshold)

    def loss(self, sae, out, x, settings, variance, dead):
        from .jump import JumpStep

        step = JumpStep.apply(out.pre, sae.threshold)
        return (x - out.x_hat).pow(2).sum(1).mean() + settings.l0_coefficient * step.sum(1).mean()


def aux_loss(sae: "SparseAutoencoder", x: "torch.Tensor", x_hat: "torch.Tensor", dead: "torch.Tensor",
             k_aux: int) -> "torch.Tensor":
    """AuxK: reconstruct the residual from the top ``k_aux`` dead pre-activations (no ``b_dec``),
    normalised by the residual's variance over the global batch and scaled by
    ``min(n_dead / k_aux, 1)``."""
    import torch

    from ..core.distributed import all_reduce

    dead_ids = dead.nonzero().flatten()
    residual = (x - x_hat).detach()
    pre = torch.addmm(sae.b_enc[dead_ids], x - sae.b_dec, sae.W_enc[:, dead_ids])
    values, picked = torch.relu(pre).topk(min(k_aux, dead_ids.numel()), dim=-1)
    estimate = torch.nn.functional.embedding_bag(picked, sae.W_dec[dead_ids], per_sample_weights=values, mode="sum")
    # the residual's variance over the global batch (all ranks), so data parallelism changes nothing
    moments = all_reduce(torch.cat([residual.sum(0), residual.pow(2).sum()[None],
                                    torch.tensor([float(residual.shape[0])])]))
    n = moments[-1]
    variance = ((moments[-2] - moments[:-2].pow(2).sum() / n) / n).clamp(min=1e-8)
    loss = (residual - estimate).pow(2).sum(1).mean() / variance
    return loss * min(dead_ids.numel() / k_aux, 1.0)


__all__ = ["ARCHITECTURES", "Architecture", "BatchTopK", "Encoded", "JumpReLU", "ReLU", "TopK", "architecture",
           "aux_loss", "register_architecture"]
