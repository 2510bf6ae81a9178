"""Multiple-choice evaluation by choice log-probability, with or without an edit plan."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..hook import apply
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


def _sequences(tokenizer, example: Example) -> list[tuple[list[int], int]]:
    """``(ids, n_context)`` per choice: context tokens then the choice's tokens."""
    context = tokenizer(example.context()).input_ids
    return [(context + tokenizer(choice, add_special_tokens=False).input_ids, len(context)) for choice in example.choices]


@torch.no_grad()
def choice_logprobs(model, tokenizer, examples: list[Example], plan: Plan | None = None,
                    batch_size: int = 16, progress: bool = False) -> list[list[float]]:
    """Sum of the log-probabilities of each choice's tokens after the example's context, per
    example and choice. Sequences are right-padded into batches of ``batch_size``."""
    items = [(i, ids, n_ctx) for i, ex in enumerate(examples) for ids, n_ctx in _sequences(tokenizer, ex)]
    scores: list[list[float]] = [[] for _ in examples]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with apply(model, plan) if plan is not None and plan.edits else nullcontext():
        for start in tqdm(range(0, len(items), batch_size), desc="scoring", disable=not progress, leave=False):
            chunk = items[start : start + batch_size]
            width = max(len(ids) for _, ids, _ in chunk)
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for row, (_, ids, _) in enumerate(chunk):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                mask[row, : len(ids)] = 1
            logprobs = torch.log_softmax(model(input_ids=input_ids, attention_mask=mask).logits.float(), -1)
            for row, (index, ids, n_ctx) in enumerate(chunk):
                targets = torch.tensor(ids[n_ctx:])
                picked = logprobs[row, n_ctx - 1 : len(ids) - 1].gather(-1, targets[:, None])
                scores[index].append(picked.sum().item())
    return scores


def evaluate(model, tokenizer, examples: list[Example], plan: Plan | None = None,
             batch_size: int = 16, progress: bool = False) -> EvalResult:
    """Accuracy: an example is correct when its label's choice has the highest log-probability."""
    if not examples:
        raise ValueError("no examples to evaluate")
    scores = choice_logprobs(model, tokenizer, examples, plan, batch_size, progress)
    correct = [max(range(len(s)), key=s.__getitem__) == ex.label for s, ex in zip(scores, examples)]
    return EvalResult(sum(correct) / len(correct), len(correct), correct)


@torch.no_grad()
def heldout_loss(model, windows: list[torch.Tensor]) -> float:
    """Mean next-token cross-entropy (nats) over ``windows`` (each ``[1, seq]``); its exponential
    is the perplexity."""
    if not windows:
        raise ValueError("no windows to evaluate")
    return sum(model(input_ids=ids, labels=ids, use_cache=False).loss.item() for ids in windows) / len(windows)
