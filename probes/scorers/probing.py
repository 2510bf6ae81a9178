"""Linear probing of per-head outputs (docs/methods/probing.md): how well a logistic regression
on one head's output predicts a user's labels, cross-validated; and the head atlas's t-SNE. The only
module that imports scikit-learn."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm.auto import tqdm

from ...core.errors import HeadlabError
from ...surgeon import Taps, attach, model_shape
from ...surgeon.stopping import run_for_taps
from .labelled import FOLDS
from .settings import POOLS


@dataclass
class ProbeResult:
    """``accuracy``: ``[layer, head]`` mean cross-validated accuracy; ``majority``: the accuracy of
    always answering the most frequent label (the chance line); ``labels``: the classes, sorted."""

    accuracy: torch.Tensor
    majority: float
    labels: list
    n_examples: int
    settings: dict


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
        raise HeadlabError(f"probing needs at least two labels, got {sorted(map(str, counts))}")
    if min(counts.values()) < folds:
        raise HeadlabError(f"every label needs at least {folds} examples for {folds}-fold cross-validation; "
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


