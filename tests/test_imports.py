"""ARCHITECTURE.md's import rules, enforced by walking every module's imports."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PARTS = {"kernels", "surgeon", "probes", "sae", "headlab"}
ALLOWED = {
    "kernels": set(),
    "surgeon": {"kernels"},
    "probes": {"surgeon", "kernels"},
    "sae": {"surgeon", "kernels"},
    "headlab": {"kernels", "surgeon", "probes", "sae"},
}
THIRD_PARTY_OWNERS = {"plotly": "probes/views.py", "sklearn": "probes/probing.py", "triton": "kernels/"}


def imported_parts(path: Path, part: str):
    """Yield (line, imported part) for every import of one of our parts in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: "from .x" stays inside, "from ..x" reaches a sibling or headlab/
                module = (node.module or "").split(".")[0]
                names = [part] if node.level == 1 else [module if module in PARTS else "headlab." + module]
            else:
                names = [node.module or ""]
        else:
            continue
        for name in names:
            pieces = name.split(".")
            target = pieces[0]
            if pieces[0] == "headlab":  # headlab.<part> is that part; anything else is headlab/ itself
                target = pieces[1] if len(pieces) > 1 and pieces[1] in PARTS else "headlab"
            yield node.lineno, target, name


def python_files(part):
    return sorted((ROOT / part).rglob("*.py"))


def test_every_part_exists():
    for part in PARTS:
        assert (ROOT / part / "__init__.py").exists(), part


def test_import_directions_follow_the_architecture():
    violations = []
    for part in PARTS:
        for path in python_files(part):
            for line, target, name in imported_parts(path, part):
                if target in PARTS and target != part and target not in ALLOWED[part]:
                    violations.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not violations, "\n".join(violations)


def test_heavy_optional_libraries_are_imported_in_one_place_only():
    violations = []
    for part in PARTS:
        for path in python_files(part):
            rel = str(path.relative_to(ROOT))
            for line, target, name in imported_parts(path, part):
                owner = THIRD_PARTY_OWNERS.get(name.split(".")[0])
                if owner and not rel.startswith(owner):
                    violations.append(f"{rel}:{line} imports {name} (only {owner} may)")
    assert not violations, "\n".join(violations)


def test_the_checker_catches_a_forbidden_edge(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from headlab.probes import views\nfrom ..sae import models\nimport headlab.kernels\nfrom .._version import v\n")
    targets = [t for _, t, _ in imported_parts(bad, "kernels")]
    assert targets == ["probes", "sae", "kernels", "headlab"]
