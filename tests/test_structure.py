"""The design, held by tests: the import graph runs model -> ops -> reference | fast with no circle,
what runs the model (run/) and what talks to other projects (interop/) import the model and never
the other way, only the package is importable as the package, and every op has one signature and
one docstring.

The graph is read from the source (ast), not from sys.modules, so an edge hidden inside a function
counts too. Module names are the installed ones: reference/x.py is ``minimamba_moe.reference.x``.
"""

import ast
import importlib
import inspect
from pathlib import Path

import pytest

from minimamba_moe import fast, reference
from minimamba_moe.ops import OP_NAMES
from tests.helpers import PACKAGES, modules

ROOT = Path(__file__).resolve().parent.parent
# The package top is the model and only the model, in the order the docs teach it.
MODEL_MODULES = ["config", "ops", "mamba", "moe", "attention", "model", "generate", "flops"]


MODULES = modules()


def imports(name: str) -> list[tuple[str, bool]]:
    """(imported project module, at module level?) for every import statement of module ``name``."""
    path = MODULES[name]
    package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = set()  # statements at module level, or inside a module-level try / if
    for stmt in tree.body:
        top.update(id(n) for n in ast.walk(stmt) if not isinstance(stmt, (ast.FunctionDef, ast.ClassDef)))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            # `from pkg import sub` imports the module pkg.sub when there is one
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        found += [(t, id(node) in top) for t in targets if t.split(".")[0] == "minimamba_moe"]
    return found


GRAPH = {name: sorted({t for t, _ in imports(name) if t != name}) for name in MODULES}


def test_import_graph_has_no_cycle():
    state = {}  # name -> "active" while on the DFS stack, "done" after

    def visit(name, path):
        state[name] = "active"
        for t in GRAPH.get(name, []):
            if state.get(t) == "active":
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(t):] + [t]))
            if t not in state:
                visit(t, path + [t])
        state[name] = "done"

    for name in MODULES:
        if name not in state:
            visit(name, [name])


def test_backends_import_neither_the_model_nor_each_other_the_wrong_way():
    for name, targets in GRAPH.items():
        if name.startswith("minimamba_moe.reference"):
            bad = [t for t in targets if not t.startswith("minimamba_moe.reference")]
            assert not bad, f"{name} (reference) imports {bad}: the reference depends on nothing of the project"
        if name.startswith("minimamba_moe.fast"):
            bad = [t for t in targets if not t.startswith(("minimamba_moe.fast", "minimamba_moe.reference"))]
            assert not bad, f"{name} (fast) imports {bad}: fast depends only on fast and the reference"


def test_the_model_reaches_the_kernels_only_through_ops():
    assert {"minimamba_moe.reference", "minimamba_moe.fast"} <= set(GRAPH["minimamba_moe.ops"])
    assert all(top for t, top in imports("minimamba_moe.ops")), "ops imports a backend lazily"
    for name, targets in GRAPH.items():
        if name.startswith(("minimamba_moe.reference", "minimamba_moe.fast")) or name == "minimamba_moe.ops":
            continue
        kernels = [t for t in targets if t.startswith(("minimamba_moe.reference", "minimamba_moe.fast"))]
        allowed = ["minimamba_moe.reference.checks"] if name == "minimamba_moe.config" else []  # the choice lists
        assert kernels == allowed, f"{name} imports {kernels}: the model calls kernels through minimamba_moe.ops"


def test_every_package_folder_is_listed():
    """A new sub-package must be added to PACKAGES (and pyproject.toml), or its imports go unchecked."""
    for folder in {ROOT / "minimamba_moe", ROOT / "reference", ROOT / "fast"}:
        for init in folder.rglob("__init__.py"):
            assert init.parent in PACKAGES.values(), f"{init.parent.relative_to(ROOT)} is not in PACKAGES"


def test_the_package_top_holds_the_model_and_only_the_model():
    top = sorted(f.stem for f in (ROOT / "minimamba_moe").glob("*.py") if f.stem != "__init__")
    assert top == sorted(MODEL_MODULES), (
        f"minimamba_moe/ holds {top}; the model's modules are {MODEL_MODULES}: what runs the model goes "
        "in minimamba_moe/run/, what talks to other projects in minimamba_moe/interop/")


def test_imports_run_one_way_model_then_run_then_interop():
    """model <- run <- interop: a module imports only from its own layer or the layers before it."""
    layer = {"minimamba_moe.run": 1, "minimamba_moe.interop": 2}

    def rank(name):
        return next((r for prefix, r in layer.items() if name == prefix or name.startswith(prefix + ".")), 0)

    wrong = [f"{name} -> {t}" for name, targets in GRAPH.items() for t in targets if rank(t) > rank(name)]
    assert not wrong, ("imports the wrong way (the model imports nothing from run/ or interop/, run/ nothing "
                       "from interop/): " + ", ".join(wrong))


def test_no_project_import_is_hidden_inside_a_function():
    lazy = [(name, t) for name in MODULES for t, top in imports(name) if not top]
    assert not lazy, f"imports of project modules inside functions (the graph hides them): {lazy}"


def test_fast_kernel_modules_do_not_import_each_other_in_a_circle():
    """The scan's forward and backward share their helpers through fast/scan_triton_chunk.py."""
    assert "minimamba_moe.fast.scan_triton" not in GRAPH["minimamba_moe.fast.scan_triton_bwd"]
    assert "minimamba_moe.fast.scan_triton" not in GRAPH["minimamba_moe.fast.state_update_triton"]


@pytest.mark.parametrize("name", ["minimamba_moe.train", "minimamba_moe.sample", "minimamba_moe.tests"])
def test_files_outside_the_package_are_not_its_submodules(name):
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(name)


def test_the_backends_are_installed_from_their_top_level_folders():
    assert Path(reference.__file__).resolve() == ROOT / "reference" / "__init__.py"
    assert Path(fast.__file__).resolve() == ROOT / "fast" / "__init__.py"


@pytest.mark.parametrize("op", [*OP_NAMES, "expert_mlp"])
def test_reference_and_fast_ops_have_one_signature_and_one_docstring(op):
    ref, fst = getattr(reference, op), getattr(fast, op)
    assert inspect.signature(ref) == inspect.signature(fst), \
        f"{op}: reference{inspect.signature(ref)} != fast{inspect.signature(fst)}"
    assert inspect.getdoc(ref) == inspect.getdoc(fst), f"{op}: the docstrings differ"
    assert inspect.getdoc(ref), f"{op} has no docstring"


def test_both_backends_export_the_same_names():
    assert sorted(reference.__all__) == sorted(fast.__all__)
    assert set(OP_NAMES) <= set(reference.__all__)
