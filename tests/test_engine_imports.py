"""The engine's modules import one way: no import cycle between them, none hidden in a function body, and
the task modules use the config for type checking only (the config checks `train.task` against the task
table). Read from the source, so a new module is held to the same rules."""

from __future__ import annotations

import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parents[1] / "eva02" / "engine"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ENGINE.parents[1]).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _engine_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ENGINE.rglob("*.py"))}


def _targets(node: ast.AST, modules: dict[str, Path]) -> set[str]:
    """The engine modules an import statement loads (a name imported from a package may be a module)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    else:
        return set()
    return {n for n in names if n in modules}


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(path: Path, modules: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(engine modules imported when the module runs, engine modules imported inside functions)."""
    tree = ast.parse(path.read_text())
    at_load, in_functions = set(), set()

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                continue
            inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            (in_functions if inner else at_load).update(_targets(child, modules))
            visit(child, inner)

    visit(tree, False)
    return at_load, in_functions


def test_no_import_cycles_and_no_hidden_engine_imports() -> None:
    modules = _engine_modules()
    graph = {}
    for name, path in modules.items():
        at_load, in_functions = _imports(path, modules)
        assert not in_functions, f"{name} imports {sorted(in_functions)} inside a function: import at the top"
        graph[name] = at_load - {name}
    assert {"eva02.engine.config", "eva02.engine.tasks", "eva02.engine.train"} <= graph.keys()
    state: dict[str, str] = {}

    def walk(name: str, path: list[str]) -> None:
        state[name] = "open"
        for dep in sorted(graph[name]):
            assert state.get(dep) != "open", "import cycle: " + " -> ".join([*path, name, dep])
            if dep not in state:
                walk(dep, [*path, name])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            walk(name, [])
    for name in graph:
        if name.startswith("eva02.engine.tasks."):
            assert "eva02.engine.config" not in graph[name], f"{name} imports the config when it runs"
    assert "eva02.engine.tasks" in graph["eva02.engine.config_check"]  # train.task is checked against TASKS
