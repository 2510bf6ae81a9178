"""Package exports loaded on first use: importing a headlab package (the CLI does, for ``--help``)
then costs no torch."""

from __future__ import annotations

from importlib import import_module
from typing import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` whose public ``name`` lives in submodule
    ``exports[name]`` (a name equal to its submodule's is the submodule itself unless the submodule
    defines that name, as ``kernels.linear_attention`` does), or in the module
    ``exports[name]`` names in full (``headlab.core.shape``) when it lives in another package."""
    names = sorted(exports)

    def __getattr__(name: str):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        loaded = import_module(module if module.startswith("headlab.") else f".{module}", package)
        return getattr(loaded, name, loaded) if module == name else getattr(loaded, name)

    def __dir__() -> list[str]:
        return names

    return __getattr__, __dir__
