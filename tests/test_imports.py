"""The architecture's import rules (docs/architecture.md), enforced by walking every module's imports: the
foundation at the bottom, the parts in their order, the probes' products apart, heavy libraries in their
own modules, no import circle."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PARTS = {"core", "kernels", "surgeon", "probes", "sae", "headlab"}
ALLOWED = {
    "core": set(),
    "kernels": {"core"},
    "surgeon": {"kernels", "core"},
    "probes": {"surgeon", "kernels", "core"},
    "sae": {"surgeon", "kernels", "core"},
    "headlab": {"core", "kernels", "surgeon", "probes", "sae"},
}
# where each heavy optional library may be imported: plotly in the probes' shared figure module and each
# product's figure module, scikit-learn in the linear probes and the atlas's t-SNE, triton in the kernels
THIRD_PARTY_OWNERS = {"plotly": ("probes/figures.py", "probes/*/figure.py"),
                      "sklearn": ("probes/scorers/probing.py", "probes/atlas/embedding.py"), "triton": ("kernels/*",)}
WINGS = {"report", "views", "validation", "compression", "atlas"}  # the products of probes/
PROBES_BASE = {"scorers", "figures", "intervals"}  # what every product may use


def imported_parts(path: Path, part: str):
    """Yield (line, imported part, name) for every import of one of our parts in ``path`` (relative
    imports resolved from the file's package: ``surgeon/conversion/x.py``'s ``..files`` is surgeon's)."""
    try:
        package = [part, *path.parent.relative_to(ROOT / part).parts]
    except ValueError:  # a file outside the tree (the checker's own test): a module at the top of part
        package = [part]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                module = (node.module or "").split(".")[0]
                names = [base[0] if base else (module if module in PARTS else "headlab." + module)]
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


def test_heavy_optional_libraries_are_imported_in_their_own_modules_only():
    violations = []
    for part in PARTS:
        for path in python_files(part):
            rel = path.relative_to(ROOT)
            for line, target, name in imported_parts(path, part):
                owners = THIRD_PARTY_OWNERS.get(name.split(".")[0])
                if owners and not any(rel.match(owner) for owner in owners):
                    violations.append(f"{rel}:{line} imports {name} (only {', '.join(owners)} may)")
    assert not violations, "\n".join(violations)


def _wing(module: str) -> str | None:
    """The wing (product) or shared piece of probes a module belongs to: ``probes.report.page`` -> report."""
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else None


def test_the_products_of_probes_stay_apart():
    """A product imports the shared scorers and figures and its own modules, never another product's;
    only the report, which shows what the others wrote into its folder, reads them. The shared pieces
    import no product."""
    violations = []
    for module, imported in module_graph("probes").items():
        wing = _wing(module)
        for target in imported:
            other = _wing(target)
            if other in WINGS and other != wing and wing != "report":
                violations.append(f"{module} imports {target}")
    assert not violations, "\n".join(violations)


def test_every_module_of_probes_is_in_a_product_or_the_shared_base():
    loose = [m for m in module_graph("probes") if m != "probes" and _wing(m) not in WINGS | PROBES_BASE]
    assert not loose, f"modules of probes/ outside its products and shared base: {loose}"


def test_the_wing_checker_catches_a_crossing():
    graph = {"probes.atlas.page": {"probes.views.figure", "probes.figures"}, "probes.report.page": {"probes.atlas.page"}}
    crossings = [(m, t) for m, ts in graph.items() for t in ts
                 if _wing(t) in WINGS and _wing(t) != _wing(m) and _wing(m) != "report"]
    assert crossings == [("probes.atlas.page", "probes.views.figure")]


def test_the_checker_catches_a_forbidden_edge(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from headlab.probes import views\nfrom ..sae import models\nimport headlab.kernels\nfrom .._version import v\n")
    targets = [t for _, t, _ in imported_parts(bad, "kernels")]
    assert targets == ["probes", "sae", "kernels", "headlab"]


def module_graph(part: str) -> dict[str, set[str]]:
    """``{module: modules of the same part it imports}``, counting imports inside functions too."""
    files = {_module_name(part, path): path for path in python_files(part)}
    graph = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.ImportFrom) and node.level):
                continue
            base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:  # ``from package import submodule`` depends on the submodule alone
                submodule = f"{target}.{alias.name}"
                candidate = submodule if submodule in files else target
                if candidate in files and candidate != name:
                    graph[name].add(candidate)
    return graph


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` outside ``if TYPE_CHECKING:`` blocks (imports for annotations only)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _module_name(part: str, path: Path) -> str:
    pieces = list(path.relative_to(ROOT / part).with_suffix("").parts)
    return ".".join([part] + (pieces[:-1] if pieces[-1] == "__init__" else pieces))


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, circles, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    circles.append(sorted(group))
    return circles


def test_no_import_circle_inside_any_part():
    circles = {part: import_circles(module_graph(part)) for part in sorted(PARTS)}
    assert not any(circles.values()), circles


def test_the_circle_finder_finds_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert import_circles(graph) == [["a", "b", "c"]]
    assert import_circles({"a": {"b"}, "b": set()}) == []
