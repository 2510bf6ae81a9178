"""Windows of real text: the settings group every command that reads text uses (:class:`TextWindows`), the
text available offline (the docstrings of Python's standard library) and token windows of a text.
Importing this module costs no torch."""

from __future__ import annotations

import importlib
import inspect
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import HeadlabError, InputFileError
from .files import read_text_file
from .kinds import Integer, Maybe, TextFile
from .settings import check_settings, setting

if TYPE_CHECKING:
    import torch

STDLIB_MODULES = (
    "argparse", "asyncio", "collections", "contextlib", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "email.message", "fractions", "functools", "heapq", "http.client", "inspect", "itertools",
    "json", "logging", "pathlib", "pickle", "queue", "random", "re", "shutil", "socket", "statistics",
    "string", "subprocess", "tarfile", "textwrap", "threading", "typing", "unittest", "urllib.parse",
    "uuid", "zipfile",
)
# Held out from the scoring text: the masking validation's haystack and windows.
HELDOUT_MODULES = (
    "ast", "base64", "bisect", "calendar", "cmd", "codecs", "configparser", "copy", "doctest", "enum", "fnmatch",
    "ftplib", "gettext", "glob", "gzip", "hashlib", "imaplib", "ipaddress", "locale", "mailbox", "netrc", "numbers",
    "operator", "optparse", "os", "pdb", "platform", "plistlib", "pprint", "pydoc", "sched", "shelve", "shlex",
    "smtplib", "struct", "timeit", "tokenize", "traceback", "types", "warnings", "weakref",
)


@dataclass
class TextWindows:
    """Windows of real text a command reads: ``windows`` windows of ``tokens`` tokens each of the text at
    ``text_path`` (the standard-library docstrings when None). One group of options in every command that
    reads text, each command with its own defaults (a training command's ``windows`` are the held-out
    windows it measures on; its training windows follow from how much it trains); where the windows sit
    is drawn with the command's ``--seed``."""

    windows: int = setting(8, "windows of text (training commands: the held-out windows measured on)",
                           kind=Integer(1), flag="--windows")
    tokens: int = setting(256, "tokens per window", kind=Integer(2), flag="--tokens")
    text_path: str | None = setting(None, "UTF-8 text to read (default: Python standard-library docstrings)",
                                    kind=Maybe(TextFile()), flag="--text-file")

    def __post_init__(self):
        check_settings(self)

    def require_tokens(self, least: int, why: str) -> None:
        """Refuse windows of fewer than ``least`` tokens (``why`` says what needs them)."""
        if self.tokens < least:
            raise HeadlabError(f"--tokens {self.tokens}: {why} needs windows of at least {least} tokens")

    @property
    def source(self) -> str:
        """The text's name for provenance records."""
        return self.text_path or "Python standard-library docstrings"


@lru_cache(maxsize=2)
def stdlib_docstrings(modules: tuple[str, ...] = STDLIB_MODULES) -> str:
    """Docstrings of a fixed list of standard-library modules and their public members, joined
    by blank lines (English prose: about 200 kB for the scoring modules, 150 kB held out; identical
    for a given Python version)."""
    parts = []
    for name in modules:
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


def load_text(path: str | Path | None = None, heldout: bool = False) -> str:
    """The text of ``path`` (UTF-8), or when ``path`` is None the standard-library docstrings (those
    of :data:`HELDOUT_MODULES` with ``heldout``)."""
    if path is None:
        return stdlib_docstrings(HELDOUT_MODULES if heldout else STDLIB_MODULES)
    text = read_text_file(path, "text file")
    if not text.strip():
        raise InputFileError(f"{path} is empty")
    return text


def token_windows(tokenizer, text: str, n_samples: int, n_tokens: int, seed: int = 0) -> list[torch.Tensor]:
    """``n_samples`` windows of ``n_tokens`` token ids (each ``[1, n_tokens]``) at seeded offsets.

    Windows do not overlap; for an encoder tokenizer each window is wrapped in its special tokens
    (so it holds ``n_tokens`` ids in all).
    """
    import torch

    if n_samples < 1 or n_tokens < 2:
        raise ValueError("need at least one sample of at least two tokens")
    prefix, suffix = special_tokens(tokenizer)
    body = n_tokens - len(prefix) - len(suffix)
    if body < 1:
        raise HeadlabError(f"{n_tokens} tokens leave no room for text between the special tokens")
    ids = tokenizer(text, add_special_tokens=False).input_ids
    n_windows = len(ids) // body
    if n_windows < n_samples:
        raise HeadlabError(f"the text holds {len(ids)} tokens: too short for {n_samples} windows of {n_tokens} tokens "
                           "(a longer --text-file, or fewer --windows or --tokens)")
    starts = sorted(random.Random(seed).sample(range(n_windows), n_samples))
    windows = []
    for start in starts:
        chunk = prefix + ids[start * body : (start + 1) * body] + suffix
        windows.append(torch.tensor([chunk]))
    return windows


def text_windows(tokenizer, text: TextWindows, seed: int = 0) -> list[torch.Tensor]:
    """The windows a :class:`TextWindows` group names (each ``[1, tokens]``)."""
    return token_windows(tokenizer, load_text(text.text_path), text.windows, text.tokens, seed)


def train_eval_windows(tokenizer, text_path: str | Path | None, n_train: int, n_eval: int, n_tokens: int,
                       seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``(train, held_out)``: disjoint windows of ``n_tokens`` ids (each ``[1, n_tokens]``) from the
    text of ``text_path`` (the standard-library docstrings when None), the held-out ones spread
    evenly; fewer training windows than asked when the text is short."""
    text = load_text(text_path)
    available = len(tokenizer(text, add_special_tokens=False).input_ids) // n_tokens
    if available < n_eval + 1:
        raise HeadlabError(f"the text holds {available} windows of {n_tokens} tokens; need at least {n_eval + 1}")
    n_train = min(n_train, available - n_eval)
    windows = token_windows(tokenizer, text, n_train + n_eval, n_tokens, seed)
    held_out = set(range(0, n_train + n_eval, max(1, (n_train + n_eval) // n_eval))[:n_eval])
    train = [w for i, w in enumerate(windows) if i not in held_out]
    return train, [windows[i] for i in sorted(held_out)]


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The special ids the tokenizer puts before and after a text (``[CLS]`` / ``[SEP]`` for BERT,
    a BOS for some decoders, nothing for others)."""
    full = list(tokenizer("a").input_ids)
    bare = list(tokenizer("a", add_special_tokens=False).input_ids)
    for start in range(len(full) - len(bare) + 1):
        if full[start:start + len(bare)] == bare:
            return full[:start], full[start + len(bare):]
    raise ValueError("cannot tell the tokenizer's special tokens from its text tokens")
