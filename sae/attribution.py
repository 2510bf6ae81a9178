"""Attributing latents to heads (docs/methods/sae.md): decoder-norm shares and direct feature attribution
of one pre-activation to heads and source positions."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..surgeon import Taps, attach, attention_modules, model_shape
from ..surgeon.stopping import run_until
from .model import SparseAutoencoder


def head_shares(weights: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``[d_sae, H]`` share of each latent's norm per head block, for ``weights [d_sae, H·D]``
    (``W_dec``, or ``W_encᵀ``): ``‖w[i, h-block]‖ / Σ_h' ‖w[i, h'-block]‖``."""
    norms = weights.detach().view(weights.shape[0], n_heads, -1).norm(dim=-1)
    return norms / norms.sum(1, keepdim=True).clamp(min=1e-12)


def decoder_head_shares(sae: SparseAutoencoder) -> torch.Tensor:
    """Decoder-norm share ``[d_sae, H]`` of every latent."""
    return head_shares(sae.W_dec, sae.n_heads)


@dataclass
class FeatureAttribution:
    """``by_source [H, seq]``: each head's contribution from each source position; ``by_head
    [H]`` their sums; ``bias``: the part no head carries; ``pre_activation``: the latent's
    pre-activation, equal to ``by_head.sum() + bias``."""

    by_source: torch.Tensor
    by_head: torch.Tensor
    bias: float
    pre_activation: float


@torch.no_grad()
def direct_feature_attribution(model, sae: SparseAutoencoder, input_ids: torch.Tensor, layer: int,
                               position: int, latent: int) -> FeatureAttribution:
    """DFA of ``latent``'s pre-activation at ``position`` of ``input_ids [1, seq]``:
    ``A^h[pos, src] · (v^h_src · c·W_enc[h-block, latent])`` with ``v`` of KV head ``h // g``
    (read from the layer's ``v_proj``). Exact when nothing edits the layer's outputs."""
    shape = model_shape(model)
    if not 0 <= position < input_ids.shape[1]:
        raise ValueError(f"position {position} outside 0..{input_ids.shape[1] - 1}")
    if not 0 <= latent < sae.d_sae:
        raise ValueError(f"latent {latent} outside 0..{sae.d_sae - 1}")
    module = attention_modules(model)[layer]
    if not hasattr(module, "v_proj"):
        raise ValueError(f"{type(module).__name__} has no v_proj; direct feature attribution supports "
                         "Llama-style attention modules")
    values = []
    handle = module.v_proj.register_forward_hook(lambda m, args, out: values.append(out[0].detach()))
    try:
        with attach(model, taps=Taps(attention={layer: None}, head_outputs=[layer])) as session:
            run_until(model, layer, input_ids=input_ids)
    finally:
        handle.remove()
    probs = session.recording.attention_map(layer)[0, :, position]  # [H, seq]
    v = values[0].view(input_ids.shape[1], shape.n_kv_heads, shape.head_dim).float()  # [seq, H_kv, D]
    v = v.repeat_interleave(shape.group_size, dim=1)  # [seq, H, D]
    w = (sae.W_enc[:, latent] * sae.scale).view(shape.n_heads, shape.head_dim)  # [H, D]
    by_source = probs * torch.einsum("shd,hd->hs", v, w)
    bias = (sae.b_enc[latent] - sae.b_dec @ sae.W_enc[:, latent]).item()
    z = session.recording.head_output(layer)[0, position].flatten().float()  # [H·D]
    pre = sae.pre_activations((z * sae.scale)[None])[0, latent].item()
    return FeatureAttribution(by_source, by_source.sum(1), bias, pre)
