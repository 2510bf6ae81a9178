"""Measuring one calibrated head on the rows its edit can change.

Calibrating head ``h`` of layer ``l`` (:class:`~headlab.surgeon.Calibrate`) rescales the weights
that head gives its sink keys; a row that sees none of them keeps its weights. In a causal model
the rows of a sequence before its first sink (at that head) therefore keep their unedited values
at every layer, and so do their keys, values and next-token logits. :class:`SuffixScorer` keeps,
from one unedited pass, every sequence's keys, values and residual stream at every layer and the
log-probabilities of its choice tokens; it measures a head by running only each sequence's rows from its first sink
on, from layer ``l`` (the stream entering it kept by :class:`~.prefix.LayerPrefix`), continuing the
unedited cache with the sink sets of the whole sequence pinned. A sequence without sinks keeps its
unedited scores. The choices of an example share their context: where they find the same sinks
in it, its edited rows run once and each choice continues them. The heads of one layer are
measured side by side, each batch row calibrating its own head, and runs that start at similar
rows go together (:func:`group_by_first_row`).

The scores equal those of a whole forward under the same plan up to fp32 rounding (the same sums
in other groupings and shapes), not bit for bit. Needs a causal model whose cache holds the whole
sequence at every layer; :class:`~headlab.core.errors.UnsupportedModelError` otherwise.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers.cache_utils import DynamicCache

from ...core.errors import UnsupportedModelError
from ...core.shape import model_shape, text_config
from ..edits.calibrate import Calibrate
from ..hook import attach
from ..kv_cache import ReservedLayer, full_attention_only
from ..plan import Plan
from ..request import RequestState
from ..sites import announcing_layers, attention_modules, has_causal_attention
from .accuracy import ChoiceBatch, output_at
from .prefix import LayerPrefix, Reached, handing_through, require_tensor_output

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


@dataclass
class _Example:
    """The sequences of one example (its choices), which share their first ``n_context`` tokens."""

    n_context: int
    sequences: list[int]


@dataclass
class _Context:
    """An example's context rows under one head, run once: its keys and values from row ``first``
    on, per layer from the kept one ``[kv_heads, n, head_dim]``, and the logits ``[vocab]`` (with
    their log-sum-exp) that score each choice's first token."""

    first: int
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    logits: torch.Tensor
    normaliser: torch.Tensor

    def log_probability(self, target: torch.Tensor) -> torch.Tensor:
        return self.logits[target] - self.normaliser


@dataclass
class _Run:
    """Rows ``first .. end - 1`` of sequence ``sequence`` under the head in ``slot``, continuing its
    unedited rows or, with ``context``, its example's edited context."""

    sequence: int
    slot: int
    first: int
    end: int
    context: _Context | None = None


