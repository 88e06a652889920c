"""The package's layout: imports follow the data flow, no cycles, no stray top-level modules, small modules.

Parses every module of ``src/stgen`` with :mod:`ast` (nothing is imported), so a violation names the file
and the import line."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
#: the layers, lowest first; a module may import its own layer and the ones before it
LAYERS = ("utils", "image", "data", "features", "nn", "sampling", "training", "backbones", "models", "evaluation",
          "workflows", "cli")
#: modules allowed directly in src/stgen (entry points and the error types every layer raises)
TOP_LEVEL = {"stgen", "stgen.__main__", "stgen.cli", "stgen.errors"}
MAX_LINES = 700


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted((SRC / "stgen").rglob("*.py")):
        parts = list(p.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports(path: Path, mods: dict[str, Path], top_only: bool) -> list[tuple[int, str]]:
    """``(line, module)`` of every import of a stgen module in ``path`` (top level only with ``top_only``)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_only else list(ast.walk(tree))
    out = []
    for n in nodes:
        if isinstance(n, ast.ImportFrom) and n.module and n.module.split(".")[0] == "stgen":
            for a in n.names:
                full = f"{n.module}.{a.name}"
                out.append((n.lineno, full if full in mods else n.module))
        elif isinstance(n, ast.Import):
            out += [(n.lineno, a.name) for a in n.names if a.name.split(".")[0] == "stgen"]
    return [(ln, m) for ln, m in out if m in mods]


def _layer(module: str) -> int | None:
    """Index of ``module``'s layer in :data:`LAYERS`; None for ``stgen``, ``stgen.errors`` and ``__main__``."""
    parts = module.split(".")
    if len(parts) < 2 or parts[1] not in LAYERS:
        return None
    return LAYERS.index(parts[1])


def test_no_import_climbs_the_layers():
    mods = _modules()
    bad = []
    for m, p in mods.items():
        lo = _layer(m)
        if lo is None:
            continue
        for line, dep in _imports(p, mods, top_only=False):  # lazy imports inside functions count too
            hi = _layer(dep)
            if hi is not None and hi > lo:
                bad.append(f"{p.relative_to(SRC)}:{line} imports {dep} ({LAYERS[hi]} is above {LAYERS[lo]})")
    assert not bad, "\n".join(bad)


def test_models_do_not_import_each_other():
    mods = _modules()
    bad = []
    for m, p in mods.items():
        parts = m.split(".")
        if len(parts) < 4 or parts[1] != "models":  # stgen.models.<name>.<module>
            continue
        for line, dep in _imports(p, mods, top_only=False):
            d = dep.split(".")
            if len(d) >= 3 and d[1] == "models" and d[2] not in ("base", "registry") and d[2] != parts[2]:
                bad.append(f"{p.relative_to(SRC)}:{line} imports {dep}")
    assert not bad, "what two models share belongs in nn/, sampling/ or training/:\n" + "\n".join(bad)


def test_no_import_cycle():
    mods = _modules()
    graph = {m: {d for _, d in _imports(p, mods, top_only=True) if d != m} for m, p in mods.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[str] = []

    def visit(u: str) -> None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                cycles.append(" -> ".join(stack[stack.index(v):] + [v]))
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "\n".join(cycles)


def test_layout_top_level_modules_and_size():
    mods = _modules()
    stray = sorted(m for m in mods if m.count(".") == 1 and m not in TOP_LEVEL and m.split(".")[1] not in LAYERS)
    assert not stray, f"modules directly in src/stgen besides the entry points: {stray}"
    long = sorted(f"{p.relative_to(SRC)} ({n} lines)" for p in mods.values()
                  if (n := len(p.read_text().splitlines())) > MAX_LINES)
    assert not long, f"modules over {MAX_LINES} lines: {long}"
    models = {m.split(".")[2] for m in mods if m.startswith("stgen.models.") and m.count(".") >= 3}
    from stgen.models.registry import MODELS, SPOT_MODELS

    # a preset of a model (``hinge-paper``) is registered under ``<package>-<preset>`` and lives in that package
    packages = {n.split("-")[0] for n in MODELS}
    assert models == packages, "one package per registered model"
    assert all(SPOT_MODELS[n][0].startswith(f"stgen.models.{n.split('-')[0]}.") for n in MODELS)


def test_the_checker_sees_a_climbing_import(tmp_path):
    """The layer rule really fires: a data module importing a workflow is a violation."""
    p = tmp_path / "x.py"
    p.write_text("from stgen.workflows.fit import fit\n")
    mods = _modules()
    deps = _imports(p, mods, top_only=False)
    assert deps == [(1, "stgen.workflows.fit")] and _layer("stgen.workflows.fit") > _layer("stgen.data.panel")
