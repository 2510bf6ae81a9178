"""Measuring one calibrated head on the rows its edit can change.

Calibrating head ``h`` of layer ``l`` (:class:`~headlab.surgeon.Calibrate`) rescales the weights
that head gives its sink keys; a row that sees none of them keeps its weights. In a causal model
the rows of a sequence before its first sink (at that head) therefore keep their unedited values
at every layer, and so do their keys, values and next-token logits. :class:`SuffixScorer` keeps,
from one unedited pass, every sequence's keys, values and residual stream at every layer and the
log-probabilities of its choice tokens; it measures a head by running only each sequence's rows from its first sink
on, from layer ``l`` (the stream entering it kept by :class:`~.prefix.LayerPrefix`), continuing the
unedited cache with the sink sets of the whole sequence pinned. A sequence without sinks keeps its
unedited scores. The heads of one layer are measured side by side, each batch row calibrating its
own head, and (sequence, head) pairs whose first sinks sit at similar positions run together
(:func:`group_by_first_row`).

The scores equal those of a whole forward under the same plan up to fp32 rounding (the same sums
in other groupings and shapes), not bit for bit. Needs a causal model whose cache holds the whole
sequence at every layer; :class:`~headlab.errors.UnsupportedModelError` otherwise.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache

from ..edit_kinds import Calibrate
from ..errors import UnsupportedModelError
from ..hook import attach
from ..kv_cache import ReservedLayer, full_attention_only
from ..plan import Plan
from ..request import RequestState
from ..shape import model_shape, text_config
from ..sites import attention_modules, has_causal_attention
from .evaluate import ChoiceBatch, output_at
from .prefix import LayerPrefix, Reached, handing_through

CACHE_BUDGET_BYTES = 3 * 2**30  # the unedited keys, values and stream kept for every sequence at every layer
GROUP_COST_ROWS = 64  # a forward's fixed cost in rows: groups merge while padding costs less
GROUP_MAX_ROWS = 1024  # rows of one grouped forward (its activations stay small)


@dataclass
class _Sequence:
    """How one choice sequence of the search is scored: ``positions``, the positions whose
    next-token logits score its choice tokens ``targets [T]``, and ``unedited [T]``, those
    log-probabilities without edits."""

    example: int
    positions: list[int]
    targets: torch.Tensor
    unedited: torch.Tensor


class SuffixScorer:
    """Choice scores under calibrated heads, each alone, from the rows its edit can change (see the module).

    Sequences are held in the order of ``batches``' rows: ``ids [S, N]`` (N: the widest batch),
    ``lengths [S]`` and, per layer, the unedited ``keys``/``values [S, kv_heads, N, head_dim]``."""

    def __init__(self, model, batches: list[ChoiceBatch], prefix: LayerPrefix, n_examples: int,
                 cache_budget: int = CACHE_BUDGET_BYTES):
        _require_supported(model, batches, cache_budget)
        self.model, self.batches, self.prefix, self.n_examples = model, batches, prefix, n_examples
        self.ids = _stacked([batch.input_ids for batch in batches], 1)
        self.lengths = torch.cat([batch.attention_mask.sum(-1) for batch in batches])
        self.sequences, self.caches = self._unedited_pass()
        self._states: tuple[int, torch.Tensor] | None = None  # the kept stream entering a layer: [S, N, d_model]

    def scores(self, edit: Calibrate) -> list[list[float]]:
        """Sum of each choice's token log-probabilities under ``edit`` alone, per example and choice
        (as :func:`~.evaluate.score_batches` under ``Plan([edit])``). Needs :attr:`prefix` at the
        edit's layer."""
        return self.layer_scores([edit])[0]

    @torch.no_grad()
    def layer_scores(self, edits: list[Calibrate]) -> list[list[list[float]]]:
        """:meth:`scores` of each of ``edits``: one head each, all of :attr:`prefix`'s layer, alike
        otherwise. The heads run side by side: a batch row calibrates its own head (the others' sink
        sets pinned empty, which leaves their weights as they are)."""
        together = _together(edits, self.prefix.layer)
        sinks = self._sink_sets(together)  # [S, h, N], h: the edits' heads in order
        positions = torch.arange(sinks.shape[-1])
        first = torch.where(sinks, positions, sinks.shape[-1]).amin(-1)  # [S, h]: the first row each edit changes
        affected = (first < self.lengths[:, None] - 1).nonzero().tolist()  # (sequence, head slot) where it is scored
        totals = [[float(s.unedited.sum()) for s in self.sequences] for _ in edits]
        with attach(self.model, Plan([together])) as session:
            runs = [(int(first[i, k]), int(self.lengths[i]) - 1 - int(first[i, k])) for i, k in affected]
            for start, members in group_by_first_row(runs):
                chosen = [affected[m] for m in members]
                for (index, slot), total in zip(chosen, self._run_group(session, together, chosen, start, sinks)):
                    totals[slot][index] = total
        return [self._per_example(per_edit) for per_edit in totals]

    def unedited_scores(self) -> list[list[float]]:
        """The choice scores without edits, per example and choice (as :func:`~.evaluate.score_batches`)."""
        return self._per_example([float(s.unedited.sum()) for s in self.sequences])

    def _per_example(self, totals: list[float]) -> list[list[float]]:
        per_example: list[list[float]] = [[] for _ in range(self.n_examples)]
        for sequence, total in zip(self.sequences, totals):
            per_example[sequence.example].append(total)
        return per_example

    @torch.no_grad()
    def _unedited_pass(self) -> tuple[list[_Sequence], list[tuple[torch.Tensor, torch.Tensor]]]:
        """Every sequence's unedited scoring, and per layer every sequence's keys and values; the
        stream entering each layer goes to :attr:`prefix` (:attr:`~.prefix.LayerPrefix.known`)."""
        sequences, caches, streams = [], [], []
        for batch in self.batches:
            inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "use_cache": True,
                      "output_hidden_states": True}
            out = output_at(self.model, inputs, batch.read)
            logprobs = torch.log_softmax(out.logits.float(), -1)  # [B, K, vocab]
            caches.append([(layer.keys, layer.values) for layer in out.past_key_values.layers])
            streams.append(out.hidden_states[1:len(caches[-1])])  # entering layers 1 .. L-1
            for row, (example, targets, at) in enumerate(batch.rows):
                unedited = logprobs[row, at].gather(-1, targets[:, None]).squeeze(-1)
                sequences.append(_Sequence(example, batch.read[at].tolist(), targets, unedited))
        for layer in range(1, len(caches[0])):
            self.prefix.known[layer] = [per_batch[layer - 1] for per_batch in streams]
        return sequences, [tuple(_stacked([per_batch[layer][i] for per_batch in caches], 2) for i in range(2))
                           for layer in range(len(caches[0]))]

    def _sink_sets(self, edit: Calibrate) -> torch.Tensor:
        """``[S, h, N]`` bool: the keys ``edit`` finds as sinks for each of its heads in each whole
        sequence, from the kept stream through the layer's attention only."""
        found = []
        stop = attention_modules(self.model)[edit.layer].register_forward_hook(_stop)
        try:
            with attach(self.model, Plan([edit])) as session:
                for index, batch in enumerate(self.batches):
                    try:
                        self.prefix.forward(index, batch)
                    except Reached:
                        pass
                    found.append(session.state.frozen_for(edit))  # [B, h, N_batch]
        finally:
            stop.remove()
        return _stacked(found, 2)

    def _run_group(self, session, together: Calibrate, chosen: list[list[int]], start: int,
                   sinks: torch.Tensor) -> list[float]:
        """Run rows ``start ..`` of the ``chosen`` (sequence, head slot) pairs (each up to its last
        scored row) from the layer on, after their unedited first ``start`` positions, each row
        calibrating its own head; their totals."""
        rows = torch.tensor([index for index, _ in chosen])
        slots = torch.tensor([slot for _, slot in chosen])
        width = int(self.lengths[rows].max()) - 1 - start  # rows run
        mask = (torch.arange(start + width) < self.lengths[rows, None] - 1).long()  # [G, start + width]
        pinned = torch.zeros(len(chosen), sinks.shape[1], start + width, dtype=torch.bool)
        pinned[torch.arange(len(chosen)), slots] = sinks[rows, slots, :start + width]
        session.continue_request(RequestState(n_prompt=start + width, prompt_keys=mask.bool(),
                                              frozen={together.state_key(): pinned}), start)
        read = sorted({p - start for i in rows.tolist() for p in self.sequences[i].positions if p >= start})
        logits = self._forward(rows, mask, start, width, torch.tensor(read))
        logits = logits.float()  # [G, K, vocab]
        normalisers = torch.logsumexp(logits, -1)  # [G, K]: a log-probability is a logit minus its row's
        where = {p + start: k for k, p in enumerate(read)}
        totals = []
        for g, sequence in enumerate(self.sequences[i] for i in rows.tolist()):
            fresh = [t for t, p in enumerate(sequence.positions) if p >= start]
            at = torch.tensor([where[sequence.positions[t]] for t in fresh], dtype=torch.long)
            edited = logits[g, at].gather(-1, sequence.targets[fresh][:, None])[:, 0] - normalisers[g, at]
            totals.append(float(sequence.unedited[: fresh[0]].sum()) + float(edited.sum()))
        return totals

    def _forward(self, rows: torch.Tensor, mask, start: int, width: int, read: torch.Tensor) -> torch.Tensor:
        """Logits ``[G, K, vocab]`` at ``read`` (relative to ``start``) of the sequences ``rows``,
        the blocks below the kept layer handing through the kept stream of those rows."""
        inputs = {"input_ids": self.ids[rows, start:start + width], "attention_mask": mask,
                  "past_key_values": self._cache(rows, start, width) if start else None, "use_cache": bool(start)}
        if self.prefix.states is None:
            return output_at(self.model, inputs, read).logits
        with handing_through(self.prefix.blocks[: self.prefix.layer], self._kept_states()[rows, start:start + width]):
            return output_at(self.model, inputs, read).logits

    def _kept_states(self) -> torch.Tensor:
        """The kept stream entering :attr:`prefix`'s layer, ``[S, N, d_model]``."""
        if self._states is None or self._states[0] != self.prefix.layer:
            self._states = (self.prefix.layer, _stacked(self.prefix.states, 1))
        return self._states[1]

    def _cache(self, rows: torch.Tensor, start: int, width: int) -> DynamicCache:
        """A cache holding the unedited first ``start`` positions of the sequences ``rows`` at the
        kept layer and above, with room for ``width`` more written in place; the layers below (handed
        through, never read) hold zeros of that length without memory."""
        cache = DynamicCache(config=self.model.config)
        for number in range(len(cache.layers)):
            keys, values = self.caches[number]
            layer = ReservedLayer(0)
            if number >= self.prefix.layer:
                room = tuple(t.new_empty(len(rows), t.shape[1], start + width, t.shape[-1]) for t in (keys, values))
                room[0][:, :, :start], room[1][:, :, :start] = keys[rows, :, :start], values[rows, :, :start]
                layer._room = room
                layer.keys, layer.values = room[0][:, :, :start], room[1][:, :, :start]
            else:
                layer.keys = layer.values = keys.new_zeros(()).expand(len(rows), keys.shape[1], start, keys.shape[-1])
            layer.dtype, layer.device, layer.is_initialized = keys.dtype, keys.device, True
            cache.layers[number] = layer
        return cache


