"""Chunked torch implementations of causal linear and hybrid attention (docs/guides/gpu.md), differentiable
by autograd, plus the dense step used for decoding from a recurrent state.

Shapes: ``fq, fk [B, H, T, K]`` (feature-mapped), ``q, k [B, H, T, D]``, ``v [B, H, T, V]``; a state
is ``[B, H, K, V + 1]`` = ``Σ φk [v, 1]`` over a prefix. Work is ``O(T·C·(K + V))`` with chunk
``C`` and memory ``O(T·C)``: nothing of size ``T × T`` is built. Everything runs in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK = 64


def with_ones(v: torch.Tensor) -> torch.Tensor:
    """``[v, 1]``: values with a ones column, so one product yields numerator and normaliser."""
    return torch.cat([v, torch.ones_like(v[..., :1])], -1)


def window_starts(positions: torch.Tensor, window: int, terrace: bool) -> torch.Tensor:
    """First key position of the softmax window of each query position (clamped at 0)."""
    start = (positions // window) * window - window if terrace else positions - window + 1
    return start.clamp(min=0)


def _chunks(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """``[B, H, T, X]`` → ``[B, H, NT, C, X]`` in fp32, zero-padded to a multiple of ``chunk``."""
    pad = -x.shape[2] % chunk
    x = F.pad(x.float(), (0, 0, 0, pad))
    return x.view(*x.shape[:2], -1, chunk, x.shape[-1])


def _unchunk(x: torch.Tensor, n_tokens: int) -> torch.Tensor:
    return x.reshape(*x.shape[:2], -1, x.shape[-1])[:, :, :n_tokens]


def _chunk_states(fk_c: torch.Tensor, v_c: torch.Tensor, initial_state=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(state at each chunk start [B, H, NT, K, V'], final state [B, H, K, V'])``."""
    kv = fk_c.transpose(-1, -2) @ v_c
    inclusive = kv.cumsum(2)
    starts = inclusive - kv
    final = inclusive[:, :, -1]
    if initial_state is not None:
        starts = starts + initial_state.float()[:, :, None]
        final = final + initial_state.float()
    return starts, final


def linear_attention_torch(fq, fk, v, *, normalize=True, initial_state=None, chunk: int = CHUNK):
    """``(o [B, H, T, V], final state [B, H, K, V + 1])`` of causal linear attention, chunked."""
    n_tokens = fq.shape[2]
    q_c, k_c, v_c = _chunks(fq, chunk), _chunks(fk, chunk), _chunks(with_ones(v.float()), chunk)
    starts, final = _chunk_states(k_c, v_c, initial_state)
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=fq.device).tril()
    out = q_c @ starts + ((q_c @ k_c.transpose(-1, -2)) * causal) @ v_c
    out = _unchunk(out, n_tokens)
    o = out[..., :-1] / out[..., -1:] if normalize else out[..., :-1]
    return o.to(v.dtype), final


def _previous(x_c: torch.Tensor) -> torch.Tensor:
    """Each chunk's predecessor (zeros before the first): ``[B, H, NT, C, X]``."""
    return torch.cat([torch.zeros_like(x_c[:, :, :1]), x_c[:, :, :-1]], 2)


def hybrid_attention_torch(q, k, v, fq, fk, gamma, *, window: int = 64, terrace: bool = True, scale=None):
    """``o [B, H, T, V]`` of the hybrid layer (reference: ``hybrid_attention_reference``), chunked
    with chunk = window so each query's window lies in its own and the previous chunk (one chunk of
    ``T`` when the window is longer than the input: memory ``O(T · min(T, window))``)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    n_tokens, c = q.shape[2], min(window, q.shape[2])
    q_c, k_c = _chunks(q, c), _chunks(k, c)
    fq_c, fk_c, v_c = _chunks(fq, c), _chunks(fk, c), _chunks(with_ones(v.float()), c)
    starts, _ = _chunk_states(fk_c, v_c)
    k_w = torch.cat([_previous(k_c), k_c], 3)  # keys of the previous and own chunk [B,H,NT,2C,D]
    v_w = torch.cat([_previous(v_c), v_c], 3)
    n_chunks = q_c.shape[2]
    pos_q = torch.arange(n_chunks * c, device=q.device).view(n_chunks, c, 1)
    pos_k = (torch.arange(2 * c, device=q.device) - c) + torch.arange(n_chunks, device=q.device).view(-1, 1) * c
    pos_k = pos_k[:, None, :]  # [NT, 1, 2C]
    start = window_starts(pos_q, window, terrace)
    in_window = (pos_k <= pos_q) & (pos_k >= start) & (pos_k >= 0)
    s = (q_c @ k_w.transpose(-1, -2)) * scale
    s = s.masked_fill(~in_window, float("-inf"))
    soft = torch.exp(s - s.amax(-1, keepdim=True)) * gamma.float()[None, :, None, None, None]
    # Linear part: the state before the previous chunk, plus previous-chunk keys older than the window.
    older = (pos_k < start) & (pos_k >= 0)
    older_prev = older[..., :c]
    out = fq_c @ _previous(starts) + soft @ v_w
    if bool(older_prev.any()):
        out = out + ((fq_c @ _previous(fk_c).transpose(-1, -2)) * older_prev) @ _previous(v_c)
    out = _unchunk(out, n_tokens)
    return (out[..., :-1] / out[..., -1:]).to(v.dtype)


def hybrid_step_torch(q, k, v, fq, fk, gamma, state, *, first_position: int, key_start: int,
                      window: int, terrace: bool, scale: float):
    """Outputs of ``T`` new queries at positions ``first_position …`` from a recurrent state.

    ``k, v, fk [B, H, L, ·]`` hold the keys at positions ``key_start … first_position + T − 1`` (the
    window cache followed by the new keys); ``state`` is ``Σ φk [v, 1]`` over positions before
    ``key_start``. ``window = 0`` is plain linear attention. Dense over the ``L`` local keys: meant
    for decoding, where ``L`` is at most ``2·window + T``.
    """
    n_new, n_local = q.shape[2], k.shape[2]
    pos_q = torch.arange(first_position, first_position + n_new, device=q.device)[:, None]
    pos_k = torch.arange(key_start, key_start + n_local, device=q.device)[None, :]
    visible = pos_k <= pos_q
    start = window_starts(pos_q, window, terrace) if window else pos_q + 1
    if bool((start < key_start).any()):
        raise ValueError("the window cache does not reach back to the first key of every window")
    in_window = visible & (pos_k >= start)
    v1 = with_ones(v.float())
    out = fq.float() @ state.float() + ((fq.float() @ fk.float().transpose(-1, -2)) * (visible & ~in_window)) @ v1
    if window:
        s = (q.float() @ k.float().transpose(-1, -2)) * scale
        s = s.masked_fill(~in_window, float("-inf"))
        soft = torch.exp(s - s.amax(-1, keepdim=True)) * gamma.float()[None, :, None, None]
        out = out + soft @ v1
    return (out[..., :-1] / out[..., -1:]).to(v.dtype)
