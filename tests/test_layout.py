"""The package layout reads as the data flow: each stage imports only what lies below it, every package says
what it owns, and no two modules import each other (not even lazily, inside a function)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "capsafe"

# what each part of capsafe may import; the top-level modules (spec, cli, pipeline, preflight, run_inputs,
# errors) are listed under their own names
BELOW = {
    "errors": set(),
    "common": {"errors"},
    "judging": {"errors", "common"},
    "inputs": {"errors", "common"},
    "world": {"errors", "common", "judging"},
    "mitigations": {"errors", "common", "inputs"},
    "spec": {"errors", "common", "judging", "mitigations", "world"},
    "runtime": {"errors", "common", "spec"},
    "train": {"errors", "common", "mitigations", "runtime", "spec"},
    "evaluate": {"errors", "common", "judging", "mitigations", "spec"},
    "report": {"errors", "common", "judging"},
    "run_inputs": {"errors", "common", "inputs", "runtime", "spec", "world"},
    "preflight": {"errors", "common", "evaluate", "judging", "spec", "train"},
    "pipeline": {"errors", "common", "evaluate", "preflight", "report", "run_inputs", "runtime", "spec", "train"},
    "extend": {"errors", "common", "evaluate", "preflight", "report", "run_inputs", "runtime", "spec"},
    "plan": {"errors", "common", "preflight", "report", "run_inputs", "runtime", "spec", "train"},
    "cli": {"errors", "common", "extend", "pipeline", "plan", "report", "runtime", "spec", "train"},
}


def _module(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _part(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "capsafe"


def _imports() -> dict[str, set[str]]:
    """Every capsafe module -> the capsafe modules it imports anywhere in its body."""
    graph: dict[str, set[str]] = {}
    modules = {_module(p) for p in PACKAGE.rglob("*.py")}
    for path in PACKAGE.rglob("*.py"):
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("capsafe"):
                for alias in node.names:  # `from capsafe.x import y` may name the module capsafe.x.y
                    sub = f"{node.module}.{alias.name}"
                    found.add(sub if sub in modules else node.module)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("capsafe")}
        graph[_module(path)] = found - {_module(path)}
    return graph


def test_each_stage_imports_only_what_lies_below_it() -> None:
    wrong = []
    for module, imported in _imports().items():
        part = _part(module)
        for other in imported:
            target = _part(other)
            if target not in (part, "capsafe") and target not in BELOW[part]:
                wrong.append(f"{module} -> {other}")
    assert not wrong, "imports against the data flow:\n" + "\n".join(sorted(wrong))
    # the allowed arrows themselves run one way
    seen: set[str] = set()

    def visit(part: str, path: tuple[str, ...]) -> None:
        assert part not in path, f"packages import each other: {' -> '.join((*path, part))}"
        if part not in seen:
            for lower in BELOW[part]:
                visit(lower, (*path, part))
            seen.add(part)

    for part in BELOW:
        visit(part, ())


def test_no_two_modules_import_each_other() -> None:
    graph = _imports()
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for other in sorted(graph.get(module, ())):
            if state.get(other) == 1:
                cycle = path[path.index(other):] + [module, other] if other in path else [module, other]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if other in graph and not state.get(other):
                visit(other, [*path, module])
        state[module] = 2

    for module in sorted(graph):
        if not state.get(module):
            visit(module, [])


def test_every_module_and_package_says_what_it_owns() -> None:
    missing = [str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py")
               if not ast.get_docstring(ast.parse(p.read_text()))]
    assert not missing, f"no module docstring: {missing}"
