"""The package's modules import each other without cycles (lazy imports inside functions included)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cyb_lightning"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package modules ``path`` imports anywhere in its body (``from . import x`` resolved)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules and t != name}
    return found


def test_no_import_cycles_between_modules():
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(paths)
    # Package __init__ files re-export their children; an edge child → parent package is not a cycle of logic.
    graph = {m: {t for t in imports_of(p, modules) if not m.startswith(t + ".")} for m, p in paths.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t] if t in stack else [m, t])
            elif t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" → ".join(c) for c in cycles)


COMMANDS = ("cyb_lightning.__main__", "cyb_lightning.cli", "cyb_lightning.commands", "cyb_lightning.experiments")


def test_the_library_never_imports_the_commands_above_it():
    """Commands (the CLI, ``generate``, ``report``, the experiments) use the library; the library never reaches up
    to them, and the evaluation library does not reach up to the training callbacks that draw with it."""
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}

    def is_command(m: str) -> bool:
        return any(m == c or m.startswith(c + ".") for c in COMMANDS)

    upward = []
    for m, p in paths.items():
        targets = imports_of(p, set(paths))
        if not is_command(m):
            upward += [(m, t) for t in targets if is_command(t)]
        if m.startswith("cyb_lightning.evaluation"):
            upward += [(m, t) for t in targets if t.startswith("cyb_lightning.callbacks")]
    assert not upward, "upward imports: " + "; ".join(f"{m} → {t}" for m, t in upward)
