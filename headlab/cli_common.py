"""Command-line pieces the subcommands share: the model argument and how it is loaded."""

from __future__ import annotations

import argparse
import re

MODEL_HELP = (
    "model spec: a bundled name (smollm2-135m, gemma3-270m, minilm-l6; see 'headlab models'), "
    "a local Hugging Face directory, or a hub id (only where the network allows)"
)
_SIZE = re.compile(r"^\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)$")


def memory_size(text: str) -> str:
    """argparse type of ``--max-memory``: a size such as ``300MB`` or ``2GiB``."""
    if not _SIZE.match(text.strip()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a memory size such as 300MB or 2GiB")
    return text.strip()


def add_model_arguments(parser, name: str = "model", required: bool = True) -> None:
    """The positional model spec (or ``--model`` when ``required`` is False) and ``--max-memory``."""
    if required:
        parser.add_argument(name, metavar="MODEL", help=MODEL_HELP)
    else:
        parser.add_argument(f"--{name}", default=None, metavar="MODEL", help=MODEL_HELP)
    parser.add_argument("--max-memory", type=memory_size, default=None, metavar="SIZE",
                        help="cap the memory the model's weights take (e.g. 300MB): layers beyond it stay on disk "
                             "and are read during their forward (slower, same results)")


def load_model_from(args, spec: str | None = None):
    """``(model, tokenizer)`` of ``spec`` (default ``args.model``) as the arguments ask."""
    from .surgeon import load_model

    return load_model(spec or args.model, max_memory=args.max_memory)
