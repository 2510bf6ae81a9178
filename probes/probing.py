"""Linear probing of per-head outputs (SPEC §4.6 importance family): how well a logistic regression
on one head's output predicts a user's labels, cross-validated. The only module that imports
scikit-learn."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm.auto import tqdm

from ..surgeon import Taps, attach, model_shape
from ..surgeon.errors import InputFileError
from ..surgeon.files import read_jsonl
from ..surgeon.settings import Kind, Text, check_object
from ..surgeon.stopping import run_for_taps
from .settings import POOLS

FOLDS = 5  # cross-validation folds of the probes



@dataclass
class ProbeResult:
    """``accuracy``: ``[layer, head]`` mean cross-validated accuracy; ``majority``: the accuracy of
    always answering the most frequent label (the chance line); ``labels``: the classes, sorted."""

    accuracy: torch.Tensor
    majority: float
    labels: list
    n_examples: int
    settings: dict


class _Label(Kind):
    """A class label: a non-empty string or an integer (not a boolean or a fraction)."""

    def check(self, value):
        if isinstance(value, str) and value.strip():
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{value!r} is not a class label (a string or an integer)")


def load_labelled(path: str | Path, folds: int = FOLDS) -> list[tuple[str, object]]:
    """Read a JSON-lines file of ``{"text": ..., "label": ...}`` objects, one per line, checked:
    non-empty texts, labels that are strings or integers, at least two classes and ``folds``
    examples of each (the probe is cross-validated in that many folds)."""
    examples = []
    for number, item in read_jsonl(path, "labelled data"):
        line = check_object(item, f"{path}:{number}", {"text": Text(), "label": _Label()})
        examples.append((line["text"], line["label"]))
    counts = Counter(label for _, label in examples)
    if len(counts) < 2:
        raise InputFileError(f"{path} holds {len(counts)} class(es); a probe needs at least two labels")
    rare = sorted((str(label) for label, n in counts.items() if n < folds))
    if rare:
        raise InputFileError(f"{path}: label(s) {rare} have fewer than {folds} examples, the folds of the "
                             "cross-validation")
    return examples


@torch.no_grad()
def head_features(model, tokenizer, texts: Sequence[str], pool: str = "last", max_tokens: int = 512,
                  progress: bool = False) -> np.ndarray:
    """``[n_texts, layer, head, head_dim]`` per-head outputs (the input of ``o_proj``) at the last
    token (``pool="last"``) or averaged over tokens (``"mean"``), texts truncated to ``max_tokens``."""
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    layers = range(model_shape(model).n_layers)
    rows = []
    for text in tqdm(texts, desc="head outputs", disable=not progress, leave=False):
        ids = torch.tensor([tokenizer(text).input_ids[:max_tokens]])
        with attach(model, taps=Taps(head_outputs=layers)) as session:
            run_for_taps(model, input_ids=ids)
        outputs = torch.stack([session.recording.head_output(layer)[0] for layer in layers])  # [L, seq, H, D]
        rows.append((outputs[:, -1] if pool == "last" else outputs.mean(1)).float().numpy())
    return np.stack(rows)


def probe_heads(model, tokenizer, examples: Sequence[tuple[str, object]], pool: str = "last", folds: int = FOLDS,
                seed: int = 0, max_tokens: int = 512, progress: bool = False) -> ProbeResult:
    """Cross-validated accuracy of an L2-regularised logistic regression (standardised inputs)
    on each head's output, with ``folds`` stratified shuffled folds."""
    labels = [label for _, label in examples]
    counts = Counter(labels)
    if len(counts) < 2:
        raise ValueError(f"probing needs at least two labels, got {sorted(map(str, counts))}")
    if min(counts.values()) < folds:
        raise ValueError(f"every label needs at least {folds} examples for {folds}-fold cross-validation; "
                         f"counts: {dict(counts)}")
    features = head_features(model, tokenizer, [text for text, _ in examples], pool, max_tokens, progress)
    n_layers, n_heads = features.shape[1:3]
    target = np.array([sorted(counts, key=str).index(label) for label in labels])
    splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
    accuracy = torch.zeros(n_layers, n_heads)
    heads = [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
    for layer, head in tqdm(heads, desc="probing heads", disable=not progress, leave=False):
        classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        accuracy[layer, head] = cross_val_score(classifier, features[:, layer, head], target, cv=splitter).mean()
    settings = {"pool": pool, "folds": folds, "seed": seed, "max_tokens": max_tokens,
                "classifier": "StandardScaler + LogisticRegression(C=1, L2)"}
    return ProbeResult(accuracy, max(counts.values()) / len(labels), sorted(counts, key=str), len(labels), settings)
