"""Attention statistics chunked over query blocks in torch (plus a native row pass on the CPU):
memory O(B·Hq·block·Nk).

The CPU path. Same semantics as :mod:`headlab.kernels.reference` (see its docstring for shapes,
masks and the empty-row convention). Each block holds whole rows, so probabilities are exact
within the block and the column sums come out of the same pass. Causal blocks only touch the
keys their rows can see (with a sliding window, only the keys inside some row's window), and
hidden logits are set to the fp32 minimum (``0 · min = 0``, so the entropy product needs no extra
masking). Soft-capping is applied to each block's logits; learned sinks are folded into each
block's rows once their key statistics are known (:func:`.quirks.with_sinks`). Logits are kept in base 2 (``log2(e)`` folded into the
query scale) because ``exp2`` is a third cheaper than ``exp`` on the CPU at the same accuracy;
LSE and entropy are converted back to nats.

Speed: each block's logits (and, for the torch ops, its weights) go into buffers reused from
block to block (a fresh multi-MB tensor per block costs its page faults again), and on the CPU
the blocks are dealt round-robin to ``torch.get_num_threads()`` Python threads that each run
single-threaded ops (per-op threading over one small block leaves a third of the time on the
table). Results do not depend on the thread count, except the column sums' summation order. The
per-row work after the logits (maximum, top-k, ``exp2``, entropy product) is one native call per
block (:mod:`.native`) where a C compiler is available, else torch ops. Forward only (no
autograd graph).
"""

from __future__ import annotations

import dataclasses
import math
from concurrent.futures import ThreadPoolExecutor

import torch

from . import native
from .quirks import first_visible_key, with_sinks
from .types import AttentionStats, ColumnStats

_BLOCK_BYTES = 8 * 2**20
_MIN_BLOCK, _MAX_BLOCK = 16, 256
_CHUNK = 64  # keys per chunk of the top-k pre-selection
_HIDDEN = torch.finfo(torch.float32).min
_LOG2E, _LN2 = 1 / math.log(2), math.log(2)
UNWRITTEN = torch.iinfo(torch.int64).min


def _key_range(start: int, stop: int, n_key: int, causal: bool, q_offset: int, window: int | None) -> tuple[int, int]:
    """Keys ``[lo, end)`` that rows ``start:stop`` can see (``end <= lo``: none)."""
    if not causal:
        return 0, n_key
    return min(n_key, first_visible_key(start + q_offset, window)), max(0, min(n_key, stop + q_offset))


def _key_span(block: int, n_key: int, window: int | None) -> int:
    """The most keys one block of ``block`` rows touches."""
    return n_key if window is None else min(n_key, block + window - 1)


def _scaled_queries(q, scale: float, softcap: float | None) -> torch.Tensor:
    """fp32 queries whose products with keys are the base-2 logits, or, with ``softcap``, the
    argument of the tanh (:func:`_block_logits` finishes those)."""
    return q.float() * (scale * _LOG2E if softcap is None else scale / softcap)


class _Scratch:
    """One worker's reusable fp32 buffers for a block's logits and, unless the weights are
    written over the logits, its weights."""

    def __init__(self, numel: int, device, weights: bool):
        self.logits = torch.empty(numel, device=device)
        self.weights = torch.empty(numel, device=device) if weights else None

    def view(self, buffer: torch.Tensor, shape) -> torch.Tensor:
        """The first ``prod(shape)`` elements of ``buffer``, contiguous, as ``shape``."""
        return buffer[: math.prod(shape)].view(shape)


