"""The package's layout, read from its source: the rules of the renovation, kept.

Every module at most 400 lines; no import cycle among jxent's modules; no
private name imported across modules; the dense-or-fused choice
(``isinstance(..., LinearLogits)``) made in at most two modules (the
positions step, which validates, and the engine, which dispatches).
"""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "jxent"


def modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = (path, ast.parse(path.read_text()))
    return out


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    if node.level:
        base = base[: len(base) - node.level + 1]
        return ".".join(base + ([node.module] if node.module else []))
    return node.module or ""


def imports(name: str, path, tree) -> list[tuple[str, list[str]]]:
    """``(imported module, names)`` for every ``from ... import`` inside jxent, anywhere."""
    out = []
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = _resolve(name, node, is_package)
            if target.startswith("jxent"):
                out.append((target, [a.name for a in node.names]))
    return out


def test_no_module_is_over_400_lines():
    long = {
        str(path.relative_to(PACKAGE.parent)): n
        for path, _ in modules().values()
        if (n := len(path.read_text().splitlines())) > 400
    }
    assert not long, long


def test_no_private_name_crosses_a_module_wall():
    mods = modules()
    crossings = [
        (name, target, n)
        for name, (path, tree) in mods.items()
        for target, names in imports(name, path, tree)
        for n in names
        if n.startswith("_") and not n.startswith("__") and f"{target}.{n}" not in mods
    ]
    assert not crossings, crossings


def test_no_import_cycle():
    mods = modules()
    graph = {}
    for name, (path, tree) in mods.items():
        deps = set()
        for target, names in imports(name, path, tree):
            for n in names:  # `from . import _loop` imports a module
                if f"{target}.{n}" in mods:
                    deps.add(f"{target}.{n}")
            if target in mods:
                deps.add(target)
        graph[name] = deps - {name}
    # A package's __init__ importing its own submodules is not a cycle of modules.
    for name in graph:
        graph[name] = {d for d in graph[name] if not (name.startswith(d + ".") and d in mods)}

    state = {}

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                raise AssertionError(" -> ".join(stack + [node, dep]))
            if dep not in state:
                visit(dep, stack + [node])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_the_dense_or_fused_choice_is_made_in_at_most_two_modules():
    deciders = set()
    for name, (_, tree) in modules().items():
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", None) == "isinstance"
                and "LinearLogits" in ast.unparse(node.args[1])
            ):
                deciders.add(name)
    assert deciders <= {"jxent._positions", "jxent._engine"}, deciders
    assert len(deciders) <= 2
