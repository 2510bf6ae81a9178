"""Every cross-reference in a docstring (``:mod:``, ``:func:``, ``:class:``, ``:meth:``, ``:attr:``,
``:data:``) names something that exists, so no pointer goes stale when code moves; and every public
module says what it is."""

import ast
import importlib
import pkgutil
import re

import pytest

import headlab

REFERENCE = re.compile(r":(?:mod|func|class|meth|attr|data):`~?([^`]+)`")
PACKAGES = ("headlab.core", "headlab.kernels", "headlab.surgeon", "headlab.probes", "headlab.sae", "headlab.commands")


def _modules() -> list[str]:
    names = ["headlab", "headlab.cli"]
    for package in PACKAGES:
        module = importlib.import_module(package)
        names.append(package)
        names += [info.name for info in pkgutil.walk_packages(module.__path__, f"{package}.")]
    return sorted(names)


def _resolve(target: str, module: str, is_package: bool):
    """The object ``target`` names, seen from ``module`` (relative names start with dots), or None."""
    if target.startswith("."):
        dots = len(target) - len(target.lstrip("."))
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[:len(base) - (dots - 1)]
        candidates = [".".join(base + [target.lstrip(".")])]
    else:
        candidates = [target, f"{module}.{target}"]
    for name in candidates:
        pieces = name.split(".")
        for cut in range(len(pieces), 0, -1):
            try:
                found = importlib.import_module(".".join(pieces[:cut]))
            except ImportError:
                continue
            try:
                for attribute in pieces[cut:]:
                    found = getattr(found, attribute)
                return found
            except AttributeError:
                break
    return None


MODULES = _modules()


def _member(cls: ast.ClassDef, name: str) -> bool:
    """Whether the class defines ``name``: a method, a class attribute or field, or ``self.name``."""
    for node in ast.walk(cls):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return True
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
            return True
        if isinstance(node, ast.Attribute) and node.attr == name and isinstance(node.value, ast.Name) \
                and node.value.id == "self" and isinstance(node.ctx, ast.Store):
            return True
    return False


def _documented(tree: ast.Module):
    """``(node, enclosing class or None, docstring)`` of the module, its classes and functions."""
    yield tree, None, ast.get_docstring(tree) or ""
    stack = [(child, None) for child in tree.body]
    while stack:
        node, cls = stack.pop()
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node, cls, ast.get_docstring(node) or ""
            inner = node if isinstance(node, ast.ClassDef) else cls
            stack.extend((child, inner) for child in node.body)


@pytest.mark.parametrize("name", MODULES)
def test_every_docstring_reference_names_something_that_exists(name):
    module = importlib.import_module(name)
    tree = ast.parse(open(module.__file__, encoding="utf-8").read())
    is_package = module.__file__.endswith("__init__.py")
    stale = []
    for node, cls, doc in _documented(tree):
        for target in REFERENCE.findall(doc):
            target = target.split("(")[0]
            own = isinstance(node, ast.ClassDef) and _member(node, target) or cls is not None and _member(cls, target)
            if not own and _resolve(target, name, is_package) is None:
                stale.append(f"{getattr(node, 'name', name)}: {target}")
    assert not stale, stale


@pytest.mark.parametrize("name", MODULES)
def test_every_module_says_what_it_is(name):
    assert (importlib.import_module(name).__doc__ or "").strip(), name


def test_the_resolver_finds_what_exists_and_not_what_does_not():
    assert _resolve("..core.errors.HeadlabError", "headlab.surgeon.plan", False) is headlab.core.errors.HeadlabError
    assert _resolve(".base.Edit", "headlab.surgeon.edits", True) is not None
    assert _resolve(".edit.Edit", "headlab.surgeon.plan", False) is None
