"""Evaluation of an autoencoder on held-out text (docs/methods/sae.md), with the reconstruction spliced back
into the model through the attention hook for the loss metrics.

Explained variance is measured about the per-dimension mean of the whole evaluation set:
``EV = 1 − Σ‖x − x̂‖² / Σ‖x − x̄‖²``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..surgeon import attach
from .activations import head_outputs
from .model import SparseAutoencoder


def splice_function(sae: SparseAutoencoder, replace_first: bool, zero: bool = False):
    """A splice for :func:`headlab.surgeon.attach`: per-head outputs ``[B, N, H, D]`` replaced by
    the reconstruction (or by zeros with ``zero``), the first position kept unless
    ``replace_first``."""
    def splice(out: torch.Tensor) -> torch.Tensor:
        flat = out.flatten(2).float()  # [B, N, H·D]
        start = 0 if replace_first else 1
        new = flat.clone()
        tail = flat[:, start:]
        new[:, start:] = torch.zeros_like(tail) if zero else sae.reconstruct(tail.reshape(-1, flat.shape[-1])).view_as(tail)
        return new.view_as(out)
    return splice


class _Sums:
    """Running sums for the reconstruction metrics."""

    def __init__(self, d_in: int, d_sae: int):
        self.n = 0
        self.error = 0.0
        self.x_sum = torch.zeros(d_in, dtype=torch.float64)
        self.x_squares = 0.0
        self.cosine = 0.0
        self.shrinkage = 0.0
        self.l0: list[torch.Tensor] = []
        self.fires = torch.zeros(d_sae, dtype=torch.float64)

    def add(self, x: torch.Tensor, x_hat: torch.Tensor, codes: torch.Tensor) -> None:
        x, x_hat = x.double(), x_hat.double()
        self.n += x.shape[0]
        self.error += (x - x_hat).pow(2).sum().item()
        self.x_sum += x.sum(0)
        self.x_squares += x.pow(2).sum().item()
        self.cosine += F.cosine_similarity(x, x_hat, dim=1).sum().item()
        self.shrinkage += (x_hat.norm(dim=1) / x.norm(dim=1).clamp(min=1e-12)).sum().item()
        active = codes > 0
        self.l0.append(active.sum(1))
        self.fires += active.sum(0).double()

    def metrics(self, d_in: int) -> dict:
        about_mean = self.x_squares - self.x_sum.pow(2).sum().item() / self.n
        l0 = torch.cat(self.l0).double()
        frequency = self.fires / self.n
        return {
            "tokens": self.n,
            "l0": l0.mean().item(),
            "l0_quantiles": dict(zip(("p10", "p50", "p90"), torch.quantile(l0, torch.tensor([0.1, 0.5, 0.9],
                                                                                          dtype=torch.float64)).tolist())),
            "explained_variance": 1 - self.error / about_mean,
            "explained_variance_formula": "1 - sum||x - x_hat||^2 / sum||x - mean(x)||^2, mean over the whole eval set",
            "mse": self.error / (self.n * d_in),
            "cosine_similarity": self.cosine / self.n,
            "shrinkage": self.shrinkage / self.n,
            "dead_fraction": (self.fires == 0).double().mean().item(),
            "dense_fraction_1pct": (frequency > 0.01).double().mean().item(),
            "dense_fraction_10pct": (frequency > 0.10).double().mean().item(),
        }, frequency


@torch.no_grad()
def _next_token_terms(model, ids: torch.Tensor, layer: int, splice) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean next-token CE, log-probabilities [N-1, V])`` of ``ids`` with ``splice`` at ``layer``."""
    with attach(model, splice={layer: splice} if splice else None):
        logits = model(input_ids=ids).logits[0, :-1].float()
    logp = logits.log_softmax(-1)
    return F.nll_loss(logp, ids[0, 1:]), logp


@torch.no_grad()
def evaluate_sae(model, sae: SparseAutoencoder, windows: Sequence[torch.Tensor], layer: int,
                 exclude_first: bool = True, progress: bool = False) -> tuple[dict, torch.Tensor]:
    """Metrics over ``windows`` (each ``[1, seq]``) and the per-latent firing frequency ``[d_sae]``.

    Reconstruction metrics use the positions the autoencoder was trained on. For causal LMs, CE
    loss recovered ``(L_zero − L_sae)/(L_zero − L_clean)`` and KL recovered
    ``(KL_zero − KL_sae)/KL_zero`` (next-token KL from the clean model) splice the reconstruction,
    or zeros, at the same positions."""
    sae.eval()
    sums = _Sums(sae.d_in, sae.d_sae)
    causal = hasattr(model, "lm_head") or model.config.is_decoder
    losses = {"clean": 0.0, "sae": 0.0, "zero": 0.0, "kl_sae": 0.0, "kl_zero": 0.0}
    bar = tqdm(windows, desc="evaluating SAE", unit="window", disable=not progress, leave=False)
    say = bar.set_postfix_str if progress else (lambda text: None)  # each window's forwards, as they start
    for ids in bar:
        say("head outputs")
        x = head_outputs(model, ids, layer)
        x = x[1:] if exclude_first else x
        sums.add(x, sae.reconstruct(x), sae.encode(x))
        if causal:
            say("clean forward")
            clean, clean_logp = _next_token_terms(model, ids, layer, None)
            say("forward with the reconstruction spliced in")
            spliced, sae_logp = _next_token_terms(model, ids, layer, splice_function(sae, not exclude_first))
            say("forward with the head outputs zeroed")
            zeroed, zero_logp = _next_token_terms(model, ids, layer, splice_function(sae, not exclude_first, zero=True))
            p = clean_logp.exp()
            losses["clean"] += clean.item()
            losses["sae"] += spliced.item()
            losses["zero"] += zeroed.item()
            losses["kl_sae"] += (p * (clean_logp - sae_logp)).sum(-1).mean().item()
            losses["kl_zero"] += (p * (clean_logp - zero_logp)).sum(-1).mean().item()
    metrics, frequency = sums.metrics(sae.d_in)
    if causal:
        n = len(windows)
        clean, spliced, zeroed = losses["clean"] / n, losses["sae"] / n, losses["zero"] / n
        kl_sae, kl_zero = losses["kl_sae"] / n, losses["kl_zero"] / n
        metrics.update({"ce_clean": clean, "ce_sae": spliced, "ce_zero_ablation": zeroed,
                        "ce_loss_recovered": (zeroed - spliced) / (zeroed - clean) if zeroed != clean else float("nan"),
                        "kl_sae": kl_sae, "kl_zero_ablation": kl_zero,
                        "kl_recovered": (kl_zero - kl_sae) / kl_zero if kl_zero > 0 else float("nan")})
    return metrics, frequency
