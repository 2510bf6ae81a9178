"""What every command shares: the parser whose errors are one line, the model argument, ``--out`` and
``--overwrite``, old spellings of options, and the cheap checks of a model spec before any weight is
read. Importing this module costs no torch (argument errors answer at once)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from ..core.errors import HeadlabError, ModelSpecError
from ..core.kinds import resolve_indices

MODEL_HELP = (
    "model spec: a bundled name (smollm2-135m, gemma3-270m, minilm-l6; see 'headlab models'), "
    "a local Hugging Face directory, or a hub id (only where the network allows)"
)
_SIZE = re.compile(r"^\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)$")


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, ``headlab CMD: error: …``, with exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class Renamed(argparse.Action):
    """An old spelling of an option, refused in one line that names the new one."""

    def __init__(self, option_strings, dest, new: str, **kwargs):
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is spelled {self.new} now (an option means one thing in every command)")


def memory_size(text: str) -> str:
    """argparse type of ``--max-memory``: a size such as ``300MB`` or ``2GiB``."""
    if not _SIZE.match(text.strip()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a memory size such as 300MB or 2GiB")
    return text.strip()


def add_model_arguments(parser, required: bool = True, max_memory: bool = True) -> None:
    """The positional model spec (``--model`` when not ``required``) and, with ``max_memory``,
    ``--max-memory``."""
    if required:
        parser.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    else:
        parser.add_argument("--model", default=None, metavar="MODEL", help=MODEL_HELP)
    if max_memory:
        parser.add_argument("--max-memory", type=memory_size, default=None, metavar="SIZE",
                            help="cap the memory the model's weights take (e.g. 300MB): layers beyond it stay on "
                                 "disk and are read during their forward (slower, same results)")


def add_output_arguments(parser, what: str) -> None:
    """``--out`` (required) and ``--overwrite``."""
    parser.add_argument("--out", required=True, metavar="PATH", help=what)
    parser.add_argument("--overwrite", action="store_true",
                        help="write even where --out holds files headlab did not write (never needed to redo "
                             "headlab's own output)")


def model_config(args, spec: str | None = None, causal: bool = False, needs: str = ""):
    """The model's config, read without its weights (cheap): the check of what the spec names and,
    with ``causal``, that it is a causal language model (``needs`` says what for)."""
    from ..surgeon.models import is_causal_lm, load_config

    from ..surgeon.conversion.converted import check_converted, is_converted_directory

    spec = spec or args.model
    path, config = load_config(spec)
    if isinstance(path, Path) and is_converted_directory(path):
        check_converted(path, config, weights=False)  # the marker against the config (the weights: at loading)
    if getattr(args, "max_memory", None) is not None and converted_layers_of(str(path), config):
        raise ModelSpecError(f"{spec} is a converted checkpoint, which loads in memory only: drop --max-memory")
    if causal and not is_causal_lm(config):
        kind = ", ".join(config.architectures or [type(config).__name__])
        raise ModelSpecError(f"{spec} is not a causal language model ({kind}); {needs or 'this command'} needs one")
    return config


def converted_layers_of(spec: str, config) -> list[int]:
    """The converted layers of a checkpoint ``headlab convert`` wrote at ``spec`` (read from its
    files, no weights); [] for any other model."""
    from ..surgeon.conversion.converted import is_converted_directory, read_conversion
    from ..surgeon.sites import full_attention_layers

    if not (Path(spec).is_dir() and is_converted_directory(spec)):
        return []
    settings, _ = read_conversion(spec)
    return list(settings.layers) if settings.layers is not None else full_attention_layers(config)


def refuse_converted(args, config, needs: str) -> None:
    """Refuse a converted checkpoint for work that edits or gates softmax attention in any layer."""
    layers = converted_layers_of(args.model, config)
    if layers:
        raise ModelSpecError(f"{args.model} has layers converted to linear attention ({', '.join(map(str, layers))}), "
                             f"which the attention hook does not reach; {needs} needs softmax attention in every "
                             "layer: run it on the base model")


def model_shape_of(config):
    """The shape of a model from its config (no weights)."""
    from ..core.shape import model_shape

    return model_shape(config)


def load_model_from(args, spec: str | None = None):
    """``(model, tokenizer)`` of ``spec`` (default ``args.model``) as the arguments ask."""
    from ..surgeon import load_model

    model, tokenizer = load_model(spec or args.model, max_memory=getattr(args, "max_memory", None))
    if tokenizer is None:
        raise ModelSpecError(f"{spec or args.model} has no tokenizer files; this command needs its tokenizer")
    return model, tokenizer


def need(args, forwards, lower: str, extra: int = 0, disk: dict | None = None, spec: str | None = None):
    """The :class:`~headlab.core.resources.Need` of a run of the model ``spec`` (default ``args.model``)
    making ``forwards`` (:class:`~headlab.core.resources.Forward`) with ``extra`` bytes of buffers
    and writing ``disk`` (``{folder: bytes}``); ``lower`` names the settings to lower. Reads the config
    only; ``--max-memory`` bounds the weights held in memory."""
    from ..core.resources import estimate, parse_size
    from ..surgeon.models import load_config, model_size

    size = model_size(load_config(spec or args.model)[1])
    kept = parse_size(args.max_memory) if getattr(args, "max_memory", None) else None
    return estimate(size, forwards, extra, lower, disk, kept)


def longest_example(examples) -> int:
    """An upper bound on the tokens of the longest task example (a list, or lists by task): its
    demonstrations, prompt and longest choice in UTF-8 bytes (a token is at least one byte), plus
    special tokens."""
    groups = examples.values() if isinstance(examples, dict) else [examples]
    return max((len((e.context() + max(e.choices, key=len)).encode("utf-8")) + 2 for group in groups for e in group),
               default=2)


def checkpoint_bytes(args, spec: str | None = None) -> int:
    """Bytes of the model's weights saved in fp32 (a converted or edited checkpoint)."""
    from ..surgeon.models import load_config, model_size

    return model_size(load_config(spec or args.model)[1]).weight_bytes


