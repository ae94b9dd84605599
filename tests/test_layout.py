"""The package's layout (docs/design.md §3), read from its source with ``ast``: no import cycles, no
private names imported across modules, the training ELBO constructed in one place, and no data-set
names outside the data sets' own modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pyro_diffmvae.data import celebamask_hq, cub, polymnist, shapes
from pyro_diffmvae.data.registry import DATASETS

PACKAGE = Path(__file__).resolve().parents[1] / "pyro_diffmvae"

#: the modules written with the data-set registry and the evaluation package: held to every rule here
GENERIC = ("pyro_diffmvae.evaluation", "pyro_diffmvae.evaluation_labels", "pyro_diffmvae.networks",
           "pyro_diffmvae.figures", "pyro_diffmvae.builders", "pyro_diffmvae.data.spec", "pyro_diffmvae.data.registry")


def module_files(root: Path = PACKAGE) -> dict[str, Path]:
    """``{dotted module name: file}`` of every module of the package (a package is its ``__init__``)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _is_package(name: str, files: dict[str, Path]) -> bool:
    return files[name].name == "__init__.py"


def _type_checking_only(node: ast.AST) -> bool:
    """``if TYPE_CHECKING:`` — imports for annotations, never run."""
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
                                         or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _run_nodes(tree: ast.AST, lazy: bool = True):
    """Every node of ``tree`` that runs: ``if TYPE_CHECKING:`` blocks left out, and function bodies
    (the lazy imports) too unless ``lazy``."""
    stack = list(ast.iter_child_nodes(tree))
    while stack:
        node = stack.pop()
        if _type_checking_only(node):
            continue
        yield node
        if lazy or not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            stack.extend(ast.iter_child_nodes(node))


def imports_of(name: str, files: dict[str, Path], top_level_only: bool = False) -> list[tuple[str, ast.ImportFrom | ast.Import]]:
    """``[(imported module of the package, node)]`` of module ``name``: ``from .x import y`` resolves to
    ``<pkg>.x.y`` when that is a module, else to ``<pkg>.x``; relative levels are resolved against
    ``name``'s package. ``top_level_only``: leave out the imports inside functions (lazy imports)."""
    tree = ast.parse(files[name].read_text())
    package = name if _is_package(name, files) else name.rpartition(".")[0]
    out = []
    for node in _run_nodes(tree, lazy=not top_level_only):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target not in files:
                continue
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in files]
            if len(subs) == len(node.names):
                out += [(s, node) for s in subs]
            else:
                out.append((target, node))
        elif isinstance(node, ast.Import):
            out += [(a.name, node) for a in node.names if a.name in files]
    return out


