"""Real English text available offline: the docstrings of Python's standard library."""

from __future__ import annotations

import importlib
import inspect
import random
from functools import lru_cache
from pathlib import Path

import torch

STDLIB_MODULES = (
    "argparse", "asyncio", "collections", "contextlib", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "email.message", "fractions", "functools", "heapq", "http.client", "inspect", "itertools",
    "json", "logging", "pathlib", "pickle", "queue", "random", "re", "shutil", "socket", "statistics",
    "string", "subprocess", "tarfile", "textwrap", "threading", "typing", "unittest", "urllib.parse",
    "uuid", "zipfile",
)


@lru_cache(maxsize=1)
def stdlib_docstrings() -> str:
    """Docstrings of a fixed list of standard-library modules and their public members, joined
    by blank lines (about a megabyte of English prose; identical for a given Python version)."""
    parts = []
    for name in STDLIB_MODULES:
        module = importlib.import_module(name)
        parts.append(inspect.getdoc(module) or "")
        for attr in sorted(vars(module)):
            obj = getattr(module, attr)
            if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 200:
                parts.append(doc)
    return "\n\n".join(p for p in parts if p)


def load_text(path: str | Path | None = None) -> str:
    """The text of ``path`` (UTF-8), or the standard-library docstrings when ``path`` is None."""
    if path is None:
        return stdlib_docstrings()
    text = Path(path).read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"{path} is empty")
    return text


def token_windows(tokenizer, text: str, n_samples: int, n_tokens: int, seed: int = 0) -> list[torch.Tensor]:
    """``n_samples`` windows of ``n_tokens`` token ids (each ``[1, n_tokens]``) at seeded offsets.

    Windows do not overlap; for an encoder tokenizer each window is wrapped in its special tokens
    (so it holds ``n_tokens`` ids in all).
    """
    if n_samples < 1 or n_tokens < 2:
        raise ValueError("need at least one sample of at least two tokens")
    specials = len(tokenizer.build_inputs_with_special_tokens([])) if _adds_specials(tokenizer) else 0
    body = n_tokens - specials
    ids = tokenizer(text, add_special_tokens=False).input_ids
    n_windows = len(ids) // body
    if n_windows < n_samples:
        raise ValueError(
            f"the text holds {len(ids)} tokens: too short for {n_samples} samples of {n_tokens} tokens"
        )
    starts = sorted(random.Random(seed).sample(range(n_windows), n_samples))
    windows = []
    for start in starts:
        chunk = ids[start * body : (start + 1) * body]
        if specials:
            chunk = tokenizer.build_inputs_with_special_tokens(chunk)
        windows.append(torch.tensor([chunk]))
    return windows


def _adds_specials(tokenizer) -> bool:
    return len(tokenizer("a").input_ids) > len(tokenizer("a", add_special_tokens=False).input_ids)
