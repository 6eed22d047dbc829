"""The library's modules import one another without a circle (the top-level package's re-exports aside)."""
import ast
from pathlib import Path

import DiffusionMICLib

ROOT = Path(DiffusionMICLib.__file__).parent


def module_name(path: Path) -> str:
    parts = ["DiffusionMICLib", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def runtime_imports(path: Path) -> set[str]:
    """Library modules `path` imports when run (in functions too; not under `if TYPE_CHECKING`),
    with the packages that importing them loads first."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and is_type_checking(node):
            return
        targets = []
        if isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            targets = [module] + [f"{module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        for target in targets:
            parts = target.split(".")
            for i in range(2, len(parts) + 1):    # a submodule loads its packages first
                found.add(".".join(parts[:i]))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


def test_no_import_circle():
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    del modules["DiffusionMICLib"]     # the façade re-exports everything; nothing imports it back
    # a module's own packages are loaded before it, so importing them is no circle
    graph = {m: sorted(n for n in runtime_imports(p) & set(modules) if not (m + ".").startswith(n + "."))
             for m, p in modules.items()}
    assert "DiffusionMICLib.tasks" in graph["DiffusionMICLib.engine.pipeline"]    # the test sees real edges
    state: dict[str, str] = {}

    def cycle_from(m: str, trail: list[str]) -> list[str] | None:
        state[m] = "open"
        for n in graph[m]:
            if state.get(n) == "open":
                return trail[trail.index(n):] + [n] if n in trail else [m, n]
            if n not in state and (found := cycle_from(n, trail + [n])):
                return found
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = cycle_from(m, [m])
            assert cycle is None, " -> ".join(cycle)
