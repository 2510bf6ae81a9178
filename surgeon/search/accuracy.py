"""Multiple-choice evaluation by choice log-probability, with or without an edit plan."""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..hook import attach
from ..plan import Plan
from .tasks import Example


@dataclass
class EvalResult:
    """Accuracy over ``n`` examples; ``correct`` per example."""

    accuracy: float
    n: int
    correct: list[bool]

    def to_dict(self) -> dict:
        return {"accuracy": self.accuracy, "n": self.n, "n_correct": sum(self.correct)}


@dataclass
class ChoiceBatch:
    """Right-padded ``(context + choice)`` sequences, ``input_ids`` and ``attention_mask`` ``[B, N]``.

    ``read [K]``: the positions whose next-token logits score a choice token, over all rows;
    ``rows``: per row, ``(example index, choice token ids [T], their logits' indices into read [T])``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    read: torch.Tensor
    rows: list[tuple[int, torch.Tensor, torch.Tensor]]


Forward = Callable[[int, ChoiceBatch], torch.Tensor]  # (batch index, batch) -> logits [B, K, vocab] at batch.read


def _sequences(tokenizer, example: Example) -> list[tuple[list[int], int]]:
    """``(ids, n_context)`` per choice: context tokens then the choice's tokens."""
    context = tokenizer(example.context()).input_ids
    return [(context + tokenizer(choice, add_special_tokens=False).input_ids, len(context)) for choice in example.choices]


def choice_batches(tokenizer, examples: list[Example], batch_size: int = 16) -> list[ChoiceBatch]:
    """Every choice of every example as one sequence, in order, ``batch_size`` sequences per batch."""
    items = [(i, ids, n_ctx) for i, ex in enumerate(examples) for ids, n_ctx in _sequences(tokenizer, ex)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        width = max(len(ids) for _, ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, (_, ids, _) in enumerate(chunk):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
        read = sorted({p for _, ids, n_ctx in chunk for p in range(n_ctx - 1, len(ids) - 1)})
        where = {p: k for k, p in enumerate(read)}
        rows = [(index, torch.tensor(ids[n_ctx:]), torch.tensor([where[p] for p in range(n_ctx - 1, len(ids) - 1)]))
                for index, ids, n_ctx in chunk]
        batches.append(ChoiceBatch(input_ids, mask, torch.tensor(read, dtype=torch.long), rows))
    return batches


def model_forward(model) -> Forward:
    """The plain forward: logits at each batch's ``read`` positions only (see :func:`output_at`)."""

    def forward(index: int, batch: ChoiceBatch) -> torch.Tensor:
        return output_at(model, {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask},
                         batch.read).logits

    return forward


def output_at(model, inputs: dict, positions: torch.Tensor):
    """``model(**inputs)`` with its ``logits [B, K, vocab]`` at ``positions [K]`` only:
    ``logits_to_keep`` where the model takes it, else sliced from the full logits."""
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        return model(**inputs, logits_to_keep=positions)
    out = model(**inputs)
    out.logits = out.logits[:, positions]
    return out


@torch.no_grad()
def score_batches(batches: list[ChoiceBatch], n_examples: int, forward: Forward, progress: bool = False,
                  status: Callable[[str], None] | None = None) -> list[list[float]]:
    """Sum of each choice's token log-probabilities, per example and choice, from ``forward``
    (``progress``: a bar over the batches; ``status`` hears each batch as it starts)."""
    scores: list[list[float]] = [[] for _ in range(n_examples)]
    for index, batch in enumerate(tqdm(batches, desc="scoring", disable=not progress, leave=False)):
        if status is not None:
            status(f"batch {index + 1} of {len(batches)}")
        logprobs = torch.log_softmax(forward(index, batch).float(), -1)  # [B, K, vocab]
        for row, (example, targets, at) in enumerate(batch.rows):
            scores[example].append(logprobs[row, at].gather(-1, targets[:, None].to(logprobs.device)).sum().item())
    return scores


def choice_logprobs(model, tokenizer, examples: list[Example], plan: Plan | None = None,
                    batch_size: int = 16, progress: bool = False) -> list[list[float]]:
    """Sum of the log-probabilities of each choice's tokens after the example's context, per
    example and choice. Sequences are right-padded into batches of ``batch_size``."""
    batches = choice_batches(tokenizer, examples, batch_size)
    with attach(model, plan) if plan is not None and plan.edits else nullcontext():
        return score_batches(batches, len(examples), model_forward(model), progress)


def accuracy(examples: list[Example], scores: list[list[float]]) -> EvalResult:
    """An example is correct when its label's choice has the highest log-probability."""
    correct = [max(range(len(s)), key=s.__getitem__) == ex.label for s, ex in zip(scores, examples)]
    return EvalResult(sum(correct) / len(correct), len(correct), correct)


def evaluate(model, tokenizer, examples: list[Example], plan: Plan | None = None,
             batch_size: int = 16, progress: bool = False) -> EvalResult:
    """Accuracy of ``model`` (under ``plan``) on ``examples``; see :func:`accuracy`."""
    if not examples:
        raise ValueError("no examples to evaluate")
    return accuracy(examples, choice_logprobs(model, tokenizer, examples, plan, batch_size, progress))


def evaluate_tasks(model, tokenizer, examples: dict[str, list[Example]], plan: Plan | None = None,
                   batch_size: int = 16, progress: bool = True) -> dict:
    """Accuracy on each task's ``examples`` without ``plan`` and, when given, with it:
    ``{"format": "headlab-eval/1", "tasks": {task: {"without_plan": ..., "with_plan": ...}}}`` (each an
    :class:`EvalResult` as a dict)."""
    results: dict = {"format": "headlab-eval/1", "tasks": {}}
    for task, items in examples.items():
        row = {"without_plan": evaluate(model, tokenizer, items, batch_size=batch_size, progress=progress).to_dict()}
        if plan is not None:
            row["with_plan"] = evaluate(model, tokenizer, items, plan, batch_size, progress).to_dict()
        results["tasks"][task] = row
    return results
