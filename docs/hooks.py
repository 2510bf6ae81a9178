"""mkdocs hook: the API reference reads the sources as the package ``headlab`` (``headlab/`` plus the
``core/``, ``surgeon/``, ``probes/``, ``sae/`` and ``kernels/`` folders that pyproject maps into it), so the build
first lays that package out under ``build/docs-src`` (a copy of the Python files: the reader does not
follow linked folders)."""

from __future__ import annotations

import shutil
from pathlib import Path

from mkdocs.plugins import event_priority

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("core", "surgeon", "probes", "sae", "kernels")


@event_priority(100)  # before mkdocstrings reads its paths, which drops folders that do not exist yet
def on_config(config, **kwargs):
    package = ROOT / "build" / "docs-src" / "headlab"
    if package.parent.exists():
        shutil.rmtree(package.parent)
    python_only = shutil.ignore_patterns("__pycache__", "*.c", "*.so")
    shutil.copytree(ROOT / "headlab", package, ignore=python_only, dirs_exist_ok=True)
    for part in PARTS:
        shutil.copytree(ROOT / part, package / part, ignore=python_only)
    return config
