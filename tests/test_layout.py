"""The shape of the code: no import cycles, distill/ never imports recipes/evals/cli, components never import the
training plumbing, and nothing imports another module's private names. Read from the source, so a violation fails
here before it confuses anyone."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("distill", "recipes", "evals")
PLUMBING = {"distill.engine", "distill.runs", "distill.checkpoint", "distill.losslog"}
COMPONENTS = {"distill." + m for m in ("schedule", "prediction", "families", "teacher", "cond", "student", "ema",
                                       "consistency", "losses", "guidance", "info", "optim", "budget", "latents",
                                       "images", "text", "data", "method")}


def _modules() -> dict[str, Path]:
    found = {"cli": ROOT / "cli.py"}
    for package in PACKAGES:
        for path in (ROOT / package).glob("*.py"):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


def _imports(path: Path, known: set[str]) -> list[tuple[str, list[str]]]:
    """(module, names) for every import of a project module in the file, at any depth (deferred ones too)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [a.name for a in node.names]
            subs = [f"{node.module}.{n}" for n in names if f"{node.module}.{n}" in known]
            out += [(s, []) for s in subs] or [(node.module, names)]
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
    return [(m, n) for m, n in out if m in known]


GRAPH = {name: _imports(path, set(_modules())) for name, path in _modules().items()}


def test_distill_never_imports_recipes_evals_or_cli():
    bad = [(m, i) for m, deps in GRAPH.items() if m.startswith("distill") for i, _ in deps
           if i.split(".")[0] in ("recipes", "evals", "cli")]
    assert not bad


def test_components_never_import_plumbing():
    bad = [(m, i) for m, deps in GRAPH.items() if m in COMPONENTS for i, _ in deps if i in PLUMBING]
    assert not bad


def test_no_module_imports_a_private_name_of_another():
    bad = [(m, i, n) for m, deps in GRAPH.items() for i, names in deps for n in names if n.startswith("_")]
    assert not bad


def test_there_is_no_import_cycle():
    edges = {m: {i for i, _ in deps if i != m} for m, deps in GRAPH.items()}

    def visit(node, stack, done):
        if node in stack:
            return stack[stack.index(node):] + [node]
        if node in done:
            return None
        done.add(node)
        for nxt in sorted(edges.get(node, ())):
            cycle = visit(nxt, stack + [node], done)
            if cycle:
                return cycle
        return None

    done: set[str] = set()
    for start in sorted(edges):
        cycle = visit(start, [], done)
        assert cycle is None, " -> ".join(cycle)
