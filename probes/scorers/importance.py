"""Head scores that need their own inputs or passes (docs/methods/patterns.md, importance.md): induction and duplicate-token
scores on repeated random tokens, Michel gradient importance and ablation importance.
Every function returns ``[layer, head]`` tensors."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from tqdm.auto import tqdm

from ...surgeon import HeadMean, HeadScale, Plan, Taps, attach, model_shape
from ...surgeon.losses import needs_recompute, next_token_loss, recomputed_in_backward
from ...surgeon.references import head_output_means
from ...surgeon.stopping import run_for_taps

REPEAT_DESCRIPTIONS = {
    "induction": "mean attention from each second-copy token to the token after its first occurrence, "
                 "on random tokens repeated twice (TransformerLens convention)",
    "duplicate_token": "mean attention from each second-copy token to its first occurrence",
}


def repeated_tokens(vocab_size: int, n_batch: int = 10, half: int = 50, seed: int = 0,
                    low: int = 1000, high: int = 10000) -> torch.Tensor:
    """``[n_batch, 2·half]`` ids: ``half`` tokens uniform in ``[low, high)`` (clipped to the
    vocabulary), repeated twice."""
    high = min(high, vocab_size)
    low = min(low, high - half)
    gen = torch.Generator().manual_seed(seed)
    first = torch.randint(low, high, (n_batch, half), generator=gen)
    return torch.cat([first, first], dim=1)


@torch.no_grad()
def repeated_token_scores(model, n_batch: int = 10, half: int = 50, seed: int = 0,
                          progress: bool = False) -> dict[str, torch.Tensor]:
    """Induction ``A[i, i - half + 1]`` and duplicate ``A[i, i - half]`` scores, averaged over the
    second-copy rows and the batch (one forward; each layer's maps reduced as soon as they exist)."""
    shape = model_shape(model)
    ids = repeated_tokens(model.config.get_text_config().vocab_size, n_batch, half, seed)
    rows = torch.arange(half, 2 * half)
    induction, duplicate = {}, {}
    bar = tqdm(total=shape.n_layers, desc="induction", unit="layer", disable=not progress, leave=False)

    def reduce(layer: int, maps: torch.Tensor) -> None:  # maps [batch, heads, query, key]
        induction[layer] = maps[:, :, rows, rows - half + 1].mean((0, 2))
        duplicate[layer] = maps[:, :, rows, rows - half].mean((0, 2))
        bar.update()

    taps = Taps(attention={layer: None for layer in range(shape.n_layers)}, attention_consumer=reduce)
    with bar, attach(model, taps=taps):
        run_for_taps(model, input_ids=ids)
    return {"induction": torch.stack([induction[layer] for layer in range(shape.n_layers)]),
            "duplicate_token": torch.stack([duplicate[layer] for layer in range(shape.n_layers)])}


def gradient_importance(model, windows: list[torch.Tensor], progress: bool = False) -> torch.Tensor:
    """Michel et al.: ``E_x |∂L/∂ξ|`` for unit gates ``ξ [layer, head]`` on head outputs,
    weighted by tokens, each layer normalised by its L2 norm, then min-max scaled to [0, 1]. Long
    windows recompute each block, and make their logits in chunks, in the backward pass
    (:mod:`headlab.surgeon.losses`; SmolLM2 at 8,192 tokens peaks at 3.8 GB instead of 18.9 GB)."""
    shape = model_shape(model)
    total = torch.zeros(shape.n_layers, shape.n_heads, dtype=torch.float64)
    tokens = 0
    for ids in tqdm(windows, desc="gradient importance", disable=not progress, leave=False):
        gates = torch.ones(shape.n_layers, shape.n_heads, requires_grad=True)
        recompute = recomputed_in_backward(model) if needs_recompute(model, ids.numel()) else nullcontext()
        with attach(model, gates=gates), recompute:  # the backward runs inside: a recomputed block needs the gates
            (grad,) = torch.autograd.grad(next_token_loss(model, ids), gates)
        n = ids.shape[1] - 1
        total += grad.abs().double() * n
        tokens += n
    score = total / tokens
    score = score / (score.norm(dim=1, keepdim=True) + 1e-20)
    return ((score - score.min()) / (score.max() - score.min() + 1e-20)).float()


@torch.no_grad()
def ablation_importance(model, windows: list[torch.Tensor], mode: str = "zero", progress: bool = False) -> torch.Tensor:
    """``ΔL = CE(head ablated) − CE(clean)`` per head, mean over ``windows``; ``mode`` ``"zero"``
    (scale 0) or ``"mean"`` (the head's mean output over the same windows)."""
    if mode not in ("zero", "mean"):
        raise ValueError(f"ablation mode must be 'zero' or 'mean', got {mode!r}")
    shape = model_shape(model)
    clean = sum(next_token_loss(model, ids).item() for ids in windows) / len(windows)
    delta = torch.zeros(shape.n_layers, shape.n_heads)
    heads = [(layer, head) for layer in range(shape.n_layers) for head in range(shape.n_heads)]
    means = {}
    for layer, head in tqdm(heads, desc=f"{mode} ablation", disable=not progress, leave=False):
        if mode == "mean" and layer not in means:
            means[layer] = head_output_means(model, windows, layer, range(shape.n_heads))
        edit = HeadScale(layer, (head,), 0.0) if mode == "zero" else HeadMean(layer, (head,), [means[layer][head]])
        with attach(model, Plan([edit])):
            ablated = sum(next_token_loss(model, ids).item() for ids in windows) / len(windows)
        delta[layer, head] = ablated - clean
    return delta
