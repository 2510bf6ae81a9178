"""mkdocs hook: the API reference reads the sources as the package ``headlab`` (``headlab/`` plus the
``core/``, ``surgeon/``, ``probes/``, ``sae/`` and ``kernels/`` folders that pyproject maps into it), so the build
first lays that package out in a temporary folder outside the repository (a copy of the Python files: the
reader does not follow linked folders), hands that folder to mkdocstrings' Python handler as its only search
path, and removes it when the build ends. The build writes nothing into the repository but ``site/``."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from mkdocs.plugins import event_priority

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("core", "surgeon", "probes", "sae", "kernels")
_scratch: list[Path] = []  # the folders this build made, removed when it ends


@event_priority(100)  # before mkdocstrings reads its paths, which drops folders that do not exist
def on_config(config, **kwargs):
    _remove_scratch()  # `mkdocs serve` configures again on every rebuild
    scratch = Path(tempfile.mkdtemp(prefix="headlab-docs-src-"))
    _scratch.append(scratch)
    package = scratch / "headlab"
    python_only = shutil.ignore_patterns("__pycache__", "*.c", "*.so")
    shutil.copytree(ROOT / "headlab", package, ignore=python_only)
    for part in PARTS:
        shutil.copytree(ROOT / part, package / part, ignore=python_only)
    python = config["plugins"]["mkdocstrings"].config["handlers"].setdefault("python", {})
    python["paths"] = [str(scratch)]
    return config


@event_priority(-100)  # after mkdocstrings has rendered every page and written its inventory
def on_post_build(config, **kwargs):
    _remove_scratch()


def on_build_error(error, **kwargs):
    _remove_scratch()


def on_shutdown(**kwargs):
    _remove_scratch()


def _remove_scratch() -> None:
    while _scratch:
        shutil.rmtree(_scratch.pop(), ignore_errors=True)