def group_by_first_row(items: list[tuple[int, int]], cost_rows: int = GROUP_COST_ROWS,
                       max_rows: int = GROUP_MAX_ROWS) -> list[tuple[int, list[int]]]:
    """Partition sequences ``(first row to run, rows from there)`` into forwards ``(start, member
    indices)``: each member runs from ``start``, the group's earliest first row, for as many rows as
    its longest member. Minimises rows run plus ``cost_rows`` per forward, over groups of sequences
    adjacent in first-row order, at most ``max_rows`` rows each (a longer sequence runs alone)."""
    order = sorted(range(len(items)), key=lambda i: (items[i][0], items[i][1]))
    best = [0.0] + [float("inf")] * len(order)  # best[j]: cost of the first j sequences in order
    cut = [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        start, widest = items[order[j - 1]][0], 0
        for i in range(j - 1, -1, -1):  # the group order[i:j], which starts at the first row of order[i]
            first, rows = items[order[i]]
            widest = max(widest, rows + first)
            size = (j - i) * (widest - first)
            if size > max_rows and i < j - 1:
                break
            if best[i] + cost_rows + size < best[j]:
                best[j], cut[j] = best[i] + cost_rows + size, i
    groups, j = [], len(order)
    while j:
        i = cut[j]
        groups.append((items[order[i]][0], order[i:j]))
        j = i
    return groups[::-1]


def _stacked(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
    """``tensors`` (per batch, rows first) concatenated by row, dimension ``dim`` padded to the widest with zeros."""
    width = max(t.shape[dim] for t in tensors)
    padded = []
    for t in tensors:
        pad = [0, 0] * (t.dim() - 1 - dim) + [0, width - t.shape[dim]]
        padded.append(F.pad(t, pad))
    return torch.cat(padded)


def _together(edits: list[Calibrate], layer: int) -> Calibrate:
    """One edit over the heads of ``edits`` (in their order), which must each name one head of
    ``layer`` and otherwise agree."""
    if not edits:
        raise ValueError("no edits to measure")
    heads = [head for edit in edits for head in edit.heads]
    together = dataclasses.replace(edits[0], heads=tuple(heads))
    if any(len(edit.heads) != 1 or dataclasses.replace(edit, heads=together.heads) != together for edit in edits):
        raise ValueError("each edit must name one head, and the edits may differ in their head only")
    if len(set(heads)) != len(heads):
        raise ValueError(f"heads {heads} repeat")
    if layer != together.layer:
        raise ValueError(f"the kept stream enters layer {layer}, the edits are on layer {together.layer}")
    return together


def _stop(module, args, output):
    raise Reached


def _require_supported(model, batches: list[ChoiceBatch], budget: int) -> None:
    if not has_causal_attention(model):
        raise UnsupportedModelError("rows before an edit stay unedited only under causal attention")
    if not full_attention_only(model):
        raise UnsupportedModelError("continuing an unedited cache needs every layer to hold the whole sequence")
    shape = model_shape(model)
    dtype = next(model.parameters()).dtype
    positions = sum(len(b.rows) for b in batches) * max(b.input_ids.shape[1] for b in batches)
    width = 2 * shape.n_kv_heads * shape.head_dim + text_config(model.config).hidden_size  # keys, values, stream
    needed = shape.n_layers * width * positions * dtype.itemsize
    if needed > budget:
        raise UnsupportedModelError(f"the unedited cache and stream of every sequence would take "
                                    f"{needed / 2**30:.1f} GiB")