def import_graph(files: dict[str, Path], top_level_only: bool = False) -> dict[str, set[str]]:
    return {name: {t for t, _ in imports_of(name, files, top_level_only) if t != name} for name in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle ``[a, b, ..., a]`` of the directed graph, or ``None`` (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def private_imports(files: dict[str, Path] | None = None) -> list[tuple[str, str, str]]:
    """``[(module, imported from, name)]``: every ``from <package module> import _private`` (dunders aside)."""
    files = files or module_files()
    out = []
    for name in files:
        for target, node in imports_of(name, files):
            if isinstance(node, ast.ImportFrom):
                out += [(name, target, a.name) for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
    return sorted(set(out))


def _in(module: str, prefixes=GENERIC) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def string_literals(path: Path) -> list[tuple[int, str]]:
    """``[(line, value)]`` of every string constant of a module but its docstrings."""
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


# --------------------------------------------------------------------------------------- checks
def test_the_checks_see_a_cycle_and_a_private_import(tmp_path):
    """Catches: a graph builder that resolves no relative import (every later check would pass vacuously)."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..a import _hidden\n")
    files = module_files(pkg)
    assert find_cycle(import_graph(files)) == ["pkg.a", "pkg.sub.b", "pkg.a"]
    assert find_cycle(import_graph(files, top_level_only=True)) is None  # the import back is lazy
    assert private_imports(files) == [("pkg.sub.b", "pkg.a", "_hidden")]


def test_evaluation_package_has_no_import_cycle():
    """Catches: evaluation modules importing each other (as evaluation.py and evaluation_labels.py did),
    counting lazy imports inside functions too."""
    files = module_files()
    graph = import_graph(files)
    inside = {m: {t for t in ts if _in(t, ("pyro_diffmvae.evaluation",))} for m, ts in graph.items()
              if _in(m, ("pyro_diffmvae.evaluation",))}
    assert len(inside) >= 9, sorted(inside)  # the package and its modules
    assert find_cycle(inside) is None


def test_no_import_cycle_in_the_package():
    """Catches: any cycle of imports that run (lazy ones inside functions included), e.g. a data set's
    module importing the evaluation back, or builders and networks importing each other."""
    assert find_cycle(import_graph(module_files())) is None


def test_no_module_imports_a_private_name_of_another():
    """Catches: any module reaching into another module's ``_private`` helpers instead of a public name."""
    assert private_imports() == []


@pytest.mark.parametrize("module", ["evaluation", "evaluation_labels.py", "builders.py", "networks.py", "figures.py",
                                    "cli.py", "training", "objectives"])
def test_no_dataset_name_in_generic_code(module):
    """Catches: a branch on a data-set name (``cfg.dataset.name == "cub"``) in code that must read
    everything from the data set's spec; in the evaluation also a branch on a modality name."""
    paths = sorted((PACKAGE / module).rglob("*.py")) if (PACKAGE / module).is_dir() else [PACKAGE / module]
    names = set(DATASETS)
    if module == "evaluation":
        names |= {"image", "mask", "attributes", "text", "m0", "m1", "m2", "m3", "m4"}
    found = [(p.name, line, v) for p in paths for line, v in string_literals(p) if v in names]
    assert found == []


def test_every_builtin_dataset_declares_its_spec_next_to_its_loader():
    """Catches: a data set registered from a spec written elsewhere than its loader module."""
    assert {n: DATASETS[n] for n in ("shapes", "polymnist", "celebamask_hq", "cub")} == {
        "shapes": shapes.SPEC, "polymnist": polymnist.SPEC, "celebamask_hq": celebamask_hq.SPEC, "cub": cub.SPEC}
    for name, spec in DATASETS.items():
        assert spec.name == name and spec.build.__module__ == spec.modalities.__module__


def _calls_named(name: str) -> list[str]:
    """The modules that call ``name(...)`` (a plain or attribute call)."""
    return sorted({module for module, path in module_files().items() for node in ast.walk(ast.parse(path.read_text()))
                   if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == name})


def test_trace_mean_field_elbo_is_constructed_in_one_place():
    """Catches: a second place building the training ELBO (the trainer, fit_svi and the CLI each did)."""
    assert _calls_named("TraceMeanField_ELBO") == ["pyro_diffmvae.objectives.subset_elbo"]


def _data_set_comparisons(path: Path) -> list[tuple[str, int]]:
    """``x == "cub"``, ``x != "shapes"``, ``x in ("polymnist", ...)``: a branch on a data set's name."""
    hits = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            for side in [node.left, *node.comparators]:
                values = [e for e in getattr(side, "elts", [side]) if isinstance(e, ast.Constant)]
                hits += [(v.value, node.lineno) for v in values if v.value in DATASETS]
    return hits


def test_only_the_data_sets_branch_on_data_set_names():
    """Catches: an ``if/elif`` over data-set names anywhere outside ``data/`` — the package's other
    modules and the paper tables (builders, the evaluation, the figures and the tables had such chains)."""
    files = {m: p for m, p in module_files().items() if not _in(m, ("pyro_diffmvae.data",))}
    files["experiments.paper_tables"] = PACKAGE.parent / "experiments" / "paper_tables.py"
    assert {m: h for m, p in files.items() if (h := _data_set_comparisons(p))} == {}