def _block_logits(q_scaled, kf, start, stop, key_lo, key_end, softcap, scratch):
    """fp32 base-2 logits ``[B, Hq, blk, key_end - key_lo]`` of rows ``start:stop`` against keys
    ``key_lo:key_end`` in ``scratch.logits``, soft-capped when ``softcap`` is set; GQA without
    expanding K."""
    batch, n_heads, _, dim = q_scaled.shape
    n_kv = kf.shape[1]
    blk, width = stop - start, key_end - key_lo
    qb = q_scaled[:, :, start:stop].reshape(batch, n_kv, (n_heads // n_kv) * blk, dim)
    s = scratch.view(scratch.logits, (batch, n_kv, (n_heads // n_kv) * blk, width))
    torch.matmul(qb, kf[:, :, key_lo:key_end].transpose(-1, -2), out=s)
    if softcap is not None:
        s.tanh_().mul_(softcap * _LOG2E)
    return s.view(batch, n_heads, blk, width)


def _for_blocks(n_query, block, fill, make_state, parallel: bool) -> list:
    """Call ``fill(state, start, stop)`` for every query block of ``block`` rows; return the
    per-worker states made by ``make_state()``. With ``parallel``, blocks go round-robin to
    ``torch.get_num_threads()`` threads running single-threaded ops; the thread setting is
    restored afterwards. States are made in the calling thread, so that their large buffers come
    from its allocator arena (memory a short-lived thread's arena frees stays with the process)."""
    starts = range(0, n_query, block)
    threads = torch.get_num_threads()
    workers = max(1, min(threads, len(starts))) if parallel else 1
    states = [make_state() for _ in range(workers)]

    def work(worker):
        if workers > 1:
            torch.set_num_threads(1)
        for start in starts[worker::workers]:
            fill(states[worker], start, min(start + block, n_query))
        return states[worker]

    if workers == 1:
        return [work(0)]
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="headlab-stats") as pool:
            return list(pool.map(work, range(workers)))
    finally:
        torch.set_num_threads(threads)


def _gqa_matmul(p, vf, key_lo):
    """``p [B, Hq, blk, n] @ v [B, Hkv, key_lo:key_lo + n, D]`` -> ``[B, Hq, blk, D]`` without
    expanding V."""
    batch, n_heads, blk, width = p.shape
    n_kv = vf.shape[1]
    out = torch.matmul(p.reshape(batch, n_kv, (n_heads // n_kv) * blk, width), vf[:, :, key_lo:key_lo + width])
    return out.reshape(batch, n_heads, blk, -1)


def _hide(s, start, key_lo, causal, q_offset, key_valid, window):
    """Set logits of hidden keys to the fp32 minimum, in place: the causal triangle on the
    diagonal columns only, the keys before each row's window, and padded keys. Column ``c`` of
    ``s`` is key ``key_lo + c``."""
    blk, width = s.shape[-2:]
    key_end = key_lo + width
    rows = torch.arange(blk, device=s.device)[:, None] + start + q_offset  # key position of each row
    if causal:
        lo = max(start + q_offset + 1, key_lo)  # the first row hides keys from here on
        if lo < key_end:
            cols = torch.arange(lo, key_end, device=s.device)
            s[..., lo - key_lo:].masked_fill_(cols[None, :] > rows, _HIDDEN)
    if window is not None:
        hi = min(start + blk - 1 + q_offset - window + 1, key_end)  # the last row sees keys from here on
        if hi > key_lo:
            cols = torch.arange(key_lo, hi, device=s.device)
            s[..., : hi - key_lo].masked_fill_(cols[None, :] <= rows - window, _HIDDEN)
    if key_valid is not None:
        s.masked_fill_(~key_valid[:, None, None, key_lo:key_end], _HIDDEN)


def visible_key_counts(batch, n_query, n_key, causal, q_offset, key_valid, device, window=None) -> torch.Tensor:
    """``[B, Nq]`` int64: how many keys each row sees (O(B·(Nq+Nk)), no map)."""
    valid = torch.ones(batch, n_key, dtype=torch.long, device=device) if key_valid is None else key_valid.long()
    if not causal:
        return valid.sum(-1, keepdim=True).expand(batch, n_query).contiguous()
    prefix = torch.cat([torch.zeros(batch, 1, dtype=torch.long, device=device), valid.cumsum(-1)], -1)
    positions = torch.arange(n_query, device=device) + q_offset
    counts = prefix[:, (positions + 1).clamp(0, n_key)]
    if window is not None:
        counts = counts - prefix[:, (positions - window + 1).clamp(0, n_key)]
    return counts


def visible_row_counts(batch, n_query, n_key, causal, q_offset, key_valid, query_valid, device,
                       window=None) -> torch.Tensor:
    """``[B, Nk]`` int64: how many valid rows see each key (O(B·(Nq+Nk)), no map)."""
    rows = torch.ones(batch, n_query, dtype=torch.long, device=device)
    if query_valid is not None:
        rows = query_valid.long().to(device)
    if causal:
        # key j is seen by rows i with j <= i + q_offset (< j + window): a difference of suffix sums
        suffix = torch.cat([rows.flip(-1).cumsum(-1).flip(-1), torch.zeros(batch, 1, dtype=torch.long, device=device)], -1)
        keys = torch.arange(n_key, device=device)
        counts = suffix[:, (keys - q_offset).clamp(0, n_query)]
        if window is not None:
            counts = counts - suffix[:, (keys - q_offset + window).clamp(0, n_query)]
    else:
        counts = rows.sum(-1, keepdim=True).expand(batch, n_key)
    if key_valid is not None:
        counts = counts * key_valid.long().to(device)
    return counts.contiguous()


class _Outputs:
    """Results filled block by block; pre-filled with NaN (indices with ``UNWRITTEN``) so that
    a row the blocks miss shows up in tests (they are O(B·Hq·Nq·D), cheap to fill)."""

    def __init__(self, q, v, n_groups, topk):
        batch, n_heads, n_query, _ = q.shape
        nan = dict(fill_value=float("nan"), device=q.device)
        self.out = torch.full((batch, n_heads, n_query, v.shape[-1]), dtype=q.dtype, **nan)
        self.lse = torch.full((batch, n_heads, n_query), **nan)
        self.entropy = torch.full_like(self.lse, float("nan"))
        self.mass = None if n_groups is None else torch.full((batch, n_heads, n_query, n_groups), **nan)
        self.idx = None
        self.weights = None
        if topk:
            self.idx = torch.full((batch, n_heads, n_query, topk), UNWRITTEN, dtype=torch.long, device=q.device)
            self.weights = torch.full((batch, n_heads, n_query, topk), **nan)


class _Worker:
    """A worker's scratch buffers and, when column sums are asked for, its own ``[B, Hq, Nk]``
    accumulator (summed over workers at the end, so threads never add into one tensor)."""

    def __init__(self, scratch_numel, col_shape, device, row_pass: str | None):
        self.row_pass = row_pass  # "native" (in place), "torch" (needs a weights buffer) or None
        self.scratch = _Scratch(scratch_numel, device, weights=row_pass == "torch")
        self.col_sum = None if col_shape is None else torch.zeros(col_shape, device=device)


def _extended_values(v, k, key_groups):
    """``[B, Hkv, Nk, D_v + G + 1]`` fp32: ``[V | groups | 1]``, so that one product with the
    unnormalised weights gives the output, the group masses and the row total at once."""
    batch, n_kv, n_key, _ = k.shape
    parts = [v.float()]
    if key_groups is not None:
        parts.append(key_groups.float().transpose(1, 2)[:, None].expand(batch, n_kv, n_key, key_groups.shape[1]))
    parts.append(torch.ones(batch, n_kv, n_key, 1, device=k.device))
    return torch.cat(parts, dim=-1)


def block_rows(batch, n_heads, n_key, budget_bytes=_BLOCK_BYTES) -> int:
    """Query rows per block so that one ``[B, Hq, rows, Nk]`` fp32 block stays near ``budget_bytes``
    (cache-resident: the passes over it are memory bound)."""
    return max(_MIN_BLOCK, min(_MAX_BLOCK, budget_bytes // (4 * batch * n_heads * max(n_key, 1))))


@dataclasses.dataclass(frozen=True)
class _Scoring:
    """One call's masking and score quirks (see :mod:`.quirks`), as the block functions read them."""

    causal: bool
    q_offset: int
    key_valid: torch.Tensor | None
    window: int | None = None
    softcap: float | None = None
    sinks: torch.Tensor | None = None

    def key_range(self, start: int, stop: int, n_key: int) -> tuple[int, int]:
        return _key_range(start, stop, n_key, self.causal, self.q_offset, self.window)

    def hide(self, s, start: int, key_lo: int) -> None:
        _hide(s, start, key_lo, self.causal, self.q_offset, self.key_valid, self.window)


@torch.no_grad()
def attention_stats_torch(
    q, k, v, *, scale, causal, q_offset, key_valid=None, key_groups=None, topk=0,
    columns=False, query_valid=None, block=None, window=None, softcap=None, sinks=None,
) -> AttentionStats:
    """Output and per-row statistics, one query block at a time (``block`` rows; default from
    :func:`block_rows`); with ``columns`` also the attention each key receives from the valid
    rows (``query_valid [B, Nq]``). ``window``, ``softcap``, ``sinks``: :mod:`.quirks`."""
    batch, n_heads, n_query, _ = q.shape
    n_key = k.shape[-2]
    block = block or block_rows(batch, n_heads, _key_span(_MAX_BLOCK, n_key, window))
    if key_valid is not None and bool(key_valid.all()):
        key_valid = None  # nothing to hide beyond causality: skip a pass per block
    scoring = _Scoring(causal, q_offset, key_valid, window, softcap, sinks)
    q_scaled, kf = _scaled_queries(q, scale, softcap), k.float()
    extended = _extended_values(v, k, key_groups)
    res = _Outputs(q, v, None if key_groups is None else key_groups.shape[1], topk)
    key_counts = visible_key_counts(batch, n_query, n_key, causal, q_offset, key_valid, q.device, window)
    row_weight = None
    if columns:
        row_weight = torch.ones(batch, n_query) if query_valid is None else query_valid.float()
        row_weight = (row_weight.to(q.device) * (key_counts > 0)).float()

    def fill(worker, start, stop):
        _fill_block(res, worker, q_scaled, kf, extended, topk, row_weight, key_counts[:, start:stop],
                    start, stop, scoring)

    row_pass = "native" if q.device.type == "cpu" and native.available() else "torch"

    def make_worker():
        return _Worker(batch * n_heads * min(block, n_query) * _key_span(block, n_key, window),
                       (batch, n_heads, n_key) if columns else None, q.device, row_pass)

    workers = _for_blocks(n_query, block, fill, make_worker, q.device.type == "cpu")
    if q.device.type == "cpu":
        native.release_free_memory()
    cols = None
    if columns:
        counts = visible_row_counts(batch, n_query, n_key, causal, q_offset, key_valid, query_valid, q.device, window)
        cols = ColumnStats(sum(w.col_sum for w in workers), counts)
    return AttentionStats(res.out, res.lse, res.entropy, res.mass, res.idx, res.weights, cols)


def _fill_block(res, worker, q_scaled, kf, extended, topk, row_weight, counts, start, stop, scoring: _Scoring):
    """All results of rows ``start:stop`` (``counts [B, blk]``: visible keys per row).

    With base-2 logits ``s``, ``e = 2^(s - max)`` stays unnormalised; results are divided by the
    row total afterwards, on ``[blk, ·]`` tensors. Entropy is
    ``ln 2 · (log2(total) - Σ_j e_j (s_j - max) / total)``; learned sinks then rescale every key
    probability by ``keep = 1 - p_sink`` (:func:`.quirks.with_sinks`)."""
    rows = slice(start, stop)
    empty = (counts == 0)[:, None, :]  # [B, 1, blk]
    key_lo, key_end = scoring.key_range(start, stop, kf.shape[2])
    if key_end <= key_lo:  # no row of the block sees anything
        _fill_empty(res, rows, scoring.sinks)
        return
    s = _block_logits(q_scaled, kf, start, stop, key_lo, key_end, scoring.softcap, worker.scratch)
    scoring.hide(s, start, key_lo)
    e, row_max, spread, top = _row_pass(s, topk, worker)
    mixed = _gqa_matmul(e, extended, key_lo)  # [B, Hq, blk, D_v + G + 1]
    d_v = res.out.shape[-1]
    total = mixed[..., -1:]
    mixed = mixed[..., :-1] / total
    lse = ((row_max + total.log2()).squeeze(-1) * _LN2).masked_fill(empty, float("-inf"))
    entropy = ((total.log2().squeeze(-1) - spread / total.squeeze(-1)) * _LN2).masked_fill(empty, 0.0)
    lse, entropy, keep = with_sinks(lse, entropy, scoring.sinks)
    if keep is not None:
        mixed = mixed * keep[..., None]
    if top is not None:
        _fill_topk(res, rows, top, row_max, total, counts, topk, key_lo, keep)
    if res.mass is not None:
        res.mass[:, :, rows] = mixed[..., d_v:]
    if row_weight is not None:
        weight = row_weight[:, None, None, rows] / total.transpose(-1, -2)  # [B, Hq, 1, blk]
        if keep is not None:
            weight = weight * keep[:, :, None, :]
        worker.col_sum[:, :, key_lo:key_end] += torch.matmul(weight, e).squeeze(2)
    res.out[:, :, rows] = mixed[..., :d_v].to(res.out.dtype)
    res.lse[:, :, rows] = lse
    res.entropy[:, :, rows] = entropy
    if bool(empty.any()):
        _clear_rows(res, rows, empty)


def _row_pass(s, topk, worker):
    """``(e, row_max [..., 1], spread [...], top)`` of base-2 logits ``s [B, Hq, blk, Nk]``:
    ``e = 2^(s - max)``, ``spread = Σ_j e_j (s_j - max)`` and, with ``topk``, the top keys
    ``(logits, indices)`` sorted descending. The native pass works in place on ``s`` (one scan,
    one exponentiation); the torch ops spend ``s`` and write ``e`` to the weights buffer."""
    if worker.row_pass == "native":
        row_max, spread, values, indices = native.row_pass(s, min(topk, s.shape[-1]))
        return s, row_max[..., None], spread, (values, indices) if topk else None
    top = None
    if topk:
        chunk_max = _chunk_maxima(s)
        row_max = chunk_max.amax(-1, keepdim=True)
        top = _topk_keys(s, chunk_max, topk)
    else:
        row_max = s.amax(-1, keepdim=True)
    s.sub_(row_max)
    e = torch.exp2(s, out=worker.scratch.view(worker.scratch.weights, s.shape))
    return e, row_max, s.mul_(e).sum(-1), top


def _chunk_maxima(s):
    """``[B, Hq, blk, ceil(Nk / CHUNK)]``: the largest logit of each run of ``_CHUNK`` keys."""
    n_key = s.shape[-1]
    full = n_key - n_key % _CHUNK
    parts = [s[..., :full].unflatten(-1, (full // _CHUNK, _CHUNK)).amax(-1)] if full else []
    if full < n_key:
        parts.append(s[..., full:].amax(-1, keepdim=True))
    return torch.cat(parts, dim=-1)


def _topk_keys(s, chunk_max, topk):
    """Top-``topk`` logits and key indices of each row. The top-k keys lie in the k chunks with
    the largest maxima, so only those chunks' keys are searched."""
    n_key = s.shape[-1]
    n_chunks = min(topk, chunk_max.shape[-1])
    best_chunks = torch.topk(chunk_max, n_chunks, dim=-1, sorted=False).indices  # [B, Hq, blk, c]
    keys = (best_chunks[..., None] * _CHUNK + torch.arange(_CHUNK, device=s.device)).flatten(-2)
    values = torch.gather(s, -1, keys.clamp_max(n_key - 1))
    if n_key % _CHUNK:  # the last chunk is short: its missing keys must not be picked
        values.masked_fill_(keys >= n_key, float("-inf"))
    top = torch.topk(values, min(topk, n_key), dim=-1, sorted=False)  # unsorted is cheaper; sort k
    order = torch.sort(top.values, dim=-1, descending=True)
    return order.values, torch.gather(keys, -1, torch.gather(top.indices, -1, order.indices))


def _fill_topk(res, rows, top, row_max, total, counts, topk, key_lo, keep):
    """Write the top keys ``(logits, indices)`` (indices counted from ``key_lo``); slots beyond
    the row's visible keys get index -1 and weight 0; ``keep [B, Hq, blk]`` (sinks) or None."""
    values, indices = top
    indices = indices + key_lo
    take = indices.shape[-1]
    device = total.device
    hidden = torch.arange(topk, device=device)[None, None, :] >= counts[:, :, None]  # [B, blk, k]
    idx = torch.full(res.idx[:, :, rows].shape, -1, dtype=torch.long, device=device)
    weights = torch.zeros(res.weights[:, :, rows].shape, device=device)
    idx[..., :take] = indices
    weights[..., :take] = torch.exp2(values - row_max) / total
    if keep is not None:
        weights = weights * keep[..., None]
    res.idx[:, :, rows] = idx.masked_fill(hidden[:, None], -1)
    res.weights[:, :, rows] = weights.masked_fill(hidden[:, None], 0.0)


def _fill_empty(res, rows, sinks):
    """Rows that see no key: zero output, no entropy, ``lse = -inf`` (with sinks: the sink logit)."""
    res.out[:, :, rows] = 0
    res.lse[:, :, rows] = float("-inf") if sinks is None else sinks.float()[None, :, None].to(res.lse.device)
    res.entropy[:, :, rows] = 0.0
    if res.mass is not None:
        res.mass[:, :, rows] = 0.0
    if res.idx is not None:
        res.idx[:, :, rows] = -1
        res.weights[:, :, rows] = 0.0


def _clear_rows(res, rows, empty):
    """Rows that see no key (padding): zero output and mass (their softmax was uniform garbage)."""
    keep = ~empty[..., None]  # [B, 1, blk, 1]
    res.out[:, :, rows] *= keep.to(res.out.dtype)
    if res.mass is not None:
        res.mass[:, :, rows] *= keep


@torch.no_grad()
def column_stats_torch(
    q, k, lse, *, scale, causal, q_offset, key_valid=None, query_valid=None, block=None, window=None, softcap=None,
) -> ColumnStats:
    """Column sums of ``p = exp(s - lse)`` over valid rows and visible-row counts per key (with
    learned sinks, ``lse`` includes them and ``p`` is already their share of the row)."""
    batch, n_heads, n_query, _ = q.shape
    n_key = k.shape[-2]
    block = block or block_rows(batch, n_heads, _key_span(_MAX_BLOCK, n_key, window))
    scoring = _Scoring(causal, q_offset, key_valid, window, softcap)
    q_scaled, kf = _scaled_queries(q, scale, softcap), k.float()
    lse2 = (lse * _LOG2E).clamp_min(_HIDDEN)  # base 2, as the logits
    weight = torch.ones(batch, n_query, device=q.device) if query_valid is None else query_valid.float()
    counts = visible_key_counts(batch, n_query, n_key, causal, q_offset, key_valid, q.device, window)
    weight = weight * (counts > 0)  # rows that see no key contribute nothing

    def fill(worker, start, stop):
        key_lo, key_end = scoring.key_range(start, stop, n_key)
        if key_end <= key_lo:
            return
        s = _block_logits(q_scaled, kf, start, stop, key_lo, key_end, softcap, worker.scratch)
        scoring.hide(s, start, key_lo)
        p = torch.exp2(s.sub_(lse2[:, :, start:stop, None]), out=s)
        worker.col_sum[:, :, key_lo:key_end] += torch.matmul(weight[:, None, None, start:stop], p).squeeze(2)

    def make_worker():
        return _Worker(batch * n_heads * min(block, n_query) * _key_span(block, n_key, window),
                       (batch, n_heads, n_key), q.device, None)

    workers = _for_blocks(n_query, block, fill, make_worker, q.device.type == "cpu")
    counts = visible_row_counts(batch, n_query, n_key, causal, q_offset, key_valid, query_valid, q.device, window)
    return ColumnStats(sum(w.col_sum for w in workers), counts)