class SuffixScorer:
    """Choice scores under calibrated heads, each alone, from the rows its edit can change (see the module).

    Sequences are held in the order of ``batches``' rows: ``ids [S, N]`` (N: the widest batch),
    ``lengths [S]`` and, per layer, the unedited ``keys``/``values [S, kv_heads, N, head_dim]``.
    ``progress``: a bar over the batches of the unedited pass."""

    def __init__(self, model, batches: list[ChoiceBatch], prefix: LayerPrefix, n_examples: int,
                 cache_budget: int = CACHE_BUDGET_BYTES, progress: bool = False):
        _require_supported(model, batches, cache_budget)
        self.model, self.batches, self.prefix, self.n_examples = model, batches, prefix, n_examples
        self.ids = _stacked([batch.input_ids for batch in batches], 1)
        self.lengths = torch.cat([batch.attention_mask.sum(-1) for batch in batches])
        self.sequences, self.caches = self._unedited_pass(progress)
        self.examples = self._examples()
        self._states: tuple[int, torch.Tensor] | None = None  # the kept stream entering a layer: [S, N, d_model]

    def scores(self, edit: Calibrate) -> list[list[float]]:
        """Sum of each choice's token log-probabilities under ``edit`` alone, per example and choice
        (as :func:`~.accuracy.score_batches` under ``Plan([edit])``). Needs :attr:`prefix` at the
        edit's layer."""
        return self.layer_scores([edit])[0]

    @torch.no_grad()
    def layer_scores(self, edits: list[Calibrate],
                     status: Callable[[str], None] | None = None) -> list[list[list[float]]]:
        """:meth:`scores` of each of ``edits``: one head each, all of :attr:`prefix`'s layer, alike
        otherwise. The heads run side by side: a batch row calibrates its own head (the others' sink
        sets pinned empty, which leaves their weights as they are). Where the choices of an example
        find the same sinks in its context, the context's edited rows run once for all of them.
        ``status`` hears each forward, and each block of it, as it starts (:func:`~..sites.announcing_layers`)."""
        together = _together(edits, self.prefix.layer)
        layer = f"layer {together.layer}, {len(edits)} head{'s' if len(edits) != 1 else ''}"
        if status is not None:
            status(f"{layer}: their sinks")
        sinks = self._sink_sets(together)  # [S, h, N], h: the edits' heads in order
        positions = torch.arange(sinks.shape[-1])
        first = torch.where(sinks, positions, sinks.shape[-1]).amin(-1)  # [S, h]: the first row each edit changes
        terms = {}  # (sequence, slot) -> {scored position: log-probability}, for the pairs the edit changes
        with attach(self.model, Plan([together])) as session:
            contexts = {}  # (example, slot) -> _Context
            groups = _grouped(self._shared_contexts(sinks, first))
            for number, (start, runs) in enumerate(groups, 1):
                forward = f"{layer}: shared contexts, forward {number} of {len(groups)}"
                with announcing_layers(self.model, status, forward):
                    computed = self._run_contexts(session, together, runs, start, sinks)
                for run, context in zip(runs, computed):
                    contexts[self.sequences[run.sequence].example, run.slot] = context
            groups = _grouped(self._choice_runs(first, contexts))
            for number, (start, runs) in enumerate(groups, 1):
                forward = f"{layer}: choices, forward {number} of {len(groups)}"
                with announcing_layers(self.model, status, forward):
                    self._run_choices(session, together, runs, start, sinks, terms)
        self._add_context_terms(contexts, terms)
        totals = [[float(s.unedited.sum()) for s in self.sequences] for _ in edits]
        for (index, slot), scored in terms.items():
            sequence = self.sequences[index]
            values = [scored.get(p, sequence.unedited[t]) for t, p in enumerate(sequence.positions)]
            totals[slot][index] = float(torch.stack(values).sum())
        return [self._per_example(per_edit) for per_edit in totals]

    def _add_context_terms(self, contexts: dict, terms: dict) -> None:
        """Each choice's first token's log-probability from its example's shared context, where no
        choice run that started earlier recomputed it."""
        for (example, slot), context in contexts.items():
            position = self.examples[example].n_context - 1
            for index in self.examples[example].sequences:
                scored = terms.setdefault((index, slot), {})
                if position not in scored:
                    scored[position] = context.log_probability(self.sequences[index].targets[0])

    def unedited_scores(self) -> list[list[float]]:
        """The choice scores without edits, per example and choice (as :func:`~.accuracy.score_batches`)."""
        return self._per_example([float(s.unedited.sum()) for s in self.sequences])

    def _examples(self) -> list[_Example | None]:
        """Per example, its sequences if they share the tokens before their first scored position."""
        members: list[list[int]] = [[] for _ in range(self.n_examples)]
        for index, sequence in enumerate(self.sequences):
            members[sequence.example].append(index)
        examples = []
        for indices in members:
            n_context = self.sequences[indices[0]].positions[0] + 1
            same = all(self.sequences[i].positions[0] + 1 == n_context for i in indices) and bool(
                (self.ids[indices, :n_context] == self.ids[indices[0], :n_context]).all())
            examples.append(_Example(n_context, indices) if same else None)
        return examples

    def _per_example(self, totals: list[float]) -> list[list[float]]:
        per_example: list[list[float]] = [[] for _ in range(self.n_examples)]
        for sequence, total in zip(self.sequences, totals):
            per_example[sequence.example].append(total)
        return per_example

    @torch.no_grad()
    def _unedited_pass(self, progress: bool = False) -> tuple[list[_Sequence], list[tuple[torch.Tensor, torch.Tensor]]]:
        """Every sequence's unedited scoring, and per layer every sequence's keys and values; the
        stream entering each layer goes to :attr:`prefix` (its ``known`` streams)."""
        sequences, caches, streams = [], [], []
        checks = [block.register_forward_hook(require_tensor_output) for block in self.prefix.blocks]
        bar = tqdm(self.batches, desc="unedited pass", unit="batch", leave=False, disable=not progress)
        try:
            with announcing_layers(self.model, bar.set_postfix_str if progress else None):
                outputs = [output_at(self.model, {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                                                  "use_cache": True, "output_hidden_states": True}, batch.read)
                           for batch in bar]
        finally:
            for check in checks:
                check.remove()
        for batch, out in zip(self.batches, outputs):
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

    def _shared_contexts(self, sinks: torch.Tensor, first: torch.Tensor) -> list[_Run]:
        """The context rows to run once per example and head: where the example's choices share
        their context tokens, find the same sinks there and the first of them lies in it."""
        runs = []
        for example in self.examples:
            if example is None:
                continue
            lead, n_context = example.sequences[0], example.n_context
            for slot in range(sinks.shape[1]):
                row = int(first[lead, slot])
                context_sinks = sinks[example.sequences, slot, :n_context]
                if row < n_context and bool((context_sinks == context_sinks[0]).all()):
                    runs.append(_Run(lead, slot, row, n_context))
        return runs

    def _choice_runs(self, first: torch.Tensor, contexts: dict) -> list[_Run]:
        """The rows each (sequence, head) pair runs: after its example's shared context where there
        is one, else from its first sink, up to its last scored row."""
        runs = []
        for index, sequence in enumerate(self.sequences):
            end = int(self.lengths[index]) - 1
            for slot in range(first.shape[1]):
                context = contexts.get((sequence.example, slot))
                row = self.examples[sequence.example].n_context if context is not None else int(first[index, slot])
                if row < end:
                    runs.append(_Run(index, slot, row, end, context))
        return runs

    def _run_contexts(self, session, together: Calibrate, runs: list[_Run], start: int,
                      sinks: torch.Tensor) -> list[_Context]:
        """Run the shared context rows of ``runs``; their edited keys and values and the logits
        scoring the first choice token."""
        logits, read, rooms = self._forward_runs(session, together, runs, start, sinks)
        contexts = []
        for g, run in enumerate(runs):
            row_logits = logits[g, read.index(run.end - 1)]
            contexts.append(_Context(run.first, [keys[g, :, run.first:run.end] for keys, _ in rooms],
                                     [values[g, :, run.first:run.end] for _, values in rooms],
                                     row_logits, torch.logsumexp(row_logits, -1)))
        return contexts

    def _run_choices(self, session, together: Calibrate, runs: list[_Run], start: int, sinks: torch.Tensor,
                     terms: dict) -> None:
        """Run ``runs`` and note the log-probabilities they score in ``terms``."""
        logits, read, _ = self._forward_runs(session, together, runs, start, sinks)
        normalisers = torch.logsumexp(logits, -1)  # [G, K]: a log-probability is a logit minus its row's
        where = {p: k for k, p in enumerate(read)}
        for g, run in enumerate(runs):
            sequence = self.sequences[run.sequence]
            scored = terms.setdefault((run.sequence, run.slot), {})
            for target, position in zip(sequence.targets.tolist(), sequence.positions):
                if start <= position < run.end:
                    scored[position] = logits[g, where[position], target] - normalisers[g, where[position]]

    def _forward_runs(self, session, together: Calibrate, runs: list[_Run], start: int, sinks: torch.Tensor):
        """Rows ``start .. run.end - 1`` of every run from the layer on, each batch row calibrating
        its run's head, after the run's first ``start`` positions (unedited, or its context's).
        Returns the float logits ``[G, K, vocab]`` at the scored positions ``read [K]`` (absolute)
        and, per layer from the kept one, the cache's keys and values ``[G, kv_heads, n, head_dim]``."""
        rows = torch.tensor([run.sequence for run in runs])
        slots = torch.tensor([run.slot for run in runs])
        ends = torch.tensor([run.end for run in runs])
        width = int(ends.max()) - start  # rows run
        mask = (torch.arange(start + width) < ends[:, None]).long()  # [G, start + width]
        pinned = torch.zeros(len(runs), sinks.shape[1], start + width, dtype=torch.bool)
        pinned[torch.arange(len(runs)), slots] = sinks[rows, slots, :start + width]
        session.continue_request(RequestState(n_prompt=start + width, prompt_keys=mask.bool(),
                                              frozen={together.state_key(): pinned}), start)
        read = sorted({p for run in runs for p in self.sequences[run.sequence].positions if start <= p < run.end})
        cache = self._cache(runs, start, width)
        inputs = {"input_ids": self.ids[rows, start:start + width], "attention_mask": mask,
                  "past_key_values": cache, "use_cache": True}
        keep = torch.tensor(read) - start
        if self.prefix.states is None:
            logits = output_at(self.model, inputs, keep).logits
        else:
            with handing_through(self.prefix.blocks[: self.prefix.layer], self._kept_states()[rows, start:start + width]):
                logits = output_at(self.model, inputs, keep).logits
        return logits.float(), read, [layer.room for layer in cache.layers[self.prefix.layer:]]

    def _kept_states(self) -> torch.Tensor:
        """The kept stream entering :attr:`prefix`'s layer, ``[S, N, d_model]``."""
        if self._states is None or self._states[0] != self.prefix.layer:
            self._states = (self.prefix.layer, _stacked(self.prefix.states, 1))
        return self._states[1]

    def _cache(self, runs: list[_Run], start: int, width: int) -> DynamicCache:
        """A cache holding each run's first ``start`` positions (unedited, or from its context's edited
        rows on) at the kept layer and above, with room for ``width`` more written in place; the
        layers below (handed through, never read) hold zeros of that length without memory."""
        rows = torch.tensor([run.sequence for run in runs])
        cache = DynamicCache(config=self.model.config)
        for number in range(len(cache.layers)):
            keys, values = self.caches[number]
            if number < self.prefix.layer:
                zeros = keys.new_zeros(()).expand(len(runs), keys.shape[1], start, keys.shape[-1])
                cache.layers[number] = ReservedLayer.holding(zeros, zeros, start)
                continue
            room = tuple(t.new_empty(len(runs), t.shape[1], start + width, t.shape[-1]) for t in (keys, values))
            room[0][:, :, :start], room[1][:, :, :start] = keys[rows, :, :start], values[rows, :, :start]
            for g, run in enumerate(runs):
                if run.context is not None and run.context.first < start:
                    edited = number - self.prefix.layer
                    taken = start - run.context.first
                    room[0][g, :, run.context.first:start] = run.context.keys[edited][:, :taken]
                    room[1][g, :, run.context.first:start] = run.context.values[edited][:, :taken]
            cache.layers[number] = ReservedLayer.holding(*room, start)
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
        widest = 0
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


def _grouped(runs: list[_Run]) -> list[tuple[int, list[_Run]]]:
    """``runs`` in forwards ``(start, runs)`` (:func:`group_by_first_row`)."""
    groups = group_by_first_row([(run.first, run.end - run.first) for run in runs])
    return [(start, [runs[m] for m in members]) for start, members in groups]


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
                                    f"{needed / 2**30:.1f} GiB, over the budget of {budget / 2**30:.1f} GiB")
