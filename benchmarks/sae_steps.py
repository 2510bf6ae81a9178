"""One training step (forward, backward, Adam) of each TopK autoencoder the SAE benchmarks compare:
a plain dense torch implementation, headlab's trainer step, and SAELens' where ``sae_lens`` imports.
Each ``*_step(...)`` builds its state and returns a function of a batch ``x [B, d_in]``. Only
``headlab_step`` imports headlab (SAELens' environment runs this file without it)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dense_step(sae, k: int):
    """A plain dense TopK autoencoder with ``sae``'s initial weights: the ``B × d_sae`` code is built,
    decoded with a matmul, and autograd differentiates the dense encoder."""
    params = [p.detach().clone().requires_grad_() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)]
    optimizer = torch.optim.Adam(params, lr=1e-4)

    def step(x):
        w_enc, b_enc, w_dec, b_dec = params
        pre = F.relu((x - b_dec) @ w_enc + b_enc)
        values, indices = pre.topk(k, dim=-1)
        codes = torch.zeros_like(pre).scatter(1, indices, values)
        loss = (codes @ w_dec + b_dec - x).float().pow(2).sum(1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def headlab_step(sae, k: int):
    """headlab's step: sparse TopK ops (Triton on CUDA), decoder-norm constraint, clipping."""
    from headlab.sae.settings import TrainSettings
    from headlab.sae.training import _loss

    settings = TrainSettings(k=k)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)  # as the trainer
    no_dead = torch.zeros(sae.d_sae, dtype=torch.bool, device=sae.W_dec.device)

    def step(x):
        loss, _ = _loss(sae, x, settings, 1.0, no_dead)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_parallel_gradient()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        optimizer.step()
        sae.normalise_decoder()
    return step


def saelens_step(d_in: int, d_sae: int, k: int, device: str):
    """``(step, note)``: SAELens' TopK training SAE step with its own loss, or ``(None, why not)``."""
    try:
        from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
        from sae_lens.saes.sae import TrainStepInput
    except Exception as err:  # not installed alongside (it pins transformer-lens 3.x), or another API
        return None, f"not measured: {type(err).__name__}: {err}"
    from importlib.metadata import version

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k, device=device))
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4)
    no_dead = torch.zeros(d_sae, dtype=torch.bool, device=device)

    def step(x):
        out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=no_dead,
                                                       n_training_steps=0, is_logging_step=False))
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
    return step, f"sae-lens {version('sae-lens')}"