def check_scores_model(scores: dict, needed: set[str], spec: str) -> None:
    """Refuse a ``needed`` score measured on another model than ``spec`` (the same name, or the same
    folder)."""
    def same(a: str, b: str) -> bool:
        return a == b or (Path(a).expanduser().is_dir() and Path(a).expanduser().resolve() == Path(b).expanduser().resolve())

    for name in sorted(needed & set(scores)):
        if not same(scores[name].model_id, spec):
            raise HeadlabError(f"score {name!r} was measured on {scores[name].model_id!r}, not {spec!r}: head scores of "
                               "another model")


def layers_of(value, n_layers: int, flag: str) -> list[int] | None:
    """Resolved ``--layers``-style indices (None stays None)."""
    return None if value is None else resolve_indices(value, n_layers, flag)


def check_window_fits(config, n_tokens: int, flag: str) -> None:
    """Refuse windows longer than a model with a table of learned positions has rows (BERT, GPT-2);
    rotary models take longer inputs."""
    from ..core.shape import text_config

    cfg = text_config(config)
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    rotary = getattr(cfg, "rope_parameters", None) is not None or getattr(cfg, "rope_theta", None) is not None
    if limit and not rotary and n_tokens > limit:
        raise HeadlabError(f"{flag} {n_tokens} is longer than the {limit} positions this model has")


def check_paths_differ(out: str, source: Path, what: str) -> None:
    """Refuse an output folder that is, or lies inside, ``source`` (e.g. the model being converted)."""
    out_path, source_path = Path(out).expanduser().resolve(), source.expanduser().resolve()
    if out_path == source_path or source_path in out_path.parents:
        raise HeadlabError(f"--out {out} is {what} itself or inside it; write the result to another folder")


def file_safe(name: str) -> str:
    """A score name as part of a file name (letters, digits, ``-``, ``_`` and ``.`` only)."""
    from ..core.escaping import element_id

    return element_id(name)


__all__ = ["MODEL_HELP", "Parser", "Renamed", "add_model_arguments", "add_output_arguments", "check_paths_differ",
           "check_scores_model", "check_window_fits", "checkpoint_bytes", "converted_layers_of", "file_safe",
           "layers_of", "load_model_from", "longest_example", "memory_size", "model_config", "model_shape_of", "need",
           "refuse_converted"]
