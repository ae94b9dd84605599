"""The layout rules of docs/design.md §3, read from the source with ``ast``: the package has no
import cycle, no module imports another module's private name, the subset ELBO's
``TraceMeanField_ELBO`` is constructed in one place, and only the data-set registry and the data
sets' own modules name data sets."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pyro_diffmvae"
DATASET_NAMES = ("shapes", "polymnist", "celebamask_hq", "cub")


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _runtime_nodes(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:`` (annotations only, never imported)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def _imports(modules: dict[str, Path]):
    """``(importer, imported module, imported names)`` for every package-internal import."""
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in _runtime_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = ".".join(package[: len(package) - node.level + 1] + [node.module] if node.module else
                                package[: len(package) - node.level + 1]) if node.level else node.module
                if base and base.split(".")[0] == "pyro_diffmvae":
                    yield name, base, [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "pyro_diffmvae":
                        yield name, alias.name, []


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {m: set() for m in modules}
    for importer, base, names in _imports(modules):
        submodules = [f"{base}.{n}" for n in names if f"{base}.{n}" in modules]  # ``from . import gaussian``
        graph[importer].update(submodules)
        if base in modules and len(submodules) < max(len(names), 1):  # names defined in ``base`` itself
            graph[importer].add(base)
        graph[importer].discard(importer)
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The cycles a depth-first search meets (empty iff the graph is acyclic)."""
    state, cycles = {}, []

    def visit(u, path):
        state[u] = "open"
        path.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == "open":
                cycles.append(path[path.index(v):] + [v])
            elif v not in state:
                visit(v, path)
        path.pop()
        state[u] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    return cycles


def test_the_cycle_finder_finds_a_cycle():
    """Fails if the finder could never report one (the next test would then pass vacuously)."""
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_has_no_import_cycle():
    """Fails when two modules import each other (as evaluation.py and evaluation_labels.py did)."""
    graph = import_graph()
    assert "pyro_diffmvae.objectives.subset_elbo" in graph["pyro_diffmvae.objectives"]  # the graph is read
    assert import_cycles(graph) == []


def test_no_module_imports_a_private_name_of_another():
    """Fails when a module reaches into another's ``_private`` helper instead of a public name."""
    offenders = [(importer, base, n) for importer, base, names in _imports(_modules()) for n in names
                 if n.startswith("_") and not n.startswith("__")]
    assert offenders == []


def _calls_named(name: str) -> list[str]:
    found = []
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == name:
                found.append(module)
    return found


def test_trace_mean_field_elbo_is_constructed_in_one_place():
    """Fails when a second place builds the training ELBO (the trainer, fit_svi or the CLI did)."""
    assert _calls_named("TraceMeanField_ELBO") == ["pyro_diffmvae.objectives.subset_elbo"]


@pytest.mark.parametrize("folder", ["evaluation", "training", "objectives"])
def test_generic_code_names_no_data_set(folder):
    """Fails when the evaluation, training or objective code branches on a data set's name
    (what a data set is comes from its spec in ``data/``)."""
    hits = []
    for module, path in _modules().items():
        if module.split(".")[1:2] != [folder]:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in DATASET_NAMES:
                hits.append((module, node.value, node.lineno))
    assert hits == []


def _data_set_comparisons(path: Path) -> list[tuple[str, int]]:
    """``x == "cub"``, ``x != "shapes"``, ``x in ("polymnist", ...)``: a branch on a data set's name."""
    hits = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            for side in [node.left, *node.comparators]:
                values = [e for e in getattr(side, "elts", [side]) if isinstance(e, ast.Constant)]
                hits += [(v.value, node.lineno) for v in values if v.value in DATASET_NAMES]
    return hits


def test_only_the_data_sets_branch_on_data_set_names():
    """Fails on an ``if/elif`` over data-set names outside ``data/`` (builders, evaluation, the CLI,
    the figures and the paper tables once had four such chains)."""
    files = {m: p for m, p in _modules().items() if not m.startswith("pyro_diffmvae.data")}
    files["experiments.paper_tables"] = PACKAGE.parent / "experiments" / "paper_tables.py"
    hits = {m: h for m, p in files.items() if (h := _data_set_comparisons(p))}
    assert hits == {}
