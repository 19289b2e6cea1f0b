"""The package's shape: imports go downward only, and nothing imports in a circle.

LAYERS is the one table of the architecture (README.md's map follows it): a module may import
modules of its own layer or of a lower one, never of a higher one; a circle is an error even
within a layer. Every import statement counts, also one inside a function (a lazy import is
still a dependency). The test parses the source files; it imports nothing of the package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. A module's layer is that of the longest prefix listed here.
LAYERS: list[tuple[str, ...]] = [
    ("prorank_fast.kernels",),  # the fused kernels and their fp32 references: import nothing of the trainer
    ("prorank_fast.errors", "prorank_fast.io"),  # the error base class; atomic writes
    ("prorank_fast.data",),  # records, readers, the one BEIR loader, templates, demo
    ("prorank_fast.packing",),  # PackedBatch, the one token-budget chunker, micro-batch plans
    ("prorank_fast.modeling",),  # model/tokenizer loading, varlen attention, shared prefixes
    ("prorank_fast.scoring", "prorank_fast.grpo"),  # the score head + loss; stage 1's pieces
    ("prorank_fast.loop", "prorank_fast.evaluation", "prorank_fast.rerank", "prorank_fast.export"),
    ("prorank_fast.config",),  # recipes: allowed values come from the owners below
    ("prorank_fast.stages",),  # prepare, held-out evaluation, stage 1, stage 2
    ("prorank_fast.train", "prorank_fast.dry_run"),  # orchestration
    ("prorank_fast.cli", "prorank_fast"),  # the command line; the package's lazy top-level API
    ("benchmarks._memory", "benchmarks._common"),  # memory measurement; the kernels loaded once, shared inputs
    ("benchmarks.harness",),  # the one timing / statistics harness, the GPU run context
    ("benchmarks",),  # one theme per file (and the package)
    ("benchmarks.gpu_suite", "benchmarks.conftest", "benchmarks.test_"),  # runs the themes' sections
]


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    parts = list(rel.with_suffix("").parts)
    if parts[0] == "kernels":  # installed as prorank_fast.kernels (setup.py package_dir)
        parts = ["prorank_fast", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    files = [*ROOT.glob("prorank_fast/**/*.py"), *ROOT.glob("kernels/**/*.py"), *ROOT.glob("benchmarks/**/*.py")]
    return {_module_name(p): p for p in sorted(files)}


def _layer(module: str) -> int:
    best, best_len = None, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            matches = (
                module == prefix
                or module.startswith(prefix + ".")
                or (prefix.endswith("_") and module.startswith(prefix))
            )
            if matches and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in {Path(__file__).name}")
    return best


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The modules of the project that `module` imports (relative imports resolved)."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from pkg import submodule` imports the submodule; `from mod import name` the module
            submodules = [f"{target}.{alias.name}" for alias in node.names]
            names = submodules + ([target] if any(m not in known for m in submodules) else [])
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def _graph() -> dict[str, set[str]]:
    sources = _sources()
    known = set(sources)
    return {module: _imports(module, path, known) for module, path in sources.items()}


def test_every_module_has_a_layer():
    layers = {module: _layer(module) for module in _sources()}
    assert layers["prorank_fast.kernels.lm_head"] == 0 and layers["prorank_fast.cli"] == layers["prorank_fast"]
    assert all(0 <= layer < len(LAYERS) for layer in layers.values())
    with pytest.raises(AssertionError, match="is in no layer"):
        _layer("somewhere_else.module")


def test_imports_go_downward_only():
    upward = [
        f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})"
        for module, targets in _graph().items()
        for target in sorted(targets)
        if _layer(target) > _layer(module)
    ]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_circles():
    graph = _graph()
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    circles = []

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                circles.append(" -> ".join(stack[stack.index(target) :] + [module, target]))
            elif target not in state:
                visit(target, stack + [module] if module not in stack else stack)
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert not circles, "import circles:\n" + "\n".join(circles)


@pytest.mark.parametrize(
    ("source", "problem"),
    [
        ("from prorank_fast.stages import prepare\n", "upward"),  # data reaching up to the stages
        ("from ..cli import main\n", "upward"),
    ],
)
def test_the_check_catches_an_upward_import(tmp_path, monkeypatch, source, problem):
    """The rule above is not vacuous: a data module that imported a higher layer is reported."""
    module = "prorank_fast.data.records"
    path = tmp_path / "records.py"
    path.write_text(source)
    targets = _imports(module, path, set(_sources()))
    assert targets and all(_layer(t) > _layer(module) for t in targets), (problem, targets)


def test_module_size():
    """One job per file: no module of the trainer over ~500 lines unless one cohesive thing needs it."""
    cohesive = {"prorank_fast.modeling.attention"}  # the backends, the registered function and its fallbacks
    long = [
        f"{module}: {n} lines"
        for module, path in _sources().items()
        if module.startswith("prorank_fast.") and not module.startswith("prorank_fast.kernels")
        and module not in cohesive and (n := len(path.read_text().splitlines())) > 520
    ]  # fmt: skip
    assert not long, "modules over 520 lines:\n" + "\n".join(long)
